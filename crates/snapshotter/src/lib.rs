//! The snapshotter: follows the event stream through a durable consumer and,
//! every `snapshot.every` events of an aggregate (per type configurable),
//! stores the aggregate's state in the snapshot bucket. It also takes a
//! snapshot on request (`jetsource.snapshot.request.<type>.<id>`, sent by
//! the command worker after a slow load).
//!
//! Several copies may run: they share one consumer, and a snapshot only ever
//! replaces an older one (compare-and-set on the bucket entry), so the order
//! in which copies finish does not matter.

use std::future::Future;
use std::num::NonZeroUsize;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::consumer::{pull, AckPolicy, DeliverPolicy};
use futures::StreamExt;
use jetsource_core::aggregate::{DynAggregate, Registry};
use jetsource_core::config::{Config, SnapshotConfig};
use jetsource_core::envelope::{RecordedEvent, EVENT_SUBJECT_PREFIX};
use jetsource_core::loader::{LoadError, Loaded, Until};
use jetsource_core::micro::{Endpoint, MicroService};
use jetsource_core::snapshot::{SnapshotStore, Written};
use jetsource_core::store::{EventStore, StoreError};
use lru::LruCache;
use tokio::sync::watch;

pub const SERVICE_NAME: &str = "jetsource-snapshotter";
/// Durable consumer shared by all copies.
pub const CONSUMER: &str = "snapshotter";

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{0}")]
    Setup(String),
}

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error(transparent)]
    Load(#[from] LoadError),
    #[error(transparent)]
    Store(#[from] StoreError),
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
    Ok(Some(
        snapshots
            .put_if_newer(&snapshot, aggregate.state_schema_version())
            .await?,
    ))
}

/// Whether the event at `version` of `aggregate_type` is a snapshot point.
pub fn due(config: &SnapshotConfig, aggregate_type: &str, version: u64) -> bool {
    version > 0 && version % config.every(aggregate_type) == 0
}

/// Rebuilds the snapshots of every aggregate (of `only_type`, if given) from
/// a full replay, replacing whatever is stored. `progress` is called after
/// each aggregate with (done, total).
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
        let mut tokens = subject.splitn(3, '.').skip(1);
        let (Some(aggregate_type), Some(aggregate_id)) = (tokens.next(), tokens.next()) else {
            continue;
        };
        let Some(aggregate) = registry.get(aggregate_type) else {
            continue;
        };
        let loaded = Loaded::load(store, aggregate.as_ref(), aggregate_id, Until::End).await?;
        if let Some(snapshot) = loaded.to_snapshot(aggregate.as_ref(), aggregate_id) {
            let bytes = serde_json::to_vec(&snapshot).unwrap_or_default();
            snapshots
                .put_raw(
                    &jetsource_core::snapshot::Snapshot::key(aggregate_type, aggregate_id),
                    bytes,
                )
                .await?;
            written += 1;
        }
        progress(done + 1, total);
    }
    Ok(written)
}

struct Shared {
    store: EventStore,
    snapshots: SnapshotStore,
    registry: Registry,
    config: SnapshotConfig,
}

/// Aggregate states kept by the snapshotter, by `(type, id)`.
type States = LruCache<(String, String), Loaded>;

/// Turns true when the snapshotter is stopping.
type Stop = watch::Receiver<bool>;

/// Resolves once `stop` is true.
async fn stopping_now(stop: &mut Stop) {
    let _ = stop.wait_for(|s| *s).await;
}

/// Waits `backoff` before a retry; `false` (at once) when stopping: a
/// stopping snapshotter does not retry (snapshots are a cache, and with
/// NATS gone the retries only held the stop up).
async fn pause(backoff: Duration, stop: &Stop) -> bool {
    let mut stop = stop.clone();
    if *stop.borrow_and_update() {
        return false;
    }
    tokio::select! {
        _ = tokio::time::sleep(backoff) => true,
        () = stopping_now(&mut stop) => false,
    }
}

impl Shared {
    /// Folds `event` into the aggregate's state kept in `states` (loading
    /// it, from its snapshot and the store, when it is not there or has a
    /// gap, e.g. events handled by another snapshotter copy) and writes a
    /// snapshot when one falls due.
    async fn follow(&self, states: &mut States, event: &RecordedEvent, stop: &Stop) {
        let Some(aggregate) = self.registry.get(&event.aggregate_type) else {
            return;
        };
        let aggregate = aggregate.as_ref();
        let key = (event.aggregate_type.clone(), event.aggregate_id.clone());
        let version = event.aggregate_version;
        let folded = match states.get_mut(&key) {
            Some(loaded) if loaded.version >= version => return, // seen: a redelivery
            Some(loaded) if loaded.version + 1 == version => loaded.apply(aggregate, event).is_ok(),
            _ if version == 1 => {
                let mut loaded = Loaded::empty(aggregate);
                let ok = loaded.apply(aggregate, event).is_ok();
                if ok {
                    states.put(key.clone(), loaded);
                }
                ok
            }
            _ => false,
        };
        if !folded {
            states.pop(&key);
            if !due(&self.config, &event.aggregate_type, version) {
                return;
            }
            // Not followed from its start: load it up to this event.
            let until = Until::Sequence(event.sequence);
            match Loaded::load_with_snapshot(
                &self.store,
                &self.snapshots,
                aggregate,
                &event.aggregate_id,
                until,
            )
            .await
            {
                Ok((loaded, _)) if loaded.version == version => {
                    states.put(key.clone(), loaded);
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(aggregate = %format_args!("{}.{}", event.aggregate_type, event.aggregate_id), error = %e, "cannot load; no snapshot");
                    return;
                }
            }
        }
        if !due(&self.config, &event.aggregate_type, version) {
            return;
        }
        let Some(snapshot) = states
            .get(&key)
            .and_then(|loaded| loaded.to_snapshot(aggregate, &event.aggregate_id))
        else {
            return;
        };
        let mut backoff = Duration::from_millis(100);
        for attempt in 1..=5 {
            match self
                .snapshots
                .put_if_newer(&snapshot, aggregate.state_schema_version())
                .await
            {
                Ok(written) => {
                    tracing::debug!(aggregate = %format_args!("{}.{}", event.aggregate_type, event.aggregate_id), ?written, "snapshot");
                    return;
                }
                Err(e) => {
                    tracing::warn!(aggregate = %format_args!("{}.{}", event.aggregate_type, event.aggregate_id), attempt, error = %e, "snapshot failed");
                    if !pause(backoff, stop).await {
                        return;
                    }
                    backoff *= 2;
                }
            }
        }
    }

    async fn snapshot(&self, aggregate_type: &str, aggregate_id: &str, until: Until, stop: &Stop) {
        let Some(aggregate) = self.registry.get(aggregate_type) else {
            return;
        };
        let mut backoff = Duration::from_millis(100);
        for attempt in 1..=5 {
            match take(
                &self.store,
                &self.snapshots,
                aggregate.as_ref(),
                aggregate_id,
                until,
            )
            .await
            {
                Ok(written) => {
                    tracing::debug!(aggregate = %format_args!("{aggregate_type}.{aggregate_id}"), ?written, "snapshot");
                    return;
                }
                Err(SnapshotError::Load(LoadError::Decode { .. })) => {
                    tracing::warn!(aggregate = %format_args!("{aggregate_type}.{aggregate_id}"), "history cannot be decoded; no snapshot");
                    return;
                }
                Err(e) => {
                    tracing::warn!(aggregate = %format_args!("{aggregate_type}.{aggregate_id}"), attempt, error = %e, "snapshot failed");
                    if !pause(backoff, stop).await {
                        return;
                    }
                    backoff *= 2;
                }
            }
        }
        // Snapshots are a cache: a missed one costs a longer load, nothing else.
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
    let started = tokio::select! {
        started = start(&config, registry) => started?,
        () = &mut shutdown => {
            tracing::info!("stopped before running");
            return Ok(());
        }
    };
    let Started {
        client,
        shared,
        consumer,
        mut requests,
        service,
    } = started;
    tracing::info!(bucket = %config.snapshot.bucket, every = config.snapshot.every, "snapshotter running");

    // Aggregate states folded from the consumer's own events: a snapshot
    // that falls due is written from memory. Reading each aggregate's tail
    // back from the store instead cost a scan of the stream per snapshot
    // (an aggregate's events are spread thinly over it): 594 s for a
    // 1,000,000-event backlog in the benchmark.
    let mut states: States =
        LruCache::new(NonZeroUsize::new(config.snapshot.cache_size).unwrap_or(NonZeroUsize::MIN));
    let mut messages = consumer
        .stream()
        .max_messages_per_batch(256)
        .messages()
        .await
        .map_err(|e| RunError::Setup(e.to_string()))?
        .ready_chunks(256);
    // The work watches `stop` (retries end, no new chunk is taken); a step
    // in progress is not cut short but bounded by the stop deadline below.
    let (stopping, stop) = watch::channel(false);
    let work = async {
        let mut stopped = stop.clone();
        loop {
            tokio::select! {
                biased;
                () = stopping_now(&mut stopped) => break,
                request = requests.next() => {
                    let Some(request) = request else { break };
                    let started = Instant::now();
                    let mut tokens = request.subject.as_str().splitn(5, '.').skip(3);
                    if let (Some(t), Some(id)) = (tokens.next(), tokens.next()) {
                        shared.snapshot(t, id, Until::End, &stop).await;
                    }
                    service.record("requests", started.elapsed(), None);
                }
                chunk = messages.next() => {
                    let Some(chunk) = chunk else { break };
                    for message in chunk.into_iter().flatten() {
                        if let Ok(info) = message.info() {
                            let event = RecordedEvent::from_parts(
                                message.subject.as_str(),
                                info.stream_sequence,
                                info.published,
                                message.headers.as_ref(),
                                message.payload.clone(),
                            );
                            if let Ok(event) = event {
                                shared.follow(&mut states, &event, &stop).await;
                            }
                        }
                        if let Err(e) = message.ack().await {
                            tracing::debug!(error = %e, "ack failed; the event will come again");
                        }
                    }
                }
            }
        }
        // Snapshot requests routed to this copy before it unsubscribed.
        match requests.drain().await {
            Ok(()) => {
                let pending = async {
                    while let Some(request) = requests.next().await {
                        let mut tokens = request.subject.as_str().splitn(5, '.').skip(3);
                        if let (Some(t), Some(id)) = (tokens.next(), tokens.next()) {
                            shared.snapshot(t, id, Until::End, &stop).await;
                        }
                    }
                };
                // The end of the drain is confirmed by the server: with NATS
                // gone it never comes, and nothing more can arrive either.
                let disconnected = async {
                    while client.connection_state() == async_nats::connection::State::Connected {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                };
                tokio::select! {
                    () = pending => {}
                    () = disconnected => {}
                }
            }
            Err(e) => tracing::warn!(error = %e, "could not drain the snapshot requests"),
        }
    };
    tokio::pin!(work);
    let deadline = tokio::select! {
        () = &mut work => jetsource_core::stop_deadline(),
        () = &mut shutdown => {
            tracing::info!("stopping: finishing the events and requests taken");
            stopping.send_replace(true);
            let deadline = jetsource_core::stop_deadline();
            if tokio::time::timeout_at(deadline, &mut work).await.is_err() {
                tracing::warn!(
                    "events or snapshot requests still in progress at the stop deadline ({:?} after the signal); stopping anyway",
                    jetsource_core::STOP_BUDGET
                );
            }
            deadline
        }
    };
    service.stop();
    jetsource_core::flush_before_exit(&[&client], deadline).await;
    tracing::info!("snapshotter stopped");
    Ok(())
}

/// Connections, consumer and subscription of a snapshotter about to run.
struct Started {
    client: async_nats::Client,
    shared: Arc<Shared>,
    consumer: async_nats::jetstream::consumer::PullConsumer,
    requests: async_nats::Subscriber,
    service: MicroService,
}

async fn start(config: &Config, registry: Registry) -> Result<Started, RunError> {
    let client = jetsource_core::connect(&config.nats, SERVICE_NAME).await?;
    let store =
        EventStore::open_when_available(client.clone(), &config.nats, &config.store).await?;
    let snapshots = SnapshotStore::open_when_available(
        store.jetstream(),
        &config.snapshot,
        config.store.replicas,
    )
    .await?;
    let events = store
        .jetstream()
        .get_stream(&config.store.stream)
        .await
        .map_err(|e| RunError::Setup(format!("cannot open stream {}: {e}", config.store.stream)))?;
    let consumer = events
        .create_consumer(pull::Config {
            durable_name: Some(CONSUMER.into()),
            description: Some("jetsource snapshotter".into()),
            filter_subject: format!("{EVENT_SUBJECT_PREFIX}.>"),
            deliver_policy: DeliverPolicy::All,
            ack_policy: AckPolicy::Explicit,
            ack_wait: Duration::from_secs(60),
            max_ack_pending: 10_000,
            ..Default::default()
        })
        .await
        .map_err(|e| RunError::Setup(format!("cannot create the snapshotter consumer: {e}")))?;
    let shared = Arc::new(Shared {
        store,
        snapshots,
        registry,
        config: config.snapshot.clone(),
    });
    let requests = client
        .queue_subscribe(
            "jetsource.snapshot.request.>",
            config.snapshot.queue_group.clone(),
        )
        .await
        .map_err(|e| RunError::Setup(e.to_string()))?;
    let service = MicroService::start(
        &client,
        SERVICE_NAME,
        env!("CARGO_PKG_VERSION"),
        "jetsource snapshotter: periodic aggregate snapshots",
        vec![Endpoint {
            name: "requests".into(),
            subject: "jetsource.snapshot.request.>".into(),
            queue_group: config.snapshot.queue_group.clone(),
        }],
    )
    .await
    .map_err(|e| RunError::Setup(e.to_string()))?;
    Ok(Started {
        client,
        shared,
        consumer,
        requests,
        service,
    })
}
