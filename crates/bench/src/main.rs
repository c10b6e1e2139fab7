//! `jetsource-bench`: the system measured against raw JetStream in the same
//! run, on the same servers, started by the benchmark itself: appends on a
//! single node and on a 3-node cluster with 3 replicas, the read side on a
//! single node, then the PostgreSQL peer (cqrs-es + postgres-es,
//! `jetsource-bench-peer`) on the same workloads.
//!
//! `make bench` runs the full suite and rewrites docs/BENCHMARKS.md and the
//! plots under docs/bench/. `--quick` runs tiny sizes (the test suite uses it
//! with `--no-peer` so the benchmark cannot rot).

mod integrity;
mod peer;
mod plot;
mod report;
mod work;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context as _;
use clap::Parser;
use jetsource_test_support::{NatsCluster, NatsServer, RedisServer, Sync};
use serde::Serialize;

use work::Stats;

#[derive(Debug, Parser)]
#[command(
    about = "Benchmark jetsource against raw JetStream on the same servers, and against its PostgreSQL peer"
)]
struct Args {
    /// Tiny sizes, for the test suite: checks the benchmark runs, measures nothing useful.
    #[arg(long)]
    quick: bool,
    /// Directory for BENCHMARKS.md, results.json and bench/*.svg.
    #[arg(long, default_value = "docs")]
    out: PathBuf,
    /// Durability modes to measure: `always`, `default` or `both`.
    #[arg(long, default_value = "both")]
    durability: String,
    /// Override the number of events replayed by the read-side workloads.
    #[arg(long)]
    replay_events: Option<u64>,
    /// Run against this NATS server instead of starting one (with
    /// --redis-url). It must be empty: the benchmark creates the stream
    /// EVENTS and writes over a million events to it. Its durability is
    /// whatever it is configured with; --durability does not apply.
    #[arg(long, requires = "redis_url")]
    nats_url: Option<String>,
    /// Run against this Redis instead of starting one (with --nats-url). It
    /// must be empty: the raw-Redis baseline ends with FLUSHALL.
    #[arg(long, requires = "nats_url")]
    redis_url: Option<String>,
    /// Which workloads to run: `append`, `read` or `all`. A partial run
    /// writes a partial BENCHMARKS.md; the published one comes from `all`.
    #[arg(long, default_value = "all")]
    suite: String,
    /// Where to run the append suite: `single` (one node), `cluster` (3
    /// nodes, streams with 3 replicas) or `both`. The read suite runs on a
    /// single node.
    #[arg(long, default_value = "both")]
    topology: String,
    /// Skip the PostgreSQL peer (cqrs-es + postgres-es); its cells read
    /// "not run".
    #[arg(long)]
    no_peer: bool,
    /// The peer's binary. Default: jetsource-bench-peer beside this
    /// executable (`make bench-peer` puts it in target/release).
    #[arg(long, env = "JETSOURCE_BENCH_PEER")]
    peer_binary: Option<PathBuf>,
}

/// Workload sizes.
#[derive(Debug, Clone, Serialize)]
pub struct Sizes {
    pub concurrency: Vec<usize>,
    pub ops: usize,
    pub accounts: usize,
    pub batch_concurrency: Vec<usize>,
    pub batch_ops: usize,
    pub replay_events: u64,
    pub big_aggregate: u64,
    pub steady_rate: u64,
    pub steady_seconds: u64,
}

impl Sizes {
    fn full() -> Self {
        Self {
            concurrency: vec![1, 16, 64, 256],
            ops: 20_000,
            accounts: 10_000,
            batch_concurrency: vec![1, 16, 64],
            batch_ops: 2_000,
            replay_events: 1_000_000,
            big_aggregate: 100_000,
            steady_rate: 1_000,
            steady_seconds: 10,
        }
    }

    fn quick() -> Self {
        Self {
            concurrency: vec![1, 4],
            ops: 200,
            accounts: 50,
            batch_concurrency: vec![1, 4],
            batch_ops: 40,
            replay_events: 2_000,
            big_aggregate: 500,
            steady_rate: 200,
            steady_seconds: 1,
        }
    }
}

#[derive(Debug, Default, Serialize)]
struct ModeResults {
    /// layer -> concurrency -> stats
    append: BTreeMap<String, BTreeMap<usize, Stats>>,
    multi_event: BTreeMap<String, BTreeMap<usize, Stats>>,
    /// One-event appends through the store: variant -> clients -> stats
    /// (`integrity::VARIANTS`).
    integrity: BTreeMap<String, BTreeMap<usize, Stats>>,
    /// CPU µs per event: `link`, `sign`, `verify` (`integrity::cpu_costs`).
    integrity_cpu_us: BTreeMap<String, f64>,
    command_worker_peak_rss_kb: u64,
    /// Whether the worker ran with `store.group_commit`.
    worker_group_commit: bool,
}

/// The read suite's figures, all measured in one go: the suite either ran
/// whole (`Results::read` is `Some`) or not at all.
#[derive(Debug, Default, Serialize)]
struct ReadResults {
    events: u64,
    raw_replay_events_per_sec: f64,
    raw_redis_events_per_sec: f64,
    projector_catch_up_events_per_sec: f64,
    projector_catch_up_seconds: f64,
    rebuild_seconds: f64,
    live_lag_p50_ms: f64,
    live_lag_p99_ms: f64,
    snapshotter_catch_up_seconds: f64,
    big_aggregate_events: u64,
    load_without_snapshot_ms: f64,
    load_with_snapshot_ms: f64,
    load_with_snapshot_tail_100_ms: f64,
    sparse_events: u64,
    load_sparse_ms: f64,
    /// Another aggregate of the same shape, once the snapshotter has caught
    /// up (its `snapshot.max_tail_sequences` bounds what a load reads).
    load_sparse_after_snapshotter_ms: f64,
    snapshots_written: u64,
    projector_peak_rss_kb: u64,
    snapshotter_peak_rss_kb: u64,
}

/// Everything a run measured. What it skipped is `null`, so that the
/// report says "not run" instead of printing zeros; a mode missing from a
/// map does not apply to the run (`given` when the benchmark started its
/// own servers, `always`/`default` on given ones).
#[derive(Debug, Serialize)]
struct Results {
    sizes: Sizes,
    /// Single node: `always` and `default`, or `given` for --nats-url.
    modes: BTreeMap<String, Option<ModeResults>>,
    /// 3-node cluster, streams with 3 replicas: `always` and `default`.
    cluster: BTreeMap<String, Option<ModeResults>>,
    read: Option<ReadResults>,
    /// The PostgreSQL peer's own JSON, `synchronous_commit on`.
    peer: Option<peer::PeerRun>,
    /// The peer's appends with `synchronous_commit off`, beside `default`.
    peer_synchronous_commit_off: Option<peer::PeerRun>,
    machine: BTreeMap<String, String>,
    command: String,
}

/// What this run measures, decided from the flags before anything starts.
struct Plan {
    durabilities: Vec<Sync>,
    single: bool,
    cluster: bool,
    append: bool,
    read: bool,
    /// Path of jetsource-bench-peer when the peer runs.
    peer: Option<PathBuf>,
}

impl Plan {
    fn from(args: &Args) -> anyhow::Result<Self> {
        let durabilities = match args.durability.as_str() {
            "always" => vec![Sync::Always],
            "default" => vec![Sync::Default],
            "both" => vec![Sync::Always, Sync::Default],
            other => anyhow::bail!("--durability {other:?}: use always, default or both"),
        };
        let (append, read) = match args.suite.as_str() {
            "all" => (true, true),
            "append" => (true, false),
            "read" => (false, true),
            other => anyhow::bail!("--suite {other:?}: use append, read or all"),
        };
        let (single, cluster) = match args.topology.as_str() {
            "single" => (true, false),
            "cluster" => (false, true),
            "both" => (true, true),
            other => anyhow::bail!("--topology {other:?}: use single, cluster or both"),
        };
        // Given servers are one node the benchmark did not start: it cannot
        // make a cluster of them.
        anyhow::ensure!(
            args.nats_url.is_none() || single,
            "--topology cluster needs servers the benchmark starts itself; drop --nats-url"
        );
        let mut plan = Self {
            durabilities,
            single,
            cluster: cluster && args.nats_url.is_none(),
            append,
            read,
            peer: None,
        };
        if !args.no_peer && (plan.peer_on() || plan.peer_off()) {
            plan.peer = Some(peer::binary(args.peer_binary.as_deref())?);
        }
        Ok(plan)
    }

    fn measures(&self, sync: Sync) -> bool {
        self.durabilities.contains(&sync)
    }

    /// The peer at `synchronous_commit on` is compared with the single
    /// node's `always` appends and with the cold loads.
    fn peer_on(&self) -> bool {
        self.peer_appends_on() || self.read
    }

    fn peer_appends_on(&self) -> bool {
        self.append && self.single && self.measures(Sync::Always)
    }

    /// The peer at `synchronous_commit off`, appends only, is compared with
    /// the single node's `default` appends.
    fn peer_off(&self) -> bool {
        self.append && self.single && self.measures(Sync::Default)
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let plan = Plan::from(&args)?;
    let mut sizes = if args.quick {
        Sizes::quick()
    } else {
        Sizes::full()
    };
    if let Some(n) = args.replay_events {
        sizes.replay_events = n;
    }
    let started = Instant::now();
    let mut results = Results {
        sizes: sizes.clone(),
        modes: BTreeMap::new(),
        // Filled by the cluster runs; `null` when they do not happen (given
        // servers, --topology single).
        cluster: ["always", "default"].map(|m| (m.to_owned(), None)).into(),
        read: None,
        peer: None,
        peer_synchronous_commit_off: None,
        machine: machine(),
        command: std::env::args().collect::<Vec<_>>().join(" "),
    };
    if let (Some(nats_url), Some(redis_url)) = (&args.nats_url, &args.redis_url) {
        run_given(nats_url, redis_url, &plan, &sizes, &mut results).await?;
    } else {
        run_started(&plan, &sizes, &mut results).await?;
    }
    // After the suites, never beside them: the machine has few cores and
    // the peer's PostgreSQL would compete with nats-server for them.
    if let Some(binary) = &plan.peer {
        let peer_sizes = peer::PeerSizes::of(&sizes, args.quick);
        if plan.peer_on() {
            let loads = plan.read;
            let appends = plan.peer_appends_on();
            results.peer = Some(peer::run(binary, &peer_sizes, "on", appends, loads).await?);
        }
        if plan.peer_off() {
            results.peer_synchronous_commit_off =
                Some(peer::run(binary, &peer_sizes, "off", true, false).await?);
        }
    }
    report::write_outputs(&args.out, &results).context("writing results")?;
    eprintln!(
        "done in {:.0}s; results in {}",
        started.elapsed().as_secs_f64(),
        args.out.display()
    );
    Ok(())
}

/// The suites on servers given with --nats-url/--redis-url.
async fn run_given(
    nats_url: &str,
    redis_url: &str,
    plan: &Plan,
    sizes: &Sizes,
    results: &mut Results,
) -> anyhow::Result<()> {
    ensure_empty(nats_url, redis_url).await?;
    results
        .machine
        .insert("servers".into(), format!("given: {nats_url}, {redis_url}"));
    let mut given = None;
    if plan.append {
        eprintln!("== append, given server ==");
        given = Some(work::append_suite(nats_url, 1, true, sizes).await?);
    }
    results.modes.insert("given".into(), given);
    if plan.read {
        eprintln!("== read side (projector, snapshots), given servers ==");
        results.read = Some(work::read_suite(nats_url, redis_url, sizes).await?);
    }
    Ok(())
}

/// The suites on servers the benchmark starts: a single node, a 3-node
/// cluster, one after the other (each stops before the next starts).
async fn run_started(plan: &Plan, sizes: &Sizes, results: &mut Results) -> anyhow::Result<()> {
    for sync in [Sync::Always, Sync::Default] {
        let name = mode_name(sync);
        let mut measured = None;
        if plan.append && plan.single && plan.measures(sync) {
            eprintln!("== append, single node, sync {name} ==");
            let server = NatsServer::start_with(sync);
            // As jetsource.example.toml advises: group commit pays where
            // every write is synced; a single node with the default
            // interval stages each batch on disk, slower than plain appends.
            let group_commit = sync == Sync::Always;
            measured = Some(work::append_suite(&server.url(), 1, group_commit, sizes).await?);
        }
        results.modes.insert(name.to_owned(), measured);
    }
    for sync in [Sync::Always, Sync::Default] {
        let name = mode_name(sync);
        let mut measured = None;
        if plan.append && plan.cluster && plan.measures(sync) {
            eprintln!("== append, 3-node cluster, replicas 3, sync {name} ==");
            let cluster = NatsCluster::start_with(sync);
            measured = Some(work::append_suite(&cluster.urls(), 3, true, sizes).await?);
        }
        results.cluster.insert(name.to_owned(), measured);
    }
    if plan.read {
        eprintln!("== read side (projector, snapshots), sync default ==");
        let server = NatsServer::start_with(Sync::Default);
        let redis = RedisServer::start();
        results.read = Some(work::read_suite(&server.url(), &redis.url(), sizes).await?);
    }
    Ok(())
}

/// Refuses servers that hold data: the benchmark writes a million events
/// and flushes Redis.
async fn ensure_empty(nats_url: &str, redis_url: &str) -> anyhow::Result<()> {
    let client = work::connect(nats_url).await?;
    let js = async_nats::jetstream::new(client);
    if js.get_stream("EVENTS").await.is_ok() {
        anyhow::bail!(
            "{nats_url} already has a stream EVENTS; the benchmark needs an empty server (it writes over a million events)"
        );
    }
    let mut con = redis::Client::open(redis_url)?
        .get_multiplexed_async_connection()
        .await
        .with_context(|| format!("cannot connect to Redis at {redis_url}"))?;
    let keys: u64 = redis::cmd("DBSIZE").query_async(&mut con).await?;
    anyhow::ensure!(
        keys == 0,
        "{redis_url} holds {keys} keys; the benchmark needs an empty Redis (it ends with FLUSHALL)"
    );
    Ok(())
}

fn mode_name(sync: Sync) -> &'static str {
    match sync {
        Sync::Always => "always",
        Sync::Default => "default",
    }
}

fn machine() -> BTreeMap<String, String> {
    let mut m = BTreeMap::new();
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .unwrap_or("unknown")
        .trim()
        .to_owned();
    m.insert("cpu".into(), model);
    m.insert(
        "cores".into(),
        std::thread::available_parallelism()
            .map_or(0, |n| n.get())
            .to_string(),
    );
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    if let Some(total) = meminfo.lines().find(|l| l.starts_with("MemTotal")) {
        m.insert(
            "memory".into(),
            total.trim_start_matches("MemTotal:").trim().to_owned(),
        );
    }
    let version = |cmd: &Path, arg: &str| {
        std::process::Command::new(cmd)
            .arg(arg)
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
            .unwrap_or_else(|_| "unknown".into())
    };
    m.insert(
        "nats-server".into(),
        version(&jetsource_test_support::nats_server_binary(), "--version"),
    );
    m.insert(
        "redis-server".into(),
        version(Path::new("redis-server"), "--version"),
    );
    m.insert("jetsource".into(), env!("CARGO_PKG_VERSION").into());
    m.insert(
        "profile".into(),
        if cfg!(debug_assertions) {
            "debug"
        } else {
            "release"
        }
        .into(),
    );
    m
}
