//! Exit codes and error classes: every failure is classed by a wire error
//! code ([`ErrorCode`]), found on typed errors, never in message text. The
//! code decides the exit status and the `code` of a `--json` error.

use std::error::Error;

use jetsource_core::config::ConfigError;
use jetsource_core::loader::LoadError;
use jetsource_core::protocol::{ErrorBody, ErrorCode};
use jetsource_core::store::{StoreError, StoreErrorKind};
use jetsource_core::ErrorClass;
use jetsource_projector::dlq::DlqError;
use jetsource_projector::redis_store;
use jetsource_snapshotter::SnapshotError;

/// Shown by `jetsource --help`; docs/PROTOCOL.md "CLI exit codes" says the same.
pub const EXIT_CODES_HELP: &str = "\
Exit codes:
  0  success
  1  internal: a server-side fault (`internal`) or an unexpected failure
  2  usage or invalid input (`invalid`): fix the arguments or the request
  3  rejected: a business rule refused the command
  4  conflict: --expected-version did not match, or a concurrent change won
  5  not found: no such aggregate, read model entry or dead letter
  6  unavailable or timed out: NATS, Redis or a worker did not answer
     (in time); retrying may work
  7  tampered: stored history failed its integrity check (`jetsource
     verify` finds what broke)

With --json, an error is printed on stdout as
{\"ok\":false,\"error\":{\"code\":\"...\",\"message\":\"...\"}} (codes as in the wire
protocol) instead of the usual document, and nothing on stderr.";

/// The exit status for an error code.
pub fn status(code: ErrorCode) -> u8 {
    match code {
        ErrorCode::Internal => 1,
        ErrorCode::Invalid => 2,
        ErrorCode::Rejected => 3,
        ErrorCode::Conflict => 4,
        ErrorCode::NotFound => 5,
        ErrorCode::Unavailable | ErrorCode::Timeout => 6,
        ErrorCode::Tampered => 7,
    }
}

/// An error the CLI classed itself. Its message is complete: it has no
/// source, so nothing is printed twice.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct Failure {
    pub code: ErrorCode,
    pub message: String,
    /// The command already printed its `--json` document (the results of
    /// a partly failed operation): the error goes to stderr only.
    pub printed: bool,
}

impl Failure {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            printed: false,
        }
    }

    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::Invalid, message)
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::NotFound, message)
    }

    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::Unavailable, message)
    }
}

/// The code of an error: the first cause in its chain that has one;
/// `internal` when none does.
pub fn classify(error: &anyhow::Error) -> ErrorCode {
    error
        .chain()
        .find_map(code_of)
        .unwrap_or(ErrorCode::Internal)
}

fn code_of(error: &(dyn Error + 'static)) -> Option<ErrorCode> {
    if let Some(f) = error.downcast_ref::<Failure>() {
        return Some(f.code);
    }
    if let Some(body) = error.downcast_ref::<ErrorBody>() {
        return Some(body.code);
    }
    if let Some(e) = error.downcast_ref::<StoreError>() {
        return Some(store_code(e.kind()));
    }
    // Transparent wrappers hide their inner error from the chain.
    match error.downcast_ref::<LoadError>() {
        Some(LoadError::Store(e)) => return Some(store_code(e.kind())),
        Some(e) => return e.own_code(),
        None => {}
    }
    match error.downcast_ref::<SnapshotError>() {
        Some(SnapshotError::Store(e)) | Some(SnapshotError::Load(LoadError::Store(e))) => {
            return Some(store_code(e.kind()))
        }
        Some(SnapshotError::Load(e)) => return e.own_code(),
        None => {}
    }
    if let Some(e) = error.downcast_ref::<DlqError>() {
        return Some(dlq_code(e));
    }
    if error.is::<ConfigError>() {
        return Some(ErrorCode::Invalid);
    }
    error.downcast_ref::<redis::RedisError>().map(redis_code)
}

pub fn redis_code(error: &redis::RedisError) -> ErrorCode {
    match redis_store::class(error) {
        ErrorClass::Permanent => ErrorCode::Internal,
        ErrorClass::Transient | ErrorClass::Conflict => ErrorCode::Unavailable,
    }
}

fn dlq_code(error: &DlqError) -> ErrorCode {
    match error {
        DlqError::Nats(e) => store_code(e.kind()),
        DlqError::Redis(e) => redis_code(e),
        DlqError::NoReadModel | DlqError::EventGone => ErrorCode::NotFound,
        DlqError::Open { .. } => match error.class() {
            ErrorClass::Permanent => ErrorCode::Internal,
            ErrorClass::Transient | ErrorClass::Conflict => ErrorCode::Unavailable,
        },
        DlqError::UnknownProjection(_) | DlqError::StillFails(_) => ErrorCode::Internal,
    }
}

fn store_code(kind: StoreErrorKind) -> ErrorCode {
    match kind {
        StoreErrorKind::WrongLastSequence => ErrorCode::Conflict,
        StoreErrorKind::Unavailable => ErrorCode::Unavailable,
        StoreErrorKind::TooLarge => ErrorCode::Invalid,
        StoreErrorKind::NotFound => ErrorCode::NotFound,
        StoreErrorKind::IncompatibleStream
        | StoreErrorKind::Corrupt
        | StoreErrorKind::DuplicateCommand
        | StoreErrorKind::Misconfigured
        | StoreErrorKind::Rejected => ErrorCode::Internal,
    }
}

/// What a `--json` error says: a server's error as it sent it, anything
/// else classed, with its causes on one line.
pub fn describe(error: &anyhow::Error) -> (ErrorCode, String) {
    match error.downcast_ref::<ErrorBody>() {
        Some(body) => (body.code, body.message.clone()),
        None => (classify(error), jetsource_core::error_chain(error.as_ref())),
    }
}

/// Whether the command printed its `--json` document before failing.
pub fn printed(error: &anyhow::Error) -> bool {
    error.downcast_ref::<Failure>().is_some_and(|f| f.printed)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use anyhow::Context as _;

    #[test]
    fn codes_come_from_types_through_context() {
        let wire = anyhow::Error::from(ErrorBody::new(ErrorCode::Conflict, "x"));
        assert_eq!(classify(&wire), ErrorCode::Conflict);
        let store: anyhow::Result<()> =
            Err(StoreError::new(StoreErrorKind::Unavailable, "down").into());
        let wrapped = store.context("opening the stream").unwrap_err();
        assert_eq!(classify(&wrapped), ErrorCode::Unavailable);
        assert_eq!(classify(&anyhow::anyhow!("what")), ErrorCode::Internal);
        let distinct: std::collections::BTreeSet<u8> = [
            ErrorCode::Internal,
            ErrorCode::Invalid,
            ErrorCode::Rejected,
            ErrorCode::Conflict,
            ErrorCode::NotFound,
            ErrorCode::Unavailable,
            ErrorCode::Tampered,
        ]
        .into_iter()
        .map(status)
        .collect();
        assert_eq!(distinct.len(), 7);
    }
}
