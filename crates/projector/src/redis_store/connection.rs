//! A Redis connection that bounds every call and replaces itself when it
//! stops answering.
//!
//! redis-rs' `ConnectionManager` was used before, and three of its
//! behaviours wedged a projector copy (issue 9):
//!
//! - A call that times out does not replace the connection: only errors
//!   that mean "the socket is gone" do (`reconnect_if_dropped!` in
//!   `redis::aio::connection_manager`; a timeout is an `io::ErrorKind::
//!   TimedOut`, whose retry method is `RetryImmediately`, not `Reconnect`).
//!   A connection whose replies stopped coming kept being used, and every
//!   call on it timed out, for as long as the process lived.
//! - Its default response timeout (500 ms, `DEFAULT_RESPONSE_TIMEOUT` in
//!   redis-rs 1.x) applied to everything alike: a batch of a thousand
//!   events that Redis needed longer for failed, was executed anyway and
//!   sent again, and on the one multiplexed connection every small read
//!   queued behind those batches timed out too.
//! - While it reconnected, calls waited for the whole retry schedule (six
//!   attempts with exponential back-off, about 10 s with Redis down), not
//!   for their own timeout.
//!
//! [`Connection`] instead: every call, connecting included, ends within the
//! connection's timeout; a call that timed out or failed at the connection
//! level retires the connection it used, and the next call opens a new one
//! (calls already running on the old one finish or time out on it); a
//! failed connection attempt is remembered for [`RECONNECT_PAUSE`], so
//! callers fail fast while Redis is down instead of queueing attempts.
//! There is no retry budget to run out: every call after the pause tries
//! again, however long Redis was away. Callers retry (the runner with
//! back-off; queries answer `unavailable`).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::{BoxFuture, FutureExt, Shared};
use redis::aio::{ConnectionLike, MultiplexedConnection};
use redis::{AsyncConnectionConfig, Cmd, Pipeline, RedisError, RedisFuture, RedisResult, Value};
use tokio::time::Instant;

use jetsource_core::config::RedisConfig;
use jetsource_core::ErrorClass;

/// How long a failed connection attempt is reused as the answer before the
/// next call tries again.
pub const RECONNECT_PAUSE: Duration = Duration::from_millis(200);

type Connecting = Shared<BoxFuture<'static, RedisResult<(u64, MultiplexedConnection)>>>;

enum State {
    /// No connection: the next call opens one.
    Idle,
    Connecting(Connecting),
    Ready {
        id: u64,
        con: MultiplexedConnection,
    },
    /// The last attempt failed at `at`.
    Failed {
        at: Instant,
        error: RedisError,
    },
}

struct Slot {
    client: redis::Client,
    /// What the connection is for, in log lines.
    role: &'static str,
    state: Mutex<State>,
    next_id: std::sync::atomic::AtomicU64,
}

/// A self-healing Redis connection (see the module documentation). Cheap
/// to clone; clones share the connection. Implements
/// [`redis::aio::ConnectionLike`], so commands, pipelines and scripts run
/// on it as on any redis-rs connection.
#[derive(Clone)]
pub struct Connection {
    slot: Arc<Slot>,
    timeout: Duration,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("role", &self.slot.role)
            .field("timeout", &self.timeout)
            .finish()
    }
}

fn lock(state: &Mutex<State>) -> std::sync::MutexGuard<'_, State> {
    state.lock().unwrap_or_else(|p| p.into_inner())
}

fn timed_out(role: &str, what: &str, after: Duration) -> RedisError {
    std::io::Error::new(
        std::io::ErrorKind::TimedOut,
        format!("no answer from Redis within {after:?} ({role}, {what})"),
    )
    .into()
}

/// Whether `error` says something about the connection rather than about
/// the command: such a connection is not used again.
fn breaks_connection(error: &RedisError) -> bool {
    error.is_io_error()
        || error.is_timeout()
        || error.is_connection_dropped()
        || error.is_unrecoverable_error()
}

/// What a caller should do about a Redis error: [`ErrorClass::Transient`]
/// for anything a later attempt may not meet (the connection, time, a
/// server loading, busy, read-only or out of memory), otherwise
/// [`ErrorClass::Permanent`] (a wrong command or an unexpected reply: a bug,
/// the same call fails again).
pub fn class(error: &RedisError) -> ErrorClass {
    use redis::{ErrorKind, ServerErrorKind};
    if breaks_connection(error) {
        return ErrorClass::Transient;
    }
    match error.kind() {
        ErrorKind::Server(
            ServerErrorKind::BusyLoading
            | ServerErrorKind::TryAgain
            | ServerErrorKind::ClusterDown
            | ServerErrorKind::MasterDown
            | ServerErrorKind::ReadOnly
            | ServerErrorKind::NoScript
            | ServerErrorKind::Moved
            | ServerErrorKind::Ask,
        ) => ErrorClass::Transient,
        _ if matches!(
            error.code(),
            Some("BUSY" | "OOM" | "MISCONF" | "NOREPLICAS")
        ) =>
        {
            ErrorClass::Transient
        }
        _ => ErrorClass::Permanent,
    }
}

/// A client for `url` with `config`'s TLS files: the CA that signs the
/// server's certificate (instead of the system's roots) and, if set, a
/// client certificate and key. For `redis://` URLs the files do not matter;
/// `rediss://` ones connect with TLS.
pub fn client(url: &str, config: &RedisConfig) -> RedisResult<redis::Client> {
    if config.tls_ca_file.is_none() && config.tls_cert_file.is_none() {
        return redis::Client::open(url);
    }
    let read = |key: &str, path: &std::path::Path| {
        std::fs::read(path).map_err(|e| {
            RedisError::from(std::io::Error::new(
                e.kind(),
                format!("redis.{key} {}: {e}", path.display()),
            ))
        })
    };
    let root_cert = match &config.tls_ca_file {
        Some(path) => Some(read("tls_ca_file", path)?),
        None => None,
    };
    let client_tls = match (&config.tls_cert_file, &config.tls_key_file) {
        (Some(cert), Some(key)) => Some(redis::ClientTlsConfig {
            client_cert: read("tls_cert_file", cert)?,
            client_key: read("tls_key_file", key)?,
        }),
        _ => None,
    };
    redis::Client::build_with_tls(
        url,
        redis::TlsCertificates {
            client_tls,
            root_cert,
        },
    )
}

impl Connection {
    /// A connection to `client`'s server whose calls (connecting included)
    /// end within `timeout`. Connects on first use.
    pub fn new(client: redis::Client, role: &'static str, timeout: Duration) -> Self {
        Self {
            slot: Arc::new(Slot {
                client,
                role,
                state: Mutex::new(State::Idle),
                next_id: std::sync::atomic::AtomicU64::new(1),
            }),
            timeout,
        }
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// The current connection, opening one if there is none.
    async fn current(&self, deadline: Instant) -> RedisResult<(u64, MultiplexedConnection)> {
        let connecting = {
            let mut state = lock(&self.slot.state);
            match &*state {
                State::Ready { id, con } => return Ok((*id, con.clone())),
                State::Failed { at, error } if at.elapsed() < RECONNECT_PAUSE => {
                    return Err(error.clone())
                }
                State::Connecting(connecting) => connecting.clone(),
                State::Idle | State::Failed { .. } => {
                    let connecting = self.connect();
                    *state = State::Connecting(connecting.clone());
                    connecting
                }
            }
        };
        match tokio::time::timeout_at(deadline, connecting).await {
            Ok(result) => result,
            Err(_) => Err(timed_out(self.slot.role, "connecting", self.timeout)),
        }
    }

    /// Starts one connection attempt, bounded by the timeout, shared by
    /// every caller that needs it, and driven by a task of its own so it
    /// completes (and records its outcome) even if they all give up.
    fn connect(&self) -> Connecting {
        // Weak: an attempt in flight does not keep a dropped connection's
        // state alive.
        let slot = Arc::downgrade(&self.slot);
        let client = self.slot.client.clone();
        let role = self.slot.role;
        let id = self
            .slot
            .next_id
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        // The response timeout is ours (per call, in `run`); redis-rs' own
        // would only add a second, shorter one.
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(self.timeout))
            .set_response_timeout(None);
        let attempt = async move {
            let result = client
                .get_multiplexed_async_connection_with_config(&config)
                .await
                .map(|con| (id, con));
            if let Some(slot) = slot.upgrade() {
                let mut state = lock(&slot.state);
                *state = match &result {
                    Ok((id, con)) => State::Ready {
                        id: *id,
                        con: con.clone(),
                    },
                    Err(error) => {
                        tracing::debug!(role, %error, "cannot connect to Redis");
                        State::Failed {
                            at: Instant::now(),
                            error: error.clone(),
                        }
                    }
                };
            }
            result
        }
        .boxed()
        .shared();
        tokio::spawn(attempt.clone().map(|_| ()));
        attempt
    }

    /// Stops using connection `id` (if it is still the current one): the
    /// next call opens a new one.
    fn retire(&self, id: u64, why: &RedisError) {
        let mut state = lock(&self.slot.state);
        if matches!(&*state, State::Ready { id: current, .. } if *current == id) {
            tracing::warn!(role = self.slot.role, error = %why, "replacing the Redis connection");
            *state = State::Idle;
        }
    }

    /// Runs `call` on the current connection within the timeout; retires
    /// the connection when the call timed out or broke it.
    async fn run<T, F>(
        &self,
        what: &str,
        call: impl FnOnce(MultiplexedConnection) -> F,
    ) -> RedisResult<T>
    where
        F: std::future::Future<Output = RedisResult<T>>,
    {
        let deadline = Instant::now() + self.timeout;
        let (id, con) = self.current(deadline).await?;
        match tokio::time::timeout_at(deadline, call(con)).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(error)) => {
                if breaks_connection(&error) {
                    self.retire(id, &error);
                }
                Err(error)
            }
            Err(_) => {
                let error = timed_out(self.slot.role, what, self.timeout);
                self.retire(id, &error);
                Err(error)
            }
        }
    }
}

impl ConnectionLike for Connection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        Box::pin(async move {
            self.run("a command", |mut con| async move {
                con.req_packed_command(cmd).await
            })
            .await
        })
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        Box::pin(async move {
            self.run("a pipeline", |mut con| async move {
                con.req_packed_commands(pipeline, offset, count).await
            })
            .await
        })
    }

    fn get_db(&self) -> i64 {
        self.slot.client.get_connection_info().redis_settings().db()
    }
}
