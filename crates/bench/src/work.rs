//! The workloads.

use std::collections::HashMap;
use std::future::Future;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _};
use async_nats::header::NATS_EXPECTED_LAST_SUBJECT_SEQUENCE;
use async_nats::jetstream::{self, consumer};
use async_nats::HeaderMap;
use futures::stream::FuturesUnordered;
use futures::StreamExt;
use jetsource_core::aggregate::NewEvent;
use jetsource_core::config::{NatsConfig, StoreConfig};
use jetsource_core::envelope;
use jetsource_core::loader::{Loaded, Until};
use jetsource_core::protocol::{decode_reply, CommandOutcome};
use jetsource_core::snapshot::{Snapshot, SnapshotStore};
use jetsource_core::store::{Append, EventStore};
use jetsource_test_support::wait_for_service;
use serde::{Deserialize, Serialize};

use crate::{ModeResults, ReadResults, Sizes};

#[derive(Debug, Clone, Copy)]
pub enum Layer {
    Raw,
    Ideal,
    Worker,
}

impl Layer {
    pub const ALL: [Layer; 3] = [Layer::Raw, Layer::Ideal, Layer::Worker];

    pub fn name(self) -> &'static str {
        match self {
            Layer::Raw => "raw",
            Layer::Ideal => "ideal",
            Layer::Worker => "worker",
        }
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Stats {
    pub ops: usize,
    pub seconds: f64,
    pub ops_per_sec: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
}

impl Stats {
    fn from(mut latencies: Vec<Duration>, elapsed: Duration) -> Self {
        latencies.sort();
        let pick = |q: f64| {
            latencies
                .get(((latencies.len() as f64 * q) as usize).min(latencies.len().saturating_sub(1)))
                .map_or(0.0, |d| d.as_secs_f64() * 1e6)
        };
        Self {
            ops: latencies.len(),
            seconds: elapsed.as_secs_f64(),
            ops_per_sec: latencies.len() as f64 / elapsed.as_secs_f64().max(1e-9),
            p50_us: pick(0.50),
            p99_us: pick(0.99),
            p999_us: pick(0.999),
        }
    }

    pub fn latencies(&self) -> String {
        format!("{:.0}/{:.0}/{:.0}", self.p50_us, self.p99_us, self.p999_us)
    }
}

/// Prints `phase: done/total, rate, ETA` every second until dropped.
struct Progress(tokio::task::JoinHandle<()>);

impl Progress {
    fn start(phase: String, done: Arc<AtomicUsize>, total: usize) -> Self {
        let started = Instant::now();
        Self(tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            tick.tick().await;
            loop {
                tick.tick().await;
                let d = done.load(Ordering::Relaxed);
                let rate = d as f64 / started.elapsed().as_secs_f64();
                let eta = total.saturating_sub(d) as f64 / rate.max(1e-9);
                eprintln!("  {phase}: {d}/{total}  {rate:.0}/s  ETA {eta:.0}s");
            }
        }))
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Runs `ops` operations from `clients` concurrent clients; `op(client, k)`.
async fn drive<F, Fut>(phase: &str, clients: usize, ops: usize, op: F) -> anyhow::Result<Stats>
where
    F: Fn(usize, usize) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = anyhow::Result<()>> + Send + 'static,
{
    let ops = ops.max(clients);
    let done = Arc::new(AtomicUsize::new(0));
    let _progress = Progress::start(phase.to_owned(), done.clone(), ops);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for client in 0..clients {
        let op = op.clone();
        let done = done.clone();
        // The remainder goes to the first clients: exactly `ops` in all.
        let per = ops / clients + usize::from(client < ops % clients);
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::with_capacity(per);
            for k in 0..per {
                let t = Instant::now();
                op(client, k).await?;
                latencies.push(t.elapsed());
                done.fetch_add(1, Ordering::Relaxed);
            }
            anyhow::Ok(latencies)
        }));
    }
    let mut all = Vec::with_capacity(ops);
    for t in tasks {
        all.extend(t.await??);
    }
    Ok(Stats::from(all, started.elapsed()))
}

/// The account a client uses for its k-th operation: clients own disjoint
/// accounts, so the figures measure throughput, not contention.
fn account_of(client: usize, clients: usize, accounts: usize, k: usize) -> usize {
    let owned = accounts.saturating_sub(client).div_ceil(clients).max(1);
    (client + (k % owned) * clients) % accounts.max(1)
}

/// A worker binary of this build, killed on drop.
pub struct Proc {
    child: Child,
}

impl Proc {
    pub fn start(binary: &str, nats_url: &str, env: &[(&str, String)]) -> anyhow::Result<Self> {
        let exe = std::env::current_exe()?;
        let path: PathBuf = exe.parent().context("no parent dir")?.join(binary);
        let mut command = Command::new(&path);
        command
            .env("JETSOURCE__NATS__URL", nats_url)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null());
        for (k, v) in env {
            command.env(k, v);
        }
        let child = command.spawn().with_context(|| {
            format!(
                "cannot start {}; build the workspace binaries first",
                path.display()
            )
        })?;
        Ok(Self { child })
    }

    /// Peak resident set size (VmHWM), in KiB.
    pub fn peak_rss_kb(&self) -> u64 {
        std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .unwrap_or_default()
            .lines()
            .find(|l| l.starts_with("VmHWM:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Headers of a stored event: the raw layers carry the same bytes.
fn envelope_headers(event_type: &str, version: u64) -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert(envelope::EVENT_ID, "0190f0c1-7d5e-7c3a-9f4e-1b2c3d4e5f60");
    h.insert(envelope::EVENT_TYPE, event_type);
    h.insert(envelope::SCHEMA_VERSION, "1");
    h.insert(envelope::AGGREGATE_VERSION, version.to_string().as_str());
    h.insert(
        envelope::CORRELATION_ID,
        "0190f0c1-7d5e-7c3a-9f4e-1b2c3d4e5f61",
    );
    h.insert(
        envelope::CAUSATION_ID,
        "0190f0c1-7d5e-7c3a-9f4e-1b2c3d4e5f61",
    );
    h
}

const DEPOSIT: &str = r#"{"amount":1}"#;

/// A connection to `url` (one URL, or a cluster's comma-separated) once
/// JetStream answers.
pub async fn connect(url: &str) -> anyhow::Result<async_nats::Client> {
    let servers: Vec<&str> = url.split(',').map(str::trim).collect();
    let client = async_nats::connect(servers)
        .await
        .with_context(|| format!("cannot connect to NATS at {url}"))?;
    let js = jetstream::new(client.clone());
    // A fresh cluster answers once it has elected a meta leader, which can
    // take a while on a busy machine.
    let deadline = Instant::now() + Duration::from_secs(60);
    while let Err(e) = js.query_account().await {
        anyhow::ensure!(
            Instant::now() < deadline,
            "JetStream at {url} does not answer: {e}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(client)
}

/// The event store, its stream created with `replicas` (3 on a cluster).
async fn open_store(
    nats_url: &str,
    replicas: usize,
) -> anyhow::Result<(async_nats::Client, EventStore)> {
    let client = connect(nats_url).await?;
    let nats = NatsConfig {
        url: nats_url.to_owned(),
        ..Default::default()
    };
    // The benchmark's own appends (the raw layers) are never grouped.
    let config = StoreConfig {
        replicas,
        group_commit: false,
        ..Default::default()
    };
    let store = EventStore::open(client.clone(), &nats, &config).await?;
    Ok((client, store))
}

/// The ideal command path: receive, append with the expected sequence, reply.
fn start_ideal_responder(
    client: async_nats::Client,
    js: jetstream::Context,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let Ok(mut requests) = client
            .queue_subscribe("bench.ideal.>", "ideal".into())
            .await
        else {
            return;
        };
        let last: Arc<Mutex<HashMap<String, u64>>> = Arc::default();
        while let Some(message) = requests.next().await {
            let (client, js, last) = (client.clone(), js.clone(), last.clone());
            tokio::spawn(async move {
                let id = message
                    .subject
                    .as_str()
                    .rsplit('.')
                    .next()
                    .unwrap_or("")
                    .to_owned();
                let expected = last
                    .lock()
                    .map(|m| m.get(&id).copied().unwrap_or(0))
                    .unwrap_or(0);
                let mut headers = envelope_headers("Deposited", expected + 1);
                headers.insert(
                    NATS_EXPECTED_LAST_SUBJECT_SEQUENCE,
                    expected.to_string().as_str(),
                );
                let publish = jetstream::message::PublishMessage::build()
                    .payload(DEPOSIT.into())
                    .headers(headers);
                let reply = match js
                    .send_publish(format!("events.idealbench.{id}"), publish)
                    .await
                {
                    Ok(ack) => match ack.await {
                        Ok(ack) => {
                            if let Ok(mut m) = last.lock() {
                                m.insert(id, ack.sequence);
                            }
                            ack.sequence.to_string()
                        }
                        Err(e) => format!("error: {e}"),
                    },
                    Err(e) => format!("error: {e}"),
                };
                if let Some(to) = message.reply {
                    let _ = client.publish(to, reply.into()).await;
                }
            });
        }
    })
}

pub(crate) async fn measure<F, Fut>(
    phase: &str,
    clients: usize,
    ops: usize,
    op: F,
) -> anyhow::Result<Stats>
where
    F: Fn(usize, usize, u64) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = anyhow::Result<()>> + Send + 'static,
{
    // Warm-up on its own keys (run 0), then the measured run (run 1).
    let warm = op.clone();
    drive(
        &format!("{phase} warm-up"),
        clients,
        (ops / 10).max(clients),
        move |c, k| warm(c, k, 0),
    )
    .await?;
    let stats = drive(phase, clients, ops, move |c, k| op(c, k, 1)).await?;
    eprintln!(
        "  {phase}: {:.0} ops/s, p50/p99/p999 {} µs",
        stats.ops_per_sec,
        stats.latencies()
    );
    Ok(stats)
}

/// The append workloads on the server(s) at `nats_url` (a cluster's URLs
/// comma-separated), the stream with `replicas` replicas.
pub async fn append_suite(
    nats_url: &str,
    replicas: usize,
    group_commit: bool,
    sizes: &Sizes,
) -> anyhow::Result<ModeResults> {
    let (client, store) = open_store(nats_url, replicas).await?;
    let js = store.jetstream().clone();
    // The worker declares the replicas it expects of the stream and creates
    // its own buckets with them.
    let env = [
        ("JETSOURCE__STORE__REPLICAS", replicas.to_string()),
        ("JETSOURCE__STORE__GROUP_COMMIT", group_commit.to_string()),
    ];
    let worker = Proc::start("jetsource-command", nats_url, &env)?;
    wait_for_service(&client, "jetsource-command", 1).await;
    let ideal = start_ideal_responder(connect(nats_url).await?, js.clone());
    let accounts = sizes.accounts;
    let mut results = ModeResults::default();

    // Accounts for the worker layer, opened once.
    let opener = client.clone();
    drive(
        "opening accounts",
        64.min(accounts),
        accounts,
        move |c, k| {
            let client = opener.clone();
            let idx = c + k * 64.min(accounts);
            async move {
                let body = r#"{"type":"OpenAccount","data":{"owner":"bench"}}"#;
                client
                    .request(format!("cmd.account.b{idx}"), body.into())
                    .await?;
                Ok(())
            }
        },
    )
    .await?;

    for &clients in &sizes.concurrency {
        // Raw: last sequence per account, owned by one client each.
        let last: Arc<Vec<Mutex<u64>>> =
            Arc::new((0..accounts * 2).map(|_| Mutex::new(0)).collect());
        let js2 = js.clone();
        let raw = measure(
            &format!("raw c={clients}"),
            clients,
            sizes.ops,
            move |c, k, run| {
                let js = js2.clone();
                let last = last.clone();
                async move {
                    let idx = account_of(c, clients, accounts, k);
                    let slot = &last[idx + run as usize * accounts];
                    let expected = *slot.lock().map_err(|_| anyhow!("poisoned"))?;
                    let mut headers = envelope_headers("Deposited", expected + 1);
                    headers.insert(
                        NATS_EXPECTED_LAST_SUBJECT_SEQUENCE,
                        expected.to_string().as_str(),
                    );
                    let publish = jetstream::message::PublishMessage::build()
                        .payload(DEPOSIT.into())
                        .headers(headers);
                    let ack = js
                        .send_publish(format!("events.rawbench.c{clients}r{run}a{idx}"), publish)
                        .await?
                        .await?;
                    *slot.lock().map_err(|_| anyhow!("poisoned"))? = ack.sequence;
                    Ok(())
                }
            },
        )
        .await?;
        let c2 = client.clone();
        let ideal_stats = measure(
            &format!("ideal c={clients}"),
            clients,
            sizes.ops,
            move |c, k, run| {
                let client = c2.clone();
                async move {
                    let idx = account_of(c, clients, accounts, k);
                    let reply = client
                        .request(
                            format!("bench.ideal.c{clients}r{run}a{idx}"),
                            DEPOSIT.into(),
                        )
                        .await?;
                    if reply.payload.starts_with(b"error") {
                        bail!(
                            "ideal responder: {}",
                            String::from_utf8_lossy(&reply.payload)
                        );
                    }
                    Ok(())
                }
            },
        )
        .await?;
        let c3 = client.clone();
        let worker_stats = measure(
            &format!("worker c={clients}"),
            clients,
            sizes.ops,
            move |c, k, _| {
                let client = c3.clone();
                async move {
                    let idx = account_of(c, clients, accounts, k);
                    let body = r#"{"type":"Deposit","data":{"amount":1}}"#;
                    let reply = client
                        .request(format!("cmd.account.b{idx}"), body.into())
                        .await?;
                    decode_reply::<CommandOutcome>(&reply.payload)?.map_err(|e| anyhow!("{e}"))?;
                    Ok(())
                }
            },
        )
        .await?;
        for (layer, stats) in [
            (Layer::Raw, raw),
            (Layer::Ideal, ideal_stats),
            (Layer::Worker, worker_stats),
        ] {
            results
                .append
                .entry(layer.name().to_owned())
                .or_default()
                .insert(clients, stats);
        }
    }

    for &clients in &sizes.batch_concurrency {
        let store2 = store.clone();
        let raw = measure(
            &format!("raw batch c={clients}"),
            clients,
            sizes.batch_ops,
            move |c, k, run| {
                let store = store2.clone();
                async move {
                    let events = [
                        NewEvent {
                            event_type: "AccountOpened".into(),
                            data: br#"{"owner":"bench"}"#.to_vec(),
                            sealed: None,
                        },
                        NewEvent {
                            event_type: "Deposited".into(),
                            data: DEPOSIT.as_bytes().to_vec(),
                            sealed: None,
                        },
                    ];
                    let id = format!("c{clients}r{run}n{c}x{k}");
                    store
                        .append(&Append {
                            aggregate_type: "rawbench",
                            aggregate_id: &id,
                            expected_last_sequence: 0,
                            version: 0,
                            events: &events,
                            schema_version: 1,
                            command_id: None,
                            correlation_id: "bench",
                            causation_id: "bench",
                            command_aggregate: None,
                            previous_hash: None,
                        })
                        .await?;
                    Ok(())
                }
            },
        )
        .await?;
        let c4 = client.clone();
        let worker_stats = measure(
            &format!("worker batch c={clients}"),
            clients,
            sizes.batch_ops,
            move |c, k, run| {
                let client = c4.clone();
                async move {
                    let body =
                        r#"{"type":"OpenAccount","data":{"owner":"bench","initial_deposit":1}}"#;
                    let reply = client
                        .request(format!("cmd.account.m{clients}r{run}n{c}x{k}"), body.into())
                        .await?;
                    decode_reply::<CommandOutcome>(&reply.payload)?.map_err(|e| anyhow!("{e}"))?;
                    Ok(())
                }
            },
        )
        .await?;
        results
            .multi_event
            .entry("raw".into())
            .or_default()
            .insert(clients, raw);
        results
            .multi_event
            .entry("worker".into())
            .or_default()
            .insert(clients, worker_stats);
    }
    results.command_worker_peak_rss_kb = worker.peak_rss_kb();
    results.worker_group_commit = group_commit;
    drop(worker);
    results.integrity = crate::integrity::costs(
        nats_url,
        replicas,
        &sizes.batch_concurrency,
        sizes.batch_ops,
    )
    .await?;
    results.integrity_cpu_us = crate::integrity::cpu_costs(20_000)?;
    ideal.abort();
    Ok(results)
}

/// Publishes `count` events of `aggregates` accounts (ids `<prefix><i>`) as
/// fast as JetStream takes them: set-up, not measured.
async fn seed(
    js: &jetstream::Context,
    prefix: &str,
    aggregates: usize,
    count: u64,
    phase: &str,
) -> anyhow::Result<()> {
    let mut versions = vec![0u64; aggregates];
    let done = Arc::new(AtomicUsize::new(0));
    let _progress = Progress::start(phase.to_owned(), done.clone(), count as usize);
    let mut acks = FuturesUnordered::new();
    for i in 0..count {
        let a = (i % aggregates as u64) as usize;
        versions[a] += 1;
        let (event_type, data) = if versions[a] == 1 {
            ("AccountOpened", r#"{"owner":"bench"}"#)
        } else {
            ("Deposited", DEPOSIT)
        };
        let publish = jetstream::message::PublishMessage::build()
            .payload(data.into())
            .headers(envelope_headers(event_type, versions[a]));
        acks.push(std::future::IntoFuture::into_future(
            js.send_publish(format!("events.account.{prefix}{a}"), publish)
                .await?,
        ));
        if acks.len() >= 4096 {
            if let Some(ack) = acks.next().await {
                ack?;
                done.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
    while let Some(ack) = acks.next().await {
        ack?;
        done.fetch_add(1, Ordering::Relaxed);
    }
    Ok(())
}

/// The floor under any projector of the `accounts` read model on this Redis:
/// the writes the projection emits for the seeded events (the same shape:
/// `AccountOpened`, then `Deposited`, over `accounts` accounts), sent as
/// plain pipelined commands, 1,000 events per round trip, generated on
/// another task while the previous batch is written. No NATS, no Lua, no
/// checkpoints, no watermark. The keys are deleted afterwards.
async fn raw_redis_writes(url: &str, accounts: usize, events: u64) -> anyhow::Result<f64> {
    use jetsource_bank::read_models::Accounts;
    use jetsource_projector::keys::{partition_of, KeySpace};
    use jetsource_projector::projection::{Op, Projection};

    const BATCH: u64 = 1_000;
    const PARTITIONS: u32 = 16;
    let client = redis::Client::open(url)?;
    let mut con = client.get_multiplexed_async_connection().await?;
    let (tx, mut rx) = tokio::sync::mpsc::channel::<redis::Pipeline>(2);
    let producer = tokio::spawn(async move {
        let projection = Accounts {
            recent_transactions: 20,
        };
        let mut versions = vec![0u64; accounts];
        let now = time::OffsetDateTime::now_utc();
        let mut sequence = 0;
        while sequence < events {
            let mut pipe = redis::pipe();
            let mut ops: Vec<Op> = Vec::new();
            for _ in 0..BATCH.min(events - sequence) {
                sequence += 1;
                let a = ((sequence - 1) % accounts as u64) as usize;
                versions[a] += 1;
                let (event_type, data) = if versions[a] == 1 {
                    ("AccountOpened", r#"{"owner":"bench"}"#)
                } else {
                    ("Deposited", DEPOSIT)
                };
                let id = format!("raw{a}");
                let event = envelope::RecordedEvent {
                    sequence,
                    timestamp: now,
                    aggregate_type: "account".into(),
                    aggregate_version: versions[a],
                    event_id: String::new(),
                    event_type: event_type.into(),
                    schema_version: 1,
                    command_id: None,
                    correlation_id: None,
                    causation_id: None,
                    data: bytes::Bytes::from_static(data.as_bytes()),
                    aggregate_id: id,
                    ..Default::default()
                };
                let partition = partition_of("account", &event.aggregate_id, PARTITIONS);
                let keys = KeySpace::new("rawbench", 1, partition);
                ops.clear();
                projection
                    .project(&event, &keys, &mut ops)
                    .map_err(|e| anyhow!("{e}"))?;
                for op in &ops {
                    pipe.cmd(&op.0[0]).arg(&op.0[1..]).ignore();
                }
            }
            if tx.send(pipe).await.is_err() {
                break;
            }
        }
        anyhow::Ok(())
    });
    let started = Instant::now();
    while let Some(pipe) = rx.recv().await {
        let () = pipe.query_async(&mut con).await?;
    }
    let elapsed = started.elapsed();
    producer.await??;
    let () = redis::cmd("FLUSHALL").query_async(&mut con).await?;
    Ok(events as f64 / elapsed.as_secs_f64())
}

fn median_ms(mut samples: Vec<Duration>) -> f64 {
    samples.sort();
    samples[samples.len() / 2].as_secs_f64() * 1e3
}

pub async fn read_suite(
    nats_url: &str,
    redis_url: &str,
    sizes: &Sizes,
) -> anyhow::Result<ReadResults> {
    let (client, store) = open_store(nats_url, 1).await?;
    let js = store.jetstream().clone();
    let mut r = ReadResults {
        events: sizes.replay_events,
        ..Default::default()
    };
    let accounts = sizes.accounts;
    seed(&js, "r", accounts, sizes.replay_events, "seeding events").await?;
    let last = store.info().await?.state.last_sequence;

    // Raw: an ordered consumer reading everything.
    let stream = js.get_stream("EVENTS").await?;
    let started = Instant::now();
    let mut messages = stream
        .create_consumer(consumer::pull::OrderedConfig {
            filter_subject: "events.>".into(),
            ..Default::default()
        })
        .await?
        .messages()
        .await?;
    let mut seen = 0u64;
    while seen < last {
        let m = messages.next().await.context("ordered consumer ended")??;
        seen = m.info().map_err(|e| anyhow!("{e}"))?.stream_sequence;
    }
    drop(messages);
    r.raw_replay_events_per_sec = last as f64 / started.elapsed().as_secs_f64();
    eprintln!("  raw replay: {:.0} events/s", r.raw_replay_events_per_sec);

    // Raw Redis: the same read model's writes without the projector.
    r.raw_redis_events_per_sec = raw_redis_writes(redis_url, accounts, sizes.replay_events).await?;
    eprintln!(
        "  raw Redis writes of the accounts read model: {:.0} events/s",
        r.raw_redis_events_per_sec
    );

    // Projector catch-up from a cold start.
    let env = [("JETSOURCE__REDIS__URL", redis_url.to_owned())];
    let redis_store = jetsource_projector::redis_store::RedisStore::connect(redis_url).await?;
    let started = Instant::now();
    let projector = Proc::start("jetsource-projector", nats_url, &env)?;
    let watermark = || async {
        match redis_store.meta("accounts").await.ok().flatten() {
            Some(meta) => redis_store
                .watermark("accounts", meta.active)
                .await
                .unwrap_or(0),
            None => 0,
        }
    };
    let deadline = Instant::now() + Duration::from_secs(3600);
    let mut next_line = Instant::now();
    loop {
        let w = watermark().await;
        if w >= last {
            break;
        }
        if Instant::now() >= next_line {
            let rate = w as f64 / started.elapsed().as_secs_f64();
            let eta = if rate >= 1.0 {
                format!("{:.0}s", (last - w) as f64 / rate)
            } else {
                "?".into()
            };
            eprintln!("  projector catch-up: {w}/{last}  {rate:.0}/s  ETA {eta}");
            next_line = Instant::now() + Duration::from_secs(1);
        }
        anyhow::ensure!(Instant::now() < deadline, "projector did not catch up");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    r.projector_catch_up_seconds = started.elapsed().as_secs_f64();
    r.projector_catch_up_events_per_sec = last as f64 / r.projector_catch_up_seconds;
    eprintln!(
        "  projector catch-up: {:.0} events/s",
        r.projector_catch_up_events_per_sec
    );

    // Blue/green rebuild through the CLI.
    let exe = std::env::current_exe()?;
    let cli = exe.parent().context("no parent dir")?.join("jetsource");
    let output = tokio::task::spawn_blocking({
        let url = nats_url.to_owned();
        let redis_url = redis_url.to_owned();
        move || {
            Command::new(cli)
                .args(["--url", &url, "--json", "projection", "rebuild", "accounts"])
                .env("JETSOURCE__REDIS__URL", redis_url)
                .stderr(Stdio::inherit())
                .output()
        }
    })
    .await??;
    anyhow::ensure!(
        output.status.success(),
        "rebuild failed: {}",
        String::from_utf8_lossy(&output.stdout)
    );
    let rebuilt: serde_json::Value = serde_json::from_slice(&output.stdout)?;
    r.rebuild_seconds = rebuilt["seconds"]
        .as_f64()
        .with_context(|| format!("the rebuild's JSON has no seconds: {rebuilt}"))?;
    eprintln!("  rebuild: {:.1}s", r.rebuild_seconds);

    // Loading an aggregate whose events are spread thinly over the stream
    // (one in every `accounts` messages): the common shape in production.
    {
        let registry = jetsource_bank::registry();
        let account = registry
            .get("account")
            .context("account aggregate")?
            .as_ref();
        let t = Instant::now();
        let l = tokio::time::timeout(
            Duration::from_secs(300),
            Loaded::load(&store, account, "r0", Until::End),
        )
        .await
        .context("loading a sparse aggregate took over 5 minutes")??;
        r.load_sparse_ms = t.elapsed().as_secs_f64() * 1e3;
        r.sparse_events = l.version;
        eprintln!(
            "  load a sparse aggregate ({} events over {last}): {:.1} ms",
            l.version, r.load_sparse_ms
        );
    }

    // Live lag under a steady load through the worker.
    let worker = Proc::start("jetsource-command", nats_url, &[])?;
    wait_for_service(&client, "jetsource-command", 1).await;
    let mut announcements = client.subscribe("jetsource.progress.accounts").await?;
    let seen_at: Arc<Mutex<Vec<(u64, Instant)>>> = Arc::default();
    let collector = {
        let seen_at = seen_at.clone();
        tokio::spawn(async move {
            while let Some(m) = announcements.next().await {
                if let Ok(v) = serde_json::from_slice::<serde_json::Value>(&m.payload) {
                    if let (Some(w), Ok(mut s)) = (v["watermark"].as_u64(), seen_at.lock()) {
                        s.push((w, Instant::now()));
                    }
                }
            }
        })
    };
    // A steady load on a working set of hot accounts (warmed first: cold
    // loads are measured elsewhere, this is about append-to-read-model lag).
    let hot = accounts.min(100);
    for i in 0..hot {
        let body = r#"{"type":"OpenAccount","data":{"owner":"lag"}}"#;
        let t = Instant::now();
        let reply = tokio::time::timeout(
            Duration::from_secs(120),
            client.send_request(
                format!("cmd.account.lag{i}"),
                async_nats::Request::new()
                    .payload(body.into())
                    .timeout(None),
            ),
        )
        .await
        .context("opening a hot account took over 2 minutes")??;
        if i < 3 {
            eprintln!(
                "  opening hot account {i}: {:.1} ms",
                t.elapsed().as_secs_f64() * 1e3
            );
        }
        decode_reply::<CommandOutcome>(&reply.payload)?.map_err(|e| anyhow!("{e}"))?;
    }
    let acked: Arc<Mutex<Vec<(u64, Instant)>>> = Arc::default();
    let total = sizes.steady_rate * sizes.steady_seconds;
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / sizes.steady_rate as f64));
    let mut sends = Vec::new();
    for i in 0..total {
        tick.tick().await;
        let (client, acked) = (client.clone(), acked.clone());
        sends.push(tokio::spawn(async move {
            let body = r#"{"type":"Deposit","data":{"amount":1}}"#;
            let reply = client
                .request(format!("cmd.account.lag{}", i as usize % hot), body.into())
                .await?;
            let outcome =
                decode_reply::<CommandOutcome>(&reply.payload)?.map_err(|e| anyhow!("{e}"))?;
            if let Ok(mut a) = acked.lock() {
                a.push((outcome.sequence, Instant::now()));
            }
            anyhow::Ok(())
        }));
    }
    for s in sends {
        s.await??;
    }
    let newest = acked
        .lock()
        .map(|a| a.iter().map(|x| x.0).max().unwrap_or(0))
        .unwrap_or(0);
    let deadline = Instant::now() + Duration::from_secs(60);
    while seen_at
        .lock()
        .map(|s| s.iter().all(|x| x.0 < newest))
        .unwrap_or(true)
    {
        anyhow::ensure!(
            Instant::now() < deadline,
            "the projector did not apply the steady load"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    collector.abort();
    let seen_at = seen_at.lock().map(|s| s.clone()).unwrap_or_default();
    let mut lags: Vec<Duration> = acked
        .lock()
        .map(|a| a.clone())
        .unwrap_or_default()
        .iter()
        .filter_map(|(seq, at)| {
            seen_at
                .iter()
                .find(|(w, _)| w >= seq)
                .map(|(_, when)| when.saturating_duration_since(*at))
        })
        .collect();
    lags.sort();
    let pick = |q: f64| {
        lags.get(((lags.len() as f64 * q) as usize).min(lags.len().saturating_sub(1)))
            .map_or(0.0, |d| d.as_secs_f64() * 1e3)
    };
    r.live_lag_p50_ms = pick(0.5);
    r.live_lag_p99_ms = pick(0.99);
    eprintln!(
        "  live lag: p50 {:.1} ms, p99 {:.1} ms",
        r.live_lag_p50_ms, r.live_lag_p99_ms
    );
    r.projector_peak_rss_kb = projector.peak_rss_kb();
    drop(worker);
    drop(projector);

    // Snapshotter catch-up on the whole stream.
    let started = Instant::now();
    let snapshotter = Proc::start("jetsource-snapshotter", nats_url, &[])?;
    let events_stream = js.get_stream("EVENTS").await?;
    let deadline = Instant::now() + Duration::from_secs(3600);
    loop {
        if let Ok(mut c) = events_stream
            .get_consumer::<consumer::pull::Config>("snapshotter")
            .await
        {
            let info = c.info().await?;
            if info.num_pending == 0 && info.num_ack_pending == 0 {
                break;
            }
        }
        anyhow::ensure!(Instant::now() < deadline, "snapshotter did not catch up");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    r.snapshotter_catch_up_seconds = started.elapsed().as_secs_f64();
    r.snapshotter_peak_rss_kb = snapshotter.peak_rss_kb();
    drop(snapshotter);
    let snapshots = SnapshotStore::open(&js, &Default::default(), 1).await?;
    // Every put is a message of the bucket's stream.
    r.snapshots_written = js
        .get_stream(format!("KV_{}", snapshots.bucket()))
        .await?
        .info()
        .await?
        .state
        .last_sequence;
    eprintln!(
        "  snapshotter catch-up: {:.1}s, {} snapshots written",
        r.snapshotter_catch_up_seconds, r.snapshots_written
    );
    r.load_sparse_after_snapshotter_ms = load_sparse(&store, &snapshots, "r1").await?;
    eprintln!(
        "  load a sparse aggregate after the snapshotter: {:.1} ms",
        r.load_sparse_after_snapshotter_ms
    );

    // Loading one long-lived aggregate, with and without a snapshot.
    r.big_aggregate_events = sizes.big_aggregate;
    seed(
        &js,
        "big",
        1,
        sizes.big_aggregate,
        "seeding the big aggregate",
    )
    .await?;
    let registry = jetsource_bank::registry();
    let account = registry
        .get("account")
        .context("account aggregate")?
        .as_ref();
    let mut full = Vec::new();
    let mut loaded = None;
    for _ in 0..3 {
        let t = Instant::now();
        let l = Loaded::load(&store, account, "big0", Until::End).await?;
        full.push(t.elapsed());
        loaded = Some(l);
    }
    let loaded = loaded.context("loaded")?;
    anyhow::ensure!(
        loaded.version == sizes.big_aggregate,
        "big aggregate has {} events",
        loaded.version
    );
    r.load_without_snapshot_ms = median_ms(full);
    let snapshot = loaded.to_snapshot(account, "big0").context("snapshot")?;
    snapshots
        .put_raw(
            &Snapshot::key("account", "big0"),
            serde_json::to_vec(&snapshot)?,
        )
        .await?;
    let mut with = Vec::new();
    for _ in 0..7 {
        let t = Instant::now();
        Loaded::load_with_snapshot(&store, &snapshots, account, "big0", Until::End).await?;
        with.push(t.elapsed());
    }
    r.load_with_snapshot_ms = median_ms(with);
    let tail: Vec<NewEvent> = (0..100)
        .map(|_| NewEvent {
            event_type: "Deposited".into(),
            data: DEPOSIT.as_bytes().to_vec(),
            sealed: None,
        })
        .collect();
    let mut expected = loaded.last_sequence;
    let mut previous_hash = loaded.last_hash;
    for (i, event) in tail.iter().enumerate() {
        let appended = store
            .append(&Append {
                aggregate_type: "account",
                aggregate_id: "big0",
                expected_last_sequence: expected,
                version: loaded.version + i as u64,
                events: std::slice::from_ref(event),
                schema_version: 1,
                command_id: None,
                correlation_id: "bench",
                causation_id: "bench",
                command_aggregate: None,
                previous_hash,
            })
            .await?;
        expected = appended.last_sequence;
        previous_hash = appended.last_hash;
    }
    let mut with_tail = Vec::new();
    for _ in 0..7 {
        let t = Instant::now();
        let (l, _) =
            Loaded::load_with_snapshot(&store, &snapshots, account, "big0", Until::End).await?;
        with_tail.push(t.elapsed());
        anyhow::ensure!(l.version == sizes.big_aggregate + 100, "tail not loaded");
    }
    r.load_with_snapshot_tail_100_ms = median_ms(with_tail);
    eprintln!(
        "  load {} events: {:.2} ms without snapshot, {:.2} ms with, {:.2} ms with a 100-event tail",
        sizes.big_aggregate, r.load_without_snapshot_ms, r.load_with_snapshot_ms, r.load_with_snapshot_tail_100_ms
    );
    Ok(r)
}

/// Milliseconds to load one aggregate the way the command worker does
/// (its snapshot, then the events after it).
async fn load_sparse(
    store: &EventStore,
    snapshots: &SnapshotStore,
    id: &str,
) -> anyhow::Result<f64> {
    let registry = jetsource_bank::registry();
    let account = registry
        .get("account")
        .context("account aggregate")?
        .as_ref();
    let t = Instant::now();
    let (loaded, _) = Loaded::load_with_snapshot(store, snapshots, account, id, Until::End).await?;
    let ms = t.elapsed().as_secs_f64() * 1e3;
    anyhow::ensure!(loaded.version > 0, "{id} has no events");
    Ok(ms)
}
