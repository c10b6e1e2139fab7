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
//! - up to `store.group_commit_after` appends (default 16) are in flight
//!   one by one, each written as it arrives (a lone command never waits for
//!   company);
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
use std::sync::atomic::{AtomicU64, Ordering};

use futures::stream::FuturesUnordered;
use futures::{FutureExt, StreamExt};
use tokio::sync::{mpsc, oneshot};

use super::{Appended, EventStore, Prepared, StoreError, StoreErrorKind, MAX_EVENTS_PER_APPEND};

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
    /// Non-zero: part of a group being split after a refusal, to be
    /// written with the members of the same seal and no others.
    seal: u64,
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
    pub(crate) fn start(store: EventStore, after: Option<usize>) -> Self {
        let (queue, incoming) = mpsc::unbounded_channel();
        let committer = Committer {
            store,
            after,
            seals: AtomicU64::new(0),
        };
        tokio::spawn(committer.run(incoming));
        Self { queue }
    }

    pub(crate) async fn submit(&self, prepared: Prepared) -> Result<Appended, StoreError> {
        let (answer, answered) = oneshot::channel();
        let pending = Pending {
            prepared,
            answer,
            retried: false,
            seal: 0,
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
    /// Appends in flight one by one before the rest wait for a group
    /// ([`DEFAULT_GROUP_COMMIT_AFTER`] when `None`).
    after: Option<usize>,
    /// The last seal given to the half of a split group.
    seals: AtomicU64,
}

/// Appends in flight one by one, by default, before newcomers wait for the
/// next group. With the default fsync interval 16 pipelined appends keep up
/// with more than a worker sends, so groups practically never form; with
/// fsync per message they queue from the 17th on. (A cost model learned
/// from latencies was tried and dropped: at low concurrency latency measures
/// the round trip, not the server's cost, and it grouped appends in default
/// mode, where a group costs more than it saves: docs/bench/NOTES.md.)
pub const DEFAULT_GROUP_COMMIT_AFTER: usize = 16;

/// What a finished write frees, what it hands back to the queue, and what
/// it cost.
enum Done {
    /// A one-by-one append.
    Alone,
    /// A group; its members to write again.
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
            let limit = self.after.unwrap_or(DEFAULT_GROUP_COMMIT_AFTER);
            while alone_in_flight < limit && queue.front().is_some_and(|p| p.seal == 0) {
                let pending = queue.pop_front().expect("checked above");
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
    /// leader shows broken (what they would have heard alone: sequences
    /// only grow), and returns the others to be written again: grouped
    /// freely the first time if that explained the refusal, otherwise split
    /// in two sealed halves, so that a member refused for its own reason
    /// (a resent command id, a message too large) ends up alone after at
    /// most log2(group size) splits, and gets its own answer.
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
        for (pending, last) in group.into_iter().zip(lasts) {
            match last {
                Ok(last) if last != pending.prepared.expected_last_sequence => {
                    explained = true;
                    let _ = pending.answer.send(Err(StoreError::from_code(
                        super::codes::WRONG_LAST_SEQUENCE,
                        StoreErrorKind::WrongLastSequence,
                        "the aggregate changed since it was loaded (wrong last sequence)",
                    )));
                }
                _ => again.push(pending),
            }
        }
        if explained && again.iter().all(|p| !p.retried && p.seal == 0) {
            for pending in &mut again {
                pending.retried = true;
            }
            return again;
        }
        let half = again.len().div_ceil(2);
        for (i, pending) in again.iter_mut().enumerate() {
            if i == 0 || i == half {
                self.seals.fetch_add(1, Ordering::Relaxed);
            }
            pending.seal = self.seals.load(Ordering::Relaxed);
        }
        again
    }
}

/// Answers the members of a stored group: they hold the stream's
/// sequences up to `last`, in order.
fn answer_stored(group: Vec<Pending>, last: u64) {
    let total: u64 = group.iter().map(|p| p.prepared.messages.len() as u64).sum();
    let mut first = last + 1 - total;
    for pending in group {
        let count = pending.prepared.messages.len() as u64;
        let _ = pending.answer.send(Ok(pending.prepared.appended(first)));
        first += count;
    }
}

/// The next group from the front of the queue, in arrival order: the
/// members of a sealed half, or as many free appends as fit in one batch,
/// stopping at the first that does not (or whose aggregate is in the group
/// already: its guard would see the group's own message).
fn take_group(queue: &mut VecDeque<Pending>) -> Vec<Pending> {
    let mut group: Vec<Pending> = Vec::new();
    let seal = queue.front().map_or(0, |p| p.seal);
    if seal != 0 {
        while queue.front().is_some_and(|p| p.seal == seal) {
            group.extend(queue.pop_front());
        }
        return group;
    }
    let mut subjects = HashSet::new();
    let (mut messages, mut bytes) = (0, 0);
    while let Some(next) = queue.front() {
        let (m, b) = (next.prepared.messages.len(), next.bytes());
        let fits = messages + m <= MAX_GROUP_MESSAGES && bytes + b <= MAX_GROUP_BYTES;
        let joins = fits && next.seal == 0 && !subjects.contains(&next.prepared.subject);
        if !group.is_empty() && !joins {
            break;
        }
        subjects.insert(next.prepared.subject.clone());
        messages += m;
        bytes += b;
        group.extend(queue.pop_front());
    }
    group
}
