//! The load: `clients` concurrent clients, each on its own connection and
//! with its own seeded random generator, sending a mix of deposits,
//! withdrawals, transfers between two accounts (multi-aggregate commands),
//! re-opens (rejected) and zero amounts (invalid) over `accounts` accounts,
//! one command after the other, until told to stop.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use jetsource_core::protocol::ErrorCode;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::json;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::client::{self, Command, Outcome, Patience, Record};
use crate::fleet::lock;

/// Bound on each request: a command worker answers `unavailable` after its
/// own 5 s NATS bound, so this only fires when no worker answered at all.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(6);
/// Longest a command stays ambiguous before it is given up as undecided.
pub const RESEND_DEADLINE: Duration = Duration::from_secs(60);

/// Live counters (for the progress bar and the report).
#[derive(Debug, Default)]
pub struct Stats {
    pub acked: AtomicU64,
    pub refused: AtomicU64,
    pub undecided: AtomicU64,
    pub resends: AtomicU64,
    /// `internal` replies to commands.
    pub internal: AtomicU64,
    /// `internal` replies to queries.
    pub query_internal: AtomicU64,
    pub faults: AtomicU64,
    /// Ambiguous outcomes by kind (each was resent or ended undecided).
    ambiguous: Mutex<BTreeMap<&'static str, u64>>,
    /// Distinct `internal` messages and how often each came.
    internal_messages: Mutex<BTreeMap<String, u64>>,
}

impl Stats {
    pub fn ambiguous(&self, kind: &'static str) {
        *lock(&self.ambiguous).entry(kind).or_default() += 1;
    }

    pub fn ambiguous_by_kind(&self) -> BTreeMap<&'static str, u64> {
        lock(&self.ambiguous).clone()
    }

    pub fn remember_internal(&self, message: &str) {
        *lock(&self.internal_messages)
            .entry(message.to_owned())
            .or_default() += 1;
    }

    pub fn internal_messages(&self) -> BTreeMap<String, u64> {
        lock(&self.internal_messages).clone()
    }

    /// Counts a definite (or given-up) outcome.
    pub fn record(&self, outcome: &Outcome) {
        let counter = match outcome {
            Outcome::Acked { .. } => &self.acked,
            Outcome::Refused { code, message } => {
                if *code == ErrorCode::Internal {
                    self.internal.fetch_add(1, Ordering::Relaxed);
                    self.remember_internal(message);
                }
                &self.refused
            }
            Outcome::Undecided { .. } => &self.undecided,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// Every command sent during the run, with its outcome.
pub type Ledger = Arc<Mutex<Vec<Record>>>;

/// The account id of account number `n`.
pub fn account(n: usize) -> String {
    format!("acc-{n}")
}

/// The account the recovery probes write to (only they do).
pub const PROBE_ACCOUNT: &str = "probe";

fn patience() -> Patience {
    Patience {
        request: REQUEST_TIMEOUT,
        deadline: Instant::now() + RESEND_DEADLINE,
    }
}

/// Opens every account (half of them with an initial deposit: the atomic
/// multi-event path) and the probe account, `parallel` at a time.
pub async fn open_accounts(
    client: &async_nats::Client,
    stats: &Stats,
    ledger: &Ledger,
    accounts: usize,
    parallel: usize,
    seed: u64,
) {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut commands: Vec<Command> = (0..accounts)
        .map(|n| {
            let initial = if rng.random_bool(0.5) {
                rng.random_range(1..=1000u64)
            } else {
                0
            };
            open(&account(n), initial, format!("open-{n}"))
        })
        .collect();
    commands.push(open(PROBE_ACCOUNT, 0, "open-probe".into()));
    let records: Vec<Record> = futures::stream::iter(commands)
        .map(|command| client::send(client, stats, command, patience()))
        .buffer_unordered(parallel.max(1))
        .collect()
        .await;
    lock(ledger).extend(records);
}

fn open(account: &str, initial_deposit: u64, command_id: String) -> Command {
    Command {
        account: account.to_owned(),
        command_type: "OpenAccount",
        data: json!({"owner": format!("owner-{account}"), "initial_deposit": initial_deposit}),
        command_id,
    }
}

/// The `k`-th command of client `c`: mostly deposits and withdrawals
/// (some withdrawals exceed the balance: `rejected`), transfers to another
/// account (some short of funds: `rejected`), a few re-opens
/// (`rejected`) and zero amounts (`invalid`), so refusals are exercised too.
fn next_command(rng: &mut StdRng, c: usize, k: u64, accounts: usize) -> Command {
    let n = rng.random_range(0..accounts.max(1));
    let command_id = format!("c{c}-{k}");
    let roll = rng.random_range(0..100);
    let (command_type, data) = match roll {
        0..=44 => ("Deposit", json!({"amount": rng.random_range(1..=500u64)})),
        45..=84 => ("Withdraw", json!({"amount": rng.random_range(1..=600u64)})),
        85..=91 if accounts > 1 => {
            let to = (n + rng.random_range(1..accounts)) % accounts;
            let amount = rng.random_range(1..=300u64);
            ("Transfer", json!({"to": account(to), "amount": amount}))
        }
        85..=91 => ("Deposit", json!({"amount": rng.random_range(1..=500u64)})),
        92..=95 => ("Deposit", json!({"amount": 0})),
        _ => {
            return open(&account(n), 0, command_id);
        }
    };
    Command {
        account: account(n),
        command_type,
        data,
        command_id,
    }
}

/// Starts the clients; each stops starting commands once `stop` is true and
/// returns after its last command has a definite outcome (or its deadline).
pub fn spawn_clients(
    clients: Vec<async_nats::Client>,
    accounts: usize,
    seed: u64,
    stats: Arc<Stats>,
    ledger: Ledger,
    stop: watch::Receiver<bool>,
) -> Vec<tokio::task::JoinHandle<()>> {
    clients
        .into_iter()
        .enumerate()
        .map(|(c, client)| {
            let rng =
                StdRng::seed_from_u64(seed ^ (c as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
            let (stats, ledger, stop) = (stats.clone(), ledger.clone(), stop.clone());
            tokio::spawn(async move {
                let records = client_loop(&client, c, accounts, rng, &stats, stop).await;
                lock(&ledger).extend(records);
            })
        })
        .collect()
}

async fn client_loop(
    client: &async_nats::Client,
    c: usize,
    accounts: usize,
    mut rng: StdRng,
    stats: &Stats,
    stop: watch::Receiver<bool>,
) -> Vec<Record> {
    let mut records = Vec::new();
    let mut k = 0;
    while !*stop.borrow() {
        let command = next_command(&mut rng, c, k, accounts);
        k += 1;
        records.push(client::send(client, stats, command, patience()).await);
    }
    records
}
