//! The HTTP API gateway (docs/GATEWAY.md): a stateless HTTP/JSON front for
//! the NATS protocol. Commands and queries go to the workers over NATS
//! (their queue groups balance the load); histories, state at a point and
//! live events are read from the event store. Scale it by running copies
//! behind any HTTP load balancer.
//!
//! - [`api`]: the routes and the OpenAPI document.
//! - [`auth`]: API keys (hashes configured) and roles.
//! - [`error`]: error codes to HTTP statuses, in one place.

pub mod api;
pub mod auth;
pub mod console;
pub mod error;

use std::future::Future;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use axum::routing::{get, post};
use jetsource_core::aggregate::Registry;
use jetsource_core::config::Config;
use jetsource_core::health::{self, Readiness};
use jetsource_core::snapshot::SnapshotStore;
use jetsource_core::store::{EventStore, StoreError};
use jetsource_projector::projection::Projection;
use jetsource_projector::Router;
use tokio::sync::watch;

/// Why the gateway could not run.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// NATS or the event store could not be reached or opened.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A setting the gateway cannot work with (named in the message).
    #[error("{0}")]
    Config(String),
    /// `gateway.listen` or `http.listen` cannot be bound.
    #[error("cannot listen on {listen}: {source}")]
    Listen {
        listen: String,
        source: std::io::Error,
    },
}

/// What the handlers share.
#[derive(Debug)]
pub struct Gateway {
    keys: auth::Keys,
    router: Router,
    timeout: Duration,
    /// Set once NATS and the store are reached; until then the API answers
    /// `unavailable` (and `/readyz` says why).
    api: OnceLock<Api>,
    /// Turns true at the stop signal: live event streams end.
    stopping: watch::Receiver<bool>,
}

/// The gateway's connections.
#[derive(Debug)]
pub struct Api {
    client: async_nats::Client,
    store: EventStore,
    snapshots: SnapshotStore,
    registry: Registry,
    /// Read models' metadata and watermarks, for projection status (the
    /// query user's connection when `redis.query_url` is set); connects on
    /// first use, so the API works without Redis.
    redis: jetsource_projector::redis_store::RedisStore,
    projections: Vec<Arc<dyn Projection>>,
    /// The dead-letter stream's name (`projector.dead_letter_stream`).
    dead_letters: String,
}

/// The routes over `gateway`; health, readiness and metrics beside them.
fn routes(
    gateway: Arc<Gateway>,
    readiness: Readiness,
    config: &Config,
) -> Result<axum::Router, RunError> {
    let api = axum::Router::new()
        .route(
            "/v1/commands/{aggregate_type}/{aggregate_id}",
            post(api::send_command),
        )
        .route("/v1/queries", get(api::list_queries))
        .route("/v1/queries/{name}", get(api::query))
        .route("/v1/queries/{name}/{key}", get(api::keyed_query))
        .route(
            "/v1/aggregates/{aggregate_type}/{aggregate_id}/events",
            get(api::history),
        )
        .route(
            "/v1/aggregates/{aggregate_type}/{aggregate_id}/state",
            get(api::state),
        )
        .route("/v1/events/live", get(api::live))
        .route("/v1/types", get(console::types))
        .route("/v1/projections", get(console::projections))
        .route("/v1/stream", get(console::stream))
        .route("/v1/dead-letters", get(console::dead_letters))
        .route("/v1/dead-letters/{sequence}/replay", post(console::replay))
        .route("/console", get(console::page))
        .route("/openapi.json", get(api::openapi))
        .fallback(api::fallback)
        .layer(axum::middleware::from_fn(count_requests))
        .layer(axum::extract::DefaultBodyLimit::max(
            config.gateway.max_body_bytes,
        ))
        .layer(cors(&config.gateway.cors_origins)?)
        .with_state(gateway);
    Ok(api.merge(health::probes(readiness)))
}

/// Counts and times each request under its route pattern (never the raw
/// path: ids would make a series each; docs/METRICS.md), in a span that
/// continues the caller's `traceparent` (docs/TRACING.md).
async fn count_requests(
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    use jetsource_core::metrics;
    let route = request
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .map_or_else(|| metrics::UNKNOWN.to_owned(), |p| p.as_str().to_owned());
    let method = match *request.method() {
        axum::http::Method::GET => "GET",
        axum::http::Method::POST => "POST",
        _ => "other",
    };
    let span = tracing::info_span!("http request", route = %route, method);
    let traceparent = request
        .headers()
        .get(jetsource_core::telemetry::TRACEPARENT)
        .and_then(|v| v.to_str().ok());
    jetsource_core::telemetry::continue_from_traceparent(&span, traceparent);
    let started = std::time::Instant::now();
    let response = tracing::Instrument::instrument(next.run(request), span).await;
    let status = response.status().as_u16().to_string();
    ::metrics::counter!(metrics::HTTP_REQUESTS, "route" => route.clone(), "method" => method, "status" => status)
        .increment(1);
    ::metrics::histogram!(metrics::HTTP_DURATION, "route" => route)
        .record(started.elapsed().as_secs_f64());
    response
}

/// CORS for the configured origins; none: browsers may call the API only
/// from its own origin.
fn cors(origins: &str) -> Result<tower_http::cors::CorsLayer, RunError> {
    use axum::http::{header, HeaderValue, Method};
    let origins = origins
        .split(',')
        .map(str::trim)
        .filter(|o| !o.is_empty())
        .map(|o| {
            HeaderValue::from_str(o).map_err(|_| {
                RunError::Config(format!("gateway.cors_origins: {o:?} is not an origin"))
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(tower_http::cors::CorsLayer::new()
        .allow_origin(origins)
        .allow_methods([Method::GET, Method::POST])
        .allow_headers([
            header::AUTHORIZATION,
            header::CONTENT_TYPE,
            "idempotency-key".parse().unwrap_or(header::ACCEPT),
            "x-min-sequence".parse().unwrap_or(header::ACCEPT),
            "last-event-id".parse().unwrap_or(header::ACCEPT),
        ]))
}

/// Serves the API on `gateway.listen` until `shutdown`, then stops taking
/// requests and ends within [`jetsource_core::STOP_BUDGET`] (live event
/// streams are closed, requests in flight get that long).
pub async fn run(
    config: Config,
    registry: Registry,
    projections: Vec<Arc<dyn Projection>>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), RunError> {
    let keys = auth::Keys::parse(config.gateway.api_keys.expose()).map_err(RunError::Config)?;
    if keys.is_empty() {
        tracing::warn!("gateway.api_keys is empty: every API request is refused (401)");
    }
    let router = Router::new(&projections).map_err(RunError::Config)?;
    let projections = projections.clone();
    let (stop, stopping) = watch::channel(false);
    let gateway = Arc::new(Gateway {
        keys,
        router,
        timeout: Duration::from_millis(config.gateway.request_timeout_ms.max(1)),
        api: OnceLock::new(),
        stopping,
    });
    let readiness = Readiness::new();
    readiness.fail("event_store", "not opened yet");
    // Probes and /metrics on `http.listen`, as every worker; the API port
    // answers /healthz and /readyz too, not /metrics.
    let _http = health::serve(&config.http, readiness.clone())
        .await
        .map_err(|source| RunError::Listen {
            listen: config.http.listen.clone(),
            source,
        })?;
    let listen = config.gateway.listen.clone();
    let listener = tokio::net::TcpListener::bind(&listen)
        .await
        .map_err(|source| RunError::Listen {
            listen: listen.clone(),
            source,
        })?;
    let addr = listener
        .local_addr()
        .map_err(|source| RunError::Listen { listen, source })?;
    let app = routes(gateway.clone(), readiness.clone(), &config)?;
    tracing::info!("gateway listening on http://{addr}");
    let (stopped_tx, stopped_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(async move {
        let graceful = async {
            let _ = stopped_rx.await;
        };
        if let Err(e) = axum::serve(listener, app)
            .with_graceful_shutdown(graceful)
            .await
        {
            tracing::warn!(error = %e, "http server ended");
        }
    });
    tokio::pin!(shutdown);
    tokio::select! {
        connected = connect(&config, registry, projections, &readiness) => {
            let api = connected?;
            let _ = gateway.api.set(api);
            readiness.pass("event_store");
            tracing::info!("gateway serving");
            shutdown.await;
        }
        () = &mut shutdown => {}
    }
    readiness.stopping();
    stop.send_replace(true);
    let _ = stopped_tx.send(());
    let deadline = jetsource_core::stop_deadline();
    let server_abort = server.abort_handle();
    if tokio::time::timeout_at(deadline, server).await.is_err() {
        tracing::warn!("requests still in flight at the stop deadline; stopping anyway");
        server_abort.abort();
    }
    if let Some(api) = gateway.api.get() {
        jetsource_core::flush_before_exit(&[&api.client], jetsource_core::stop_deadline()).await;
    }
    tracing::info!("gateway stopped");
    Ok(())
}

async fn connect(
    config: &Config,
    registry: Registry,
    projections: Vec<Arc<dyn Projection>>,
    readiness: &Readiness,
) -> Result<Api, RunError> {
    let redis = jetsource_projector::redis_store::RedisStore::lazy(&config.redis)
        .map_err(|e| RunError::Config(format!("redis.url: {e}")))?;
    let client = jetsource_core::connect(&config.nats, "jetsource-gateway").await?;
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
    Ok(Api {
        client,
        store,
        snapshots,
        registry,
        redis,
        projections,
        dead_letters: config.projector.dead_letter_stream.clone(),
    })
}
