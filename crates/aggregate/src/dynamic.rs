//! The type-erased face of an [`Aggregate`], so one runtime can serve many
//! aggregate types chosen at start-up by name.

use std::any::Any;
use std::borrow::Cow;
use std::collections::BTreeMap;
use std::marker::PhantomData;
use std::sync::Arc;

use serde_json::Value;

use crate::multi::{AggregateRef, Decided, Emitted, Others};
use crate::{Aggregate, DomainError};

/// An aggregate's state behind a cheap, shareable handle. Only the
/// [`DynAggregate`] that made it can look inside.
pub type State = Arc<dyn Any + Send + Sync>;

/// An event decided by the domain, ready to be stored: its type name and its
/// data as JSON bytes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NewEvent {
    pub event_type: String,
    pub data: Vec<u8>,
    /// Set by the runtime once the personal fields in `data` are sealed:
    /// whose they are and which (see [`crate::personal`]).
    pub sealed: Option<crate::personal::Sealing>,
}

/// What [`DynAggregate::decide`] returns: the events to append and the state
/// after them, so the caller need not fold its own events back in.
#[derive(Debug)]
pub struct Decision {
    pub events: Vec<NewEvent>,
    pub state: State,
}

/// A command decoded by [`DynAggregate::parse`], ready to be decided (again,
/// after a conflict) without decoding it twice.
pub struct ParsedCommand(Box<dyn Any + Send + Sync>);

impl std::fmt::Debug for ParsedCommand {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ParsedCommand")
    }
}

/// Why a command could not be decided.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecideError {
    /// Unknown command type or data that does not fit the command's shape.
    #[error("malformed command: {0}")]
    Malformed(String),
    /// The domain refused it.
    #[error(transparent)]
    Domain(#[from] DomainError),
}

/// A stored event that this aggregate cannot read back: unknown type or data
/// of the wrong shape. Loading stops rather than skip a fact.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cannot decode event {event_type:?}: {message}")]
pub struct DecodeError {
    pub event_type: String,
    pub message: String,
}

/// A stored event as the domain sees it: type, the schema version it was
/// written under, and its data as stored.
#[derive(Debug, Clone, Copy)]
pub struct StoredEvent<'a> {
    pub event_type: &'a str,
    pub schema_version: u32,
    pub data: &'a [u8],
}

/// Object-safe view of an [`Aggregate`], used by the runtime.
pub trait DynAggregate: Send + Sync + std::fmt::Debug {
    fn aggregate_type(&self) -> &'static str;
    fn event_schema_version(&self) -> u32;
    fn initial(&self) -> State;
    /// Folds stored events into a copy of `state`, upcasting each first.
    fn fold(
        &self,
        state: &State,
        events: &mut dyn Iterator<Item = StoredEvent<'_>>,
    ) -> Result<State, DecodeError>;
    /// A stored event's data in the current schema's shape (borrowed when
    /// it already is), through the aggregate's upcasters.
    fn upcast<'a>(&self, event: StoredEvent<'a>) -> Result<Cow<'a, [u8]>, DecodeError>;
    /// Decodes `{"type": command_type, "data": data}`. Needs no state, so a
    /// malformed command is refused before anything is loaded.
    fn parse(&self, command_type: &str, data: Value) -> Result<ParsedCommand, DecideError>;
    /// Lets the domain decide a parsed command against `state`. A command
    /// that involves other aggregates is refused as malformed here: it
    /// goes through [`DynAggregate::decide_with`].
    fn decide(&self, state: &State, command: &ParsedCommand) -> Result<Decision, DecideError> {
        let (decision, others) = self.decide_with(state, &Others::none(), command)?;
        match others.first() {
            None => Ok(decision),
            Some(emitted) => Err(DecideError::Malformed(format!(
                "the command decided events for {}, which it does not name in `involves`",
                emitted.aggregate
            ))),
        }
    }
    /// `Aggregate::involves`: the other aggregates a parsed command decides
    /// over.
    fn involves(&self, command: &ParsedCommand) -> Vec<AggregateRef>;
    /// Lets the domain decide a parsed command against `state` and the
    /// states of the other aggregates it involves: this aggregate's
    /// decision, and the events decided for the others.
    fn decide_with(
        &self,
        state: &State,
        others: &Others,
        command: &ParsedCommand,
    ) -> Result<(Decision, Vec<Emitted>), DecideError>;
    /// The state as JSON, for `jetsource state` and for snapshots.
    fn state_to_json(&self, state: &State) -> Value;
    /// A state back from a snapshot's JSON.
    fn state_from_json(&self, json: Value) -> Result<State, String>;
    /// `Aggregate::STATE_SCHEMA_VERSION`.
    fn state_schema_version(&self) -> u32;
    /// `Aggregate::PERSONAL_DATA` of events of `event_type`.
    fn personal_data(&self, _event_type: &str) -> Option<&'static crate::personal::PersonalData> {
        None
    }
}

struct Erased<A>(PhantomData<fn() -> A>);

impl<A> std::fmt::Debug for Erased<A>
where
    A: Aggregate,
{
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Aggregate({})", A::TYPE)
    }
}

fn downcast<A: Aggregate>(state: &State) -> &A::State {
    state
        .downcast_ref::<A::State>()
        .unwrap_or_else(|| panic!("state handed to {} belongs to another aggregate", A::TYPE))
}

/// Splits a serialized adjacently tagged enum into its type name and data.
/// The data keeps the bytes serde wrote (field order included): what the
/// domain declared is what is stored.
pub(crate) fn split_event<E: serde::Serialize>(event: &E) -> Result<NewEvent, String> {
    #[derive(serde::Deserialize)]
    struct Tagged<'a> {
        #[serde(rename = "type")]
        event_type: String,
        #[serde(borrow, default)]
        data: Option<&'a serde_json::value::RawValue>,
    }
    let json = serde_json::to_vec(event).map_err(|e| e.to_string())?;
    let tagged: Tagged<'_> = serde_json::from_slice(&json).map_err(|_| {
        "events must serialize as {\"type\": ..., \"data\": ...} objects (#[serde(tag = \"type\", content = \"data\")])".to_owned()
    })?;
    let data = tagged.data.map_or("null", |raw| raw.get());
    Ok(NewEvent {
        event_type: tagged.event_type,
        data: data.as_bytes().to_vec(),
        sealed: None,
    })
}

/// Decodes one stored event, reusing `buf` so folding long histories does not
/// allocate a JSON tree per event.
pub(crate) fn decode_event<E: serde::de::DeserializeOwned>(
    buf: &mut Vec<u8>,
    event_type: &str,
    data: &[u8],
) -> Result<E, DecodeError> {
    let err = |message: String| DecodeError {
        event_type: event_type.to_owned(),
        message,
    };
    buf.clear();
    buf.extend_from_slice(b"{\"type\":");
    serde_json::to_writer(&mut *buf, event_type).map_err(|e| err(e.to_string()))?;
    buf.extend_from_slice(b",\"data\":");
    buf.extend_from_slice(if data.is_empty() { b"null" } else { data });
    buf.push(b'}');
    serde_json::from_slice(buf).map_err(|e| err(e.to_string()))
}

impl<A: Aggregate> DynAggregate for Erased<A> {
    fn aggregate_type(&self) -> &'static str {
        A::TYPE
    }

    fn event_schema_version(&self) -> u32 {
        A::EVENT_SCHEMA_VERSION
    }

    fn initial(&self) -> State {
        Arc::new(A::State::default())
    }

    fn fold(
        &self,
        state: &State,
        events: &mut dyn Iterator<Item = StoredEvent<'_>>,
    ) -> Result<State, DecodeError> {
        let mut current = downcast::<A>(state).clone();
        let mut buf = Vec::with_capacity(256);
        for stored in events {
            let data = self.upcast(stored)?;
            let event: A::Event = decode_event(&mut buf, stored.event_type, &data)?;
            current = A::apply(current, &event);
        }
        Ok(Arc::new(current))
    }

    fn upcast<'a>(&self, event: StoredEvent<'a>) -> Result<Cow<'a, [u8]>, DecodeError> {
        crate::upcast::upcast(
            A::UPCASTERS,
            A::EVENT_SCHEMA_VERSION,
            event.event_type,
            event.schema_version,
            event.data,
        )
        .map_err(|message| DecodeError {
            event_type: event.event_type.to_owned(),
            message,
        })
    }

    fn parse(&self, command_type: &str, data: Value) -> Result<ParsedCommand, DecideError> {
        let data = if data.is_null() {
            Value::Object(Default::default())
        } else {
            data
        };
        let envelope = serde_json::json!({ "type": command_type, "data": data });
        let command: A::Command = serde_path_to_error::deserialize(envelope)
            .map_err(|e| DecideError::Malformed(format!("{command_type}: {e}")))?;
        Ok(ParsedCommand(Box::new(command)))
    }

    fn involves(&self, command: &ParsedCommand) -> Vec<AggregateRef> {
        command
            .0
            .downcast_ref::<A::Command>()
            .map(A::involves)
            .unwrap_or_default()
    }

    fn decide_with(
        &self,
        state: &State,
        others: &Others,
        command: &ParsedCommand,
    ) -> Result<(Decision, Vec<Emitted>), DecideError> {
        let command = command
            .0
            .downcast_ref::<A::Command>()
            .ok_or_else(|| {
                DecideError::Malformed(format!(
                    "command was parsed by another aggregate than {}",
                    A::TYPE
                ))
            })?
            .clone();
        let current = downcast::<A>(state);
        let decided: Decided<A::Event> = A::handle_with(current, others, command)?;
        let (events, emitted) = decided.into_parts();
        let mut next = current.clone();
        let mut new_events = Vec::with_capacity(events.len());
        for event in &events {
            next = A::apply(next, event);
            new_events.push(split_event(event).map_err(DecideError::Malformed)?);
        }
        let decision = Decision {
            events: new_events,
            state: Arc::new(next),
        };
        Ok((decision, emitted))
    }

    fn state_to_json(&self, state: &State) -> Value {
        serde_json::to_value(downcast::<A>(state)).unwrap_or(Value::Null)
    }

    fn state_from_json(&self, json: Value) -> Result<State, String> {
        let state: A::State = serde_json::from_value(json).map_err(|e| e.to_string())?;
        Ok(Arc::new(state))
    }

    fn state_schema_version(&self) -> u32 {
        A::STATE_SCHEMA_VERSION
    }

    fn personal_data(&self, event_type: &str) -> Option<&'static crate::personal::PersonalData> {
        A::PERSONAL_DATA.iter().find(|p| p.event_type == event_type)
    }
}

/// The aggregate types a process serves, by name, and the process
/// managers among them.
#[derive(Debug, Clone, Default)]
pub struct Registry {
    aggregates: BTreeMap<&'static str, Arc<dyn DynAggregate>>,
    processes: BTreeMap<&'static str, Arc<dyn crate::process::DynProcess>>,
}

impl Registry {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `A`. Panics on a duplicate or malformed type name: both are
    /// programming errors that must not reach production.
    pub fn register<A: Aggregate>(mut self) -> Self {
        assert!(
            crate::is_valid_token(A::TYPE),
            "aggregate type {:?} is not a valid subject token",
            A::TYPE
        );
        crate::upcast::check(A::TYPE, A::EVENT_SCHEMA_VERSION, A::UPCASTERS);
        let previous = self
            .aggregates
            .insert(A::TYPE, Arc::new(Erased::<A>(PhantomData)));
        assert!(
            previous.is_none(),
            "aggregate type {} registered twice",
            A::TYPE
        );
        self
    }

    /// Adds process `P`: its instances become aggregate type `P::TYPE`
    /// (readable like any other, refusing every command), and the process
    /// worker drives them. Panics like [`Registry::register`].
    pub fn register_process<P: crate::process::Process>(mut self) -> Self {
        assert!(
            crate::is_valid_token(P::TYPE),
            "process type {:?} is not a valid subject token",
            P::TYPE
        );
        let (process, instance) = crate::process::faces::<P>();
        let previous = self.aggregates.insert(P::TYPE, instance);
        assert!(previous.is_none(), "type {} registered twice", P::TYPE);
        self.processes.insert(P::TYPE, process);
        self
    }

    /// The process managers, by type.
    pub fn processes(&self) -> impl Iterator<Item = &Arc<dyn crate::process::DynProcess>> + '_ {
        self.processes.values()
    }

    pub fn get(&self, aggregate_type: &str) -> Option<&Arc<dyn DynAggregate>> {
        self.aggregates.get(aggregate_type)
    }

    pub fn types(&self) -> impl Iterator<Item = &'static str> + '_ {
        self.aggregates.keys().copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(serde::Serialize)]
    #[serde(tag = "type", content = "data")]
    enum Ev {
        Placed {
            sku: String,
            quantity: u32,
            price: u64,
        },
        Closed,
    }

    #[test]
    fn event_data_is_stored_as_the_domain_serialized_it() {
        let placed = Ev::Placed {
            sku: "s1".into(),
            quantity: 2,
            price: 10,
        };
        let split = split_event(&placed).expect("splits");
        assert_eq!(split.event_type, "Placed");
        assert_eq!(
            String::from_utf8_lossy(&split.data),
            r#"{"sku":"s1","quantity":2,"price":10}"#,
            "field order kept"
        );
        let closed = split_event(&Ev::Closed).expect("splits");
        assert_eq!(
            (closed.event_type.as_str(), closed.data.as_slice()),
            ("Closed", &b"null"[..])
        );
        assert!(split_event(&3u32).is_err());
    }
}
