//! The chaos run behind `make chaos` (issue 9): the recommended production
//! topology (three nats-server nodes, the event stream at 3 replicas,
//! `sync_interval: always`) with two command workers, two projectors, a
//! snapshotter and Redis, all real processes, under a mixed load from
//! concurrent clients, while a follower node, a command worker, the
//! applying projector, the snapshotter, Redis and the stream leader are
//! killed one after another. Then it checks what must hold whatever
//! happened ([`checks`]) and prints a report ending in one summary line.
//!
//! Everything runs on loopback; every loop has a deadline; every process it
//! starts is stopped by its PID, also when the run fails or panics.

pub mod checks;
pub mod client;
pub mod faults;
pub mod fleet;
pub mod fold;
pub mod load;
pub mod processes;
pub mod progress;
pub mod report;
pub mod stream;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use rand::SeedableRng;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::checks::{Check, ReadModels};
use crate::client::Record;
use crate::faults::{Fault, FaultRecord, Plan};
use crate::fleet::{lock, wait_ready, Fleet, Kind, Stopped};
use crate::fold::Mismatch;
use crate::load::{Ledger, Stats};
use crate::progress::say;
use crate::stream::{Contents, Replica};

/// Settings of one run (the binary's flags).
#[derive(Debug, Clone, clap::Parser)]
#[command(
    version,
    about = "Chaos run: a 3-node R3 cluster, Redis and the worker fleet under load while nodes, workers and Redis are killed; then every check of issue 9."
)]
pub struct Config {
    /// Seed of every random choice (commands, amounts, accounts, the
    /// follower to kill); from the clock when absent. Timing still differs
    /// between runs.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Seconds of load (longer if faults wait for slow recoveries).
    #[arg(long, default_value_t = 180)]
    pub duration_secs: u64,
    /// Concurrent clients, each on its own connection.
    #[arg(long, default_value_t = 32)]
    pub clients: usize,
    /// Accounts the load spreads over.
    #[arg(long, default_value_t = 200)]
    pub accounts: usize,
    /// Seconds between faults (the first comes one interval into the load).
    #[arg(long, default_value_t = 20)]
    pub fault_interval_secs: u64,
    /// Seconds a killed node stays down.
    #[arg(long, default_value_t = 10)]
    pub node_down_secs: u64,
    /// Longest acceptable recovery after a fault, for commands and queries.
    #[arg(long, default_value_t = 30)]
    pub recovery_bound_secs: u64,
    /// Also write the report to this file.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Where logs and the report go; default target/chaos/<time>-seed<seed>.
    #[arg(long)]
    pub run_dir: Option<PathBuf>,
}

/// Everything a run found, for the checks and the report.
#[derive(Debug)]
pub struct Findings {
    pub config: Config,
    pub seed: u64,
    pub run_dir: PathBuf,
    pub load_time: Duration,
    pub stats: Arc<Stats>,
    pub records: Vec<Record>,
    pub faults: Vec<FaultRecord>,
    pub stream: Contents,
    pub replicas: Result<Vec<Replica>, String>,
    pub read_models: ReadModels,
    pub mismatches: Vec<Mismatch>,
    pub stopped: Vec<Stopped>,
    pub checks: Vec<Check>,
}

/// The outcome of a run.
#[derive(Debug)]
pub struct Verdict {
    pub passed: bool,
    /// `chaos: PASS ...` or `chaos: FAIL ...`.
    pub summary: String,
}

/// A seed from the clock, for runs that name none.
pub fn clock_seed() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(1, |d| d.as_nanos() as u64 % 1_000_000)
}

/// Runs everything, prints the report on stdout and returns the verdict.
/// The processes it started are stopped before it returns, whatever happens.
pub async fn run(config: Config, seed: u64) -> anyhow::Result<Verdict> {
    let run_dir = make_run_dir(&config, seed)?;
    say(&format!(
        "chaos: seed {seed}; logs in {}",
        run_dir.display()
    ));
    let fleet = Fleet::start(&run_dir).await?;
    let findings = exercise(&config, seed, &run_dir, &fleet).await;
    fleet.save_server_logs();
    drop(fleet);
    progress::finish();
    let findings = findings?;
    let summary = report::summary(&findings);
    let body = report::render(&findings);
    write_outputs(&config, &findings, &format!("{body}\n{summary}\n"))?;
    println!("{body}");
    Ok(Verdict {
        passed: findings.checks.iter().all(|c| c.passed),
        summary,
    })
}

fn make_run_dir(config: &Config, seed: u64) -> anyhow::Result<PathBuf> {
    let dir = match &config.run_dir {
        Some(dir) => dir.clone(),
        None => default_run_dir(seed)?,
    };
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    Ok(dir.canonicalize().unwrap_or(dir))
}

/// target/chaos/<unix time>-seed<seed>, next to the binaries of this build.
fn default_run_dir(seed: u64) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let target = exe
        .ancestors()
        .find(|p| p.file_name().is_some_and(|n| n == "target"))
        .map(Path::to_path_buf)
        .unwrap_or_else(std::env::temp_dir);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    Ok(target.join("chaos").join(format!("{now}-seed{seed}")))
}

fn write_outputs(config: &Config, f: &Findings, text: &str) -> anyhow::Result<()> {
    std::fs::write(f.run_dir.join("report.md"), text)?;
    if !f.mismatches.is_empty() {
        let all = report::mismatches(f, usize::MAX).to_string();
        std::fs::write(f.run_dir.join("read-model-differences.txt"), all)?;
    }
    if let Some(out) = &config.out {
        std::fs::write(out, text).with_context(|| format!("cannot write {}", out.display()))?;
    }
    Ok(())
}

/// Starts the workers, runs the load with its faults, gathers the evidence
/// and judges it.
async fn exercise(
    config: &Config,
    seed: u64,
    run_dir: &Path,
    fleet: &Fleet,
) -> anyhow::Result<Findings> {
    let within = Duration::from_secs(60);
    // The run's own reads (the stream, the read models) and the accounts'
    // opening go through the operator's role; the load through the
    // client's.
    let as_admin = ("admin", fleet.credentials.password("admin"));
    let admin = client::connect(
        &fleet.nats_urls,
        &fleet.pki.ca,
        "jetsource-chaos",
        as_admin,
        within,
    )
    .await?;
    start_workers(fleet, &admin).await?;
    let stats = Arc::new(Stats::default());
    let ledger: Ledger = Arc::default();
    let parallel = config.clients.max(1);
    say(&format!("opening {} accounts", config.accounts));
    load::open_accounts(&admin, &stats, &ledger, config.accounts, parallel, seed).await;
    let (faults, load_time, load_end) = drive(config, seed, fleet, &admin, &stats, &ledger).await?;
    say("load stopped; waiting for the loyalty process to settle");
    let settled = processes::settle(&admin, Duration::from_secs(60)).await;
    say("reading the stream, the replicas and the read models");
    let stream = stream::read_all(&admin, Duration::from_secs(120)).await?;
    let replicas = replicas(fleet, stream.last_sequence).await;
    let expected = fold::fold(&stream.events);
    let ids: Vec<String> = expected.keys().cloned().collect();
    let read_models =
        checks::query_read_models(&admin, &stats, ids, stream.last_sequence, load_end, within)
            .await;
    let mismatches = checks::mismatches(&expected, &read_models);
    say("stopping the workers (SIGTERM)");
    let stopped = fleet.terminate_all().await;
    // Authorization is on: every role should have had what it needed.
    let violations = fleet.permission_violations();
    say(&format!(
        "permission violations in the servers' logs: {}{}",
        violations.len(),
        violations
            .iter()
            .take(5)
            .map(|v| format!("\n  {v}"))
            .collect::<String>()
    ));
    let records = std::mem::take(&mut *lock(&ledger));
    let trusted = jetsource_core::integrity::TrustedKeys::load(&fleet.keys)?;
    let checks = checks::judge(&checks::Evidence {
        records: &records,
        stream: &stream,
        replicas: &replicas,
        expected: &expected,
        read_models: &read_models,
        mismatches: &mismatches,
        faults: &faults,
        stopped: &stopped,
        stats: &stats,
        recovery_bound: Duration::from_secs(config.recovery_bound_secs),
        settled: &settled,
        trusted: &trusted,
    });
    Ok(Findings {
        config: config.clone(),
        seed,
        run_dir: run_dir.to_owned(),
        load_time,
        stats,
        records,
        faults,
        stream,
        replicas,
        read_models,
        mismatches,
        stopped,
        checks,
    })
}

/// Each node's copy of the stream, once they agree (up to 30 s).
async fn replicas(fleet: &Fleet, last_sequence: u64) -> Result<Vec<Replica>, String> {
    let nodes: Vec<(String, u16)> = fleet
        .monitor_ports()
        .into_iter()
        .enumerate()
        .map(|(i, port)| (fleet.node_name(i), port))
        .collect();
    stream::replicas(&nodes, last_sequence, Duration::from_secs(30)).await
}

/// Two command workers, two projectors, one snapshotter and two process
/// workers (the loyalty process), each answering
/// `$SRV.PING` before the load starts. Workers are started only once the
/// cluster's JetStream answers (a meta leader is elected): before that a
/// worker cannot create the stream and exits.
async fn start_workers(fleet: &Fleet, admin: &async_nats::Client) -> anyhow::Result<()> {
    wait_for_jetstream(admin, Duration::from_secs(60)).await?;
    const FLEET: [(Kind, usize); 4] = [
        (Kind::Command, 2),
        (Kind::Projector, 2),
        (Kind::Snapshotter, 1),
        (Kind::Process, 2),
    ];
    for (kind, n) in FLEET {
        for _ in 0..n {
            fleet.spawn(kind)?;
        }
    }
    for (kind, n) in FLEET {
        anyhow::ensure!(
            wait_ready(admin, kind, n, Duration::from_secs(60)).await,
            "{n} {} did not come up within 60 s (see their logs)",
            kind.binary()
        );
    }
    say("workers up");
    Ok(())
}

async fn wait_for_jetstream(admin: &async_nats::Client, within: Duration) -> anyhow::Result<()> {
    // Short requests: one sent before the meta leader exists gets no answer.
    let js = async_nats::jetstream::ContextBuilder::new()
        .timeout(Duration::from_millis(500))
        .build(admin.clone());
    let deadline = Instant::now() + within;
    while let Err(e) = js.query_account().await {
        anyhow::ensure!(
            Instant::now() < deadline,
            "the cluster's JetStream is not ready after {within:?}: {e}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

/// Runs the load for the configured duration (or until every fault is
/// injected and measured, if later) with the faults alongside; returns the
/// fault records, how long the load ran and when it was told to stop.
async fn drive(
    config: &Config,
    seed: u64,
    fleet: &Fleet,
    admin: &async_nats::Client,
    stats: &Arc<Stats>,
    ledger: &Ledger,
) -> anyhow::Result<(Vec<FaultRecord>, Duration, Instant)> {
    let as_client = ("client", fleet.credentials.password("client"));
    let mut connections = Vec::with_capacity(config.clients);
    for c in 0..config.clients {
        let name = format!("jetsource-chaos-client-{c}");
        connections.push(
            client::connect(
                &fleet.nats_urls,
                &fleet.pki.ca,
                &name,
                as_client,
                Duration::from_secs(30),
            )
            .await?,
        );
    }
    let probe = client::connect(
        &fleet.nats_urls,
        &fleet.pki.ca,
        "jetsource-chaos-probe",
        as_client,
        Duration::from_secs(30),
    )
    .await?;
    let (stop_tx, stop_rx) = watch::channel(false);
    let load_start = Instant::now();
    let duration = Duration::from_secs(config.duration_secs);
    let bar = progress::start(duration, Fault::ALL.len(), stats.clone());
    let clients = load::spawn_clients(
        connections,
        config.accounts,
        seed,
        stats.clone(),
        ledger.clone(),
        stop_rx,
    );
    let env = faults::Env {
        fleet,
        admin,
        probe: &probe,
        stats,
        ledger,
        plan: Plan {
            interval: Duration::from_secs(config.fault_interval_secs),
            node_down: Duration::from_secs(config.node_down_secs),
            recovery_bound: Duration::from_secs(config.recovery_bound_secs),
        },
    };
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed.wrapping_add(7));
    let faults = faults::inject_all(&env, &mut rng, load_start).await;
    tokio::time::sleep_until(load_start + duration).await;
    let _ = stop_tx.send(true);
    let load_end = Instant::now();
    let load_time = load_end - load_start;
    say("stopping the load; waiting for the commands in flight");
    for client in clients {
        // Each returns once its last command is definite or given up
        // (load::RESEND_DEADLINE); a panicked client loses only its records.
        if let Err(e) = client.await {
            say(&format!("a client failed: {e}"));
        }
    }
    bar.abort();
    Ok((faults, load_time, load_end))
}
