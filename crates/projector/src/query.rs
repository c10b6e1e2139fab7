//! The query service: requests on `query.>` (queue group
//! `jetsource-projector`) routed to the projection that declares the query
//! ([`crate::read`]), answered from its active generation.
//!
//! Body (optional): `{"min_sequence": N, "timeout_ms": T, ...parameters}`.
//! Reply: `{"ok": true, "sequence": W, "data": ...}` where every event up to
//! stream sequence W is reflected; with `min_sequence`, W >= N or the reply
//! is error `timeout`.

use std::sync::Arc;
use std::time::Duration;

use jetsource_core::aggregate::is_valid_token;
use jetsource_core::config::Config;
use jetsource_core::micro::{self, Endpoint, MicroService};
use jetsource_core::protocol::{ErrorBody, ErrorCode};
use serde::Serialize;
use serde_json::{Map, Value};
use tokio::sync::watch;

use crate::projection::Projection;
use crate::read::{QueryCall, QueryError, QuerySpec, ReadView};
use crate::redis_store::Meta;
use crate::shared::Shared;
use crate::SERVICE_NAME;

/// Default wait for `min_sequence` when the query names no `timeout_ms`.
const DEFAULT_WAIT: Duration = Duration::from_secs(5);
const MAX_IN_FLIGHT: usize = 1024;

/// The framework's own body fields.
#[derive(Debug, Default)]
struct QueryRequest {
    min_sequence: Option<u64>,
    timeout_ms: Option<u64>,
}

#[derive(Debug, Serialize)]
struct QueryReply {
    /// Every event up to this stream sequence is reflected.
    sequence: u64,
    data: Value,
}

/// Every declared query of an application, by subject.
#[derive(Debug, Clone)]
pub struct Router {
    routes: Vec<(QuerySpec, Arc<dyn Projection>)>,
}

/// A subject token pattern: a fixed token, or the key's place.
fn pattern(spec: &QuerySpec) -> Vec<Option<&'static str>> {
    spec.name
        .split('.')
        .map(Some)
        .chain(spec.key.map(|_| None))
        .collect()
}

impl Router {
    /// Collects the projections' queries. Refuses malformed names and two
    /// queries that one subject could reach.
    pub fn new(projections: &[Arc<dyn Projection>]) -> Result<Self, String> {
        let mut routes: Vec<(QuerySpec, Arc<dyn Projection>)> = Vec::new();
        for projection in projections {
            for spec in projection.queries() {
                if !spec.name.split('.').all(is_valid_token) {
                    return Err(format!(
                        "query name {:?} of projection {}: use dot-separated tokens of A-Z a-z 0-9 _ -",
                        spec.name,
                        projection.name()
                    ));
                }
                let mine = pattern(spec);
                if let Some((other, owner)) = routes.iter().find(|(o, _)| {
                    let theirs = pattern(o);
                    theirs.len() == mine.len()
                        && theirs
                            .iter()
                            .zip(&mine)
                            .all(|(a, b)| a.is_none() || b.is_none() || a == b)
                }) {
                    return Err(format!(
                        "queries {} (projection {}) and {} (projection {}) overlap: one subject would reach both",
                        other.subject_pattern(),
                        owner.name(),
                        spec.subject_pattern(),
                        projection.name()
                    ));
                }
                routes.push((*spec, projection.clone()));
            }
        }
        Ok(Self { routes })
    }

    /// Every declared query with its projection.
    pub fn queries(&self) -> impl Iterator<Item = (&QuerySpec, &Arc<dyn Projection>)> {
        self.routes.iter().map(|(s, p)| (s, p))
    }

    /// The query a subject asks, with its key.
    pub fn route<'s>(&self, subject: &'s str) -> Result<Route<'_, 's>, ErrorBody> {
        let tokens: Vec<&str> = subject.split('.').collect();
        let found = match tokens.split_first() {
            Some((&"query", rest)) => self.routes.iter().find_map(|(spec, projection)| {
                let want = pattern(spec);
                let fits = want.len() == rest.len()
                    && want
                        .iter()
                        .zip(rest)
                        .all(|(w, t)| w.is_none_or(|w| w == *t));
                fits.then(|| (spec, projection, spec.key.and(rest.last().copied())))
            }),
            _ => None,
        };
        let Some((spec, projection, key)) = found else {
            let known: Vec<_> = self
                .routes
                .iter()
                .map(|(s, _)| s.subject_pattern())
                .collect();
            return Err(ErrorBody::invalid(format!(
                "unknown query {subject:?}; known: {}",
                known.join(", ")
            )));
        };
        if let Some(key) = key.filter(|k| !is_valid_token(k)) {
            return Err(ErrorBody::invalid(format!(
                "{} {key:?} is invalid: use 1 to 64 characters of A-Z a-z 0-9 _ -",
                spec.key.unwrap_or("key")
            )));
        }
        Ok(Route {
            spec,
            projection,
            key,
        })
    }
}

/// Where a subject leads.
#[derive(Debug)]
pub struct Route<'r, 's> {
    pub spec: &'r QuerySpec,
    pub projection: &'r Arc<dyn Projection>,
    pub key: Option<&'s str>,
}

/// The reply to a failed Redis call. Every call is bounded in time (a
/// connection that stops answering is replaced), so an outage or a slow
/// Redis answers `unavailable` promptly: retry. An error that a retry
/// cannot cure (an unexpected reply) is `internal`.
fn unavailable(e: redis::RedisError) -> ErrorBody {
    match crate::redis_store::class(&e) {
        jetsource_core::ErrorClass::Permanent => {
            tracing::error!(error = %e, "query failed in Redis");
            ErrorBody::new(ErrorCode::Internal, format!("Redis: {e}"))
        }
        _ => ErrorBody::new(ErrorCode::Unavailable, format!("Redis: {e}; retry")),
    }
}

fn answer_error(e: QueryError) -> ErrorBody {
    match e {
        QueryError::NotFound(m) => ErrorBody::new(ErrorCode::NotFound, m),
        QueryError::Invalid(m) => ErrorBody::invalid(m),
        QueryError::Redis(e) => unavailable(e),
    }
}

/// Subscribes to `query.>` and serves until `stop`; the returned task drains
/// the subscription and finishes queries in flight.
pub(crate) async fn serve(
    shared: Arc<Shared>,
    config: &Config,
    mut stop: watch::Receiver<bool>,
) -> Result<tokio::task::JoinHandle<()>, String> {
    let queue_group = config.projector.queue_group.clone();
    let requests = shared
        .client
        .queue_subscribe("query.>", queue_group.clone())
        .await
        .map_err(|e| e.to_string())?;
    let service = MicroService::start(
        &shared.client,
        SERVICE_NAME,
        env!("CARGO_PKG_VERSION"),
        "jetsource projector: Redis read models and queries",
        vec![Endpoint {
            name: "queries".into(),
            subject: "query.>".into(),
            queue_group,
        }],
    )
    .await
    .map_err(|e| e.to_string())?;
    let client = shared.client.clone();
    let handle = move |message: async_nats::Message| {
        let shared = shared.clone();
        async move {
            let reply = handle(&shared, message.subject.as_str(), &message.payload).await;
            (message.reply, reply)
        }
    };
    Ok(tokio::spawn(async move {
        micro::serve(
            &client,
            requests,
            &service,
            "queries",
            MAX_IN_FLIGHT,
            handle,
            async move {
                let _ = stop.wait_for(|s| *s).await;
            },
        )
        .await;
        service.stop();
    }))
}

/// Splits a body into the framework's fields and the query's parameters.
fn parse_body(
    spec: &QuerySpec,
    payload: &[u8],
) -> Result<(QueryRequest, Map<String, Value>), ErrorBody> {
    if payload.iter().all(u8::is_ascii_whitespace) {
        let params = spec.params_from(Map::new()).map_err(ErrorBody::invalid)?;
        return Ok((QueryRequest::default(), params));
    }
    let invalid = |m: String| ErrorBody::invalid(format!("query body is not valid: {m}"));
    let mut body: Map<String, Value> =
        serde_json::from_slice(payload).map_err(|e| invalid(e.to_string()))?;
    let mut number = |name: &str| -> Result<Option<u64>, ErrorBody> {
        match body.remove(name) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v
                .as_u64()
                .map(Some)
                .ok_or_else(|| invalid(format!("{name} must be a non-negative integer, not {v}"))),
        }
    };
    let request = QueryRequest {
        min_sequence: number("min_sequence")?,
        timeout_ms: number("timeout_ms")?,
    };
    let params = spec.params_from(body).map_err(invalid)?;
    Ok((request, params))
}

/// Answers one query, counted and timed under its declared name
/// (`unknown` for a subject no query declares; docs/METRICS.md).
async fn handle(shared: &Shared, subject: &str, payload: &[u8]) -> Result<QueryReply, ErrorBody> {
    use jetsource_core::metrics;
    let started = std::time::Instant::now();
    let name = shared
        .router
        .route(subject)
        .map_or(metrics::UNKNOWN, |route| route.spec.name);
    let reply = answer(shared, subject, payload).await;
    ::metrics::counter!(metrics::QUERIES, "query" => name, "outcome" => metrics::outcome(&reply))
        .increment(1);
    ::metrics::histogram!(metrics::QUERY_DURATION, "query" => name)
        .record(started.elapsed().as_secs_f64());
    reply
}

async fn answer(shared: &Shared, subject: &str, payload: &[u8]) -> Result<QueryReply, ErrorBody> {
    let Route {
        spec,
        projection,
        key,
    } = shared.router.route(subject)?;
    let (request, params) = parse_body(spec, payload)?;
    let call = QueryCall {
        name: spec.name,
        key: key.map(str::to_owned),
        params,
    };
    let name = projection.name();
    // A rebuild may switch generations and delete the old keys while this
    // query reads them. Reading the metadata again afterwards tells: if the
    // generation is still active, the keys were intact when read.
    let mut attempts = 0;
    let (sequence, data) = loop {
        attempts += 1;
        let (meta, sequence) = wait_for(shared, name, &request).await?;
        let view = ReadView {
            projection: name,
            generation: meta.active,
            partitions: meta.partitions,
            connection: shared.redis.connection(),
        };
        let data = projection.answer(&call, &view).await;
        let still = shared.redis.meta(name).await.map_err(unavailable)?;
        if still.is_some_and(|m| m.active == meta.active) || attempts >= 5 {
            break (sequence, data.map_err(answer_error)?);
        }
    };
    Ok(QueryReply { sequence, data })
}

/// The active generation and its watermark, waiting for `min_sequence`.
/// Redis is the judge; announcements from the applying copy only say when
/// to look again.
async fn wait_for(
    shared: &Shared,
    projection: &str,
    request: &QueryRequest,
) -> Result<(Meta, u64), ErrorBody> {
    let wait = request
        .timeout_ms
        .map(Duration::from_millis)
        .unwrap_or(DEFAULT_WAIT)
        .min(shared.config.max_wait());
    let deadline = tokio::time::Instant::now() + wait;
    let mut updates = shared.watermark_updates(projection);
    loop {
        if let Some(updates) = updates.as_mut() {
            // Mark what we have seen before reading Redis, so an
            // announcement arriving meanwhile is not missed.
            updates.borrow_and_update();
        }
        let meta = shared.redis.meta(projection).await.map_err(unavailable)?;
        let (meta, watermark) = match meta {
            Some(meta) => {
                let watermark = shared
                    .redis
                    .watermark(projection, meta.active)
                    .await
                    .map_err(unavailable)?;
                (Some(meta), watermark)
            }
            None => (None, 0),
        };
        let min = request.min_sequence.unwrap_or(0);
        match meta {
            Some(meta) if watermark >= min => return Ok((meta, watermark)),
            None if request.min_sequence.is_none() => {
                return Err(ErrorBody::new(
                    ErrorCode::Unavailable,
                    format!("read model {projection} is being built; is jetsource-projector running? retry, or pass min_sequence to wait"),
                ))
            }
            _ => {}
        }
        let timed_out = ErrorBody::new(
            ErrorCode::Timeout,
            format!(
                "read model {projection} reflects sequence {watermark}, not yet {min}, after {} ms; retry or raise timeout_ms",
                wait.as_millis()
            ),
        );
        let Some(updates) = updates.as_mut() else {
            return Err(timed_out);
        };
        if tokio::time::timeout_at(deadline, updates.changed())
            .await
            .is_err()
        {
            return Err(timed_out);
        }
    }
}
