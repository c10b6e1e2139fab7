//! The workloads, shaped like jetsource-bench's (crates/bench/src/work.rs):
//! `Stats`, `drive`, `measure` and `account_of` are the same definitions, so
//! the numbers of both binaries mean the same thing and can be divided.

use std::fmt::Write;
use std::future::Future;
use std::io::IsTerminal as _;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use cqrs_es::persist::PersistedEventStore;
use cqrs_es::EventStore as _;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressState, ProgressStyle};
use postgres_es::PostgresEventRepository;
use serde::Serialize;
use sqlx::{PgPool, Postgres};

use crate::account::{Account, EVENT_VERSION};

/// Throughput and latency percentiles of one measured run, with the fields
/// of jetsource-bench's `Stats`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Stats {
    pub ops: usize,
    pub seconds: f64,
    pub ops_per_sec: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
}

impl Stats {
    fn from(mut latencies: Vec<Duration>, elapsed: Duration) -> Self {
        latencies.sort();
        let pick = |q: f64| {
            latencies
                .get(((latencies.len() as f64 * q) as usize).min(latencies.len().saturating_sub(1)))
                .map_or(0.0, |d| d.as_secs_f64() * 1e6)
        };
        Self {
            ops: latencies.len(),
            seconds: elapsed.as_secs_f64(),
            ops_per_sec: latencies.len() as f64 / elapsed.as_secs_f64().max(1e-9),
            p50_us: pick(0.50),
            p99_us: pick(0.99),
            p999_us: pick(0.999),
        }
    }

    pub fn latencies(&self) -> String {
        format!("{:.0}/{:.0}/{:.0}", self.p50_us, self.p99_us, self.p999_us)
    }
}

/// `phase: done/total, rate, ETA` on stderr: a live bar on a terminal;
/// elsewhere (a log, the main benchmark's pipe) the line jetsource-bench
/// prints, once a second. Cleared when dropped.
pub struct Progress {
    bar: ProgressBar,
    printer: Option<tokio::task::JoinHandle<()>>,
}

impl std::fmt::Debug for Progress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Progress")
            .field("position", &self.bar.position())
            .finish()
    }
}

impl Progress {
    pub fn start(phase: &str, total: u64) -> Self {
        if std::io::stderr().is_terminal() {
            let bar = ProgressBar::new(total).with_prefix(phase.to_owned());
            if let Ok(style) =
                ProgressStyle::with_template("  {prefix}: {bar:30} {pos}/{len}  {rate}  ETA {eta}")
            {
                // indicatif's own {per_sec} prints four decimals.
                bar.set_style(style.with_key(
                    "rate",
                    |state: &ProgressState, w: &mut dyn Write| {
                        let _ = write!(w, "{:.0}/s", state.per_sec());
                    },
                ));
            }
            bar.enable_steady_tick(Duration::from_millis(250));
            return Self { bar, printer: None };
        }
        let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::hidden());
        let (counter, phase) = (bar.clone(), phase.to_owned());
        let started = Instant::now();
        let printer = tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            tick.tick().await;
            loop {
                tick.tick().await;
                let done = counter.position();
                let rate = done as f64 / started.elapsed().as_secs_f64();
                let eta = total.saturating_sub(done) as f64 / rate.max(1e-9);
                eprintln!("  {phase}: {done}/{total}  {rate:.0}/s  ETA {eta:.0}s");
            }
        });
        Self {
            bar,
            printer: Some(printer),
        }
    }

    pub fn inc(&self, n: u64) {
        self.bar.inc(n);
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.bar.finish_and_clear();
        if let Some(printer) = &self.printer {
            printer.abort();
        }
    }
}

/// Runs `ops` operations from `clients` concurrent clients; `op(client, k)`.
/// Each client runs its operations one after another, as a caller awaiting
/// each command would.
pub async fn drive<F, Fut>(phase: &str, clients: usize, ops: usize, op: F) -> anyhow::Result<Stats>
where
    F: Fn(usize, usize) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = anyhow::Result<()>> + Send + 'static,
{
    let ops = ops.max(clients);
    let progress = Arc::new(Progress::start(phase, ops as u64));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for client in 0..clients {
        let op = op.clone();
        let progress = progress.clone();
        // The remainder goes to the first clients: exactly `ops` in all.
        let per = ops / clients + usize::from(client < ops % clients);
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::with_capacity(per);
            for k in 0..per {
                let t = Instant::now();
                op(client, k).await?;
                latencies.push(t.elapsed());
                progress.inc(1);
            }
            anyhow::Ok(latencies)
        }));
    }
    let mut all = Vec::with_capacity(ops);
    for t in tasks {
        all.extend(t.await??);
    }
    Ok(Stats::from(all, started.elapsed()))
}

/// A warm-up of a tenth of the operations, then the measured run, as
/// jetsource-bench's `measure` (its worker layer, too, warms up on the same
/// accounts it then measures).
pub async fn measure<F, Fut>(
    phase: &str,
    clients: usize,
    ops: usize,
    op: F,
) -> anyhow::Result<Stats>
where
    F: Fn(usize, usize) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = anyhow::Result<()>> + Send + 'static,
{
    drive(
        &format!("{phase} warm-up"),
        clients,
        (ops / 10).max(clients),
        op.clone(),
    )
    .await?;
    let stats = drive(phase, clients, ops, op).await?;
    eprintln!(
        "  {phase}: {:.0} ops/s, p50/p99/p999 {} µs",
        stats.ops_per_sec,
        stats.latencies()
    );
    Ok(stats)
}

/// The account a client uses for its k-th operation: clients own disjoint
/// accounts, so the figures measure throughput, not contention.
pub fn account_of(client: usize, clients: usize, accounts: usize, k: usize) -> usize {
    let owned = accounts.saturating_sub(client).div_ceil(clients).max(1);
    (client + (k % owned) * clients) % accounts.max(1)
}

/// The tables of postgres-es (its db/init.sql), without the view table and
/// test rows.
pub const SCHEMA: [&str; 2] = [
    "CREATE TABLE IF NOT EXISTS events (
        aggregate_type text NOT NULL,
        aggregate_id text NOT NULL,
        sequence bigint CHECK (sequence >= 0) NOT NULL,
        event_type text NOT NULL,
        event_version text NOT NULL,
        payload json NOT NULL,
        metadata json NOT NULL,
        PRIMARY KEY (aggregate_type, aggregate_id, sequence)
    )",
    "CREATE TABLE IF NOT EXISTS snapshots (
        aggregate_type text NOT NULL,
        aggregate_id text NOT NULL,
        last_sequence bigint CHECK (last_sequence >= 0) NOT NULL,
        current_snapshot bigint CHECK (current_snapshot >= 0) NOT NULL,
        payload json NOT NULL,
        PRIMARY KEY (aggregate_type, aggregate_id, last_sequence)
    )",
];

/// Writes `count` events straight into the events table with COPY (set-up,
/// not measured): the `i`-th row belongs to aggregate `<prefix><i %
/// aggregates>`, so each aggregate's events are spread evenly over the
/// table, as jetsource-bench's `seed` spreads them over the stream. Each
/// aggregate starts with `AccountOpened`, then `Deposited { amount: 1 }`:
/// the rows postgres-es itself writes for those commands.
pub async fn seed(
    pool: &PgPool,
    prefix: &str,
    aggregates: u64,
    count: u64,
    phase: &str,
) -> anyhow::Result<()> {
    const CHUNK: usize = 1 << 20;
    let progress = Progress::start(phase, count);
    let mut conn = pool.acquire().await?;
    let mut copy = conn
        .copy_in_raw(
            "COPY events (aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata) FROM STDIN",
        )
        .await?;
    let mut buf = String::with_capacity(CHUNK + 256);
    let mut pending = 0;
    for i in 0..count {
        let (aggregate, sequence) = (i % aggregates, i / aggregates + 1);
        let (event_type, payload) = if sequence == 1 {
            ("AccountOpened", r#"{"AccountOpened":{"owner":"bench"}}"#)
        } else {
            ("Deposited", r#"{"Deposited":{"amount":1}}"#)
        };
        buf.push_str(&format!(
            "account\t{prefix}{aggregate}\t{sequence}\t{event_type}\t{EVENT_VERSION}\t{payload}\t{{}}\n"
        ));
        pending += 1;
        if buf.len() >= CHUNK {
            copy.send(buf.as_bytes()).await?;
            buf.clear();
            progress.inc(pending);
            pending = 0;
        }
    }
    copy.send(buf.as_bytes()).await?;
    copy.finish().await?;
    progress.inc(pending);
    // What autovacuum would do soon after such a load: statistics for the
    // planner, and the dirty pages written out before anything is timed.
    sqlx::query("VACUUM ANALYZE events").execute(pool).await?;
    sqlx::query("CHECKPOINT").execute(pool).await?;
    Ok(())
}

/// Timings of loading one aggregate without a snapshot.
#[derive(Debug, Clone, Default, Serialize)]
pub struct LoadTiming {
    /// Events of the loaded aggregate.
    pub events: u64,
    /// Events in the table at the time.
    pub table_events: u64,
    /// The first load after a restart of PostgreSQL: its buffer cache is
    /// empty, the operating system's file cache is not (as for
    /// jetsource-bench's load right after seeding).
    pub first_ms: f64,
    /// Median of the loads after the first.
    pub median_ms: f64,
}

/// Rebuilds aggregate `id` (`events` events, `table_events` in the table)
/// the way `CqrsFramework::execute` does before every command: postgres-es'
/// `PersistedEventStore` in event-store mode selects all its rows and cqrs-es
/// applies them. Restarts PostgreSQL first, see `LoadTiming::first_ms`.
pub async fn time_load(
    pg: &mut crate::postgres::Postgres,
    id: &str,
    events: u64,
    table_events: u64,
    repeats: usize,
) -> anyhow::Result<LoadTiming> {
    pg.restart()?;
    let pool = sqlx::pool::PoolOptions::<Postgres>::new()
        .max_connections(1)
        .connect(&pg.url())
        .await
        .context("cannot connect to PostgreSQL after its restart")?;
    let store = PersistedEventStore::<PostgresEventRepository, Account>::new_event_store(
        PostgresEventRepository::new(pool.clone()),
    );
    // The connection's first query prepares the statement and fills the
    // catalog caches: not part of loading the aggregate.
    store.load_aggregate("not-there").await?;
    let mut samples = Vec::with_capacity(repeats + 1);
    for _ in 0..=repeats {
        let t = Instant::now();
        let loaded = store.load_aggregate(id).await?;
        samples.push(t.elapsed());
        anyhow::ensure!(
            loaded.current_sequence as u64 == events
                && loaded.aggregate.opened
                && loaded.aggregate.balance == events - 1,
            "{id}: loaded {} events, balance {}; expected {events} events",
            loaded.current_sequence,
            loaded.aggregate.balance
        );
    }
    pool.close().await;
    let first = samples.remove(0);
    samples.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let timing = LoadTiming {
        events,
        table_events,
        first_ms: ms(first),
        median_ms: samples.get(samples.len() / 2).map_or(ms(first), |d| ms(*d)),
    };
    eprintln!(
        "  load {events} events of one aggregate ({table_events} in the table): first {:.1} ms, median {:.1} ms",
        timing.first_ms, timing.median_ms
    );
    Ok(timing)
}
