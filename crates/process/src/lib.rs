//! The process worker: drives an application's process managers
//! (`jetsource::domain::process`).
//!
//! Why a worker kind of its own rather than a role of the command worker
//! or the projector: a process reacts to events (like the projector) and
//! sends commands (like a client). Running it inside the command worker
//! would make that worker a client of itself, and a burst of process work
//! would queue behind (or ahead of) user commands; inside the projector it
//! would tie command traffic to Redis being up. On its own it scales,
//! fails and is restarted on its own, and its NATS role grants exactly
//! what it needs.
//!
//! For each process the worker binds two durable consumers shared by all
//! its copies: `process-<type>` on the event stream, filtered to the
//! followed aggregate type, and `process-<type>` on the deadline stream.
//! A message is only a wake-up for one instance: the [`drive`] module
//! reads what the instance has not handled from the store, in order, so
//! redeliveries, duplicates and wake-ups out of order change nothing. A
//! message is acknowledged once its instance was driven; if driving fails
//! (a store or a command worker unreachable) it is delivered again a little
//! later, to this copy or another.

mod drive;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::consumer::{pull, AckPolicy, DeliverPolicy, PullConsumer};
use async_nats::jetstream::message::AckKind;
use futures::StreamExt;
use jetsource_core::aggregate::process::DynProcess;
use jetsource_core::aggregate::Registry;
use jetsource_core::config::Config;
use jetsource_core::deadlines::{Deadlines, Due, DUE_PREFIX};
use jetsource_core::envelope::EVENT_SUBJECT_PREFIX;
use jetsource_core::health::{self, Readiness};
use jetsource_core::micro::{self, Endpoint, MicroService};
use jetsource_core::protocol::{ErrorBody, ErrorCode};
use jetsource_core::store::{EventStore, StoreError};
use jetsource_core::ErrorClass;
use tokio::sync::{watch, Semaphore};

pub use drive::{DriveError, Driver, Wake};

/// Name under which copies of the worker appear in `$SRV.PING/INFO`.
pub const SERVICE_NAME: &str = "jetsource-process";

/// The request endpoint, as named in `$SRV.INFO` and `$SRV.STATS`.
pub const ENDPOINT: &str = "wake";
/// Where operators ask for an instance to be driven now:
/// `<this>.<process>.<id>` (answers `{"driven": "<process>.<id>"}`).
const WAKE_SUBJECTS: &str = "jetsource.process.wake.>";
/// Wake requests one copy serves at once.
const MAX_WAKE_REQUESTS: usize = 16;

/// How long a wake-up taken by a copy that died waits before another copy
/// gets it (a drive takes milliseconds; a longer one is harmlessly driven
/// twice).
const ACK_WAIT: Duration = Duration::from_secs(10);

/// How long a wake-up that could not be driven waits before it is
/// delivered again.
const RETRY_AFTER: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The consumer's messages cannot be pulled.
    #[error("cannot pull wake-ups: {0}")]
    Pull(#[from] async_nats::jetstream::consumer::StreamError),
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
            RunError::Pull(_) | RunError::Service(_) => ErrorClass::Transient,
            RunError::Http(_) => ErrorClass::Permanent,
        }
    }
}

/// The event stream consumer of `process`: every event of the aggregate
/// type it follows, shared by all copies.
fn events_consumer(process: &dyn DynProcess) -> pull::Config {
    pull::Config {
        durable_name: Some(format!("process-{}", process.process_type())),
        description: Some(format!("jetsource process {}", process.process_type())),
        filter_subject: format!("{EVENT_SUBJECT_PREFIX}.{}.>", process.follows()),
        deliver_policy: DeliverPolicy::All,
        ack_policy: AckPolicy::Explicit,
        ack_wait: ACK_WAIT,
        max_ack_pending: 1000,
        ..Default::default()
    }
}

/// Runs until `shutdown`, then stops taking wake-ups and finishes the
/// drives in flight by the stop deadline; what is left unacknowledged is
/// delivered again to another copy (or this one, restarted). A `shutdown`
/// during start-up returns at once.
pub async fn run(
    config: Config,
    registry: Registry,
    shutdown: impl Future<Output = ()>,
) -> Result<(), RunError> {
    tokio::pin!(shutdown);
    let readiness = Readiness::new();
    readiness.fail("consumers", "not bound yet");
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
        driver,
        wakeups,
        requests,
        service,
    } = started;
    let processes: Vec<&str> = driver
        .registry
        .processes()
        .map(|p| p.process_type())
        .collect();
    tracing::info!(?processes, "process worker running");
    let (stopping, stop) = watch::channel(false);
    let permits = Arc::new(Semaphore::new(config.process.max_in_flight.max(1)));
    let mut tasks = tokio::task::JoinSet::new();
    for (process, messages) in wakeups {
        let (driver, permits, stop) = (driver.clone(), permits.clone(), stop.clone());
        tasks.spawn(take_wakeups(driver, process, messages, permits, stop));
    }
    let stopped = async {
        shutdown.await;
        readiness.stopping();
        tracing::info!("stopping: finishing the drives in flight");
        stopping.send_replace(true);
    };
    let deadline = micro::serve(
        &client,
        requests,
        &service,
        ENDPOINT,
        MAX_WAKE_REQUESTS,
        move |message| wake_request(driver.clone(), message),
        stopped,
    )
    .await;
    stopping.send_replace(true);
    if tokio::time::timeout_at(deadline, async {
        while tasks.join_next().await.is_some() {}
    })
    .await
    .is_err()
    {
        tracing::warn!("drives still in flight at the stop deadline; they will be redone");
        tasks.abort_all();
    }
    service.stop();
    jetsource_core::flush_before_exit(&[&client], deadline).await;
    tracing::info!("process worker stopped");
    Ok(())
}

/// Serves `jetsource.process.wake.<process>.<id>`: drives the instance now.
async fn wake_request(
    driver: Arc<Driver>,
    message: async_nats::Message,
) -> (
    Option<async_nats::Subject>,
    Result<serde_json::Value, ErrorBody>,
) {
    let reply = async {
        let mut tokens = message.subject.as_str().splitn(5, '.').skip(3);
        let (Some(process_type), Some(id)) = (tokens.next(), tokens.next()) else {
            return Err(ErrorBody::invalid(
                "expected jetsource.process.wake.<process>.<id>",
            ));
        };
        let process = driver
            .registry
            .processes()
            .find(|p| p.process_type() == process_type)
            .cloned()
            .ok_or_else(|| ErrorBody::invalid(format!("unknown process {process_type:?}")))?;
        if !jetsource_core::aggregate::is_valid_token(id) {
            return Err(ErrorBody::invalid(format!(
                "{id:?} is not a valid instance id"
            )));
        }
        driver
            .drive(process.as_ref(), id, &Wake::Event)
            .await
            .map_err(|e| ErrorBody::new(ErrorCode::Unavailable, e.to_string()))?;
        Ok(serde_json::json!({ "driven": format!("{process_type}.{id}") }))
    }
    .await;
    (message.reply, reply)
}

/// Wake-ups of one process: (the process, its messages from both of its
/// consumers, merged).
type Wakeups = (
    Arc<dyn DynProcess>,
    futures::stream::SelectAll<pull::Stream>,
);

/// Takes wake-ups until `stop`, driving each on a task of its own (at most
/// `permits` at once), and waits for those tasks before returning.
async fn take_wakeups(
    driver: Arc<Driver>,
    process: Arc<dyn DynProcess>,
    mut messages: futures::stream::SelectAll<pull::Stream>,
    permits: Arc<Semaphore>,
    mut stop: watch::Receiver<bool>,
) {
    let mut drives = tokio::task::JoinSet::new();
    loop {
        let permit = tokio::select! {
            biased;
            _ = stop.wait_for(|s| *s) => break,
            permit = permits.clone().acquire_owned() => permit.expect("never closed"),
        };
        let message = tokio::select! {
            biased;
            _ = stop.wait_for(|s| *s) => break,
            message = messages.next() => message,
        };
        let message = match message {
            Some(Ok(message)) => message,
            Some(Err(e)) => {
                tracing::debug!(error = %e, "pull stream notice");
                continue;
            }
            None => {
                tracing::warn!(
                    process = process.process_type(),
                    "the wake-up streams ended"
                );
                break;
            }
        };
        while drives.try_join_next().is_some() {}
        let (driver, process) = (driver.clone(), process.clone());
        drives.spawn(async move {
            wake(&driver, process.as_ref(), message).await;
            drop(permit);
        });
    }
    while drives.join_next().await.is_some() {}
}

/// Drives the instance a message names, then acknowledges it; on failure
/// asks for it again after [`RETRY_AFTER`].
async fn wake(driver: &Driver, process: &dyn DynProcess, message: async_nats::jetstream::Message) {
    let subject = message.subject.as_str();
    let (id, wake) = if subject.starts_with(&format!("{DUE_PREFIX}.")) {
        match serde_json::from_slice::<Due>(&message.payload) {
            Ok(due) if due.process == process.process_type() => {
                (due.id.clone(), Wake::Deadline(due))
            }
            _ => {
                tracing::warn!(%subject, "not a deadline of this process; dropped");
                let _ = message.ack_with(AckKind::Term).await;
                return;
            }
        }
    } else {
        match subject.splitn(3, '.').nth(2) {
            Some(id) => (id.to_owned(), Wake::Event),
            None => {
                let _ = message.ack_with(AckKind::Term).await;
                return;
            }
        }
    };
    let instance = format!("{}.{id}", process.process_type());
    let mut batch = vec![message];
    if let Wake::Event = wake {
        // A drive of this instance is running or about to: it takes this
        // wake-up along (a hot aggregate's events would otherwise each
        // cost a drive that finds nothing new).
        let mut waiting = driver.waiting();
        match waiting.get_mut(&instance) {
            Some(queued) => {
                queued.extend(batch);
                return;
            }
            None => {
                waiting.insert(instance.clone(), Vec::new());
            }
        }
    }
    loop {
        let driven = driver.drive(process, &id, &wake).await;
        settle(driver, &instance, &wake, batch, driven).await;
        if !matches!(wake, Wake::Event) {
            return;
        }
        // Wake-ups that came during the drive: one more drive for them all.
        let mut waiting = driver.waiting();
        let queued = waiting
            .get_mut(&instance)
            .map(std::mem::take)
            .unwrap_or_default();
        if queued.is_empty() {
            waiting.remove(&instance);
            return;
        }
        batch = queued;
    }
}

/// Acknowledges the wake-ups a drive covered, or asks for them again.
async fn settle(
    driver: &Driver,
    instance: &str,
    wake: &Wake,
    batch: Vec<async_nats::jetstream::Message>,
    driven: Result<(), DriveError>,
) {
    match driven {
        Ok(()) => {
            for message in batch {
                if let Err(e) = message.ack().await {
                    tracing::debug!(%instance, error = %e, "ack failed; the wake-up will come again");
                }
            }
            if let Wake::Deadline(due) = wake {
                if let Err(e) = driver.deadlines.handled(due).await {
                    tracing::debug!(%instance, error = %e, "cannot remove a handled deadline");
                }
            }
        }
        Err(e) => {
            tracing::warn!(%instance, error = %e, "cannot drive the instance now; again in {RETRY_AFTER:?}");
            for message in batch {
                let _ = message.ack_with(AckKind::Nak(Some(RETRY_AFTER))).await;
            }
        }
    }
}

struct Started {
    client: async_nats::Client,
    driver: Arc<Driver>,
    wakeups: Vec<Wakeups>,
    requests: async_nats::Subscriber,
    service: MicroService,
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
    // A cluster electing its leaders (a node just died) times these out:
    // wait for it rather than exit. The start-up races the stop signal.
    let transient = |e: &RunError| e.class() == ErrorClass::Transient;
    let deadline_stream = &config.process.deadline_stream;
    let deadlines = jetsource_core::until_available("the deadline stream", transient, || async {
        Ok(Deadlines::open(store.jetstream(), deadline_stream, config.store.replicas).await?)
    })
    .await?;
    let mut wakeups = Vec::new();
    for process in registry.processes() {
        let streams =
            jetsource_core::until_available("the wake-up consumers", transient, || async {
                let events: PullConsumer = store
                    .create_consumer(events_consumer(process.as_ref()))
                    .await?;
                let due = deadlines.consumer(process.process_type()).await?;
                Ok(vec![events.messages().await?, due.messages().await?])
            })
            .await?;
        wakeups.push((process.clone(), futures::stream::select_all(streams)));
    }
    let driver = Arc::new(Driver::new(
        store,
        deadlines,
        client.clone(),
        registry,
        config.nats.request_timeout(),
    ));
    let requests = client
        .queue_subscribe(WAKE_SUBJECTS, SERVICE_NAME.to_owned())
        .await?;
    let service = MicroService::start(
        &client,
        SERVICE_NAME,
        env!("CARGO_PKG_VERSION"),
        "jetsource process worker: drives process managers",
        vec![Endpoint {
            name: ENDPOINT.into(),
            subject: WAKE_SUBJECTS.into(),
            queue_group: SERVICE_NAME.into(),
        }],
    )
    .await?;
    readiness.pass("consumers");
    Ok(Started {
        client,
        driver,
        wakeups,
        requests,
        service,
    })
}
