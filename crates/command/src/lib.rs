//! The command worker: a NATS service on `cmd.>` in a queue group. Each
//! request names one aggregate (`cmd.<type>.<id>`); the worker loads it
//! (usually from its cache), lets the domain decide, and appends the events
//! with optimistic concurrency. N copies share the load with no coordination
//! beyond the queue group and the store's expected-sequence check.

mod cache;
mod handler;
mod multi;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tracing::Instrument;

use jetsource_core::aggregate::Registry;
use jetsource_core::config::Config;
use jetsource_core::health::{self, Readiness};
use jetsource_core::micro::{self, Endpoint, MicroService};
use jetsource_core::privacy::Privacy;
use jetsource_core::protocol::COMMAND_SUBJECT_PREFIX;
use jetsource_core::snapshot::SnapshotStore;
use jetsource_core::store::{EventStore, StoreError};
use jetsource_core::ErrorClass;

pub use handler::{snapshot_request_subject, Snapshots, Worker, COMMAND_DEADLINE};

/// Name under which copies of the worker appear in `$SRV.PING/INFO/STATS`.
pub const SERVICE_NAME: &str = "jetsource-command";

/// The one endpoint, as named in `$SRV.INFO` and `$SRV.STATS`.
pub const ENDPOINT: &str = "commands";

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Store(#[from] StoreError),
    /// NATS refused or could not take a subscription of the service.
    #[error("cannot start the NATS service: {0}")]
    Service(#[from] async_nats::SubscribeError),
    /// The health listener cannot listen on `http.listen`.
    #[error("{0} (http.listen)")]
    Http(std::io::Error),
}

impl RunError {
    pub fn class(&self) -> ErrorClass {
        match self {
            RunError::Store(e) => e.class(),
            RunError::Service(_) => ErrorClass::Transient,
            RunError::Http(_) => ErrorClass::Permanent,
        }
    }
}

/// Serves commands until `shutdown` resolves, then stops taking requests,
/// finishes those in flight and returns (within
/// [`jetsource_core::STOP_BUDGET`] whatever state NATS is in). A `shutdown`
/// during start-up (NATS not reachable yet) returns at once.
pub async fn run(
    config: Config,
    registry: Registry,
    shutdown: impl Future<Output = ()>,
) -> Result<(), RunError> {
    tokio::pin!(shutdown);
    // The listener first: `/healthz` answers while NATS is still being
    // reached, `/readyz` says what is missing. Dropped (closed) on return.
    let readiness = Readiness::new();
    readiness.fail("subscription", "not subscribed to cmd.> yet");
    let _http = health::serve(&config.http, readiness.clone())
        .await
        .map_err(RunError::Http)?;
    let started = tokio::select! {
        started = start(&config, registry, &readiness) => started?,
        () = &mut shutdown => {
            tracing::info!("stopped before serving");
            return Ok(());
        }
    };
    let Started {
        client,
        store_client,
        worker,
        requests,
        service,
        queue_group,
    } = started;
    tracing::info!(
        queue_group = %queue_group,
        stream = %config.store.stream,
        types = ?worker.aggregate_types(),
        id = service.id(),
        "command worker serving cmd.>"
    );

    let handle = move |message: async_nats::Message| {
        let worker = worker.clone();
        async move {
            // The client's trace continues here (docs/TRACING.md).
            let span = tracing::info_span!("receive command", subject = %message.subject);
            jetsource_core::telemetry::continue_from_nats(&span, message.headers.as_ref());
            let reply = worker
                .handle(message.subject.as_str(), &message.payload)
                .instrument(span)
                .await;
            (message.reply, reply)
        }
    };
    let deadline = micro::serve(
        &client,
        requests,
        &service,
        ENDPOINT,
        config.command.max_in_flight,
        handle,
        async {
            shutdown.await;
            readiness.stopping();
            tracing::info!("stopping: no new requests, finishing those in flight");
        },
    )
    .await;
    service.stop();
    // Both connections at once, by the deadline the drain had: with NATS
    // gone, one after the other each waited its own timeout.
    jetsource_core::flush_before_exit(&[&client, &store_client], deadline).await;
    tracing::info!("command worker stopped");
    Ok(())
}

/// Connections, store and subscription of a worker about to serve.
struct Started {
    client: async_nats::Client,
    store_client: async_nats::Client,
    worker: Arc<Worker>,
    requests: async_nats::Subscriber,
    service: MicroService,
    queue_group: String,
}

async fn start(
    config: &Config,
    registry: Registry,
    readiness: &Readiness,
) -> Result<Started, RunError> {
    let client = jetsource_core::connect(&config.nats, SERVICE_NAME).await?;
    readiness.watch_nats(client.clone());
    // The event store gets a connection of its own: requests and replies on
    // one, appends, acks and reads on the other, each read by its own task.
    // On one shared connection a single task parsed everything, and the
    // worker's latency tail grew with the load (docs/bench/NOTES.md).
    let store_client = jetsource_core::connect(&config.nats, SERVICE_NAME).await?;
    let store =
        EventStore::open_when_available(store_client.clone(), &config.nats, &config.store).await?;
    // Personal data: keys from the bucket, served to the other workers.
    let privacy = Privacy::from_bucket(&store, config);
    privacy.start_listening(client.clone());
    let store = store.with_privacy(privacy.clone());
    // Read-only mode (docs/PROTOCOL.md): with the event stream leaderless
    // (quorum lost) commands answer `unavailable`, and so does `/readyz`.
    let probed = store.clone();
    readiness.probe("event_store", move || {
        let store = probed.clone();
        async move {
            let info = store.info().await.map_err(|e| e.to_string())?;
            match info.cluster {
                Some(cluster) if cluster.leader.is_none() => {
                    Err("the event stream has no leader".to_owned())
                }
                _ => Ok(()),
            }
        }
    });
    let snapshots = handler::Snapshots {
        store: SnapshotStore::open_when_available(
            store.jetstream(),
            &config.snapshot,
            config.store.replicas,
        )
        .await?,
        client: client.clone(),
        slow_load: (config.snapshot.slow_load_ms > 0)
            .then(|| Duration::from_millis(config.snapshot.slow_load_ms)),
    };
    let worker = Arc::new(Worker::new(
        store,
        snapshots,
        registry,
        config.command.clone(),
    ));

    let subject = format!("{COMMAND_SUBJECT_PREFIX}.>");
    let queue_group = config.command.queue_group.clone();
    tokio::spawn({
        let (client, group) = (client.clone(), queue_group.clone());
        async move {
            if let Err(e) = privacy.serve(client, group).await {
                tracing::warn!(error = %e, "cannot serve data keys");
            }
        }
    });
    let requests = client
        .queue_subscribe(subject.clone(), queue_group.clone())
        .await?;
    let service = MicroService::start(
        &client,
        SERVICE_NAME,
        env!("CARGO_PKG_VERSION"),
        "jetsource command worker: decides commands and appends their events",
        vec![Endpoint {
            name: ENDPOINT.into(),
            subject,
            queue_group: queue_group.clone(),
        }],
    )
    .await?;
    readiness.pass("subscription");
    Ok(Started {
        client,
        store_client,
        worker,
        requests,
        service,
        queue_group,
    })
}
