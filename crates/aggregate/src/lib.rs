//! The pure half of jetsource: how a domain decides and evolves.
//!
//! An [`Aggregate`] is a consistency boundary. Its [`Aggregate::handle`] looks at
//! the current state and a command and decides which events happen (or refuses
//! with a [`DomainError`]); its [`Aggregate::apply`] folds one event into the
//! state. Both are pure functions, so the whole domain is testable without any
//! server, see [`testing`].
//!
//! This crate deliberately knows nothing about NATS, Redis or JSON on the wire
//! beyond serde: the runtime (`jetsource-core`) talks to the domain only through
//! the type-erased [`DynAggregate`] kept in a [`Registry`].

mod dynamic;
mod multi;
pub mod personal;
pub mod process;
pub mod testing;
mod upcast;

use serde::de::DeserializeOwned;
use serde::Serialize;

pub use dynamic::{
    DecideError, Decision, DecodeError, DynAggregate, NewEvent, ParsedCommand, Registry, State,
    StoredEvent,
};
pub use multi::{AggregateRef, Decided, Emitted, Others, MAX_AGGREGATES_PER_COMMAND};
pub use upcast::Upcaster;

/// A consistency boundary of the domain, written in decide/evolve style.
///
/// Commands and events are serde enums that use the adjacently tagged
/// representation `#[serde(tag = "type", content = "data")]`, so on the wire a
/// command is `{"type": "Deposit", "data": {"amount": 100}}` and an event is
/// stored as type `Deposited` with data `{"amount": 100}`.
pub trait Aggregate: Send + Sync + 'static {
    /// The aggregate type as it appears in subjects: `cmd.<TYPE>.<id>`,
    /// `events.<TYPE>.<id>`. Lowercase letters, digits, `_` and `-` only.
    const TYPE: &'static str;

    /// Schema version stamped on every event this aggregate writes. Bump it
    /// when an event's data changes shape, and declare in [`Self::UPCASTERS`]
    /// how the old shape becomes the new one: `Event` then only ever sees
    /// the current shape.
    const EVENT_SCHEMA_VERSION: u32 = 1;

    /// How events stored under older schema versions are read: one
    /// [`Upcaster`] per event type and version step that changed its data.
    /// Every read path applies them (see the `upcast` module docs).
    const UPCASTERS: &'static [Upcaster] = &[];

    /// Schema version of `State` as stored in snapshots. Bump it when the
    /// state's shape changes: snapshots of another version are ignored (and
    /// the state is rebuilt from events) until the snapshotter replaces them.
    const STATE_SCHEMA_VERSION: u32 = 1;

    /// Which fields of which events are personal data, and whose
    /// ([`personal`]): the runtime stores them encrypted with the data
    /// subject's key, and `jetsource forget` erases them everywhere.
    const PERSONAL_DATA: &'static [personal::PersonalData] = &[];

    /// State before any event is `State::default()`. Serializable so it can
    /// be snapshotted.
    type State: Default + Clone + Send + Sync + Serialize + DeserializeOwned + 'static;
    /// Imperative: `Deposit`, `RenameUser`.
    type Command: DeserializeOwned + Clone + Send + Sync + 'static;
    /// Past tense: `Deposited`, `UserNameUpdated`.
    type Event: Serialize + DeserializeOwned;

    /// Decides what happens. An empty vector means "nothing to do" (for example
    /// renaming a user to the name it already has) and appends nothing.
    fn handle(state: &Self::State, command: Self::Command)
        -> Result<Vec<Self::Event>, DomainError>;

    /// Folds one event into the state. Events are facts that already happened,
    /// so this cannot fail: it must accept every event `handle` can produce.
    fn apply(state: Self::State, event: &Self::Event) -> Self::State;

    /// The other aggregates `command` decides over (see [`Decided`]): their states reach [`Self::handle_with`], and its
    /// events for all of them are appended atomically. Most commands
    /// involve no other aggregate.
    fn involves(_command: &Self::Command) -> Vec<AggregateRef> {
        Vec::new()
    }

    /// Decides a command that may involve other aggregates, seeing their
    /// states in `others`. Override it for the commands that name others in
    /// [`Self::involves`] and hand the rest to [`Self::handle`] (the
    /// default does only that).
    fn handle_with(
        state: &Self::State,
        _others: &Others,
        command: Self::Command,
    ) -> Result<Decided<Self::Event>, DomainError> {
        Self::handle(state, command).map(Decided::new)
    }
}

/// Why the domain refused a command.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct DomainError {
    pub kind: DomainErrorKind,
    pub message: String,
}

/// The two ways a domain says no; they map to the wire codes `invalid` and
/// `rejected`, which tell a client whether resending the same command can ever
/// succeed (`invalid`: never; `rejected`: maybe, once the state has changed).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DomainErrorKind {
    /// The command itself is malformed (zero amount, empty name).
    Invalid,
    /// The command is well formed but a business rule forbids it now.
    Rejected,
}

impl DomainError {
    pub fn invalid(message: impl Into<String>) -> Self {
        Self {
            kind: DomainErrorKind::Invalid,
            message: message.into(),
        }
    }

    pub fn rejected(message: impl Into<String>) -> Self {
        Self {
            kind: DomainErrorKind::Rejected,
            message: message.into(),
        }
    }
}

/// True when `s` is a valid aggregate type, aggregate id or event type token:
/// 1..=64 characters of `[A-Za-z0-9_-]`. Such a token is a single NATS subject
/// token and needs no escaping anywhere (subjects, headers, Redis keys, JSON).
pub fn is_valid_token(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens() {
        assert!(is_valid_token("acc-1_A"));
        assert!(is_valid_token(&"a".repeat(64)));
        assert!(!is_valid_token(&"a".repeat(65)));
        assert!(!is_valid_token(""));
        for bad in ["a.b", "a*", "a>", "a b", "ä", "a/b", "a\n"] {
            assert!(!is_valid_token(bad), "{bad:?} must be refused");
        }
    }
}
