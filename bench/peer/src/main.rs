//! `jetsource-bench-peer`: what a Rust team would use instead of jetsource,
//! cqrs-es + postgres-es on PostgreSQL, measured on the workloads of
//! jetsource-bench so that its report can show jetsource/peer ratios from
//! the same run on the same machine.
//!
//! It starts a private PostgreSQL (fsync and synchronous commit on, the
//! durability of jetsource's `sync_interval: always`), runs the append
//! workload of jetsource-bench's worker layer (`Deposit` commands through a
//! `CqrsFramework`, clients owning disjoint accounts) and the cold loads of
//! its read suite, and prints the results as JSON.
//!
//! Built outside the main workspace (`make bench-peer`), so that its
//! dependencies never slow down `make test`.

mod account;
mod postgres;
mod work;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context as _};
use clap::Parser;
use cqrs_es::persist::PersistedEventStore;
use cqrs_es::{AggregateError, EventStore as _};
use postgres_es::{postgres_cqrs, PostgresCqrs, PostgresEventRepository};
use serde::Serialize;
use sqlx::postgres::PgPoolOptions;
use sqlx::PgPool;

use account::{Account, AccountCommand, AccountError};
use postgres::Postgres;
use work::{account_of, drive, measure, seed, time_load, LoadTiming, Stats, SCHEMA};

#[derive(Debug, Parser)]
#[command(
    about = "The PostgreSQL peer of jetsource-bench: cqrs-es + postgres-es on a private PostgreSQL, same workloads; JSON on stdout"
)]
struct Args {
    /// Tiny sizes, to check that it runs: concurrency 1,4, 200 ops, 50 accounts, tiny loads.
    #[arg(long)]
    quick: bool,
    /// Concurrent clients to measure, e.g. 1,16,64,256.
    #[arg(long, value_delimiter = ',')]
    concurrency: Option<Vec<usize>>,
    /// Measured operations per concurrency (plus a warm-up of a tenth).
    #[arg(long)]
    ops: Option<usize>,
    /// Accounts opened before the measured runs; clients own disjoint ones.
    #[arg(long)]
    accounts: Option<usize>,
    /// Sizes of the single aggregates whose load is timed, e.g. 10000.
    #[arg(long, value_delimiter = ',')]
    load_events: Option<Vec<u64>>,
    /// Also time the load of an aggregate of 100,000 events (jetsource-bench's size).
    #[arg(long)]
    big: bool,
    /// Events of the sparse aggregate, spread evenly over --sparse-table-events.
    #[arg(long)]
    sparse_events: Option<u64>,
    /// Events in the table when the sparse aggregate is loaded.
    #[arg(long)]
    sparse_table_events: Option<u64>,
    /// PostgreSQL's synchronous_commit: `on` (an fsync per commit, as
    /// jetsource's `sync_interval: always`) or `off` (WAL flushed in the
    /// background, closer to jetsource's default interval).
    #[arg(long, default_value = "on")]
    synchronous_commit: String,
    /// Skip the append workload.
    #[arg(long)]
    no_append: bool,
    /// Skip the load workloads.
    #[arg(long)]
    no_load: bool,
    /// Write the JSON here instead of stdout.
    #[arg(long)]
    out: Option<PathBuf>,
}

/// Workload sizes, as jetsource-bench's `Sizes` where they overlap.
#[derive(Debug, Clone, Serialize)]
struct Sizes {
    concurrency: Vec<usize>,
    ops: usize,
    accounts: usize,
    load_events: Vec<u64>,
    sparse_events: u64,
    sparse_table_events: u64,
}

impl Sizes {
    fn full() -> Self {
        Self {
            concurrency: vec![1, 16, 64, 256],
            ops: 20_000,
            accounts: 10_000,
            load_events: vec![10_000],
            sparse_events: 100,
            sparse_table_events: 1_000_000,
        }
    }

    fn quick() -> Self {
        Self {
            concurrency: vec![1, 4],
            ops: 200,
            accounts: 50,
            load_events: vec![500],
            sparse_events: 10,
            sparse_table_events: 2_000,
        }
    }

    fn from(args: &Args) -> anyhow::Result<Self> {
        let mut sizes = if args.quick {
            Self::quick()
        } else {
            Self::full()
        };
        if let Some(c) = &args.concurrency {
            sizes.concurrency.clone_from(c);
        }
        if let Some(n) = args.ops {
            sizes.ops = n;
        }
        if let Some(n) = args.accounts {
            sizes.accounts = n;
        }
        if let Some(l) = &args.load_events {
            sizes.load_events.clone_from(l);
        }
        if args.big && !sizes.load_events.contains(&100_000) {
            sizes.load_events.push(100_000);
        }
        if let Some(n) = args.sparse_events {
            sizes.sparse_events = n;
        }
        if let Some(n) = args.sparse_table_events {
            sizes.sparse_table_events = n;
        }
        anyhow::ensure!(
            sizes.concurrency.iter().all(|&c| c > 0) && sizes.accounts > 0,
            "--concurrency and --accounts must be positive"
        );
        anyhow::ensure!(
            sizes.load_events.iter().all(|&n| n > 0)
                && sizes.sparse_events > 0
                && sizes.sparse_table_events >= sizes.sparse_events,
            "load sizes must be positive, with --sparse-table-events >= --sparse-events"
        );
        Ok(sizes)
    }
}

#[derive(Debug, Serialize)]
struct PostgresInfo {
    version: String,
    /// `SHOW` of the settings that decide the figures.
    settings: BTreeMap<String, String>,
}

#[derive(Debug, Default, Serialize)]
struct Loads {
    /// One aggregate alone in the table, per size.
    dense: Vec<LoadTiming>,
    /// One aggregate's events spread evenly over a large table.
    sparse: Option<LoadTiming>,
}

#[derive(Debug, Serialize)]
struct Results {
    peer: String,
    postgres: PostgresInfo,
    sizes: Sizes,
    /// Concurrency -> stats of `Deposit` commands through `CqrsFramework`.
    append: BTreeMap<usize, Stats>,
    load: Loads,
    seconds: f64,
    command: String,
}

/// The libraries measured, as locked in Cargo.lock.
const PEER: &str = "cqrs-es 0.5 + postgres-es 0.5 (sqlx 0.8), PersistedEventStore in event-store mode (no snapshots)";

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let sizes = Sizes::from(&args)?;
    anyhow::ensure!(
        matches!(args.synchronous_commit.as_str(), "on" | "off"),
        "--synchronous-commit: use on or off"
    );
    let started = Instant::now();
    let clients = sizes.concurrency.iter().copied().max().unwrap_or(1);
    let settings = [
        ("fsync", "on".to_owned()),
        ("synchronous_commit", args.synchronous_commit.clone()),
        // A connection per client plus the loads' and some to spare.
        ("max_connections", (clients + 20).max(300).to_string()),
        ("shared_buffers", "256MB".to_owned()),
    ];
    eprintln!("== PostgreSQL peer: cqrs-es + postgres-es ==");
    let mut pg = Postgres::start(&settings).context("starting PostgreSQL")?;
    // On Ctrl-C or SIGTERM (the main benchmark stopping it) the run future
    // is dropped and `pg` with it: the server stops and its directory goes.
    let results = tokio::select! {
        r = run(&mut pg, &args, sizes) => r?,
        s = interrupted() => anyhow::bail!("{}", s?),
    };
    drop(pg);
    let results = Results {
        seconds: started.elapsed().as_secs_f64(),
        ..results
    };
    let json = serde_json::to_string_pretty(&results)?;
    match &args.out {
        Some(path) => std::fs::write(path, json + "\n")
            .with_context(|| format!("writing {}", path.display()))?,
        None => println!("{json}"),
    }
    eprintln!("peer done in {:.0}s", results.seconds);
    Ok(())
}

async fn interrupted() -> anyhow::Result<&'static str> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    tokio::select! {
        r = tokio::signal::ctrl_c() => { r?; Ok("interrupted") }
        _ = term.recv() => Ok("terminated"),
    }
}

async fn run(pg: &mut Postgres, args: &Args, sizes: Sizes) -> anyhow::Result<Results> {
    let clients = sizes.concurrency.iter().copied().max().unwrap_or(1);
    // Every client holds a connection while its command runs, as a service
    // with a pool sized to its concurrency would.
    let pool = PgPoolOptions::new()
        .max_connections(u32::try_from(clients.max(64) + 2)?)
        .acquire_timeout(Duration::from_secs(120))
        .connect(&pg.url())
        .await
        .context("cannot connect to PostgreSQL")?;
    for statement in SCHEMA {
        sqlx::query(statement).execute(&pool).await?;
    }
    let postgres = postgres_info(&pool).await?;
    eprintln!(
        "  {} (fsync {}, synchronous_commit {})",
        postgres.version,
        postgres.settings.get("fsync").map_or("?", String::as_str),
        postgres
            .settings
            .get("synchronous_commit")
            .map_or("?", String::as_str)
    );
    let mut results = Results {
        peer: PEER.to_owned(),
        postgres,
        sizes: sizes.clone(),
        append: BTreeMap::new(),
        load: Loads::default(),
        seconds: 0.0,
        command: std::env::args().collect::<Vec<_>>().join(" "),
    };
    if !args.no_append {
        results.append = append_suite(&pool, &sizes).await?;
    }
    if !args.no_load {
        results.load = load_suite(pg, &pool, &sizes).await?;
    }
    pool.close().await;
    Ok(results)
}

async fn postgres_info(pool: &PgPool) -> anyhow::Result<PostgresInfo> {
    let version: String = sqlx::query_scalar("SELECT version()")
        .fetch_one(pool)
        .await?;
    let mut settings = BTreeMap::new();
    for name in [
        "server_version",
        "fsync",
        "synchronous_commit",
        "wal_sync_method",
        "full_page_writes",
        "shared_buffers",
        "max_connections",
    ] {
        let value: String = sqlx::query_scalar(&format!("SHOW {name}"))
            .fetch_one(pool)
            .await?;
        settings.insert(name.to_owned(), value);
    }
    Ok(PostgresInfo { version, settings })
}

/// jetsource-bench's worker layer: accounts opened first (not measured),
/// then for each concurrency `Deposit { amount: 1 }` commands, each client
/// on its own accounts, each command awaited before the next.
async fn append_suite(pool: &PgPool, sizes: &Sizes) -> anyhow::Result<BTreeMap<usize, Stats>> {
    let cqrs: Arc<PostgresCqrs<Account>> = Arc::new(postgres_cqrs(pool.clone(), vec![], ()));
    let accounts = sizes.accounts;
    let openers = 64.min(accounts);
    let opener = cqrs.clone();
    drive("opening accounts", openers, accounts, move |c, k| {
        let cqrs = opener.clone();
        async move {
            let command = AccountCommand::OpenAccount {
                owner: "bench".into(),
            };
            cqrs.execute(&format!("b{}", c + k * openers), command)
                .await
                .map_err(|e| anyhow!("OpenAccount: {e}"))
        }
    })
    .await?;
    let mut results = BTreeMap::new();
    for &clients in &sizes.concurrency {
        let cqrs = cqrs.clone();
        let stats = measure(
            &format!("cqrs-es c={clients}"),
            clients,
            sizes.ops,
            move |c, k| {
                let cqrs = cqrs.clone();
                async move {
                    let idx = account_of(c, clients, accounts, k);
                    cqrs.execute(&format!("b{idx}"), AccountCommand::Deposit { amount: 1 })
                        .await
                        .map_err(|e| anyhow!("Deposit to b{idx}: {e}"))
                }
            },
        )
        .await?;
        results.insert(clients, stats);
    }
    // The commands were decided on state rebuilt from the table: a
    // withdrawal of the whole balance passes, one more unit is refused.
    let loaded = PersistedEventStore::<PostgresEventRepository, Account>::new_event_store(
        PostgresEventRepository::new(pool.clone()),
    )
    .load_aggregate("b0")
    .await?;
    let balance = loaded.aggregate.balance;
    anyhow::ensure!(
        balance > 0 || sizes.concurrency.is_empty(),
        "b0 has no deposits after the runs"
    );
    let overdraft = cqrs
        .execute(
            "b0",
            AccountCommand::Withdraw {
                amount: balance + 1,
            },
        )
        .await;
    anyhow::ensure!(
        matches!(
            overdraft,
            Err(AggregateError::UserError(
                AccountError::InsufficientFunds { .. }
            ))
        ),
        "an overdraft of b0 was not refused: {overdraft:?}"
    );
    if balance > 0 {
        cqrs.execute("b0", AccountCommand::Withdraw { amount: balance })
            .await
            .map_err(|e| anyhow!("withdrawing the balance of b0: {e}"))?;
    }
    Ok(results)
}

/// jetsource-bench's cold loads: one long aggregate alone, then a short one
/// spread thinly over a large table. Rows are written directly (COPY), not
/// through commands; the table is emptied before each.
async fn load_suite(pg: &mut Postgres, pool: &PgPool, sizes: &Sizes) -> anyhow::Result<Loads> {
    const REPEATS: usize = 5;
    let mut loads = Loads::default();
    for &events in &sizes.load_events {
        sqlx::query("TRUNCATE events").execute(pool).await?;
        seed(
            pool,
            "big",
            1,
            events,
            &format!("seeding an aggregate of {events} events"),
        )
        .await?;
        loads
            .dense
            .push(time_load(pg, "big0", events, events, REPEATS).await?);
    }
    sqlx::query("TRUNCATE events").execute(pool).await?;
    let total = sizes.sparse_table_events;
    let aggregates = total / sizes.sparse_events;
    let table_events = aggregates * sizes.sparse_events;
    seed(
        pool,
        "s",
        aggregates,
        table_events,
        &format!("seeding {table_events} events of {aggregates} aggregates"),
    )
    .await?;
    loads.sparse = Some(time_load(pg, "s0", sizes.sparse_events, table_events, REPEATS).await?);
    sqlx::query("TRUNCATE events").execute(pool).await?;
    Ok(loads)
}
