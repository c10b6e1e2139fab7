//! Commands that decide over more than one aggregate.
//!
//! Some rules span aggregates: a transfer takes from one account and gives
//! to another, and neither side may be visible without the other. Such a
//! command is still sent to one aggregate (`cmd.account.<from>`), which
//! names the others it decides over in [`Aggregate::involves`]. The runtime
//! loads every one of them, hands their states to
//! [`Aggregate::handle_with`] in [`Others`], and appends the events of all
//! of them in one atomic batch, each aggregate's first event guarded by its
//! own expected sequence: all or nothing, and refused whole when any of
//! them changed since it was loaded (then decided again on fresh state).
//!
//! The others may be of any registered aggregate type. Their events are
//! folded with their own `apply` and stored under their own schema version,
//! exactly as if they had handled a command themselves.

use std::sync::Arc;

use crate::dynamic::{split_event, NewEvent, State};
use crate::{Aggregate, DomainError};

/// Most aggregates one command may decide over, itself included. Each is
/// loaded and locked for the command's duration; a rule over more is a
/// process, not a command.
pub const MAX_AGGREGATES_PER_COMMAND: usize = 16;

/// Names one aggregate: its type and id.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AggregateRef {
    pub aggregate_type: &'static str,
    pub id: String,
}

impl AggregateRef {
    /// The aggregate of type `A` with id `id`.
    pub fn of<A: Aggregate>(id: impl Into<String>) -> Self {
        Self {
            aggregate_type: A::TYPE,
            id: id.into(),
        }
    }
}

impl std::fmt::Display for AggregateRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.aggregate_type, self.id)
    }
}

/// The current states of the other aggregates a command named in
/// [`Aggregate::involves`], each as of the same moment the command's own
/// state was loaded (an aggregate with no events yet has its default
/// state), and the id of the aggregate the command was sent to, which its
/// state need not hold.
#[derive(Debug, Clone, Default)]
pub struct Others {
    own_id: String,
    states: Vec<(AggregateRef, State)>,
}

impl Others {
    /// No other aggregates, and no id known.
    pub fn none() -> Self {
        Self::default()
    }

    /// For a command sent to aggregate `own_id`; add the others with
    /// [`Others::with`] (tests) or [`Others::insert`] (the runtime).
    pub fn sent_to(own_id: impl Into<String>) -> Self {
        Self {
            own_id: own_id.into(),
            states: Vec::new(),
        }
    }

    /// The id of the aggregate the command was sent to.
    pub fn own_id(&self) -> &str {
        &self.own_id
    }

    /// Adds aggregate `id` of type `B` in `state` (for tests; the runtime
    /// fills `Others` itself).
    pub fn with<B: Aggregate>(mut self, id: impl Into<String>, state: B::State) -> Self {
        self.states
            .push((AggregateRef::of::<B>(id), Arc::new(state) as State));
        self
    }

    /// The state of aggregate `id` of type `B`, if the command named it.
    pub fn get<B: Aggregate>(&self, id: &str) -> Option<&B::State> {
        self.states
            .iter()
            .find(|(r, _)| r.aggregate_type == B::TYPE && r.id == id)
            .and_then(|(_, state)| state.downcast_ref::<B::State>())
    }

    /// Adds a type-erased state (the runtime's way in).
    pub fn insert(&mut self, aggregate: AggregateRef, state: State) {
        self.states.push((aggregate, state));
    }

    pub fn is_empty(&self) -> bool {
        self.states.is_empty()
    }
}

/// What [`Aggregate::handle_with`] decides: the events of the aggregate the
/// command was sent to, and those of the others it named.
#[derive(Debug)]
pub struct Decided<E> {
    pub events: Vec<E>,
    others: Vec<Emitted>,
}

/// Events decided for another aggregate, serialized with its schema
/// version.
#[derive(Debug, Clone)]
pub struct Emitted {
    pub aggregate: AggregateRef,
    pub schema_version: u32,
    /// `Err` when an event did not serialize in the adjacently tagged shape
    /// (a programming error the runtime reports as a malformed decision).
    pub events: Result<Vec<NewEvent>, String>,
}

impl<E> Decided<E> {
    /// Events for the aggregate the command was sent to.
    pub fn new(events: Vec<E>) -> Self {
        Self {
            events,
            others: Vec::new(),
        }
    }

    /// Also appends `events` to aggregate `id` of type `B`, which the
    /// command must have named in [`Aggregate::involves`].
    pub fn and<B: Aggregate>(
        mut self,
        id: impl Into<String>,
        events: impl IntoIterator<Item = B::Event>,
    ) -> Self {
        let events = events
            .into_iter()
            .map(|e| split_event(&e))
            .collect::<Result<Vec<_>, _>>();
        self.others.push(Emitted {
            aggregate: AggregateRef::of::<B>(id),
            schema_version: B::EVENT_SCHEMA_VERSION,
            events,
        });
        self
    }

    /// The events decided for the other aggregates, in the order given.
    pub fn others(&self) -> &[Emitted] {
        &self.others
    }

    pub(crate) fn into_parts(self) -> (Vec<E>, Vec<Emitted>) {
        (self.events, self.others)
    }

    /// The events decided for aggregate `id` of type `B`, decoded (for
    /// tests).
    pub fn events_for<B: Aggregate>(&self, id: &str) -> Result<Vec<B::Event>, DomainError> {
        let mut out = Vec::new();
        for emitted in self
            .others
            .iter()
            .filter(|e| e.aggregate == AggregateRef::of::<B>(id))
        {
            let events = emitted.events.as_ref().map_err(DomainError::invalid)?;
            for event in events {
                let json = serde_json::json!({
                    "type": event.event_type,
                    "data": serde_json::from_slice::<serde_json::Value>(&event.data)
                        .map_err(|e| DomainError::invalid(e.to_string()))?,
                });
                out.push(
                    serde_json::from_value(json)
                        .map_err(|e| DomainError::invalid(e.to_string()))?,
                );
            }
        }
        Ok(out)
    }
}

impl<E> From<Vec<E>> for Decided<E> {
    fn from(events: Vec<E>) -> Self {
        Self::new(events)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{DecideError, Registry};
    use serde::{Deserialize, Serialize};

    /// Two aggregate types: a wallet spends into a ledger of another type.
    #[derive(Debug)]
    struct Wallet;
    #[derive(Debug)]
    struct Ledger;

    #[derive(Clone, Deserialize)]
    #[serde(tag = "type", content = "data")]
    enum WalletCommand {
        Spend { ledger: String, amount: u64 },
    }

    #[derive(Serialize, Deserialize)]
    #[serde(tag = "type", content = "data")]
    enum WalletEvent {
        Spent { amount: u64 },
    }

    #[derive(Clone, Deserialize)]
    #[serde(tag = "type", content = "data")]
    enum LedgerCommand {}

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    #[serde(tag = "type", content = "data")]
    enum LedgerEvent {
        Booked { amount: u64, from: String },
    }

    impl Aggregate for Wallet {
        const TYPE: &'static str = "wallet";
        type State = u64;
        type Command = WalletCommand;
        type Event = WalletEvent;

        fn handle(_: &u64, _: WalletCommand) -> Result<Vec<WalletEvent>, DomainError> {
            Err(DomainError::invalid("decided by handle_with"))
        }

        fn apply(state: u64, event: &WalletEvent) -> u64 {
            let WalletEvent::Spent { amount } = event;
            state + amount
        }

        fn involves(command: &WalletCommand) -> Vec<AggregateRef> {
            let WalletCommand::Spend { ledger, .. } = command;
            vec![AggregateRef::of::<Ledger>(ledger)]
        }

        fn handle_with(
            _: &u64,
            others: &Others,
            command: WalletCommand,
        ) -> Result<Decided<WalletEvent>, DomainError> {
            let WalletCommand::Spend { ledger, amount } = command;
            let booked = others
                .get::<Ledger>(&ledger)
                .ok_or_else(|| DomainError::invalid("ledger not loaded"))?;
            if *booked >= 10 {
                return Err(DomainError::rejected("ledger full"));
            }
            let from = others.own_id().to_owned();
            Ok(Decided::new(vec![WalletEvent::Spent { amount }])
                .and::<Ledger>(ledger, [LedgerEvent::Booked { amount, from }]))
        }
    }

    impl Aggregate for Ledger {
        const TYPE: &'static str = "ledger";
        const EVENT_SCHEMA_VERSION: u32 = 3;
        type State = u64;
        type Command = LedgerCommand;
        type Event = LedgerEvent;

        fn handle(_: &u64, command: LedgerCommand) -> Result<Vec<LedgerEvent>, DomainError> {
            match command {}
        }

        fn apply(state: u64, _: &LedgerEvent) -> u64 {
            state + 1
        }
    }

    #[test]
    fn a_command_decides_over_an_aggregate_of_another_type() {
        let registry = Registry::new().register::<Wallet>().register::<Ledger>();
        let wallet = registry.get("wallet").expect("registered");
        let ledger = registry.get("ledger").expect("registered");
        let spend = wallet
            .parse("Spend", serde_json::json!({"ledger": "l1", "amount": 7}))
            .expect("parses");
        assert_eq!(wallet.involves(&spend), [AggregateRef::of::<Ledger>("l1")]);

        let mut others = Others::sent_to("w1");
        others.insert(AggregateRef::of::<Ledger>("l1"), ledger.initial());
        let (decision, emitted) = wallet
            .decide_with(&wallet.initial(), &others, &spend)
            .expect("decides");
        assert_eq!(decision.events[0].event_type, "Spent");
        assert_eq!(emitted.len(), 1);
        let booked = &emitted[0];
        assert_eq!(booked.aggregate, AggregateRef::of::<Ledger>("l1"));
        assert_eq!(
            booked.schema_version, 3,
            "stored under the ledger's own version"
        );
        let events = booked.events.as_ref().expect("serialized");
        assert_eq!(events[0].data, br#"{"amount":7,"from":"w1"}"#);

        // The runtime folds the other's events with its own `apply`.
        let mut stored = events.iter().map(|e| crate::StoredEvent {
            event_type: &e.event_type,
            schema_version: 3,
            data: &e.data,
        });
        let after = ledger.fold(&ledger.initial(), &mut stored).expect("folds");
        assert_eq!(ledger.state_to_json(&after), serde_json::json!(1));

        // Through `decide` (no others loaded) the command is never decided
        // blind.
        let blind = wallet
            .decide(&wallet.initial(), &spend)
            .expect_err("refused");
        assert!(matches!(blind, DecideError::Domain(_)), "{blind:?}");
    }
}
