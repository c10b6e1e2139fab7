//! The event envelope: what a stored event carries and where.
//!
//! The message **body is the event's data**, plain JSON, exactly what the
//! domain serialized. Everything else is metadata in **headers**, so any NATS
//! client can route, filter and audit events without parsing bodies, and the
//! body stays the domain's own:
//!
//! | field | where |
//! |---|---|
//! | aggregate type and id | subject `events.<type>.<id>` |
//! | stream sequence, timestamp | assigned by JetStream (message metadata) |
//! | event id (UUIDv7) | `Jetsource-Event-Id` |
//! | event type | `Jetsource-Event-Type` |
//! | event schema version | `Jetsource-Schema-Version` |
//! | aggregate version (1 for the first event) | `Jetsource-Aggregate-Version` |
//! | command id (if the client sent one) | `Jetsource-Command-Id` |
//! | correlation id | `Jetsource-Correlation-Id` |
//! | causation id | `Jetsource-Causation-Id` |
//! | the aggregate a multi-aggregate command was sent to, on the events it appended to the others | `Jetsource-Command-Aggregate` (`<type>.<id>`) |
//! | link in the aggregate's hash chain (SHA-256, hex) | `Jetsource-Hash` |
//! | Ed25519 signature of that hash (base64), and the key's id | `Jetsource-Signature`, `Jetsource-Signing-Key` |
//! | whose personal data the event holds, and which fields are sealed | `Jetsource-Data-Subject`, `Jetsource-Sealed` |
//!
//! The hash chain and signatures are described in [`crate::integrity`].

use async_nats::HeaderMap;
use bytes::Bytes;
use serde::Serialize;
use time::OffsetDateTime;

pub const EVENT_ID: &str = "Jetsource-Event-Id";
pub const EVENT_TYPE: &str = "Jetsource-Event-Type";
pub const SCHEMA_VERSION: &str = "Jetsource-Schema-Version";
pub const AGGREGATE_VERSION: &str = "Jetsource-Aggregate-Version";
pub const COMMAND_ID: &str = "Jetsource-Command-Id";
pub const CORRELATION_ID: &str = "Jetsource-Correlation-Id";
pub const CAUSATION_ID: &str = "Jetsource-Causation-Id";
/// On the events a multi-aggregate command appended to the aggregates it
/// involved: `<type>.<id>` of the aggregate it was sent to, which owns its
/// command id (command ids are unique per aggregate, so the others must not
/// count it as one of theirs).
pub const COMMAND_AGGREGATE: &str = "Jetsource-Command-Aggregate";

/// First token of every event subject.
pub const EVENT_SUBJECT_PREFIX: &str = "events";

/// `events.<type>.<id>`: one subject per aggregate, so JetStream's per-subject
/// sequence is the aggregate's optimistic-concurrency token.
pub fn event_subject(aggregate_type: &str, aggregate_id: &str) -> String {
    format!("{EVENT_SUBJECT_PREFIX}.{aggregate_type}.{aggregate_id}")
}

/// An event as read back from the store.
#[derive(Debug, Clone, Serialize)]
pub struct RecordedEvent {
    pub sequence: u64,
    #[serde(with = "time::serde::rfc3339")]
    pub timestamp: OffsetDateTime,
    pub aggregate_type: String,
    pub aggregate_id: String,
    pub aggregate_version: u64,
    pub event_id: String,
    pub event_type: String,
    pub schema_version: u32,
    pub command_id: Option<String>,
    pub correlation_id: Option<String>,
    pub causation_id: Option<String>,
    /// Set on the events a multi-aggregate command appended to an
    /// aggregate other than the one it was sent to: that one, as
    /// `<type>.<id>` (header `Jetsource-Command-Aggregate`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub command_aggregate: Option<String>,
    /// W3C trace context of the command that appended it (header
    /// `traceparent`), when tracing was on (docs/TRACING.md).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub traceparent: Option<String>,
    /// Link in the aggregate's hash chain (header `Jetsource-Hash`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hash: Option<String>,
    /// Signature of the hash and the signing key's id.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub signature: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub signing_key: Option<String>,
    /// Whose personal data it holds (header `Jetsource-Data-Subject`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data_subject: Option<String>,
    /// Its sealed fields, JSON pointers separated by commas (header
    /// `Jetsource-Sealed`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sealed: Option<String>,
    /// Sealed fields whose subject was forgotten: `null` in `data`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub erased: Vec<String>,
    /// The data as stored (sealed fields encrypted), once `data` holds
    /// them opened; what the hash chain covers.
    #[serde(skip)]
    pub stored_data: Option<Bytes>,
    /// The event's data, personal fields opened (see [`crate::privacy`]).
    #[serde(serialize_with = "raw_json")]
    pub data: Bytes,
}

/// An event of no aggregate at sequence 0, epoch time, every optional
/// header absent: for events made by hand (fixtures, benchmarks), which
/// set what they need and take the rest from here.
impl Default for RecordedEvent {
    fn default() -> Self {
        Self {
            sequence: 0,
            timestamp: OffsetDateTime::UNIX_EPOCH,
            aggregate_type: String::new(),
            aggregate_id: String::new(),
            aggregate_version: 0,
            event_id: String::new(),
            event_type: String::new(),
            schema_version: 1,
            command_id: None,
            correlation_id: None,
            causation_id: None,
            command_aggregate: None,
            traceparent: None,
            hash: None,
            signature: None,
            signing_key: None,
            data_subject: None,
            sealed: None,
            erased: Vec::new(),
            stored_data: None,
            data: Bytes::new(),
        }
    }
}

fn raw_json<S: serde::Serializer>(data: &Bytes, s: S) -> Result<S::Ok, S::Error> {
    match serde_json::from_slice::<&serde_json::value::RawValue>(data) {
        Ok(raw) => raw.serialize(s),
        Err(_) => String::from_utf8_lossy(data).serialize(s),
    }
}

/// Why a stored message is not a jetsource event.
#[derive(Debug, Clone, thiserror::Error)]
#[error("message {sequence} on {subject} is not a jetsource event: {reason}")]
pub struct EnvelopeError {
    pub sequence: u64,
    pub subject: String,
    pub reason: String,
}

impl RecordedEvent {
    /// The id of the command that appended this event, when it was sent to
    /// this event's own aggregate (the ids an aggregate deduplicates).
    pub fn own_command_id(&self) -> Option<&str> {
        match self.command_aggregate {
            None => self.command_id.as_deref(),
            Some(_) => None,
        }
    }

    /// The part the domain reads: type, schema version, data as stored.
    pub fn stored(&self) -> jetsource_aggregate::StoredEvent<'_> {
        jetsource_aggregate::StoredEvent {
            event_type: &self.event_type,
            schema_version: self.schema_version,
            data: &self.data,
        }
    }

    /// Builds an event from a stored message's subject, sequence, time,
    /// headers and body.
    pub fn from_parts(
        subject: &str,
        sequence: u64,
        timestamp: OffsetDateTime,
        headers: Option<&HeaderMap>,
        data: Bytes,
    ) -> Result<Self, EnvelopeError> {
        let fail = |reason: String| EnvelopeError {
            sequence,
            subject: subject.to_owned(),
            reason,
        };
        let mut tokens = subject.splitn(3, '.');
        let (Some(EVENT_SUBJECT_PREFIX), Some(aggregate_type), Some(aggregate_id)) =
            (tokens.next(), tokens.next(), tokens.next())
        else {
            return Err(fail("subject is not events.<type>.<id>".into()));
        };
        let headers = headers.ok_or_else(|| fail("no headers".into()))?;
        let get = |name: &str| headers.get(name).map(|v| v.as_str().to_owned());
        let required = |name: &str| get(name).ok_or_else(|| fail(format!("missing header {name}")));
        let number = |name: &str| -> Result<u64, EnvelopeError> {
            required(name)?
                .parse()
                .map_err(|_| fail(format!("header {name} is not a number")))
        };
        Ok(Self {
            sequence,
            timestamp,
            aggregate_type: aggregate_type.to_owned(),
            aggregate_id: aggregate_id.to_owned(),
            aggregate_version: number(AGGREGATE_VERSION)?,
            event_id: required(EVENT_ID)?,
            event_type: required(EVENT_TYPE)?,
            schema_version: u32::try_from(number(SCHEMA_VERSION)?)
                .map_err(|_| fail("schema version out of range".into()))?,
            command_id: get(COMMAND_ID),
            correlation_id: get(CORRELATION_ID),
            causation_id: get(CAUSATION_ID),
            command_aggregate: get(COMMAND_AGGREGATE),
            traceparent: get(crate::telemetry::TRACEPARENT),
            hash: get(crate::integrity::HASH),
            signature: get(crate::integrity::SIGNATURE),
            signing_key: get(crate::integrity::SIGNING_KEY),
            data_subject: get(crate::privacy::DATA_SUBJECT),
            sealed: get(crate::privacy::SEALED),
            erased: Vec::new(),
            stored_data: None,
            data,
        })
    }
}
