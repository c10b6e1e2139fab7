//! Rebuilding an aggregate's state from its events: fully, incrementally (a
//! cached aggregate catches up on the tail), or up to a point in the past
//! (temporal queries).

use std::collections::VecDeque;
use std::ops::ControlFlow;

use jetsource_aggregate::{DecodeError, DynAggregate, State};
use time::OffsetDateTime;

use crate::envelope::RecordedEvent;
use crate::integrity::{Broken, ChainHash, Head, Integrity};
use crate::snapshot::{Snapshot, SnapshotStore};
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
    /// Hash of the last event folded in: what the next append chains to.
    pub last_hash: Option<ChainHash>,
    /// Some event folded in was signed (every later one must be).
    signed: bool,
    /// Data subjects whose personal data the events folded in hold: a
    /// state (or snapshot) built from them may hold it in the clear.
    pub subjects: std::collections::BTreeSet<String>,
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
    /// Its history fails the hash chain or signature check: served by no
    /// one until an operator looks (`jetsource verify <type> <id>`).
    #[error("aggregate {aggregate} failed its integrity check at event {sequence}: {broken}; run `jetsource verify {aggregate_type} {aggregate_id}` and restore the history from a backup")]
    Tampered {
        aggregate: String,
        aggregate_type: String,
        aggregate_id: String,
        sequence: u64,
        broken: Broken,
    },
}

impl LoadError {
    /// The wire code of a load that failed for a reason of its own (not
    /// the store's): undecodable events are `internal`, a broken chain
    /// `tampered`.
    pub fn own_code(&self) -> Option<crate::protocol::ErrorCode> {
        match self {
            LoadError::Store(_) => None,
            LoadError::Decode { .. } => Some(crate::protocol::ErrorCode::Internal),
            LoadError::Tampered { .. } => Some(crate::protocol::ErrorCode::Tampered),
        }
    }

    pub fn class(&self) -> ErrorClass {
        match self {
            LoadError::Store(e) => e.class(),
            LoadError::Decode { .. } | LoadError::Tampered { .. } => ErrorClass::Permanent,
        }
    }
}

/// How a load used the aggregate's snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SnapshotUse {
    /// There is none: full replay.
    Absent,
    /// Started from the snapshot at this version, replayed the tail.
    Used { version: u64 },
    /// The snapshot goes past the requested point in time: full replay.
    TooNew,
    /// The snapshot is unusable (format, schema, checksum, data): full replay.
    Ignored(String),
}

impl Loaded {
    /// The aggregate before any event.
    pub fn empty(aggregate: &dyn DynAggregate) -> Self {
        Self {
            state: aggregate.initial(),
            version: 0,
            last_sequence: 0,
            last_timestamp: None,
            last_hash: None,
            signed: false,
            subjects: Default::default(),
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

    /// Takes `events`, just appended as `appended`, into the state: `state`
    /// is the state after them.
    pub fn appended(&mut self, state: State, events: usize, appended: &crate::store::Appended) {
        self.state = state;
        self.version += events as u64;
        self.last_sequence = appended.last_sequence;
        self.last_hash = appended.last_hash;
        self.signed |= appended.signed;
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
    ///
    /// Reads with direct gets, which any replica may answer: on a
    /// replicated stream the newest events may be missing. That is fine
    /// where the server checks the result later (a command's append carries
    /// the expected last sequence); anything else uses
    /// [`Loaded::catch_up_confirmed`].
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
                |chunk| match self.fold_chunk(
                    store.integrity(),
                    aggregate,
                    aggregate_id,
                    &chunk,
                    until,
                ) {
                    Ok((n, flow)) => {
                        applied += n;
                        flow
                    }
                    Err(e) => {
                        failure = Some(e);
                        ControlFlow::Break(())
                    }
                },
            )
            .await?;
        match failure {
            Some(e) => Err(e),
            None => Ok(applied),
        }
    }

    /// Like [`Loaded::catch_up`], then makes sure nothing is missing: the
    /// stream leader is asked for the aggregate's last sequence, and
    /// whatever a lagging replica did not return is read up to it (or up to
    /// `until`). After this the state includes every event within `until`
    /// acknowledged before the call. Costs one more round trip; for answers the server does not
    /// check (a refusal, a no-op, "no such aggregate").
    pub async fn catch_up_confirmed(
        &mut self,
        store: &EventStore,
        aggregate: &dyn DynAggregate,
        aggregate_id: &str,
        until: Until,
    ) -> Result<u64, LoadError> {
        let mut applied = self.catch_up(store, aggregate, aggregate_id, until).await?;
        let subject = crate::envelope::event_subject(aggregate.aggregate_type(), aggregate_id);
        let last = store.leader_last_sequence(&subject).await?;
        let target = match until {
            Until::Sequence(n) => last.min(n),
            Until::End | Until::Time(_) => last,
        };
        if target > self.last_sequence {
            let missing = store
                .read_through(&subject, self.last_sequence + 1, target)
                .await?;
            let mut events = missing
                .into_iter()
                .map(|m| m.into_event())
                .collect::<Result<Vec<_>, _>>()
                .map_err(crate::store::StoreError::from)?;
            store.open_events(&mut events).await?;
            applied += self
                .fold_chunk(store.integrity(), aggregate, aggregate_id, &events, until)?
                .0;
        }
        Ok(applied)
    }

    /// Folds the events of `chunk` that lie within `until`; returns how many
    /// and whether to read on.
    fn fold_chunk(
        &mut self,
        integrity: &Integrity,
        aggregate: &dyn DynAggregate,
        aggregate_id: &str,
        chunk: &[RecordedEvent],
        until: Until,
    ) -> Result<(u64, ControlFlow<()>), LoadError> {
        let within = chunk
            .iter()
            .take_while(|e| match until {
                Until::End => true,
                Until::Sequence(seq) => e.sequence <= seq,
                Until::Time(t) => e.timestamp <= t,
            })
            .count();
        self.check(integrity, &chunk[..within])?;
        let mut events = chunk[..within].iter().map(RecordedEvent::stored);
        self.state =
            aggregate
                .fold(&self.state, &mut events)
                .map_err(|source| LoadError::Decode {
                    aggregate: format!("{}.{aggregate_id}", aggregate.aggregate_type()),
                    source,
                })?;
        for event in &chunk[..within] {
            if let Some(command_id) = event.own_command_id() {
                self.remember_command(command_id, event.sequence);
            }
            self.last_sequence = event.sequence;
            self.last_timestamp = Some(event.timestamp);
            self.take_link(event);
        }
        self.version += within as u64;
        let flow = if within < chunk.len() {
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue(())
        };
        Ok((within as u64, flow))
    }

    /// Checks that `events` continue the loaded history link by link
    /// (versions, hashes, signatures), when `integrity` asks for it.
    fn check(&self, integrity: &Integrity, events: &[RecordedEvent]) -> Result<(), LoadError> {
        if !integrity.verify_on_load {
            return Ok(());
        }
        let mut head = Head {
            version: self.version,
            hash: self.last_hash,
            signed: self.signed,
        };
        for event in events {
            head.advance(event, &integrity.trusted)
                .map_err(|broken| LoadError::Tampered {
                    aggregate: format!("{}.{}", event.aggregate_type, event.aggregate_id),
                    aggregate_type: event.aggregate_type.clone(),
                    aggregate_id: event.aggregate_id.clone(),
                    sequence: event.sequence,
                    broken,
                })?;
        }
        Ok(())
    }

    /// Makes `event` (folded in) the chain head the next append links to.
    fn take_link(&mut self, event: &RecordedEvent) {
        self.last_hash = event.hash.as_deref().and_then(ChainHash::parse);
        self.signed |= event.signature.is_some();
        // Only subjects whose fields were opened: a state built from
        // erased fields holds nothing of a forgotten subject.
        if let (Some(subject), true) = (&event.data_subject, event.erased.is_empty()) {
            if !self.subjects.contains(subject) {
                self.subjects.insert(subject.clone());
            }
        }
    }

    /// Folds in one event that directly follows what is loaded (the caller
    /// checks the version). For consumers that see an aggregate's events go
    /// by in order and keep its state, instead of reading the store again.
    pub fn apply(
        &mut self,
        integrity: &Integrity,
        aggregate: &dyn DynAggregate,
        event: &RecordedEvent,
    ) -> Result<(), LoadError> {
        self.check(integrity, std::slice::from_ref(event))?;
        let mut events = std::iter::once(event.stored());
        self.state =
            aggregate
                .fold(&self.state, &mut events)
                .map_err(|source| LoadError::Decode {
                    aggregate: format!("{}.{}", event.aggregate_type, event.aggregate_id),
                    source,
                })?;
        if let Some(command_id) = event.own_command_id() {
            self.remember_command(command_id, event.sequence);
        }
        self.version += 1;
        self.last_sequence = event.sequence;
        self.last_timestamp = Some(event.timestamp);
        self.take_link(event);
        Ok(())
    }

    /// The state as a sealed snapshot, `None` before the first event.
    pub fn to_snapshot(
        &self,
        aggregate: &dyn DynAggregate,
        aggregate_id: &str,
    ) -> Option<Snapshot> {
        let timestamp = self.last_timestamp?;
        Some(
            Snapshot {
                format: 0,
                aggregate_type: aggregate.aggregate_type().to_owned(),
                aggregate_id: aggregate_id.to_owned(),
                state_schema: aggregate.state_schema_version(),
                version: self.version,
                sequence: self.last_sequence,
                timestamp,
                taken_at: OffsetDateTime::now_utc(),
                recent_commands: self.recent_commands.iter().cloned().collect(),
                last_hash: self.last_hash.map(|h| h.to_string()),
                signed: self.signed,
                subjects: self.subjects.iter().cloned().collect(),
                state: aggregate.state_to_json(&self.state),
                checksum: String::new(),
            }
            .seal(),
        )
    }

    /// An aggregate rebuilt from a checked snapshot.
    pub fn from_snapshot(aggregate: &dyn DynAggregate, snapshot: Snapshot) -> Result<Self, String> {
        if snapshot.aggregate_type != aggregate.aggregate_type() {
            return Err(format!(
                "snapshot of a {} given to {}",
                snapshot.aggregate_type,
                aggregate.aggregate_type()
            ));
        }
        let state = aggregate.state_from_json(snapshot.state)?;
        Ok(Self {
            state,
            version: snapshot.version,
            last_sequence: snapshot.sequence,
            last_timestamp: Some(snapshot.timestamp),
            last_hash: match snapshot.last_hash.as_deref().map(ChainHash::parse) {
                None => None,
                Some(Some(hash)) => Some(hash),
                Some(None) => return Err("last_hash is not a SHA-256 in hex".into()),
            },
            signed: snapshot.signed,
            subjects: snapshot.subjects.into_iter().collect(),
            recent_commands: snapshot.recent_commands.into_iter().collect(),
        })
    }

    /// Loads from the latest usable snapshot plus the events after it, or
    /// from scratch when there is none, it is unusable, or it goes past
    /// `until`.
    pub async fn load_with_snapshot(
        store: &EventStore,
        snapshots: &SnapshotStore,
        aggregate: &dyn DynAggregate,
        aggregate_id: &str,
        until: Until,
    ) -> Result<(Self, SnapshotUse), LoadError> {
        let (start, used) = match snapshots
            .get_raw(aggregate.aggregate_type(), aggregate_id)
            .await
        {
            Err(e) => (None, SnapshotUse::Ignored(e.to_string())),
            Ok(None) => (None, SnapshotUse::Absent),
            Ok(Some(bytes)) => match Snapshot::decode(&bytes, aggregate.state_schema_version()) {
                Err(reason) => (None, SnapshotUse::Ignored(reason)),
                Ok(snapshot) if snapshot.aggregate_id != aggregate_id => (
                    None,
                    SnapshotUse::Ignored(format!(
                        "snapshot of {} under the wrong key",
                        snapshot.aggregate_id
                    )),
                ),
                Ok(snapshot) => {
                    let fits = match until {
                        Until::End => true,
                        Until::Sequence(seq) => snapshot.sequence <= seq,
                        Until::Time(t) => snapshot.timestamp <= t,
                    };
                    if !fits {
                        (None, SnapshotUse::TooNew)
                    } else if let Some(subject) = forgotten_among(store, &snapshot.subjects).await?
                    {
                        (
                            None,
                            SnapshotUse::Ignored(format!(
                                "it holds personal data of forgotten data subject {subject}"
                            )),
                        )
                    } else {
                        let version = snapshot.version;
                        match Self::from_snapshot(aggregate, snapshot) {
                            Ok(loaded) => (Some(loaded), SnapshotUse::Used { version }),
                            Err(reason) => (None, SnapshotUse::Ignored(reason)),
                        }
                    }
                }
            },
        };
        if let SnapshotUse::Ignored(reason) = &used {
            tracing::warn!(aggregate = %format_args!("{}.{aggregate_id}", aggregate.aggregate_type()), %reason, "ignoring snapshot, replaying all events");
        }
        let mut loaded = start.unwrap_or_else(|| Self::empty(aggregate));
        loaded
            .catch_up(store, aggregate, aggregate_id, until)
            .await?;
        Ok((loaded, used))
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

/// The first of `subjects` that is forgotten, if any: a state built while
/// it was not holds its personal data in the clear.
pub async fn forgotten_among(
    store: &EventStore,
    subjects: &[String],
) -> Result<Option<String>, StoreError> {
    for subject in subjects {
        let gone = store
            .privacy()
            .is_gone(subject)
            .await
            .map_err(|e| match e {
                crate::privacy::PrivacyError::Store(e) => e,
                other => StoreError::new(crate::store::StoreErrorKind::Rejected, other.to_string()),
            })?;
        if gone {
            return Ok(Some(subject.clone()));
        }
    }
    Ok(None)
}

/// An aggregate's state at `until` as an operator sees it: from the latest
/// snapshot that does not go past the point, then brought up to everything
/// the stream leader has (never decided by a replica that lags), so "no
/// events" and the state shown are exact. For the CLI's `state` and the
/// gateway.
pub async fn state_at(
    store: &EventStore,
    snapshots: &SnapshotStore,
    aggregate: &dyn DynAggregate,
    aggregate_id: &str,
    until: Until,
) -> Result<(Loaded, SnapshotUse), LoadError> {
    let (mut loaded, used) =
        Loaded::load_with_snapshot(store, snapshots, aggregate, aggregate_id, until).await?;
    loaded
        .catch_up_confirmed(store, aggregate, aggregate_id, until)
        .await?;
    Ok((loaded, used))
}

/// A stored event as JSON with its data in the current schema (through the
/// aggregate's upcasters): `schema_version` is the version it was stored
/// under, `data_schema_version` the one `data` is in (absent when the type
/// is not registered here), `upcast_error` when an upcaster refused it.
pub fn event_json(
    aggregate: Option<&dyn DynAggregate>,
    event: &crate::envelope::RecordedEvent,
) -> serde_json::Value {
    let mut value = serde_json::to_value(event).unwrap_or(serde_json::Value::Null);
    let Some(aggregate) = aggregate else {
        return value;
    };
    match aggregate.upcast(event.stored()) {
        Ok(data) => {
            value["data"] = serde_json::from_slice(&data).unwrap_or_else(|_| {
                serde_json::Value::from(String::from_utf8_lossy(&data).into_owned())
            });
            value["data_schema_version"] = aggregate.event_schema_version().into();
        }
        Err(e) => value["upcast_error"] = e.to_string().into(),
    }
    value
}
