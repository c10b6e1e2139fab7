//! The event store as it is: an aggregate's history (its events in the
//! current schema, through the aggregate's upcasters), its state at any
//! point, the stream's settings.

use async_nats::jetstream::stream::Info;
use jetsource_core::loader::{event_json, state_at, SnapshotUse, Until};
use serde_json::{json, Value};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use crate::args::{AggregateArgs, StateArgs};
use crate::context::Context;
use crate::exit::Failure;
use crate::output::Out;
use crate::table::Table;
use crate::{check_token, rfc3339};

pub async fn history(ctx: &Context, args: AggregateArgs, out: &mut Out<'_>) -> anyhow::Result<()> {
    let AggregateArgs {
        aggregate_type: t,
        aggregate_id: id,
    } = &args;
    check_token("aggregate type", t)?;
    check_token("aggregate id", id)?;
    // An unregistered type still has a history: shown as stored.
    let aggregate = ctx.registry.get(t);
    let store = ctx.store().await?;
    let events = store.read_confirmed(t, id, 1).await?;
    if events.is_empty() {
        return Err(Failure::not_found(format!("{t} {id} has no events")).into());
    }
    let rows: Vec<Value> = events
        .iter()
        .map(|e| event_json(aggregate.map(|a| a.as_ref()), e))
        .collect();
    if out.json {
        return out.doc(&rows);
    }
    let mut table = Table::new([
        "SEQ", "TIME", "VERSION", "TYPE", "SCHEMA", "DATA", "COMMAND",
    ]);
    for (e, row) in events.iter().zip(&rows) {
        table.row([
            e.sequence.to_string(),
            rfc3339(e.timestamp),
            e.aggregate_version.to_string(),
            e.event_type.clone(),
            schema_text(row),
            row["data"].to_string(),
            e.command_id.clone().unwrap_or_default(),
        ]);
    }
    out.table(&table)
}

/// `1`, `1->2` when upcast, `1 (not upcast: why)`.
fn schema_text(row: &Value) -> String {
    let (stored, now) = (&row["schema_version"], &row["data_schema_version"]);
    if let Some(why) = row["upcast_error"].as_str() {
        return format!("{stored} (not upcast: {why})");
    }
    if now.is_number() && now != stored {
        format!("{stored}->{now}")
    } else {
        stored.to_string()
    }
}

pub async fn state(ctx: &Context, args: StateArgs, out: &mut Out<'_>) -> anyhow::Result<()> {
    let (t, id) = (&args.aggregate.aggregate_type, &args.aggregate.aggregate_id);
    let aggregate = ctx.aggregate(t)?.as_ref();
    check_token("aggregate id", id)?;
    let until = until(&args)?;
    let store = ctx.store().await?;
    let snapshots = ctx.snapshots(&store).await?;
    let (loaded, used) = state_at(&store, &snapshots, aggregate, id, until).await?;
    if loaded.version == 0 {
        let point = match until {
            Until::End => String::new(),
            Until::Sequence(s) => format!(" at or before sequence {s}"),
            Until::Time(t) => format!(" at or before {}", rfc3339(t)),
        };
        return Err(Failure::not_found(format!("{t} {id} has no events{point}")).into());
    }
    let state = aggregate.state_to_json(&loaded.state);
    let timestamp = loaded.last_timestamp.map(rfc3339);
    if out.json {
        return out.doc(&json!({
            "snapshot": snapshot_json(&used),
            "aggregate_type": t,
            "aggregate_id": id,
            "version": loaded.version,
            "sequence": loaded.last_sequence,
            "timestamp": timestamp,
            "state": state,
        }));
    }
    out.line(format_args!(
        "{t} {id} at version {} (sequence {}, {})",
        loaded.version,
        loaded.last_sequence,
        timestamp.unwrap_or_default()
    ))?;
    out.line(serde_json::to_string_pretty(&state)?)
}

fn until(args: &StateArgs) -> Result<Until, Failure> {
    Ok(match (args.at_seq, &args.at_time) {
        (Some(seq), _) => Until::Sequence(seq),
        (None, Some(t)) => Until::Time(OffsetDateTime::parse(t, &Rfc3339).map_err(|_| {
            Failure::invalid(format!(
                "--at-time {t:?} is not an RFC 3339 time like 2026-01-31T12:00:00Z"
            ))
        })?),
        (None, None) => Until::End,
    })
}

/// `null` (no snapshot), `{"version": v}` (started from it), or
/// `{"ignored": why}` (full replay).
fn snapshot_json(used: &SnapshotUse) -> Value {
    match used {
        SnapshotUse::Absent => Value::Null,
        SnapshotUse::Used { version } => json!({"version": version}),
        SnapshotUse::TooNew => json!({"ignored": "newer than the requested point"}),
        SnapshotUse::Ignored(why) => json!({"ignored": why}),
    }
}

pub async fn stream(ctx: &Context, out: &mut Out<'_>) -> anyhow::Result<()> {
    let info = ctx.store().await?.info().await?;
    if out.json {
        return out.doc(&stream_json(&info));
    }
    out.table(&stream_table(&info))
}

fn leader(info: &Info) -> String {
    info.cluster
        .as_ref()
        .and_then(|cl| cl.leader.clone())
        .unwrap_or_else(|| "-".into())
}

fn stream_json(info: &Info) -> Value {
    let (c, s) = (&info.config, &info.state);
    json!({
        "name": c.name,
        "subjects": c.subjects,
        "replicas": c.num_replicas,
        "leader": leader(info),
        "messages": s.messages,
        "bytes": s.bytes,
        "first_sequence": s.first_sequence,
        "last_sequence": s.last_sequence,
        "first_time": rfc3339(s.first_timestamp),
        "last_time": rfc3339(s.last_timestamp),
        "subjects_count": s.subjects_count,
        "deny_delete": c.deny_delete,
        "deny_purge": c.deny_purge,
        "allow_atomic": c.allow_atomic_publish,
        "allow_direct": c.allow_direct,
        "duplicate_window_secs": c.duplicate_window.as_secs(),
    })
}

fn stream_table(info: &Info) -> Table {
    let (c, s) = (&info.config, &info.state);
    let mut table = Table::new(["SETTING", "VALUE"]);
    for (k, v) in [
        ("name", c.name.clone()),
        ("subjects", c.subjects.join(", ")),
        ("storage", format!("{:?}", c.storage)),
        ("replicas", c.num_replicas.to_string()),
        ("leader", leader(info)),
        ("events", s.messages.to_string()),
        ("bytes", s.bytes.to_string()),
        ("aggregates", s.subjects_count.to_string()),
        ("first sequence", s.first_sequence.to_string()),
        ("last sequence", s.last_sequence.to_string()),
        ("last event at", rfc3339(s.last_timestamp)),
        (
            "deny delete / purge",
            format!("{} / {}", c.deny_delete, c.deny_purge),
        ),
        ("atomic batches", c.allow_atomic_publish.to_string()),
        ("duplicate window", format!("{:?}", c.duplicate_window)),
    ] {
        table.row([k.to_owned(), v]);
    }
    table
}
