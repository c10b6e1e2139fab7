//! The workers' `GET /healthz` and `GET /readyz` over real HTTP
//! (docs/PROTOCOL.md, "Health, readiness and metrics"), and read-only mode: a
//! 3-node cluster that lost its quorum answers commands `unavailable`
//! promptly while queries keep answering from Redis.

#![allow(clippy::unwrap_used)]

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use jetsource_core::protocol::{decode_reply, CommandOutcome, ErrorBody, ErrorCode};
use jetsource_test_support::requests::query;
use jetsource_test_support::{free_port, NatsCluster, NatsServer, RedisServer};
use jetsource_tests::{wait_for_service, Process};
use serde_json::{json, Value};

const WORKERS: [&str; 3] = [
    "jetsource-command",
    "jetsource-projector",
    "jetsource-snapshotter",
];

/// The standard: every process ends within this of SIGTERM.
const STOP_LIMIT: Duration = Duration::from_secs(10);

/// `GET path` on `addr` over HTTP/1.0: the status code and the body.
fn get(addr: &str, path: &str) -> std::io::Result<(u16, String)> {
    let addr: std::net::SocketAddr = addr.parse().unwrap();
    let mut socket = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    socket.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(socket, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut response = String::new();
    socket.read_to_string(&mut response)?;
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("not an HTTP response: {response:?}")))?;
    let body = response
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_owned();
    Ok((status, body))
}

/// Polls `GET path` until `done` holds for the outcome, which it returns
/// (`None`: no HTTP answer); panics after `timeout`, showing the last one.
fn wait_for(
    addr: &str,
    path: &str,
    timeout: Duration,
    what: &str,
    done: impl Fn(&std::io::Result<(u16, String)>) -> bool,
) -> Option<(u16, String)> {
    let deadline = Instant::now() + timeout;
    loop {
        let outcome = get(addr, path);
        if done(&outcome) {
            return outcome.ok();
        }
        assert!(
            Instant::now() < deadline,
            "{what}: not within {timeout:?}; last GET {addr}{path}: {outcome:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn status(outcome: &std::io::Result<(u16, String)>) -> Option<u16> {
    outcome.as_ref().ok().map(|(status, _)| *status)
}

fn listen_address() -> String {
    format!("127.0.0.1:{}", free_port())
}

/// Each worker binary: alive as soon as it runs, ready only once NATS
/// (and Redis for the projector) is reachable and it serves, not ready
/// once SIGTERM came, and the listener gone when it exits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_worker_is_alive_at_once_and_ready_only_once_nats_is_up() {
    let mut nats = NatsServer::start();
    let redis = RedisServer::start();
    // NATS down when the workers start: its port answers nothing.
    nats.kill();
    let redis_url = redis.url();
    let workers: Vec<(&str, String, Process)> = WORKERS
        .into_iter()
        .map(|binary| {
            let listen = listen_address();
            let env = [
                ("JETSOURCE__REDIS__URL", redis_url.as_str()),
                ("JETSOURCE__HTTP__LISTEN", listen.as_str()),
                ("JETSOURCE__NATS__CONNECT_TIMEOUT_MS", "120000"),
            ];
            let worker = Process::start(binary, &nats, &env);
            (binary, listen, worker)
        })
        .collect();
    for (binary, listen, _) in &workers {
        let alive = wait_for(listen, "/healthz", Duration::from_secs(30), binary, |o| {
            status(o) == Some(200)
        });
        println!("{binary} /healthz: {alive:?}");
        let (code, body) = get(listen, "/readyz").unwrap();
        assert_eq!(code, 503, "{binary} ready without NATS: {body}");
        let body: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(body["ready"], false, "{binary}: {body}");
        assert!(
            body["failing"]["nats"].is_string(),
            "{binary} should name NATS as the failing check: {body}"
        );
    }

    nats.restart();
    for (binary, listen, _) in &workers {
        let (_, body) = wait_for(
            listen,
            "/readyz",
            Duration::from_secs(60),
            &format!("{binary} ready after NATS started"),
            |o| status(o) == Some(200),
        )
        .unwrap();
        assert_eq!(serde_json::from_str::<Value>(&body).unwrap()["ready"], true);
        assert_eq!(status(&get(listen, "/healthz")), Some(200));
    }

    // SIGTERM: /readyz stops answering 200 (503 while stopping, then the
    // listener is gone) and the process exits cleanly, within the limit.
    for (binary, listen, mut worker) in workers {
        let started = Instant::now();
        worker.signal("TERM");
        wait_for(
            &listen,
            "/readyz",
            STOP_LIMIT,
            &format!("{binary} not ready after SIGTERM"),
            |o| status(o) != Some(200),
        );
        let exit = worker.wait(STOP_LIMIT.saturating_sub(started.elapsed()));
        assert!(exit.success(), "{binary}: {exit}");
        assert!(
            get(&listen, "/healthz").is_err(),
            "{binary}: the listener outlived the process"
        );
    }
}

/// The address a worker logged (`http listening on <addr>`), once it has.
fn logged_address(log: &std::path::Path) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if let Some((_, rest)) = text.split_once("http listening on ") {
            return rest
                .chars()
                .take_while(|c| c.is_ascii_digit() || *c == '.' || *c == ':')
                .collect();
        }
        assert!(
            Instant::now() < deadline,
            "no `http listening on` in {}: {text}",
            log.display()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Two copies with the default `http.listen` (an ephemeral loopback port)
/// both start and serve on ports of their own, logged at start-up; an
/// empty `http.listen` opens no listener at all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_default_listener_never_collides_and_an_empty_one_is_off() {
    let nats = NatsServer::start();
    let client = nats.client().await;
    let dir = tempfile::tempdir().unwrap();
    let logs: Vec<_> = (0..3)
        .map(|i| dir.path().join(format!("command-{i}.log")))
        .collect();
    let info = [("RUST_LOG", "info")];
    let off = [("RUST_LOG", "info"), ("JETSOURCE__HTTP__LISTEN", "")];
    let _workers = [
        Process::start_with_log("jetsource-command", &nats, &info, Some(&logs[0])),
        Process::start_with_log("jetsource-command", &nats, &info, Some(&logs[1])),
        Process::start_with_log("jetsource-command", &nats, &off, Some(&logs[2])),
    ];
    wait_for_service(&client, "jetsource-command", 3).await;
    let first = logged_address(&logs[0]);
    let second = logged_address(&logs[1]);
    assert_ne!(first, second, "two copies on one port");
    for addr in [&first, &second] {
        assert!(addr.starts_with("127.0.0.1:"), "not loopback: {addr}");
        assert_eq!(status(&get(addr, "/healthz")), Some(200), "{addr}");
        wait_for(addr, "/readyz", Duration::from_secs(30), addr, |o| {
            status(o) == Some(200)
        });
    }
    let text = std::fs::read_to_string(&logs[2]).unwrap();
    assert!(
        text.contains("http listener off") && !text.contains("http listening on"),
        "an empty http.listen should open nothing: {text}"
    );
}

/// A command on `cmd.account.<id>` with a client whose requests wait up
/// to 60 s: `Err(None)` when no worker answered (no responders), else the
/// worker's reply and how long it took.
async fn command(
    client: &async_nats::Client,
    id: &str,
    body: &Value,
) -> Result<(Result<CommandOutcome, ErrorBody>, Duration), String> {
    let started = Instant::now();
    let reply = client
        .request(format!("cmd.account.{id}"), body.to_string().into())
        .await
        .map_err(|e| e.to_string())?;
    Ok((decode_reply(&reply.payload).unwrap(), started.elapsed()))
}

/// A query's answer once a projector serves it (its connection may be
/// moving to the surviving node: no responders until then).
async fn query_when_served(client: &async_nats::Client, subject: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match client.request(subject.to_owned(), "{}".into()).await {
            Ok(reply) => return decode_reply::<Value>(&reply.payload).unwrap().unwrap(),
            Err(e) => assert!(Instant::now() < deadline, "{subject}: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Sends until acknowledged (retrying `unavailable`, timeouts and no
/// responders, as during an election), by `deadline`.
async fn send_until_ok(
    client: &async_nats::Client,
    id: &str,
    body: Value,
    deadline: Instant,
) -> CommandOutcome {
    loop {
        match command(client, id, &body).await {
            Ok((Ok(outcome), _)) => return outcome,
            Ok((Err(ErrorBody { code, message, .. }), _)) => assert!(
                matches!(code, ErrorCode::Unavailable | ErrorCode::Timeout),
                "{id}: {code:?} {message}"
            ),
            Err(_) => {}
        }
        assert!(Instant::now() < deadline, "{id}: not acknowledged in time");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Read-only mode on a 3-node R3 cluster: with two nodes gone (the stream
/// leader kept: it loses its quorum, then its leadership) a command is answered `unavailable` well within 15 s of the
/// request, the command worker reports not ready (`event_store`), and
/// queries still answer from Redis with the sequence they reflect; with
/// the nodes back, commands succeed again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_without_quorum_is_read_only_commands_unavailable_queries_answer() {
    let mut cluster = NatsCluster::start();
    let redis = RedisServer::start();
    let setup = cluster.client().await;
    let urls = cluster.urls();
    let redis_url = redis.url();
    let command_http = listen_address();
    let projector_http = listen_address();
    let env = |listen: &str| {
        vec![
            ("JETSOURCE__STORE__REPLICAS", "3".to_owned()),
            ("JETSOURCE__REDIS__URL", redis_url.clone()),
            ("JETSOURCE__HTTP__LISTEN", listen.to_owned()),
        ]
    };
    let start = |binary: &str, listen: &str| {
        let env = env(listen);
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        Process::start_at(binary, &urls, &env, None)
    };
    let _command = start("jetsource-command", &command_http);
    let _projector = start("jetsource-projector", &projector_http);
    wait_for_service(&setup, "jetsource-command", 1).await;
    wait_for_service(&setup, "jetsource-projector", 1).await;

    // A client of its own whose requests wait long enough to measure the
    // worker's answer, not the client's timeout.
    let servers: Vec<&str> = urls.split(',').collect();
    let client = async_nats::ConnectOptions::new()
        .request_timeout(Some(Duration::from_secs(60)))
        .connect(servers)
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    send_until_ok(
        &client,
        "ro",
        json!({"type": "OpenAccount", "data": {"owner": "o"}, "command_id": "open"}),
        deadline,
    )
    .await;
    let mut last = 0;
    for k in 0..3 {
        let body = json!({"type": "Deposit", "data": {"amount": 5}, "command_id": format!("d{k}")});
        last = send_until_ok(&client, "ro", body, deadline).await.sequence;
    }
    let projected = query(
        &client,
        "query.account.ro",
        json!({"min_sequence": last, "timeout_ms": 30000}),
    )
    .await
    .unwrap();
    assert_eq!(projected["sequence"], last, "{projected}");
    wait_for(
        &command_http,
        "/readyz",
        Duration::from_secs(30),
        "command worker ready",
        |o| status(o) == Some(200),
    );

    // Keep the stream leader and stop the two others: the hard case, as
    // the leader goes on taking appends it can no longer commit (and
    // answering reads) until it notices and steps down.
    let js = async_nats::jetstream::new(setup.clone());
    let mut stream = js.get_stream("EVENTS").await.unwrap();
    let info = stream.info().await.unwrap().clone();
    let leader = info.cluster.and_then(|c| c.leader).unwrap();
    let kept = (0..cluster.len())
        .find(|&i| cluster.node_name(i) == leader)
        .unwrap();
    let stopped: Vec<usize> = (0..cluster.len()).filter(|&i| i != kept).collect();
    for &i in &stopped {
        cluster.kill_node(i);
    }
    // The first answer a worker gives (requests may find no responder while
    // the connections move to the surviving node) is `unavailable`, within
    // the bound of its own request. A request that gets nothing back for
    // 20 s was lost on its way while the connections moved (a fresh CI run
    // once waited out a whole 60 s request): it is sent again, as any
    // client resends an ambiguous command; an answer must still come
    // within 15 s of the request it answers.
    let body = json!({"type": "Deposit", "data": {"amount": 1}, "command_id": "during"});
    let until = Instant::now() + Duration::from_secs(60);
    let (reply, took) = loop {
        let sent = tokio::time::timeout(Duration::from_secs(20), command(&client, "ro", &body));
        match sent
            .await
            .unwrap_or_else(|_| Err("no answer within 20 s".into()))
        {
            Ok(answer) => break answer,
            Err(e) => {
                assert!(Instant::now() < until, "no worker answered: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    println!("without quorum: {reply:?} after {took:?}");
    let error = reply.expect_err("a command cannot succeed without a stream leader");
    assert_eq!(error.code, ErrorCode::Unavailable, "{}", error.message);
    assert!(
        took < Duration::from_secs(15),
        "`unavailable` took {took:?}"
    );
    // A refusal is only given on state the stream leader confirmed: while
    // the old leader still answers reads (it steps down seconds after
    // losing its quorum) that is `rejected`, afterwards `unavailable`;
    // either way promptly, and never anything appended.
    let overdraw = json!({"type": "Withdraw", "data": {"amount": 1000}, "command_id": "overdraw"});
    let (reply, took) = command(&client, "ro", &overdraw).await.unwrap();
    println!("refusal without quorum: {reply:?} after {took:?}");
    let error = reply.expect_err("an overdraft is never accepted");
    assert!(
        matches!(error.code, ErrorCode::Unavailable | ErrorCode::Rejected),
        "{:?}: {}",
        error.code,
        error.message
    );
    assert!(took < Duration::from_secs(15), "the answer took {took:?}");
    // Queries keep answering from Redis, with the sequence they reflect.
    let answered = query_when_served(&client, "query.account.ro").await;
    assert_eq!(answered["sequence"], last, "{answered}");
    assert_eq!(answered["data"], projected["data"], "{answered}");
    // The command worker says why it is not ready; the projector, which
    // still serves queries, stays ready.
    let (_, why) = wait_for(
        &command_http,
        "/readyz",
        Duration::from_secs(60),
        "command worker not ready without quorum",
        |o| status(o) == Some(503),
    )
    .unwrap();
    assert!(why.contains("event_store"), "{why}");
    wait_for(
        &projector_http,
        "/readyz",
        Duration::from_secs(30),
        "projector ready without quorum",
        |o| status(o) == Some(200),
    );

    for &i in &stopped {
        cluster.start_node(i);
    }
    let deadline = Instant::now() + Duration::from_secs(90);
    let after = send_until_ok(
        &client,
        "ro",
        json!({"type": "Deposit", "data": {"amount": 1}, "command_id": "after"}),
        deadline,
    )
    .await;
    assert!(after.sequence > last);
    wait_for(
        &command_http,
        "/readyz",
        Duration::from_secs(60),
        "command worker ready again",
        |o| status(o) == Some(200),
    );
}

/// Snapshots in the bucket, as `jetsource snapshot status` counts them.
fn snapshot_count(url: &str) -> u64 {
    let (code, out, err) = jetsource_tests::cli_at(url, &[], &["--json", "snapshot", "status"]);
    assert_eq!(code, 0, "{out}{err}");
    let rows: Vec<Value> = serde_json::from_str(&out).unwrap();
    rows.iter().filter_map(|r| r["snapshots"].as_u64()).sum()
}

/// Opens account `id` and deposits once: two events, a snapshot due with
/// `snapshot.every` = 2.
async fn two_events(client: &async_nats::Client, id: &str) {
    for body in [
        json!({"type": "OpenAccount", "data": {"owner": "o"}}),
        json!({"type": "Deposit", "data": {"amount": 5}}),
    ] {
        let (reply, _) = command(client, id, &body).await.unwrap();
        reply.unwrap();
    }
}

/// The snapshotter's durable consumer deleted behind its back (an
/// operator's slip, a restore): it notices, creates it again and goes on
/// taking snapshots; while it cannot (the event stream itself gone),
/// `/readyz` fails and says why, and it recovers once the stream is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_snapshotter_recreates_a_deleted_consumer_and_is_unready_while_it_cannot() {
    let nats = NatsServer::start();
    let client = nats.client().await;
    let http = listen_address();
    let env = [
        ("JETSOURCE__HTTP__LISTEN", http.as_str()),
        ("JETSOURCE__SNAPSHOT__EVERY", "2"),
    ];
    let _command = Process::start("jetsource-command", &nats, &[]);
    let _snapshotter = Process::start("jetsource-snapshotter", &nats, &env);
    wait_for_service(&client, "jetsource-command", 1).await;
    wait_for_service(&client, "jetsource-snapshotter", 1).await;
    let ready = |o: &std::io::Result<(u16, String)>| status(o) == Some(200);
    wait_for(&http, "/readyz", Duration::from_secs(20), "ready", ready);
    two_events(&client, "before").await;
    let url = nats.url();
    let wait_snapshots = |n: u64, what: &str| {
        let deadline = Instant::now() + Duration::from_secs(20);
        while snapshot_count(&url) < n {
            assert!(
                Instant::now() < deadline,
                "{what}: fewer than {n} snapshots"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    wait_snapshots(1, "before the deletion");

    let js = async_nats::jetstream::new(client.clone());
    let stream = js.get_stream("EVENTS").await.unwrap();
    stream.delete_consumer("snapshotter").await.unwrap();
    two_events(&client, "after").await;
    wait_snapshots(2, "after the consumer was deleted");
    stream.consumer_info("snapshotter").await.unwrap();
    wait_for(&http, "/readyz", Duration::from_secs(20), "ready", ready);

    // The event stream gone: no consumer can be made; not ready, saying so.
    js.delete_stream("EVENTS").await.unwrap();
    let (code, body) = wait_for(
        &http,
        "/readyz",
        Duration::from_secs(20),
        "not ready without the stream",
        |o| status(o) == Some(503),
    )
    .unwrap();
    assert_eq!(code, 503);
    assert!(body.contains("consumer"), "{body}");

    // The stream back (any CLI command that opens the store makes it,
    // docs/RUNBOOK.md): ready again, and snapshots go on.
    let (code, out, err) = jetsource_tests::cli_at(&url, &[], &["stream"]);
    assert_eq!(code, 0, "{out}{err}");
    two_events(&client, "back").await;
    wait_for(
        &http,
        "/readyz",
        Duration::from_secs(30),
        "ready again",
        ready,
    );
    wait_snapshots(3, "after the stream came back");
}

/// The projector's durable consumers deleted behind its back: it creates
/// them again and read-your-writes queries keep answering.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_projector_recreates_deleted_consumers() {
    use futures::TryStreamExt;
    let nats = NatsServer::start();
    let redis = RedisServer::start();
    let client = nats.client().await;
    let redis_url = redis.url();
    let _command = Process::start("jetsource-command", &nats, &[]);
    let _projector = Process::start(
        "jetsource-projector",
        &nats,
        &[("JETSOURCE__REDIS__URL", redis_url.as_str())],
    );
    wait_for_service(&client, "jetsource-command", 1).await;
    wait_for_service(&client, "jetsource-projector", 1).await;
    two_events(&client, "p-1").await;
    let js = async_nats::jetstream::new(client.clone());
    let stream = js.get_stream("EVENTS").await.unwrap();
    let names: Vec<String> = stream.consumer_names().try_collect().await.unwrap();
    assert!(!names.is_empty());
    for name in &names {
        stream.delete_consumer(name).await.unwrap();
    }
    let body = json!({"type": "Deposit", "data": {"amount": 7}});
    let (reply, _) = command(&client, "p-1", &body).await.unwrap();
    let sequence = reply.unwrap().sequence;
    let answer = query(
        &client,
        "query.account.p-1",
        json!({"min_sequence": sequence, "timeout_ms": 8_000}),
    )
    .await
    .unwrap();
    assert_eq!(answer["data"]["balance"], 12, "{answer}");
}
