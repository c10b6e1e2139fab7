//! A NATS micro service (ADR-32: `$SRV.PING`, `$SRV.INFO`, `$SRV.STATS`)
//! whose request subscriptions the worker owns.
//!
//! async-nats has a service API, but its endpoints can only be stopped with
//! a plain unsubscribe, which drops requests the server had already routed to
//! this copy. A worker that shuts down must instead *drain* its subscription
//! (unsubscribe, then keep receiving until the server confirms) so that
//! every request it was handed is answered. So workers subscribe themselves
//! and use this module only to answer the discovery verbs and keep the
//! per-endpoint statistics, errors included.
//!
//! Statistics tell faults from refusals: `num_errors` and `last_error` count
//! only replies whose error is the server side's fault (`unavailable`,
//! `timeout`, `internal`: [`ErrorCode::is_fault`]), so they read as a
//! failure rate. Refusals the request earned (`invalid`, `rejected`,
//! `conflict`, `not_found`) are counted apart, in the endpoint's `data`
//! object, which the micro protocol leaves to the service:
//! `{"num_rejections": n, "last_rejection": "code: message"}`.
//!
//! [`ErrorCode::is_fault`]: crate::protocol::ErrorCode::is_fault

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::Client;
use futures::StreamExt;
use serde::Serialize;
use time::OffsetDateTime;

use crate::protocol::ErrorBody;

/// One endpoint as announced in `$SRV.INFO`.
#[derive(Debug, Clone)]
pub struct Endpoint {
    pub name: String,
    pub subject: String,
    pub queue_group: String,
}

#[derive(Debug, Default, Clone)]
struct Counters {
    requests: u64,
    errors: u64,
    last_error: String,
    rejections: u64,
    last_rejection: String,
    processing: Duration,
}

impl Counters {
    fn count_reply_error(&mut self, error: Option<&ErrorBody>) {
        let Some(error) = error else { return };
        let text = format!("{}: {}", error.code, error.message);
        if error.code.is_fault() {
            self.errors += 1;
            self.last_error = text;
        } else {
            self.rejections += 1;
            self.last_rejection = text;
        }
    }
}

#[derive(Debug)]
struct Shared {
    name: String,
    id: String,
    version: String,
    description: String,
    started: OffsetDateTime,
    endpoints: Vec<Endpoint>,
    counters: Mutex<BTreeMap<String, Counters>>,
}

/// A running micro service. Cheap to clone; the verb responder stops when
/// [`MicroService::stop`] is called.
#[derive(Debug, Clone)]
pub struct MicroService {
    shared: Arc<Shared>,
    responder: Arc<tokio::task::JoinHandle<()>>,
}

#[derive(Serialize)]
struct Ping<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    name: &'a str,
    id: &'a str,
    version: &'a str,
    metadata: BTreeMap<String, String>,
}

#[derive(Serialize)]
struct EndpointInfo<'a> {
    name: &'a str,
    subject: &'a str,
    queue_group: &'a str,
    metadata: BTreeMap<String, String>,
}

#[derive(Serialize)]
struct Info<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    name: &'a str,
    id: &'a str,
    version: &'a str,
    description: &'a str,
    metadata: BTreeMap<String, String>,
    endpoints: Vec<EndpointInfo<'a>>,
}

/// The `data` of an endpoint's stats: what the micro protocol leaves to the
/// service.
#[derive(Serialize)]
struct EndpointData {
    /// Requests refused because of the request or the domain (not faults).
    num_rejections: u64,
    /// The last of them, `code: message`.
    last_rejection: String,
}

#[derive(Serialize)]
struct EndpointStats<'a> {
    name: &'a str,
    subject: &'a str,
    queue_group: &'a str,
    num_requests: u64,
    /// Faults only, see the module documentation.
    num_errors: u64,
    last_error: String,
    data: EndpointData,
    processing_time: u128,
    average_processing_time: u128,
}

#[derive(Serialize)]
struct Stats<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    name: &'a str,
    id: &'a str,
    version: &'a str,
    metadata: BTreeMap<String, String>,
    #[serde(with = "time::serde::rfc3339")]
    started: OffsetDateTime,
    endpoints: Vec<EndpointStats<'a>>,
}

impl Shared {
    fn count(&self, endpoint: &str, elapsed: Duration, outcome: impl FnOnce(&mut Counters)) {
        let mut counters = self.counters.lock().unwrap_or_else(|p| p.into_inner());
        let c = counters.entry(endpoint.to_owned()).or_default();
        c.requests += 1;
        c.processing += elapsed;
        outcome(c);
    }

    fn answer(&self, verb: &str) -> Vec<u8> {
        let encoded = match verb {
            "PING" => serde_json::to_vec(&Ping {
                kind: "io.nats.micro.v1.ping_response",
                name: &self.name,
                id: &self.id,
                version: &self.version,
                metadata: BTreeMap::new(),
            }),
            "INFO" => serde_json::to_vec(&Info {
                kind: "io.nats.micro.v1.info_response",
                name: &self.name,
                id: &self.id,
                version: &self.version,
                description: &self.description,
                metadata: BTreeMap::new(),
                endpoints: self
                    .endpoints
                    .iter()
                    .map(|e| EndpointInfo {
                        name: &e.name,
                        subject: &e.subject,
                        queue_group: &e.queue_group,
                        metadata: BTreeMap::new(),
                    })
                    .collect(),
            }),
            _ => {
                let counters = self.counters.lock().unwrap_or_else(|p| p.into_inner());
                serde_json::to_vec(&Stats {
                    kind: "io.nats.micro.v1.stats_response",
                    name: &self.name,
                    id: &self.id,
                    version: &self.version,
                    metadata: BTreeMap::new(),
                    started: self.started,
                    endpoints: self
                        .endpoints
                        .iter()
                        .map(|e| {
                            let c = counters.get(&e.name).cloned().unwrap_or_default();
                            EndpointStats {
                                name: &e.name,
                                subject: &e.subject,
                                queue_group: &e.queue_group,
                                num_requests: c.requests,
                                num_errors: c.errors,
                                last_error: c.last_error,
                                data: EndpointData {
                                    num_rejections: c.rejections,
                                    last_rejection: c.last_rejection,
                                },
                                processing_time: c.processing.as_nanos(),
                                average_processing_time: c
                                    .processing
                                    .as_nanos()
                                    .checked_div(u128::from(c.requests))
                                    .unwrap_or(0),
                            }
                        })
                        .collect(),
                })
            }
        };
        encoded.unwrap_or_default()
    }
}

impl MicroService {
    /// Subscribes to the nine discovery subjects (`$SRV.<VERB>`,
    /// `$SRV.<VERB>.<name>`, `$SRV.<VERB>.<name>.<id>`) and answers them until
    /// stopped. The caller subscribes to the endpoints' subjects itself.
    pub async fn start(
        client: &Client,
        name: &str,
        version: &str,
        description: &str,
        endpoints: Vec<Endpoint>,
    ) -> Result<Self, async_nats::SubscribeError> {
        let shared = Arc::new(Shared {
            name: name.to_owned(),
            id: uuid::Uuid::new_v4().simple().to_string(),
            version: version.to_owned(),
            description: description.to_owned(),
            started: OffsetDateTime::now_utc(),
            endpoints,
            counters: Mutex::new(BTreeMap::new()),
        });
        let mut subscriptions = Vec::new();
        for verb in ["PING", "INFO", "STATS"] {
            for subject in [
                format!("$SRV.{verb}"),
                format!("$SRV.{verb}.{name}"),
                format!("$SRV.{verb}.{name}.{}", shared.id),
            ] {
                let sub = client.subscribe(subject).await?;
                subscriptions.push(sub.map(move |m| (verb, m)).boxed());
            }
        }
        // Make sure the server has every subscription before callers are
        // told the service is up.
        let _ = client.flush().await;
        let mut verbs = futures::stream::select_all(subscriptions);
        let responder = {
            let shared = shared.clone();
            let client = client.clone();
            tokio::spawn(async move {
                while let Some((verb, message)) = verbs.next().await {
                    if let Some(reply) = message.reply {
                        let _ = client.publish(reply, shared.answer(verb).into()).await;
                    }
                }
            })
        };
        Ok(Self {
            shared,
            responder: Arc::new(responder),
        })
    }

    pub fn id(&self) -> &str {
        &self.shared.id
    }

    /// Counts one handled request on `endpoint`, with its error if it
    /// failed; the error counts as a fault (`num_errors`).
    pub fn record(&self, endpoint: &str, elapsed: Duration, error: Option<&str>) {
        self.shared.count(endpoint, elapsed, |c| {
            if let Some(error) = error {
                c.errors += 1;
                error.clone_into(&mut c.last_error);
            }
        });
    }

    /// Counts one handled request on `endpoint` by the error of its reply,
    /// if any: a fault ([`ErrorCode::is_fault`]) in `num_errors`, a refusal
    /// in `data.num_rejections`.
    ///
    /// [`ErrorCode::is_fault`]: crate::protocol::ErrorCode::is_fault
    pub fn record_reply(&self, endpoint: &str, elapsed: Duration, error: Option<&ErrorBody>) {
        self.shared
            .count(endpoint, elapsed, |c| c.count_reply_error(error));
    }

    /// Stops answering discovery requests.
    pub fn stop(&self) {
        self.responder.abort();
    }
}

/// Serves the requests of `requests` (a subscription the caller made on
/// `endpoint`'s subject) with `handle`, at most `max_in_flight` at once,
/// until `shutdown` resolves. Then drains, not unsubscribes: requests the
/// server routed to this copy before it saw the unsubscribe are still
/// delivered and served, and those in flight finish. All of that ends by
/// the stop deadline ([`crate::stop_deadline`], taken when `shutdown`
/// resolves), which is returned for the caller's last steps (flushing):
/// with NATS gone, no confirmation of the drain comes and a reply cannot be
/// sent, and waiting longer would not change that. Every reply is the
/// `{"ok": ...}` envelope; every request is counted in the service's
/// statistics ([`MicroService::record_reply`]) before its reply is sent, so
/// a client that has its reply finds it counted.
pub async fn serve<T, F, Fut>(
    client: &Client,
    mut requests: async_nats::Subscriber,
    service: &MicroService,
    endpoint: &str,
    max_in_flight: usize,
    handle: F,
    shutdown: impl std::future::Future<Output = ()>,
) -> tokio::time::Instant
where
    T: Serialize + Send + 'static,
    F: Fn(async_nats::Message) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<
            Output = (
                Option<async_nats::Subject>,
                Result<T, crate::protocol::ErrorBody>,
            ),
        > + Send
        + 'static,
{
    let permits = Arc::new(tokio::sync::Semaphore::new(max_in_flight));
    let serve_one = |message: async_nats::Message, permit: tokio::sync::OwnedSemaphorePermit| {
        let (client, service, endpoint, handle) = (
            client.clone(),
            service.clone(),
            endpoint.to_owned(),
            handle.clone(),
        );
        tokio::spawn(async move {
            let started = std::time::Instant::now();
            let (reply_to, reply) = handle(message).await;
            service.record_reply(&endpoint, started.elapsed(), reply.as_ref().err());
            if let Some(to) = reply_to {
                if let Err(e) = client
                    .publish(to, crate::protocol::encode_reply(&reply))
                    .await
                {
                    tracing::warn!(error = %e, "could not send a reply");
                }
            }
            drop(permit);
        });
    };
    tokio::pin!(shutdown);
    loop {
        // Taking a permit before the next request keeps at most
        // `max_in_flight` requests in this process; the rest wait in NATS
        // where other copies can take them.
        let permit = tokio::select! {
            biased;
            () = &mut shutdown => break,
            permit = permits.clone().acquire_owned() => {
                permit.expect("semaphore is never closed")
            }
        };
        tokio::select! {
            biased;
            () = &mut shutdown => break,
            message = requests.next() => match message {
                Some(message) => serve_one(message, permit),
                None => break,
            },
        }
    }
    let deadline = crate::stop_deadline();
    // Sending the unsubscribe only queues it, unless the client's command
    // queue is full (NATS gone for long): bounded like everything below.
    match tokio::time::timeout_at(deadline, requests.drain()).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::warn!(error = %e, "could not drain the request subscription"),
        Err(_) => tracing::warn!("NATS did not take the unsubscribe; stopping anyway"),
    }
    let drain = async {
        let pending = async {
            while let Some(message) = requests.next().await {
                let permit = permits
                    .clone()
                    .acquire_owned()
                    .await
                    .expect("semaphore is never closed");
                serve_one(message, permit);
            }
        };
        // The end of a drained subscription is confirmed by the server; with
        // NATS gone (stopped together with us) it never comes, and nothing
        // more can arrive either.
        let disconnected = async {
            loop {
                if client.connection_state() != async_nats::connection::State::Connected {
                    break;
                }
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        };
        tokio::select! {
            () = pending => {}
            () = disconnected => {}
        }
        let _all = permits
            .acquire_many(max_in_flight as u32)
            .await
            .expect("semaphore is never closed");
    };
    if tokio::time::timeout_at(deadline, drain).await.is_err() {
        tracing::warn!(
            in_flight = max_in_flight - permits.available_permits(),
            "requests still in flight at the stop deadline ({:?} after the signal); stopping anyway",
            crate::STOP_BUDGET
        );
    }
    deadline
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::ErrorCode;

    #[test]
    fn stats_count_faults_as_errors_and_refusals_apart() {
        let shared = Shared {
            name: "svc".into(),
            id: "id1".into(),
            version: "1.0.0".into(),
            description: String::new(),
            started: OffsetDateTime::UNIX_EPOCH,
            endpoints: vec![Endpoint {
                name: "commands".into(),
                subject: "cmd.>".into(),
                queue_group: "q".into(),
            }],
            counters: Mutex::new(BTreeMap::new()),
        };
        let ms = Duration::from_millis(1);
        let replies = [
            None,
            Some(ErrorBody::new(ErrorCode::Rejected, "no funds")),
            Some(ErrorBody::new(ErrorCode::Unavailable, "store down")),
            Some(ErrorBody::new(ErrorCode::Invalid, "bad")),
            Some(ErrorBody::new(ErrorCode::Conflict, "raced")),
            Some(ErrorBody::new(ErrorCode::NotFound, "none")),
            Some(ErrorBody::new(ErrorCode::Timeout, "slow")),
            None,
        ];
        for error in &replies {
            shared.count("commands", ms, |c| c.count_reply_error(error.as_ref()));
        }
        let stats: serde_json::Value =
            serde_json::from_slice(&shared.answer("STATS")).expect("json");
        assert_eq!(stats["type"], "io.nats.micro.v1.stats_response");
        let endpoint = &stats["endpoints"][0];
        assert_eq!(endpoint["num_requests"], 8);
        assert_eq!(endpoint["num_errors"], 2);
        assert_eq!(endpoint["last_error"], "timeout: slow");
        assert_eq!(endpoint["data"]["num_rejections"], 4);
        assert_eq!(endpoint["data"]["last_rejection"], "not_found: none");
        assert_eq!(endpoint["processing_time"], 8_000_000);
        assert_eq!(endpoint["average_processing_time"], 1_000_000);
    }
}
