//! The dead-letter stream: events a projection could not apply, with why.
//!
//! Stream `DEADLETTERS` (configurable), subject `deadletter.<projection>`,
//! body = the original event data, headers = the original headers plus
//! `Jetsource-Projection`, `Jetsource-Dead-Letter-Reason`,
//! `Jetsource-Original-Subject` and `Jetsource-Original-Sequence`.
//! Unlike the event stream it allows deletes: `jetsource dlq replay` removes
//! an entry once it has been applied.

use std::time::Duration;

use async_nats::jetstream::{self, stream};
use async_nats::HeaderMap;
use bytes::Bytes;

pub const PROJECTION: &str = "Jetsource-Projection";
pub const REASON: &str = "Jetsource-Dead-Letter-Reason";
pub const ORIGINAL_SUBJECT: &str = "Jetsource-Original-Subject";
pub const ORIGINAL_SEQUENCE: &str = "Jetsource-Original-Sequence";

/// One dead letter as listed by `jetsource dlq list`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct DeadLetter {
    /// Sequence in the dead-letter stream.
    pub sequence: u64,
    pub projection: String,
    pub reason: String,
    pub original_subject: String,
    pub original_sequence: u64,
    #[serde(with = "time::serde::rfc3339")]
    pub dead_lettered_at: time::OffsetDateTime,
}

pub fn stream_config(name: &str, replicas: usize) -> stream::Config {
    stream::Config {
        name: name.to_owned(),
        description: Some("jetsource dead letters: events a projection could not apply".into()),
        subjects: vec!["deadletter.>".into()],
        storage: stream::StorageType::File,
        num_replicas: replicas,
        duplicate_window: Duration::from_secs(600),
        allow_direct: true,
        ..Default::default()
    }
}

/// Creates the dead-letter stream if missing.
pub async fn ensure_stream(
    js: &jetstream::Context,
    name: &str,
    replicas: usize,
) -> Result<stream::Stream, String> {
    use async_nats::jetstream::context::CreateStreamErrorKind;
    // Copies starting together on a cluster race to create the replicated
    // stream; the loser's request can time out while the winner's is
    // placed. Only a refusal the server gives for good ends the wait.
    let transient = |e: &async_nats::jetstream::context::CreateStreamError| match e.kind() {
        CreateStreamErrorKind::TimedOut | CreateStreamErrorKind::JetStreamUnavailable => true,
        CreateStreamErrorKind::JetStream(api) => matches!(
            jetsource_core::store::codes::kind_of(api.error_code().0),
            Some(jetsource_core::store::StoreErrorKind::Unavailable)
        ),
        _ => false,
    };
    jetsource_core::until_available("the dead-letter stream", transient, || {
        js.get_or_create_stream(stream_config(name, replicas))
    })
    .await
    .map_err(|e| format!("cannot open dead-letter stream {name}: {e}"))
}

/// An event a projection gives up on.
#[derive(Debug)]
pub struct Letter<'a> {
    pub projection: &'a str,
    pub generation: u64,
    pub original_subject: &'a str,
    pub original_sequence: u64,
    pub original_headers: Option<&'a HeaderMap>,
    pub payload: Bytes,
    pub reason: &'a str,
}

/// Stores a dead letter durably (the publish is acknowledged) before the
/// projection moves past the event. `Nats-Msg-Id` makes a redelivered
/// poison event land once.
pub async fn publish(js: &jetstream::Context, letter: &Letter<'_>) -> Result<(), String> {
    let Letter {
        projection,
        generation,
        original_subject,
        original_sequence,
        original_headers,
        ref payload,
        reason,
    } = *letter;
    // Only the envelope's own headers travel along: the original's NATS
    // headers (expected sequence, message id, batch) would make the server
    // judge the dead letter by the event stream's rules.
    let mut headers = HeaderMap::new();
    for (name, values) in original_headers.into_iter().flat_map(|h| h.iter()) {
        let name: &str = name.as_ref();
        if name.starts_with("Jetsource-") {
            for value in values {
                headers.append(name, value.as_str());
            }
        }
    }
    headers.insert(PROJECTION, projection);
    headers.insert(REASON, reason.replace(['\r', '\n'], " ").as_str());
    headers.insert(ORIGINAL_SUBJECT, original_subject);
    headers.insert(ORIGINAL_SEQUENCE, original_sequence.to_string().as_str());
    headers.insert(
        async_nats::header::NATS_MESSAGE_ID,
        format!("{projection}.g{generation}.{original_sequence}").as_str(),
    );
    js.publish_with_headers(format!("deadletter.{projection}"), headers, payload.clone())
        .await
        .map_err(|e| e.to_string())?
        .await
        .map_err(|e| format!("dead letter not stored: {e}"))?;
    Ok(())
}

/// Reads every dead letter, oldest first.
pub async fn list(stream: &mut stream::Stream) -> Result<Vec<DeadLetter>, String> {
    let info = stream.info().await.map_err(|e| e.to_string())?;
    let (first, last) = (info.state.first_sequence, info.state.last_sequence);
    let mut out = Vec::new();
    if info.state.messages == 0 {
        return Ok(out);
    }
    for sequence in first..=last {
        let message = match stream.get_raw_message(sequence).await {
            Ok(m) => m,
            // Deleted after a replay.
            Err(_) => continue,
        };
        let h = &message.headers;
        let get = |name: &str| {
            h.get(name)
                .map(|v| v.as_str().to_owned())
                .unwrap_or_default()
        };
        out.push(DeadLetter {
            sequence,
            projection: get(PROJECTION),
            reason: get(REASON),
            original_subject: get(ORIGINAL_SUBJECT),
            original_sequence: get(ORIGINAL_SEQUENCE).parse().unwrap_or(0),
            dead_lettered_at: message.time,
        });
    }
    Ok(out)
}

/// What `replay` did with one dead letter.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Replayed {
    pub sequence: u64,
    pub event_sequence: u64,
    /// `replayed`, `already replayed` or `kept`.
    pub result: &'static str,
    /// Why it was kept.
    pub reason: Option<String>,
}

/// Applies dead letters (all, or the one at `only`) again with the current
/// projection code, to the active generation. A dead letter that now applies
/// leaves the stream; one that still fails is kept with the new reason.
/// Replaying is idempotent: each event is applied at most once per
/// partition, even if the delete after it fails.
///
/// A replayed event is applied after events that came later in the stream:
/// fine for commutative read models (sums, counters), and the reason the
/// poison event was skipped in the first place.
pub async fn replay(
    stream: &mut stream::Stream,
    store: &jetsource_core::store::EventStore,
    redis: &crate::redis_store::RedisStore,
    projections: &[std::sync::Arc<dyn crate::projection::Projection>],
    only: Option<u64>,
) -> Result<Vec<Replayed>, String> {
    use crate::keys::{partition_of, KeySpace};
    let letters: Vec<DeadLetter> = list(stream)
        .await?
        .into_iter()
        .filter(|l| only.is_none_or(|seq| seq == l.sequence))
        .collect();
    let mut results = Vec::new();
    for letter in letters {
        let outcome: Result<&'static str, String> = async {
            let projection = projections
                .iter()
                .find(|p| p.name() == letter.projection)
                .ok_or_else(|| format!("unknown projection {:?}", letter.projection))?;
            let meta = redis
                .meta(projection.name())
                .await
                .map_err(|e| e.to_string())?
                .ok_or("the projection has no read model")?;
            let event = store
                .get(letter.original_sequence)
                .await
                .map_err(|e| format!("still fails: {e}"))?
                .ok_or("the original event is gone")?;
            let keys = KeySpace::new(
                projection.name(),
                meta.active,
                partition_of(&event.aggregate_type, &event.aggregate_id, meta.partitions),
            );
            let mut ops = Vec::new();
            projection
                .project(&event, &keys, &mut ops)
                .map_err(|e| format!("still fails: {e}"))?;
            let applied = redis
                .replay(&keys.replayed(), event.sequence, &ops)
                .await
                .map_err(|e| e.to_string())?;
            stream
                .delete_message(letter.sequence)
                .await
                .map_err(|e| e.to_string())?;
            Ok(if applied {
                "replayed"
            } else {
                "already replayed"
            })
        }
        .await;
        results.push(match outcome {
            Ok(result) => Replayed {
                sequence: letter.sequence,
                event_sequence: letter.original_sequence,
                result,
                reason: None,
            },
            Err(reason) => Replayed {
                sequence: letter.sequence,
                event_sequence: letter.original_sequence,
                result: "kept",
                reason: Some(reason),
            },
        });
    }
    Ok(results)
}
