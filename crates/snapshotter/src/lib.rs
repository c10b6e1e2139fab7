//! The snapshotter: follows the event stream through a durable consumer and,
//! every `snapshot.every` events of an aggregate (per type configurable),
//! stores the aggregate's state in the snapshot bucket. It also takes a
//! snapshot on request (`jetsource.snapshot.request.<type>.<id>`, sent by
//! the command worker after a slow load).
//!
//! Two tasks: the events are followed by one, the requests are served on
//! the request loop every worker shares ([`jetsource_core::micro::serve`]),
//! so a slow snapshot on one side never holds up the other.
//!
//! Several copies may run: they share one consumer, and a snapshot only ever
//! replaces an older one (compare-and-set on the bucket entry), so the order
//! in which copies finish does not matter.

use std::fmt::Display;
use std::future::Future;
use std::num::NonZeroUsize;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::consumer::{pull, AckPolicy, DeliverPolicy, PullConsumer, StreamError};
use futures::StreamExt;
use jetsource_core::aggregate::{DynAggregate, Registry};
use jetsource_core::config::{Config, SnapshotConfig};
use jetsource_core::envelope::{RecordedEvent, EVENT_SUBJECT_PREFIX};
use jetsource_core::health::{self, Readiness};
use jetsource_core::integrity::Integrity;
use jetsource_core::loader::{LoadError, Loaded, Until};
use jetsource_core::micro::{self, Endpoint, MicroService};
use jetsource_core::protocol::{ErrorBody, ErrorCode};
use jetsource_core::snapshot::{Snapshot, SnapshotStore, Written};
use jetsource_core::store::{EventStore, StoreError};
use jetsource_core::ErrorClass;
use lru::LruCache;
use tokio::sync::watch;

pub const SERVICE_NAME: &str = "jetsource-snapshotter";
/// Durable consumer shared by all copies.
pub const CONSUMER: &str = "snapshotter";
/// The request endpoint, as named in `$SRV.INFO` and `$SRV.STATS`.
pub const ENDPOINT: &str = "requests";
/// Where snapshot requests arrive: `<this>.<type>.<id>`.
const REQUEST_SUBJECTS: &str = "jetsource.snapshot.request.>";
/// Snapshot requests one copy serves at once.
const MAX_REQUESTS_IN_FLIGHT: usize = 16;
/// Attempts at one snapshot before giving up on it: snapshots are a cache,
/// and a missed one costs a longer load, nothing else.
const ATTEMPTS: u32 = 5;
/// Wait before the second attempt; doubles up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// NATS, the event stream, the snapshot bucket or the consumer.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A subscription NATS refused or could not take.
    #[error("cannot subscribe to the snapshot requests: {0}")]
    Subscribe(#[from] async_nats::SubscribeError),
    /// The consumer's messages cannot be pulled.
    #[error("cannot pull from the snapshotter consumer: {0}")]
    Pull(#[from] StreamError),
    /// The health listener cannot listen on `http.listen`.
    #[error("{0} (http.listen)")]
    Http(std::io::Error),
}

impl RunError {
    pub fn class(&self) -> ErrorClass {
        match self {
            RunError::Store(e) => e.class(),
            RunError::Subscribe(_) | RunError::Pull(_) => ErrorClass::Transient,
            RunError::Http(_) => ErrorClass::Permanent,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error(transparent)]
    Load(#[from] LoadError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl SnapshotError {
    pub fn class(&self) -> ErrorClass {
        match self {
            SnapshotError::Load(e) => e.class(),
            SnapshotError::Store(e) => e.class(),
        }
    }
}

/// Takes a snapshot of one aggregate as of `until` (from its previous
/// snapshot plus the tail) and stores it unless a newer one is there.
pub async fn take(
    store: &EventStore,
    snapshots: &SnapshotStore,
    aggregate: &dyn DynAggregate,
    aggregate_id: &str,
    until: Until,
) -> Result<Option<Written>, SnapshotError> {
    let (loaded, _) =
        Loaded::load_with_snapshot(store, snapshots, aggregate, aggregate_id, until).await?;
    let Some(snapshot) = loaded.to_snapshot(aggregate, aggregate_id) else {
        return Ok(None);
    };
    if holds_forgotten(store, &snapshot).await? {
        return Ok(None);
    }
    let written = snapshots
        .put_if_newer(&snapshot, aggregate.state_schema_version())
        .await?;
    count_written(aggregate, written);
    Ok(Some(written))
}

/// Whether `snapshot` was built from personal data of a subject forgotten
/// since: such a snapshot is never written (the state held the data in the
/// clear before the forget).
async fn holds_forgotten(store: &EventStore, snapshot: &Snapshot) -> Result<bool, StoreError> {
    let forgotten = jetsource_core::loader::forgotten_among(store, &snapshot.subjects).await?;
    if let Some(subject) = &forgotten {
        tracing::info!(aggregate = %format_args!("{}.{}", snapshot.aggregate_type, snapshot.aggregate_id), %subject, "not snapshotted: it holds a forgotten subject's data");
    }
    Ok(forgotten.is_some())
}

/// Counts a stored snapshot (docs/METRICS.md).
fn count_written(aggregate: &dyn DynAggregate, written: Written) {
    if written == Written::Stored {
        ::metrics::counter!(jetsource_core::metrics::SNAPSHOTS_WRITTEN, "aggregate_type" => aggregate.aggregate_type())
            .increment(1);
    }
}

/// Whether the event at `version` of `aggregate_type` is a snapshot point.
pub fn due(config: &SnapshotConfig, aggregate_type: &str, version: u64) -> bool {
    version > 0 && version % config.every(aggregate_type) == 0
}

/// Rebuilds the snapshots of every aggregate (of `only_type`, if given) from
/// a full replay. A rebuilt snapshot replaces the stored one unless that one
/// is newer (the snapshotter may have written it meanwhile, or the events
/// grew since they were read): compare-and-set on the bucket entry, like the
/// snapshotter's own writes. Returns how many snapshots it wrote;
/// `progress` is called after each aggregate with (done, total).
pub async fn rebuild(
    store: &EventStore,
    snapshots: &SnapshotStore,
    registry: &Registry,
    only_type: Option<&str>,
    mut progress: impl FnMut(usize, usize),
) -> Result<usize, SnapshotError> {
    let filter = match only_type {
        Some(t) => format!("{EVENT_SUBJECT_PREFIX}.{t}.*"),
        None => format!("{EVENT_SUBJECT_PREFIX}.*.*"),
    };
    let subjects = store.subjects(&filter).await?;
    let total = subjects.len();
    let mut written = 0;
    for (done, subject) in subjects.iter().enumerate() {
        if rebuild_one(store, snapshots, registry, subject).await? == Some(Written::Stored) {
            written += 1;
        }
        progress(done + 1, total);
    }
    Ok(written)
}

/// Rebuilds the snapshot of the aggregate whose events are on `subject`;
/// `None` for an aggregate type the registry does not know, or no events.
async fn rebuild_one(
    store: &EventStore,
    snapshots: &SnapshotStore,
    registry: &Registry,
    subject: &str,
) -> Result<Option<Written>, SnapshotError> {
    let mut tokens = subject.splitn(3, '.').skip(1);
    let (Some(aggregate_type), Some(aggregate_id)) = (tokens.next(), tokens.next()) else {
        return Ok(None);
    };
    let Some(aggregate) = registry.get(aggregate_type) else {
        return Ok(None);
    };
    let aggregate = aggregate.as_ref();
    let loaded = Loaded::load(store, aggregate, aggregate_id, Until::End).await?;
    let Some(snapshot) = loaded.to_snapshot(aggregate, aggregate_id) else {
        return Ok(None);
    };
    if holds_forgotten(store, &snapshot).await? {
        return Ok(None);
    }
    let schema = aggregate.state_schema_version();
    Ok(Some(snapshots.put_unless_newer(&snapshot, schema).await?))
}

/// Turns true when the snapshotter is stopping.
type Stop = watch::Receiver<bool>;

/// Resolves once `stop` is true.
async fn stopping_now(stop: &mut Stop) {
    let _ = stop.wait_for(|s| *s).await;
}

/// Tries `attempt` until it succeeds, fails for good (not
/// [`ErrorClass::Transient`]), has failed [`ATTEMPTS`] times, or `stop`
/// turns true: a stopping snapshotter does not retry (with NATS gone the
/// retries only held the stop up). Backs off from [`FIRST_BACKOFF`],
/// doubling, to at most [`MAX_BACKOFF`] between attempts. Returns the last
/// error when it gives up; each failure is logged with `aggregate`.
async fn retry<T, E, Fut>(
    aggregate: &str,
    stop: &Stop,
    class: impl Fn(&E) -> ErrorClass,
    mut attempt: impl FnMut() -> Fut,
) -> Result<T, E>
where
    E: Display,
    Fut: Future<Output = Result<T, E>>,
{
    let mut stop = stop.clone();
    let mut backoff = FIRST_BACKOFF;
    let mut tried = 0;
    loop {
        tried += 1;
        let e = match attempt().await {
            Ok(done) => return Ok(done),
            Err(e) => e,
        };
        let class = class(&e);
        tracing::warn!(aggregate, attempt = tried, error = %e, ?class, "snapshot failed");
        if class != ErrorClass::Transient || tried >= ATTEMPTS || *stop.borrow_and_update() {
            return Err(e);
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            () = stopping_now(&mut stop) => return Err(e),
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// Aggregates by `(type, id)`.
type Key = (String, String);

/// Aggregate states kept by the snapshotter.
type States = LruCache<Key, Loaded>;

/// What the snapshotter remembers of the aggregates whose events go by.
struct Memory {
    /// Their states, folded from the events: a snapshot that falls due is
    /// written from memory.
    states: States,
    /// Where a cold load of each would start reading the stream: its newest
    /// snapshot's sequence, or its first event's (`snapshot.max_tail_sequences`).
    bases: LruCache<Key, u64>,
    /// Snapshot writes in flight. Written one at a time, a snapshot (two
    /// round trips: read the entry's revision, compare-and-set) held up the
    /// events behind it: 330,000 snapshots of a 1,000,000-event backlog
    /// took 105 s. Written concurrently they overlap; the compare-and-set
    /// keeps the newest whatever order they finish in.
    writes: tokio::task::JoinSet<()>,
    /// The privacy epoch the states were folded under: when a subject is
    /// forgotten they are all dropped (they may hold its data in the
    /// clear).
    epoch: u64,
}

/// Snapshot writes one copy keeps in flight.
const WRITES_IN_FLIGHT: usize = 64;

impl Memory {
    fn new(size: usize) -> Self {
        let size = NonZeroUsize::new(size).unwrap_or(NonZeroUsize::MIN);
        Self {
            states: LruCache::new(size),
            bases: LruCache::new(size),
            writes: tokio::task::JoinSet::new(),
            epoch: 0,
        }
    }

    /// Waits for a free write slot; reaps finished writes.
    async fn write_slot(&mut self) {
        while self.writes.try_join_next().is_some() {}
        if self.writes.len() >= WRITES_IN_FLIGHT {
            self.writes.join_next().await;
        }
    }
}

struct Shared {
    store: EventStore,
    snapshots: SnapshotStore,
    registry: Registry,
    config: SnapshotConfig,
}

impl Shared {
    /// Folds `event` into the aggregate's state kept in memory (loading
    /// it, from its snapshot and the store, when it is not there or has a
    /// gap, e.g. events handled by another snapshotter copy) and writes a
    /// snapshot when one falls due: every `snapshot.every` events, or when
    /// the event lies too far after the aggregate's last snapshot.
    async fn follow(self: &Arc<Self>, memory: &mut Memory, event: &RecordedEvent, stop: &Stop) {
        let Some(aggregate) = self.registry.get(&event.aggregate_type) else {
            return;
        };
        let aggregate = aggregate.as_ref();
        let key = (event.aggregate_type.clone(), event.aggregate_id.clone());
        let folded = fold(
            &mut memory.states,
            self.store.integrity(),
            &key,
            aggregate,
            event,
        );
        if folded == Fold::Seen {
            return;
        }
        let due = due(&self.config, &event.aggregate_type, event.aggregate_version)
            || self.tail_too_long(memory, &key, event).await;
        if folded == Fold::Gap {
            memory.states.pop(&key);
            if !due {
                return;
            }
            // Not followed from its start: load it up to this event.
            match self.load_to(aggregate, event).await {
                Some(loaded) => {
                    memory.states.put(key.clone(), loaded);
                }
                None => return,
            }
        }
        let snapshot = match memory.states.get(&key) {
            Some(loaded) if due => loaded.to_snapshot(aggregate, &event.aggregate_id),
            _ => None,
        };
        if let Some(snapshot) = snapshot {
            // Counted as written from now: a write that fails costs a longer
            // load until the next one, like any missed snapshot.
            memory.bases.put(key, event.sequence);
            memory.write_slot().await;
            let (shared, stop) = (Arc::clone(self), stop.clone());
            memory
                .writes
                .spawn(async move { shared.write(snapshot, &stop).await });
        }
    }

    /// Whether `event` lies more than `snapshot.max_tail_sequences` after
    /// where a cold load of its aggregate would start reading. Asks the
    /// bucket when memory does not know; an answer from a lagging replica
    /// can only make this say yes too often (one snapshot more).
    async fn tail_too_long(&self, memory: &mut Memory, key: &Key, event: &RecordedEvent) -> bool {
        let limit = self.config.max_tail_sequences;
        if limit == 0 {
            return false;
        }
        let base = match memory.bases.get(key) {
            Some(&base) => base,
            None if event.aggregate_version == 1 => event.sequence,
            None => match self.snapshots.sequence(&key.0, &key.1).await {
                Ok(stored) => stored.unwrap_or(0),
                Err(e) => {
                    tracing::debug!(aggregate = %format_args!("{}.{}", key.0, key.1), error = %e, "cannot read the snapshot's sequence");
                    return false;
                }
            },
        };
        memory.bases.put(key.clone(), base);
        event.sequence.saturating_sub(base) > limit
    }

    /// The aggregate's state just after `event`, from its snapshot and the
    /// store; `None` when it cannot be loaded or the load does not end at
    /// `event` (a replica that lags).
    async fn load_to(&self, aggregate: &dyn DynAggregate, event: &RecordedEvent) -> Option<Loaded> {
        let until = Until::Sequence(event.sequence);
        let id = &event.aggregate_id;
        match Loaded::load_with_snapshot(&self.store, &self.snapshots, aggregate, id, until).await {
            Ok((loaded, _)) if loaded.version == event.aggregate_version => Some(loaded),
            Ok(_) => None,
            Err(e) => {
                tracing::warn!(aggregate = %format_args!("{}.{id}", event.aggregate_type), error = %e, "cannot load; no snapshot");
                None
            }
        }
    }

    /// Writes `loaded` (the state as of `event`) as the aggregate's
    /// snapshot, unless a newer one is stored; retries (see [`retry`]).
    /// Stores `snapshot` unless a newer one is stored; retries (see [`retry`]).
    async fn write(&self, snapshot: Snapshot, stop: &Stop) {
        let Some(aggregate) = self.registry.get(&snapshot.aggregate_type) else {
            return;
        };
        let name = format!("{}.{}", snapshot.aggregate_type, snapshot.aggregate_id);
        if !matches!(holds_forgotten(&self.store, &snapshot).await, Ok(false)) {
            return;
        }
        let schema = aggregate.state_schema_version();
        let put = || self.snapshots.put_if_newer(&snapshot, schema);
        if let Ok(written) = retry(&name, stop, StoreError::class, put).await {
            tracing::debug!(aggregate = %name, ?written, "snapshot");
            count_written(aggregate.as_ref(), written);
        }
    }

    /// Serves a snapshot request: `jetsource.snapshot.request.<type>.<id>`.
    async fn on_request(&self, subject: &str, stop: &Stop) -> Result<serde_json::Value, ErrorBody> {
        let mut tokens = subject.splitn(5, '.').skip(3);
        let (Some(aggregate_type), Some(aggregate_id)) = (tokens.next(), tokens.next()) else {
            return Err(ErrorBody::invalid(format!(
                "{subject}: expected jetsource.snapshot.request.<type>.<id>"
            )));
        };
        let aggregate = self.registry.get(aggregate_type).ok_or_else(|| {
            ErrorBody::invalid(format!("unknown aggregate type {aggregate_type:?}"))
        })?;
        let name = format!("{aggregate_type}.{aggregate_id}");
        let attempt = || {
            take(
                &self.store,
                &self.snapshots,
                aggregate.as_ref(),
                aggregate_id,
                Until::End,
            )
        };
        match retry(&name, stop, SnapshotError::class, attempt).await {
            Ok(written) => {
                tracing::debug!(aggregate = %name, ?written, "snapshot");
                Ok(taken(written))
            }
            Err(e) => Err(reply_error(&e)),
        }
    }
}

/// The reply to a snapshot request (the command worker sends them without
/// waiting for one; an operator's `nats req` gets this): `{"snapshot":
/// "stored"}`, `"kept"` (a newer one is there) or `"none"` (no events).
fn taken(written: Option<Written>) -> serde_json::Value {
    let snapshot = match written {
        Some(Written::Stored) => "stored",
        Some(Written::Kept) => "kept",
        None => "none",
    };
    serde_json::json!({ "snapshot": snapshot })
}

fn reply_error(e: &SnapshotError) -> ErrorBody {
    let code = match e {
        SnapshotError::Load(e) if e.own_code().is_some() => {
            e.own_code().unwrap_or(ErrorCode::Internal)
        }
        _ if e.class() == ErrorClass::Transient => ErrorCode::Unavailable,
        _ => ErrorCode::Internal,
    };
    ErrorBody::new(code, e.to_string())
}

/// What [`fold`] did with an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fold {
    /// The kept state is at or past it already (a redelivery).
    Seen,
    Applied,
    /// No kept state it follows (evicted, never followed, events taken by
    /// another copy), or it does not apply.
    Gap,
}

/// Folds `event` into the state kept for `key` if it directly follows it
/// (or is the aggregate's first event).
fn fold(
    states: &mut States,
    integrity: &Integrity,
    key: &(String, String),
    aggregate: &dyn DynAggregate,
    event: &RecordedEvent,
) -> Fold {
    let version = event.aggregate_version;
    match states.get_mut(key) {
        Some(loaded) if loaded.version >= version => Fold::Seen,
        Some(loaded) if loaded.version + 1 == version => {
            match loaded.apply(integrity, aggregate, event) {
                Ok(_) => Fold::Applied,
                Err(_) => Fold::Gap,
            }
        }
        _ if version == 1 => {
            let mut loaded = Loaded::empty(aggregate);
            if loaded.apply(integrity, aggregate, event).is_err() {
                return Fold::Gap;
            }
            states.put(key.clone(), loaded);
            Fold::Applied
        }
        _ => Fold::Gap,
    }
}

/// Pulled messages, a chunk at a time.
type Chunks = futures::stream::ReadyChunks<pull::Stream>;

async fn pull_messages(consumer: &PullConsumer) -> Result<Chunks, StreamError> {
    let messages = consumer
        .stream()
        .max_messages_per_batch(256)
        .messages()
        .await?;
    Ok(messages.ready_chunks(256))
}

/// Follows the event stream until `stop`: folds each event into the state
/// of its aggregate and writes the snapshots that fall due, acknowledging
/// each event after it. A chunk taken is finished (its retries end when
/// `stop` turns true); the caller bounds that by the stop deadline.
///
/// When the pull stream ends or says the consumer is gone (deleted by
/// hand, or with its stream), the consumer is created again (the same
/// durable: where it stopped if it still exists, else from the start,
/// which only re-takes snapshots already taken); `/readyz` fails
/// (`consumer`) until that works.
async fn follow_events(
    shared: Arc<Shared>,
    mut chunks: Chunks,
    cache_size: usize,
    readiness: Readiness,
    stop: Stop,
) {
    // Aggregate states folded from the consumer's own events: a snapshot
    // that falls due is written from memory. Reading each aggregate's tail
    // back from the store instead cost a scan of the stream per snapshot
    // (an aggregate's events are spread thinly over it): 594 s for a
    // 1,000,000-event backlog in the benchmark.
    let mut memory = Memory::new(cache_size);
    let mut stopped = stop.clone();
    loop {
        let chunk = tokio::select! {
            biased;
            () = stopping_now(&mut stopped) => {
                // Writes in flight finish (they give up retrying once
                // stopping); the stop deadline bounds the wait.
                while memory.writes.join_next().await.is_some() {}
                return;
            }
            chunk = chunks.next() => chunk,
        };
        let gone = match chunk {
            None => Some("the pull subscription ended".to_owned()),
            Some(chunk) => follow_chunk(&shared, &mut memory, chunk, &stop).await,
        };
        if let Some(why) = gone {
            tracing::warn!(consumer = CONSUMER, %why, "creating the consumer again");
            readiness.fail("consumer", format!("consumer {CONSUMER}: {why}"));
            match reopen(&shared.store, &readiness, &stop).await {
                Some(more) => chunks = more,
                None => return,
            }
        }
    }
}

/// Folds one chunk of pulled messages; `Some(reason)` when the pull stream
/// said its consumer is gone (no more events will come through it).
async fn follow_chunk(
    shared: &Arc<Shared>,
    memory: &mut Memory,
    chunk: Vec<Result<async_nats::jetstream::Message, pull::MessagesError>>,
    stop: &Stop,
) -> Option<String> {
    let mut gone = None;
    for item in chunk {
        let message = match item {
            Ok(message) => message,
            Err(e) if consumer_gone(&e) => {
                gone = Some(e.to_string());
                continue;
            }
            Err(e) => {
                tracing::debug!(error = %e, "pull stream notice");
                continue;
            }
        };
        if let Ok(info) = message.info() {
            ::metrics::gauge!(jetsource_core::metrics::SNAPSHOTTER_LAG_EVENTS)
                .set(info.pending as f64);
            let event = RecordedEvent::from_parts(
                message.subject.as_str(),
                info.stream_sequence,
                info.published,
                message.headers.as_ref(),
                message.payload.clone(),
            );
            if let Ok(event) = event {
                let epoch = shared.store.privacy().epoch();
                if memory.epoch != epoch {
                    memory.states.clear();
                    memory.epoch = epoch;
                }
                let mut event = [event];
                match shared.store.open_events(&mut event).await {
                    Ok(()) => shared.follow(memory, &event[0], stop).await,
                    Err(e) => {
                        // Its state is not followed: the next event finds a
                        // gap and loads the aggregate again.
                        tracing::warn!(error = %e, "cannot open an event's personal data");
                        memory.states.pop(&(
                            event[0].aggregate_type.clone(),
                            event[0].aggregate_id.clone(),
                        ));
                    }
                }
            }
        }
        if let Err(e) = message.ack().await {
            tracing::debug!(error = %e, "ack failed; the event will come again");
        }
    }
    gone
}

/// The pull stream's errors that mean its consumer no longer exists: the
/// server said so, or nothing answers its pull requests.
fn consumer_gone(error: &pull::MessagesError) -> bool {
    matches!(
        error.kind(),
        pull::MessagesErrorKind::ConsumerDeleted | pull::MessagesErrorKind::NoResponders
    )
}

/// Creates the consumer (again: the same durable, so an existing one is
/// kept as it is) and a new pull subscription, retried with back-off until
/// `stop`; `consumer` readiness passes once both worked.
async fn reopen(store: &EventStore, readiness: &Readiness, stop: &Stop) -> Option<Chunks> {
    let mut stop = stop.clone();
    let mut backoff = FIRST_BACKOFF;
    loop {
        let attempt = async {
            let consumer = store.create_consumer(consumer_config()).await?;
            Ok::<_, RunError>(pull_messages(&consumer).await?)
        };
        match attempt.await {
            Ok(chunks) => {
                readiness.pass("consumer");
                return Some(chunks);
            }
            Err(e) => {
                let why = jetsource_core::error_chain(&e);
                tracing::warn!(error = %why, "cannot follow the event stream; retrying");
                readiness.fail("consumer", format!("consumer {CONSUMER}: {why}"));
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            () = stopping_now(&mut stop) => return None,
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// Runs until `shutdown` resolves, then finishes the events and snapshot
/// requests it had taken, by the stop deadline
/// ([`jetsource_core::stop_deadline`]) at the latest: with NATS gone, what
/// is left unacknowledged is delivered again later, to this or another
/// copy. A `shutdown` during start-up returns at once.
pub async fn run(
    config: Config,
    registry: Registry,
    shutdown: impl Future<Output = ()>,
) -> Result<(), RunError> {
    tokio::pin!(shutdown);
    // The listener first: `/healthz` answers while NATS is still being
    // reached, `/readyz` says what is missing. Closed on return.
    let readiness = Readiness::new();
    readiness.fail(
        "consumer",
        "consumer and request subscription not bound yet",
    );
    let _http = health::serve(&config.http, readiness.clone())
        .await
        .map_err(RunError::Http)?;
    let started = tokio::select! {
        started = start(&config, registry, &readiness) => started?,
        () = &mut shutdown => {
            tracing::info!("stopped before running");
            return Ok(());
        }
    };
    let Started {
        client,
        shared,
        chunks,
        requests,
        service,
    } = started;
    tracing::info!(bucket = %config.snapshot.bucket, every = config.snapshot.every, "snapshotter running");
    // Events and requests watch `stop`: retries end, no new chunk is taken.
    // A step in progress is not cut short but bounded by the stop deadline.
    let (stopping, stop) = watch::channel(false);
    let cache_size = config.snapshot.cache_size;
    let events = tokio::spawn(follow_events(
        shared.clone(),
        chunks,
        cache_size,
        readiness.clone(),
        stop.clone(),
    ));
    let stopped = async {
        shutdown.await;
        readiness.stopping();
        tracing::info!("stopping: finishing the events and requests taken");
        stopping.send_replace(true);
    };
    let deadline = micro::serve(
        &client,
        requests,
        &service,
        ENDPOINT,
        MAX_REQUESTS_IN_FLIGHT,
        move |message| serve_request(shared.clone(), stop.clone(), message),
        stopped,
    )
    .await;
    // Also when the request subscription ended by itself.
    stopping.send_replace(true);
    finish_events(events, deadline).await;
    service.stop();
    jetsource_core::flush_before_exit(&[&client], deadline).await;
    tracing::info!("snapshotter stopped");
    Ok(())
}

/// Serves one snapshot request (for [`micro::serve`]): where to reply, and
/// the reply.
async fn serve_request(
    shared: Arc<Shared>,
    stop: Stop,
    message: async_nats::Message,
) -> (
    Option<async_nats::Subject>,
    Result<serde_json::Value, ErrorBody>,
) {
    let reply = shared.on_request(message.subject.as_str(), &stop).await;
    (message.reply, reply)
}

/// Waits for the events task until `deadline`, then ends it: what it had
/// not acknowledged is delivered again later.
async fn finish_events(mut events: tokio::task::JoinHandle<()>, deadline: tokio::time::Instant) {
    if tokio::time::timeout_at(deadline, &mut events)
        .await
        .is_err()
    {
        tracing::warn!(
            "events still in progress at the stop deadline ({:?} after the signal); stopping anyway",
            jetsource_core::STOP_BUDGET
        );
        events.abort();
    }
}

/// Connections, consumer and subscriptions of a snapshotter about to run.
struct Started {
    client: async_nats::Client,
    shared: Arc<Shared>,
    chunks: Chunks,
    requests: async_nats::Subscriber,
    service: MicroService,
}

/// The durable consumer all copies share: every event, acknowledged one
/// by one.
fn consumer_config() -> pull::Config {
    pull::Config {
        durable_name: Some(CONSUMER.into()),
        description: Some("jetsource snapshotter".into()),
        filter_subject: format!("{EVENT_SUBJECT_PREFIX}.>"),
        deliver_policy: DeliverPolicy::All,
        ack_policy: AckPolicy::Explicit,
        ack_wait: Duration::from_secs(60),
        max_ack_pending: 10_000,
        ..Default::default()
    }
}

async fn start(
    config: &Config,
    registry: Registry,
    readiness: &Readiness,
) -> Result<Started, RunError> {
    let client = jetsource_core::connect(&config.nats, SERVICE_NAME).await?;
    readiness.watch_nats(client.clone());
    let store =
        EventStore::open_when_available(client.clone(), &config.nats, &config.store).await?;
    // Personal fields open with keys a command worker hands out.
    let privacy = jetsource_core::privacy::Privacy::from_service(client.clone(), config);
    privacy.start_listening(client.clone());
    let store = store.with_privacy(privacy);
    let snapshots = SnapshotStore::open_when_available(
        store.jetstream(),
        &config.snapshot,
        config.store.replicas,
    )
    .await?;
    let consumer = store.create_consumer(consumer_config()).await?;
    let chunks = pull_messages(&consumer).await?;
    let shared = Arc::new(Shared {
        store,
        snapshots,
        registry,
        config: config.snapshot.clone(),
    });
    let queue_group = config.snapshot.queue_group.clone();
    let requests = client
        .queue_subscribe(REQUEST_SUBJECTS, queue_group.clone())
        .await?;
    let service = MicroService::start(
        &client,
        SERVICE_NAME,
        env!("CARGO_PKG_VERSION"),
        "jetsource snapshotter: periodic aggregate snapshots",
        vec![Endpoint {
            name: ENDPOINT.into(),
            subject: REQUEST_SUBJECTS.into(),
            queue_group,
        }],
    )
    .await?;
    readiness.pass("consumer");
    Ok(Started {
        client,
        shared,
        chunks,
        requests,
        service,
    })
}
