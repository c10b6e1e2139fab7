//! The projector: keeps read models in Redis from the event stream, with
//! exactly-once effects, and serves queries on them.
//!
//! Per projection, a manager task watches the projection's metadata in Redis
//! and runs one [`runner`] per live generation (the active one, plus the one
//! being rebuilt). Each runner pulls a durable consumer in a pinned-client
//! priority group: one copy of the projector applies a generation at a time,
//! in stream order; the others stand by and take over within
//! `projector.failover_ms` when it stops pulling. Queries are served by
//! every copy (queue group `jetsource-projector`).

pub mod dlq;
pub mod keys;
pub mod projection;
mod query;
pub mod read;
pub mod redis_store;
pub mod runner;
pub mod status;

pub use query::Router;
/// The Redis client crate the projector is built with: queries read through
/// its types ([`read::ReadView::connection`]).
pub use redis;
pub use shared::Shared;

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use jetsource_core::config::Config;
use jetsource_core::health::{self, Readiness};
use jetsource_core::store::{EventStore, StoreError};
use jetsource_core::ErrorClass;
use tokio::sync::{watch, Notify};

use crate::dlq::DlqError;
use crate::projection::Projection;
use crate::redis_store::{Meta, RedisStore};
use crate::runner::Progress;

pub const SERVICE_NAME: &str = "jetsource-projector";

/// Subject on which the applying copy announces each batch:
/// `jetsource.progress.<projection>`, body `{"generation": g, "watermark": s,
/// "pid": p}` (`pid`: the announcing process's id).
pub fn progress_subject(projection: &str) -> String {
    format!("jetsource.progress.{projection}")
}

/// Subject that wakes the managers of a projection (after `jetsource
/// projection rebuild`).
pub fn control_subject(projection: &str) -> String {
    format!("jetsource.control.{projection}")
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// NATS or the event stream.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The dead-letter stream.
    #[error(transparent)]
    DeadLetters(#[from] DlqError),
    #[error("cannot reach Redis at {url}: {source}; is redis-server running?")]
    Redis {
        url: String,
        #[source]
        source: redis::RedisError,
    },
    /// A subscription NATS refused or could not take.
    #[error("cannot subscribe to {subject}: {source}")]
    Subscribe {
        subject: &'static str,
        #[source]
        source: async_nats::SubscribeError,
    },
    /// The query service could not subscribe or announce itself (NATS).
    #[error("cannot start the query service: {0}")]
    Queries(String),
    /// The projections' declarations cannot work (two queries on one
    /// subject, a malformed query name).
    #[error("{0}")]
    Setup(String),
    /// The health listener cannot listen on `http.listen`.
    #[error("{0} (http.listen)")]
    Http(std::io::Error),
}

impl RunError {
    pub fn class(&self) -> ErrorClass {
        match self {
            RunError::Store(e) => e.class(),
            RunError::DeadLetters(e) => e.class(),
            RunError::Redis { source, .. } => redis_store::class(source),
            RunError::Subscribe { .. } | RunError::Queries(_) => ErrorClass::Transient,
            RunError::Setup(_) | RunError::Http(_) => ErrorClass::Permanent,
        }
    }
}

/// State shared by the managers, runners and the query service of one
/// process. A module of its own, so that [`runner`] and the query service
/// depend on it rather than on the crate root that starts them.
mod shared {
    use std::collections::HashMap;
    use std::sync::Arc;

    use async_nats::jetstream;
    use jetsource_core::config::ProjectorConfig;
    use jetsource_core::store::EventStore;
    use tokio::sync::{watch, Notify};

    use crate::projection::Projection;
    use crate::redis_store::RedisStore;
    use crate::Router;

    /// State shared by the managers, runners and the query service of one
    /// process.
    #[derive(Debug)]
    pub struct Shared {
        pub config: ProjectorConfig,
        pub client: async_nats::Client,
        pub js: jetstream::Context,
        pub store: EventStore,
        pub redis: RedisStore,
        pub projections: Vec<Arc<dyn Projection>>,
        pub(crate) router: Router,
        pub(crate) wake: Notify,
        /// Latest announced watermark per projection: wakes queries that wait.
        pub(crate) watermarks: HashMap<&'static str, watch::Sender<u64>>,
    }

    impl Shared {
        pub(crate) async fn announce(&self, projection: &str, generation: u64, watermark: u64) {
            // `pid` names the applying copy, so operators and the chaos tool
            // can tell which process holds the pin.
            let body = serde_json::json!({
                "generation": generation,
                "watermark": watermark,
                "pid": std::process::id(),
            });
            let _ = self
                .client
                .publish(crate::progress_subject(projection), body.to_string().into())
                .await;
        }

        pub(crate) fn wake_managers(&self) {
            self.wake.notify_waiters();
        }

        pub(crate) fn watermark_updates(&self, projection: &str) -> Option<watch::Receiver<u64>> {
            self.watermarks
                .get(projection)
                .map(watch::Sender::subscribe)
        }

        pub fn projection(&self, name: &str) -> Option<&Arc<dyn Projection>> {
            self.projections.iter().find(|p| p.name() == name)
        }
    }
}

/// A fresh generation id: the time in milliseconds, so a generation never
/// reuses the name of an older durable consumer (which would resume from
/// that consumer's position instead of the beginning).
pub fn new_generation(after: u64) -> u64 {
    let now = time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000;
    (now as u64).max(after + 1)
}

/// Runs until `shutdown` resolves, then stops taking queries, finishes
/// those in flight and stops the runners, by the stop deadline
/// ([`jetsource_core::stop_deadline`]) at the latest, whatever state NATS
/// and Redis are in. A `shutdown` during start-up returns at once.
pub async fn run(
    config: Config,
    projections: Vec<Arc<dyn Projection>>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), RunError> {
    tokio::pin!(shutdown);
    // The listener first: `/healthz` answers while NATS and Redis are still
    // being reached, `/readyz` says what is missing. Closed on return.
    let readiness = Readiness::new();
    readiness.fail("redis", "not connected yet");
    readiness.fail("subscription", "not serving queries yet");
    let _http = health::serve(&config.http, readiness.clone())
        .await
        .map_err(RunError::Http)?;
    let started = tokio::select! {
        started = start(&config, projections, &readiness) => started?,
        () = &mut shutdown => {
            tracing::info!("stopped before running");
            return Ok(());
        }
    };
    let Started {
        client,
        shared,
        announcements,
        control,
    } = started;
    let listeners = [
        tokio::spawn(follow_announcements(shared.clone(), announcements)),
        tokio::spawn(wake_on_control(shared.clone(), control)),
    ];
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut tasks: Vec<_> = shared
        .projections
        .iter()
        .map(|p| tokio::spawn(manage(shared.clone(), p.clone(), stop_rx.clone())))
        .collect();
    let queries = tokio::select! {
        queries = query::serve(shared.clone(), &config, stop_rx.clone()) => {
            Some(queries.map_err(RunError::Queries)?)
        }
        () = &mut shutdown => None,
    };
    if let Some(queries) = queries {
        tasks.push(queries);
        readiness.pass("subscription");
        tracing::info!(
            projections = ?shared.projections.iter().map(|p| p.name()).collect::<Vec<_>>(),
            "projector running; queries on query.>"
        );
        shutdown.await;
    }
    readiness.stopping();
    tracing::info!("stopping: finishing the current batches and queries");
    stop_tx.send_replace(true);
    // Queries drain and the managers stop their runners side by side, by
    // one deadline: with NATS or Redis gone, their last calls give up there
    // (a runner's unacknowledged batch is delivered again later, and
    // applied once).
    let deadline = jetsource_core::stop_deadline();
    finish_by(deadline, tasks).await;
    for listener in listeners {
        listener.abort();
    }
    jetsource_core::flush_before_exit(&[&client], deadline).await;
    tracing::info!("projector stopped");
    Ok(())
}

/// Every copy follows the applying copy's announcements, so queries
/// waiting for a sequence wake up as soon as it is applied.
async fn follow_announcements(shared: Arc<Shared>, mut announcements: async_nats::Subscriber) {
    while let Some(message) = announcements.next().await {
        let projection = message.subject.as_str().rsplit('.').next().unwrap_or("");
        let watermark = serde_json::from_slice::<serde_json::Value>(&message.payload)
            .ok()
            .and_then(|v| v["watermark"].as_u64())
            .unwrap_or(0);
        // Every announcement wakes waiting queries, even a lower one
        // (a generation rebuilding after Redis lost its data).
        if let Some(tx) = shared.watermarks.get(projection) {
            tx.send_replace(watermark);
        }
    }
}

/// Wakes the managers on every control message (`jetsource projection
/// rebuild`).
async fn wake_on_control(shared: Arc<Shared>, mut control: async_nats::Subscriber) {
    while control.next().await.is_some() {
        shared.wake_managers();
    }
}

/// Waits for `tasks` until `deadline`, then aborts those still running.
async fn finish_by(deadline: tokio::time::Instant, tasks: Vec<tokio::task::JoinHandle<()>>) {
    let aborts: Vec<_> = tasks.iter().map(|t| t.abort_handle()).collect();
    if tokio::time::timeout_at(deadline, futures::future::join_all(tasks))
        .await
        .is_err()
    {
        tracing::warn!(
            "queries or batches still in progress at the stop deadline ({:?} after the signal); stopping anyway",
            jetsource_core::STOP_BUDGET
        );
        for abort in aborts {
            abort.abort();
        }
    }
}

/// Connections and subscriptions of a projector about to run.
struct Started {
    client: async_nats::Client,
    shared: Arc<Shared>,
    announcements: async_nats::Subscriber,
    control: async_nats::Subscriber,
}

async fn start(
    config: &Config,
    projections: Vec<Arc<dyn Projection>>,
    readiness: &Readiness,
) -> Result<Started, RunError> {
    let router = Router::new(&projections).map_err(RunError::Setup)?;
    // Counters an alert watches exist from the start, at 0, so that the
    // first dead letter is an increase (docs/METRICS.md).
    for projection in &projections {
        ::metrics::counter!(jetsource_core::metrics::DEAD_LETTERS, "projection" => projection.name())
            .increment(0);
    }
    let client = jetsource_core::connect(&config.nats, SERVICE_NAME).await?;
    readiness.watch_nats(client.clone());
    let store =
        EventStore::open_when_available(client.clone(), &config.nats, &config.store).await?;
    // Personal fields open with keys a command worker hands out.
    let privacy = jetsource_core::privacy::Privacy::from_service(client.clone(), config);
    privacy.start_listening(client.clone());
    let store = store.with_privacy(privacy);
    let js = store.jetstream().clone();
    dlq::ensure_stream(
        &js,
        &config.projector.dead_letter_stream,
        config.store.replicas,
    )
    .await?;
    let redis = RedisStore::connect_with(&config.redis)
        .await
        .map_err(|source| RunError::Redis {
            url: config.redis.url.clone(),
            source,
        })?;
    // Redis as queries see it: a read of the first projection's metadata
    // on the query connection, bounded by `redis.timeout_ms`.
    if let Some(first) = projections.first().map(|p| p.name()) {
        let probed = redis.clone();
        readiness.probe("redis", move || {
            let redis = probed.clone();
            async move {
                redis
                    .meta(first)
                    .await
                    .map(|_| ())
                    .map_err(|e| format!("Redis not reachable: {e}"))
            }
        });
    } else {
        readiness.pass("redis");
    }
    let watermarks = projections
        .iter()
        .map(|p| (p.name(), watch::channel(0).0))
        .collect();
    let shared = Arc::new(Shared {
        config: config.projector.clone(),
        client: client.clone(),
        js,
        store,
        redis,
        router,
        projections,
        wake: Notify::new(),
        watermarks,
    });

    let subscribe = |subject: &'static str| {
        let client = client.clone();
        async move {
            client
                .subscribe(subject)
                .await
                .map_err(|source| RunError::Subscribe { subject, source })
        }
    };
    let announcements = subscribe("jetsource.progress.*").await?;
    let control = subscribe("jetsource.control.*").await?;
    Ok(Started {
        client,
        shared,
        announcements,
        control,
    })
}

struct Running {
    task: tokio::task::JoinHandle<()>,
    stop: watch::Sender<bool>,
    progress: Arc<Progress>,
}

/// Keeps the runners of one projection in line with its metadata: starts
/// the active and building generations, switches a caught-up rebuild in,
/// retires old generations, and rebuilds from scratch when Redis lost the
/// metadata (FLUSHALL, a restart without persistence).
async fn manage(
    shared: Arc<Shared>,
    projection: Arc<dyn Projection>,
    mut stop: watch::Receiver<bool>,
) {
    let mut manager = Manager {
        shared,
        projection,
        running: HashMap::new(),
        seen_meta: false,
        cleaned: false,
    };
    let name = manager.projection.name();
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    loop {
        tokio::select! {
            _ = stop.wait_for(|s| *s) => break,
            _ = tick.tick() => {}
            _ = manager.shared.wake.notified() => {}
        }
        match manager.shared.redis.meta(name).await {
            Ok(Some(meta)) => manager.follow(&meta).await,
            Ok(None) => {
                manager.start_over().await;
                tick.reset_immediately();
            }
            Err(e) => {
                tracing::warn!(projection = name, error = %e, "cannot read projection metadata");
            }
        }
    }
    for (_, r) in manager.running.drain() {
        r.stop.send_replace(true);
        let _ = r.task.await;
    }
}

/// The state of one projection's manager.
struct Manager {
    shared: Arc<Shared>,
    projection: Arc<dyn Projection>,
    /// Runners by generation.
    running: HashMap<u64, Running>,
    /// The metadata was there at the last look.
    seen_meta: bool,
    /// Generations older than the active one were retired.
    cleaned: bool,
}

impl Manager {
    /// Brings the runners in line with `meta`.
    async fn follow(&mut self, meta: &Meta) {
        self.seen_meta = true;
        let mut wanted = vec![meta.active];
        if let Some((building, _)) = meta.building {
            wanted.push(building);
        }
        self.running.retain(|generation, r| {
            let keep = wanted.contains(generation) && !r.progress.stopped.load(Ordering::SeqCst);
            if !keep {
                r.stop.send_replace(true);
            }
            keep
        });
        for &generation in &wanted {
            if !self.running.contains_key(&generation) {
                let running = self.start_runner(generation);
                self.running.insert(generation, running);
            }
        }
        let name = self.projection.name();
        if !self.cleaned {
            retire_older(&self.shared, name, meta.active).await;
            self.cleaned = true;
        }
        if let Some((building, _)) = meta.building {
            self.switch_if_caught_up(meta.active, building).await;
        }
    }

    fn start_runner(&self, generation: u64) -> Running {
        let progress = Arc::new(Progress::default());
        let (stop, stop_rx) = watch::channel(false);
        let task = tokio::spawn(runner::run(
            self.shared.clone(),
            self.projection.clone(),
            generation,
            progress.clone(),
            stop_rx,
        ));
        Running {
            task,
            stop,
            progress,
        }
    }

    /// Makes the rebuilt generation `building` active once it caught up,
    /// then stops and retires `active`.
    async fn switch_if_caught_up(&mut self, active: u64, building: u64) {
        let caught_up = self
            .running
            .get(&building)
            .is_some_and(|r| r.progress.caught_up.load(Ordering::SeqCst));
        if !caught_up {
            return;
        }
        let name = self.projection.name();
        match self.shared.redis.switch(name, building).await {
            Ok(true) => {
                tracing::info!(
                    projection = name,
                    from = active,
                    to = building,
                    "rebuild caught up; switched"
                );
                if let Some(old) = self.running.remove(&active) {
                    old.stop.send_replace(true);
                    let _ = old.task.await;
                }
                // Queries that read the old generation just before
                // the switch see it whole; they re-check and retry.
                retire(&self.shared, name, active).await;
            }
            Ok(false) => {}
            Err(e) => {
                tracing::warn!(projection = name, error = %e, "switch failed; will retry")
            }
        }
    }

    /// The metadata is missing (never created, or lost by Redis): records a
    /// new generation, which the next look starts from the stream's
    /// beginning.
    async fn start_over(&mut self) {
        let name = self.projection.name();
        if self.seen_meta {
            tracing::warn!(
                projection = name,
                "Redis lost this read model; rebuilding it from the event stream"
            );
        }
        let generation = new_generation(self.running.keys().copied().max().unwrap_or(0));
        if let Err(e) = self
            .shared
            .redis
            .init_meta(name, generation, self.shared.config.partitions)
            .await
        {
            tracing::warn!(projection = name, error = %e, "cannot initialise projection metadata");
        }
        self.seen_meta = false;
        self.cleaned = false;
    }
}

/// Deletes a generation's consumer and keys.
async fn retire(shared: &Shared, name: &str, generation: u64) {
    let consumer = runner::consumer_name(name, generation);
    match shared.store.delete_consumer(&consumer).await {
        Ok(()) => {}
        Err(e) => tracing::debug!(consumer, error = %e, "consumer already gone"),
    }
    match shared.redis.delete_generation(name, generation).await {
        Ok(keys) => tracing::info!(projection = name, generation, keys, "retired generation"),
        Err(e) => {
            tracing::warn!(projection = name, generation, error = %e, "cannot delete old keys")
        }
    }
}

/// Retires every generation older than `active` still having a consumer:
/// leftovers of a rebuild or of a lost Redis.
async fn retire_older(shared: &Shared, name: &str, active: u64) {
    let consumers = match shared.store.consumer_names().await {
        Ok(consumers) => consumers,
        Err(e) => {
            tracing::warn!(projection = name, error = %e, "cannot list the old generations");
            return;
        }
    };
    let prefix = format!("{name}-g");
    let old = consumers.iter().filter_map(|consumer| {
        consumer
            .strip_prefix(&prefix)
            .and_then(|g| g.parse::<u64>().ok())
            .filter(|&generation| generation < active)
    });
    for generation in old {
        retire(shared, name, generation).await;
    }
}
