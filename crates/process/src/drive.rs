//! Driving one process instance: from its stored state to everything that
//! follows from it, one step at a time.
//!
//! A step looks, in this order, for:
//! 1. events of the followed aggregate after the last one the instance
//!    observed (read confirmed by the stream leader, so a lagging replica
//!    never hides one), handled in their order;
//! 2. the deadline that woke it, if the instance still waits for it at
//!    that very time;
//! 3. commands pending: sent all at once, each with the command id
//!    `<process>:<id>:<key>`, and their answers handled.
//!
//! Whatever a step decides is appended to the instance's history in one
//! append guarded by its expected sequence; if another copy drove the
//! instance meanwhile the append is refused, the instance reloaded and the
//! step taken again. Nothing is kept outside the history, so a copy that
//! dies anywhere leaves nothing behind that another cannot redo: inputs
//! handled are in the history, and a command sent but not answered is sent
//! again with the same id, which the command worker answers from history.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use jetsource_core::aggregate::process::{
    Answer, AnsweredEvent, Deadline, DynProcess, Observed, Outgoing,
};
use jetsource_core::aggregate::{DynAggregate, NewEvent, Registry, StoredEvent};
use jetsource_core::deadlines::{Deadlines, Due};
use jetsource_core::loader::{LoadError, Loaded, Until};
use jetsource_core::protocol::{decode_reply, CommandOutcome, CommandRequest, ErrorCode};
use jetsource_core::store::{Append, EventStore, StoreError, StoreErrorKind};

/// Steps one drive takes at most: a process whose answers keep producing
/// new pending commands is cut off here (and driven again on its next
/// input) rather than spinning.
const MAX_STEPS: usize = 64;
/// Followed events that produced nothing are recorded as observed once
/// this many piled up (until then a copy remembers how far it read, and
/// another reads them again).
const RECORD_OBSERVED_AFTER: u64 = 64;

/// Sends of one command within one drive before the drive gives up (the
/// wake-up is delivered again later).
const SEND_ATTEMPTS: u32 = 5;

#[derive(Debug, thiserror::Error)]
pub enum DriveError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Load(#[from] LoadError),
    /// A followed event the process cannot read: it stays unhandled (and
    /// the wake-up is delivered again) until the code is fixed.
    #[error("cannot handle an event of {0}: {1}")]
    Decode(String, String),
    /// A command got no definite answer (no worker, timeouts, `internal`).
    #[error("command {command_id} to {target} got no definite answer: {why}")]
    Unanswered {
        command_id: String,
        target: String,
        why: String,
    },
}

/// What woke an instance.
#[derive(Debug, Clone)]
pub enum Wake {
    /// An event of the followed aggregate.
    Event,
    /// A deadline fired.
    Deadline(Due),
}

/// Serializes the drives of one instance within this copy.
#[derive(Debug, Default)]
struct Locks(Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>);

/// Instances this copy drove recently, as it left them: the next drive
/// only catches up (one round trip to the stream leader) instead of
/// loading the whole history.
const CACHED_INSTANCES: usize = 10_000;

/// A cached instance.
#[derive(Debug, Clone)]
struct Cached {
    loaded: Loaded,
    /// Followed events up to this stream sequence produced nothing for the
    /// instance at `loaded.version` and were not recorded: the next drive
    /// at that version reads after them instead of handling them again.
    skipped_to: Option<(u64, u64)>,
}

impl Locks {
    fn get(&self, key: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        map.retain(|_, lock| Arc::strong_count(lock) > 1);
        map.entry(key.to_owned()).or_default().clone()
    }
}

/// Drives instances; shared by the tasks of one process worker.
#[derive(Debug)]
pub struct Driver {
    pub store: EventStore,
    pub deadlines: Deadlines,
    /// Sends the commands (request-reply on `cmd.>`).
    pub client: async_nats::Client,
    pub registry: Registry,
    pub timeout: Duration,
    locks: Locks,
    cache: Mutex<lru::LruCache<String, Cached>>,
    /// Event wake-ups that arrived while a drive of their instance was
    /// running, by instance (`<process>.<id>`): one more drive covers them.
    waiting: Mutex<HashMap<String, Vec<async_nats::jetstream::Message>>>,
}

/// One instance being driven.
struct Instance<'a> {
    process: &'a dyn DynProcess,
    aggregate: &'a dyn DynAggregate,
    id: &'a str,
    loaded: Loaded,
    /// See [`Cached::skipped_to`]: (version, sequence).
    skipped_to: Option<(u64, u64)>,
}

impl Instance<'_> {
    fn key(&self) -> String {
        format!("{}.{}", self.process.process_type(), self.id)
    }
}

/// What a step did.
enum Stepped {
    /// Appended to the instance: look again.
    Moved,
    /// Another copy appended first: reload, look again.
    Conflict,
    /// Nothing left to do.
    Idle,
}

impl Driver {
    pub fn new(
        store: EventStore,
        deadlines: Deadlines,
        client: async_nats::Client,
        registry: Registry,
        timeout: Duration,
    ) -> Self {
        Self {
            store,
            deadlines,
            client,
            registry,
            timeout,
            locks: Locks::default(),
            cache: Mutex::new(lru::LruCache::new(
                std::num::NonZeroUsize::new(CACHED_INSTANCES).expect("not zero"),
            )),
            waiting: Mutex::default(),
        }
    }

    /// Drives instance `id` of `process` until nothing follows from its
    /// state, then makes sure its deadlines are scheduled.
    pub async fn drive(
        &self,
        process: &dyn DynProcess,
        id: &str,
        wake: &Wake,
    ) -> Result<(), DriveError> {
        let process_type = process.process_type();
        let aggregate = self
            .registry
            .get(process_type)
            .expect("a registered process is an aggregate type")
            .as_ref();
        let key = format!("{process_type}.{id}");
        let lock = self.locks.get(&key);
        let _held = lock.lock().await;
        let cached = self.cache().pop(&key);
        let (mut loaded, skipped_to) = match cached {
            Some(cached) => (cached.loaded, cached.skipped_to),
            None => (
                Loaded::load(&self.store, aggregate, id, Until::End).await?,
                None,
            ),
        };
        loaded
            .catch_up_confirmed(&self.store, aggregate, id, Until::End)
            .await?;
        let mut instance = Instance {
            process,
            aggregate,
            id,
            loaded,
            skipped_to,
        };
        let waited = process.deadlines(&instance.loaded.state);
        let mut due = match wake {
            Wake::Deadline(due) => Some(due),
            Wake::Event => None,
        };
        for _ in 0..MAX_STEPS {
            match self.step(&mut instance, &mut due).await? {
                Stepped::Moved => {}
                Stepped::Conflict => {
                    instance
                        .loaded
                        .catch_up_confirmed(&self.store, aggregate, id, Until::End)
                        .await?;
                }
                Stepped::Idle => break,
            }
        }
        self.keep_deadlines(&instance, &waited).await?;
        let cached = Cached {
            loaded: instance.loaded,
            skipped_to: instance.skipped_to,
        };
        self.cache().put(key, cached);
        Ok(())
    }

    /// Event wake-ups waiting for a drive of their instance (see `wake`).
    pub fn waiting(
        &self,
    ) -> std::sync::MutexGuard<'_, HashMap<String, Vec<async_nats::jetstream::Message>>> {
        self.waiting.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn cache(&self) -> std::sync::MutexGuard<'_, lru::LruCache<String, Cached>> {
        self.cache.lock().unwrap_or_else(|p| p.into_inner())
    }

    async fn step(
        &self,
        instance: &mut Instance<'_>,
        due: &mut Option<&Due>,
    ) -> Result<Stepped, DriveError> {
        let process = instance.process;
        let follows = process.follows();
        let recorded = process.observed(&instance.loaded.state);
        let observed = recorded.map_or(0, |o| o.sequence);
        let skipped = match instance.skipped_to {
            Some((version, sequence)) if version == instance.loaded.version => sequence,
            _ => 0,
        };
        let from = observed.max(skipped) + 1;
        let followed = self
            .store
            .read_confirmed(follows, instance.id, from)
            .await?;
        if let Some(last) = followed.last() {
            let mut state = instance.loaded.state.clone();
            let mut events = Vec::new();
            for event in &followed {
                let at_ms = (event.timestamp.unix_timestamp_nanos() / 1_000_000).max(0) as u64;
                let new = process
                    .on_event(&state, event.stored(), event.aggregate_version, at_ms)
                    .map_err(|e| {
                        DriveError::Decode(format!("{follows}.{}", instance.id), e.to_string())
                    })?;
                state = fold(instance.aggregate, &state, &new)?;
                events.extend(new);
            }
            count(process, "event", followed.len());
            // Events that change nothing are not worth an append each:
            // they are recorded as observed with the next that does, or
            // once enough of them piled up (each drive reads them again).
            // Counted in followed events since the last record, read now
            // or skipped earlier: a copy without this one's memory reads
            // them all again.
            let unrecorded = last.aggregate_version - recorded.map_or(0, |o| o.version);
            if !events.is_empty() || unrecorded >= RECORD_OBSERVED_AFTER {
                let observed = Observed {
                    version: last.aggregate_version,
                    sequence: last.sequence,
                };
                events.push(observed.to_event());
                return self.append(instance, events, "event").await;
            }
            instance.skipped_to = Some((instance.loaded.version, last.sequence));
        }
        if let Some(fired) = due.take() {
            let waiting = Deadline {
                name: fired.name.clone(),
                at_ms: fired.at_ms,
            };
            if process.deadlines(&instance.loaded.state).contains(&waiting) {
                let events = process.on_deadline(&instance.loaded.state, &fired.name);
                count(process, "deadline", 1);
                if !events.is_empty() {
                    return self.append(instance, events, "deadline").await;
                }
            }
        }
        let pending = process.pending(instance.id, &instance.loaded.state);
        if pending.is_empty() {
            return Ok(Stepped::Idle);
        }
        let answers =
            futures::future::join_all(pending.iter().map(|out| self.send(instance, out))).await;
        let mut state = instance.loaded.state.clone();
        let mut events = Vec::new();
        for (out, answer) in pending.iter().zip(answers) {
            let new = process.on_answer(&state, &out.key, &answer?);
            state = fold(instance.aggregate, &state, &new)?;
            events.extend(new);
        }
        count(process, "answer", pending.len());
        if events.is_empty() {
            tracing::warn!(instance = %instance.key(), "answers changed nothing: the process keeps these commands pending");
            return Ok(Stepped::Idle);
        }
        self.append(instance, events, "answer").await
    }

    /// Appends `events` to the instance, guarded by its last sequence.
    async fn append(
        &self,
        instance: &mut Instance<'_>,
        events: Vec<NewEvent>,
        cause: &str,
    ) -> Result<Stepped, DriveError> {
        let key = instance.key();
        let appended = self
            .store
            .append(&Append {
                aggregate_type: instance.process.process_type(),
                aggregate_id: instance.id,
                expected_last_sequence: instance.loaded.last_sequence,
                version: instance.loaded.version,
                events: &events,
                schema_version: instance.aggregate.event_schema_version(),
                command_id: None,
                correlation_id: &key,
                causation_id: cause,
                command_aggregate: None,
                previous_hash: instance.loaded.last_hash,
            })
            .await;
        match appended {
            Ok(appended) => {
                let loaded = &mut instance.loaded;
                let state = fold(instance.aggregate, &loaded.state, &events)?;
                loaded.appended(state, events.len(), &appended);
                Ok(Stepped::Moved)
            }
            Err(e) if e.kind() == StoreErrorKind::WrongLastSequence => Ok(Stepped::Conflict),
            Err(e) => Err(e.into()),
        }
    }

    /// Sends one pending command until it gets a definite answer, up to
    /// [`SEND_ATTEMPTS`] times.
    async fn send(&self, instance: &Instance<'_>, out: &Outgoing) -> Result<Answer, DriveError> {
        let process_type = instance.process.process_type();
        let command_id = format!("{process_type}:{}:{}", instance.id, out.key);
        let target = format!("{}.{}", out.aggregate_type, out.aggregate_id);
        let request = CommandRequest {
            command_type: out.command_type.clone(),
            data: out.data.clone(),
            command_id: Some(command_id.clone()),
            expected_version: None,
            correlation_id: Some(instance.key()),
        };
        let body = serde_json::to_vec(&request).expect("serializes");
        let subject = format!("cmd.{target}");
        let mut why = String::new();
        let mut backoff = Duration::from_millis(100);
        for attempt in 1..=SEND_ATTEMPTS {
            let sent = self.client.request(subject.clone(), body.clone().into());
            why = match tokio::time::timeout(self.timeout, sent).await {
                Err(_) => "no reply in time".to_owned(),
                Ok(Err(e)) => e.to_string(),
                Ok(Ok(reply)) => match decode_reply::<CommandOutcome>(&reply.payload) {
                    Ok(Ok(outcome)) => {
                        let events = outcome
                            .events
                            .into_iter()
                            .map(|e| AnsweredEvent {
                                event_type: e.event_type,
                                data: e.data,
                            })
                            .collect();
                        return Ok(answered(process_type, Answer::Done { events }));
                    }
                    Ok(Err(e)) if definite(e.code) => {
                        let refused = Answer::Refused {
                            code: e.code.as_str().to_owned(),
                            message: e.message,
                        };
                        return Ok(answered(process_type, refused));
                    }
                    Ok(Err(e)) => format!("{}: {}", e.code.as_str(), e.message),
                    Err(e) => format!("unreadable reply: {e}"),
                },
            };
            tracing::debug!(%command_id, %target, attempt, %why, "no definite answer yet");
            if attempt < SEND_ATTEMPTS {
                tokio::time::sleep(backoff).await;
                backoff *= 2;
            }
        }
        ::metrics::counter!(jetsource_core::metrics::PROCESS_COMMANDS, "process" => process_type, "outcome" => "unanswered")
            .increment(1);
        Err(DriveError::Unanswered {
            command_id,
            target,
            why,
        })
    }

    /// Schedules the deadlines the instance waits for (again: publishing
    /// the same deadline twice is one schedule) and cancels those it no
    /// longer waits for. Cancelling is an economy: a deadline that fires
    /// anyway finds the instance not waiting and changes nothing.
    async fn keep_deadlines(
        &self,
        instance: &Instance<'_>,
        waited: &[Deadline],
    ) -> Result<(), DriveError> {
        let process_type = instance.process.process_type();
        let waiting = instance.process.deadlines(&instance.loaded.state);
        for deadline in &waiting {
            let due = Due {
                process: process_type.to_owned(),
                id: instance.id.to_owned(),
                name: deadline.name.clone(),
                at_ms: deadline.at_ms,
            };
            self.deadlines.schedule(&due).await?;
        }
        for gone in waited
            .iter()
            .filter(|w| !waiting.iter().any(|d| d.name == w.name))
        {
            if let Err(e) = self
                .deadlines
                .cancel(process_type, instance.id, &gone.name)
                .await
            {
                tracing::debug!(instance = %instance.key(), deadline = %gone.name, error = %e, "cannot cancel a deadline; it will fire and change nothing");
            }
        }
        Ok(())
    }
}

/// Whether an error code is a definite answer: the command was decided
/// and refused. `conflict` is not: the worker gave up deciding while the
/// target kept changing, and the same command sent again may go through.
fn definite(code: ErrorCode) -> bool {
    matches!(code, ErrorCode::Invalid | ErrorCode::Rejected)
}

fn answered(process_type: &'static str, answer: Answer) -> Answer {
    let outcome = match answer {
        Answer::Done { .. } => "done",
        Answer::Refused { .. } => "refused",
    };
    ::metrics::counter!(jetsource_core::metrics::PROCESS_COMMANDS, "process" => process_type, "outcome" => outcome)
        .increment(1);
    answer
}

fn count(process: &dyn DynProcess, kind: &'static str, n: usize) {
    ::metrics::counter!(jetsource_core::metrics::PROCESS_INPUTS, "process" => process.process_type(), "kind" => kind)
        .increment(n as u64);
}

/// `state` after `events` (as they will be stored).
fn fold(
    aggregate: &dyn DynAggregate,
    state: &jetsource_core::aggregate::State,
    events: &[NewEvent],
) -> Result<jetsource_core::aggregate::State, DriveError> {
    let mut stored = events.iter().map(|e| StoredEvent {
        event_type: &e.event_type,
        schema_version: aggregate.event_schema_version(),
        data: &e.data,
    });
    aggregate
        .fold(state, &mut stored)
        .map_err(|e| DriveError::Decode(aggregate.aggregate_type().to_owned(), e.to_string()))
}
