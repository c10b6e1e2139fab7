//! `GET /metrics` (docs/METRICS.md) scraped from the real worker binaries
//! under a small load: every family the workers promise moves, under the
//! labels the registry allows, and the Grafana dashboard in deploy/ asks
//! only for metrics the workers export.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use jetsource_core::protocol::{decode_reply, CommandOutcome, ErrorBody, ErrorCode};
use jetsource_test_support::requests::query;
use jetsource_test_support::{free_port, NatsServer, RedisServer};
use jetsource_tests::{wait_for_service, Process};
use serde_json::{json, Value};

/// `GET /metrics` on `addr`: each sample line as `name{labels}` -> value.
fn scrape(addr: &str) -> BTreeMap<String, f64> {
    let mut socket = TcpStream::connect(addr).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    write!(socket, "GET /metrics HTTP/1.0\r\nHost: {addr}\r\n\r\n").unwrap();
    let mut response = String::new();
    socket.read_to_string(&mut response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    assert!(
        head.starts_with("HTTP/1.1 200") || head.starts_with("HTTP/1.0 200"),
        "{head}"
    );
    assert!(head.contains("text/plain"), "{head}");
    body.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| {
            let (series, value) = l.rsplit_once(' ').unwrap();
            (series.to_owned(), value.parse().unwrap())
        })
        .collect()
}

/// The value of the series `name` whose labels include every `labels` pair
/// (summed over the others); 0 when there is none.
fn value(samples: &BTreeMap<String, f64>, name: &str, labels: &[(&str, &str)]) -> f64 {
    samples
        .iter()
        .filter(|(series, _)| {
            let (n, rest) = series.split_once('{').unwrap_or((series, ""));
            n == name
                && labels
                    .iter()
                    .all(|(k, v)| rest.contains(&format!("{k}=\"{v}\"")))
        })
        .map(|(_, v)| v)
        .sum()
}

/// Scrapes until `done` holds, for the slow parts (projection, snapshots;
/// a snapshot write retried on a loaded machine takes seconds).
fn scrape_until(
    addr: &str,
    what: &str,
    done: impl Fn(&BTreeMap<String, f64>) -> bool,
) -> BTreeMap<String, f64> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let samples = scrape(addr);
        if done(&samples) {
            return samples;
        }
        assert!(Instant::now() < deadline, "{what}: {samples:#?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

async fn command(
    client: &async_nats::Client,
    id: &str,
    body: Value,
) -> Result<CommandOutcome, ErrorBody> {
    let reply = client
        .request(format!("cmd.account.{id}"), body.to_string().into())
        .await
        .unwrap();
    decode_reply(&reply.payload).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_export_prometheus_metrics_that_move_under_load() {
    let nats = NatsServer::start();
    let redis = RedisServer::start();
    let client = nats.client().await;
    let listen = || format!("127.0.0.1:{}", free_port());
    let (command_http, projector_http, snapshotter_http) = (listen(), listen(), listen());
    let redis_url = redis.url();
    let _command = Process::start(
        "jetsource-command",
        &nats,
        &[("JETSOURCE__HTTP__LISTEN", command_http.as_str())],
    );
    let _projector = Process::start(
        "jetsource-projector",
        &nats,
        &[
            ("JETSOURCE__HTTP__LISTEN", projector_http.as_str()),
            ("JETSOURCE__REDIS__URL", redis_url.as_str()),
        ],
    );
    let _snapshotter = Process::start(
        "jetsource-snapshotter",
        &nats,
        &[
            ("JETSOURCE__HTTP__LISTEN", snapshotter_http.as_str()),
            ("JETSOURCE__SNAPSHOT__EVERY", "2"),
        ],
    );
    for service in [
        "jetsource-command",
        "jetsource-projector",
        "jetsource-snapshotter",
    ] {
        wait_for_service(&client, service, 1).await;
    }

    // Commands: ok, rejected, invalid, and made-up names that must not
    // become label values.
    let open = command(
        &client,
        "m-1",
        json!({"type": "OpenAccount", "data": {"owner": "o"}}),
    )
    .await;
    let opened = open.unwrap();
    for _ in 0..3 {
        command(
            &client,
            "m-1",
            json!({"type": "Deposit", "data": {"amount": 10}}),
        )
        .await
        .unwrap();
    }
    let refused = command(
        &client,
        "m-1",
        json!({"type": "Withdraw", "data": {"amount": 1000}}),
    )
    .await;
    assert_eq!(refused.unwrap_err().code, ErrorCode::Rejected);
    let invalid = command(
        &client,
        "m-1",
        json!({"type": "Deposit", "data": {"amount": 0}}),
    )
    .await;
    assert_eq!(invalid.unwrap_err().code, ErrorCode::Invalid);
    let made_up = command(&client, "m-1", json!({"type": "Hack<script>", "data": {}})).await;
    assert_eq!(made_up.unwrap_err().code, ErrorCode::Invalid);
    let reply = client
        .request("cmd.made-up-type.x", "{}".into())
        .await
        .unwrap();
    assert_eq!(
        decode_reply::<CommandOutcome>(&reply.payload)
            .unwrap()
            .unwrap_err()
            .code,
        ErrorCode::Invalid
    );

    // Another writer appends behind the worker's cached state: its next
    // command conflicts once, then succeeds on fresh state.
    let store = jetsource_tests::open_store(&client, &nats.url()).await;
    let last = command(
        &client,
        "m-1",
        json!({"type": "Deposit", "data": {"amount": 1}}),
    )
    .await
    .unwrap();
    let behind = (last.sequence, last.version);
    jetsource_tests::append_behind(&store, "m-1", behind, "Deposited", br#"{"amount":2}"#).await;
    let after = command(
        &client,
        "m-1",
        json!({"type": "Deposit", "data": {"amount": 1}}),
    )
    .await
    .unwrap();
    assert_eq!(after.version, last.version + 2);
    // And an event the accounts read model refuses (an amount of 0, which
    // no command would decide): a dead letter.
    jetsource_tests::append_behind(&store, "m-bad", (0, 0), "Deposited", br#"{"amount":0}"#).await;

    let samples = scrape(&command_http);
    let commands = |labels: &[(&str, &str)]| value(&samples, "jetsource_commands_total", labels);
    assert_eq!(
        commands(&[("command_type", "Deposit"), ("outcome", "ok")]),
        5.0
    );
    assert_eq!(
        commands(&[("command_type", "OpenAccount"), ("outcome", "ok")]),
        1.0
    );
    assert_eq!(
        commands(&[("command_type", "Withdraw"), ("outcome", "rejected")]),
        1.0
    );
    assert_eq!(
        commands(&[("command_type", "Deposit"), ("outcome", "invalid")]),
        1.0
    );
    // Made-up types are `unknown`, never echoed into a label.
    assert_eq!(
        commands(&[("command_type", "unknown"), ("outcome", "invalid")]),
        2.0
    );
    assert_eq!(commands(&[("aggregate_type", "unknown")]), 1.0);
    assert!(
        samples
            .keys()
            .all(|s| !s.contains("Hack") && !s.contains("made-up")),
        "a request's names became label values"
    );
    assert_eq!(
        value(
            &samples,
            "jetsource_command_conflicts_total",
            &[("aggregate_type", "account")]
        ),
        1.0
    );
    assert!(
        value(
            &samples,
            "jetsource_command_duration_seconds_count",
            &[("aggregate_type", "account")]
        ) >= 8.0
    );
    assert!(value(&samples, "jetsource_append_duration_seconds_count", &[]) >= 6.0);
    assert!(
        value(
            &samples,
            "jetsource_aggregate_cache_lookups_total",
            &[("result", "miss")]
        ) >= 1.0
    );
    assert!(
        value(
            &samples,
            "jetsource_aggregate_cache_lookups_total",
            &[("result", "hit")]
        ) >= 1.0
    );
    assert!(
        value(
            &samples,
            "jetsource_snapshot_tail_events_count",
            &[("aggregate_type", "account")]
        ) >= 1.0
    );

    // Queries, and the projector catching up.
    let answer = query(
        &client,
        "query.account.m-1",
        json!({"min_sequence": after.sequence, "timeout_ms": 10_000}),
    )
    .await
    .unwrap();
    assert_eq!(answer["data"]["balance"], 34, "{answer}");
    let missing = query(&client, "query.account.nobody", json!({})).await;
    assert_eq!(missing.unwrap_err().code, ErrorCode::NotFound);
    let events = (after.sequence - opened.sequence + 1) as f64;
    let samples = scrape_until(&projector_http, "the projector's metrics", |s| {
        value(
            s,
            "jetsource_projector_events_applied_total",
            &[("projection", "accounts")],
        ) >= events
            && value(
                s,
                "jetsource_dead_letters_total",
                &[("projection", "accounts")],
            ) >= 1.0
    });
    assert_eq!(
        value(
            &samples,
            "jetsource_dead_letters_total",
            &[("projection", "accounts")]
        ),
        1.0
    );
    // Declared projections' dead-letter counters exist from the start.
    assert!(samples.contains_key("jetsource_dead_letters_total{projection=\"users\"}"));
    assert_eq!(
        value(
            &samples,
            "jetsource_queries_total",
            &[("query", "account"), ("outcome", "ok")]
        ),
        1.0
    );
    assert_eq!(
        value(
            &samples,
            "jetsource_queries_total",
            &[("query", "account"), ("outcome", "not_found")]
        ),
        1.0
    );
    assert!(
        value(
            &samples,
            "jetsource_query_duration_seconds_count",
            &[("query", "account")]
        ) >= 2.0
    );
    assert!(
        value(
            &samples,
            "jetsource_projector_batch_events_count",
            &[("projection", "accounts")]
        ) >= 1.0
    );
    assert_eq!(
        value(
            &samples,
            "jetsource_projector_lag_events",
            &[("projection", "accounts")]
        ),
        0.0
    );
    assert!(samples.contains_key("jetsource_projector_lag_seconds{projection=\"accounts\"}"));

    // Snapshots: every second version of m-1.
    let samples = scrape_until(&snapshotter_http, "the snapshotter's metrics", |s| {
        value(
            s,
            "jetsource_snapshots_written_total",
            &[("aggregate_type", "account")],
        ) >= 3.0
    });
    assert_eq!(
        value(&samples, "jetsource_snapshotter_lag_events", &[]),
        0.0
    );

    // The dashboard asks only for what the workers export.
    check_dashboard(&[
        scrape(&command_http),
        scrape(&projector_http),
        scrape(&snapshotter_http),
    ]);
}

/// Every metric deploy/grafana/jetsource.json queries is exported by a
/// worker (histograms by their `_bucket`, `_sum` or `_count` series).
fn check_dashboard(exported: &[BTreeMap<String, f64>]) {
    let path = jetsource_tests::workspace_root().join("deploy/grafana/jetsource.json");
    let dashboard: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let names: std::collections::BTreeSet<String> = exported
        .iter()
        .flat_map(|s| s.keys())
        .map(|series| series.split('{').next().unwrap().to_owned())
        .collect();
    let mut asked = 0;
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expr = target["expr"].as_str().unwrap();
            for word in expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
                if word.starts_with("jetsource_") {
                    asked += 1;
                    assert!(
                        names.contains(word),
                        "panel {:?} asks for {word}, which no worker exports",
                        panel["title"]
                    );
                }
            }
        }
    }
    assert!(asked >= 10, "the dashboard asks for only {asked} series");
}
