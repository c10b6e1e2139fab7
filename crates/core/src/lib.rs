//! The jetsource runtime shared by every worker and the CLI.
//!
//! - [`config`]: layered configuration (defaults < file < environment).
//! - [`telemetry`]: `tracing` set-up, text or JSON.
//! - [`envelope`]: what a stored event looks like and which headers carry what.
//! - [`store`]: the event store on JetStream. The only module that talks to
//!   JetStream streams.
//! - [`loader`]: rebuilding an aggregate's state from the store.
//! - [`protocol`]: the JSON request/reply shapes and error codes on the wire.

pub mod config;
pub mod envelope;
pub mod error;
pub mod loader;
pub mod micro;
pub mod protocol;
pub mod snapshot;
pub mod store;
pub mod telemetry;

pub use error::ErrorClass;
pub use jetsource_aggregate as aggregate;

/// Connects to NATS with the settings every jetsource process shares.
pub async fn connect(
    config: &config::NatsConfig,
    client_name: &str,
) -> Result<async_nats::Client, store::StoreError> {
    let mut options = async_nats::ConnectOptions::new()
        .name(client_name)
        .request_timeout(Some(config.request_timeout()))
        .retry_on_initial_connect()
        .max_reconnects(None);
    if let Some(path) = &config.credentials {
        options = options.credentials_file(path).await.map_err(|e| {
            store::StoreError::new(
                store::StoreErrorKind::Unavailable,
                format!("cannot read NATS credentials {}: {e}", path.display()),
            )
        })?;
    }
    // `retry_on_initial_connect` returns at once and connects in the
    // background, so a worker may start before NATS; wait a bounded time for
    // the first connection so a wrong URL fails fast with a clear message.
    // Several servers (a cluster) are given comma-separated; the client
    // also learns the others from the servers it reaches.
    let servers: Vec<&str> = config.url.split(',').map(str::trim).collect();
    let client = options.connect(servers).await.map_err(|e| {
        store::StoreError::new(
            store::StoreErrorKind::Unavailable,
            format!("cannot connect to NATS at {}: {e}", config.url),
        )
    })?;
    let deadline = std::time::Instant::now() + config.connect_timeout();
    while client.connection_state() != async_nats::connection::State::Connected {
        if std::time::Instant::now() > deadline {
            return Err(store::StoreError::new(
                store::StoreErrorKind::Unavailable,
                format!(
                    "NATS at {} not reachable within {:?}; is nats-server running (try `make run`)?",
                    config.url,
                    config.connect_timeout()
                ),
            ));
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    Ok(client)
}

/// Longest a stopping worker waits for NATS to take its last messages: with
/// the servers gone (a whole cluster stopped first), flushing would wait for
/// a reconnection forever.
pub const EXIT_FLUSH_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Flushes what `client` still has to send, for at most
/// [`EXIT_FLUSH_TIMEOUT`]; for the last step of a shutdown.
pub async fn flush_before_exit(client: &async_nats::Client) {
    if tokio::time::timeout(EXIT_FLUSH_TIMEOUT, client.flush())
        .await
        .is_err()
    {
        tracing::warn!(
            "NATS did not take the last messages within {EXIT_FLUSH_TIMEOUT:?}; exiting anyway"
        );
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
