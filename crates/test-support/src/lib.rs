//! Real servers for tests, one set per test.
//!
//! [`NatsServer::start`] and [`RedisServer::start`] spawn the actual server
//! binaries on a free loopback port with a private temp directory; dropping
//! the handle kills that process (by the PID we spawned) and removes the
//! directory. Nothing here is a mock, and nothing assumes a server is already
//! running.
//!
//! With `JETSOURCE_TEST_BACKEND=docker` the same servers run as containers
//! through testcontainers (images `nats:2.12-alpine`, `redis:7-alpine`),
//! published on a free loopback port. The default, `process`, needs no
//! Docker engine.
//!
//! Binaries are found in this order: `$JETSOURCE_NATS_SERVER` /
//! `$JETSOURCE_REDIS_SERVER`, the repository's `tools/bin/` (filled by
//! `make setup`), then `PATH`. nats-server must be 2.12 or newer.

#![allow(clippy::unwrap_used)] // test harness: failing loudly is the point

pub mod accounts;
pub mod certs;
mod docker;
pub mod filestore;
pub mod requests;

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use futures::StreamExt;

const START_TIMEOUT: Duration = Duration::from_secs(20);

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .unwrap()
}

fn find_binary(env: &str, name: &str) -> Option<PathBuf> {
    if let Some(path) = std::env::var_os(env) {
        return Some(PathBuf::from(path));
    }
    let local = repo_root().join("tools/bin").join(name);
    if local.is_file() {
        return Some(local);
    }
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join(name))
            .find(|p| p.is_file())
    })
}

/// A loopback port nobody listens on right now. Another process may still
/// take it before the server binds, so callers retry on a failed start.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Spawns `command` and waits until `port` accepts connections. `None` when
/// the process exited first (typically: the port was taken meanwhile).
fn spawn_and_wait(mut command: Command, port: u16, what: &str) -> Option<Child> {
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {what}: {e}"));
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        if let Ok(Some(_status)) = child.try_wait() {
            return None;
        }
        if TcpStream::connect_timeout(&addr, Duration::from_millis(100)).is_ok() {
            return Some(child);
        }
        assert!(
            Instant::now() < deadline,
            "{what} did not listen on {addr} within {START_TIMEOUT:?}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn kill(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

/// Durability setting of a test nats-server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Sync {
    /// The server default (fsync every 2 minutes): fast, what most tests need.
    #[default]
    Default,
    /// `sync_interval: always`, as `nats/dev.conf` ships.
    Always,
}

#[derive(Debug)]
enum Backend {
    Process(Child),
    /// A process server that was killed and not started again.
    Down,
    Docker(docker::Container),
}

impl Backend {
    fn kill(&mut self) {
        if let Backend::Process(child) = self {
            kill(child);
            *self = Backend::Down;
        }
    }
}

fn nats_config(port: u16, store_dir: &Path, log: Option<&Path>, sync: Sync) -> String {
    let sync_line = match sync {
        Sync::Default => "",
        Sync::Always => "sync_interval: always",
    };
    let log_line = log.map(|l| format!("logfile: {l:?}\n")).unwrap_or_default();
    format!(
        "listen: 0.0.0.0:{port}\nserver_name: test-{port}\n{log_line}jetstream {{\n  store_dir: {store_dir:?}\n  {sync_line}\n}}\n"
    )
}

/// A nats-server with JetStream, reachable on 127.0.0.1.
#[derive(Debug)]
pub struct NatsServer {
    backend: Backend,
    port: u16,
    dir: tempfile::TempDir,
    sync: Sync,
    /// Configuration appended to the generated file (accounts, TLS), kept
    /// across restarts.
    extra: String,
}

/// Path of a nats-server binary, 2.12 or newer, or a panic that says how to
/// get one.
pub fn nats_server_binary() -> PathBuf {
    let path = find_binary("JETSOURCE_NATS_SERVER", "nats-server").unwrap_or_else(|| {
        panic!("nats-server not found: run `make setup` (installs nats-server 2.15.1 into tools/bin) or set JETSOURCE_NATS_SERVER")
    });
    let output = Command::new(&path)
        .arg("--version")
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", path.display()));
    let version = String::from_utf8_lossy(&output.stdout).trim().to_owned();
    let numbers: Vec<u32> = version
        .rsplit('v')
        .next()
        .unwrap_or("")
        .split('.')
        .filter_map(|n| n.parse().ok())
        .collect();
    assert!(
        numbers.as_slice() >= [2, 12].as_slice(),
        "{} is {version:?}; jetsource needs nats-server 2.12 or newer: run `make setup`",
        path.display()
    );
    path
}

impl NatsServer {
    pub fn start() -> Self {
        Self::start_with(Sync::Default)
    }

    pub fn start_with(sync: Sync) -> Self {
        Self::start_configured(sync, |_| String::new())
    }

    /// A server whose configuration file ends with `extra(dir)`: accounts
    /// and users, a `tls {}` block. `dir` is the server's own temporary
    /// directory, for the files the extra configuration names
    /// (certificates): write them there before returning.
    pub fn start_configured(sync: Sync, extra: impl FnOnce(&Path) -> String) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let extra = extra(dir.path());
        if docker::selected() {
            let port = free_port();
            let spec = docker::Spec {
                image: "nats",
                tag: "2.12-alpine",
                ready_on_stderr: Some("Server is ready"),
                ready_on_stdout: None,
                container_port: 4222,
                cmd: vec!["-c".into(), "/etc/nats/test.conf".into()],
                files: vec![(
                    "/etc/nats/test.conf".into(),
                    (nats_config(4222, Path::new("/data"), None, sync) + &extra).into_bytes(),
                )],
            };
            let container = docker::Container::start(spec, port).unwrap_or_else(|e| {
                panic!("JETSOURCE_TEST_BACKEND=docker but nats could not start in Docker: {e}")
            });
            return Self {
                backend: Backend::Docker(container),
                port,
                dir,
                sync,
                extra,
            };
        }
        let binary = nats_server_binary();
        for _attempt in 0..5 {
            let port = free_port();
            if let Some(child) = Self::spawn(&binary, dir.path(), port, sync, &extra) {
                return Self {
                    backend: Backend::Process(child),
                    port,
                    dir,
                    sync,
                    extra,
                };
            }
        }
        panic!("nats-server would not start on any free port (see its output above)");
    }

    fn spawn(binary: &Path, dir: &Path, port: u16, sync: Sync, extra: &str) -> Option<Child> {
        let config = dir.join("nats.conf");
        std::fs::write(
            &config,
            nats_config(
                port,
                &dir.join("js"),
                Some(&dir.join("nats-server.log")),
                sync,
            )
            .replace("listen: 0.0.0.0", "listen: 127.0.0.1")
                + extra,
        )
        .unwrap();
        let mut command = Command::new(binary);
        command.arg("-c").arg(&config);
        spawn_and_wait(command, port, "nats-server")
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Kills the server abruptly (SIGKILL) and starts it again on the same
    /// port and store directory: a crash and recovery.
    pub fn restart(&mut self) {
        let deadline = Instant::now() + START_TIMEOUT;
        match &mut self.backend {
            Backend::Docker(container) => {
                container.restart().unwrap();
                let addr = SocketAddr::from(([127, 0, 0, 1], self.port));
                while TcpStream::connect_timeout(&addr, Duration::from_millis(100)).is_err() {
                    assert!(Instant::now() < deadline, "nats container did not restart");
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
            Backend::Process(_) | Backend::Down => {
                self.backend.kill();
                let binary = nats_server_binary();
                loop {
                    if let Some(child) =
                        Self::spawn(&binary, self.dir.path(), self.port, self.sync, &self.extra)
                    {
                        self.backend = Backend::Process(child);
                        return;
                    }
                    assert!(Instant::now() < deadline, "nats-server did not restart");
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        }
    }

    /// The server's JetStream `store_dir` (for [`filestore::StoredStream`],
    /// while the server is down).
    pub fn store_dir(&self) -> PathBuf {
        self.dir.path().join("js")
    }

    /// Kills the server abruptly (SIGKILL) and leaves it down: clients see
    /// the connection drop and nothing answering on the port.
    /// [`NatsServer::restart`] brings it back with its store.
    pub fn kill(&mut self) {
        match &mut self.backend {
            Backend::Docker(container) => container.stop().unwrap(),
            _ => self.backend.kill(),
        }
    }

    /// A client that is connected and sees JetStream ready.
    pub async fn client(&self) -> async_nats::Client {
        let client = async_nats::connect(self.url()).await.unwrap();
        let js = async_nats::jetstream::new(client.clone());
        let deadline = Instant::now() + START_TIMEOUT;
        while js.query_account().await.is_err() {
            assert!(Instant::now() < deadline, "JetStream did not become ready");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        client
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.backend.kill();
    }
}

/// A redis-server without persistence, reachable on 127.0.0.1.
///
/// It can crash and come back: [`RedisServer::kill`] stops it abruptly,
/// [`RedisServer::start_again`] starts a fresh, empty one on the same port,
/// [`RedisServer::restart_empty`] does both. Clients keep their URL and see
/// what a Redis crash without persistence looks like: the connection drops,
/// connections are refused while it is down, and the data is gone after.
#[derive(Debug)]
pub struct RedisServer {
    backend: Backend,
    port: u16,
    dir: tempfile::TempDir,
    /// Extra command-line arguments (ACL users, TLS), kept across restarts.
    args: Vec<String>,
}

fn redis_server_binary() -> PathBuf {
    find_binary("JETSOURCE_REDIS_SERVER", "redis-server").unwrap_or_else(|| {
        panic!("redis-server not found: run `make setup` (installs it with apt) or set JETSOURCE_REDIS_SERVER")
    })
}

impl RedisServer {
    pub fn start() -> Self {
        Self::start_configured(|_, _| Vec::new())
    }

    /// A server started with the extra arguments `args(dir, port)` (e.g.
    /// `--user reader on >pw ~* +@read`; for TLS only, `--port 0
    /// --tls-port <port>` and the certificate files). `dir` is the
    /// server's own temporary directory, for the files they name; `port`
    /// the one it will be reached on.
    pub fn start_configured(args: impl Fn(&Path, u16) -> Vec<String>) -> Self {
        let dir = tempfile::tempdir().unwrap();
        if docker::selected() {
            let port = free_port();
            let args = args(dir.path(), 6379);
            let spec = docker::Spec {
                image: "redis",
                tag: "7-alpine",
                ready_on_stderr: None,
                ready_on_stdout: Some("Ready to accept connections"),
                container_port: 6379,
                cmd: ["redis-server", "--save", "", "--appendonly", "no"]
                    .map(String::from)
                    .into_iter()
                    .chain(args.iter().cloned())
                    .collect(),
                files: vec![],
            };
            let container = docker::Container::start(spec, port).unwrap_or_else(|e| {
                panic!("JETSOURCE_TEST_BACKEND=docker but redis could not start in Docker: {e}")
            });
            return Self {
                backend: Backend::Docker(container),
                port,
                dir,
                args,
            };
        }
        let binary = redis_server_binary();
        for _attempt in 0..5 {
            let port = free_port();
            let args = args(dir.path(), port);
            if let Some(child) = Self::spawn(&binary, dir.path(), port, &args) {
                return Self {
                    backend: Backend::Process(child),
                    port,
                    dir,
                    args,
                };
            }
        }
        panic!("redis-server would not start on any free port (see its output above)");
    }

    fn spawn(binary: &Path, dir: &Path, port: u16, args: &[String]) -> Option<Child> {
        let mut command = Command::new(binary);
        command
            .args(["--bind", "127.0.0.1", "--port", &port.to_string()])
            .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
            .arg("--dir")
            .arg(dir)
            .args(args);
        spawn_and_wait(command, port, "redis-server")
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Kills the server abruptly (SIGKILL), as a crash would, and leaves it
    /// down: open connections drop and new ones are refused until
    /// [`RedisServer::start_again`]. Nothing happens if it is down already.
    pub fn kill(&mut self) {
        match &mut self.backend {
            Backend::Docker(container) => container.stop().unwrap(),
            _ => self.backend.kill(),
        }
    }

    /// Starts the server again on the same port, empty (it keeps nothing on
    /// disk), and waits until it accepts connections. Kills the running one
    /// first if there is one.
    pub fn start_again(&mut self) {
        let deadline = Instant::now() + START_TIMEOUT;
        match &mut self.backend {
            Backend::Docker(container) => {
                // Stopping an already stopped container is harmless.
                container.stop().unwrap();
                container.start_again().unwrap();
                let addr = SocketAddr::from(([127, 0, 0, 1], self.port));
                while TcpStream::connect_timeout(&addr, Duration::from_millis(100)).is_err() {
                    assert!(Instant::now() < deadline, "redis container did not restart");
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
            Backend::Process(_) | Backend::Down => {
                self.backend.kill();
                let binary = redis_server_binary();
                loop {
                    if let Some(child) =
                        Self::spawn(&binary, self.dir.path(), self.port, &self.args)
                    {
                        self.backend = Backend::Process(child);
                        return;
                    }
                    assert!(
                        Instant::now() < deadline,
                        "redis-server did not start again on port {}",
                        self.port
                    );
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        }
    }

    /// A crash and restart without persistence: [`RedisServer::kill`], then
    /// [`RedisServer::start_again`] on the same port, empty.
    pub fn restart_empty(&mut self) {
        self.kill();
        self.start_again();
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.backend.kill();
    }
}

/// A TCP proxy on a free loopback port in front of a server on
/// `127.0.0.1:upstream`: point a client at [`TcpProxy::port`] instead of the
/// server's port. [`TcpProxy::freeze`] makes the connections open at that
/// moment go silent (bytes are swallowed both ways, the sockets stay open),
/// as a half-open connection or a partition would; connections opened
/// afterwards are forwarded normally. Threads and sockets end on drop.
#[derive(Debug)]
pub struct TcpProxy {
    port: u16,
    shared: std::sync::Arc<ProxyShared>,
}

#[derive(Debug, Default)]
struct ProxyShared {
    /// Connections with a lower number are frozen.
    frozen_below: std::sync::atomic::AtomicU64,
    next: std::sync::atomic::AtomicU64,
    stop: std::sync::atomic::AtomicBool,
    sockets: std::sync::Mutex<Vec<TcpStream>>,
}

impl TcpProxy {
    pub fn start(upstream: u16) -> Self {
        use std::sync::atomic::Ordering;
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let shared = std::sync::Arc::new(ProxyShared::default());
        let accepting = shared.clone();
        std::thread::spawn(move || {
            for client in listener.incoming() {
                if accepting.stop.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(client) = client else { continue };
                let Ok(server) = TcpStream::connect(("127.0.0.1", upstream)) else {
                    continue; // the client sees its connection closed
                };
                let n = accepting.next.fetch_add(1, Ordering::SeqCst);
                let mut sockets = accepting.sockets.lock().unwrap();
                for (from, to) in [(&client, &server), (&server, &client)] {
                    let (Ok(from), Ok(to)) = (from.try_clone(), to.try_clone()) else {
                        continue;
                    };
                    let shared = accepting.clone();
                    std::thread::spawn(move || pump(from, to, n, &shared));
                }
                sockets.push(client);
                sockets.push(server);
            }
        });
        Self { port, shared }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `redis://` URL of the proxy, for a Redis server behind it.
    pub fn redis_url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// Silences every connection open now; later ones are forwarded.
    pub fn freeze(&self) {
        use std::sync::atomic::Ordering;
        let next = self.shared.next.load(Ordering::SeqCst);
        self.shared.frozen_below.store(next, Ordering::SeqCst);
    }
}

fn pump(mut from: TcpStream, mut to: TcpStream, n: u64, shared: &ProxyShared) {
    use std::io::{Read, Write};
    use std::sync::atomic::Ordering;
    let mut buf = [0u8; 16 * 1024];
    loop {
        let read = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(read) => read,
        };
        if n < shared.frozen_below.load(Ordering::SeqCst) {
            continue;
        }
        if to.write_all(&buf[..read]).is_err() {
            break;
        }
    }
    if n >= shared.frozen_below.load(Ordering::SeqCst) {
        let _ = to.shutdown(std::net::Shutdown::Write);
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        use std::sync::atomic::Ordering;
        self.shared.stop.store(true, Ordering::SeqCst);
        // Wakes the accepting thread, which then sees `stop`.
        let _ = TcpStream::connect(("127.0.0.1", self.port));
        for socket in self.shared.sockets.lock().unwrap().drain(..) {
            let _ = socket.shutdown(std::net::Shutdown::Both);
        }
    }
}

/// Path of a binary of this workspace (`jetsource-command`, `jetsource`),
/// built by `cargo build` into the same target directory as the running test.
pub fn workspace_binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    // target/<profile>/deps/<test> -> target/<profile>/<name>; a binary
    // (jetsource-chaos) runs from target/<profile>/ itself.
    let dir = exe.parent().unwrap();
    let profile_dir = if dir.ends_with("deps") {
        dir.parent().unwrap()
    } else {
        dir
    };
    let path = profile_dir.join(name);
    assert!(
        path.is_file(),
        "{} not built: run `cargo build --workspace --bins` first (make test does)",
        path.display()
    );
    path
}

/// Waits until `n` copies of service `name` answer `$SRV.INFO` with an
/// endpoint registered.
pub async fn wait_for_service(client: &async_nats::Client, name: &str, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let inbox = client.new_inbox();
        let mut replies = client.subscribe(inbox.clone()).await.unwrap();
        client
            .publish_with_reply(format!("$SRV.INFO.{name}"), inbox, "".into())
            .await
            .unwrap();
        let mut seen = 0;
        while let Ok(Some(info)) =
            tokio::time::timeout(Duration::from_millis(200), replies.next()).await
        {
            let Ok(info) = serde_json::from_slice::<serde_json::Value>(&info.payload) else {
                continue;
            };
            if info["endpoints"].as_array().is_some_and(|e| !e.is_empty()) {
                seen += 1;
            }
            if seen >= n {
                return;
            }
        }
        assert!(
            Instant::now() < deadline,
            "only {seen} of {n} {name} came up"
        );
    }
}

/// Three nats-server processes forming one JetStream cluster on loopback
/// (`sync_interval: always` unless started with [`NatsCluster::start_with`]),
/// each with its own store directory. Nodes can be killed and started again;
/// all stop on drop.
#[derive(Debug)]
pub struct NatsCluster {
    nodes: Vec<ClusterNode>,
    _dir: tempfile::TempDir,
}

#[derive(Debug)]
struct ClusterNode {
    port: u16,
    /// HTTP monitoring port (`/jsz`, `/varz`): lets a test compare what each
    /// replica holds.
    http_port: u16,
    config: PathBuf,
    log: PathBuf,
    store: PathBuf,
    child: Option<Child>,
}

impl NatsCluster {
    pub fn start() -> Self {
        Self::start_configured(|_| String::new())
    }

    /// A cluster with the given durability: the benchmark measures both
    /// `sync_interval: always` and the server default on a cluster.
    pub fn start_with(sync: Sync) -> Self {
        Self::start_with_configured(sync, |_| String::new())
    }

    /// A cluster whose nodes' configuration files end with `extra(dir)`
    /// (accounts and users, as for [`NatsServer::start_configured`]); `dir`
    /// is the cluster's temporary directory. `sync_interval: always`, as
    /// the chaos run and the cluster tests expect.
    pub fn start_configured(extra: impl FnOnce(&Path) -> String) -> Self {
        Self::start_with_configured(Sync::Always, extra)
    }

    /// [`NatsCluster::start_configured`] with the given durability.
    ///
    /// A port picked as free may be taken before the node binds it (most
    /// often as the source port of another test's outgoing connection,
    /// which holds it for as long as it lives), and every node's routes name
    /// every route port: so a node that cannot start means a new cluster on
    /// new ports, in a fresh directory.
    pub fn start_with_configured(sync: Sync, extra: impl FnOnce(&Path) -> String) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let extra = extra(dir.path());
        let binary = nats_server_binary();
        let deadline = Instant::now() + START_TIMEOUT;
        let mut cluster = Self {
            nodes: Vec::new(),
            _dir: dir,
        };
        for attempt in 0.. {
            cluster.stop_all();
            let attempt_dir = cluster._dir.path().join(format!("attempt{attempt}"));
            std::fs::create_dir_all(&attempt_dir).unwrap();
            cluster.nodes = configure_nodes(&attempt_dir, sync, &extra);
            if (0..3).all(|i| cluster.try_start_node(&binary, i)) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the cluster's nodes did not start"
            );
        }
        cluster
    }

    fn stop_all(&mut self) {
        for node in &mut self.nodes {
            if let Some(child) = node.child.as_mut() {
                kill(child);
            }
        }
    }

    fn start_node_with(&mut self, binary: &Path, i: usize) {
        let deadline = Instant::now() + START_TIMEOUT;
        while !self.try_start_node(binary, i) {
            assert!(Instant::now() < deadline, "cluster node {i} did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Starts node `i` on its ports; false if it exited first (a port taken).
    fn try_start_node(&mut self, binary: &Path, i: usize) -> bool {
        let node = &mut self.nodes[i];
        let mut command = Command::new(binary);
        command.arg("-c").arg(&node.config);
        node.child = spawn_and_wait(command, node.port, "nats-server");
        node.child.is_some()
    }

    /// All nodes' URLs, comma-separated, as `nats.url` takes them.
    pub fn urls(&self) -> String {
        self.nodes
            .iter()
            .map(|n| format!("nats://127.0.0.1:{}", n.port))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Number of nodes (3).
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Always false: a cluster has nodes (clippy wants it beside `len`).
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// `server_name` of node `i`, as stream info names its leader.
    pub fn node_name(&self, i: usize) -> String {
        format!("n{i}")
    }

    /// Node `i`'s HTTP monitoring base URL, e.g. `http://127.0.0.1:8222`.
    pub fn monitor_url(&self, i: usize) -> String {
        format!("http://127.0.0.1:{}", self.nodes[i].http_port)
    }

    /// Node `i`'s HTTP monitoring port.
    pub fn monitor_port(&self, i: usize) -> u16 {
        self.nodes[i].http_port
    }

    /// Node `i`'s log file (inside the cluster's temp directory, gone on
    /// drop: copy it to keep it).
    pub fn log_path(&self, i: usize) -> &Path {
        &self.nodes[i].log
    }

    /// Node `i`'s JetStream `store_dir`.
    pub fn store_dir(&self, i: usize) -> PathBuf {
        self.nodes[i].store.clone()
    }

    /// Whether node `i` is running (not killed).
    pub fn is_up(&self, i: usize) -> bool {
        self.nodes[i].child.is_some()
    }

    /// Kills node `i` abruptly (SIGKILL).
    pub fn kill_node(&mut self, i: usize) {
        if let Some(mut child) = self.nodes[i].child.take() {
            kill(&mut child);
        }
    }

    /// Starts node `i` again with its store directory, once the running
    /// nodes have dropped their routes to its previous process: a node
    /// started while a peer still holds the old route can be refused as a
    /// duplicate and stay without a meta leader for a long time.
    pub fn start_node(&mut self, i: usize) {
        let name = self.node_name(i);
        let deadline = Instant::now() + START_TIMEOUT;
        while (0..self.nodes.len())
            .filter(|&j| j != i && self.is_up(j))
            .any(|j| routes_to(self.nodes[j].http_port, &name))
        {
            assert!(
                Instant::now() < deadline,
                "the running nodes kept their routes to {name}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        self.start_node_with(&nats_server_binary(), i);
    }

    /// A client once the cluster's JetStream answers (a meta leader is
    /// elected).
    pub async fn client(&self) -> async_nats::Client {
        let urls = self.urls();
        let servers: Vec<&str> = urls.split(',').collect();
        let client = async_nats::connect(servers).await.unwrap();
        let js = async_nats::jetstream::new(client.clone());
        let deadline = Instant::now() + START_TIMEOUT * 3;
        while js.query_account().await.is_err() {
            assert!(
                Instant::now() < deadline,
                "the cluster's JetStream did not become ready"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        client
    }
}

/// Three nodes' configuration files in `dir`, on freshly picked ports.
fn configure_nodes(dir: &Path, sync: Sync, extra: &str) -> Vec<ClusterNode> {
    let sync_line = match sync {
        Sync::Default => "",
        Sync::Always => "sync_interval: always",
    };
    let ports: Vec<(u16, u16, u16)> = (0..3)
        .map(|_| (free_port(), free_port(), free_port()))
        .collect();
    let routes = ports
        .iter()
        .map(|(_, route, _)| format!("nats-route://127.0.0.1:{route}"))
        .collect::<Vec<_>>()
        .join(", ");
    let mut nodes = Vec::new();
    for (i, (port, route, http_port)) in ports.iter().enumerate() {
        let store = dir.join(format!("n{i}"));
        let config = dir.join(format!("n{i}.conf"));
        let log = dir.join(format!("n{i}.log"));
        std::fs::write(
            &config,
            format!(
                "listen: 127.0.0.1:{port}\nhttp: 127.0.0.1:{http_port}\nserver_name: n{i}\nlogfile: {log:?}\n\
                 cluster {{\n  name: test\n  listen: 127.0.0.1:{route}\n  routes: [{routes}]\n}}\n\
                 jetstream {{\n  store_dir: {store:?}\n  {sync_line}\n}}\n{extra}"
            ),
        )
        .unwrap();
        nodes.push(ClusterNode {
            port: *port,
            http_port: *http_port,
            config,
            log,
            store,
            child: None,
        });
    }
    nodes
}

/// Whether the node with monitoring port `http_port` has a route to the
/// server named `name` (its `/routez`). An unreachable monitor counts as
/// "no": that node is not holding anything.
fn routes_to(http_port: u16, name: &str) -> bool {
    use std::io::{Read, Write};
    let addr = SocketAddr::from(([127, 0, 0, 1], http_port));
    let Ok(mut socket) = TcpStream::connect_timeout(&addr, Duration::from_secs(1)) else {
        return false;
    };
    let _ = socket.set_read_timeout(Some(Duration::from_secs(2)));
    let request = "GET /routez HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n";
    let mut response = String::new();
    if socket.write_all(request.as_bytes()).is_err()
        || socket.read_to_string(&mut response).is_err()
    {
        return false;
    }
    let body = response.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    serde_json::from_str::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v["routes"].as_array().cloned())
        .is_some_and(|routes| routes.iter().any(|r| r["remote_name"] == name))
}

impl Drop for NatsCluster {
    fn drop(&mut self) {
        self.stop_all();
    }
}
