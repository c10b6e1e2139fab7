//! The HTTP API gateway (docs/GATEWAY.md) over real HTTP, as its own
//! process, in front of the real command worker and projector: API keys and
//! roles, commands with an Idempotency-Key, queries with read-your-writes,
//! paged histories, state at a point, live events as Server-Sent Events,
//! the error mapping, the OpenAPI document, and stopping with a live stream
//! open and NATS gone.

#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use jetsource_test_support::{free_port, NatsServer, RedisServer};
use jetsource_tests::http::{bearer, http, sha256_hex, wait_until_ready, Response};
use jetsource_tests::{wait_for_service, Process};
use serde_json::{json, Value};

const READ_KEY: &str = "read-key-0123456789";
const WRITE_KEY: &str = "write-key-0123456789";

/// The gateway under test, with the workers it talks to.
struct Fleet {
    nats: NatsServer,
    _redis: RedisServer,
    command: Option<Process>,
    _projector: Process,
    gateway: Process,
    addr: String,
    /// Probes and /metrics (`http.listen`).
    probes: String,
}

impl Fleet {
    async fn start() -> Self {
        let nats = NatsServer::start();
        let redis = RedisServer::start();
        let client = nats.client().await;
        let redis_url = redis.url();
        let command = Process::start("jetsource-command", &nats, &[]);
        let projector = Process::start(
            "jetsource-projector",
            &nats,
            &[("JETSOURCE__REDIS__URL", redis_url.as_str())],
        );
        let addr = format!("127.0.0.1:{}", free_port());
        let probes = format!("127.0.0.1:{}", free_port());
        let keys = format!(
            "read={}, write={}",
            sha256_hex(READ_KEY),
            sha256_hex(WRITE_KEY)
        );
        let gateway = Process::start(
            "jetsource-gateway",
            &nats,
            &[
                ("JETSOURCE__GATEWAY__LISTEN", addr.as_str()),
                ("JETSOURCE__GATEWAY__API_KEYS", keys.as_str()),
                ("JETSOURCE__GATEWAY__MAX_BODY_BYTES", "2048"),
                (
                    "JETSOURCE__GATEWAY__CORS_ORIGINS",
                    "https://console.example",
                ),
                ("JETSOURCE__HTTP__LISTEN", probes.as_str()),
            ],
        );
        wait_for_service(&client, "jetsource-command", 1).await;
        wait_for_service(&client, "jetsource-projector", 1).await;
        wait_until_ready(&addr);
        Self {
            nats,
            _redis: redis,
            command: Some(command),
            _projector: projector,
            gateway,
            addr,
            probes,
        }
    }

    fn send(&self, id: &str, body: Value, extra: &[(&str, &str)]) -> Response {
        let auth = bearer(WRITE_KEY);
        let mut headers = vec![("Authorization", auth.as_str())];
        headers.extend_from_slice(extra);
        http(
            &self.addr,
            "POST",
            &format!("/v1/commands/account/{id}"),
            &headers,
            &body.to_string(),
        )
    }

    fn get(&self, path: &str, extra: &[(&str, &str)]) -> Response {
        let auth = bearer(READ_KEY);
        let mut headers = vec![("Authorization", auth.as_str())];
        headers.extend_from_slice(extra);
        http(&self.addr, "GET", path, &headers, "")
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_serves_the_api_over_http() {
    let mut fleet = Fleet::start().await;
    let addr = fleet.addr.clone();

    // Keys and roles.
    let open = json!({"type": "OpenAccount", "data": {"owner": "ada"}});
    let anonymous = http(
        &addr,
        "POST",
        "/v1/commands/account/g-1",
        &[],
        &open.to_string(),
    );
    assert_eq!(anonymous.status, 401, "{anonymous:?}");
    assert_eq!(anonymous.code(), "unauthorized");
    let wrong = http(
        &addr,
        "GET",
        "/v1/queries/account/g-1",
        &[("Authorization", "Bearer nope")],
        "",
    );
    assert_eq!(wrong.status, 401);
    let read_only = bearer(READ_KEY);
    let refused = http(
        &addr,
        "POST",
        "/v1/commands/account/g-1",
        &[("Authorization", read_only.as_str())],
        &open.to_string(),
    );
    assert_eq!(refused.status, 403, "{refused:?}");
    assert_eq!(refused.code(), "forbidden");

    // Commands, idempotent by key.
    let opened = fleet.send("g-1", open, &[]);
    assert_eq!(opened.status, 200, "{opened:?}");
    assert_eq!(opened.json()["version"], 1);
    let deposit = json!({"type": "Deposit", "data": {"amount": 40}});
    let first = fleet.send("g-1", deposit.clone(), &[("Idempotency-Key", "dep-1")]);
    let again = fleet.send("g-1", deposit.clone(), &[("Idempotency-Key", "dep-1")]);
    assert_eq!(first.status, 200, "{first:?}");
    assert_eq!(again.json()["duplicate"], true, "{again:?}");
    assert_eq!(again.json()["sequence"], first.json()["sequence"]);
    let sequence = first.json()["sequence"].as_u64().unwrap();

    // The error mapping, with the protocol's error body.
    let cases = [
        (
            json!({"type": "Withdraw", "data": {"amount": 1000}}),
            422,
            "rejected",
        ),
        (
            json!({"type": "Deposit", "data": {"amount": 0}}),
            400,
            "invalid",
        ),
        (json!({"type": "NoSuchCommand", "data": {}}), 400, "invalid"),
        (
            json!({"type": "OpenAccount", "data": {"owner": "x"}, "expected_version": 0}),
            409,
            "conflict",
        ),
    ];
    for (body, status, code) in cases {
        let r = fleet.send("g-1", body.clone(), &[]);
        assert_eq!(
            (r.status, r.code().as_str()),
            (status, code),
            "{body}: {r:?}"
        );
    }
    let write = bearer(WRITE_KEY);
    let auth = [("Authorization", write.as_str())];
    let not_json = http(&addr, "POST", "/v1/commands/account/g-1", &auth, "{nope");
    assert_eq!(
        (not_json.status, not_json.code().as_str()),
        (400, "invalid")
    );
    let unknown_type = http(
        &addr,
        "POST",
        "/v1/commands/planet/p-1",
        &auth,
        &json!({"type": "X"}).to_string(),
    );
    assert_eq!(unknown_type.status, 400, "{unknown_type:?}");
    let big = json!({"type": "Deposit", "data": {"amount": 1, "note": "x".repeat(4000)}});
    let too_large = http(
        &addr,
        "POST",
        "/v1/commands/account/g-1",
        &auth,
        &big.to_string(),
    );
    assert_eq!(too_large.status, 413, "{too_large:?}");
    let nowhere = fleet.get("/v1/nothing/here", &[]);
    assert_eq!(
        (nowhere.status, nowhere.code().as_str()),
        (404, "not_found")
    );

    // Queries: read-your-writes by parameter or header, typed parameters.
    let path = format!("/v1/queries/account/g-1?min_sequence={sequence}&timeout_ms=10000");
    let account = fleet.get(&path, &[]);
    assert_eq!(account.status, 200, "{account:?}");
    assert_eq!(account.json()["data"]["balance"], 40);
    let seq = sequence.to_string();
    let by_header = fleet.get(
        "/v1/queries/account/g-1",
        &[("X-Min-Sequence", seq.as_str())],
    );
    assert!(by_header.json()["sequence"].as_u64().unwrap() >= sequence);
    let top = fleet.get("/v1/queries/accounts.top?limit=1", &[]);
    assert_eq!(top.status, 200, "{top:?}");
    let bad_param = fleet.get("/v1/queries/accounts.top?limit=many", &[]);
    assert_eq!(
        (bad_param.status, bad_param.code().as_str()),
        (400, "invalid")
    );
    let unknown_query = fleet.get("/v1/queries/no.such.query", &[]);
    assert_eq!(unknown_query.status, 400, "{unknown_query:?}");
    let missing = fleet.get("/v1/queries/account/nobody", &[]);
    assert_eq!(
        (missing.status, missing.code().as_str()),
        (404, "not_found")
    );
    let later = format!(
        "/v1/queries/account/g-1?min_sequence={}&timeout_ms=200",
        sequence + 1000
    );
    let waited = fleet.get(&later, &[]);
    assert_eq!(
        (waited.status, waited.code().as_str()),
        (504, "timeout"),
        "{waited:?}"
    );
    let listed = fleet.get("/v1/queries", &[]);
    assert!(listed.body.contains("accounts.top"), "{listed:?}");

    // History, a page at a time, and the state at any point.
    let mut events = Vec::new();
    let mut after = 0;
    loop {
        let page = fleet.get(
            &format!("/v1/aggregates/account/g-1/events?limit=1&after={after}"),
            &[],
        );
        assert_eq!(page.status, 200, "{page:?}");
        let page = page.json();
        events.extend(page["events"].as_array().unwrap().clone());
        match page["next_after"].as_u64() {
            Some(next) => after = next,
            None => break,
        }
    }
    let types: Vec<&str> = events
        .iter()
        .map(|e| e["event_type"].as_str().unwrap())
        .collect();
    assert_eq!(types, ["AccountOpened", "Deposited"], "{events:?}");
    let none = fleet.get("/v1/aggregates/account/nobody/events", &[]);
    assert_eq!(none.status, 404);
    let first_sequence = events[0]["sequence"].as_u64().unwrap();
    let then = fleet.get(
        &format!("/v1/aggregates/account/g-1/state?at_sequence={first_sequence}"),
        &[],
    );
    assert_eq!(then.status, 200, "{then:?}");
    assert_eq!(then.json()["state"]["balance"], 0);
    assert_eq!(then.json()["version"], 1);
    let now = fleet.get("/v1/aggregates/account/g-1/state", &[]);
    assert_eq!(now.json()["state"]["balance"], 40);
    let bad_time = fleet.get("/v1/aggregates/account/g-1/state?at_time=yesterday", &[]);
    assert_eq!(bad_time.status, 400);
    // At a time: the first event's timestamp shows the state after it.
    let first_time = events[0]["timestamp"].as_str().unwrap();
    let at_time = fleet.get(
        &format!("/v1/aggregates/account/g-1/state?at_time={first_time}"),
        &[],
    );
    assert_eq!(at_time.status, 200, "{at_time:?}");
    assert_eq!(at_time.json()["version"], 1);
    let before = fleet.get(
        "/v1/aggregates/account/g-1/state?at_time=2000-01-01T00:00:00Z",
        &[],
    );
    assert_eq!(before.status, 404);

    // CORS: the configured origin may call, another may not.
    let preflight = |origin: &str| {
        http(
            &addr,
            "OPTIONS",
            "/v1/queries/account/g-1",
            &[
                ("Origin", origin),
                ("Access-Control-Request-Method", "GET"),
                ("Access-Control-Request-Headers", "authorization"),
            ],
            "",
        )
    };
    let allowed = preflight("https://console.example");
    assert_eq!(
        allowed.header("access-control-allow-origin"),
        Some("https://console.example"),
        "{allowed:?}"
    );
    let other = preflight("https://evil.example");
    assert_eq!(
        other.header("access-control-allow-origin"),
        None,
        "{other:?}"
    );

    // Live events: one arrives as it is stored, with its sequence as id.
    let live = live_stream(
        &addr,
        "/v1/events/live?aggregate_type=account&aggregate_id=g-1",
    );
    let stored = fleet.send(
        "g-1",
        json!({"type": "Deposit", "data": {"amount": 2}}),
        &[],
    );
    let stored_sequence = stored.json()["sequence"].as_u64().unwrap();
    let (id, event, data) = next_sse_event(live);
    assert_eq!(id, stored_sequence.to_string());
    assert_eq!(event, "Deposited");
    let data: Value = serde_json::from_str(&data).unwrap();
    assert_eq!(data["data"]["amount"], 2, "{data}");

    // The OpenAPI document needs no key.
    let openapi = http(&addr, "GET", "/openapi.json", &[], "");
    assert_eq!(openapi.status, 200);
    let paths = &openapi.json()["paths"];
    for path in [
        "/v1/commands/{aggregate_type}/{aggregate_id}",
        "/v1/queries/{name}/{key}",
        "/v1/aggregates/{aggregate_type}/{aggregate_id}/events",
        "/v1/aggregates/{aggregate_type}/{aggregate_id}/state",
        "/v1/events/live",
    ] {
        assert!(
            paths.get(path).is_some(),
            "{path} missing from /openapi.json"
        );
    }

    // Requests counted by route pattern, never by raw path; /metrics is on
    // the probes' port, not the API's.
    let metrics = http(&fleet.probes, "GET", "/metrics", &[], "").body;
    let commands_ok = metrics.lines().find(|l| {
        l.starts_with("jetsource_http_requests_total{")
            && l.contains("route=\"/v1/commands/{aggregate_type}/{aggregate_id}\"")
            && l.contains("status=\"200\"")
    });
    let count: f64 = commands_ok
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no count of successful commands:\n{metrics}"));
    assert!(count >= 3.0, "{count}");
    assert!(!metrics.contains("g-1"), "a raw path became a label");
    assert_eq!(fleet.get("/metrics", &[]).status, 404);

    // No command worker: 503 with Retry-After.
    drop(fleet.command.take());
    let unavailable = fleet.send("g-1", deposit, &[("Idempotency-Key", "dep-2")]);
    assert_eq!(
        (unavailable.status, unavailable.code().as_str()),
        (503, "unavailable")
    );
    assert_eq!(unavailable.header("retry-after"), Some("1"));

    // SIGTERM with a live stream open and NATS gone: out within 10 s.
    let _open_stream = live_stream(&addr, "/v1/events/live?aggregate_type=account");
    fleet.nats.kill();
    let started = Instant::now();
    fleet.gateway.signal("TERM");
    let status = fleet.gateway.wait(Duration::from_secs(10));
    assert!(status.success(), "{status}");
    assert!(started.elapsed() < Duration::from_secs(10));
}

/// Opens a Server-Sent Events stream and reads its response head.
fn live_stream(addr: &str, path: &str) -> BufReader<TcpStream> {
    let mut socket = TcpStream::connect(addr).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let auth = bearer(READ_KEY);
    write!(
        socket,
        "GET {path} HTTP/1.0\r\nHost: {addr}\r\nAuthorization: {auth}\r\n\r\n"
    )
    .unwrap();
    let mut reader = BufReader::new(socket);
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    assert!(line.contains(" 200 "), "{line}");
    while line.trim() != "" {
        line.clear();
        reader.read_line(&mut line).unwrap();
        let lower = line.to_lowercase();
        if lower.starts_with("content-type") {
            assert!(lower.contains("text/event-stream"), "{line}");
        }
    }
    reader
}

/// The next SSE event that is not a keep-alive: (id, event, data).
fn next_sse_event(mut reader: BufReader<TcpStream>) -> (String, String, String) {
    let (mut id, mut event, mut data) = (String::new(), String::new(), String::new());
    loop {
        let mut line = String::new();
        assert!(reader.read_line(&mut line).unwrap() > 0, "the stream ended");
        let line = line.trim_end_matches(['\r', '\n']);
        if line.is_empty() {
            if !event.is_empty() {
                return (id, event, data);
            }
            continue;
        }
        if let Some(v) = line.strip_prefix("id:") {
            id = v.trim().to_owned();
        } else if let Some(v) = line.strip_prefix("event:") {
            event = v.trim().to_owned();
        } else if let Some(v) = line.strip_prefix("data:") {
            data += v.trim_start();
        }
    }
}

/// With authorization on, the gateway runs as its own NATS role
/// (nats/accounts.conf): commands, queries, histories, state and live
/// events all work, and the server logs no permission violation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_runs_as_its_own_nats_role() {
    use jetsource_test_support::Sync;
    let credentials = jetsource_tests::RoleCredentials::generate();
    let mut log = std::path::PathBuf::new();
    let nats = NatsServer::start_configured(Sync::Default, |dir| {
        log = dir.join("nats-server.log");
        credentials.server_config()
    });
    let redis = RedisServer::start();
    let redis_url = redis.url();
    let as_role = |role: &str, extra: &[(&str, &str)]| {
        let mut env = credentials.env(role).to_vec();
        env.extend_from_slice(extra);
        env.iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect::<Vec<_>>()
    };
    let start = |binary: &str, env: Vec<(String, String)>| {
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        Process::start(binary, &nats, &env)
    };
    let _command = start("jetsource-command", as_role("command", &[]));
    let _projector = start(
        "jetsource-projector",
        as_role(
            "projector",
            &[("JETSOURCE__REDIS__URL", redis_url.as_str())],
        ),
    );
    let addr = format!("127.0.0.1:{}", free_port());
    let keys = format!("write={}", sha256_hex(WRITE_KEY));
    let _gateway = start(
        "jetsource-gateway",
        as_role(
            "gateway",
            &[
                ("JETSOURCE__GATEWAY__LISTEN", addr.as_str()),
                ("JETSOURCE__GATEWAY__API_KEYS", keys.as_str()),
                ("JETSOURCE__REDIS__URL", redis_url.as_str()),
            ],
        ),
    );
    let admin = credentials.connect(&nats.url(), "admin").await;
    wait_for_service(&admin, "jetsource-command", 1).await;
    wait_for_service(&admin, "jetsource-projector", 1).await;
    let auth = bearer(WRITE_KEY);
    let headers = [("Authorization", auth.as_str())];
    wait_until_ready(&addr);
    let live = {
        let mut socket = TcpStream::connect(&addr).unwrap();
        socket
            .set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        write!(
            socket,
            "GET /v1/events/live?aggregate_type=account HTTP/1.0\r\nHost: {addr}\r\nAuthorization: {auth}\r\n\r\n"
        )
        .unwrap();
        let mut reader = BufReader::new(socket);
        let mut line = String::new();
        while line.trim() != "" || line.is_empty() {
            line.clear();
            reader.read_line(&mut line).unwrap();
            if line.trim().is_empty() {
                break;
            }
        }
        reader
    };
    let open = json!({"type": "OpenAccount", "data": {"owner": "ada"}}).to_string();
    let opened = http(&addr, "POST", "/v1/commands/account/s-1", &headers, &open);
    assert_eq!(opened.status, 200, "{opened:?}");
    let sequence = opened.json()["sequence"].as_u64().unwrap();
    let (id, event, _) = next_sse_event(live);
    assert_eq!(
        (id, event.as_str()),
        (sequence.to_string(), "AccountOpened")
    );
    let path = format!("/v1/queries/account/s-1?min_sequence={sequence}");
    let queried = http(&addr, "GET", &path, &headers, "");
    assert_eq!(queried.status, 200, "{queried:?}");
    let history = http(
        &addr,
        "GET",
        "/v1/aggregates/account/s-1/events",
        &headers,
        "",
    );
    assert_eq!(history.status, 200, "{history:?}");
    let state = http(
        &addr,
        "GET",
        "/v1/aggregates/account/s-1/state",
        &headers,
        "",
    );
    assert_eq!(state.status, 200, "{state:?}");
    // The console's views too.
    for path in [
        "/v1/types",
        "/v1/projections",
        "/v1/stream",
        "/v1/dead-letters",
    ] {
        let answer = http(&addr, "GET", path, &headers, "");
        assert_eq!(answer.status, 200, "{path}: {answer:?}");
    }
    let logged = std::fs::read_to_string(&log).unwrap();
    assert!(
        logged.contains("Server is ready"),
        "not the server's log: {log:?}"
    );
    let violations: Vec<String> = logged
        .lines()
        .filter(|l| l.contains("Permissions Violation"))
        .map(str::to_owned)
        .collect();
    assert!(violations.is_empty(), "{violations:#?}");
}

/// On a 3-node cluster the console's stream view names the leader and
/// both followers, current.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_stream_view_shows_a_clusters_leader_and_replicas() {
    let cluster = jetsource_test_support::NatsCluster::start();
    let _client = cluster.client().await;
    let addr = format!("127.0.0.1:{}", free_port());
    let keys = format!("read={}", sha256_hex(READ_KEY));
    let _gateway = Process::start_at(
        "jetsource-gateway",
        &cluster.urls(),
        &[
            ("JETSOURCE__GATEWAY__LISTEN", addr.as_str()),
            ("JETSOURCE__GATEWAY__API_KEYS", keys.as_str()),
            ("JETSOURCE__STORE__REPLICAS", "3"),
        ],
        None,
    );
    let auth = bearer(READ_KEY);
    let deadline = Instant::now() + Duration::from_secs(60);
    let stream = loop {
        let answer = TcpStream::connect(&addr).ok().map(|_| {
            http(
                &addr,
                "GET",
                "/v1/stream",
                &[("Authorization", auth.as_str())],
                "",
            )
        });
        if let Some(answer) = answer.filter(|a| a.status == 200) {
            let stream = answer.json();
            let replicas = stream["cluster"]["replicas"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            if replicas.len() == 2 && replicas.iter().all(|r| r["current"] == true) {
                break stream;
            }
        }
        assert!(
            Instant::now() < deadline,
            "no leader and two current replicas"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(stream["replicas"], 3);
    let leader = stream["cluster"]["leader"].as_str().unwrap();
    let followers: Vec<&str> = stream["cluster"]["replicas"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["name"].as_str().unwrap())
        .collect();
    assert!(!followers.contains(&leader), "{stream}");
}

/// The gateway and its console know nothing of the bank: the shop's
/// gateway serves the shop's types, projections and queries.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_applications_gateway_serves_its_own_types_and_queries() {
    let nats = NatsServer::start();
    let addr = format!("127.0.0.1:{}", free_port());
    let keys = format!("read={}", sha256_hex(READ_KEY));
    let _gateway = Process::start(
        "shop-gateway",
        &nats,
        &[
            ("JETSOURCE__GATEWAY__LISTEN", addr.as_str()),
            ("JETSOURCE__GATEWAY__API_KEYS", keys.as_str()),
        ],
    );
    let auth = bearer(READ_KEY);
    let headers = [("Authorization", auth.as_str())];
    wait_until_ready(&addr);
    let types = http(&addr, "GET", "/v1/types", &headers, "").json();
    assert_eq!(
        types["aggregate_types"],
        json!(["fulfilment", "item", "order"]),
        "{types}"
    );
    assert!(!types.to_string().contains("account"), "{types}");
    let queries = http(&addr, "GET", "/v1/queries", &headers, "").body;
    assert!(queries.contains("orders.by_customer"), "{queries}");
    assert_eq!(http(&addr, "GET", "/console", &[], "").status, 200);
}

/// A process instance (the shop's fulfilment of an order) reads like any
/// aggregate through the gateway, which the console uses: listed among the
/// types, with its state and history; commands to it are refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_process_instance_reads_like_an_aggregate_over_http() {
    let nats = NatsServer::start();
    let redis = RedisServer::start();
    let client = nats.client().await;
    let redis_url = redis.url();
    let _command = Process::start("shop-command", &nats, &[]);
    let _process = Process::start("shop-process", &nats, &[]);
    let addr = format!("127.0.0.1:{}", free_port());
    let keys = format!("write={}", sha256_hex(WRITE_KEY));
    let _gateway = Process::start(
        "shop-gateway",
        &nats,
        &[
            ("JETSOURCE__GATEWAY__LISTEN", addr.as_str()),
            ("JETSOURCE__GATEWAY__API_KEYS", keys.as_str()),
            ("JETSOURCE__REDIS__URL", redis_url.as_str()),
        ],
    );
    wait_for_service(&client, "jetsource-command", 1).await;
    wait_for_service(&client, "jetsource-process", 1).await;
    wait_until_ready(&addr);
    let auth = bearer(WRITE_KEY);
    let headers = [("Authorization", auth.as_str())];
    let post = |path: &str, body: Value| http(&addr, "POST", path, &headers, &body.to_string());
    let get = |path: &str| http(&addr, "GET", path, &headers, "");
    for body in [
        json!({"type": "AddItem", "data": {"name": "tea"}}),
        json!({"type": "Restock", "data": {"quantity": 5}}),
    ] {
        assert_eq!(post("/v1/commands/item/tea", body).status, 200);
    }
    let line = json!([{"sku": "tea", "quantity": 2, "price": 10}]);
    let place = json!({"type": "PlaceOrder", "data": {"customer": "ada", "lines": line}});
    assert_eq!(post("/v1/commands/order/o-1", place).status, 200);

    let types = get("/v1/types").json();
    assert!(
        types["aggregate_types"]
            .as_array()
            .unwrap()
            .contains(&json!("fulfilment")),
        "{types}"
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let state = get("/v1/aggregates/fulfilment/o-1/state");
        if state.status == 200 {
            let body = state.json();
            let instance = &body["state"]["state"];
            if instance["confirm_answered"] == true {
                assert_eq!(instance["lines"]["tea"]["stock"], "reserved", "{body}");
                break;
            }
        }
        assert!(
            Instant::now() < deadline,
            "the order was not fulfilled: {}",
            state.body
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let history = get("/v1/aggregates/fulfilment/o-1/events").json();
    let types: Vec<&str> = history["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["event_type"].as_str().unwrap())
        .collect();
    assert_eq!(types[0], "FulfilmentStarted", "{history}");
    assert!(types.contains(&"StockReserved"), "{history}");
    let refused = post("/v1/commands/fulfilment/o-1", json!({"type": "Anything"}));
    assert_eq!(
        (refused.status, refused.code().as_str()),
        (400, "invalid"),
        "{}",
        refused.body
    );
    assert!(refused.body.contains("is a process"), "{}", refused.body);
}
