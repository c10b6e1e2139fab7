//! Error classes shared by every jetsource error type.

/// Tells a caller what to do about an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// Someone else changed the aggregate first: reload and decide again.
    Conflict,
    /// The store was unreachable or slow: retrying the same thing later may work.
    Transient,
    /// Retrying the same request can never work: fix the input or the setup.
    Permanent,
}
