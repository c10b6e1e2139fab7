//! The dead-letter stream: events a projection could not apply, with why.
//!
//! Stream `DEADLETTERS` (configurable), subject `deadletter.<projection>`,
//! body = the original event data, headers = the original headers plus
//! `Jetsource-Projection`, `Jetsource-Dead-Letter-Reason`,
//! `Jetsource-Original-Subject` and `Jetsource-Original-Sequence`.
//! Unlike the event stream it allows deletes: `jetsource dlq replay` removes
//! an entry once it has been applied.

use std::time::Duration;

use async_nats::jetstream::context::{CreateStreamError, CreateStreamErrorKind};
use async_nats::jetstream::stream::RawMessageErrorKind;
use async_nats::jetstream::{self, stream};
use async_nats::HeaderMap;
use bytes::Bytes;
use jetsource_core::store::{codes, StoreError, StoreErrorKind};
use jetsource_core::ErrorClass;

use crate::projection::ProjectionError;

pub const PROJECTION: &str = "Jetsource-Projection";
pub const REASON: &str = "Jetsource-Dead-Letter-Reason";
pub const ORIGINAL_SUBJECT: &str = "Jetsource-Original-Subject";
pub const ORIGINAL_SEQUENCE: &str = "Jetsource-Original-Sequence";

/// What went wrong with the dead letters.
#[derive(Debug, thiserror::Error)]
pub enum DlqError {
    /// The dead-letter stream cannot be created or opened.
    #[error("cannot open dead-letter stream {name}: {source}")]
    Open {
        name: String,
        #[source]
        source: CreateStreamError,
    },
    /// NATS or JetStream failed or refused (storing, reading or deleting a
    /// dead letter, reading the original event).
    #[error(transparent)]
    Nats(#[from] StoreError),
    /// Redis failed (replaying).
    #[error(transparent)]
    Redis(#[from] redis::RedisError),
    /// A dead letter names a projection this process does not run.
    #[error("unknown projection {0:?}")]
    UnknownProjection(String),
    /// The projection has no metadata in Redis (not started yet, or lost).
    #[error("the projection has no read model")]
    NoReadModel,
    /// The event the dead letter stands for is no longer in the stream.
    #[error("the original event is gone")]
    EventGone,
    /// The projection still cannot apply the event.
    #[error("still fails: {0}")]
    StillFails(#[source] ProjectionError),
}

impl DlqError {
    pub fn class(&self) -> ErrorClass {
        match self {
            DlqError::Open { source, .. } => open_class(source),
            DlqError::Nats(e) => e.class(),
            DlqError::Redis(e) => crate::redis_store::class(e),
            DlqError::UnknownProjection(_)
            | DlqError::NoReadModel
            | DlqError::EventGone
            | DlqError::StillFails(_) => ErrorClass::Permanent,
        }
    }
}

/// Class of a failure to create or open the dead-letter stream: copies
/// starting together on a cluster race to create the replicated stream,
/// and the loser's request can time out while the winner's is placed.
fn open_class(e: &CreateStreamError) -> ErrorClass {
    match e.kind() {
        CreateStreamErrorKind::TimedOut | CreateStreamErrorKind::JetStreamUnavailable => {
            ErrorClass::Transient
        }
        CreateStreamErrorKind::JetStream(api) => codes::kind_of(api.error_code().0)
            .map_or(ErrorClass::Permanent, |kind| {
                StoreError::new(kind, "").class()
            }),
        _ => ErrorClass::Permanent,
    }
}

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

/// Creates the dead-letter stream if missing. Waits out transient failures
/// (see [`jetsource_core::until_available`]); only a refusal the server
/// gives for good ends the wait.
pub async fn ensure_stream(
    js: &jetstream::Context,
    name: &str,
    replicas: usize,
) -> Result<stream::Stream, DlqError> {
    let transient = |e: &CreateStreamError| open_class(e) == ErrorClass::Transient;
    jetsource_core::until_available("the dead-letter stream", transient, || {
        js.get_or_create_stream(stream_config(name, replicas))
    })
    .await
    .map_err(|source| DlqError::Open {
        name: name.to_owned(),
        source,
    })
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
pub async fn publish(js: &jetstream::Context, letter: &Letter<'_>) -> Result<(), DlqError> {
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
    let not_stored = |e| StoreError::publish("dead letter not stored", &e);
    js.publish_with_headers(format!("deadletter.{projection}"), headers, payload.clone())
        .await
        .map_err(not_stored)?
        .await
        .map_err(not_stored)?;
    Ok(())
}

/// Reads every dead letter, oldest first.
pub async fn list(stream: &mut stream::Stream) -> Result<Vec<DeadLetter>, DlqError> {
    let what = "cannot read the dead-letter stream";
    let info = stream
        .info()
        .await
        .map_err(|e| StoreError::jetstream(what, codes::code_in(&e), &e))?;
    let (first, last) = (info.state.first_sequence, info.state.last_sequence);
    let mut out = Vec::new();
    if info.state.messages == 0 {
        return Ok(out);
    }
    for sequence in first..=last {
        if let Some(letter) = read(stream, sequence).await? {
            out.push(letter);
        }
    }
    Ok(out)
}

/// The dead letter at `sequence`, `None` if it was deleted (after a replay).
async fn read(stream: &stream::Stream, sequence: u64) -> Result<Option<DeadLetter>, DlqError> {
    let message = match stream.get_raw_message(sequence).await {
        Ok(message) => message,
        Err(e) => {
            let code = match e.kind() {
                RawMessageErrorKind::NoMessageFound => return Ok(None),
                RawMessageErrorKind::JetStream(api) => Some(api.error_code().0),
                _ => codes::code_in(&e),
            };
            let e = StoreError::jetstream(&format!("cannot read dead letter {sequence}"), code, e);
            return match e.kind() {
                StoreErrorKind::NotFound => Ok(None),
                _ => Err(e.into()),
            };
        }
    };
    let h = &message.headers;
    let get = |name: &str| {
        h.get(name)
            .map(|v| v.as_str().to_owned())
            .unwrap_or_default()
    };
    Ok(Some(DeadLetter {
        sequence,
        projection: get(PROJECTION),
        reason: get(REASON),
        original_subject: get(ORIGINAL_SUBJECT),
        original_sequence: get(ORIGINAL_SEQUENCE).parse().unwrap_or(0),
        dead_lettered_at: message.time,
    }))
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
) -> Result<Vec<Replayed>, DlqError> {
    let letters: Vec<DeadLetter> = list(stream)
        .await?
        .into_iter()
        .filter(|l| only.is_none_or(|seq| seq == l.sequence))
        .collect();
    let replayer = Replayer {
        stream,
        store,
        redis,
        projections,
    };
    let mut results = Vec::new();
    for letter in letters {
        let outcome = replayer.replay_one(&letter).await;
        let (result, reason) = match outcome {
            Ok(result) => (result, None),
            Err(e) => ("kept", Some(e.to_string())),
        };
        results.push(Replayed {
            sequence: letter.sequence,
            event_sequence: letter.original_sequence,
            result,
            reason,
        });
    }
    Ok(results)
}

/// What [`replay`] works with.
struct Replayer<'a> {
    stream: &'a stream::Stream,
    store: &'a jetsource_core::store::EventStore,
    redis: &'a crate::redis_store::RedisStore,
    projections: &'a [std::sync::Arc<dyn crate::projection::Projection>],
}

impl Replayer<'_> {
    /// Applies one dead letter to its projection's active generation and
    /// deletes it: `replayed`, or `already replayed` when an earlier replay
    /// applied it but could not delete it.
    async fn replay_one(&self, letter: &DeadLetter) -> Result<&'static str, DlqError> {
        use crate::keys::{partition_of, KeySpace};
        let projection = self
            .projections
            .iter()
            .find(|p| p.name() == letter.projection)
            .ok_or_else(|| DlqError::UnknownProjection(letter.projection.clone()))?;
        let meta = self
            .redis
            .meta(projection.name())
            .await?
            .ok_or(DlqError::NoReadModel)?;
        let event = self
            .store
            .get(letter.original_sequence)
            .await?
            .ok_or(DlqError::EventGone)?;
        let keys = KeySpace::new(
            projection.name(),
            meta.active,
            partition_of(&event.aggregate_type, &event.aggregate_id, meta.partitions),
        );
        let mut ops = Vec::new();
        projection
            .project(&event, &keys, &mut ops)
            .map_err(DlqError::StillFails)?;
        let applied = self
            .redis
            .replay(&keys.replayed(), event.sequence, &ops)
            .await?;
        self.stream
            .delete_message(letter.sequence)
            .await
            .map_err(|e| {
                let code = match e.kind() {
                    stream::DeleteMessageErrorKind::JetStream(api) => Some(api.error_code().0),
                    _ => codes::code_in(&e),
                };
                StoreError::jetstream("cannot delete the dead letter", code, e)
            })?;
        Ok(if applied {
            "replayed"
        } else {
            "already replayed"
        })
    }
}
