//! Given/when/then for aggregates: given past events, when a command arrives,
//! then these events (or this error).
//!
//! ```
//! # use jetsource_aggregate::{Aggregate, DomainError, testing::given};
//! # use serde::{Deserialize, Serialize};
//! # #[derive(Debug)] struct Counter;
//! # #[derive(Clone, Deserialize)] #[serde(tag = "type", content = "data")] enum Cmd { Add(u32) }
//! # #[derive(Debug, PartialEq, Serialize, Deserialize)] #[serde(tag = "type", content = "data")] enum Ev { Added(u32) }
//! # impl Aggregate for Counter {
//! #     const TYPE: &'static str = "counter";
//! #     type State = u32; type Command = Cmd; type Event = Ev;
//! #     fn handle(_: &u32, c: Cmd) -> Result<Vec<Ev>, DomainError> { let Cmd::Add(n) = c; Ok(vec![Ev::Added(n)]) }
//! #     fn apply(s: u32, e: &Ev) -> u32 { let Ev::Added(n) = e; s + n }
//! # }
//! given::<Counter>([Ev::Added(1)])
//!     .when(Cmd::Add(2))
//!     .then_events([Ev::Added(2)]);
//! ```

use std::fmt::Debug;

use crate::{Aggregate, DomainError, DomainErrorKind};

/// Starts a scenario from the state that `events` fold into.
pub fn given<A: Aggregate>(events: impl IntoIterator<Item = A::Event>) -> Given<A> {
    let state = events
        .into_iter()
        .fold(A::State::default(), |state, event| A::apply(state, &event));
    Given { state }
}

/// A scenario's past.
#[derive(Debug)]
pub struct Given<A: Aggregate> {
    state: A::State,
}

impl<A: Aggregate> Given<A> {
    pub fn when(self, command: A::Command) -> Then<A> {
        let result = A::handle(&self.state, command);
        Then {
            state: self.state,
            result,
        }
    }

    /// The state the given events fold into.
    pub fn state(&self) -> &A::State {
        &self.state
    }
}

/// A scenario's outcome, to be checked.
#[derive(Debug)]
pub struct Then<A: Aggregate> {
    state: A::State,
    result: Result<Vec<A::Event>, DomainError>,
}

impl<A: Aggregate> Then<A>
where
    A::Event: PartialEq + Debug,
{
    /// Asserts the decided events and returns the state after them.
    #[track_caller]
    pub fn then_events(self, expected: impl IntoIterator<Item = A::Event>) -> A::State {
        let expected: Vec<A::Event> = expected.into_iter().collect();
        match self.result {
            Ok(events) => {
                assert_eq!(events, expected, "decided events differ");
                events.iter().fold(self.state, |s, e| A::apply(s, e))
            }
            Err(e) => panic!("expected events {expected:?}, got error {e:?}"),
        }
    }

    /// Asserts a business-rule refusal whose message contains `fragment`.
    #[track_caller]
    pub fn then_rejected(self, fragment: &str) {
        self.then_error(DomainErrorKind::Rejected, fragment);
    }

    /// Asserts an invalid-command refusal whose message contains `fragment`.
    #[track_caller]
    pub fn then_invalid(self, fragment: &str) {
        self.then_error(DomainErrorKind::Invalid, fragment);
    }

    #[track_caller]
    fn then_error(self, kind: DomainErrorKind, fragment: &str) {
        match self.result {
            Ok(events) => panic!("expected {kind:?} error, got events {events:?}"),
            Err(e) => {
                assert_eq!(e.kind, kind, "wrong error kind for {:?}", e.message);
                assert!(
                    e.message.contains(fragment),
                    "error {:?} does not mention {fragment:?}",
                    e.message
                );
            }
        }
    }
}

/// Reads an event stored under an older schema version the way every
/// jetsource reader does: through `A::UPCASTERS`, then decoded as
/// `A::Event`. For testing upcasters:
/// `assert_eq!(read_stored::<Ticket>("TicketOpened", 1, json!({..})), Ok(..))`.
pub fn read_stored<A: Aggregate>(
    event_type: &str,
    stored_version: u32,
    data: serde_json::Value,
) -> Result<A::Event, String> {
    let data = serde_json::to_vec(&data).map_err(|e| e.to_string())?;
    let data = crate::upcast::upcast(
        A::UPCASTERS,
        A::EVENT_SCHEMA_VERSION,
        event_type,
        stored_version,
        &data,
    )?;
    let data: serde_json::Value = serde_json::from_slice(&data).map_err(|e| e.to_string())?;
    serde_json::from_value(serde_json::json!({"type": event_type, "data": data}))
        .map_err(|e| format!("cannot decode {event_type}: {e}"))
}
