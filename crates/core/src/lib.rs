//! The jetsource runtime shared by every worker and the CLI.
//!
//! - [`config`]: layered configuration (defaults < file < environment).
//! - [`telemetry`]: `tracing` set-up, text or JSON.
//! - [`envelope`]: what a stored event looks like and which headers carry what.
//! - [`store`]: the event store on JetStream. The only module that talks to
//!   JetStream streams.
//! - [`integrity`]: the per-aggregate hash chain and event signatures.
//! - [`loader`]: rebuilding an aggregate's state from the store.
//! - [`protocol`]: the JSON request/reply shapes and error codes on the wire.
//! - [`health`]: the workers' `/healthz`, `/readyz` and `/metrics` listener.
//! - [`metrics`]: Prometheus metric names and the recorder.
//! - [`privacy`]: personal fields sealed per data subject, erased by
//!   forgetting the subject's key (crypto-shredding).
//! - [`verify`]: recomputing stored history's hash chains and signatures.

pub mod config;
pub mod deadlines;
pub mod envelope;
pub mod error;
pub mod health;
pub mod integrity;
pub mod loader;
pub mod metrics;
pub mod micro;
pub mod privacy;
pub mod protocol;
pub mod snapshot;
pub mod store;
pub mod telemetry;
pub mod verify;

pub use error::{error_chain, ErrorClass};
pub use jetsource_aggregate as aggregate;

/// Connects to NATS with the settings every jetsource process shares.
/// Adds the configured credentials and TLS settings (docs/SECURITY.md).
async fn authenticate(
    mut options: async_nats::ConnectOptions,
    config: &config::NatsConfig,
) -> Result<async_nats::ConnectOptions, store::StoreError> {
    let unusable = |what: &str, e: std::io::Error| {
        store::StoreError::new(
            store::StoreErrorKind::Unavailable,
            format!("cannot read {what}: {e}"),
        )
    };
    if let Some(path) = &config.credentials {
        options = options
            .credentials_file(path)
            .await
            .map_err(|e| unusable(&format!("NATS credentials {}", path.display()), e))?;
    }
    if let (Some(user), Some(password)) = (&config.user, &config.password) {
        options = options.user_and_password(user.clone(), password.expose().to_owned());
    }
    if let Some(token) = &config.token {
        options = options.token(token.expose().to_owned());
    }
    if let Some(seed) = &config.nkey_seed {
        options = options.nkey(seed.expose().to_owned());
    }
    let wants_tls = config
        .url
        .split(',')
        .any(|u| u.trim().starts_with("tls://"));
    if let Some(ca) = &config.tls_ca_file {
        options = options.add_root_certificates(ca.clone());
    }
    if let (Some(cert), Some(key)) = (&config.tls_cert_file, &config.tls_key_file) {
        options = options.add_client_certificate(cert.clone(), key.clone());
    }
    if wants_tls || config.tls_ca_file.is_some() || config.tls_cert_file.is_some() {
        options = options.require_tls(true);
    }
    Ok(options)
}

/// Connects to NATS with the settings every jetsource process shares:
/// credentials, TLS, the reply-inbox prefix of its role, reconnection for
/// ever. Waits a bounded time for the first connection and, if none came,
/// says why (refused, authorization, TLS).
pub async fn connect(
    config: &config::NatsConfig,
    client_name: &str,
) -> Result<async_nats::Client, store::StoreError> {
    let mut options = async_nats::ConnectOptions::new()
        .name(client_name)
        .custom_inbox_prefix(config.inbox_prefix())
        .request_timeout(Some(config.request_timeout()))
        .retry_on_initial_connect()
        .max_reconnects(None);
    options = authenticate(options, config).await?;
    // `retry_on_initial_connect` returns at once and connects in the
    // background, so a worker may start before NATS; wait a bounded time for
    // the first connection so a wrong URL fails fast with a clear message.
    // Several servers (a cluster) are given comma-separated; the client
    // also learns the others from the servers it reaches.
    let servers: Vec<&str> = config.url.split(',').map(str::trim).collect();
    let client = options.connect(servers.as_slice()).await.map_err(|e| {
        store::StoreError::new(
            store::StoreErrorKind::Unavailable,
            format!("cannot connect to NATS at {}: {e}", config.url),
        )
    })?;
    let deadline = std::time::Instant::now() + config.connect_timeout();
    while client.connection_state() != async_nats::connection::State::Connected {
        if std::time::Instant::now() > deadline {
            let why = diagnose(config, &servers).await;
            return Err(store::StoreError::new(
                store::StoreErrorKind::Unavailable,
                not_connected_message(config, why.as_deref()),
            ));
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    Ok(client)
}

/// One connection attempt without retries, for its error: the retrying
/// client reports a failed attempt only by its kind ("IO error"), while a
/// single attempt says what went wrong (an untrusted certificate, an
/// authorization violation, a refused connection).
async fn diagnose(config: &config::NatsConfig, servers: &[&str]) -> Option<String> {
    const ATTEMPT: std::time::Duration = std::time::Duration::from_secs(3);
    let options = async_nats::ConnectOptions::new().connection_timeout(ATTEMPT);
    let options = authenticate(options, config).await.ok()?;
    match tokio::time::timeout(ATTEMPT, options.connect(servers)).await {
        Ok(Err(e)) => Some(error_chain(&e)),
        Ok(Ok(_)) => None,
        Err(_) => Some(format!("no answer within {ATTEMPT:?}")),
    }
}

/// Why the first connection did not come, with what to check.
fn not_connected_message(config: &config::NatsConfig, failure: Option<&str>) -> String {
    let within = config.connect_timeout();
    let url = &config.url;
    let Some(failure) = failure else {
        return format!(
            "NATS at {url} not reachable within {within:?}; is nats-server running (try `make run`)?"
        );
    };
    format!(
        "NATS at {url} not reachable within {within:?}: {failure}. Is nats-server running \
         (try `make run`)? Check this role's credentials (nats.user/password, token, nkey or \
         creds; .run/<role>.env after `make run`) and TLS (a tls:// URL, nats.tls_ca_file, a \
         client certificate if the server verifies clients)"
    )
}

/// Longest a stopping worker waits for NATS to take its last messages: with
/// the servers gone (a whole cluster stopped first), flushing would wait for
/// a reconnection forever.
pub const EXIT_FLUSH_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// How long a stopping worker spends, at most, after the shutdown signal,
/// finishing what it had taken (requests in flight, the current batch) and
/// handing its last messages to NATS. With NATS and Redis healthy that takes
/// milliseconds; with them gone, every step on the way out gives up at the
/// one deadline this sets ([`stop_deadline`]), so the process ends about
/// this long after SIGTERM. The fleet's standard is 10 s.
pub const STOP_BUDGET: std::time::Duration = std::time::Duration::from_secs(4);

/// Longest [`until_stopped`] lets a worker's `run` go on after the shutdown
/// signal before it ends the process anyway: the backstop behind
/// [`STOP_BUDGET`], for a wait nobody bounded.
pub const STOP_GRACE: std::time::Duration = std::time::Duration::from_secs(8);

/// The deadline of a stop that starts now: [`STOP_BUDGET`] from now.
pub fn stop_deadline() -> tokio::time::Instant {
    tokio::time::Instant::now() + STOP_BUDGET
}

/// Flushes what `clients` still have to send, all at once, until `deadline`
/// at the latest; for the last step of a stop. A client that is not
/// connected (NATS gone) cannot take anything until it reconnects, which
/// may happen before the deadline (another node of a cluster).
pub async fn flush_before_exit(clients: &[&async_nats::Client], deadline: tokio::time::Instant) {
    let flushes = futures::future::join_all(clients.iter().map(|c| c.flush()));
    match tokio::time::timeout_at(deadline, flushes).await {
        Ok(results) => {
            if let Some(Err(e)) = results.into_iter().find(Result::is_err) {
                tracing::warn!(error = %e, "NATS did not take the last messages; exiting anyway");
            }
        }
        Err(_) => tracing::warn!(
            "NATS did not take the last messages within the stop budget ({STOP_BUDGET:?}); exiting anyway"
        ),
    }
}

/// Drives a worker: `run` gets the graceful-shutdown trigger (resolves on
/// the first SIGINT or SIGTERM; the handlers are installed before `run`
/// starts) and is awaited. If it has not returned [`STOP_GRACE`] after the
/// signal, the process exits with status 1 without waiting any longer, so a
/// worker ends within that of SIGTERM whatever state its servers are in.
/// `run` is expected to finish within [`STOP_BUDGET`]; this is the backstop.
pub async fn until_stopped<E, Fut>(
    run: impl FnOnce(std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>) -> Fut,
) -> Result<(), E>
where
    Fut: std::future::Future<Output = Result<(), E>>,
{
    let (signalled, mut stop) = tokio::sync::watch::channel(false);
    let mut watched = stop.clone();
    tokio::spawn(async move {
        shutdown_signal().await;
        signalled.send_replace(true);
    });
    let shutdown = Box::pin(async move {
        let _ = stop.wait_for(|s| *s).await;
    });
    let worker = run(shutdown);
    tokio::pin!(worker);
    tokio::select! {
        result = &mut worker => return result,
        _ = watched.wait_for(|s| *s) => {}
    }
    match tokio::time::timeout(STOP_GRACE, worker).await {
        Ok(result) => result,
        Err(_) => {
            tracing::error!(
                "still stopping {STOP_GRACE:?} after the shutdown signal; exiting without finishing"
            );
            std::process::exit(1);
        }
    }
}

/// Runs a worker's start-up step until it does not fail transiently:
/// `transient` says which errors are worth another attempt (the cluster
/// electing leaders, a replicated stream or bucket being created by another
/// copy at the same moment). Logs a warning per attempt and backs off up to
/// 2 s. Workers race their whole start-up against the stop signal, so this
/// never holds up a shutdown.
pub async fn until_available<T, E, F, Fut>(
    what: &str,
    transient: impl Fn(&E) -> bool,
    mut step: F,
) -> Result<T, E>
where
    E: std::fmt::Display,
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, E>>,
{
    let mut backoff = std::time::Duration::from_millis(100);
    loop {
        match step().await {
            Err(e) if transient(&e) => {
                tracing::warn!(error = %e, "{what} not available yet; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(std::time::Duration::from_secs(2));
            }
            other => return other,
        }
    }
}

/// Resolves on the first SIGINT (Ctrl-C) or SIGTERM: the graceful-shutdown
/// trigger every worker binary passes to its `run`.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = terminate => {},
    }
    tracing::info!("shutdown signal received");
}
