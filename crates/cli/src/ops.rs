//! Read-side commands: queries, projection status and rebuild, dead letters.

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _};
use jetsource_core::config::Config;
use jetsource_core::protocol::decode_reply;
use jetsource_core::store::EventStore;
use jetsource_projector::redis_store::RedisStore;
use jetsource_projector::{control_subject, dlq, new_generation};
use serde_json::{json, Value};

use crate::table::Table;
use crate::{rfc3339, Domain};

async fn redis(config: &Config) -> anyhow::Result<RedisStore> {
    RedisStore::connect(&config.redis.url)
        .await
        .with_context(|| {
            format!(
                "cannot reach Redis at {}; is redis-server running?",
                config.redis.url
            )
        })
}

fn projection_names(domain: &Domain) -> Vec<&'static str> {
    domain.projections.iter().map(|p| p.name()).collect()
}

pub async fn query(
    client: &async_nats::Client,
    json: bool,
    what: &str,
    id: Option<&str>,
    min_sequence: Option<u64>,
    limit: Option<usize>,
) -> anyhow::Result<()> {
    let subject = match id {
        Some(id) => format!("query.{what}.{id}"),
        None => format!("query.{what}"),
    };
    let mut body = serde_json::Map::new();
    if let Some(min) = min_sequence {
        body.insert("min_sequence".into(), min.into());
    }
    if let Some(limit) = limit {
        body.insert("limit".into(), limit.into());
    }
    let reply = tokio::time::timeout(
        Duration::from_secs(35),
        client.request(subject.clone(), Value::Object(body).to_string().into()),
    )
    .await
    .map_err(|_| anyhow!("no reply on {subject}; is jetsource-projector running?"))?
    .map_err(|e| anyhow!("query {subject} failed: {e}; is jetsource-projector running?"))?;
    let decoded =
        decode_reply::<Value>(&reply.payload).context("the reply is not a jetsource reply")?;
    if json {
        println!("{}", String::from_utf8_lossy(&reply.payload));
    }
    let value = decoded.map_err(|e| anyhow!("{}: {}", e.code, e.message))?;
    if !json {
        println!("as of sequence {}", value["sequence"]);
        println!("{}", serde_json::to_string_pretty(&value["data"])?);
    }
    Ok(())
}

pub async fn projection_status(
    client: &async_nats::Client,
    config: &Config,
    domain: &Domain,
    json: bool,
) -> anyhow::Result<()> {
    let redis = redis(config).await?;
    let store = EventStore::open(client.clone(), &config.nats, &config.store).await?;
    let last = store.info().await?.state.last_sequence;
    let now = time::OffsetDateTime::now_utc();
    let mut rows = Vec::new();
    for name in projection_names(domain) {
        let meta = redis.meta(name).await?;
        let Some(meta) = meta else {
            rows.push(json!({"projection": name, "state": "not built (no projector has run)"}));
            continue;
        };
        let checkpoint = redis.watermark(name, meta.active).await?;
        let lag = last.saturating_sub(checkpoint);
        // Lag in time: how long the oldest event not yet applied has waited.
        let lag_seconds = if lag == 0 {
            0.0
        } else {
            match store.get(checkpoint + 1).await {
                Ok(Some(event)) => (now - event.timestamp).as_seconds_f64().max(0.0),
                _ => 0.0,
            }
        };
        let rebuild = match meta.building {
            Some((generation, _)) => {
                let done = redis.watermark(name, generation).await?;
                json!({"generation": generation, "checkpoint": done})
            }
            None => Value::Null,
        };
        rows.push(json!({
            "projection": name,
            "state": "active",
            "generation": meta.active,
            "partitions": meta.partitions,
            "checkpoint": checkpoint,
            "stream_last_sequence": last,
            "lag_events": lag,
            "lag_seconds": lag_seconds,
            "rebuild": rebuild,
        }));
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    let mut table = Table::new([
        "PROJECTION",
        "GENERATION",
        "CHECKPOINT",
        "STREAM",
        "LAG",
        "LAG TIME",
        "REBUILD",
    ]);
    for row in rows {
        let text = |k: &str| match &row[k] {
            Value::Null => "-".to_owned(),
            Value::String(s) => s.clone(),
            v => v.to_string(),
        };
        let rebuild = match &row["rebuild"] {
            Value::Null => "-".to_owned(),
            r => format!("g{} at {}", r["generation"], r["checkpoint"]),
        };
        table.row([
            text("projection"),
            if row["state"] == "active" {
                text("generation")
            } else {
                text("state")
            },
            text("checkpoint"),
            text("stream_last_sequence"),
            text("lag_events"),
            row["lag_seconds"]
                .as_f64()
                .map_or("-".into(), |s| format!("{s:.1}s")),
            rebuild,
        ]);
    }
    print!("{table}");
    Ok(())
}

pub async fn projection_rebuild(
    client: &async_nats::Client,
    config: &Config,
    domain: &Domain,
    name: &str,
    json: bool,
) -> anyhow::Result<()> {
    if !projection_names(domain).contains(&name) {
        bail!(
            "unknown projection {name:?}; known: {}",
            projection_names(domain).join(", ")
        );
    }
    let redis = redis(config).await?;
    let store = EventStore::open(client.clone(), &config.nats, &config.store).await?;
    let meta = redis.meta(name).await?.ok_or_else(|| {
        anyhow!("projection {name} has no read model yet: start jetsource-projector first")
    })?;
    let generation = new_generation(meta.active.max(meta.building.map_or(0, |b| b.0)));
    let started = redis
        .start_rebuild(name, generation, config.projector.partitions)
        .await?;
    if let Some(busy) = started.strip_prefix("busy:") {
        bail!("a rebuild of {name} is already running (generation {busy}); watch it with `jetsource projection status`");
    }
    if started != "ok" {
        bail!("projection {name} has no read model (Redis lost it?); the projector rebuilds it on its own");
    }
    client
        .publish(control_subject(name), "rebuild".into())
        .await
        .ok();
    let began = Instant::now();
    let tty = std::io::stderr().is_terminal();
    let mut last_line = Instant::now() - Duration::from_secs(10);
    let mut samples: std::collections::VecDeque<(Instant, u64)> = Default::default();
    let mut stalled_since = Instant::now();
    let mut previous = 0;
    loop {
        let meta = redis.meta(name).await?;
        let done = redis.watermark(name, generation).await?;
        let target = store.info().await?.state.last_sequence.max(1);
        match meta {
            Some(m) if m.active == generation => {
                let secs = began.elapsed().as_secs_f64();
                if tty {
                    eprintln!();
                }
                let rate = done as f64 / secs.max(1e-3);
                if json {
                    println!(
                        "{}",
                        json!({"projection": name, "generation": generation, "events": done, "seconds": secs, "events_per_second": rate})
                    );
                } else {
                    println!("rebuilt {name}: generation {generation} is active, {done} events in {secs:.1}s ({rate:.0} events/s); old keys deleted");
                }
                return Ok(());
            }
            Some(m) if m.building == Some((generation, config.projector.partitions)) || m.building.map(|b| b.0) == Some(generation) => {}
            _ => bail!("the rebuild of {name} was abandoned (the projection metadata changed; did Redis lose its data?)"),
        }
        if done > previous {
            previous = done;
            stalled_since = Instant::now();
        } else if stalled_since.elapsed() > Duration::from_secs(30) {
            eprintln!("no progress for 30 s: is jetsource-projector running?");
            stalled_since = Instant::now();
        }
        samples.push_back((Instant::now(), done));
        while samples.len() > 10 {
            samples.pop_front();
        }
        let rate = match (samples.front(), samples.back()) {
            (Some((t0, d0)), Some((t1, d1))) if t1 > t0 => {
                (d1 - d0) as f64 / (*t1 - *t0).as_secs_f64()
            }
            _ => 0.0,
        };
        let fraction = (done as f64 / target as f64).min(1.0);
        let eta = if rate > 0.0 {
            format!("{:.0}s", (target.saturating_sub(done)) as f64 / rate)
        } else {
            "?".into()
        };
        let width = 30;
        let filled = (fraction * width as f64) as usize;
        let line = format!(
            "rebuilding {name} [{}{}] {done}/{target} events {:5.1}%  {rate:.0} events/s  ETA {eta}",
            "#".repeat(filled),
            ".".repeat(width - filled),
            fraction * 100.0
        );
        if tty {
            eprint!("\r{line}");
            let _ = std::io::stderr().flush();
        } else if last_line.elapsed() >= Duration::from_secs(1) {
            eprintln!("{line}");
            last_line = Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn dlq_stream(
    client: &async_nats::Client,
    config: &Config,
) -> anyhow::Result<Option<async_nats::jetstream::stream::Stream>> {
    let js = async_nats::jetstream::new(client.clone());
    match js.get_stream(&config.projector.dead_letter_stream).await {
        Ok(stream) => Ok(Some(stream)),
        Err(e)
            if matches!(
                e.kind(),
                async_nats::jetstream::context::GetStreamErrorKind::JetStream(api)
                    if api.error_code().0 == jetsource_core::store::codes::STREAM_NOT_FOUND
            ) =>
        {
            Ok(None)
        }
        Err(e) => Err(anyhow!("cannot open the dead-letter stream: {e}")),
    }
}

pub async fn dlq_list(
    client: &async_nats::Client,
    config: &Config,
    json: bool,
) -> anyhow::Result<()> {
    let letters = match dlq_stream(client, config).await? {
        Some(mut stream) => dlq::list(&mut stream).await.map_err(|e| anyhow!(e))?,
        None => Vec::new(),
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&letters)?);
        return Ok(());
    }
    if letters.is_empty() {
        println!("no dead letters");
        return Ok(());
    }
    let mut table = Table::new(["SEQ", "PROJECTION", "EVENT SEQ", "SUBJECT", "AT", "REASON"]);
    for l in &letters {
        table.row([
            l.sequence.to_string(),
            l.projection.clone(),
            l.original_sequence.to_string(),
            l.original_subject.clone(),
            rfc3339(l.dead_lettered_at),
            l.reason.clone(),
        ]);
    }
    print!("{table}");
    Ok(())
}

pub async fn dlq_replay(
    client: &async_nats::Client,
    config: &Config,
    domain: &Domain,
    only: Option<u64>,
    json: bool,
) -> anyhow::Result<()> {
    let Some(mut stream) = dlq_stream(client, config).await? else {
        println!("no dead letters");
        return Ok(());
    };
    let redis = redis(config).await?;
    let store = EventStore::open(client.clone(), &config.nats, &config.store).await?;
    let projections = domain.projections.clone();
    let results = dlq::replay(&mut stream, &store, &redis, &projections, only)
        .await
        .map_err(|e| anyhow!(e))?;
    if let (Some(seq), true) = (only, results.is_empty()) {
        bail!("no dead letter with sequence {seq}; see `jetsource dlq list`");
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&results)?);
    } else {
        let mut table = Table::new(["SEQ", "EVENT SEQ", "RESULT"]);
        for r in &results {
            let result = match &r.reason {
                Some(reason) => format!("kept: {reason}"),
                None => r.result.to_owned(),
            };
            table.row([r.sequence.to_string(), r.event_sequence.to_string(), result]);
        }
        if results.is_empty() {
            println!("no dead letters");
        } else {
            print!("{table}");
        }
    }
    if results.iter().any(|r| r.result == "kept") {
        bail!("some dead letters could not be replayed and were kept");
    }
    Ok(())
}

pub async fn snapshot_status(
    client: &async_nats::Client,
    config: &Config,
    domain: &Domain,
    json: bool,
) -> anyhow::Result<()> {
    use jetsource_core::snapshot::{Snapshot, SnapshotStore};
    let store = EventStore::open(client.clone(), &config.nats, &config.store).await?;
    let snapshots =
        SnapshotStore::open(store.jetstream(), &config.snapshot, config.store.replicas).await?;
    let registry = &domain.registry;
    let now = time::OffsetDateTime::now_utc();
    #[derive(Default)]
    struct Row {
        count: u64,
        unusable: u64,
        oldest_seconds: f64,
        behind_max: u64,
        behind_sum: u64,
    }
    let mut rows: std::collections::BTreeMap<String, Row> = Default::default();
    for key in snapshots.keys().await? {
        let Some((aggregate_type, aggregate_id)) = key.split_once('.') else {
            continue;
        };
        let row = rows.entry(aggregate_type.to_owned()).or_default();
        row.count += 1;
        let schema = registry
            .get(aggregate_type)
            .map_or(0, |a| a.state_schema_version());
        let Some(bytes) = snapshots.get_raw(aggregate_type, aggregate_id).await? else {
            continue;
        };
        match Snapshot::decode(&bytes, schema) {
            Ok(snapshot) => {
                let age = (now - snapshot.taken_at).as_seconds_f64().max(0.0);
                row.oldest_seconds = row.oldest_seconds.max(age);
                let current = store
                    .last_version(aggregate_type, aggregate_id)
                    .await?
                    .map_or(0, |(v, _)| v);
                let behind = current.saturating_sub(snapshot.version);
                row.behind_max = row.behind_max.max(behind);
                row.behind_sum += behind;
            }
            Err(_) => row.unusable += 1,
        }
    }
    let out: Vec<Value> = rows
        .iter()
        .map(|(t, r)| {
            json!({
                "aggregate_type": t,
                "snapshots": r.count,
                "unusable": r.unusable,
                "oldest_seconds": r.oldest_seconds,
                "events_behind_max": r.behind_max,
                "events_behind_avg": if r.count > r.unusable { r.behind_sum as f64 / (r.count - r.unusable) as f64 } else { 0.0 },
                "every": config.snapshot.every(t),
            })
        })
        .collect();
    if json {
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    if out.is_empty() {
        println!("no snapshots in bucket {}", snapshots.bucket());
        return Ok(());
    }
    let mut table = Table::new([
        "TYPE",
        "SNAPSHOTS",
        "UNUSABLE",
        "OLDEST",
        "BEHIND (MAX)",
        "BEHIND (AVG)",
        "EVERY",
    ]);
    for r in &out {
        table.row([
            r["aggregate_type"].as_str().unwrap_or("").to_owned(),
            r["snapshots"].to_string(),
            r["unusable"].to_string(),
            format!("{:.0}s", r["oldest_seconds"].as_f64().unwrap_or(0.0)),
            r["events_behind_max"].to_string(),
            format!("{:.1}", r["events_behind_avg"].as_f64().unwrap_or(0.0)),
            r["every"].to_string(),
        ]);
    }
    print!("{table}");
    Ok(())
}

pub async fn snapshot_rebuild(
    client: &async_nats::Client,
    config: &Config,
    domain: &Domain,
    only_type: Option<&str>,
    json: bool,
) -> anyhow::Result<()> {
    use jetsource_core::snapshot::SnapshotStore;
    let registry = &domain.registry;
    if let Some(t) = only_type {
        if registry.get(t).is_none() {
            bail!(
                "unknown aggregate type {t:?}; known types: {}",
                registry.types().collect::<Vec<_>>().join(", ")
            );
        }
    }
    let store = EventStore::open(client.clone(), &config.nats, &config.store).await?;
    let snapshots =
        SnapshotStore::open(store.jetstream(), &config.snapshot, config.store.replicas).await?;
    let began = Instant::now();
    let tty = std::io::stderr().is_terminal();
    let mut last_line = Instant::now() - Duration::from_secs(10);
    let written =
        jetsource_snapshotter::rebuild(&store, &snapshots, registry, only_type, |done, total| {
            let secs = began.elapsed().as_secs_f64().max(1e-3);
            let rate = done as f64 / secs;
            let eta = (total - done) as f64 / rate.max(1e-9);
            let line = format!(
                "rebuilding snapshots: {done}/{total} aggregates  {rate:.0}/s  ETA {eta:.0}s"
            );
            if tty {
                eprint!("\r{line}");
            } else if last_line.elapsed() >= Duration::from_secs(1) || done == total {
                eprintln!("{line}");
                last_line = Instant::now();
            }
        })
        .await?;
    if tty {
        eprintln!();
    }
    let secs = began.elapsed().as_secs_f64();
    if json {
        println!("{}", json!({"snapshots": written, "seconds": secs}));
    } else {
        println!("wrote {written} snapshots in {secs:.1}s");
    }
    Ok(())
}
