//! Crypto-shredding end to end, with every worker under its own NATS role:
//! a user's name is stored encrypted, readable everywhere (history, state,
//! read model, snapshot) until `jetsource forget`, and erased everywhere
//! after it, while everything else (another user, balances, the history's
//! integrity) stays as it was. On one node and on a 3-node R3 cluster.

#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use async_nats::jetstream;
use jetsource_core::protocol::ErrorCode;
use jetsource_test_support::requests::{query, send};
use jetsource_test_support::{free_port, NatsCluster, NatsServer, RedisServer, Sync};
use jetsource_tests::http::{bearer, http, sha256_hex, wait_until_ready};
use jetsource_tests::{cli_at, wait_for_service, Process, RoleCredentials};
use serde_json::{json, Value};

const NAME: &str = "Alice Pleasance Liddell";

struct Fleet {
    url: String,
    credentials: RoleCredentials,
    redis: String,
    replicas: String,
}

impl Fleet {
    fn worker(&self, binary: &str, role: &str) -> Process {
        self.worker_with(binary, role, &[])
    }

    fn worker_with(&self, binary: &str, role: &str, extra: &[(&str, &str)]) -> Process {
        let mut env = self.credentials.env(role).to_vec();
        env.extend_from_slice(extra);
        env.extend([
            ("JETSOURCE__STORE__REPLICAS", self.replicas.as_str()),
            ("JETSOURCE__SNAPSHOT__EVERY", "2"),
            ("JETSOURCE__REDIS__URL", self.redis.as_str()),
        ]);
        Process::start_at(binary, &self.url, &env, None)
    }

    /// The CLI as admin: (exit code, stdout parsed as JSON).
    fn admin(&self, args: &[&str]) -> (i32, Value) {
        let mut env = self.credentials.env("admin").to_vec();
        env.extend([
            ("JETSOURCE__REDIS__URL", self.redis.as_str()),
            ("JETSOURCE__STORE__REPLICAS", self.replicas.as_str()),
        ]);
        let mut all = vec!["--json"];
        all.extend_from_slice(args);
        let (code, out, err) = cli_at(&self.url, &env, &all);
        let doc =
            serde_json::from_str(&out).unwrap_or_else(|e| panic!("{args:?}: {e}: {out}{err}"));
        (code, doc)
    }
}

/// Sends as the client role until a definite answer.
async fn command(client: &async_nats::Client, t: &str, id: &str, body: Value) -> Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match send(client, t, id, body.clone()).await {
            Ok(outcome) => return serde_json::to_value(outcome).unwrap(),
            Err(e) if e.code == ErrorCode::Unavailable && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("{t} {id} {body}: {e:?}"),
        }
    }
}

/// The read model of `query.<name>` once it reflects `sequence`.
async fn read_model(client: &async_nats::Client, name: &str, sequence: u64) -> Value {
    query(
        client,
        name,
        json!({"min_sequence": sequence, "timeout_ms": 30000}),
    )
    .await
    .unwrap()["data"]
        .clone()
}

const API_KEY: &str = "privacy-read-key-0123456789";

/// `user.u1`'s events through the gateway's HTTP API.
fn gateway_history(addr: &str) -> Value {
    let auth = bearer(API_KEY);
    let response = http(
        addr,
        "GET",
        "/v1/aggregates/user/u1/events",
        &[("Authorization", auth.as_str())],
        "",
    );
    assert_eq!(response.status, 200, "{}", response.body);
    let body = response.json();
    body.get("events").cloned().unwrap_or(body)
}

/// The snapshot of `user.u1` as the bucket holds it, once it exists.
async fn snapshot_text(admin: &async_nats::Client) -> Option<String> {
    let js = jetstream::new(admin.clone());
    let kv = js.get_key_value("SNAPSHOTS").await.ok()?;
    let value = kv.get("user.u1").await.ok()??;
    Some(String::from_utf8_lossy(&value).into_owned())
}

async fn scenario(fleet: &Fleet) {
    let _commands = [
        fleet.worker("jetsource-command", "command"),
        fleet.worker("jetsource-command", "command"),
    ];
    let _projector = fleet.worker("jetsource-projector", "projector");
    let _snapshotter = fleet.worker("jetsource-snapshotter", "snapshotter");
    let gateway = format!("127.0.0.1:{}", free_port());
    let probes = format!("127.0.0.1:{}", free_port());
    let keys = format!("read={}", sha256_hex(API_KEY));
    let _gateway = fleet.worker_with(
        "jetsource-gateway",
        "gateway",
        &[
            ("JETSOURCE__GATEWAY__LISTEN", gateway.as_str()),
            ("JETSOURCE__GATEWAY__API_KEYS", keys.as_str()),
            ("JETSOURCE__HTTP__LISTEN", probes.as_str()),
        ],
    );
    let admin = fleet.credentials.connect(&fleet.url, "admin").await;
    wait_for_service(&admin, "jetsource-command", 2).await;
    wait_for_service(&admin, "jetsource-projector", 1).await;
    wait_for_service(&admin, "jetsource-snapshotter", 1).await;
    let client = fleet.credentials.connect(&fleet.url, "client").await;

    command(
        &client,
        "user",
        "u1",
        json!({"type": "CreateUser", "data": {"name": "Alice"}}),
    )
    .await;
    let renamed = command(
        &client,
        "user",
        "u1",
        json!({"type": "RenameUser", "data": {"name": NAME}}),
    )
    .await;
    assert_eq!(
        renamed["events"][0]["data"]["name"], NAME,
        "the reply shows what was decided"
    );
    command(
        &client,
        "user",
        "u2",
        json!({"type": "CreateUser", "data": {"name": "Bob"}}),
    )
    .await;
    command(
        &client,
        "account",
        "a1",
        json!({"type": "OpenAccount", "data": {"owner": "o", "initial_deposit": 70}}),
    )
    .await;
    let last = command(
        &client,
        "account",
        "a1",
        json!({"type": "Deposit", "data": {"amount": 5}}),
    )
    .await;
    let last = last["sequence"].as_u64().unwrap();

    // Encrypted at rest, readable everywhere.
    let js = jetstream::new(admin.clone());
    let stream = js.get_stream("EVENTS").await.unwrap();
    let stored = stream
        .get_last_raw_message_by_subject("events.user.u1")
        .await
        .unwrap();
    let at_rest = String::from_utf8_lossy(&stored.payload).into_owned();
    assert!(!at_rest.contains("Alice"), "plaintext at rest: {at_rest}");
    assert!(at_rest.contains("jetsource-sealed:v1:"), "{at_rest}");
    assert_eq!(
        stored
            .headers
            .get("Jetsource-Data-Subject")
            .unwrap()
            .as_str(),
        "user-u1"
    );
    assert_eq!(
        read_model(&client, "query.user.u1", last).await["name"],
        NAME
    );
    let (code, history) = fleet.admin(&["history", "user", "u1"]);
    assert_eq!(code, 0, "{history}");
    assert_eq!(history[1]["data"]["name"], NAME);
    let (code, state) = fleet.admin(&["state", "user", "u1"]);
    assert_eq!(code, 0, "{state}");
    assert_eq!(state["state"]["name"], NAME, "{state}");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !snapshot_text(&admin)
        .await
        .is_some_and(|s| s.contains(NAME))
    {
        assert!(Instant::now() < deadline, "no snapshot of user.u1");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let balance_before = read_model(&client, "query.account.a1", last).await["balance"].clone();
    wait_until_ready(&gateway);
    let over_http = gateway_history(&gateway);
    assert_eq!(over_http[1]["data"]["name"], NAME, "{over_http}");

    // Forget.
    let (code, forgot) = fleet.admin(&["forget", "user-u1"]);
    assert_eq!(code, 0, "{forgot}");
    assert_eq!(forgot["aggregates"], json!(["user.u1"]), "{forgot}");
    assert_eq!(forgot["projections_rebuilt"], json!(["users"]), "{forgot}");

    // Erased everywhere, never ciphertext, never an error.
    let (code, history) = fleet.admin(&["history", "user", "u1"]);
    assert_eq!(code, 0, "{history}");
    for event in history.as_array().unwrap() {
        assert_eq!(event["data"]["name"], Value::Null, "{event}");
        assert_eq!(event["erased"], json!(["/name"]), "{event}");
    }
    let (code, state) = fleet.admin(&["state", "user", "u1"]);
    assert_eq!(code, 0, "{state}");
    assert_eq!(state["state"]["name"], "[erased]", "{state}");
    let over_http = gateway_history(&gateway);
    for event in over_http.as_array().unwrap() {
        assert_eq!(event["data"]["name"], Value::Null, "gateway: {event}");
    }
    assert_eq!(
        state["state"]["status"], "active",
        "other fields stay: {state}"
    );
    let user = read_model(&client, "query.user.u1", last).await;
    assert_eq!(user["name"], "[erased]", "{user}");
    assert!(
        !snapshot_text(&admin)
            .await
            .is_some_and(|s| s.contains("Alice")),
        "a snapshot still holds the name"
    );
    // Forgotten for good: no new personal data for u1; its other commands
    // go on.
    let renamed = send(
        &client,
        "user",
        "u1",
        json!({"type": "RenameUser", "data": {"name": "Alice again"}}),
    )
    .await;
    let refused = renamed.unwrap_err();
    assert_eq!(refused.code, ErrorCode::Rejected, "{}", refused.message);
    assert!(refused.message.contains("forgotten"), "{}", refused.message);
    let deleted = command(
        &client,
        "user",
        "u1",
        json!({"type": "DeleteUser", "data": {}}),
    )
    .await;
    let deleted = deleted["sequence"].as_u64().unwrap();

    // Everyone else as before, and the history still verifies.
    assert_eq!(
        read_model(&client, "query.user.u2", deleted).await["name"],
        "Bob"
    );
    assert_eq!(
        read_model(&client, "query.account.a1", deleted).await["balance"],
        balance_before
    );
    let (code, report) = fleet.admin(&["verify", "--all"]);
    assert_eq!(code, 0, "{report}");
    let (code, record) = fleet.admin(&["history", "jetsource-forgotten", "user-u1"]);
    assert_eq!(code, 0, "{record}");
    assert_eq!(record[0]["event_type"], "DataSubjectForgotten");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_forgotten_users_name_is_erased_everywhere_and_nothing_else_changes() {
    let credentials = RoleCredentials::generate();
    let mut log = std::path::PathBuf::new();
    let server = NatsServer::start_configured(Sync::Default, |dir| {
        log = dir.join("nats-server.log");
        credentials.server_config()
    });
    let redis = RedisServer::start();
    let fleet = Fleet {
        url: server.url(),
        credentials,
        redis: redis.url(),
        replicas: "1".into(),
    };
    scenario(&fleet).await;
    let violations: Vec<String> = std::fs::read_to_string(&log)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains("Permissions Violation"))
        .map(str::to_owned)
        .collect();
    assert_eq!(
        violations,
        Vec::<String>::new(),
        "a role needed more rights"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn forgetting_works_the_same_on_a_replicated_cluster() {
    let credentials = RoleCredentials::generate();
    let cluster = NatsCluster::start_configured(|_| credentials.server_config());
    let redis = RedisServer::start();
    let fleet = Fleet {
        url: cluster.urls(),
        credentials,
        redis: redis.url(),
        replicas: "3".into(),
    };
    scenario(&fleet).await;
}
