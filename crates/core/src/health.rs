//! The workers' HTTP listener: `GET /healthz` and `GET /readyz`
//! (docs/PROTOCOL.md, "Health, readiness and metrics"), and `GET /metrics`
//! (Prometheus text format, docs/METRICS.md).
//!
//! A worker creates a [`Readiness`] before it connects anywhere, starts the
//! listener with [`serve`] (the address from `http.listen`; empty: none),
//! and updates the readiness as it goes: the NATS connection it watches
//! ([`Readiness::watch_nats`]), checks it passes or fails
//! ([`Readiness::pass`], [`Readiness::fail`]), probes run on each request
//! ([`Readiness::probe`]), and [`Readiness::stopping`] once the stop signal
//! came. The listener never holds up a stop: dropping the [`Server`] ends it
//! at once.

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};

use crate::config::HttpConfig;

/// Longest one probe (e.g. a Redis round trip) may take in a `/readyz`
/// request before it counts as failing.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

type ProbeFuture = Pin<Box<dyn Future<Output = Result<(), String>> + Send>>;
type ProbeFn = dyn Fn() -> ProbeFuture + Send + Sync;

enum Check {
    /// `None`: passing; `Some(reason)`: failing.
    Flag(Option<String>),
    /// Run on every `/readyz` request, within [`PROBE_TIMEOUT`].
    Probe(Arc<ProbeFn>),
}

#[derive(Default)]
struct Inner {
    checks: Mutex<BTreeMap<&'static str, Check>>,
    stopping: AtomicBool,
}

/// What `/readyz` reports: a set of named checks, all of which must pass,
/// and whether the process is stopping. Cheap to clone; every clone is the
/// same readiness.
#[derive(Clone, Default)]
pub struct Readiness {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Readiness {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let checks = self.checks();
        f.debug_struct("Readiness")
            .field("checks", &checks.keys().collect::<Vec<_>>())
            .field("stopping", &self.inner.stopping.load(Ordering::Relaxed))
            .finish()
    }
}

impl Readiness {
    /// A readiness whose `nats` check fails until [`Readiness::watch_nats`]
    /// gives it a connection to watch.
    pub fn new() -> Self {
        let readiness = Self::default();
        readiness.fail("nats", "not connected yet");
        readiness
    }

    fn checks(&self) -> std::sync::MutexGuard<'_, BTreeMap<&'static str, Check>> {
        self.inner
            .checks
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Check `name` fails, for `reason` (shown in the `/readyz` body).
    pub fn fail(&self, name: &'static str, reason: impl Into<String>) {
        self.checks().insert(name, Check::Flag(Some(reason.into())));
    }

    /// Check `name` passes.
    pub fn pass(&self, name: &'static str) {
        self.checks().insert(name, Check::Flag(None));
    }

    /// Check `name` runs `probe` on every `/readyz` request; it fails with
    /// the probe's error, or when the probe takes longer than
    /// [`PROBE_TIMEOUT`].
    pub fn probe<F, Fut>(&self, name: &'static str, probe: F)
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), String>> + Send + 'static,
    {
        let probe: Arc<ProbeFn> = Arc::new(move || Box::pin(probe()) as ProbeFuture);
        self.checks().insert(name, Check::Probe(probe));
    }

    /// Check `nats` passes while `client` is connected.
    pub fn watch_nats(&self, client: async_nats::Client) {
        self.probe("nats", move || {
            let state = client.connection_state();
            async move {
                match state {
                    async_nats::connection::State::Connected => Ok(()),
                    other => Err(format!("not connected to NATS ({other})")),
                }
            }
        });
    }

    /// The process is stopping: `/readyz` fails from now on.
    pub fn stopping(&self) {
        self.inner.stopping.store(true, Ordering::SeqCst);
    }

    /// Runs every check: `Ok` when all pass, else the failing ones with
    /// their reasons (`stopping` when the process is stopping).
    pub async fn check(&self) -> Result<(), BTreeMap<String, String>> {
        let mut failing = BTreeMap::new();
        if self.inner.stopping.load(Ordering::SeqCst) {
            failing.insert("stopping".to_owned(), "shutting down".to_owned());
        }
        let mut probes = Vec::new();
        for (name, check) in self.checks().iter() {
            match check {
                Check::Flag(None) => {}
                Check::Flag(Some(reason)) => {
                    failing.insert((*name).to_owned(), reason.clone());
                }
                Check::Probe(probe) => probes.push((*name, probe.clone())),
            }
        }
        let results =
            futures::future::join_all(probes.into_iter().map(|(name, probe)| async move {
                let result = match tokio::time::timeout(PROBE_TIMEOUT, probe()).await {
                    Ok(result) => result,
                    Err(_) => Err(format!("no answer within {PROBE_TIMEOUT:?}")),
                };
                (name, result)
            }))
            .await;
        for (name, result) in results {
            if let Err(reason) = result {
                failing.insert(name.to_owned(), reason);
            }
        }
        if failing.is_empty() {
            Ok(())
        } else {
            Err(failing)
        }
    }
}

/// A running listener; dropping it closes it at once.
#[derive(Debug)]
pub struct Server {
    addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Server {
    /// The address it listens on (the actual port when `http.listen` asked
    /// for port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Starts the listener on `config.listen` (none when it is empty) and logs
/// `http listening on <address>`. Fails only when the address cannot be
/// bound (a malformed address, a port in use).
pub async fn serve(config: &HttpConfig, readiness: Readiness) -> std::io::Result<Option<Server>> {
    let listen = config.listen.trim();
    if listen.is_empty() {
        tracing::info!("http listener off (http.listen is empty)");
        return Ok(None);
    }
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| std::io::Error::new(e.kind(), format!("cannot listen on {listen}: {e}")))?;
    let addr = listener.local_addr()?;
    let app = routes(readiness);
    let task = tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::warn!(error = %e, "http listener ended");
        }
    });
    tracing::info!("http listening on {addr}");
    Ok(Some(Server { addr, task }))
}

/// `/healthz` and `/readyz`, for a server of its own (the gateway's API,
/// for load balancers that probe the port they send to).
pub fn probes(readiness: Readiness) -> axum::Router {
    axum::Router::new()
        .route("/healthz", axum::routing::get(healthz))
        .route(
            "/readyz",
            axum::routing::get(move || readyz(readiness.clone())),
        )
}

/// [`probes`] and `/metrics` (installing the metrics recorder): what
/// [`serve`] serves.
fn routes(readiness: Readiness) -> axum::Router {
    let recorder = crate::metrics::install();
    probes(readiness).route(
        "/metrics",
        axum::routing::get(move || metrics(recorder.clone())),
    )
}

fn json(status: StatusCode, body: serde_json::Value) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

async fn healthz() -> Response {
    json(StatusCode::OK, serde_json::json!({ "status": "ok" }))
}

async fn metrics(recorder: Option<metrics_exporter_prometheus::PrometheusHandle>) -> Response {
    let body = recorder.map(|r| r.render()).unwrap_or_default();
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        body,
    )
        .into_response()
}

async fn readyz(readiness: Readiness) -> Response {
    match readiness.check().await {
        Ok(()) => json(StatusCode::OK, serde_json::json!({ "ready": true })),
        Err(failing) => json(
            StatusCode::SERVICE_UNAVAILABLE,
            serde_json::json!({ "ready": false, "failing": failing }),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn checks_flags_probes_and_stopping() {
        let readiness = Readiness::default();
        assert_eq!(readiness.check().await, Ok(()));
        readiness.fail("consumer", "not bound yet");
        readiness.probe("redis", || async { Err("down".to_owned()) });
        let failing = readiness.check().await.expect_err("two checks fail");
        assert_eq!(failing["consumer"], "not bound yet");
        assert_eq!(failing["redis"], "down");
        readiness.pass("consumer");
        readiness.probe("redis", || async { Ok(()) });
        assert_eq!(readiness.check().await, Ok(()));
        readiness.stopping();
        assert!(readiness.check().await.is_err());
    }

    #[tokio::test]
    async fn new_fails_nats_until_watched() {
        let failing = Readiness::new().check().await.expect_err("nats");
        assert!(failing.contains_key("nats"));
    }

    #[tokio::test]
    async fn an_empty_listen_address_serves_nothing() {
        let config = HttpConfig {
            listen: String::new(),
        };
        let server = serve(&config, Readiness::new()).await.expect("no error");
        assert!(server.is_none());
    }
}
