//! Rebuilding an aggregate's state from its events: fully, incrementally (a
//! cached aggregate catches up on the tail), or up to a point in the past
//! (temporal queries).

use std::collections::VecDeque;
use std::ops::ControlFlow;

use jetsource_aggregate::{DecodeError, DynAggregate, State};
use time::OffsetDateTime;

use crate::store::{EventStore, StoreError};
use crate::ErrorClass;

/// How many recent command ids an aggregate remembers for answering resends
/// without a store round trip. Older resends still get their original outcome
/// through `Nats-Msg-Id` deduplication within the stream's duplicate window.
pub const RECENT_COMMANDS: usize = 64;

/// An aggregate rebuilt up to some point of its history.
#[derive(Debug, Clone)]
pub struct Loaded {
    pub state: State,
    /// Number of events folded in (the aggregate version).
    pub version: u64,
    /// Stream sequence of the last event folded in, 0 if none.
    pub last_sequence: u64,
    pub last_timestamp: Option<OffsetDateTime>,
    /// (command id, sequence of its first event), oldest first.
    recent_commands: VecDeque<(String, u64)>,
}

/// How far to replay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Until {
    End,
    /// Up to and including this stream sequence.
    Sequence(u64),
    /// Events stored at or before this instant.
    Time(OffsetDateTime),
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum LoadError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("aggregate {aggregate} cannot be rebuilt: {source}")]
    Decode {
        aggregate: String,
        #[source]
        source: DecodeError,
    },
}

impl LoadError {
    pub fn class(&self) -> ErrorClass {
        match self {
            LoadError::Store(e) => e.class(),
            LoadError::Decode { .. } => ErrorClass::Permanent,
        }
    }
}

impl Loaded {
    /// The aggregate before any event.
    pub fn empty(aggregate: &dyn DynAggregate) -> Self {
        Self {
            state: aggregate.initial(),
            version: 0,
            last_sequence: 0,
            last_timestamp: None,
            recent_commands: VecDeque::new(),
        }
    }

    /// Sequence of the first event of command `command_id`, if it is one of
    /// the aggregate's recent commands.
    pub fn recorded_command(&self, command_id: &str) -> Option<u64> {
        self.recent_commands
            .iter()
            .rev()
            .find(|(id, _)| id == command_id)
            .map(|(_, seq)| *seq)
    }

    /// Records that `command_id` appended events starting at `first_sequence`.
    pub fn remember_command(&mut self, command_id: &str, first_sequence: u64) {
        if self.recorded_command(command_id).is_some() {
            return;
        }
        if self.recent_commands.len() == RECENT_COMMANDS {
            self.recent_commands.pop_front();
        }
        self.recent_commands
            .push_back((command_id.to_owned(), first_sequence));
    }

    /// Folds in every stored event after `last_sequence`, up to `until`.
    /// Returns how many events were applied.
    pub async fn catch_up(
        &mut self,
        store: &EventStore,
        aggregate: &dyn DynAggregate,
        aggregate_id: &str,
        until: Until,
    ) -> Result<u64, LoadError> {
        let aggregate_type = aggregate.aggregate_type();
        let mut applied = 0;
        let mut failure = None;
        store
            .read(
                aggregate_type,
                aggregate_id,
                self.last_sequence + 1,
                |chunk| {
                    let within = chunk
                        .iter()
                        .take_while(|e| match until {
                            Until::End => true,
                            Until::Sequence(seq) => e.sequence <= seq,
                            Until::Time(t) => e.timestamp <= t,
                        })
                        .count();
                    let mut events = chunk[..within]
                        .iter()
                        .map(|e| (e.event_type.as_str(), e.data.as_ref()));
                    match aggregate.fold(&self.state, &mut events) {
                        Ok(state) => self.state = state,
                        Err(source) => {
                            failure = Some(LoadError::Decode {
                                aggregate: format!("{aggregate_type}.{aggregate_id}"),
                                source,
                            });
                            return ControlFlow::Break(());
                        }
                    }
                    for event in &chunk[..within] {
                        if let Some(command_id) = &event.command_id {
                            self.remember_command(command_id, event.sequence);
                        }
                        self.last_sequence = event.sequence;
                        self.last_timestamp = Some(event.timestamp);
                    }
                    self.version += within as u64;
                    applied += within as u64;
                    if within < chunk.len() {
                        ControlFlow::Break(())
                    } else {
                        ControlFlow::Continue(())
                    }
                },
            )
            .await?;
        match failure {
            Some(e) => Err(e),
            None => Ok(applied),
        }
    }

    /// Loads an aggregate from scratch.
    pub async fn load(
        store: &EventStore,
        aggregate: &dyn DynAggregate,
        aggregate_id: &str,
        until: Until,
    ) -> Result<Self, LoadError> {
        let mut loaded = Self::empty(aggregate);
        loaded
            .catch_up(store, aggregate, aggregate_id, until)
            .await?;
        Ok(loaded)
    }
}
