//! Aggregate snapshots: how many, how old, how far behind; rebuilt from a
//! full replay.

use std::collections::BTreeMap;
use std::time::Instant;

use jetsource_core::snapshot::{Snapshot, SnapshotStore};
use jetsource_core::store::EventStore;
use serde_json::{json, Value};

use crate::args::SnapshotCommand;
use crate::context::Context;
use crate::output::Out;
use crate::table::Table;

pub async fn run(ctx: &Context, command: SnapshotCommand, out: &mut Out<'_>) -> anyhow::Result<()> {
    match command {
        SnapshotCommand::Status => status(ctx, out).await,
        SnapshotCommand::Rebuild { aggregate_type } => {
            rebuild(ctx, aggregate_type.as_deref(), out).await
        }
    }
}

/// Snapshots of one aggregate type.
#[derive(Default)]
struct Row {
    count: u64,
    unusable: u64,
    oldest_seconds: f64,
    behind_max: u64,
    behind_sum: u64,
}

async fn status(ctx: &Context, out: &mut Out<'_>) -> anyhow::Result<()> {
    let store = ctx.store().await?;
    let snapshots = ctx.snapshots(&store).await?;
    let mut rows: BTreeMap<String, Row> = BTreeMap::new();
    for key in snapshots.keys().await? {
        let Some((aggregate_type, aggregate_id)) = key.split_once('.') else {
            continue;
        };
        let row = rows.entry(aggregate_type.to_owned()).or_default();
        count(ctx, &store, &snapshots, aggregate_type, aggregate_id, row).await?;
    }
    let out_rows: Vec<Value> = rows
        .iter()
        .map(|(t, r)| row_json(t, r, ctx.config.snapshot.every(t)))
        .collect();
    if out.json {
        return out.doc(&out_rows);
    }
    if out_rows.is_empty() {
        return out.line(format_args!(
            "no snapshots in bucket {}",
            snapshots.bucket()
        ));
    }
    out.table(&status_table(&out_rows))
}

/// Adds one aggregate's snapshot to its type's row.
async fn count(
    ctx: &Context,
    store: &EventStore,
    snapshots: &SnapshotStore,
    aggregate_type: &str,
    aggregate_id: &str,
    row: &mut Row,
) -> anyhow::Result<()> {
    row.count += 1;
    let schema = ctx
        .registry
        .get(aggregate_type)
        .map_or(0, |a| a.state_schema_version());
    let Some(bytes) = snapshots.get_raw(aggregate_type, aggregate_id).await? else {
        return Ok(());
    };
    let Ok(snapshot) = Snapshot::decode(&bytes, schema) else {
        row.unusable += 1;
        return Ok(());
    };
    let age = (time::OffsetDateTime::now_utc() - snapshot.taken_at).as_seconds_f64();
    row.oldest_seconds = row.oldest_seconds.max(age.max(0.0));
    let current = store
        .last_version(aggregate_type, aggregate_id)
        .await?
        .map_or(0, |(v, _)| v);
    let behind = current.saturating_sub(snapshot.version);
    row.behind_max = row.behind_max.max(behind);
    row.behind_sum += behind;
    Ok(())
}

fn row_json(aggregate_type: &str, r: &Row, every: u64) -> Value {
    let usable = r.count - r.unusable;
    let average = if usable > 0 {
        r.behind_sum as f64 / usable as f64
    } else {
        0.0
    };
    json!({
        "aggregate_type": aggregate_type,
        "snapshots": r.count,
        "unusable": r.unusable,
        "oldest_seconds": r.oldest_seconds,
        "events_behind_max": r.behind_max,
        "events_behind_avg": average,
        "every": every,
    })
}

fn status_table(rows: &[Value]) -> Table {
    let mut table = Table::new([
        "TYPE",
        "SNAPSHOTS",
        "UNUSABLE",
        "OLDEST",
        "BEHIND (MAX)",
        "BEHIND (AVG)",
        "EVERY",
    ]);
    for r in rows {
        table.row([
            r["aggregate_type"].as_str().unwrap_or_default().to_owned(),
            r["snapshots"].to_string(),
            r["unusable"].to_string(),
            format!("{:.0}s", r["oldest_seconds"].as_f64().unwrap_or(0.0)),
            r["events_behind_max"].to_string(),
            format!("{:.1}", r["events_behind_avg"].as_f64().unwrap_or(0.0)),
            r["every"].to_string(),
        ]);
    }
    table
}

async fn rebuild(ctx: &Context, only_type: Option<&str>, out: &mut Out<'_>) -> anyhow::Result<()> {
    if let Some(t) = only_type {
        ctx.aggregate(t)?;
    }
    let store = ctx.store().await?;
    let snapshots = ctx.snapshots(&store).await?;
    let began = Instant::now();
    // Drawn from the first aggregate on, when the count is known.
    let mut bar = None;
    let written = jetsource_snapshotter::rebuild(
        &store,
        &snapshots,
        &ctx.registry,
        only_type,
        |done, total| {
            let bar = bar.get_or_insert_with(|| {
                let bar = out.progress(total as u64, "aggregates");
                bar.set_message("rebuilding snapshots");
                bar
            });
            bar.set_position(done as u64);
        },
    )
    .await;
    // Aggregates of types this application does not know are passed over
    // without a tick: the bar ends at its length all the same.
    let aggregates = bar.as_ref().and_then(|b| b.length()).unwrap_or_default();
    match (&bar, &written) {
        (Some(bar), Ok(_)) => out.finish(bar),
        (Some(bar), Err(_)) => out.abandon(bar),
        (None, _) => {}
    }
    let written = written?;
    let secs = began.elapsed().as_secs_f64();
    if out.json {
        return out.doc(&json!({"snapshots": written, "aggregates": aggregates, "seconds": secs}));
    }
    out.line(format_args!(
        "wrote {written} snapshots ({aggregates} aggregates read) in {secs:.1}s"
    ))
}
