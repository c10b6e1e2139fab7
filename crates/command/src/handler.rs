//! One command, from request bytes to reply.

use std::sync::Arc;

use jetsource_core::aggregate::{
    DecideError, Decision, DomainErrorKind, DynAggregate, NewEvent, ParsedCommand, Registry,
};
use jetsource_core::config::CommandConfig;
use jetsource_core::envelope::RecordedEvent;
use jetsource_core::loader::{LoadError, Loaded, SnapshotUse, Until};
use jetsource_core::metrics;
use jetsource_core::privacy::PrivacyError;
use jetsource_core::protocol::{
    check_client_id, parse_command_subject, CommandOutcome, CommandRequest, ErrorBody, ErrorCode,
    ReplyEvent,
};
use jetsource_core::snapshot::SnapshotStore;
use jetsource_core::store::{Append, Appended, EventStore, StoreError, StoreErrorKind};
use serde_json::Value;
use tracing::Instrument;

use crate::cache::{Cache, Slot};

/// Decides commands; shared by all request tasks of one process.
#[derive(Debug)]
pub struct Worker {
    pub(crate) store: EventStore,
    snapshots: Snapshots,
    pub(crate) registry: Registry,
    pub(crate) cache: Cache,
    pub(crate) config: CommandConfig,
}

pub(crate) type Reply = Result<CommandOutcome, ErrorBody>;

/// Where the worker reads snapshots and how it asks for new ones.
#[derive(Debug, Clone)]
pub struct Snapshots {
    pub store: SnapshotStore,
    pub client: async_nats::Client,
    /// Ask the snapshotter for a snapshot when a load takes longer.
    pub slow_load: Option<std::time::Duration>,
}

/// Longest a command may take once its aggregate's turn came (loading,
/// deciding, appending, retries after conflicts), whatever the event store
/// does: past it the command is answered `unavailable`. Each store call is
/// bounded by `nats.request_timeout_ms` already; this bounds their sum, so
/// a store that answers slowly, or not at all (a stream that lost its
/// leader), never makes a client wait longer (docs/PROTOCOL.md, "Read-only
/// mode").
pub const COMMAND_DEADLINE: std::time::Duration = std::time::Duration::from_secs(10);

/// `jetsource.snapshot.request.<type>.<id>`: asks the snapshotter for a
/// snapshot of one aggregate now.
pub fn snapshot_request_subject(aggregate_type: &str, aggregate_id: &str) -> String {
    format!("jetsource.snapshot.request.{aggregate_type}.{aggregate_id}")
}

fn unavailable(e: &StoreError) -> ErrorBody {
    ErrorBody::new(ErrorCode::Unavailable, e.to_string())
}

pub(crate) fn store_failure(e: StoreError) -> ErrorBody {
    match e.kind() {
        StoreErrorKind::Unavailable => unavailable(&e),
        StoreErrorKind::TooLarge => ErrorBody::invalid(e.to_string()),
        _ => {
            tracing::error!(error = %e, "event store failure");
            ErrorBody::new(ErrorCode::Internal, e.to_string())
        }
    }
}

fn load_failure(e: LoadError) -> ErrorBody {
    match e {
        LoadError::Store(e) => store_failure(e),
        LoadError::Decode { .. } => {
            tracing::error!(error = %e, "stored events cannot be decoded");
            ErrorBody::new(ErrorCode::Internal, e.to_string())
        }
        LoadError::Tampered { .. } => {
            tracing::error!(error = %e, "history failed its integrity check");
            ErrorBody::new(ErrorCode::Tampered, e.to_string())
        }
    }
}

/// Parses a request; errors name the offending field (`data.amount: ...`).
fn parse_request(payload: &[u8]) -> Result<CommandRequest, String> {
    let mut decoder = serde_json::Deserializer::from_slice(payload);
    let request = serde_path_to_error::deserialize(&mut decoder).map_err(|e| e.to_string())?;
    decoder.end().map_err(|e| e.to_string())?;
    Ok(request)
}

pub(crate) fn reply_event(event_type: &str, data: &[u8]) -> ReplyEvent {
    ReplyEvent {
        event_type: event_type.to_owned(),
        data: serde_json::from_slice(data).unwrap_or(Value::Null),
    }
}

pub(crate) fn outcome_from_events(events: &[RecordedEvent]) -> CommandOutcome {
    let last = events.last();
    CommandOutcome {
        version: last.map_or(0, |e| e.aggregate_version),
        sequence: last.map_or(0, |e| e.sequence),
        events: events
            .iter()
            .map(|e| reply_event(&e.event_type, &e.data))
            .collect(),
        others: Vec::new(),
        duplicate: false,
    }
}

impl Worker {
    pub fn new(
        store: EventStore,
        snapshots: Snapshots,
        registry: Registry,
        config: CommandConfig,
    ) -> Self {
        Self {
            store,
            snapshots,
            registry,
            cache: Cache::new(config.cache_capacity),
            config,
        }
    }

    pub fn aggregate_types(&self) -> Vec<&'static str> {
        self.registry.types().collect()
    }

    /// Handles one request. Never panics on input and never appends
    /// anything for a request it refuses. Counted and timed
    /// (docs/METRICS.md), under labels from the registry only.
    pub async fn handle(&self, subject: &str, payload: &[u8]) -> Reply {
        let started = std::time::Instant::now();
        let mut labels = (metrics::UNKNOWN, metrics::UNKNOWN.to_owned());
        let reply = self.handle_labelled(subject, payload, &mut labels).await;
        let (aggregate_type, command_type) = labels;
        ::metrics::counter!(
            metrics::COMMANDS,
            "aggregate_type" => aggregate_type,
            "command_type" => command_type,
            "outcome" => metrics::outcome(&reply),
        )
        .increment(1);
        ::metrics::histogram!(metrics::COMMAND_DURATION, "aggregate_type" => aggregate_type)
            .record(started.elapsed().as_secs_f64());
        reply
    }

    /// [`Worker::handle`]; sets `labels` to the aggregate type and command
    /// type once each is known to be registered.
    async fn handle_labelled(
        &self,
        subject: &str,
        payload: &[u8],
        labels: &mut (&'static str, String),
    ) -> Reply {
        self.cache.drop_all_before(self.store.privacy().epoch());
        let (aggregate_type, aggregate_id) = parse_command_subject(subject)?;
        let aggregate = self.registry.get(aggregate_type).ok_or_else(|| {
            ErrorBody::invalid(format!(
                "unknown aggregate type {aggregate_type:?}; known types: {}",
                self.aggregate_types().join(", ")
            ))
        })?;
        labels.0 = aggregate.aggregate_type();
        if payload.len() > self.config.max_request_bytes {
            return Err(ErrorBody::invalid(format!(
                "request body is {} bytes, the limit is {} (command.max_request_bytes)",
                payload.len(),
                self.config.max_request_bytes
            )));
        }
        let request = parse_request(payload)
            .map_err(|e| ErrorBody::invalid(format!("request body is not a valid command: {e}")))?;
        if !(request.data.is_object() || request.data.is_null()) {
            return Err(ErrorBody::invalid(
                "\"data\" must be a JSON object with the command's fields",
            ));
        }
        if let Some(id) = &request.command_id {
            check_client_id("command_id", id)?;
        }
        if let Some(id) = &request.correlation_id {
            check_client_id("correlation_id", id)?;
        }
        let span = tracing::info_span!(
            "command",
            aggregate = %format_args!("{aggregate_type}.{aggregate_id}"),
            command = %request.command_type,
            command_id = request.command_id.as_deref().unwrap_or(""),
            sequence = tracing::field::Empty,
        );
        let command = aggregate
            .parse(&request.command_type, request.data.clone())
            .map_err(|e| match e {
                DecideError::Malformed(message) => ErrorBody::invalid(message),
                DecideError::Domain(e) => ErrorBody::invalid(e.message),
            })?;
        labels.1 = request.command_type.clone();
        let involved = aggregate.involves(&command);
        let reply = if involved.is_empty() {
            self.decide_and_append(aggregate, aggregate_id, &request, &command)
                .instrument(span.clone())
                .await
        } else {
            let cmd = Command::new(aggregate.as_ref(), aggregate_id, &request, &command);
            self.decide_over_several(&cmd, involved)
                .instrument(span.clone())
                .await
        };
        match &reply {
            Ok(outcome) => {
                span.record("sequence", outcome.sequence);
                tracing::debug!(parent: &span, version = outcome.version, events = outcome.events.len(), duplicate = outcome.duplicate, "accepted");
            }
            Err(e) if matches!(e.code, ErrorCode::Unavailable | ErrorCode::Internal) => {
                tracing::warn!(parent: &span, code = %e.code, error = %e.message, "failed");
            }
            Err(e) => tracing::debug!(parent: &span, code = %e.code, error = %e.message, "refused"),
        }
        reply
    }

    pub(crate) async fn catch_up(
        &self,
        slot: &mut Slot,
        aggregate: &dyn DynAggregate,
        aggregate_id: &str,
    ) -> Result<u64, ErrorBody> {
        let result = if slot.loaded.is_some() { "hit" } else { "miss" };
        ::metrics::counter!(metrics::CACHE_LOOKUPS, "result" => result).increment(1);
        let applied = match slot.loaded.as_mut() {
            Some(loaded) => loaded
                .catch_up(&self.store, aggregate, aggregate_id, Until::End)
                .await
                .map_err(load_failure)?,
            None => {
                // First load: from the latest snapshot plus the tail.
                let started = std::time::Instant::now();
                let (loaded, used) = Loaded::load_with_snapshot(
                    &self.store,
                    &self.snapshots.store,
                    aggregate,
                    aggregate_id,
                    Until::End,
                )
                .await
                .map_err(load_failure)?;
                let from = match used {
                    SnapshotUse::Used { version } => version,
                    _ => 0,
                };
                ::metrics::histogram!(metrics::SNAPSHOT_TAIL, "aggregate_type" => aggregate.aggregate_type())
                    .record(loaded.version.saturating_sub(from) as f64);
                let took = started.elapsed();
                if self.snapshots.slow_load.is_some_and(|limit| took > limit) {
                    // Ask the snapshotter for a snapshot; fire and forget.
                    let subject =
                        snapshot_request_subject(aggregate.aggregate_type(), aggregate_id);
                    let _ = self.snapshots.client.publish(subject, "".into()).await;
                    tracing::debug!(
                        ?took,
                        version = loaded.version,
                        "slow load; snapshot requested"
                    );
                }
                let applied = loaded.version;
                slot.loaded = Some(loaded);
                applied
            }
        };
        slot.stale = false;
        Ok(applied)
    }

    /// Brings the slot up to everything the stream leader has for this
    /// aggregate (see [`Loaded::catch_up_confirmed`]); always `Ok(true)`.
    pub(crate) async fn confirm(
        &self,
        slot: &mut Slot,
        aggregate: &dyn DynAggregate,
        aggregate_id: &str,
    ) -> Result<bool, ErrorBody> {
        if slot.loaded.is_none() {
            self.catch_up(slot, aggregate, aggregate_id).await?;
        }
        let loaded = slot.loaded.as_mut().expect("loaded above");
        loaded
            .catch_up_confirmed(&self.store, aggregate, aggregate_id, Until::End)
            .await
            .map_err(load_failure)?;
        slot.stale = false;
        Ok(true)
    }

    /// The reply a command already stored got the first time, marked
    /// `duplicate`. Every answer from history (the aggregate's recent
    /// command ids, a JetStream duplicate ack, error 10201) comes from here.
    async fn recorded_outcome(
        &self,
        aggregate: &dyn DynAggregate,
        aggregate_id: &str,
        command_id: &str,
        first_sequence: Option<u64>,
    ) -> Reply {
        let events = self
            .recorded_events(
                aggregate.aggregate_type(),
                aggregate_id,
                command_id,
                first_sequence,
            )
            .await?;
        Ok(CommandOutcome {
            duplicate: true,
            ..outcome_from_events(&events)
        })
    }

    /// Counts a conflict (another writer appended first); `Err` once the
    /// command has been decided again `command.max_retries` times.
    pub(crate) fn conflicted(
        &self,
        cmd: &Command<'_>,
        conflicts: &mut u32,
    ) -> Result<(), ErrorBody> {
        *conflicts += 1;
        ::metrics::counter!(metrics::COMMAND_CONFLICTS, "aggregate_type" => cmd.aggregate.aggregate_type())
            .increment(1);
        if *conflicts > self.config.max_retries {
            return Err(cmd.gave_up(*conflicts));
        }
        tracing::debug!(
            attempt = *conflicts,
            "conflict, deciding again on fresh state"
        );
        Ok(())
    }

    /// The events a command stored on the aggregate it was sent to, read
    /// from its first event (at `first_sequence`, when known) or found in
    /// the aggregate's history.
    pub(crate) async fn recorded_events(
        &self,
        aggregate_type: &str,
        aggregate_id: &str,
        command_id: &str,
        first_sequence: Option<u64>,
    ) -> Result<Vec<RecordedEvent>, ErrorBody> {
        let found = match first_sequence {
            Some(seq) => Some(
                self.store
                    .read_command(aggregate_type, aggregate_id, seq, command_id)
                    .await
                    .map_err(store_failure)?,
            ),
            None => self
                .store
                .find_command(aggregate_type, aggregate_id, command_id)
                .await
                .map_err(store_failure)?,
        };
        found.ok_or_else(|| {
            ErrorBody::new(
                ErrorCode::Unavailable,
                format!("command {command_id} is stored but its events cannot be read yet; retry"),
            )
        })
    }

    /// Decides the command on the aggregate's state and appends its events,
    /// deciding again on fresh state after a conflict (up to
    /// `command.max_retries` times).
    async fn decide_and_append(
        &self,
        aggregate: &Arc<dyn DynAggregate>,
        aggregate_id: &str,
        request: &CommandRequest,
        command: &ParsedCommand,
    ) -> Reply {
        let cmd = Command::new(aggregate.as_ref(), aggregate_id, request, command);
        let slot = self.cache.slot(&cmd.key());
        let mut slot = slot.lock().await;
        let decided = tokio::time::timeout(
            COMMAND_DEADLINE,
            self.decide_and_append_in(&cmd, &mut slot, aggregate_id),
        )
        .await;
        decided.unwrap_or_else(|_| {
            // Cut short anywhere: the store may hold events the slot lacks
            // (an append in flight may have been stored). The slot's state
            // itself is whole: events are folded in between awaits.
            slot.stale = true;
            Err(ErrorBody::new(
                ErrorCode::Unavailable,
                format!(
                    "the event store did not answer within {COMMAND_DEADLINE:?}; the command may or may not have been stored: retry with the same command_id"
                ),
            ))
        })
    }

    /// [`Worker::decide_and_append`] on the aggregate's locked slot.
    async fn decide_and_append_in(
        &self,
        cmd: &Command<'_>,
        slot: &mut Slot,
        aggregate_id: &str,
    ) -> Reply {
        let mut conflicts = 0;
        // Whether the state holds every event the stream leader had during
        // this request. Any answer that the server's expected-sequence check
        // does not guard (a refusal, a no-op, a version mismatch) is given
        // only on confirmed state, never on a possibly stale cache or on a
        // replica that lags. (A command id missing from a stale cache is
        // guarded: its append fails the sequence check.)
        let mut confirmed = false;
        loop {
            if slot.loaded.is_none() || slot.stale {
                self.catch_up(slot, cmd.aggregate, aggregate_id).await?;
            }
            let loaded = slot.loaded.as_ref().expect("loaded above");
            match cmd.decide(loaded, confirmed) {
                Step::Answer(reply) => return reply,
                Step::Recorded { command_id, first } => {
                    return self
                        .recorded_outcome(cmd.aggregate, aggregate_id, command_id, Some(first))
                        .await
                }
                Step::Confirm => {
                    confirmed = self.confirm(slot, cmd.aggregate, aggregate_id).await?;
                }
                Step::Append(decision) => {
                    if let Some(reply) = self.append(cmd, slot, decision).await {
                        return reply;
                    }
                    self.conflicted(cmd, &mut conflicts)?;
                }
            }
        }
    }

    /// Appends the events of `decision`, guarded by the last sequence of
    /// the state it was taken on, and updates the slot. `None` when another
    /// writer got there first (the slot is marked stale: decide again).
    async fn append(
        &self,
        cmd: &Command<'_>,
        slot: &mut Slot,
        decision: Decision,
    ) -> Option<Reply> {
        let loaded = slot.loaded.as_ref().expect("decided on a loaded state");
        let stored = match self
            .sealed(cmd.aggregate, cmd.aggregate_id, &decision.events)
            .await
        {
            Ok(stored) => stored,
            Err(e) => return Some(Err(e)),
        };
        let append = Append {
            aggregate_type: cmd.aggregate.aggregate_type(),
            aggregate_id: cmd.aggregate_id,
            expected_last_sequence: loaded.last_sequence,
            version: loaded.version,
            events: &stored,
            schema_version: cmd.aggregate.event_schema_version(),
            command_id: cmd.command_id(),
            correlation_id: &cmd.correlation_id,
            causation_id: &cmd.causation_id,
            command_aggregate: None,
            previous_hash: loaded.last_hash,
        };
        let started = std::time::Instant::now();
        let appended = self
            .store
            .append(&append)
            .instrument(tracing::info_span!(
                "append",
                events = decision.events.len()
            ))
            .await;
        ::metrics::histogram!(metrics::APPEND_DURATION).record(started.elapsed().as_secs_f64());
        if !matches!(&appended, Ok(appended) if !appended.duplicate) {
            // Whatever happened, the store may hold events the slot lacks
            // (a timeout may still have stored them).
            slot.stale = true;
        }
        Some(match appended {
            Ok(appended) if appended.duplicate => {
                // Another copy (or an earlier attempt of ours that timed
                // out) stored this command already.
                let first = Some(appended.first_sequence);
                self.recorded_outcome(cmd.aggregate, cmd.aggregate_id, cmd.resent_id(), first)
                    .await
            }
            Ok(appended) => Ok(applied(cmd, slot, decision, appended)),
            Err(e) if e.kind() == StoreErrorKind::WrongLastSequence => return None,
            Err(e) if e.kind() == StoreErrorKind::DuplicateCommand => {
                self.resent_batch(cmd, slot).await
            }
            Err(e) => Err(store_failure(e)),
        })
    }

    /// `events` of `<aggregate>.<id>` as they are stored: the personal
    /// fields the aggregate marks sealed with their subject's key
    /// (docs/ARCHITECTURE.md, "Crypto-shredding"). The events as decided
    /// stay for the reply and the cached state.
    pub(crate) async fn sealed(
        &self,
        aggregate: &dyn DynAggregate,
        aggregate_id: &str,
        events: &[NewEvent],
    ) -> Result<Vec<NewEvent>, ErrorBody> {
        let mut stored = events.to_vec();
        for event in &mut stored {
            let Some(rule) = aggregate.personal_data(&event.event_type) else {
                continue;
            };
            self.store
                .privacy()
                .seal(aggregate.aggregate_type(), aggregate_id, event, rule)
                .await
                .map_err(|e| match e {
                    PrivacyError::Forgotten(_) => {
                        ErrorBody::new(ErrorCode::Rejected, e.to_string())
                    }
                    // The subject comes from the command's data.
                    PrivacyError::InvalidSubject(_) => ErrorBody::invalid(e.to_string()),
                    PrivacyError::Data(_) => {
                        tracing::error!(error = %e, "cannot seal personal data");
                        ErrorBody::new(
                            ErrorCode::Internal,
                            format!("cannot seal the personal data of {}: {e}", event.event_type),
                        )
                    }
                    PrivacyError::Store(e) => store_failure(e),
                })?;
        }
        Ok(stored)
    }

    /// The outcome of a multi-event command the server refused as a resend
    /// (error 10201, which does not say where the original is): found in
    /// the aggregate's history after a catch-up.
    async fn resent_batch(&self, cmd: &Command<'_>, slot: &mut Slot) -> Reply {
        let command_id = cmd.resent_id();
        self.catch_up(slot, cmd.aggregate, cmd.aggregate_id).await?;
        let first = slot
            .loaded
            .as_ref()
            .and_then(|l| l.recorded_command(command_id));
        self.recorded_outcome(cmd.aggregate, cmd.aggregate_id, command_id, first)
            .await
    }
}

/// Takes an appended decision into the slot's state and makes the reply.
fn applied(
    cmd: &Command<'_>,
    slot: &mut Slot,
    decision: Decision,
    appended: Appended,
) -> CommandOutcome {
    let loaded = slot.loaded.as_mut().expect("decided on a loaded state");
    let version = loaded.version + decision.events.len() as u64;
    let events = decision
        .events
        .iter()
        .map(|e| reply_event(&e.event_type, &e.data))
        .collect();
    loaded.appended(decision.state, decision.events.len(), &appended);
    if let Some(command_id) = cmd.command_id() {
        loaded.remember_command(command_id, appended.first_sequence);
    }
    CommandOutcome {
        version,
        sequence: appended.last_sequence,
        events,
        others: Vec::new(),
        duplicate: false,
    }
}

/// One command being decided, with what every step needs.
pub(crate) struct Command<'a> {
    pub(crate) aggregate: &'a dyn DynAggregate,
    pub(crate) aggregate_id: &'a str,
    pub(crate) request: &'a CommandRequest,
    pub(crate) command: &'a ParsedCommand,
    /// The command that caused the events: its id, or a fresh one.
    pub(crate) causation_id: String,
    /// The wider flow: the client's, or else this command.
    pub(crate) correlation_id: String,
}

/// What a decision on the current state leads to.
enum Step<'a> {
    /// The answer.
    Answer(Reply),
    /// The command is in the aggregate's history already, first event at
    /// stream sequence `first`: answer with its original outcome.
    Recorded { command_id: &'a str, first: u64 },
    /// The answer would not be guarded by the server: confirm the state
    /// with the stream leader, then decide again.
    Confirm,
    /// Append these events.
    Append(Decision),
}

impl<'a> Command<'a> {
    pub(crate) fn new(
        aggregate: &'a dyn DynAggregate,
        aggregate_id: &'a str,
        request: &'a CommandRequest,
        command: &'a ParsedCommand,
    ) -> Self {
        let causation_id = request
            .command_id
            .clone()
            .unwrap_or_else(|| uuid::Uuid::now_v7().to_string());
        let correlation_id = request
            .correlation_id
            .clone()
            .unwrap_or_else(|| causation_id.clone());
        Self {
            aggregate,
            aggregate_id,
            request,
            command,
            causation_id,
            correlation_id,
        }
    }

    /// The aggregate's key in the cache.
    pub(crate) fn key(&self) -> String {
        format!("{}.{}", self.aggregate.aggregate_type(), self.aggregate_id)
    }

    pub(crate) fn command_id(&self) -> Option<&'a str> {
        self.request.command_id.as_deref()
    }

    /// The id of a command the store found stored already: only commands
    /// with an id are deduplicated.
    fn resent_id(&self) -> &'a str {
        self.command_id()
            .expect("only commands with an id deduplicate")
    }

    /// Decides on `loaded`. An answer the server does not guard (a
    /// version mismatch, a refusal, a no-op) is given only when the state
    /// is `confirmed`; otherwise the step is [`Step::Confirm`].
    fn decide(&self, loaded: &Loaded, confirmed: bool) -> Step<'a> {
        let unless_unconfirmed = |reply: Reply| {
            if confirmed {
                Step::Answer(reply)
            } else {
                Step::Confirm
            }
        };
        if let Some(command_id) = self.command_id() {
            if let Some(first) = loaded.recorded_command(command_id) {
                return Step::Recorded { command_id, first };
            }
        }
        if let Some(expected) = self.request.expected_version {
            if loaded.version != expected {
                return unless_unconfirmed(Err(self.version_mismatch(expected, loaded.version)));
            }
        }
        let decision = match self.aggregate.decide(&loaded.state, self.command) {
            Ok(decision) => decision,
            Err(DecideError::Malformed(message)) => {
                return Step::Answer(Err(ErrorBody::invalid(message)))
            }
            Err(DecideError::Domain(e)) if e.kind == DomainErrorKind::Invalid => {
                return Step::Answer(Err(ErrorBody::invalid(e.message)))
            }
            Err(DecideError::Domain(e)) => {
                return unless_unconfirmed(Err(ErrorBody::new(ErrorCode::Rejected, e.message)))
            }
        };
        if decision.events.is_empty() {
            return unless_unconfirmed(Ok(CommandOutcome {
                version: loaded.version,
                sequence: loaded.last_sequence,
                events: vec![],
                others: Vec::new(),
                duplicate: false,
            }));
        }
        Step::Append(decision)
    }

    pub(crate) fn version_mismatch(&self, expected: u64, version: u64) -> ErrorBody {
        let (aggregate_type, aggregate_id) = (self.aggregate.aggregate_type(), self.aggregate_id);
        ErrorBody::new(
            ErrorCode::Conflict,
            format!(
                "expected version {expected}, but {aggregate_type} {aggregate_id} is at version {version}; reload and decide again"
            ),
        )
    }

    pub(crate) fn gave_up(&self, conflicts: u32) -> ErrorBody {
        let (aggregate_type, aggregate_id) = (self.aggregate.aggregate_type(), self.aggregate_id);
        ErrorBody::new(
            ErrorCode::Conflict,
            format!(
                "{aggregate_type} {aggregate_id} kept changing under concurrent writers; gave up after {conflicts} attempts, retry later"
            ),
        )
    }
}
