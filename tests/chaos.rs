//! The chaos run's short variant (`make chaos` is the long one): the same
//! topology, faults and checks, with fewer clients and seconds, through the
//! built `jetsource-chaos` binary. Its report is printed, so a failure here
//! says which check failed and why.

#![allow(clippy::unwrap_used)]

use std::process::{Command, Stdio};

#[test]
fn a_short_chaos_run_passes_every_check() {
    let run_dir = tempfile::tempdir().unwrap();
    let output = Command::new(jetsource_test_support::workspace_binary("jetsource-chaos"))
        .args([
            "--seed",
            "20261130",
            "--duration-secs",
            "36",
            "--clients",
            "8",
        ])
        .args([
            "--accounts",
            "50",
            "--fault-interval-secs",
            "6",
            "--node-down-secs",
            "4",
        ])
        .arg("--run-dir")
        .arg(run_dir.path())
        .stderr(Stdio::inherit())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    println!("{stdout}");
    let summary = stdout.lines().last().unwrap_or_default();
    assert!(
        output.status.success() && summary.starts_with("chaos: PASS"),
        "the chaos run failed ({}): {summary}\nlogs: {}",
        output.status,
        run_dir.keep().display()
    );
    assert!(summary.contains("faults=7 checks=12/12"), "{summary}");
}
