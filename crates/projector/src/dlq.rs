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
    js.get_or_create_stream(stream_config(name, replicas))
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
    let mut headers = original_headers.cloned().unwrap_or_default();
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
