//! The command worker: a NATS service on `cmd.>` in a queue group. Each
//! request names one aggregate (`cmd.<type>.<id>`); the worker loads it
//! (usually from its cache), lets the domain decide, and appends the events
//! with optimistic concurrency. N copies share the load with no coordination
//! beyond the queue group and the store's expected-sequence check.

mod cache;
mod handler;

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use jetsource_core::aggregate::Registry;
use jetsource_core::config::Config;
use jetsource_core::micro::{Endpoint, MicroService};
use jetsource_core::protocol::{encode_reply, COMMAND_SUBJECT_PREFIX};
use jetsource_core::snapshot::SnapshotStore;
use jetsource_core::store::{EventStore, StoreError};
use tokio::sync::Semaphore;

pub use handler::{snapshot_request_subject, Snapshots, Worker};

/// Name under which copies of the worker appear in `$SRV.PING/INFO/STATS`.
pub const SERVICE_NAME: &str = "jetsource-command";

/// The one endpoint, as named in `$SRV.INFO` and `$SRV.STATS`.
pub const ENDPOINT: &str = "commands";

/// How long shutdown waits for requests already taken to finish.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("cannot start the NATS service: {0}")]
    Service(String),
}

/// Serves commands until `shutdown` resolves, then stops taking requests,
/// finishes those in flight and returns.
pub async fn run(
    config: Config,
    registry: Registry,
    shutdown: impl Future<Output = ()>,
) -> Result<(), RunError> {
    let client = jetsource_core::connect(&config.nats, SERVICE_NAME).await?;
    let store = EventStore::open(client.clone(), &config.nats, &config.store).await?;
    let snapshots = handler::Snapshots {
        store: SnapshotStore::open(store.jetstream(), &config.snapshot, config.store.replicas)
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
    let mut requests = client
        .queue_subscribe(subject.clone(), queue_group.clone())
        .await
        .map_err(|e| RunError::Service(e.to_string()))?;
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
    .await
    .map_err(|e| RunError::Service(e.to_string()))?;
    tracing::info!(
        queue_group = %queue_group,
        stream = %config.store.stream,
        types = ?worker.aggregate_types(),
        id = service.id(),
        "command worker serving cmd.>"
    );

    let max_in_flight = config.command.max_in_flight;
    let permits = Arc::new(Semaphore::new(max_in_flight));
    let serve = |message: async_nats::Message, permit| {
        let worker = worker.clone();
        let client = client.clone();
        let service = service.clone();
        tokio::spawn(async move {
            let started = Instant::now();
            let reply = worker
                .handle(message.subject.as_str(), &message.payload)
                .await;
            let error = reply
                .as_ref()
                .err()
                .map(|e| format!("{}: {}", e.code, e.message));
            if let Some(to) = message.reply {
                if let Err(e) = client.publish(to, encode_reply(&reply)).await {
                    tracing::warn!(error = %e, "could not send a reply");
                }
            }
            service.record(ENDPOINT, started.elapsed(), error.as_deref());
            drop(permit);
        });
    };

    tokio::pin!(shutdown);
    loop {
        // Taking a permit before the next request keeps at most
        // `max_in_flight` requests in this process; the rest wait in NATS
        // where other copies can take them.
        let permit = permits
            .clone()
            .acquire_owned()
            .await
            .expect("semaphore is never closed");
        tokio::select! {
            biased;
            () = &mut shutdown => break,
            message = requests.next() => match message {
                Some(message) => serve(message, permit),
                None => break,
            },
        }
    }

    tracing::info!("stopping: no new requests, finishing those in flight");
    // Drain, not unsubscribe: requests the server routed to this copy before
    // it saw the unsubscribe are still delivered, and served.
    if let Err(e) = requests.drain().await {
        tracing::warn!(error = %e, "could not drain the request subscription");
    }
    let drain = async {
        while let Some(message) = requests.next().await {
            let permit = permits
                .clone()
                .acquire_owned()
                .await
                .expect("semaphore is never closed");
            serve(message, permit);
        }
        let _all = permits
            .acquire_many(max_in_flight as u32)
            .await
            .expect("semaphore is never closed");
    };
    if tokio::time::timeout(DRAIN_TIMEOUT, drain).await.is_err() {
        tracing::warn!("requests still in flight after {DRAIN_TIMEOUT:?}; exiting anyway");
    }
    service.stop();
    let _ = client.flush().await;
    tracing::info!("command worker stopped");
    Ok(())
}
