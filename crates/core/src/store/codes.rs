//! JetStream API error codes, mapped to what jetsource does about them.
//!
//! The server reports a refusal as `{"code": <http-like>, "err_code":
//! <number>, "description": ...}`. Descriptions change between releases and
//! the same condition can come with more than one number (a wrong expected
//! sequence is 10071 on a single node and 10164 on a replicated stream), so
//! jetsource decides by number, here and nowhere else.

use super::StoreErrorKind;

/// Wrong last sequence, with the sequence in the description (single node).
pub const WRONG_LAST_SEQUENCE: u64 = 10071;
/// Wrong last sequence, constant description (replicated streams; the same
/// condition as [`WRONG_LAST_SEQUENCE`]).
pub const WRONG_LAST_SEQUENCE_CONSTANT: u64 = 10164;
/// `Nats-Expected-Last-Msg-Id` did not hold. jetsource never sends it.
pub const WRONG_LAST_MSG_ID: u64 = 10070;
/// No message matches a get (sequence, last or next by subject).
pub const NO_MESSAGE_FOUND: u64 = 10037;
/// The stream's or the cluster's Raft group has no leader right now.
pub const CLUSTER_NOT_AVAILABLE: u64 = 10008;
/// The request reached a server that is not the leader.
pub const CLUSTER_NOT_LEADER: u64 = 10009;
/// Not enough storage or memory on the servers.
pub const INSUFFICIENT_RESOURCES: u64 = 10023;
/// The message is larger than the stream's or the server's limit.
pub const MESSAGE_TOO_LARGE: u64 = 10054;
/// A stream with this name exists (with other settings).
pub const STREAM_NAME_EXISTS: u64 = 10058;
/// No such stream.
pub const STREAM_NOT_FOUND: u64 = 10059;
/// The stream is offline on this server (e.g. a store it cannot read).
pub const STREAM_OFFLINE: u64 = 10118;
/// The stream is offline, with a reason.
pub const STREAM_OFFLINE_REASON: u64 = 10194;
/// The stream is sealed: it takes no more messages.
pub const STREAM_SEALED: u64 = 10109;
/// Atomic batch refused: incomplete (a message went missing, or it idled out).
pub const BATCH_INCOMPLETE: u64 = 10176;
/// Atomic batch refused: more messages than the server allows.
pub const BATCH_TOO_LARGE: u64 = 10199;
/// Atomic batch refused: its first message carries an already stored
/// `Nats-Msg-Id` (a resent multi-event command).
pub const BATCH_DUPLICATE_MSG_ID: u64 = 10201;
/// A message with the same `Nats-Msg-Id` is being stored right now (by
/// another writer sending the same thing at the same moment): retry, and
/// the duplicate check answers.
pub const DUPLICATE_MSG_ID_IN_PROCESS: u64 = 10158;
/// Atomic batch refused: the stream has too many batches open.
pub const BATCH_TOO_MANY_INFLIGHT: u64 = 10210;
/// Atomic publish is disabled on the stream.
pub const BATCH_DISABLED: u64 = 10174;
/// A header a batch may not carry (`Nats-Expected-Last-Msg-Id`).
pub const BATCH_UNSUPPORTED_HEADER: u64 = 10177;

/// The JetStream API error code in `error` or its chain of causes, if the
/// server refused with one. async-nats keeps the server's answer (`{"code",
/// "err_code", "description"}`) as the source of its request, publish and
/// key-value errors, at different depths.
pub fn code_in(error: &(dyn std::error::Error + 'static)) -> Option<u64> {
    let mut next = Some(error);
    while let Some(e) = next {
        if let Some(api) = e.downcast_ref::<async_nats::jetstream::Error>() {
            return Some(api.error_code().0);
        }
        next = e.source();
    }
    None
}

/// What a refusal with `code` means for jetsource. `None` for codes with no
/// special meaning: the caller reports them as refused by the server.
pub fn kind_of(code: u64) -> Option<StoreErrorKind> {
    Some(match code {
        WRONG_LAST_SEQUENCE | WRONG_LAST_SEQUENCE_CONSTANT => StoreErrorKind::WrongLastSequence,
        // Nothing was stored and trying again later can work: an election,
        // a batch that was cut short, the open-batch limit, a full disk
        // being cleaned up.
        CLUSTER_NOT_AVAILABLE
        | DUPLICATE_MSG_ID_IN_PROCESS
        | CLUSTER_NOT_LEADER
        | INSUFFICIENT_RESOURCES
        | STREAM_NOT_FOUND
        | STREAM_OFFLINE
        | STREAM_OFFLINE_REASON
        | BATCH_INCOMPLETE
        | BATCH_TOO_MANY_INFLIGHT => StoreErrorKind::Unavailable,
        MESSAGE_TOO_LARGE | BATCH_TOO_LARGE => StoreErrorKind::TooLarge,
        BATCH_DUPLICATE_MSG_ID => StoreErrorKind::DuplicateCommand,
        NO_MESSAGE_FOUND => StoreErrorKind::NotFound,
        STREAM_SEALED | BATCH_DISABLED => StoreErrorKind::IncompatibleStream,
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ErrorClass;

    fn class(code: u64) -> Option<ErrorClass> {
        kind_of(code).map(|kind| super::super::StoreError::new(kind, "").class())
    }

    #[test]
    fn both_wrong_last_sequence_codes_are_conflicts() {
        assert_eq!(class(WRONG_LAST_SEQUENCE), Some(ErrorClass::Conflict));
        assert_eq!(
            class(WRONG_LAST_SEQUENCE_CONSTANT),
            Some(ErrorClass::Conflict)
        );
    }

    #[test]
    fn retryable_refusals_are_transient() {
        for code in [
            CLUSTER_NOT_AVAILABLE,
            CLUSTER_NOT_LEADER,
            STREAM_NOT_FOUND,
            BATCH_INCOMPLETE,
            BATCH_TOO_MANY_INFLIGHT,
        ] {
            assert_eq!(class(code), Some(ErrorClass::Transient), "{code}");
        }
    }

    #[test]
    fn batch_refusals_that_cannot_succeed_are_permanent() {
        assert_eq!(kind_of(BATCH_TOO_LARGE), Some(StoreErrorKind::TooLarge));
        assert_eq!(
            kind_of(BATCH_DUPLICATE_MSG_ID),
            Some(StoreErrorKind::DuplicateCommand)
        );
        assert_eq!(
            kind_of(BATCH_DISABLED),
            Some(StoreErrorKind::IncompatibleStream)
        );
        assert_eq!(class(BATCH_TOO_LARGE), Some(ErrorClass::Permanent));
    }

    #[test]
    fn the_code_is_found_however_deep_the_client_wrapped_it() {
        use async_nats::jetstream::context::{PublishError, PublishErrorKind};
        use async_nats::jetstream::kv::{UpdateError, UpdateErrorKind};
        let api: async_nats::jetstream::Error = serde_json::from_str(
            r#"{"code": 400, "err_code": 10164, "description": "wrong last sequence"}"#,
        )
        .expect("an API error");
        let publish = PublishError::with_source(PublishErrorKind::Other, api);
        let update = UpdateError::with_source(UpdateErrorKind::Other, publish);
        assert_eq!(code_in(&update), Some(WRONG_LAST_SEQUENCE_CONSTANT));
        let timed_out = UpdateError::new(UpdateErrorKind::TimedOut);
        assert_eq!(code_in(&timed_out), None);
    }

    #[test]
    fn unknown_codes_have_no_meaning() {
        assert_eq!(kind_of(WRONG_LAST_MSG_ID), None);
        assert_eq!(kind_of(99_999), None);
    }
}
