//! Process managers: flows that span aggregates and time.
//!
//! A [`Process`] follows one aggregate type: each aggregate of that type
//! (an order) has one process instance (its fulfilment), keyed by the same
//! id. The instance is event-sourced like any aggregate, on
//! `events.<Process::TYPE>.<id>`, and reacts to three kinds of [`Input`]:
//! the followed aggregate's events, in their order; the answers to the
//! commands it sent; and its deadlines passing. Like an aggregate it is
//! pure: [`Process::handle`] turns an input into the instance's events,
//! [`Process::apply`] folds them. What it wants done is read off its state:
//! [`Process::pending`] lists the commands still to be answered,
//! [`Process::deadlines`] the deadlines it waits for. The runtime
//! (`jetsource-process`) sends each pending command with a command id
//! derived from the instance and the command's key, so a crash and a resend
//! never act twice, and schedules each deadline durably.
//!
//! Because everything the runtime does follows from the stored state, a
//! worker that dies at any point is replaced by another that reloads the
//! instance and carries on: inputs already handled are in the history,
//! commands already answered are no longer pending, and those sent but not
//! answered are sent again under the same id.

use std::borrow::Cow;
use std::marker::PhantomData;
use std::sync::Arc;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::dynamic::{decode_event, split_event, DecodeError, NewEvent, State, StoredEvent};
use crate::Aggregate;

/// A process manager (see the module docs).
pub trait Process: Send + Sync + 'static {
    /// The instance's aggregate type: its history is on
    /// `events.<TYPE>.<id>`, `jetsource state <TYPE> <id>` shows it.
    const TYPE: &'static str;
    /// The aggregate type whose events drive an instance; the instance id
    /// is that aggregate's id.
    type Follows: Aggregate;
    type State: Default + Clone + Send + Sync + Serialize + DeserializeOwned + 'static;
    /// What the instance records: past tense, like an aggregate's events.
    type Event: Serialize + DeserializeOwned;

    /// What `input` means for the instance. Inputs are facts (an event
    /// that happened, an answer given, a deadline passed): a process
    /// cannot refuse them, only record what follows from them.
    fn handle(state: &Self::State, input: Input<'_, Self::Follows>) -> Vec<Self::Event>;

    fn apply(state: Self::State, event: &Self::Event) -> Self::State;

    /// The commands the instance wants answered now. Each has a key unique
    /// within the instance for its intent (`reserve-tea`): the runtime
    /// sends it until it gets a definite answer, always with the same
    /// command id, and hands the answer to `handle` as
    /// [`Input::Answered`], which must make it leave this list. `id` is the
    /// instance's (and the followed aggregate's) id.
    fn pending(id: &str, state: &Self::State) -> Vec<Outgoing>;

    /// The deadlines the instance waits for. Each passes once, as
    /// [`Input::Deadline`], unless it left this list before.
    fn deadlines(state: &Self::State) -> Vec<Deadline>;
}

/// One input to a process instance.
#[derive(Debug)]
pub enum Input<'a, A: Aggregate> {
    /// The followed aggregate's next event, its version (1 for the
    /// aggregate's first event) and when it was stored (Unix milliseconds).
    Event {
        event: &'a A::Event,
        version: u64,
        at_ms: u64,
    },
    /// The answer to the pending command `key`.
    Answered { key: &'a str, answer: &'a Answer },
    /// Deadline `name` passed.
    Deadline { name: &'a str },
}

/// A definite answer to a command a process sent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum Answer {
    /// Accepted (now or by an earlier send of the same command id), with
    /// the events it appended (none when there was nothing to change).
    Done { events: Vec<AnsweredEvent> },
    /// Refused (`rejected` or `invalid`): nothing was stored. (`conflict`,
    /// `unavailable` and timeouts are no answer: the command is sent again.) A refusal leaves no trace, so the same
    /// command sent again is decided again, and may then be accepted: a
    /// process that acts on a refusal must be able to live with that, or
    /// the target should record the refusal as an event (an accepted
    /// command whose answer reads the same every time it is sent).
    Refused { code: String, message: String },
}

/// An event in an [`Answer::Done`]: its type and data.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AnsweredEvent {
    pub event_type: String,
    pub data: Value,
}

/// A command a process wants sent: to `<aggregate_type>.<aggregate_id>`,
/// `{"type": command_type, "data": data}`.
#[derive(Debug, Clone, PartialEq)]
pub struct Outgoing {
    pub key: String,
    pub aggregate_type: &'static str,
    pub aggregate_id: String,
    pub command_type: String,
    pub data: Value,
}

impl Outgoing {
    /// Command `command_type` with `data` to aggregate `id` of type `B`,
    /// under `key`.
    pub fn to<B: Aggregate>(
        key: impl Into<String>,
        id: impl Into<String>,
        command_type: &str,
        data: Value,
    ) -> Self {
        Self {
            key: key.into(),
            aggregate_type: B::TYPE,
            aggregate_id: id.into(),
            command_type: command_type.to_owned(),
            data,
        }
    }
}

/// A deadline: `name` passes at `at_ms` (Unix milliseconds). Derive the
/// time from an input (an event's `at_ms`), never from a clock, so that
/// handling the same history again gives the same deadline.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Deadline {
    pub name: String,
    pub at_ms: u64,
}

/// The runtime's own record in an instance's history: the followed
/// aggregate's events up to `version` (stream sequence `sequence`) were
/// handled. Appended after the events they produced, in the same atomic
/// append; followed events that produce nothing are recorded only every
/// so often (they are handled again, to the same nothing, until then).
/// Processes must not use this event type.
pub const OBSERVED: &str = "ProcessObserved";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Observed {
    pub version: u64,
    pub sequence: u64,
}

impl Observed {
    /// The record as an event to append.
    pub fn to_event(self) -> NewEvent {
        NewEvent {
            event_type: OBSERVED.to_owned(),
            data: serde_json::to_vec(&self).expect("serializes"),
            sealed: None,
        }
    }
}

/// An instance's state with the runtime's bookkeeping.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Instance<S> {
    pub state: S,
    /// The last followed event handled.
    pub observed: Option<Observed>,
}

/// A process, type-erased for the runtime.
pub trait DynProcess: Send + Sync + std::fmt::Debug {
    fn process_type(&self) -> &'static str;
    fn follows(&self) -> &'static str;
    /// The last followed event the instance handled (from its state).
    fn observed(&self, state: &State) -> Option<Observed>;
    /// The events a stored followed event produces (upcast and decoded
    /// here). A followed event it cannot decode is an error.
    fn on_event(
        &self,
        state: &State,
        event: StoredEvent<'_>,
        version: u64,
        at_ms: u64,
    ) -> Result<Vec<NewEvent>, DecodeError>;
    fn on_answer(&self, state: &State, key: &str, answer: &Answer) -> Vec<NewEvent>;
    fn on_deadline(&self, state: &State, name: &str) -> Vec<NewEvent>;
    fn pending(&self, id: &str, state: &State) -> Vec<Outgoing>;
    fn deadlines(&self, state: &State) -> Vec<Deadline>;
}

pub(crate) struct ErasedProcess<P>(pub(crate) PhantomData<fn() -> P>);

impl<P: Process> std::fmt::Debug for ErasedProcess<P> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Process({})", P::TYPE)
    }
}

fn instance<P: Process>(state: &State) -> &Instance<P::State> {
    state
        .downcast_ref::<Instance<P::State>>()
        .unwrap_or_else(|| panic!("state handed to process {} belongs to another", P::TYPE))
}

fn serialize<P: Process>(events: &[P::Event]) -> Vec<NewEvent> {
    events
        .iter()
        .map(|e| {
            split_event(e).unwrap_or_else(|message| {
                panic!("process {} event does not serialize: {message}", P::TYPE)
            })
        })
        .collect()
}

impl<P: Process> DynProcess for ErasedProcess<P> {
    fn process_type(&self) -> &'static str {
        P::TYPE
    }

    fn follows(&self) -> &'static str {
        <P::Follows as Aggregate>::TYPE
    }

    fn observed(&self, state: &State) -> Option<Observed> {
        instance::<P>(state).observed
    }

    fn on_event(
        &self,
        state: &State,
        event: StoredEvent<'_>,
        version: u64,
        at_ms: u64,
    ) -> Result<Vec<NewEvent>, DecodeError> {
        type F<P> = <P as Process>::Follows;
        let data: Cow<'_, [u8]> = crate::upcast::upcast(
            F::<P>::UPCASTERS,
            F::<P>::EVENT_SCHEMA_VERSION,
            event.event_type,
            event.schema_version,
            event.data,
        )
        .map_err(|message| DecodeError {
            event_type: event.event_type.to_owned(),
            message,
        })?;
        let mut buf = Vec::new();
        let decoded: <F<P> as Aggregate>::Event = decode_event(&mut buf, event.event_type, &data)?;
        let input = Input::Event {
            event: &decoded,
            version,
            at_ms,
        };
        Ok(serialize::<P>(&P::handle(
            &instance::<P>(state).state,
            input,
        )))
    }

    fn on_answer(&self, state: &State, key: &str, answer: &Answer) -> Vec<NewEvent> {
        let input = Input::Answered { key, answer };
        serialize::<P>(&P::handle(&instance::<P>(state).state, input))
    }

    fn on_deadline(&self, state: &State, name: &str) -> Vec<NewEvent> {
        let input = Input::Deadline { name };
        serialize::<P>(&P::handle(&instance::<P>(state).state, input))
    }

    fn pending(&self, id: &str, state: &State) -> Vec<Outgoing> {
        P::pending(id, &instance::<P>(state).state)
    }

    fn deadlines(&self, state: &State) -> Vec<Deadline> {
        P::deadlines(&instance::<P>(state).state)
    }
}

/// The instance as an aggregate type, so that every read path (loading,
/// snapshots, `jetsource state` and `history`, temporal queries) serves it
/// like any other. It takes no commands: only the process runtime writes
/// its history.
pub(crate) struct InstanceAggregate<P>(pub(crate) PhantomData<fn() -> P>);

impl<P: Process> std::fmt::Debug for InstanceAggregate<P> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ProcessInstance({})", P::TYPE)
    }
}

impl<P: Process> InstanceAggregate<P> {
    pub(crate) fn fold_instance(
        mut current: Instance<P::State>,
        events: &mut dyn Iterator<Item = StoredEvent<'_>>,
    ) -> Result<Instance<P::State>, DecodeError> {
        let mut buf = Vec::with_capacity(256);
        for stored in events {
            if stored.event_type == OBSERVED {
                let observed: Observed =
                    serde_json::from_slice(stored.data).map_err(|e| DecodeError {
                        event_type: OBSERVED.to_owned(),
                        message: e.to_string(),
                    })?;
                current.observed = Some(observed);
                continue;
            }
            let event: P::Event = decode_event(&mut buf, stored.event_type, stored.data)?;
            current.state = P::apply(current.state, &event);
        }
        Ok(current)
    }
}

/// What the instance aggregate answers to a command.
pub(crate) fn no_commands(process_type: &str) -> String {
    format!(
        "{process_type} is a process: its instances take no commands, the process worker drives them"
    )
}

/// `Arc`s of both faces of `P`.
pub(crate) fn faces<P: Process>() -> (Arc<dyn DynProcess>, Arc<InstanceAggregate<P>>) {
    (
        Arc::new(ErasedProcess::<P>(PhantomData)),
        Arc::new(InstanceAggregate::<P>(PhantomData)),
    )
}

impl<P: Process> crate::DynAggregate for InstanceAggregate<P> {
    fn aggregate_type(&self) -> &'static str {
        P::TYPE
    }

    fn event_schema_version(&self) -> u32 {
        1
    }

    fn initial(&self) -> State {
        Arc::new(Instance::<P::State>::default())
    }

    fn fold(
        &self,
        state: &State,
        events: &mut dyn Iterator<Item = StoredEvent<'_>>,
    ) -> Result<State, DecodeError> {
        let current = instance::<P>(state).clone();
        Ok(Arc::new(Self::fold_instance(current, events)?))
    }

    fn upcast<'a>(&self, event: StoredEvent<'a>) -> Result<Cow<'a, [u8]>, DecodeError> {
        Ok(Cow::Borrowed(event.data))
    }

    fn parse(
        &self,
        _command_type: &str,
        _data: Value,
    ) -> Result<crate::ParsedCommand, crate::DecideError> {
        Err(crate::DecideError::Malformed(no_commands(P::TYPE)))
    }

    fn involves(&self, _command: &crate::ParsedCommand) -> Vec<crate::AggregateRef> {
        Vec::new()
    }

    fn decide_with(
        &self,
        _state: &State,
        _others: &crate::Others,
        _command: &crate::ParsedCommand,
    ) -> Result<(crate::Decision, Vec<crate::Emitted>), crate::DecideError> {
        Err(crate::DecideError::Malformed(no_commands(P::TYPE)))
    }

    fn state_to_json(&self, state: &State) -> Value {
        serde_json::to_value(instance::<P>(state)).unwrap_or(Value::Null)
    }

    fn state_from_json(&self, json: Value) -> Result<State, String> {
        let state: Instance<P::State> = serde_json::from_value(json).map_err(|e| e.to_string())?;
        Ok(Arc::new(state))
    }

    fn state_schema_version(&self) -> u32 {
        1
    }
}
