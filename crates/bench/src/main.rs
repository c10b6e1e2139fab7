//! `jetsource-bench`: the system measured against raw JetStream in the same
//! run, on the same servers, started by the benchmark itself.
//!
//! `make bench` runs the full suite and rewrites docs/BENCHMARKS.md and the
//! plots under docs/bench/. `--quick` runs tiny sizes (the test suite uses it
//! so the benchmark cannot rot).

mod plot;
mod work;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use clap::Parser;
use jetsource_test_support::{NatsServer, RedisServer, Sync};
use serde::Serialize;

use work::{Layer, Stats};

#[derive(Debug, Parser)]
#[command(about = "Benchmark jetsource against raw JetStream on the same servers")]
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
    command_worker_peak_rss_kb: u64,
}

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
    projector_peak_rss_kb: u64,
    snapshotter_peak_rss_kb: u64,
}

#[derive(Debug, Serialize)]
struct Results {
    sizes: Sizes,
    modes: BTreeMap<String, ModeResults>,
    read: ReadResults,
    machine: BTreeMap<String, String>,
    command: String,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let mut sizes = if args.quick {
        Sizes::quick()
    } else {
        Sizes::full()
    };
    if let Some(n) = args.replay_events {
        sizes.replay_events = n;
    }
    let modes: Vec<Sync> = match args.durability.as_str() {
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
    let modes = if append { modes } else { Vec::new() };
    let started = Instant::now();
    let mut results = Results {
        sizes: sizes.clone(),
        modes: BTreeMap::new(),
        read: ReadResults::default(),
        machine: machine(),
        command: std::env::args().collect::<Vec<_>>().join(" "),
    };
    if let (Some(nats_url), Some(redis_url)) = (&args.nats_url, &args.redis_url) {
        ensure_empty(nats_url, redis_url).await?;
        results
            .machine
            .insert("servers".into(), format!("given: {nats_url}, {redis_url}"));
        if append {
            eprintln!("== append, given server ==");
            results
                .modes
                .insert("given".into(), work::append_suite(nats_url, &sizes).await?);
        }
        if read {
            eprintln!("== read side (projector, snapshots), given servers ==");
            results.read = work::read_suite(nats_url, redis_url, &sizes).await?;
        }
    } else {
        for sync in modes {
            let name = mode_name(sync);
            eprintln!("== append, sync {name} ==");
            let server = NatsServer::start_with(sync);
            results.modes.insert(
                name.to_owned(),
                work::append_suite(&server.url(), &sizes).await?,
            );
        }
        if read {
            eprintln!("== read side (projector, snapshots), sync default ==");
            let server = NatsServer::start_with(Sync::Default);
            let redis = RedisServer::start();
            results.read = work::read_suite(&server.url(), &redis.url(), &sizes).await?;
        }
    }
    write_outputs(&args.out, &results).context("writing results")?;
    eprintln!(
        "done in {:.0}s; results in {}",
        started.elapsed().as_secs_f64(),
        args.out.display()
    );
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

fn ratio(a: f64, b: f64) -> String {
    if b > 0.0 {
        format!("{:.2}", a / b)
    } else {
        "-".into()
    }
}

fn write_outputs(out: &Path, results: &Results) -> anyhow::Result<()> {
    let plots = out.join("bench");
    std::fs::create_dir_all(&plots)?;
    std::fs::write(
        plots.join("results.json"),
        serde_json::to_string_pretty(results)?,
    )?;
    let mut md = String::new();
    md.push_str(
        "# Benchmarks\n\nGenerated by `jetsource-bench` (`make bench`); do not edit by hand. ",
    );
    md.push_str("The analysis and what was tried live in [bench/NOTES.md](bench/NOTES.md).\n\n");
    md.push_str(&format!("Command: `{}`\n\n", results.command));
    md.push_str("| machine | |\n|---|---|\n");
    for (k, v) in &results.machine {
        md.push_str(&format!("| {k} | {v} |\n"));
    }
    md.push_str(&format!(
        "\nSizes: {} operations per layer and concurrency over {} accounts; {} events for replay; an aggregate of {} events for loading.\n",
        results.sizes.ops, results.sizes.accounts, results.sizes.replay_events, results.sizes.big_aggregate
    ));
    md.push_str("\nLayers: **raw** = JetStream publish with `Nats-Expected-Last-Subject-Sequence` and the same headers as a real event, from the benchmark; **ideal** = a bare request-reply responder inside the benchmark that appends with the expected sequence and replies (the floor under any command worker); **worker** = real `Deposit` commands through a `jetsource-command` process.\n");
    for (mode, r) in &results.modes {
        if mode == "given" {
            md.push_str("\n## Appends, given server (its own `sync_interval`)\n\n");
        } else {
            md.push_str(&format!("\n## Appends, `sync_interval: {mode}`\n\n"));
        }
        md.push_str("| clients | raw ops/s | ideal ops/s | worker ops/s | worker/ideal | raw p50/p99/p999 µs | ideal p50/p99/p999 µs | worker p50/p99/p999 µs | worker p99 / ideal p99 |\n|---|---|---|---|---|---|---|---|---|\n");
        let get = |layer: Layer, c: usize| {
            r.append
                .get(layer.name())
                .and_then(|m| m.get(&c))
                .cloned()
                .unwrap_or_default()
        };
        let mut xs = Vec::new();
        let mut tput: Vec<(String, Vec<f64>)> = Layer::ALL
            .iter()
            .map(|l| (l.name().to_owned(), Vec::new()))
            .collect();
        let mut p99: Vec<(String, Vec<f64>)> = Layer::ALL
            .iter()
            .map(|l| (format!("{} p99", l.name()), Vec::new()))
            .collect();
        for &c in &results.sizes.concurrency {
            let (raw, ideal, worker) = (
                get(Layer::Raw, c),
                get(Layer::Ideal, c),
                get(Layer::Worker, c),
            );
            md.push_str(&format!(
                "| {c} | {:.0} | {:.0} | {:.0} | {} | {} | {} | {} | {} |\n",
                raw.ops_per_sec,
                ideal.ops_per_sec,
                worker.ops_per_sec,
                ratio(worker.ops_per_sec, ideal.ops_per_sec),
                raw.latencies(),
                ideal.latencies(),
                worker.latencies(),
                ratio(worker.p99_us, ideal.p99_us),
            ));
            xs.push(c.to_string());
            for (k, s) in [raw, ideal, worker].iter().enumerate() {
                tput[k].1.push(s.ops_per_sec);
                p99[k].1.push(s.p99_us);
            }
        }
        std::fs::write(
            plots.join(format!("throughput-{mode}.svg")),
            plot::line_chart(
                &format!("Appends per second, sync {mode}"),
                "concurrent clients",
                "ops/s",
                &xs,
                &tput,
            ),
        )?;
        std::fs::write(
            plots.join(format!("latency-p99-{mode}.svg")),
            plot::line_chart(
                &format!("p99 latency, sync {mode}"),
                "concurrent clients",
                "µs",
                &xs,
                &p99,
            ),
        )?;
        md.push_str(&format!(
            "\n![throughput](bench/throughput-{mode}.svg)\n![p99 latency](bench/latency-p99-{mode}.svg)\n"
        ));
        md.push_str("\nAtomic multi-event commands (`OpenAccount` with `initial_deposit`: 2 events in one JetStream atomic batch) against a raw 2-message atomic batch:\n\n");
        md.push_str("| clients | raw batch ops/s | worker ops/s | worker/raw | raw p50/p99/p999 µs | worker p50/p99/p999 µs |\n|---|---|---|---|---|---|\n");
        for &c in &results.sizes.batch_concurrency {
            let raw = r
                .multi_event
                .get("raw")
                .and_then(|m| m.get(&c))
                .cloned()
                .unwrap_or_default();
            let worker = r
                .multi_event
                .get("worker")
                .and_then(|m| m.get(&c))
                .cloned()
                .unwrap_or_default();
            md.push_str(&format!(
                "| {c} | {:.0} | {:.0} | {} | {} | {} |\n",
                raw.ops_per_sec,
                worker.ops_per_sec,
                ratio(worker.ops_per_sec, raw.ops_per_sec),
                raw.latencies(),
                worker.latencies()
            ));
        }
        md.push_str(&format!(
            "\nPeak RSS of `jetsource-command`: {:.1} MB\n",
            r.command_worker_peak_rss_kb as f64 / 1024.0
        ));
    }
    let rd = &results.read;
    let given = results.machine.contains_key("servers");
    md.push_str(if given {
        "\n## Read side, given servers\n\n"
    } else {
        "\n## Read side, `sync_interval` default\n\n"
    });
    md.push_str("| measure | value | baseline | ratio |\n|---|---|---|---|\n");
    md.push_str(&format!(
        "| projector catch-up on {} events | {:.0} events/s ({:.1} s) | raw ordered-consumer replay {:.0} events/s | {} |\n",
        rd.events,
        rd.projector_catch_up_events_per_sec,
        rd.projector_catch_up_seconds,
        rd.raw_replay_events_per_sec,
        ratio(rd.projector_catch_up_events_per_sec, rd.raw_replay_events_per_sec)
    ));
    md.push_str(&format!(
        "| projector catch-up, against Redis alone | {:.0} events/s | raw Redis: the read model's own writes, plain pipelined commands, {:.0} events/s | {} |\n",
        rd.projector_catch_up_events_per_sec,
        rd.raw_redis_events_per_sec,
        ratio(rd.projector_catch_up_events_per_sec, rd.raw_redis_events_per_sec)
    ));
    md.push_str(&format!(
        "| rebuild of `accounts` (blue/green) | {:.1} s | | |\n| live lag, append to visible read model, at {} commands/s | p50 {:.1} ms, p99 {:.1} ms | | |\n",
        rd.rebuild_seconds, results.sizes.steady_rate, rd.live_lag_p50_ms, rd.live_lag_p99_ms
    ));
    md.push_str(&format!(
        "| snapshotter catch-up on {} events | {:.1} s | | |\n",
        rd.events, rd.snapshotter_catch_up_seconds
    ));
    md.push_str(&format!(
        "| load an aggregate of {} events | without snapshot {:.2} ms; with snapshot {:.2} ms; snapshot + 100-event tail {:.2} ms | | {} |\n",
        rd.big_aggregate_events,
        rd.load_without_snapshot_ms,
        rd.load_with_snapshot_ms,
        rd.load_with_snapshot_tail_100_ms,
        ratio(rd.load_without_snapshot_ms, rd.load_with_snapshot_ms)
    ));
    md.push_str(&format!(
        "| load an aggregate of {} events spread over {} (no snapshot) | {:.1} ms | | |\n",
        rd.sparse_events, rd.events, rd.load_sparse_ms
    ));
    md.push_str(&format!(
        "| peak RSS | projector {:.1} MB, snapshotter {:.1} MB | | |\n",
        rd.projector_peak_rss_kb as f64 / 1024.0,
        rd.snapshotter_peak_rss_kb as f64 / 1024.0
    ));
    md.push_str("\nRaw numbers: [bench/results.json](bench/results.json).\n");
    std::fs::write(out.join("BENCHMARKS.md"), md)?;
    let _ = Duration::ZERO;
    Ok(())
}
