//! Commands that decide over several aggregates (`Aggregate::involves`).
//!
//! A transfer is sent to `cmd.account.<from>` and involves `account.<to>`.
//! The worker:
//! - locks every involved aggregate's cache slot in one canonical order
//!   (sorted by `<type>.<id>`), so `Transfer a->b` and `Transfer b->a` in
//!   one process never wait on each other in a cycle; across processes the
//!   server's expected-sequence checks decide;
//! - loads each, lets the aggregate the command was sent to decide over all
//!   their states, and appends every aggregate's events as one atomic batch
//!   (`EventStore::append_together`), each aggregate's first event guarded
//!   by its own expected last sequence: all stored or none, and refused
//!   whole when any of them changed (then all are caught up and the command
//!   is decided again, as for one aggregate);
//! - gives answers the server does not guard (refusals, no-ops, version
//!   mismatches) only on state confirmed with the stream leader, for every
//!   involved aggregate.
//!
//! The command id belongs to the aggregate the command was sent to (command
//! ids are unique per aggregate): its first event carries `Nats-Msg-Id`,
//! and it must receive at least one event, so that its history records the
//! command for resends older than the duplicate window. The events appended
//! to the others carry the same command, correlation and causation ids and
//! `Jetsource-Command-Aggregate: <type>.<id>` of the aggregate that owns
//! the command id, so the others never count it as one of their own.

use std::sync::Arc;

use jetsource_core::aggregate::{
    AggregateRef, DecideError, DomainErrorKind, DynAggregate, NewEvent, Others, State, StoredEvent,
    MAX_AGGREGATES_PER_COMMAND,
};
use jetsource_core::envelope::{event_subject, RecordedEvent};
use jetsource_core::loader::Loaded;
use jetsource_core::metrics;
use jetsource_core::protocol::{CommandOutcome, ErrorBody, ErrorCode, OtherOutcome};
use jetsource_core::store::{Append, Appended, StoreErrorKind};
use tokio::sync::OwnedMutexGuard;

use crate::cache::Slot;
use crate::handler::{
    outcome_from_events, reply_event, store_failure, Command, Reply, Worker, COMMAND_DEADLINE,
};

/// One aggregate a command decides over, its slot locked. The first member
/// is the aggregate the command was sent to.
struct Member {
    aggregate: Arc<dyn DynAggregate>,
    id: String,
    slot: OwnedMutexGuard<Slot>,
}

impl Member {
    fn loaded(&self) -> &Loaded {
        self.slot.loaded.as_ref().expect("loaded before deciding")
    }

    fn key(&self) -> String {
        format!("{}.{}", self.aggregate.aggregate_type(), self.id)
    }
}

/// What a decision over several aggregates leads to.
enum Step {
    Answer(Reply),
    /// The command is in the history of the aggregate it was sent to, its
    /// first event at this stream sequence.
    Recorded(u64),
    Confirm,
    /// Append each member's events (same order as the members), after
    /// which each is in the given state.
    Append(Vec<(Vec<NewEvent>, State)>),
}

fn internal(message: String) -> ErrorBody {
    tracing::error!(%message, "domain error in a multi-aggregate command");
    ErrorBody::new(ErrorCode::Internal, message)
}

impl Worker {
    /// Decides `cmd`, which involves the aggregates `involved` besides its
    /// own, and appends the events of all of them atomically.
    pub(crate) async fn decide_over_several(
        &self,
        cmd: &Command<'_>,
        involved: Vec<AggregateRef>,
    ) -> Reply {
        let mut members = self.lock_members(cmd, involved).await?;
        let decided =
            tokio::time::timeout(COMMAND_DEADLINE, self.decide_members(cmd, &mut members)).await;
        decided.unwrap_or_else(|_| {
            for member in &mut members {
                member.slot.stale = true;
            }
            Err(ErrorBody::new(
                ErrorCode::Unavailable,
                format!(
                    "the event store did not answer within {COMMAND_DEADLINE:?}; the command may or may not have been stored: retry with the same command_id"
                ),
            ))
        })
    }

    /// Checks the involved aggregates and locks every member's slot, in
    /// the order of their keys.
    async fn lock_members(
        &self,
        cmd: &Command<'_>,
        involved: Vec<AggregateRef>,
    ) -> Result<Vec<Member>, ErrorBody> {
        let mut wanted: Vec<(Arc<dyn DynAggregate>, String)> = Vec::new();
        let own = cmd.key();
        for r in involved {
            let aggregate = self.registry.get(r.aggregate_type).ok_or_else(|| {
                internal(format!(
                    "the command involves aggregate type {:?}, which this worker does not serve",
                    r.aggregate_type
                ))
            })?;
            if !jetsource_core::aggregate::is_valid_token(&r.id) {
                return Err(ErrorBody::invalid(format!(
                    "the command involves {} {:?}, which is not a valid aggregate id (1-64 of A-Z a-z 0-9 _ -)",
                    r.aggregate_type, r.id
                )));
            }
            if r.to_string() == own {
                return Err(ErrorBody::invalid(format!(
                    "the command involves {own}, the aggregate it is sent to; name another one"
                )));
            }
            if !wanted
                .iter()
                .any(|(a, id)| a.aggregate_type() == r.aggregate_type && *id == r.id)
            {
                wanted.push((aggregate.clone(), r.id));
            }
        }
        if wanted.len() + 1 > MAX_AGGREGATES_PER_COMMAND {
            return Err(ErrorBody::invalid(format!(
                "the command involves {} aggregates; at most {MAX_AGGREGATES_PER_COMMAND} (itself included) may decide together",
                wanted.len() + 1
            )));
        }
        let primary = self
            .registry
            .get(cmd.aggregate.aggregate_type())
            .expect("the command's own type is registered")
            .clone();
        wanted.insert(0, (primary, cmd.aggregate_id.to_owned()));
        let keys: Vec<String> = wanted
            .iter()
            .map(|(a, id)| format!("{}.{id}", a.aggregate_type()))
            .collect();
        let mut order: Vec<usize> = (0..wanted.len()).collect();
        order.sort_by(|&i, &j| keys[i].cmp(&keys[j]));
        let mut slots: Vec<Option<OwnedMutexGuard<Slot>>> = wanted.iter().map(|_| None).collect();
        for i in order {
            slots[i] = Some(self.cache.slot(&keys[i]).lock_owned().await);
        }
        Ok(wanted
            .into_iter()
            .zip(slots)
            .map(|((aggregate, id), slot)| Member {
                aggregate,
                id,
                slot: slot.expect("every slot locked"),
            })
            .collect())
    }

    /// The decide-append loop over locked members (see the module docs).
    async fn decide_members(&self, cmd: &Command<'_>, members: &mut [Member]) -> Reply {
        let mut conflicts = 0;
        let mut confirmed = false;
        loop {
            let loads = members
                .iter_mut()
                .filter(|m| m.slot.loaded.is_none() || m.slot.stale)
                .map(|m| self.catch_up(&mut m.slot, m.aggregate.as_ref(), &m.id));
            futures::future::try_join_all(loads).await?;
            match decide(cmd, members, confirmed) {
                Step::Answer(reply) => return reply,
                Step::Recorded(first) => return self.recorded(cmd, members, Some(first)).await,
                Step::Confirm => {
                    let confirms = members
                        .iter_mut()
                        .map(|m| self.confirm(&mut m.slot, m.aggregate.as_ref(), &m.id));
                    futures::future::try_join_all(confirms).await?;
                    confirmed = true;
                }
                Step::Append(plan) => {
                    if let Some(reply) = self.append_members(cmd, members, plan).await {
                        return reply;
                    }
                    self.conflicted(cmd, &mut conflicts)?;
                }
            }
        }
    }

    /// Appends the plan's events in one batch and takes them into the
    /// slots; `None` when an aggregate changed meanwhile (decide again).
    async fn append_members(
        &self,
        cmd: &Command<'_>,
        members: &mut [Member],
        plan: Vec<(Vec<NewEvent>, State)>,
    ) -> Option<Reply> {
        let owner = cmd.key();
        let mut stored = Vec::with_capacity(plan.len());
        for (member, (events, _)) in members.iter().zip(&plan) {
            match self
                .sealed(member.aggregate.as_ref(), &member.id, events)
                .await
            {
                Ok(sealed) => stored.push(sealed),
                Err(e) => return Some(Err(e)),
            }
        }
        let appends: Vec<Append<'_>> = members
            .iter()
            .zip(&stored)
            .enumerate()
            .map(|(i, (m, events))| Append {
                aggregate_type: m.aggregate.aggregate_type(),
                aggregate_id: &m.id,
                expected_last_sequence: m.loaded().last_sequence,
                version: m.loaded().version,
                events,
                schema_version: m.aggregate.event_schema_version(),
                command_id: cmd.command_id(),
                correlation_id: &cmd.correlation_id,
                causation_id: &cmd.causation_id,
                command_aggregate: (i > 0).then_some(owner.as_str()),
                previous_hash: m.loaded().last_hash,
            })
            .collect();
        let started = std::time::Instant::now();
        let appended = self.store.append_together(&appends).await;
        ::metrics::histogram!(metrics::APPEND_DURATION).record(started.elapsed().as_secs_f64());
        drop(appends);
        let stored = matches!(&appended, Ok(a) if !a[0].is_some_and(|a| a.duplicate));
        if !stored {
            for member in members.iter_mut() {
                member.slot.stale = true;
            }
        }
        Some(match appended {
            Ok(appended) if appended[0].is_some_and(|a| a.duplicate) => {
                let first = appended[0].map(|a| a.first_sequence);
                self.recorded(cmd, members, first).await
            }
            Ok(appended) => Ok(take_in(cmd, members, plan, &appended)),
            Err(e) if e.kind() == StoreErrorKind::WrongLastSequence => return None,
            Err(e) if e.kind() == StoreErrorKind::DuplicateCommand => {
                // Resent within the duplicate window: the batch was refused
                // whole (10201), without saying where the original is.
                let own = &mut members[0];
                if let Err(e) = self
                    .catch_up(&mut own.slot, own.aggregate.as_ref(), &own.id)
                    .await
                {
                    return Some(Err(e));
                }
                let first = cmd
                    .command_id()
                    .and_then(|id| members[0].loaded().recorded_command(id));
                self.recorded(cmd, members, first).await
            }
            Err(e) => Err(store_failure(e)),
        })
    }

    /// The outcome a command already stored got, read back: its events on
    /// the aggregate it was sent to (first at `first`, if known) and those
    /// right after them on the others, marked `duplicate`.
    async fn recorded(&self, cmd: &Command<'_>, members: &[Member], first: Option<u64>) -> Reply {
        let command_id = cmd
            .command_id()
            .expect("only commands with an id deduplicate");
        let (own_type, own_id) = (cmd.aggregate.aggregate_type(), cmd.aggregate_id);
        let own = self
            .recorded_events(own_type, own_id, command_id, first)
            .await?;
        let mut outcome = outcome_from_events(&own);
        outcome.duplicate = true;
        let after = own.last().map_or(0, |e| e.sequence);
        for member in &members[1..] {
            let theirs = self.their_events(cmd, member, after, command_id).await?;
            if let Some(last) = theirs.last() {
                outcome.sequence = outcome.sequence.max(last.sequence);
                outcome.others.push(OtherOutcome {
                    aggregate_type: member.aggregate.aggregate_type().to_owned(),
                    aggregate_id: member.id.clone(),
                    version: last.aggregate_version,
                    events: theirs
                        .iter()
                        .map(|e| reply_event(&e.event_type, &e.data))
                        .collect(),
                });
            }
        }
        Ok(outcome)
    }

    /// A member's events of the command whose own events end at `after`:
    /// the batch is contiguous, so they are the member's next events if
    /// they carry the command. Read from the stream leader, which has the
    /// whole batch (a replica may lag).
    async fn their_events(
        &self,
        cmd: &Command<'_>,
        member: &Member,
        after: u64,
        command_id: &str,
    ) -> Result<Vec<RecordedEvent>, ErrorBody> {
        let subject = event_subject(member.aggregate.aggregate_type(), &member.id);
        let owner = cmd.key();
        let mut events = Vec::new();
        let mut next = after + 1;
        while let Some(message) = self
            .store
            .leader_next(&subject, next)
            .await
            .map_err(store_failure)?
        {
            let mut event = [message.into_event().map_err(|e| store_failure(e.into()))?];
            // What the client gets back: personal fields opened.
            self.store
                .open_events(&mut event)
                .await
                .map_err(store_failure)?;
            let [event] = event;
            let ours = event.command_id.as_deref() == Some(command_id)
                && event.command_aggregate.as_deref() == Some(owner.as_str());
            if !ours {
                break;
            }
            next = event.sequence + 1;
            events.push(event);
        }
        Ok(events)
    }
}

/// Decides on the members' loaded states (see [`Step`]).
fn decide(cmd: &Command<'_>, members: &[Member], confirmed: bool) -> Step {
    let unless_unconfirmed = |reply: Reply| {
        if confirmed {
            Step::Answer(reply)
        } else {
            Step::Confirm
        }
    };
    let own = members[0].loaded();
    if let Some(command_id) = cmd.command_id() {
        if let Some(first) = own.recorded_command(command_id) {
            return Step::Recorded(first);
        }
    }
    if let Some(expected) = cmd.request.expected_version {
        if own.version != expected {
            return unless_unconfirmed(Err(cmd.version_mismatch(expected, own.version)));
        }
    }
    let mut others = Others::sent_to(cmd.aggregate_id);
    for m in &members[1..] {
        let r = AggregateRef {
            aggregate_type: m.aggregate.aggregate_type(),
            id: m.id.clone(),
        };
        others.insert(r, m.loaded().state.clone());
    }
    let (decision, emitted) = match cmd.aggregate.decide_with(&own.state, &others, cmd.command) {
        Ok(decided) => decided,
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
    let mut plan: Vec<(Vec<NewEvent>, State)> = members
        .iter()
        .map(|m| (Vec::new(), m.loaded().state.clone()))
        .collect();
    plan[0] = (decision.events, decision.state);
    for emitted in emitted {
        let Some(i) = members.iter().skip(1).position(|m| {
            m.aggregate.aggregate_type() == emitted.aggregate.aggregate_type
                && m.id == emitted.aggregate.id
        }) else {
            return Step::Answer(Err(internal(format!(
                "the command decided events for {}, which it does not name in `involves`",
                emitted.aggregate
            ))));
        };
        let (member, entry) = (&members[i + 1], &mut plan[i + 1]);
        let events = match emitted.events {
            Ok(events) => events,
            Err(message) => return Step::Answer(Err(internal(message))),
        };
        let mut stored = events.iter().map(|e| StoredEvent {
            event_type: &e.event_type,
            schema_version: emitted.schema_version,
            data: &e.data,
        });
        match member.aggregate.fold(&entry.1, &mut stored) {
            Ok(state) => entry.1 = state,
            Err(e) => {
                return Step::Answer(Err(internal(format!(
                    "the events decided for {} do not fold into its state: {e}",
                    member.key()
                ))))
            }
        }
        entry.0.extend(events);
    }
    if plan.iter().all(|(events, _)| events.is_empty()) {
        return unless_unconfirmed(Ok(CommandOutcome {
            version: own.version,
            sequence: own.last_sequence,
            events: vec![],
            others: vec![],
            duplicate: false,
        }));
    }
    if plan[0].0.is_empty() {
        return Step::Answer(Err(internal(format!(
            "a multi-aggregate command must append at least one event to {}, the aggregate it was sent to, which records its command id",
            cmd.key()
        ))));
    }
    Step::Append(plan)
}

/// Takes a stored plan into the members' slots and makes the reply.
fn take_in(
    cmd: &Command<'_>,
    members: &mut [Member],
    plan: Vec<(Vec<NewEvent>, State)>,
    appended: &[Option<Appended>],
) -> CommandOutcome {
    let mut outcome = CommandOutcome {
        version: 0,
        sequence: 0,
        events: Vec::new(),
        others: Vec::new(),
        duplicate: false,
    };
    for (i, ((member, (events, state)), appended)) in
        members.iter_mut().zip(plan).zip(appended).enumerate()
    {
        let loaded = member
            .slot
            .loaded
            .as_mut()
            .expect("decided on a loaded state");
        if let Some(appended) = appended {
            loaded.appended(state, events.len(), appended);
            outcome.sequence = outcome.sequence.max(appended.last_sequence);
        }
        let replies = events
            .iter()
            .map(|e| reply_event(&e.event_type, &e.data))
            .collect();
        if i == 0 {
            if let (Some(command_id), Some(appended)) = (cmd.command_id(), appended) {
                loaded.remember_command(command_id, appended.first_sequence);
            }
            outcome.version = loaded.version;
            outcome.events = replies;
        } else if !events.is_empty() {
            outcome.others.push(OtherOutcome {
                aggregate_type: member.aggregate.aggregate_type().to_owned(),
                aggregate_id: member.id.clone(),
                version: loaded.version,
                events: replies,
            });
        }
    }
    outcome
}
