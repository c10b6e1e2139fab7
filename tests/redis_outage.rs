//! Redis crashing under two `jetsource-projector` processes (issue 9): both
//! copies answer queries exactly again within a bound once Redis is back,
//! empty, whether it was gone for a moment or for longer than a client's
//! reconnection schedule; while it is gone, queries are answered
//! `unavailable` promptly instead of hanging; and while a copy rebuilds a
//! large read model (what follows Redis coming back empty), its own queries
//! do not fail behind its batches.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use futures::StreamExt;
use jetsource_core::protocol::decode_reply;
use jetsource_test_support::{NatsCluster, NatsServer, RedisServer};
use jetsource_tests::{wait_for_service, Process};
use serde_json::{json, Value};

/// How long both copies may take to answer exactly again after Redis is
/// back (Redis lost everything: the read models are rebuilt from the
/// stream).
const RECOVERY: Duration = Duration::from_secs(30);

/// The NATS side: one node, or a 3-node cluster with the stream at R3.
#[allow(dead_code)] // held so the servers stop on drop
enum Nats {
    Single(NatsServer),
    Cluster(NatsCluster),
}

struct Fleet {
    _nats: Nats,
    nats_url: String,
    replicas: &'static str,
    redis: RedisServer,
    client: async_nats::Client,
    _worker: Process,
    _projectors: Vec<Process>,
    /// Each account's expected balance and version.
    accounts: BTreeMap<String, (u64, u64)>,
}

impl Fleet {
    async fn start() -> Self {
        let mut fleet = Self::without_projectors().await;
        fleet.start_projectors(&[]).await;
        fleet
    }

    /// Like [`Fleet::start`], on a 3-node cluster with replicas 3.
    async fn start_on_cluster() -> Self {
        let cluster = NatsCluster::start();
        let client = cluster.client().await;
        let url = cluster.urls();
        let mut fleet = Self::with(Nats::Cluster(cluster), url, client, "3").await;
        fleet.start_projectors(&[]).await;
        fleet
    }

    async fn without_projectors() -> Self {
        let nats = NatsServer::start();
        let client = nats.client().await;
        let url = nats.url();
        Self::with(Nats::Single(nats), url, client, "1").await
    }

    async fn with(
        nats: Nats,
        nats_url: String,
        client: async_nats::Client,
        replicas: &'static str,
    ) -> Self {
        let redis = RedisServer::start();
        let worker = Process::start_at(
            "jetsource-command",
            &nats_url,
            &[("JETSOURCE__STORE__REPLICAS", replicas)],
            None,
        );
        wait_for_service(&client, "jetsource-command", 1).await;
        Self {
            _nats: nats,
            nats_url,
            replicas,
            redis,
            client,
            _worker: worker,
            _projectors: Vec::new(),
            accounts: BTreeMap::new(),
        }
    }

    /// Two projector copies, with `extra` settings.
    async fn start_projectors(&mut self, extra: &[(&str, &str)]) {
        let url = self.redis.url();
        let mut env = vec![
            ("JETSOURCE__REDIS__URL", url.as_str()),
            ("JETSOURCE__PROJECTOR__PARTITIONS", "4"),
            ("JETSOURCE__PROJECTOR__FAILOVER_MS", "1000"),
            ("JETSOURCE__STORE__REPLICAS", self.replicas),
        ];
        env.extend_from_slice(extra);
        self._projectors = vec![
            Process::start_at("jetsource-projector", &self.nats_url, &env, None),
            Process::start_at("jetsource-projector", &self.nats_url, &env, None),
        ];
        wait_for_service(&self.client, "jetsource-projector", 2).await;
    }

    /// Appends `deposits` deposits to each of `accounts` new accounts
    /// straight to the store (many appends at once, faster than commands):
    /// a large backlog for the projectors.
    async fn append_backlog(&mut self, accounts: usize, deposits: u64) {
        let store = jetsource_core::store::EventStore::open(
            self.client.clone(),
            &Default::default(),
            &Default::default(),
        )
        .await
        .unwrap();
        let writers = 64;
        let mut tasks = Vec::new();
        for w in 0..writers {
            let store = store.clone();
            tasks.push(tokio::spawn(async move {
                let mut done = Vec::new();
                for a in (w..accounts).step_by(writers) {
                    let id = format!("b{a}");
                    let mut last = 0;
                    let mut balance = 0;
                    for version in 0..=deposits {
                        let (event_type, data) = if version == 0 {
                            ("AccountOpened", json!({"owner": "o"}))
                        } else {
                            let amount = (a as u64 + version) % 9 + 1;
                            balance += amount;
                            ("Deposited", json!({"amount": amount}))
                        };
                        let event = jetsource_core::aggregate::NewEvent {
                            event_type: event_type.into(),
                            data: data.to_string().into_bytes(),
                            sealed: None,
                        };
                        let appended = store
                            .append(&jetsource_core::store::Append {
                                aggregate_type: "account",
                                aggregate_id: &id,
                                expected_last_sequence: last,
                                version,
                                events: std::slice::from_ref(&event),
                                schema_version: 1,
                                command_id: None,
                                correlation_id: "backlog",
                                causation_id: "backlog",
                                command_aggregate: None,
                                previous_hash: store.hash_at(last).await.unwrap(),
                            })
                            .await
                            .unwrap();
                        last = appended.last_sequence;
                    }
                    done.push((id, (balance, deposits + 1)));
                }
                done
            }));
        }
        for task in tasks {
            self.accounts.extend(task.await.unwrap());
        }
    }

    async fn command(&mut self, id: &str, body: Value) {
        let outcome = jetsource_test_support::requests::send(&self.client, "account", id, body)
            .await
            .unwrap();
        let entry = self.accounts.entry(id.to_owned()).or_insert((0, 0));
        entry.1 = outcome.version;
    }

    /// Opens `accounts` accounts (if new) and deposits into each `deposits`
    /// times.
    async fn load(&mut self, accounts: usize, deposits: u64) {
        for a in 0..accounts {
            let id = format!("r{a}");
            if !self.accounts.contains_key(&id) {
                self.command(&id, json!({"type": "OpenAccount", "data": {"owner": "o"}}))
                    .await;
            }
            for d in 0..deposits {
                let amount = (a as u64 + d) % 9 + 1;
                self.command(&id, json!({"type": "Deposit", "data": {"amount": amount}}))
                    .await;
                self.accounts.get_mut(&id).unwrap().0 += amount;
            }
        }
    }

    async fn last_sequence(&self) -> u64 {
        let js = async_nats::jetstream::new(self.client.clone());
        let mut stream = js.get_stream("EVENTS").await.unwrap();
        stream.info().await.unwrap().state.last_sequence
    }

    /// The decoded reply to a query, or why there is none.
    async fn query(&self, subject: &str, body: Value) -> Result<Value, String> {
        let request = self
            .client
            .request(subject.to_owned(), body.to_string().into());
        match tokio::time::timeout(Duration::from_secs(10), request).await {
            Ok(Ok(reply)) => match decode_reply::<Value>(&reply.payload).unwrap() {
                Ok(value) => Ok(value),
                Err(e) => Err(format!("{:?}: {}", e.code, e.message)),
            },
            Ok(Err(e)) => Err(format!("no reply: {e}")),
            Err(_) => Err("no reply within 10 s".into()),
        }
    }

    /// Requests answered so far by each projector copy, by service id.
    async fn served(&self) -> BTreeMap<String, u64> {
        let inbox = self.client.new_inbox();
        let mut replies = self.client.subscribe(inbox.clone()).await.unwrap();
        self.client
            .publish_with_reply("$SRV.STATS.jetsource-projector", inbox, "".into())
            .await
            .unwrap();
        let mut served = BTreeMap::new();
        while served.len() < 2 {
            let Ok(Some(stats)) =
                tokio::time::timeout(Duration::from_secs(2), replies.next()).await
            else {
                break;
            };
            let stats: Value = serde_json::from_slice(&stats.payload).unwrap();
            let requests = stats["endpoints"][0]["num_requests"].as_u64().unwrap();
            served.insert(stats["id"].as_str().unwrap().to_owned(), requests);
        }
        served
    }

    /// Until both copies answer every account and the totals exactly (the
    /// read model rebuilt up to the stream's end): 20 queries in a row
    /// answered right, some by each copy. Panics after [`RECOVERY`].
    async fn wait_until_both_copies_answer_exactly(&self, since: Instant) -> Duration {
        let last = self.last_sequence().await;
        let wait = json!({"min_sequence": last, "timeout_ms": 2000});
        let sum: u64 = self.accounts.values().map(|(b, _)| b).sum();
        let ids: Vec<&String> = self.accounts.keys().collect();
        let mut last_failure = String::new();
        loop {
            assert!(
                since.elapsed() < RECOVERY,
                "the projectors did not answer exactly within {RECOVERY:?}; last: {last_failure}"
            );
            let before = self.served().await;
            let mut right = 0;
            for i in 0..20 {
                let answer = if i % 5 == 4 {
                    self.query("query.accounts.totals", wait.clone())
                        .await
                        .map(|v| {
                            let want = json!({"open_accounts": ids.len(), "balance_sum": sum});
                            (v["data"] == want, v)
                        })
                } else {
                    let id = ids[i % ids.len()];
                    let (balance, version) = self.accounts[id];
                    self.query(&format!("query.account.{id}"), wait.clone())
                        .await
                        .map(|v| {
                            let data = &v["data"];
                            (data["balance"] == balance && data["version"] == version, v)
                        })
                };
                match answer {
                    Ok((true, _)) => right += 1,
                    Ok((false, v)) => {
                        last_failure = format!("wrong answer {v}");
                        break;
                    }
                    Err(e) => {
                        last_failure = e;
                        break;
                    }
                }
            }
            let after = self.served().await;
            let both = after.len() == 2
                && after
                    .iter()
                    .all(|(id, n)| *n > before.get(id).copied().unwrap_or(0));
            if right == 20 && both {
                return since.elapsed();
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn both_projector_copies_answer_exactly_after_redis_restarts_empty() {
    redis_restarts_empty(Fleet::start().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cluster_both_projector_copies_answer_exactly_after_redis_restarts_empty() {
    redis_restarts_empty(Fleet::start_on_cluster().await).await;
}

async fn redis_restarts_empty(mut fleet: Fleet) {
    fleet.load(8, 10).await;
    fleet
        .wait_until_both_copies_answer_exactly(Instant::now())
        .await;

    fleet.redis.restart_empty();
    let back = Instant::now();
    // Commands go on while the read models are rebuilt.
    fleet.load(8, 3).await;
    let took = fleet.wait_until_both_copies_answer_exactly(back).await;
    println!("both copies exact {took:?} after Redis came back empty");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn projector_copies_recover_after_redis_was_down_longer_than_a_reconnection_schedule() {
    let mut fleet = Fleet::start().await;
    fleet.load(6, 8).await;
    fleet
        .wait_until_both_copies_answer_exactly(Instant::now())
        .await;

    fleet.redis.kill();
    // Longer than redis-rs' ConnectionManager retries reconnecting (six
    // attempts with exponential back-off from 100 ms: about 6 s plus the
    // attempts). Meanwhile every query is answered, `unavailable`, within
    // the Redis timeout (2 s) and a margin, never left hanging.
    let down = Instant::now();
    let mut answered = 0;
    while down.elapsed() < Duration::from_secs(8) {
        let started = Instant::now();
        let answer = fleet.query("query.account.r1", json!({})).await;
        let took = started.elapsed();
        let error = answer.unwrap_err();
        assert!(error.starts_with("Unavailable"), "{error}");
        assert!(
            took < Duration::from_secs(4),
            "a query took {took:?} with Redis down: {error}"
        );
        answered += 1;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(answered >= 5);

    fleet.redis.start_again();
    let back = Instant::now();
    fleet.load(6, 2).await;
    let took = fleet.wait_until_both_copies_answer_exactly(back).await;
    println!("both copies exact {took:?} after Redis came back empty");
}

/// What Redis coming back empty is followed by, on a large scale: a copy
/// rebuilding a read model from the whole stream, in big batches (40,000
/// events, batches of up to 10,000). Its own queries, metadata and
/// watermark reads used to share one Redis connection with those batches,
/// under redis-rs' 500 ms default timeout: on the loaded machine of the
/// chaos run every call of that copy failed (`Redis: timed out`) while the
/// other copy answered. Every query during the catch-up must be answered
/// from Redis (partial data is fine, errors are not). On an idle machine
/// the old design may pass this too; `reads_are_answered_while_a_long_batch_
/// is_written` in the projector crate pins the cause down.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_applying_copy_keeps_answering_while_it_catches_up_a_large_backlog() {
    let mut fleet = Fleet::without_projectors().await;
    let started = Instant::now();
    fleet.append_backlog(2_000, 19).await;
    println!("40,000 events appended in {:?}", started.elapsed());
    fleet
        .start_projectors(&[("JETSOURCE__PROJECTOR__BATCH_SIZE", "10000")])
        .await;
    let caught_up = Instant::now();
    let sum: u64 = fleet.accounts.values().map(|(b, _)| b).sum();
    let mut answered = 0;
    loop {
        match fleet.query("query.accounts.totals", json!({})).await {
            Ok(v) if v["data"]["balance_sum"] == sum => break,
            Ok(_) => answered += 1,
            // Before the first copy created the read model's metadata.
            Err(e) if e.contains("is being built") => {}
            Err(e) => panic!(
                "a query failed {:?} into the catch-up: {e}",
                caught_up.elapsed()
            ),
        }
        assert!(
            caught_up.elapsed() < RECOVERY,
            "not caught up within {RECOVERY:?}"
        );
    }
    println!(
        "caught up in {:?}; {answered} queries answered meanwhile",
        caught_up.elapsed()
    );
    fleet
        .wait_until_both_copies_answer_exactly(Instant::now())
        .await;
}
