//! Everything the run starts: the 3-node nats-server cluster
//! (`sync_interval: always`), Redis, and the worker binaries of this build
//! as child processes. Each is stopped by the PID we spawned when dropped,
//! so a run that fails, panics or is interrupted leaves nothing behind.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context};
use futures::StreamExt;
use jetsource_test_support::accounts::RoleCredentials;
use jetsource_test_support::certs::{nats_tls_block, redis_tls_args, write_test_pki, Pki};
use jetsource_test_support::{workspace_binary, NatsCluster, RedisServer};

use crate::progress::say;

/// Longest a worker may take to exit after SIGTERM (issue 9: orchestrators
/// give 10-30 s before SIGKILL).
pub const STOP_BOUND: Duration = Duration::from_secs(10);
/// How long we wait after SIGTERM before killing a worker that hangs.
const STOP_GIVE_UP: Duration = Duration::from_secs(15);
/// Entries in each account's recent-transactions list, set explicitly so the
/// checks know what the read model keeps.
pub const RECENT_TRANSACTIONS: usize = 20;

/// A worker binary.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    Command,
    Projector,
    Snapshotter,
    /// The bank's loyalty process.
    Process,
}

impl Kind {
    pub const ALL: [Kind; 4] = [
        Kind::Command,
        Kind::Projector,
        Kind::Snapshotter,
        Kind::Process,
    ];

    /// Binary and micro-service name (they are the same).
    pub fn binary(self) -> &'static str {
        match self {
            Kind::Command => "jetsource-command",
            Kind::Projector => "jetsource-projector",
            Kind::Snapshotter => "jetsource-snapshotter",
            Kind::Process => "jetsource-process",
        }
    }

    fn label(self) -> &'static str {
        match self {
            Kind::Command => "command",
            Kind::Projector => "projector",
            Kind::Snapshotter => "snapshotter",
            Kind::Process => "process",
        }
    }
}

/// A running worker process, killed (SIGKILL, by PID) on drop.
#[derive(Debug)]
struct Worker {
    kind: Kind,
    name: String,
    child: Child,
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// How one worker stopped after SIGTERM at the end of the run.
#[derive(Debug, Clone)]
pub struct Stopped {
    pub name: String,
    pub pid: u32,
    /// It had exited on its own before the SIGTERM (not a shutdown).
    pub early: bool,
    /// `None`: still running after [`STOP_GIVE_UP`], then killed.
    pub after: Option<Duration>,
    pub status: String,
}

/// Locks a mutex, ignoring poisoning: a panicked fault task must not keep
/// the drop guards from stopping the processes.
pub fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Runs blocking server control (the test-support harness sleeps and
/// panics on failure) off the async threads, turning a panic into an error.
pub async fn blocking<T: Send + 'static>(
    what: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> anyhow::Result<T> {
    tokio::task::spawn_blocking(f).await.map_err(|e| {
        let reason = match e.try_into_panic() {
            Ok(payload) => payload
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| payload.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                .unwrap_or_else(|| "panicked".into()),
            Err(e) => e.to_string(),
        };
        anyhow!("{what}: {reason}")
    })
}

/// The servers and workers of one run.
/// The id of the run's signing key.
const SIGNING_KEY_ID: &str = "chaos";

#[derive(Debug)]
pub struct Fleet {
    cluster: Arc<Mutex<NatsCluster>>,
    redis: Arc<Mutex<RedisServer>>,
    workers: Mutex<Vec<Worker>>,
    counters: Mutex<HashMap<Kind, usize>>,
    binaries: HashMap<Kind, PathBuf>,
    run_dir: PathBuf,
    pub nats_urls: String,
    pub redis_url: String,
    /// A NATS user per role (nats/accounts.conf).
    pub credentials: RoleCredentials,
    /// The run's certificates: NATS and Redis serve TLS only.
    pub pki: Pki,
    /// The signing key of the command and process workers
    /// (`<id>.key`) and its public half (`<id>.pub`).
    pub keys: PathBuf,
}

impl Fleet {
    /// Starts the cluster and Redis; workers come with [`Fleet::spawn`].
    pub async fn start(run_dir: &Path) -> anyhow::Result<Self> {
        let binaries = blocking("finding the worker binaries (run `make build`)", || {
            Kind::ALL
                .iter()
                .map(|&k| (k, workspace_binary(k.binary())))
                .collect::<HashMap<_, _>>()
        })
        .await?;
        // Authorization and TLS on, as production runs: the workers, the
        // clients and the run's own checks each connect as their role
        // (docs/SECURITY.md), over TLS to NATS and Redis (docs/TLS.md), with
        // certificates made for this run.
        let credentials = RoleCredentials::generate();
        let pki = write_test_pki(&run_dir.join("pki"));
        let server_config = credentials.server_config() + &nats_tls_block(&pki, false);
        let cluster = blocking("starting the 3-node nats-server cluster", move || {
            NatsCluster::start_configured(|_| server_config)
        })
        .await?;
        let nats_urls = cluster.urls().replace("nats://", "tls://");
        say(&format!("nats-server cluster up: {nats_urls}"));
        let redis_pki = pki.clone();
        let redis = blocking("starting redis-server", move || {
            RedisServer::start_configured(|_, port| redis_tls_args(&redis_pki, port, "no"))
        })
        .await?;
        let redis_url = format!("rediss://127.0.0.1:{}/", redis.port());
        say(&format!("redis-server up: {redis_url}"));
        // The writers sign every event, as production should.
        let keys = run_dir.join("keys");
        std::fs::create_dir_all(&keys)?;
        jetsource_core::integrity::Signer::generate(SIGNING_KEY_ID)?.write(&keys)?;
        Ok(Self {
            keys,
            cluster: Arc::new(Mutex::new(cluster)),
            redis: Arc::new(Mutex::new(redis)),
            workers: Mutex::new(Vec::new()),
            counters: Mutex::new(HashMap::new()),
            binaries,
            run_dir: run_dir.to_owned(),
            nats_urls,
            redis_url,
            credentials,
            pki,
        })
    }

    /// Starts one more worker of `kind`, its stderr in `<run dir>/<name>.log`;
    /// returns its name (`projector-3`: the third projector started).
    pub fn spawn(&self, kind: Kind) -> anyhow::Result<String> {
        let n = {
            let mut counters = lock(&self.counters);
            let n = counters.entry(kind).or_insert(0);
            *n += 1;
            *n
        };
        let name = format!("{}-{n}", kind.label());
        let log = self.run_dir.join(format!("{name}.log"));
        let stderr = std::fs::File::create(&log)
            .with_context(|| format!("cannot create {}", log.display()))?;
        let child = self
            .command(kind)
            .stderr(stderr)
            .spawn()
            .with_context(|| format!("cannot start {}", kind.binary()))?;
        say(&format!("started {name} (pid {})", child.id()));
        lock(&self.workers).push(Worker {
            kind,
            name: name.clone(),
            child,
        });
        Ok(name)
    }

    fn command(&self, kind: Kind) -> Command {
        let mut command = Command::new(&self.binaries[&kind]);
        command
            .env_remove("JETSOURCE_CONFIG")
            .env("JETSOURCE__NATS__URL", &self.nats_urls)
            .env("JETSOURCE__STORE__REPLICAS", "3")
            .env("JETSOURCE__REDIS__URL", &self.redis_url)
            .env("JETSOURCE__NATS__TLS_CA_FILE", &self.pki.ca)
            .env("JETSOURCE__REDIS__TLS_CA_FILE", &self.pki.ca)
            .env(
                "JETSOURCE__PROJECTOR__RECENT_TRANSACTIONS",
                RECENT_TRANSACTIONS.to_string(),
            )
            .envs(self.credentials.env(kind.label()))
            .env("JETSOURCE__STORE__TRUSTED_KEYS", &self.keys)
            .env("RUST_LOG", "info,async_nats=warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null());
        if matches!(kind, Kind::Command | Kind::Process) {
            let key = self.keys.join(format!("{SIGNING_KEY_ID}.key"));
            command.env("JETSOURCE__STORE__SIGNING_KEY", key);
        }
        command
    }

    /// Names and PIDs of the running workers of `kind`, oldest first.
    pub fn members(&self, kind: Kind) -> Vec<(String, u32)> {
        lock(&self.workers)
            .iter()
            .filter(|w| w.kind == kind)
            .map(|w| (w.name.clone(), w.child.id()))
            .collect()
    }

    /// SIGKILLs the worker with this PID (only if we started it); returns
    /// its name.
    pub fn kill_pid(&self, pid: u32) -> Option<String> {
        let mut workers = lock(&self.workers);
        let index = workers.iter().position(|w| w.child.id() == pid)?;
        let worker = workers.remove(index);
        let name = worker.name.clone();
        drop(worker); // SIGKILL and reap
        Some(name)
    }

    /// If worker `name` has exited on its own: its status and the first
    /// line of its log (the error it gave up with).
    pub fn exited(&self, name: &str) -> Option<String> {
        let mut workers = lock(&self.workers);
        let worker = workers.iter_mut().find(|w| w.name == name)?;
        let status = worker.child.try_wait().ok().flatten()?;
        let log = self.run_dir.join(format!("{name}.log"));
        let first = std::fs::read_to_string(&log).unwrap_or_default();
        let first = first.lines().find(|l| !l.trim().is_empty()).unwrap_or("");
        Some(format!("{status}: {first} ({})", log.display()))
    }

    /// SIGTERMs every worker at once and times each exit; a worker still
    /// running after [`STOP_GIVE_UP`] is killed and reported as such.
    /// The permission violations the nodes logged (a role refused
    /// something it tried: docs/SECURITY.md), as `node: line`.
    pub fn permission_violations(&self) -> Vec<String> {
        let cluster = lock(&self.cluster);
        (0..cluster.len())
            .flat_map(|i| {
                std::fs::read_to_string(cluster.log_path(i))
                    .unwrap_or_default()
                    .lines()
                    .filter(|l| l.contains("Permissions Violation"))
                    .map(|l| format!("{}: {l}", cluster.node_name(i)))
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    pub async fn terminate_all(&self) -> Vec<Stopped> {
        let workers = std::mem::take(&mut *lock(&self.workers));
        blocking("stopping the workers", move || terminate(workers))
            .await
            .unwrap_or_default()
    }

    /// Index of the node named `name` (as stream info names its leader).
    pub fn node_index(&self, name: &str) -> Option<usize> {
        let cluster = lock(&self.cluster);
        (0..cluster.len()).find(|&i| cluster.node_name(i) == name)
    }

    pub fn node_name(&self, i: usize) -> String {
        lock(&self.cluster).node_name(i)
    }

    pub fn node_count(&self) -> usize {
        lock(&self.cluster).len()
    }

    /// HTTP monitoring port of each node.
    pub fn monitor_ports(&self) -> Vec<u16> {
        let cluster = lock(&self.cluster);
        (0..cluster.len())
            .map(|i| cluster.monitor_port(i))
            .collect()
    }

    /// SIGKILLs node `i`.
    pub async fn kill_node(&self, i: usize) -> anyhow::Result<()> {
        let cluster = self.cluster.clone();
        blocking("killing a node", move || lock(&cluster).kill_node(i)).await
    }

    /// Starts node `i` again with its store.
    pub async fn start_node(&self, i: usize) -> anyhow::Result<()> {
        let cluster = self.cluster.clone();
        blocking("restarting a node", move || lock(&cluster).start_node(i)).await
    }

    /// SIGKILLs Redis and starts it again, empty, on the same port.
    pub async fn restart_redis_empty(&self) -> anyhow::Result<()> {
        let redis = self.redis.clone();
        blocking("restarting Redis", move || lock(&redis).restart_empty()).await
    }

    /// Copies the nats-server logs into the run directory (the cluster's
    /// own directory is deleted with it).
    pub fn save_server_logs(&self) {
        let cluster = lock(&self.cluster);
        for i in 0..cluster.len() {
            let to = self
                .run_dir
                .join(format!("nats-{}.log", cluster.node_name(i)));
            let _ = std::fs::copy(cluster.log_path(i), to);
        }
    }
}

/// Waits until `n` copies of `kind` answer `$SRV.PING` (`false` at the
/// deadline).
pub async fn wait_ready(
    client: &async_nats::Client,
    kind: Kind,
    n: usize,
    within: Duration,
) -> bool {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if count_instances(client, kind.binary()).await >= n {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    false
}

/// How many instances of service `name` answer a ping within 300 ms.
async fn count_instances(client: &async_nats::Client, name: &str) -> usize {
    let inbox = client.new_inbox();
    let Ok(mut replies) = client.subscribe(inbox.clone()).await else {
        return 0;
    };
    if client
        .publish_with_reply(format!("$SRV.PING.{name}"), inbox, "".into())
        .await
        .is_err()
    {
        return 0;
    }
    let mut ids = std::collections::HashSet::new();
    let until = tokio::time::Instant::now() + Duration::from_millis(300);
    while let Ok(Some(reply)) = tokio::time::timeout_at(until, replies.next()).await {
        if let Ok(v) = serde_json::from_slice::<serde_json::Value>(&reply.payload) {
            ids.insert(v["id"].as_str().unwrap_or_default().to_owned());
        }
    }
    ids.len()
}

/// SIGTERM to each worker (by PID), then polls their exits. A worker that
/// had already exited is reported as such, not timed.
fn terminate(mut workers: Vec<Worker>) -> Vec<Stopped> {
    let early: Vec<Option<ExitStatus>> = workers
        .iter_mut()
        .map(|w| w.child.try_wait().ok().flatten())
        .collect();
    let started = Instant::now();
    for (worker, early) in workers.iter().zip(&early) {
        if early.is_none() {
            let _ = Command::new("kill")
                .arg("-TERM")
                .arg(worker.child.id().to_string())
                .status();
        }
    }
    let mut stopped: Vec<Option<(Duration, ExitStatus)>> = early
        .iter()
        .map(|e| e.map(|status| (Duration::ZERO, status)))
        .collect();
    while started.elapsed() < STOP_GIVE_UP && stopped.iter().any(Option::is_none) {
        for (worker, slot) in workers.iter_mut().zip(stopped.iter_mut()) {
            if slot.is_none() {
                if let Ok(Some(status)) = worker.child.try_wait() {
                    *slot = Some((started.elapsed(), status));
                }
            }
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    workers
        .iter()
        .zip(stopped)
        .zip(early)
        .map(|((w, slot), early)| Stopped {
            name: w.name.clone(),
            pid: w.child.id(),
            early: early.is_some(),
            after: slot.filter(|_| early.is_none()).map(|(after, _)| after),
            status: match (early, slot) {
                (Some(status), _) => format!("had exited before SIGTERM: {status}"),
                (None, Some((_, status))) => status.to_string(),
                (None, None) => "killed (SIGKILL) after 15 s".into(),
            },
        })
        .collect()
    // Dropping `workers` kills whatever is still running.
}
