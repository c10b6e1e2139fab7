//! The PostgreSQL peer: `jetsource-bench-peer` (bench/peer, built by `make
//! bench-peer`) runs cqrs-es + postgres-es on its own PostgreSQL with the
//! sizes of this run and prints JSON, which is kept whole in results.json
//! and read here for the report's peer columns.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use anyhow::Context as _;
use serde::{Deserialize, Serialize};

use crate::work::Stats;
use crate::Sizes;

const BINARY: &str = "jetsource-bench-peer";

/// The peer's binary: `given`, else the one beside this executable, where
/// `make bench-peer` puts it (both build into target/release).
pub fn binary(given: Option<&Path>) -> anyhow::Result<PathBuf> {
    let path = match given {
        Some(path) => path.to_owned(),
        None => std::env::current_exe()?
            .parent()
            .context("the executable has no directory")?
            .join(BINARY),
    };
    // Checked before the suites run, so a missing peer costs nothing.
    anyhow::ensure!(
        path.is_file(),
        "the PostgreSQL peer {} is missing: run `make bench-peer` or pass --no-peer (or --peer-binary with its path)",
        path.display()
    );
    Ok(path)
}

/// The peer's flags for the sizes of this run, so that its figures sit
/// beside jetsource's: same clients, operations and accounts; the dense
/// load is the big aggregate; the sparse one has the events of one of the
/// read suite's seeded accounts, spread over the replayed events.
#[derive(Debug)]
pub struct PeerSizes {
    args: Vec<String>,
}

impl PeerSizes {
    pub fn of(sizes: &Sizes, quick: bool) -> Self {
        let concurrency: Vec<String> = sizes.concurrency.iter().map(usize::to_string).collect();
        // The read suite seeds `replay_events` round-robin over `accounts`:
        // account r0 gets every accounts-th event.
        let sparse_events = sizes
            .replay_events
            .div_ceil(sizes.accounts.max(1) as u64)
            .max(1);
        let sparse_table_events = sizes.replay_events.max(sparse_events);
        let mut args = vec![
            "--concurrency".to_owned(),
            concurrency.join(","),
            "--ops".to_owned(),
            sizes.ops.to_string(),
            "--accounts".to_owned(),
            sizes.accounts.to_string(),
            "--load-events".to_owned(),
            sizes.big_aggregate.to_string(),
            "--sparse-events".to_owned(),
            sparse_events.to_string(),
            "--sparse-table-events".to_owned(),
            sparse_table_events.to_string(),
        ];
        if quick {
            args.push("--quick".to_owned());
        }
        Self { args }
    }
}

/// One run of the peer: its JSON as printed, and the figures the report
/// reads from it.
#[derive(Debug, Serialize)]
#[serde(transparent)]
pub struct PeerRun {
    json: serde_json::Value,
    #[serde(skip)]
    pub figures: PeerFigures,
}

/// The parts of the peer's JSON the report shows.
#[derive(Debug, Default, Deserialize)]
pub struct PeerFigures {
    pub peer: String,
    pub postgres: PostgresInfo,
    /// Clients -> `Deposit` commands through cqrs-es; empty with --no-append.
    pub append: BTreeMap<usize, Stats>,
    pub load: Loads,
    pub seconds: f64,
}

#[derive(Debug, Default, Deserialize)]
pub struct PostgresInfo {
    pub version: String,
    pub settings: BTreeMap<String, String>,
}

#[derive(Debug, Default, Deserialize)]
pub struct Loads {
    pub dense: Vec<LoadTiming>,
    pub sparse: Option<LoadTiming>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct LoadTiming {
    pub events: u64,
    pub table_events: u64,
    /// The first load after a restart of PostgreSQL.
    pub first_ms: f64,
    /// Median of the loads after the first.
    pub median_ms: f64,
}

/// Runs the peer to completion. Its progress goes to our stderr as it
/// prints it; its JSON comes on stdout.
pub async fn run(
    binary: &Path,
    sizes: &PeerSizes,
    synchronous_commit: &str,
    append: bool,
    load: bool,
) -> anyhow::Result<PeerRun> {
    eprintln!(
        "== PostgreSQL peer, synchronous_commit {synchronous_commit}{} ==",
        if load { "" } else { ", appends only" }
    );
    let mut command = tokio::process::Command::new(binary);
    command
        .args(&sizes.args)
        .args(["--synchronous-commit", synchronous_commit])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    if !append {
        command.arg("--no-append");
    }
    if !load {
        command.arg("--no-load");
    }
    // spawn, not output(): tokio's output() captures stderr too, and the
    // peer's progress would vanish.
    let output = command
        .spawn()
        .with_context(|| format!("cannot start {}", binary.display()))?
        .wait_with_output()
        .await?;
    anyhow::ensure!(
        output.status.success(),
        "the PostgreSQL peer {} failed ({}); its output is above",
        binary.display(),
        output.status
    );
    let json: serde_json::Value =
        serde_json::from_slice(&output.stdout).context("the peer's output is not JSON")?;
    let figures: PeerFigures =
        serde_json::from_value(json.clone()).context("the peer's JSON lacks figures")?;
    if append {
        anyhow::ensure!(!figures.append.is_empty(), "the peer measured no appends");
    }
    if load {
        anyhow::ensure!(
            !figures.load.dense.is_empty() && figures.load.sparse.is_some(),
            "the peer measured no loads"
        );
    }
    Ok(PeerRun { json, figures })
}
