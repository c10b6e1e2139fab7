//! Helpers for fleet tests: worker binaries as child processes.

#![allow(clippy::unwrap_used)]

use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use jetsource_core::protocol::{decode_reply, CommandOutcome};
use jetsource_test_support::requests::query;
pub use jetsource_test_support::wait_for_service;
use jetsource_test_support::{workspace_binary, NatsServer};
use serde_json::{json, Value};

/// A worker binary running as its own process, killed on drop if still up.
#[derive(Debug)]
pub struct Process {
    child: Child,
    name: String,
}

impl Process {
    /// Starts `binary` pointed at `server`, with extra `JETSOURCE__...`
    /// environment.
    pub fn start(binary: &str, server: &NatsServer, env: &[(&str, &str)]) -> Self {
        Self::start_with_log(binary, server, env, None)
    }

    /// Like [`Process::start`], with the process's log (stderr) written to
    /// `log` instead of the test's output.
    pub fn start_with_log(
        binary: &str,
        server: &NatsServer,
        env: &[(&str, &str)],
        log: Option<&std::path::Path>,
    ) -> Self {
        Self::start_at(binary, &server.url(), env, log)
    }

    /// Like [`Process::start_with_log`], against the server(s) at `nats_url`
    /// (comma-separated for a cluster).
    pub fn start_at(
        binary: &str,
        nats_url: &str,
        env: &[(&str, &str)],
        log: Option<&std::path::Path>,
    ) -> Self {
        let stderr = match log {
            Some(path) => Stdio::from(std::fs::File::create(path).unwrap()),
            None => Stdio::inherit(),
        };
        let mut command = Command::new(workspace_binary(binary));
        command
            .env("JETSOURCE__NATS__URL", nats_url)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr);
        for (k, v) in env {
            command.env(k, v);
        }
        Self {
            child: command.spawn().unwrap(),
            name: binary.to_owned(),
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends `signal` (e.g. "TERM") to this process only, by its PID.
    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.pid().to_string())
            .status()
            .unwrap();
        assert!(status.success(), "kill -{signal} {} failed", self.pid());
    }

    /// The exit status if the process has exited, without waiting.
    pub fn try_status(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().unwrap()
    }

    /// Waits for the process to exit, up to `timeout`.
    pub fn wait(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "{} did not exit within {timeout:?}",
                self.name
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs the `jetsource` CLI; returns (exit code, stdout, stderr).
pub fn cli(server: &NatsServer, args: &[&str]) -> (i32, String, String) {
    cli_env(server, &[], args)
}

/// Runs the `jetsource` CLI with extra environment.
pub fn cli_env(server: &NatsServer, env: &[(&str, &str)], args: &[&str]) -> (i32, String, String) {
    cli_at(&server.url(), env, args)
}

/// Runs the `jetsource` CLI against the server(s) at `nats_url`
/// (comma-separated for a cluster), with extra environment.
pub fn cli_at(nats_url: &str, env: &[(&str, &str)], args: &[&str]) -> (i32, String, String) {
    cli_bin_at("jetsource", nats_url, env, args)
}

/// Like [`cli_at`], with another application's CLI binary (`shop`).
pub fn cli_bin_at(
    binary: &str,
    nats_url: &str,
    env: &[(&str, &str)],
    args: &[&str],
) -> (i32, String, String) {
    let mut command = Command::new(workspace_binary(binary));
    command.args(["--url", nats_url]).args(args);
    for (k, v) in env {
        command.env(k, v);
    }
    let output = command.output().unwrap();
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// The shipped NATS users with fresh passwords (nats/accounts.conf,
/// docs/SECURITY.md).
pub use jetsource_test_support::accounts::{RoleCredentials, ROLES};

/// The workspace's root directory.
pub fn workspace_root() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(std::path::Path::to_path_buf)
        .unwrap_or_default()
}

/// `cargo metadata --no-deps` of the workspace, as JSON.
pub fn cargo_metadata() -> serde_json::Value {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        .args([
            "metadata",
            "--format-version",
            "1",
            "--no-deps",
            "--offline",
        ])
        .current_dir(workspace_root())
        .output()
        .expect("cargo metadata runs");
    assert!(
        out.status.success(),
        "cargo metadata failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("cargo metadata prints JSON")
}

/// A command worker and a projector against plain NATS and the Redis at
/// `redis_env` (`JETSOURCE__REDIS__...`): the projector writes and answers
/// queries through the users and TLS settings given there. Opens an account, deposits, and returns the query's reply
/// and the fleet (still running).
pub async fn project_and_query(redis_env: &[(&str, &str)]) -> (Value, Fleet) {
    let nats = NatsServer::start();
    let client = nats.client().await;
    let command = Process::start("jetsource-command", &nats, &[]);
    let projector = Process::start("jetsource-projector", &nats, redis_env);
    wait_for_service(&client, "jetsource-command", 1).await;
    wait_for_service(&client, "jetsource-projector", 1).await;
    let mut last = None;
    for body in [
        json!({"type": "OpenAccount", "data": {"owner": "ada"}}),
        json!({"type": "Deposit", "data": {"amount": 25}}),
        json!({"type": "Deposit", "data": {"amount": 17}}),
    ] {
        let reply = client
            .request("cmd.account.r1", body.to_string().into())
            .await
            .unwrap();
        last = Some(
            decode_reply::<CommandOutcome>(&reply.payload)
                .unwrap()
                .unwrap(),
        );
    }
    let last = last.unwrap();
    let reply = query(
        &client,
        "query.account.r1",
        json!({"min_sequence": last.sequence, "timeout_ms": 10_000}),
    )
    .await
    .unwrap();
    assert!(reply["sequence"].as_u64().unwrap() >= last.sequence);
    (reply, (nats, command, projector))
}

/// NATS, a command worker and a projector.
pub type Fleet = (NatsServer, Process, Process);

/// The event store at `url` with the default settings, as a writer that is
/// not a command worker (a test's "other writer").
pub async fn open_store(
    client: &async_nats::Client,
    url: &str,
) -> jetsource_core::store::EventStore {
    let config = jetsource_core::config::Config::default();
    let mut nats = config.nats.clone();
    nats.url = url.to_owned();
    jetsource_core::store::EventStore::open(client.clone(), &nats, &config.store)
        .await
        .unwrap()
}

/// Appends one event of `event_type` with `data` to an `account` behind the
/// command workers' backs, guarded by `expected_last_sequence` at `version`.
pub async fn append_behind(
    store: &jetsource_core::store::EventStore,
    id: &str,
    (expected_last_sequence, version): (u64, u64),
    event_type: &str,
    data: &[u8],
) -> jetsource_core::store::Appended {
    let event = jetsource_core::aggregate::NewEvent {
        event_type: event_type.into(),
        data: data.to_vec(),
        sealed: None,
    };
    store
        .append(&jetsource_core::store::Append {
            aggregate_type: "account",
            aggregate_id: id,
            expected_last_sequence,
            version,
            events: std::slice::from_ref(&event),
            schema_version: 1,
            command_id: None,
            correlation_id: "test",
            causation_id: "test",
            command_aggregate: None,
            previous_hash: store.hash_at(expected_last_sequence).await.unwrap(),
        })
        .await
        .unwrap()
}

/// Plain HTTP/1.0 against the gateway (tests/gateway.rs, tracing,
/// privacy): no client library between the test and the bytes.
pub mod http {
    use std::io::{Read, Write};
    use std::net::TcpStream;
    use std::time::{Duration, Instant};

    use serde_json::Value;
    use sha2::{Digest, Sha256};

    pub fn sha256_hex(key: &str) -> String {
        Sha256::digest(key.as_bytes())
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }

    /// A response: status, headers (lower-case names), body.
    #[derive(Debug)]
    pub struct Response {
        pub status: u16,
        pub headers: Vec<(String, String)>,
        pub body: String,
    }

    impl Response {
        pub fn json(&self) -> Value {
            serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("{e}: {}", self.body))
        }

        pub fn header(&self, name: &str) -> Option<&str> {
            self.headers
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, v)| v.as_str())
        }

        /// The error code of an error body.
        pub fn code(&self) -> String {
            self.json()["error"]["code"]
                .as_str()
                .unwrap_or_default()
                .to_owned()
        }
    }

    /// One HTTP/1.0 request (the server closes the connection after it).
    pub fn http(
        addr: &str,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &str,
    ) -> Response {
        let mut socket = TcpStream::connect(addr).unwrap();
        socket
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        let mut request = format!("{method} {path} HTTP/1.0\r\nHost: {addr}\r\n");
        for (name, value) in headers {
            request += &format!("{name}: {value}\r\n");
        }
        if !body.is_empty() {
            request += &format!(
                "Content-Type: application/json\r\nContent-Length: {}\r\n",
                body.len()
            );
        }
        request += "\r\n";
        socket.write_all(request.as_bytes()).unwrap();
        socket.write_all(body.as_bytes()).unwrap();
        let mut raw = String::new();
        socket.read_to_string(&mut raw).unwrap();
        let (head, body) = raw.split_once("\r\n\r\n").unwrap();
        let mut lines = head.lines();
        let status = lines
            .next()
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|s| s.parse().ok())
            .unwrap();
        let headers = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(n, v)| (n.trim().to_lowercase(), v.trim().to_owned()))
            .collect();
        Response {
            status,
            headers,
            body: body.to_owned(),
        }
    }

    /// Waits until the gateway at `addr` answers `/readyz` with 200.
    pub fn wait_until_ready(addr: &str) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect(addr).is_err()
            || http(addr, "GET", "/readyz", &[], "").status != 200
        {
            assert!(
                Instant::now() < deadline,
                "the gateway at {addr} did not get ready"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn bearer(key: &str) -> String {
        format!("Bearer {key}")
    }
}
