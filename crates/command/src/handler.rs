//! One command, from request bytes to reply.

use std::sync::Arc;

use jetsource_core::aggregate::{
    DecideError, DomainErrorKind, DynAggregate, ParsedCommand, Registry,
};
use jetsource_core::config::CommandConfig;
use jetsource_core::envelope::RecordedEvent;
use jetsource_core::loader::{LoadError, Loaded, Until};
use jetsource_core::protocol::{
    check_client_id, parse_command_subject, CommandOutcome, CommandRequest, ErrorBody, ErrorCode,
    ReplyEvent,
};
use jetsource_core::snapshot::SnapshotStore;
use jetsource_core::store::{Append, EventStore, StoreError, StoreErrorKind};
use serde_json::Value;
use tracing::Instrument;

use crate::cache::{Cache, Slot};

/// Decides commands; shared by all request tasks of one process.
#[derive(Debug)]
pub struct Worker {
    store: EventStore,
    snapshots: Snapshots,
    registry: Registry,
    cache: Cache,
    config: CommandConfig,
}

type Reply = Result<CommandOutcome, ErrorBody>;

/// Where the worker reads snapshots and how it asks for new ones.
#[derive(Debug, Clone)]
pub struct Snapshots {
    pub store: SnapshotStore,
    pub client: async_nats::Client,
    /// Ask the snapshotter for a snapshot when a load takes longer.
    pub slow_load: Option<std::time::Duration>,
}

/// `jetsource.snapshot.request.<type>.<id>`: asks the snapshotter for a
/// snapshot of one aggregate now.
pub fn snapshot_request_subject(aggregate_type: &str, aggregate_id: &str) -> String {
    format!("jetsource.snapshot.request.{aggregate_type}.{aggregate_id}")
}

fn unavailable(e: &StoreError) -> ErrorBody {
    ErrorBody::new(ErrorCode::Unavailable, e.to_string())
}

fn store_failure(e: StoreError) -> ErrorBody {
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
    }
}

/// Parses a request; errors name the offending field (`data.amount: ...`).
fn parse_request(payload: &[u8]) -> Result<CommandRequest, String> {
    let mut decoder = serde_json::Deserializer::from_slice(payload);
    let request = serde_path_to_error::deserialize(&mut decoder).map_err(|e| e.to_string())?;
    decoder.end().map_err(|e| e.to_string())?;
    Ok(request)
}

fn reply_event(event_type: &str, data: &[u8]) -> ReplyEvent {
    ReplyEvent {
        event_type: event_type.to_owned(),
        data: serde_json::from_slice(data).unwrap_or(Value::Null),
    }
}

fn outcome_from_events(events: &[RecordedEvent]) -> CommandOutcome {
    let last = events.last();
    CommandOutcome {
        version: last.map_or(0, |e| e.aggregate_version),
        sequence: last.map_or(0, |e| e.sequence),
        events: events
            .iter()
            .map(|e| reply_event(&e.event_type, &e.data))
            .collect(),
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
    /// anything for a request it refuses.
    pub async fn handle(&self, subject: &str, payload: &[u8]) -> Reply {
        let (aggregate_type, aggregate_id) = parse_command_subject(subject)?;
        let aggregate = self.registry.get(aggregate_type).ok_or_else(|| {
            ErrorBody::invalid(format!(
                "unknown aggregate type {aggregate_type:?}; known types: {}",
                self.aggregate_types().join(", ")
            ))
        })?;
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
        let reply = self
            .decide_and_append(aggregate, aggregate_id, &request, &command)
            .instrument(span.clone())
            .await;
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

    async fn catch_up(
        &self,
        slot: &mut Slot,
        aggregate: &dyn DynAggregate,
        aggregate_id: &str,
    ) -> Result<u64, ErrorBody> {
        let applied = match slot.loaded.as_mut() {
            Some(loaded) => loaded
                .catch_up(&self.store, aggregate, aggregate_id, Until::End)
                .await
                .map_err(load_failure)?,
            None => {
                // First load: from the latest snapshot plus the tail.
                let started = std::time::Instant::now();
                let (loaded, _) = Loaded::load_with_snapshot(
                    &self.store,
                    &self.snapshots.store,
                    aggregate,
                    aggregate_id,
                    Until::End,
                )
                .await
                .map_err(load_failure)?;
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
    async fn confirm(
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
        let aggregate_type = aggregate.aggregate_type();
        let events = match first_sequence {
            Some(seq) => self
                .store
                .read_command(aggregate_type, aggregate_id, seq, command_id)
                .await
                .map_err(store_failure)?,
            None => self
                .store
                .find_command(aggregate_type, aggregate_id, command_id)
                .await
                .map_err(store_failure)?
                .ok_or_else(|| {
                    ErrorBody::new(
                        ErrorCode::Unavailable,
                        format!("command {command_id} is stored but its events cannot be read yet; retry"),
                    )
                })?,
        };
        Ok(CommandOutcome {
            duplicate: true,
            ..outcome_from_events(&events)
        })
    }

    async fn decide_and_append(
        &self,
        aggregate: &Arc<dyn DynAggregate>,
        aggregate_id: &str,
        request: &CommandRequest,
        command: &ParsedCommand,
    ) -> Reply {
        let aggregate = aggregate.as_ref();
        let aggregate_type = aggregate.aggregate_type();
        let slot = self.cache.slot(&format!("{aggregate_type}.{aggregate_id}"));
        let mut slot = slot.lock().await;
        let command_id = request.command_id.as_deref();
        // Causation: the command that caused these events. Correlation: the
        // wider flow, the client's or else this command.
        let causation_id = command_id
            .map(str::to_owned)
            .unwrap_or_else(|| uuid::Uuid::now_v7().to_string());
        let correlation_id = request
            .correlation_id
            .clone()
            .unwrap_or_else(|| causation_id.clone());

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
                self.catch_up(&mut slot, aggregate, aggregate_id).await?;
            }
            let loaded = slot.loaded.as_ref().expect("loaded above");

            if let Some(command_id) = command_id {
                if let Some(first) = loaded.recorded_command(command_id) {
                    return self
                        .recorded_outcome(aggregate, aggregate_id, command_id, Some(first))
                        .await;
                }
            }

            if let Some(expected) = request.expected_version {
                if loaded.version != expected {
                    if !confirmed {
                        confirmed = self.confirm(&mut slot, aggregate, aggregate_id).await?;
                        continue;
                    }
                    return Err(ErrorBody::new(
                        ErrorCode::Conflict,
                        format!(
                            "expected version {expected}, but {aggregate_type} {aggregate_id} is at version {}; reload and decide again",
                            loaded.version
                        ),
                    ));
                }
            }

            let decision = match aggregate.decide(&loaded.state, command) {
                Ok(decision) => decision,
                Err(DecideError::Malformed(message)) => return Err(ErrorBody::invalid(message)),
                Err(DecideError::Domain(e)) if e.kind == DomainErrorKind::Invalid => {
                    return Err(ErrorBody::invalid(e.message))
                }
                Err(DecideError::Domain(e)) => {
                    if !confirmed {
                        confirmed = self.confirm(&mut slot, aggregate, aggregate_id).await?;
                        continue;
                    }
                    return Err(ErrorBody::new(ErrorCode::Rejected, e.message));
                }
            };

            if decision.events.is_empty() {
                if !confirmed {
                    confirmed = self.confirm(&mut slot, aggregate, aggregate_id).await?;
                    continue;
                }
                return Ok(CommandOutcome {
                    version: loaded.version,
                    sequence: loaded.last_sequence,
                    events: vec![],
                    duplicate: false,
                });
            }

            let append = Append {
                aggregate_type,
                aggregate_id,
                expected_last_sequence: loaded.last_sequence,
                version: loaded.version,
                events: &decision.events,
                schema_version: aggregate.event_schema_version(),
                command_id,
                correlation_id: &correlation_id,
                causation_id: &causation_id,
            };
            match self.store.append(&append).await {
                Ok(appended) if appended.duplicate => {
                    // Another copy (or an earlier attempt of ours that timed
                    // out) stored this command already.
                    slot.stale = true;
                    let command_id = command_id.expect("only commands with an id deduplicate");
                    return self
                        .recorded_outcome(
                            aggregate,
                            aggregate_id,
                            command_id,
                            Some(appended.first_sequence),
                        )
                        .await;
                }
                Ok(appended) => {
                    let version = loaded.version + decision.events.len() as u64;
                    let events = decision
                        .events
                        .iter()
                        .map(|e| reply_event(&e.event_type, &e.data))
                        .collect();
                    let loaded = slot.loaded.as_mut().expect("loaded above");
                    loaded.state = decision.state;
                    loaded.version = version;
                    loaded.last_sequence = appended.last_sequence;
                    if let Some(command_id) = command_id {
                        loaded.remember_command(command_id, appended.first_sequence);
                    }
                    return Ok(CommandOutcome {
                        version,
                        sequence: appended.last_sequence,
                        events,
                        duplicate: false,
                    });
                }
                Err(e) if e.kind() == StoreErrorKind::WrongLastSequence => {
                    slot.stale = true;
                    conflicts += 1;
                    if conflicts > self.config.max_retries {
                        return Err(ErrorBody::new(
                            ErrorCode::Conflict,
                            format!(
                                "{aggregate_type} {aggregate_id} kept changing under concurrent writers; gave up after {conflicts} attempts, retry later"
                            ),
                        ));
                    }
                    tracing::debug!(
                        attempt = conflicts,
                        "conflict, deciding again on fresh state"
                    );
                }
                Err(e) if e.kind() == StoreErrorKind::DuplicateCommand => {
                    slot.stale = true;
                    let command_id = command_id.expect("only commands with an id deduplicate");
                    self.catch_up(&mut slot, aggregate, aggregate_id).await?;
                    let first = slot
                        .loaded
                        .as_ref()
                        .and_then(|l| l.recorded_command(command_id));
                    return self
                        .recorded_outcome(aggregate, aggregate_id, command_id, first)
                        .await;
                }
                Err(e) => {
                    // A timeout may still have stored the events: reload
                    // before trusting the cache again.
                    slot.stale = true;
                    return Err(store_failure(e));
                }
            }
        }
    }
}
