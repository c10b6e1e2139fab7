//! Read models: projection status and blue/green rebuild, dead letters.

use std::time::{Duration, Instant};

use anyhow::anyhow;
use indicatif::ProgressBar;
use jetsource_core::protocol::ErrorCode;
use jetsource_core::store::EventStore;
use jetsource_projector::redis_store::RedisStore;
use jetsource_projector::{control_subject, dlq, new_generation};
use serde_json::{json, Value};

use crate::args::{DlqCommand, ProjectionCommand};
use crate::context::Context;
use crate::exit::Failure;
use crate::output::Out;
use crate::rfc3339;
use crate::table::Table;

/// How often a running rebuild is looked at.
const POLL: Duration = Duration::from_millis(200);
/// A rebuild without progress for this long gets a warning.
const STALL_WARNING: Duration = Duration::from_secs(30);

pub async fn run(
    ctx: &Context,
    command: ProjectionCommand,
    out: &mut Out<'_>,
) -> anyhow::Result<()> {
    match command {
        ProjectionCommand::Status => status(ctx, out).await,
        ProjectionCommand::Rebuild { name } => rebuild(ctx, &name, out).await,
    }
}

pub async fn dlq(ctx: &Context, command: DlqCommand, out: &mut Out<'_>) -> anyhow::Result<()> {
    match command {
        DlqCommand::List => dlq_list(ctx, out).await,
        DlqCommand::Replay { seq } => dlq_replay(ctx, seq, out).await,
    }
}

async fn status(ctx: &Context, out: &mut Out<'_>) -> anyhow::Result<()> {
    let redis = ctx.redis().await?;
    let store = ctx.store().await?;
    let last = store.info().await?.state.last_sequence;
    let mut rows = Vec::new();
    for name in ctx.projection_names() {
        rows.push(status_row(&redis, &store, name, last).await?);
    }
    if out.json {
        return out.doc(&rows);
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
        table.row(status_cells(&row));
    }
    out.table(&table)
}

async fn status_row(
    redis: &RedisStore,
    store: &EventStore,
    name: &str,
    last: u64,
) -> anyhow::Result<Value> {
    Ok(jetsource_projector::status::projection_status(redis, store, name, last).await?)
}

fn status_cells(row: &Value) -> [String; 7] {
    let text = |k: &str| match &row[k] {
        Value::Null => "-".to_owned(),
        Value::String(s) => s.clone(),
        v => v.to_string(),
    };
    let rebuild = match &row["rebuild"] {
        Value::Null => "-".to_owned(),
        r => format!("g{} at {}", r["generation"], r["checkpoint"]),
    };
    let generation = if row["state"] == "active" {
        text("generation")
    } else {
        text("state")
    };
    [
        text("projection"),
        generation,
        text("checkpoint"),
        text("stream_last_sequence"),
        text("lag_events"),
        row["lag_seconds"]
            .as_f64()
            .map_or("-".into(), |s| format!("{s:.1}s")),
        rebuild,
    ]
}

/// The answer of the rebuild-start script in Redis.
enum Start {
    Started,
    Busy(String),
    Missing,
}

impl Start {
    fn parse(answer: &str) -> Self {
        match answer.strip_prefix("busy:") {
            Some(generation) => Start::Busy(generation.to_owned()),
            None if answer == "ok" => Start::Started,
            None => Start::Missing,
        }
    }
}

async fn rebuild(ctx: &Context, name: &str, out: &mut Out<'_>) -> anyhow::Result<()> {
    if !ctx.projection_names().contains(&name) {
        return Err(Failure::invalid(format!(
            "unknown projection {name:?}; known: {}",
            ctx.projection_names().join(", ")
        ))
        .into());
    }
    let redis = ctx.redis().await?;
    let store = ctx.store().await?;
    let generation = start_rebuild(ctx, &redis, name).await?;
    let client = store.jetstream().client();
    // Only wakes the projectors early; they find the rebuild on their own.
    let _ = client
        .publish(control_subject(name), "rebuild".into())
        .await;
    let began = Instant::now();
    let done = watch_rebuild(&redis, &store, name, generation, out).await?;
    let secs = began.elapsed().as_secs_f64();
    let rate = done as f64 / secs.max(1e-3);
    if out.json {
        return out.doc(&json!({"projection": name, "generation": generation, "events": done, "seconds": secs, "events_per_second": rate}));
    }
    out.line(format_args!("rebuilt {name}: generation {generation} is active, {done} events in {secs:.1}s ({rate:.0} events/s); old keys deleted"))
}

/// Rebuilds `name` (waiting until its new generation is active) if it has
/// a read model; whether it had one.
pub(crate) async fn rebuild_quietly(
    ctx: &Context,
    name: &str,
    out: &mut Out<'_>,
) -> anyhow::Result<bool> {
    let redis = ctx.redis().await?;
    if redis.meta(name).await?.is_none() {
        return Ok(false);
    }
    let store = ctx.store().await?;
    let generation = start_rebuild(ctx, &redis, name).await?;
    let _ = store
        .jetstream()
        .client()
        .publish(control_subject(name), "rebuild".into())
        .await;
    watch_rebuild(&redis, &store, name, generation, out).await?;
    Ok(true)
}

/// Starts building a new generation; returns it.
async fn start_rebuild(ctx: &Context, redis: &RedisStore, name: &str) -> anyhow::Result<u64> {
    let meta = redis.meta(name).await?.ok_or_else(|| {
        Failure::not_found(format!(
            "projection {name} has no read model yet: start {} first",
            crate::worker_binary("projector")
        ))
    })?;
    let generation = new_generation(meta.active.max(meta.building.map_or(0, |b| b.0)));
    let partitions = ctx.config.projector.partitions;
    match Start::parse(&redis.start_rebuild(name, generation, partitions).await?) {
        Start::Started => Ok(generation),
        Start::Busy(busy) => Err(Failure::new(
            ErrorCode::Conflict,
            format!("a rebuild of {name} is already running (generation {busy}); watch it with `jetsource projection status`"),
        )
        .into()),
        Start::Missing => Err(Failure::not_found(format!(
            "projection {name} has no read model (Redis lost it?); the projector rebuilds it on its own"
        ))
        .into()),
    }
}

/// Follows the rebuild with a progress bar until `generation` is active;
/// returns the events it applied.
async fn watch_rebuild(
    redis: &RedisStore,
    store: &EventStore,
    name: &str,
    generation: u64,
    out: &mut Out<'_>,
) -> anyhow::Result<u64> {
    let bar = out.progress(store.info().await?.state.last_sequence, "events");
    bar.set_message(format!("rebuilding {name}"));
    let result = follow_rebuild(redis, store, name, generation, &bar, out).await;
    match &result {
        Ok(_) => out.finish(&bar),
        Err(_) => out.abandon(&bar),
    }
    result
}

async fn follow_rebuild(
    redis: &RedisStore,
    store: &EventStore,
    name: &str,
    generation: u64,
    bar: &ProgressBar,
    out: &mut Out<'_>,
) -> anyhow::Result<u64> {
    let mut progress = (0, Instant::now());
    loop {
        let meta = redis.meta(name).await?;
        let done = redis.watermark(name, generation).await?;
        let target = store.info().await?.state.last_sequence;
        bar.set_length(target.max(done));
        bar.set_position(done);
        match meta {
            Some(m) if m.active == generation => return Ok(done),
            Some(m) if m.building.map(|b| b.0) == Some(generation) => {}
            _ => return Err(Failure::new(ErrorCode::Conflict, format!("the rebuild of {name} was abandoned (the projection metadata changed; did Redis lose its data?)")).into()),
        }
        if done > progress.0 {
            progress = (done, Instant::now());
        } else if progress.1.elapsed() > STALL_WARNING {
            bar.suspend(|| {
                out.warn(format!(
                    "no progress for 30 s: is {} running?",
                    crate::worker_binary("projector")
                ))
            });
            progress.1 = Instant::now();
        }
        tokio::time::sleep(POLL).await;
    }
}

async fn dlq_stream(
    ctx: &Context,
) -> anyhow::Result<Option<async_nats::jetstream::stream::Stream>> {
    use async_nats::jetstream::context::GetStreamErrorKind;
    let js = async_nats::jetstream::new(ctx.client().await?);
    let name = &ctx.config.projector.dead_letter_stream;
    match js.get_stream(name).await {
        Ok(stream) => Ok(Some(stream)),
        Err(e)
            if matches!(
                e.kind(),
                GetStreamErrorKind::JetStream(api)
                    if api.error_code().0 == jetsource_core::store::codes::STREAM_NOT_FOUND
            ) =>
        {
            Ok(None)
        }
        Err(e) => Err(Failure::unavailable(format!(
            "cannot open the dead-letter stream {name}: {e}"
        ))
        .into()),
    }
}

async fn dlq_list(ctx: &Context, out: &mut Out<'_>) -> anyhow::Result<()> {
    let letters = match dlq_stream(ctx).await? {
        Some(mut stream) => dlq::list(&mut stream).await?,
        None => Vec::new(),
    };
    if out.json {
        return out.doc(&letters);
    }
    if letters.is_empty() {
        return out.line("no dead letters");
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
    out.table(&table)
}

async fn dlq_replay(ctx: &Context, only: Option<u64>, out: &mut Out<'_>) -> anyhow::Result<()> {
    let results = match dlq_stream(ctx).await? {
        Some(mut stream) => {
            let redis = ctx.redis().await?;
            let store = ctx.store().await?;
            dlq::replay(&mut stream, &store, &redis, &ctx.projections, only).await?
        }
        None => Vec::new(),
    };
    if let (Some(seq), true) = (only, results.is_empty()) {
        return Err(Failure::not_found(format!(
            "no dead letter with sequence {seq}; see `jetsource dlq list`"
        ))
        .into());
    }
    print_replayed(&results, out)?;
    let kept = results.iter().filter(|r| r.reason.is_some()).count();
    if kept == 0 {
        return Ok(());
    }
    let mut failure = Failure::new(
        ErrorCode::Internal,
        format!("{kept} dead letters could not be replayed and were kept"),
    );
    failure.printed = true;
    Err(anyhow!(failure))
}

fn print_replayed(results: &[dlq::Replayed], out: &mut Out<'_>) -> anyhow::Result<()> {
    if out.json {
        return out.doc(&results);
    }
    if results.is_empty() {
        return out.line("no dead letters");
    }
    let mut table = Table::new(["SEQ", "EVENT SEQ", "RESULT"]);
    for r in results {
        let result = match &r.reason {
            Some(reason) => format!("kept: {reason}"),
            None => r.result.to_owned(),
        };
        table.row([r.sequence.to_string(), r.event_sequence.to_string(), result]);
    }
    out.table(&table)
}
