//! Group commit: the appends of concurrent commands committed together.
//!
//! With `sync_interval: always` nats-server syncs every stored message to
//! disk, so plain publishes top out near one fsync each (about 4,400/s on a
//! 2-core machine) however many are in flight. One JetStream atomic batch
//! is written and synced once, at its commit, whatever it holds. On a
//! single node a batch has a fixed cost of its own (the server stages it in
//! a fresh on-disk store: about 3 ms), so it only pays when many appends
//! wait; on a replicated stream it is one Raft entry.
//!
//! The committer therefore works like this:
//! - up to `store.group_commit_after` appends are in flight one by one, each
//!   written as it arrives (a lone command never waits for company);
//! - appends arriving while all of those are in flight queue up, and
//!   whatever queued while the previous group was being written goes out
//!   as the next group: one atomic batch (at most one group in flight), in
//!   which every append's first message carries its own expected-sequence
//!   guard and command id, so the server checks each as it would alone.
//!
//! When the store keeps up (default fsync interval, light load) the queue
//! stays empty and nothing changes; when it does not (fsync per message,
//! many clients) groups form by themselves.
//!
//! Every append still gets exactly the answer it would get alone. A batch
//! is refused whole when one member's check fails, so after a refusal the
//! committer asks the stream leader for each member's last sequence:
//! members whose guard no longer holds are answered "wrong last sequence"
//! (as they would have been alone: sequences only grow), and the others are
//! written again. A member refused a second time, or refused for a reason
//! the leader's sequences do not explain (a resent command id, a message
//! too large), is written alone and gets its own answer. When the outcome
//! of a batch is unknown (a timeout), every member is answered unavailable,
//! as it would have been alone: the worker says "retry with the same
//! command id".

use std::collections::{HashSet, VecDeque};

use futures::stream::FuturesUnordered;
use futures::{FutureExt, StreamExt};
use tokio::sync::{mpsc, oneshot};

use super::{Appended, EventStore, Prepared, StoreError, StoreErrorKind, MAX_EVENTS_PER_APPEND};

/// `store.group_commit_after` by default. With the default fsync interval
/// 16 single appends in flight keep up with more than one worker can send,
/// so groups form only when the server syncs every message.
pub const DEFAULT_GROUP_COMMIT_AFTER: usize = 16;

/// Most messages in one group: the server's atomic batch limit.
const MAX_GROUP_MESSAGES: usize = MAX_EVENTS_PER_APPEND;

/// Most header and payload bytes in one group, well under what a server
/// accepts in flight for one batch.
const MAX_GROUP_BYTES: usize = 4 << 20;

/// Where appends are handed to this process's committer.
#[derive(Debug, Clone)]
pub(crate) struct Handle {
    queue: mpsc::UnboundedSender<Pending>,
}

type Answer = oneshot::Sender<Result<Appended, StoreError>>;

#[derive(Debug)]
struct Pending {
    prepared: Prepared,
    answer: Answer,
    /// Refused once in a group already.
    retried: bool,
    /// Must be written on its own.
    alone: bool,
}

impl Pending {
    /// Payload bytes plus a generous allowance for each message's headers.
    fn bytes(&self) -> usize {
        self.prepared
            .messages
            .iter()
            .map(|(_, payload)| payload.len() + HEADER_ALLOWANCE)
            .sum()
    }
}

/// Bytes counted for one message's headers (an event's are about 300).
const HEADER_ALLOWANCE: usize = 1024;

impl Handle {
    /// Starts the committer of `store` (a store without a group of its
    /// own). It ends when every handle is gone and its writes are done.
    pub(crate) fn start(store: EventStore, after: usize) -> Self {
        let (queue, incoming) = mpsc::unbounded_channel();
        tokio::spawn(Committer { store, after }.run(incoming));
        Self { queue }
    }

    pub(crate) async fn submit(&self, prepared: Prepared) -> Result<Appended, StoreError> {
        let (answer, answered) = oneshot::channel();
        let pending = Pending {
            prepared,
            answer,
            retried: false,
            alone: false,
        };
        let stopped = || {
            StoreError::new(
                StoreErrorKind::Unavailable,
                "the event store's committer has stopped (the process is shutting down); retry",
            )
        };
        self.queue.send(pending).map_err(|_| stopped())?;
        answered.await.map_err(|_| stopped())?
    }
}

struct Committer {
    store: EventStore,
    after: usize,
}

/// What a finished write frees, and what it hands back to the queue.
enum Done {
    Alone,
    Group(Vec<Pending>),
}

impl Committer {
    async fn run(self, mut incoming: mpsc::UnboundedReceiver<Pending>) {
        let mut queue: VecDeque<Pending> = VecDeque::new();
        let mut writes = FuturesUnordered::new();
        let mut alone_in_flight = 0;
        let mut group_in_flight = false;
        let mut open = true;
        loop {
            while let Ok(pending) = incoming.try_recv() {
                queue.push_back(pending);
            }
            while alone_in_flight < self.after {
                let Some(pending) = queue.pop_front() else {
                    break;
                };
                alone_in_flight += 1;
                writes.push(self.write_alone(pending).boxed());
            }
            if !group_in_flight && !queue.is_empty() {
                group_in_flight = true;
                let group = take_group(&mut queue);
                writes.push(self.write_group(group).boxed());
            }
            if !open && writes.is_empty() {
                break;
            }
            tokio::select! {
                pending = incoming.recv(), if open => match pending {
                    Some(pending) => queue.push_back(pending),
                    None => open = false,
                },
                Some(done) = writes.next() => match done {
                    Done::Alone => alone_in_flight -= 1,
                    Done::Group(again) => {
                        group_in_flight = false;
                        for pending in again.into_iter().rev() {
                            queue.push_front(pending);
                        }
                    }
                },
            }
        }
    }

    async fn write_alone(&self, pending: Pending) -> Done {
        let result = self.store.write_alone(&pending.prepared).await;
        let _ = pending.answer.send(result);
        Done::Alone
    }

    /// Writes a group (a single append on its own) and answers its
    /// members; returns those to write again.
    async fn write_group(&self, group: Vec<Pending>) -> Done {
        if group.len() == 1 {
            let pending = group.into_iter().next().expect("one member");
            let result = self.store.write_alone(&pending.prepared).await;
            let _ = pending.answer.send(result);
            return Done::Group(Vec::new());
        }
        ::metrics::histogram!(crate::metrics::APPEND_GROUP_SIZE).record(group.len() as f64);
        let prepared: Vec<&Prepared> = group.iter().map(|p| &p.prepared).collect();
        let written = self.store.write_batch(&prepared).await;
        match written {
            Ok(last) => {
                answer_stored(group, last);
                Done::Group(Vec::new())
            }
            Err(e) if e.kind() == StoreErrorKind::Unavailable => {
                // Not stored, or not known to be: what each would hear alone.
                for pending in group {
                    let _ = pending.answer.send(Err(e.clone()));
                }
                Done::Group(Vec::new())
            }
            Err(e) => Done::Group(self.sort_out(group, &e).await),
        }
    }

    /// After a refused group: answers the members whose guard the stream
    /// leader shows broken, and returns the others to be written again
    /// (alone if refused before, or if nobody's guard explains the refusal).
    async fn sort_out(&self, group: Vec<Pending>, refusal: &StoreError) -> Vec<Pending> {
        ::metrics::counter!(crate::metrics::APPEND_GROUPS_REFUSED).increment(1);
        tracing::debug!(members = group.len(), error = %refusal, "group refused; sorting out its members");
        let lasts = futures::future::join_all(
            group
                .iter()
                .map(|p| self.store.leader_last_sequence(&p.prepared.subject)),
        )
        .await;
        let mut again = Vec::with_capacity(group.len());
        let mut explained = false;
        for (mut pending, last) in group.into_iter().zip(lasts) {
            match last {
                Ok(last) if last != pending.prepared.expected_last_sequence => {
                    explained = true;
                    let _ = pending.answer.send(Err(StoreError::from_code(
                        super::codes::WRONG_LAST_SEQUENCE,
                        StoreErrorKind::WrongLastSequence,
                        "the aggregate changed since it was loaded (wrong last sequence)",
                    )));
                }
                _ => {
                    pending.alone = pending.retried;
                    pending.retried = true;
                    again.push(pending);
                }
            }
        }
        if !explained {
            for pending in &mut again {
                pending.alone = true;
            }
        }
        again
    }
}

/// Answers the members of a stored group: they hold the stream's
/// sequences up to `last`, in order.
fn answer_stored(group: Vec<Pending>, last: u64) {
    let total: u64 = group
        .iter()
        .map(|p| p.prepared.messages.len() as u64)
        .sum();
    let mut first = last + 1 - total;
    for pending in group {
        let count = pending.prepared.messages.len() as u64;
        let _ = pending.answer.send(Ok(Appended {
            first_sequence: first,
            last_sequence: first + count - 1,
            duplicate: false,
        }));
        first += count;
    }
}

/// The next group from the front of the queue, in arrival order: one
/// append that must be written alone, or as many others as fit in one
/// batch, stopping at the first that does not (or whose aggregate is in the
/// group already: its guard would see the group's own message).
fn take_group(queue: &mut VecDeque<Pending>) -> Vec<Pending> {
    let mut group: Vec<Pending> = Vec::new();
    let mut subjects = HashSet::new();
    let (mut messages, mut bytes) = (0, 0);
    while let Some(next) = queue.front() {
        if next.alone {
            if group.is_empty() {
                group.extend(queue.pop_front());
            }
            break;
        }
        let (m, b) = (next.prepared.messages.len(), next.bytes());
        let fits = messages + m <= MAX_GROUP_MESSAGES && bytes + b <= MAX_GROUP_BYTES;
        if !group.is_empty() && (!fits || subjects.contains(&next.prepared.subject)) {
            break;
        }
        subjects.insert(next.prepared.subject.clone());
        messages += m;
        bytes += b;
        group.extend(queue.pop_front());
    }
    group
}
