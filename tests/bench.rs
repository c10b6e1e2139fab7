//! The benchmark suite's short variant, so the benchmark itself cannot rot.
//! It asserts that every figure was measured, never how fast it was.

#![allow(clippy::unwrap_used)]

use serde_json::Value;

#[test]
fn the_quick_benchmark_runs_and_writes_every_figure() {
    let out = tempfile::tempdir().unwrap();
    let status =
        std::process::Command::new(jetsource_test_support::workspace_binary("jetsource-bench"))
            .args(["--quick", "--out"])
            .arg(out.path())
            .status()
            .unwrap();
    assert!(status.success());
    let results: Value = serde_json::from_str(
        &std::fs::read_to_string(out.path().join("bench/results.json")).unwrap(),
    )
    .unwrap();
    for mode in ["always", "default"] {
        for layer in ["raw", "ideal", "worker"] {
            for c in ["1", "4"] {
                let s = &results["modes"][mode]["append"][layer][c];
                assert!(
                    s["ops_per_sec"].as_f64().unwrap() > 0.0,
                    "{mode} {layer} {c}: {s}"
                );
                assert!(
                    s["p99_us"].as_f64().unwrap() > 0.0,
                    "{mode} {layer} {c}: {s}"
                );
            }
        }
        for layer in ["raw", "worker"] {
            assert!(
                results["modes"][mode]["multi_event"][layer]["1"]["ops_per_sec"]
                    .as_f64()
                    .unwrap()
                    > 0.0
            );
        }
        assert!(
            results["modes"][mode]["command_worker_peak_rss_kb"]
                .as_u64()
                .unwrap()
                > 0
        );
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
        "snapshotter_catch_up_seconds",
    ] {
        assert!(read[key].as_f64().unwrap() > 0.0, "{key}: {read}");
    }
    assert!(read["projector_peak_rss_kb"].as_u64().unwrap() > 0);
    let md = std::fs::read_to_string(out.path().join("BENCHMARKS.md")).unwrap();
    assert!(md.contains("## Appends, `sync_interval: always`"));
    assert!(md.contains("worker/ideal"));
    for plot in ["throughput-always.svg", "latency-p99-default.svg"] {
        let svg = std::fs::read_to_string(out.path().join("bench").join(plot)).unwrap();
        assert!(
            svg.starts_with("<svg") && svg.contains("polyline"),
            "{plot}"
        );
    }
}

/// `--nats-url`/`--redis-url`: the suite runs on servers it did not start,
/// and refuses servers that hold data.
#[test]
fn the_benchmark_runs_on_given_empty_servers_and_refuses_used_ones() {
    let nats = jetsource_test_support::NatsServer::start();
    let redis = jetsource_test_support::RedisServer::start();
    let bench = |out: &std::path::Path| {
        std::process::Command::new(jetsource_test_support::workspace_binary("jetsource-bench"))
            .args(["--quick", "--suite", "read", "--nats-url", &nats.url()])
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
    // The stream it created is still there: a second run is refused, and
    // says why.
    let again = bench(out.path());
    assert!(!again.status.success());
    let stderr = String::from_utf8_lossy(&again.stderr);
    assert!(stderr.contains("already has a stream EVENTS"), "{stderr}");
}
