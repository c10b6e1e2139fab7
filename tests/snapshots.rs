//! Snapshots as shipped: `jetsource-snapshotter` processes and the CLI's
//! `snapshot` and `state` commands, on one node and on a 3-node cluster
//! with replicas 3.

#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use jetsource_core::protocol::{decode_reply, CommandOutcome};
use jetsource_test_support::{NatsCluster, NatsServer};
use jetsource_tests::{cli_at, wait_for_service, Process};
use serde_json::{json, Value};

const SINGLE: &[(&str, &str)] = &[("JETSOURCE__SNAPSHOT__EVERY", "10")];
const REPLICATED: &[(&str, &str)] = &[
    ("JETSOURCE__SNAPSHOT__EVERY", "10"),
    ("JETSOURCE__STORE__REPLICAS", "3"),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn snapshotter_processes_and_cli() {
    let server = NatsServer::start();
    let client = server.client().await;
    snapshotter_processes_and_cli_at(&server.url(), client, SINGLE).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cluster_snapshotter_processes_and_cli() {
    let cluster = NatsCluster::start();
    let client = cluster.client().await;
    snapshotter_processes_and_cli_at(&cluster.urls(), client, REPLICATED).await;
}

async fn snapshotter_processes_and_cli_at(
    url: &str,
    client: async_nats::Client,
    env: &'static [(&'static str, &'static str)],
) {
    let _worker = Process::start_at("jetsource-command", url, env, None);
    let _a = Process::start_at("jetsource-snapshotter", url, env, None);
    let _b = Process::start_at("jetsource-snapshotter", url, env, None);
    wait_for_service(&client, "jetsource-command", 1).await;
    wait_for_service(&client, "jetsource-snapshotter", 2).await;
    let mut sequences = Vec::new();
    for body in std::iter::once(json!({"type": "OpenAccount", "data": {"owner": "o"}}))
        .chain((1..=24).map(|i| json!({"type": "Deposit", "data": {"amount": i}})))
    {
        let reply = client
            .request("cmd.account.c1", body.to_string().into())
            .await
            .unwrap();
        sequences.push(
            decode_reply::<CommandOutcome>(&reply.payload)
                .unwrap()
                .unwrap()
                .sequence,
        );
    }
    // Two copies share the work; the newest snapshot (version 20) wins.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (code, out, err) = cli_at(url, env, &["--json", "snapshot", "status"]);
        assert_eq!(code, 0, "{err}");
        let rows: Vec<Value> = serde_json::from_str(&out).unwrap();
        if rows.first().is_some_and(|r| r["events_behind_max"] == 5) {
            assert_eq!(rows[0]["aggregate_type"], "account");
            assert_eq!(rows[0]["snapshots"], 1);
            assert_eq!(rows[0]["unusable"], 0);
            assert_eq!(rows[0]["every"], 10);
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no snapshot at version 20: {out}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Temporal queries use the snapshot only when it is not past the point.
    // The snapshot is read from any replica of the bucket: one that lags
    // does not have it yet, and the state is then replayed in full.
    loop {
        let (_, out, _) = cli_at(url, env, &["--json", "state", "account", "c1"]);
        let now: Value = serde_json::from_str(&out).unwrap();
        assert_eq!(now["state"]["balance"], 300, "with or without the snapshot");
        if now["snapshot"] == json!({"version": 20}) {
            break;
        }
        assert!(Instant::now() < deadline, "snapshot never used: {now}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let at = sequences[4].to_string();
    let (_, out, _) = cli_at(
        url,
        env,
        &["--json", "state", "account", "c1", "--at-seq", &at],
    );
    let then: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        then["snapshot"],
        json!({"ignored": "newer than the requested point"})
    );
    assert_eq!(then["version"], 5);
    assert_eq!(then["state"]["balance"], 10);

    let (code, out, err) = cli_at(url, env, &["snapshot", "rebuild", "account"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("wrote 1 snapshots"), "{out}");
    assert!(out.contains("(1 aggregates read)"), "{out}");
    assert!(err.is_empty(), "no progress bar off a terminal: {err}");
    let (_, out, _) = cli_at(url, env, &["--json", "snapshot", "status"]);
    let rows: Vec<Value> = serde_json::from_str(&out).unwrap();
    assert_eq!(
        rows[0]["events_behind_max"], 0,
        "rebuilt from the full history"
    );
    let (code, _, err) = cli_at(url, env, &["snapshot", "rebuild", "widget"]);
    assert_ne!(code, 0);
    assert!(err.contains("unknown aggregate type"), "{err}");
}
