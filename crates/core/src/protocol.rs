//! The wire protocol: JSON bodies over NATS request-reply. docs/PROTOCOL.md
//! is the reference for clients in other languages; keep them in step.

use bytes::Bytes;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// First token of command subjects: `cmd.<aggregate_type>.<aggregate_id>`.
pub const COMMAND_SUBJECT_PREFIX: &str = "cmd";

pub fn command_subject(aggregate_type: &str, aggregate_id: &str) -> String {
    format!("{COMMAND_SUBJECT_PREFIX}.{aggregate_type}.{aggregate_id}")
}

/// Longest command or correlation id accepted.
pub const MAX_CLIENT_ID_LEN: usize = 128;

/// A command as sent by a client.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CommandRequest {
    /// Command type, e.g. `Deposit`.
    #[serde(rename = "type")]
    pub command_type: String,
    /// Command fields; `null` or absent means `{}`.
    #[serde(default, skip_serializing_if = "Value::is_null")]
    pub data: Value,
    /// Makes the command idempotent: a resend with the same id (for the
    /// same aggregate) appends nothing and gets the first outcome back.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command_id: Option<String>,
    /// Refuse with `conflict` unless the aggregate is at exactly this version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expected_version: Option<u64>,
    /// Ties the command's events to a wider flow; defaults to the command id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub correlation_id: Option<String>,
}

/// An event as shown in a command reply.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReplyEvent {
    #[serde(rename = "type")]
    pub event_type: String,
    pub data: Value,
}

/// What a multi-aggregate command appended to one of the other aggregates
/// it involved.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OtherOutcome {
    pub aggregate_type: String,
    pub aggregate_id: String,
    /// That aggregate's version after the command.
    pub version: u64,
    pub events: Vec<ReplyEvent>,
}

/// The body of a successful command reply (beside `"ok": true`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CommandOutcome {
    /// Aggregate version after the command (its number of events).
    pub version: u64,
    /// Stream sequence of the command's last event (on any aggregate it
    /// involved), or of the aggregate's last event when the command decided
    /// nothing. Pass it as `min_sequence` to a query to read your own write.
    pub sequence: u64,
    pub events: Vec<ReplyEvent>,
    /// A multi-aggregate command's events on the other aggregates it
    /// involved, in the order they were appended. On the wire only when
    /// there are any.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub others: Vec<OtherOutcome>,
    /// The command (same `command_id`) had been stored already: this is the
    /// outcome it got then, read back from the stream, and nothing was
    /// appended now. On the wire only when true (`"duplicate": true`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub duplicate: bool,
}

/// Error codes on the wire. Clients branch on these, never on messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// Malformed request: bad JSON, unknown aggregate or command type, bad
    /// field, bad id, too large. Resending it unchanged never works.
    Invalid,
    /// A business rule refused the command in the aggregate's current state.
    Rejected,
    /// `expected_version` did not match, or concurrent writers kept winning
    /// until the worker's retries ran out. Reload and decide again.
    Conflict,
    /// The event store could not be reached in time. Safe to retry; with a
    /// `command_id` a retry never appends twice.
    Unavailable,
    /// The requested entity does not exist.
    NotFound,
    /// A wait (e.g. read-your-writes) did not finish in time.
    Timeout,
    /// The server failed in a way the client cannot fix (for example an
    /// event in the store that can no longer be decoded). Logged in detail.
    Internal,
    /// The aggregate's stored history failed its integrity check (hash
    /// chain or signature: an event was changed, removed or moved behind
    /// the server's back). Nothing is served or decided on it until an
    /// operator restores it (`jetsource verify`). Never retry.
    Tampered,
}

impl ErrorCode {
    /// Whether the error is the server side's fault (`unavailable`,
    /// `timeout`, `internal`) rather than a refusal the request itself
    /// earned (`invalid`, `rejected`, `conflict`, `not_found`). `$SRV.STATS`
    /// counts faults in `num_errors`, refusals apart in `num_rejections`.
    pub fn is_fault(self) -> bool {
        match self {
            ErrorCode::Unavailable
            | ErrorCode::Timeout
            | ErrorCode::Internal
            | ErrorCode::Tampered => true,
            ErrorCode::Invalid
            | ErrorCode::Rejected
            | ErrorCode::Conflict
            | ErrorCode::NotFound => false,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::Invalid => "invalid",
            ErrorCode::Rejected => "rejected",
            ErrorCode::Conflict => "conflict",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::NotFound => "not_found",
            ErrorCode::Timeout => "timeout",
            ErrorCode::Internal => "internal",
            ErrorCode::Tampered => "tampered",
        }
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `{"code": ..., "message": ...}` inside a failed reply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{code}: {message}")]
pub struct ErrorBody {
    pub code: ErrorCode,
    pub message: String,
}

impl ErrorBody {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }

    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::Invalid, message)
    }
}

#[derive(Serialize)]
struct OkWire<'a, T> {
    ok: bool,
    #[serde(flatten)]
    body: &'a T,
}

#[derive(Serialize)]
struct ErrWire<'a> {
    ok: bool,
    error: &'a ErrorBody,
}

/// Encodes `{"ok": true, ...body}` or `{"ok": false, "error": {...}}`.
pub fn encode_reply<T: Serialize>(reply: &Result<T, ErrorBody>) -> Bytes {
    let encoded = match reply {
        Ok(body) => serde_json::to_vec(&OkWire { ok: true, body }),
        Err(error) => serde_json::to_vec(&ErrWire { ok: false, error }),
    };
    // Serializing plain data structs cannot fail.
    Bytes::from(encoded.unwrap_or_default())
}

/// Decodes a reply; the outer error means the bytes are not a jetsource reply.
pub fn decode_reply<T: DeserializeOwned>(
    bytes: &[u8],
) -> Result<Result<T, ErrorBody>, serde_json::Error> {
    let mut value: Value = serde_json::from_slice(bytes)?;
    let ok = value.get("ok").and_then(Value::as_bool).unwrap_or(false);
    if ok {
        if let Value::Object(map) = &mut value {
            map.remove("ok");
        }
        Ok(Ok(serde_json::from_value(value)?))
    } else {
        let error = value
            .get_mut("error")
            .map(Value::take)
            .unwrap_or(Value::Null);
        Ok(Err(serde_json::from_value(error)?))
    }
}

/// Splits `cmd.<type>.<id>`, checking both tokens.
pub fn parse_command_subject(subject: &str) -> Result<(&str, &str), ErrorBody> {
    let mut tokens = subject.split('.');
    match (tokens.next(), tokens.next(), tokens.next(), tokens.next()) {
        (Some(COMMAND_SUBJECT_PREFIX), Some(aggregate_type), Some(aggregate_id), None) => {
            if !jetsource_aggregate::is_valid_token(aggregate_id) {
                return Err(ErrorBody::invalid(format!(
                    "aggregate id {aggregate_id:?} is invalid: use 1 to 64 characters of A-Z a-z 0-9 _ -"
                )));
            }
            Ok((aggregate_type, aggregate_id))
        }
        _ => Err(ErrorBody::invalid(format!(
            "subject {subject:?} is not cmd.<aggregate_type>.<aggregate_id>"
        ))),
    }
}

/// Command and correlation ids travel in headers and in `Nats-Msg-Id`, so
/// they are limited to 1..=128 characters of `A-Z a-z 0-9 _ - . : @ / + =`.
pub fn check_client_id(field: &str, id: &str) -> Result<(), ErrorBody> {
    let ok = !id.is_empty()
        && id.len() <= MAX_CLIENT_ID_LEN
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_-.:@/+=".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(ErrorBody::invalid(format!(
            "{field} must be 1 to {MAX_CLIENT_ID_LEN} characters of A-Z a-z 0-9 _ - . : @ / + ="
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_round_trip() {
        let ok: Result<CommandOutcome, ErrorBody> = Ok(CommandOutcome {
            version: 2,
            sequence: 9,
            events: vec![ReplyEvent {
                event_type: "Deposited".into(),
                data: serde_json::json!({"amount": 5}),
            }],
            others: Vec::new(),
            duplicate: false,
        });
        let bytes = encode_reply(&ok);
        let value: Value = serde_json::from_slice(&bytes).expect("json");
        assert_eq!(value["ok"], true);
        assert_eq!(value["events"][0]["type"], "Deposited");
        assert!(value.get("duplicate").is_none(), "omitted when false");
        assert_eq!(decode_reply::<CommandOutcome>(&bytes).expect("decodes"), ok);

        let resent = ok.clone().map(|o| CommandOutcome {
            duplicate: true,
            ..o
        });
        let bytes = encode_reply(&resent);
        let value: Value = serde_json::from_slice(&bytes).expect("json");
        assert_eq!(value["duplicate"], true);
        assert_eq!(
            decode_reply::<CommandOutcome>(&bytes).expect("decodes"),
            resent
        );

        let err: Result<CommandOutcome, ErrorBody> =
            Err(ErrorBody::new(ErrorCode::NotFound, "nope"));
        let bytes = encode_reply(&err);
        assert_eq!(
            std::str::from_utf8(&bytes).expect("utf8"),
            r#"{"ok":false,"error":{"code":"not_found","message":"nope"}}"#
        );
        assert_eq!(
            decode_reply::<CommandOutcome>(&bytes).expect("decodes"),
            err
        );
    }

    #[test]
    fn faults_and_refusals() {
        let faults: Vec<_> = [
            ErrorCode::Invalid,
            ErrorCode::Rejected,
            ErrorCode::Conflict,
            ErrorCode::Unavailable,
            ErrorCode::NotFound,
            ErrorCode::Timeout,
            ErrorCode::Internal,
        ]
        .into_iter()
        .filter(|c| c.is_fault())
        .map(ErrorCode::as_str)
        .collect();
        assert_eq!(faults, ["unavailable", "timeout", "internal"]);
    }

    #[test]
    fn subjects_and_ids() {
        assert_eq!(
            parse_command_subject("cmd.account.a-1"),
            Ok(("account", "a-1"))
        );
        for bad in [
            "cmd.account",
            "cmd.account.a.b",
            "query.account.a",
            "cmd.account.a%b",
        ] {
            let err = parse_command_subject(bad).expect_err(bad);
            assert_eq!(err.code, ErrorCode::Invalid);
        }
        assert!(check_client_id("command_id", "4f1c-9a:x/y").is_ok());
        assert!(check_client_id("command_id", "").is_err());
        assert!(check_client_id("command_id", "a b").is_err());
        assert!(check_client_id("command_id", "a\r\nb").is_err());
        assert!(check_client_id("command_id", &"x".repeat(129)).is_err());
    }
}
