//! Snapshots as shipped: `jetsource-snapshotter` processes and the CLI's
//! `snapshot` and `state` commands.

#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use jetsource_core::protocol::{decode_reply, CommandOutcome};
use jetsource_test_support::NatsServer;
use jetsource_tests::{cli_env, wait_for_service, Process};
use serde_json::{json, Value};

const ENV: &[(&str, &str)] = &[("JETSOURCE__SNAPSHOT__EVERY", "10")];

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn snapshotter_processes_and_cli() {
    let server = NatsServer::start();
    let client = server.client().await;
    let _worker = Process::start("jetsource-command", &server, ENV);
    let _a = Process::start("jetsource-snapshotter", &server, ENV);
    let _b = Process::start("jetsource-snapshotter", &server, ENV);
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
        let (code, out, err) = cli_env(&server, ENV, &["--json", "snapshot", "status"]);
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
    let (_, out, _) = cli_env(&server, ENV, &["--json", "state", "account", "c1"]);
    let now: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(now["snapshot"], "Used { version: 20 }");
    assert_eq!(now["state"]["balance"], 300);
    let at = sequences[4].to_string();
    let (_, out, _) = cli_env(
        &server,
        ENV,
        &["--json", "state", "account", "c1", "--at-seq", &at],
    );
    let then: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(then["snapshot"], "TooNew");
    assert_eq!(then["version"], 5);
    assert_eq!(then["state"]["balance"], 10);

    let (code, out, err) = cli_env(&server, ENV, &["snapshot", "rebuild", "account"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("wrote 1 snapshots"), "{out}");
    assert!(err.contains("1/1 aggregates"), "{err}");
    let (_, out, _) = cli_env(&server, ENV, &["--json", "snapshot", "status"]);
    let rows: Vec<Value> = serde_json::from_str(&out).unwrap();
    assert_eq!(
        rows[0]["events_behind_max"], 0,
        "rebuilt from the full history"
    );
    let (code, _, err) = cli_env(&server, ENV, &["snapshot", "rebuild", "widget"]);
    assert_ne!(code, 0);
    assert!(err.contains("unknown aggregate type"), "{err}");
}
