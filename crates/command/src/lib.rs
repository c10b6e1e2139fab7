//! The command worker: a NATS service on `cmd.>` in a queue group. Each
//! request names one aggregate (`cmd.<type>.<id>`); the worker loads it
//! (usually from its cache), lets the domain decide, and appends the events
//! with optimistic concurrency. N copies share the load with no coordination
//! beyond the queue group and the store's expected-sequence check.

mod cache;
mod handler;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use async_nats::service::ServiceExt;
use futures::StreamExt;
use jetsource_core::aggregate::Registry;
use jetsource_core::config::Config;
use jetsource_core::protocol::{encode_reply, COMMAND_SUBJECT_PREFIX};
use jetsource_core::store::{EventStore, StoreError};
use tokio::sync::Semaphore;

pub use handler::Worker;

/// Name under which copies of the worker appear in `$SRV.PING/INFO/STATS`.
pub const SERVICE_NAME: &str = "jetsource-command";

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
    let worker = Arc::new(Worker::new(store, registry, config.command.clone()));

    let service = client
        .service_builder()
        .description("jetsource command worker: decides commands and appends their events")
        .queue_group(&config.command.queue_group)
        .start(SERVICE_NAME, env!("CARGO_PKG_VERSION"))
        .await
        .map_err(|e| RunError::Service(e.to_string()))?;
    let mut endpoint = service
        .endpoint_builder()
        .name("commands")
        .add(format!("{COMMAND_SUBJECT_PREFIX}.>"))
        .await
        .map_err(|e| RunError::Service(e.to_string()))?;
    tracing::info!(
        queue_group = %config.command.queue_group,
        stream = %config.store.stream,
        types = ?worker.aggregate_types(),
        "command worker serving cmd.>"
    );

    let max_in_flight = config.command.max_in_flight;
    let permits = Arc::new(Semaphore::new(max_in_flight));
    let serve = |request: async_nats::service::Request, permit| {
        let worker = worker.clone();
        tokio::spawn(async move {
            let reply = worker
                .handle(request.message.subject.as_str(), &request.message.payload)
                .await;
            if let Err(e) = request.respond(Ok(encode_reply(&reply))).await {
                tracing::warn!(error = %e, "could not send a reply");
            }
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
            request = endpoint.next() => match request {
                Some(request) => serve(request, permit),
                None => break,
            },
        }
    }

    tracing::info!("stopping: no new requests, finishing those in flight");
    if let Err(e) = endpoint.stop().await {
        tracing::warn!(error = %e, "could not unsubscribe cleanly");
    }
    // Requests already delivered to this copy before the unsubscribe took
    // effect are served, not dropped.
    let drain = async {
        while let Some(request) = endpoint.next().await {
            let permit = permits
                .clone()
                .acquire_owned()
                .await
                .expect("semaphore is never closed");
            serve(request, permit);
        }
        let _all = permits
            .acquire_many(max_in_flight as u32)
            .await
            .expect("semaphore is never closed");
    };
    if tokio::time::timeout(DRAIN_TIMEOUT, drain).await.is_err() {
        tracing::warn!("requests still in flight after {DRAIN_TIMEOUT:?}; exiting anyway");
    }
    let _ = service.stop().await;
    let _ = client.flush().await;
    tracing::info!("command worker stopped");
    Ok(())
}
