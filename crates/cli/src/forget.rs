//! `forget <subject>`: crypto-shredding of one data subject's personal
//! data (docs/ARCHITECTURE.md, "Crypto-shredding").

use std::collections::BTreeSet;
use std::ops::ControlFlow;

use jetsource_core::aggregate::NewEvent;
use jetsource_core::privacy::{self, PrivacyError};
use jetsource_core::store::{Append, StoredMessage};
use serde_json::json;

use crate::context::Context;
use crate::exit::Failure;
use crate::output::Out;

/// The aggregate type of the record `forget` leaves in the event stream:
/// `events.jetsource-forgotten.<subject>`.
pub const FORGOTTEN_TYPE: &str = "jetsource-forgotten";

pub async fn forget(ctx: &Context, subject: &str, out: &mut Out<'_>) -> anyhow::Result<()> {
    privacy::check_subject(subject).map_err(|e| Failure::invalid(e.to_string()))?;
    let store = ctx.store().await?;
    let client = store.jetstream().client();
    // 1. The key, for good: from now on nothing opens the subject's fields
    //    and no command stores new ones.
    store
        .privacy()
        .forget(&client, subject)
        .await
        .map_err(|e| match e {
            PrivacyError::Store(e) => anyhow::Error::from(e),
            other => Failure::invalid(other.to_string()).into(),
        })?;
    // 2. That it was done, in the audit trail itself.
    let recorded = record(&store, subject).await?;
    // 3. Where the subject's data is: the aggregates whose events carry it.
    let aggregates = holders(&store, subject, out).await?;
    // 4. Snapshots built from it, which hold it in the clear.
    let snapshots = ctx.snapshots(&store).await?;
    for (t, id) in &aggregates {
        snapshots.remove(t, id).await?;
    }
    // 5. Read models built from it: rebuilt (the projectors read the
    //    fields as erased now).
    let types: BTreeSet<&str> = aggregates.iter().map(|(t, _)| t.as_str()).collect();
    let mut rebuilt = Vec::new();
    let affected = ctx
        .projections
        .iter()
        .filter(|p| p.aggregate_types().iter().any(|t| types.contains(t)));
    for projection in affected {
        if crate::projection::rebuild_quietly(ctx, projection.name(), out).await? {
            rebuilt.push(projection.name());
        }
    }
    let aggregates: Vec<String> = aggregates
        .iter()
        .map(|(t, id)| format!("{t}.{id}"))
        .collect();
    if out.json {
        return out.doc(&json!({
            "subject": subject,
            "recorded_at_sequence": recorded,
            "aggregates": aggregates,
            "snapshots_removed": aggregates.len(),
            "projections_rebuilt": rebuilt,
        }));
    }
    out.line(format_args!(
        "forgot {subject}: key erased, recorded at sequence {recorded}; its personal fields now read as erased in {} aggregate(s) ({}); their snapshots removed; projections rebuilt: {}",
        aggregates.len(),
        aggregates.join(", "),
        if rebuilt.is_empty() { "none".to_owned() } else { rebuilt.join(", ") }
    ))
}

/// Appends `DataSubjectForgotten` to `jetsource-forgotten.<subject>`;
/// returns its sequence.
async fn record(store: &jetsource_core::store::EventStore, subject: &str) -> anyhow::Result<u64> {
    let subject_line = jetsource_core::envelope::event_subject(FORGOTTEN_TYPE, subject);
    let last = store.leader_last_sequence(&subject_line).await?;
    let version = store
        .last_version(FORGOTTEN_TYPE, subject)
        .await?
        .map_or(0, |(v, _)| v);
    let at = time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default();
    let event = NewEvent {
        event_type: "DataSubjectForgotten".into(),
        data: json!({"subject": subject, "at": at})
            .to_string()
            .into_bytes(),
        sealed: None,
    };
    let appended = store
        .append(&Append {
            aggregate_type: FORGOTTEN_TYPE,
            aggregate_id: subject,
            expected_last_sequence: last,
            version,
            events: std::slice::from_ref(&event),
            schema_version: 1,
            command_id: None,
            correlation_id: subject,
            causation_id: "jetsource forget",
            command_aggregate: None,
            previous_hash: store.hash_at(last).await?,
        })
        .await?;
    Ok(appended.last_sequence)
}

/// Every aggregate with an event holding `subject`'s personal data, from a
/// scan of the whole stream (with progress).
async fn holders(
    store: &jetsource_core::store::EventStore,
    subject: &str,
    out: &mut Out<'_>,
) -> anyhow::Result<BTreeSet<(String, String)>> {
    let last = store.last_sequence().await?;
    let bar = out.progress(last, "events");
    bar.set_message(format!("finding {subject}'s data"));
    let mut found = BTreeSet::new();
    let mut seen = 0;
    let read = store
        .read_all(1, |chunk| {
            for message in &chunk {
                if message.sequence > last {
                    return ControlFlow::Break(());
                }
                bar.set_position(message.sequence);
                seen = message.sequence;
                found.extend(holder(message, subject));
            }
            ControlFlow::Continue(())
        })
        .await;
    out.finish(&bar);
    read?;
    if seen < last {
        // The replica that answered lags: the leader has the rest, and a
        // holder missed here would keep its data in a read model.
        let filter = format!("{}.>", jetsource_core::envelope::EVENT_SUBJECT_PREFIX);
        for message in store.read_through(&filter, seen + 1, last).await? {
            found.extend(holder(&message, subject));
        }
    }
    Ok(found)
}

/// The aggregate of `message` if it holds `subject`'s personal data.
fn holder(message: &StoredMessage, subject: &str) -> Option<(String, String)> {
    let holds = message
        .headers
        .as_ref()
        .and_then(|h| h.get(privacy::DATA_SUBJECT))
        .is_some_and(|v| v.as_str() == subject);
    let mut tokens = message.subject.splitn(3, '.').skip(1);
    match (holds, tokens.next(), tokens.next()) {
        (true, Some(t), Some(id)) => Some((t.to_owned(), id.to_owned())),
        _ => None,
    }
}
