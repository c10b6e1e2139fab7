//! The benchmark suite's short variant, so the benchmark itself cannot rot.
//! It asserts that every figure was measured, never how fast it was.

#![allow(clippy::unwrap_used)]

use serde_json::Value;

/// A quick append-suite figure: measured, with a positive rate and p99.
fn assert_measured(s: &Value, what: &str) {
    assert!(
        s["ops_per_sec"].as_f64().is_some_and(|v| v > 0.0),
        "{what}: {s}"
    );
    assert!(s["p99_us"].as_f64().is_some_and(|v| v > 0.0), "{what}: {s}");
}

/// The append suite of one topology and durability, every layer measured.
fn assert_mode_measured(mode: &Value, what: &str) {
    for layer in ["raw", "ideal", "worker"] {
        for c in ["1", "4"] {
            assert_measured(&mode["append"][layer][c], &format!("{what} {layer} {c}"));
        }
    }
    for layer in ["raw", "worker"] {
        assert_measured(
            &mode["multi_event"][layer]["1"],
            &format!("{what} multi-event {layer} 1"),
        );
    }
    assert!(
        mode["command_worker_peak_rss_kb"]
            .as_u64()
            .is_some_and(|kb| kb > 0),
        "{what}: {mode}"
    );
}

/// The whole quick suite, single node and cluster, without the PostgreSQL
/// peer (the test suite does not build it: `make bench-peer`).
#[test]
fn the_quick_benchmark_runs_and_writes_every_figure() {
    let out = tempfile::tempdir().unwrap();
    let run =
        std::process::Command::new(jetsource_test_support::workspace_binary("jetsource-bench"))
            .args(["--quick", "--no-peer", "--out"])
            .arg(out.path())
            .stdout(std::process::Stdio::inherit())
            .stderr(std::process::Stdio::inherit())
            .status()
            .unwrap();
    assert!(run.success());
    let results: Value = serde_json::from_str(
        &std::fs::read_to_string(out.path().join("bench/results.json")).unwrap(),
    )
    .unwrap();
    for mode in ["always", "default"] {
        assert_mode_measured(&results["modes"][mode], &format!("single {mode}"));
        assert_mode_measured(&results["cluster"][mode], &format!("cluster {mode}"));
    }
    let read = &results["read"];
    for key in [
        "raw_replay_events_per_sec",
        "raw_redis_events_per_sec",
        "projector_catch_up_events_per_sec",
        "rebuild_seconds",
        "live_lag_p50_ms",
        "load_without_snapshot_ms",
        "load_with_snapshot_ms",
        "load_sparse_ms",
        "snapshotter_catch_up_seconds",
    ] {
        assert!(read[key].as_f64().is_some_and(|v| v > 0.0), "{key}: {read}");
    }
    assert!(read["projector_peak_rss_kb"].as_u64().unwrap() > 0);
    assert!(results["peer"].is_null(), "{}", results["peer"]);
    assert!(results["peer_synchronous_commit_off"].is_null());
    let md = std::fs::read_to_string(out.path().join("BENCHMARKS.md")).unwrap();
    for section in [
        "## Appends, single node, `sync_interval: always`",
        "## Appends, single node, `sync_interval: default`",
        "## Appends, 3-node R3 cluster, `sync_interval: always`",
        "## Appends, 3-node R3 cluster, `sync_interval: default`",
        "## Read side, single node, `sync_interval` default",
    ] {
        let body = md
            .split(section)
            .nth(1)
            .unwrap_or_else(|| panic!("{section}: {md}"));
        let body = body.split("\n## ").next().unwrap();
        assert!(
            !body.trim_start().starts_with("not run"),
            "{section}: {body}"
        );
    }
    assert!(
        md.contains("worker/ideal") && md.contains("worker/peer"),
        "{md}"
    );
    // Only the peer was skipped, and it says so: in its columns and rows,
    // never as zeros.
    let peer_section = md.split("## PostgreSQL peer").nth(1).unwrap();
    assert!(peer_section.trim_start().starts_with("not run"), "{md}");
    let always = md
        .split("## Appends, single node, `sync_interval: always`")
        .nth(1)
        .unwrap();
    let row = always.lines().find(|l| l.starts_with("| 4 |")).unwrap();
    // peer ops/s, worker/peer, peer latencies
    assert_eq!(row.matches("| not run ").count(), 3, "{row}");
    assert!(md.contains("PostgreSQL peer: not run"), "{md}");
    for plot in [
        "throughput-always.svg",
        "latency-p99-default.svg",
        "throughput-cluster-always.svg",
        "latency-p99-cluster-default.svg",
    ] {
        let svg = std::fs::read_to_string(out.path().join("bench").join(plot)).unwrap();
        assert!(
            svg.starts_with("<svg") && svg.contains("polyline"),
            "{plot}"
        );
    }
}

/// Without --no-peer, a missing peer binary stops the run before anything
/// is measured, and says how to get it.
#[test]
fn the_benchmark_refuses_to_run_without_its_peer() {
    let out = tempfile::tempdir().unwrap();
    let run =
        std::process::Command::new(jetsource_test_support::workspace_binary("jetsource-bench"))
            .args(["--quick", "--peer-binary"])
            .arg(out.path().join("jetsource-bench-peer"))
            .arg("--out")
            .arg(out.path())
            .output()
            .unwrap();
    assert!(!run.status.success());
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(
        stderr.contains("run `make bench-peer` or pass --no-peer"),
        "{stderr}"
    );
    assert!(!out.path().join("BENCHMARKS.md").exists());
}

/// `--nats-url`/`--redis-url`: the suite runs on servers it did not start,
/// and refuses servers that hold data.
#[test]
fn the_benchmark_runs_on_given_empty_servers_and_refuses_used_ones() {
    let nats = jetsource_test_support::NatsServer::start();
    let redis = jetsource_test_support::RedisServer::start();
    let bench = |out: &std::path::Path| {
        std::process::Command::new(jetsource_test_support::workspace_binary("jetsource-bench"))
            .args(["--quick", "--no-peer", "--suite", "read"])
            .args(["--nats-url", &nats.url()])
            .args(["--redis-url", &redis.url(), "--out"])
            .arg(out)
            .output()
            .unwrap()
    };
    let out = tempfile::tempdir().unwrap();
    let run = bench(out.path());
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let results: Value = serde_json::from_str(
        &std::fs::read_to_string(out.path().join("bench/results.json")).unwrap(),
    )
    .unwrap();
    assert!(
        results["read"]["projector_catch_up_events_per_sec"]
            .as_f64()
            .unwrap()
            > 0.0
    );
    assert!(results["machine"]["servers"]
        .as_str()
        .unwrap()
        .starts_with("given"));
    let md = std::fs::read_to_string(out.path().join("BENCHMARKS.md")).unwrap();
    assert!(md.contains("## Read side, given servers"), "{md}");
    // A partial run says what it skipped instead of printing zeros.
    assert!(results["modes"]["given"].is_null(), "{results}");
    assert!(results["cluster"]["always"].is_null(), "{results}");
    assert!(
        md.contains("## Appends, given server (its own `sync_interval`)\n\nnot run"),
        "{md}"
    );
    assert!(
        md.contains("## Appends, 3-node R3 cluster, `sync_interval: always`\n\nnot run"),
        "{md}"
    );
    // The stream it created is still there: a second run is refused, and
    // says why.
    let again = bench(out.path());
    assert!(!again.status.success());
    let stderr = String::from_utf8_lossy(&again.stderr);
    assert!(stderr.contains("already has a stream EVENTS"), "{stderr}");
}
