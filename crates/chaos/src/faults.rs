//! The faults of issue 9, injected one after the other while the load runs,
//! and the time the system takes to serve commands and queries correctly
//! again after each.
//!
//! Recovery is measured with a probe: right after the fault, one deposit of
//! 1 on the probe account (only the probe writes there), resent with the
//! same id until acknowledged (commands recovered), then
//! `query.account.probe` with `min_sequence` = its sequence until the
//! answer shows exactly the probe's balance and version (queries
//! recovered). The next fault waits for this, up to the recovery bound, so
//! each measurement belongs to one fault.

use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::{anyhow, Context};
use async_nats::Client;
use futures::StreamExt;
use rand::rngs::StdRng;
use rand::seq::IndexedRandom;
use serde_json::json;
use tokio::time::Instant;

use crate::client::{self, Answer, Command, Outcome, Patience};
use crate::fleet::{lock, wait_ready, Fleet, Kind};
use crate::load::{Ledger, Stats, PROBE_ACCOUNT};
use crate::progress::say;

/// A fault, in the order they are injected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    FollowerNode,
    CommandWorker,
    ApplyingProjector,
    Snapshotter,
    ProcessWorker,
    Redis,
    LeaderNode,
}

impl Fault {
    pub const ALL: [Fault; 7] = [
        Fault::FollowerNode,
        Fault::CommandWorker,
        Fault::ApplyingProjector,
        Fault::Snapshotter,
        Fault::ProcessWorker,
        Fault::Redis,
        Fault::LeaderNode,
    ];

    pub fn describe(self) -> &'static str {
        match self {
            Fault::FollowerNode => "SIGKILL a follower node of the stream, restart it later",
            Fault::CommandWorker => "SIGKILL a command worker, start a replacement",
            Fault::ApplyingProjector => {
                "SIGKILL the applying projector (pin holder), start a replacement"
            }
            Fault::Snapshotter => "SIGKILL the snapshotter, start it again",
            Fault::ProcessWorker => "SIGKILL a process worker, start a replacement",
            Fault::Redis => "SIGKILL Redis, start it again empty on the same port",
            Fault::LeaderNode => "SIGKILL the stream leader node, restart it later",
        }
    }
}

/// What happened for one fault.
#[derive(Debug, Clone)]
pub struct FaultRecord {
    pub fault: Fault,
    pub target: String,
    /// When it was injected, from the start of the load.
    pub at: Duration,
    /// Until a probe command was acknowledged; `None`: not within the bound.
    pub commands: Option<Duration>,
    /// Until a probe query answered correctly; `None`: not within the bound.
    pub queries: Option<Duration>,
    /// Ambiguous outcomes resent by all clients while recovering.
    pub resends: u64,
    /// Why the replacement worker did not come up, if it did not.
    pub replacement_failed: Option<String>,
    pub notes: Vec<String>,
}

/// Timing of the faults.
#[derive(Debug, Clone, Copy)]
pub struct Plan {
    pub interval: Duration,
    pub node_down: Duration,
    pub recovery_bound: Duration,
}

/// Everything a fault needs to reach.
#[derive(Debug)]
pub struct Env<'a> {
    pub fleet: &'a Fleet,
    pub admin: &'a Client,
    pub probe: &'a Client,
    pub stats: &'a Stats,
    pub ledger: &'a Ledger,
    pub plan: Plan,
}

/// Injects every fault, `interval` apart from `load_start` (later if a
/// recovery took longer), and measures each recovery.
pub async fn inject_all(env: &Env<'_>, rng: &mut StdRng, load_start: Instant) -> Vec<FaultRecord> {
    let mut records = Vec::new();
    for (i, &fault) in Fault::ALL.iter().enumerate() {
        tokio::time::sleep_until(load_start + env.plan.interval * (i as u32 + 1)).await;
        records.push(inject(env, rng, load_start, i + 1, fault).await);
    }
    records
}

async fn inject(
    env: &Env<'_>,
    rng: &mut StdRng,
    load_start: Instant,
    k: usize,
    fault: Fault,
) -> FaultRecord {
    let resends_before = env.stats.resends.load(Ordering::Relaxed);
    let at = load_start.elapsed();
    let mut notes = Vec::new();
    let (target, node, replacement) = match strike(env, rng, fault, &mut notes).await {
        Ok(struck) => struck,
        Err(e) => {
            notes.push(format!("could not inject: {e:#}"));
            ("-".into(), None, None)
        }
    };
    let t0 = Instant::now();
    env.stats.faults.fetch_add(1, Ordering::Relaxed);
    say(&format!(
        "fault {k}/{}: {} -> {target}",
        Fault::ALL.len(),
        fault.describe()
    ));
    let restart = restart_node_later(env, node);
    let recovery = measure(env, k, t0);
    let (restart_note, (commands, queries, probe_note)) = tokio::join!(restart, recovery);
    notes.extend(restart_note);
    notes.extend(probe_note);
    let replacement_failed = match replacement {
        Some((kind, name)) => replacement_up(env, kind, &name).await.err(),
        None => None,
    };
    notes.extend(replacement_failed.clone());
    say(&format!(
        "fault {k}: commands recovered after {}, queries after {}",
        show(commands),
        show(queries)
    ));
    FaultRecord {
        fault,
        target,
        at,
        commands,
        queries,
        resends: env.stats.resends.load(Ordering::Relaxed) - resends_before,
        replacement_failed,
        notes,
    }
}

/// Waits until the fleet is back to strength with replacement `name`
/// running; fails at once if it exited (e.g. it gave up on a cluster still
/// recovering), saying why.
async fn replacement_up(env: &Env<'_>, kind: Kind, name: &str) -> Result<(), String> {
    let n = if kind == Kind::Snapshotter { 1 } else { 2 };
    let deadline = Instant::now() + env.plan.recovery_bound;
    while Instant::now() < deadline {
        if let Some(exit) = env.fleet.exited(name) {
            return Err(format!("replacement {name} exited: {exit}"));
        }
        if wait_ready(env.admin, kind, n, Duration::from_millis(500)).await {
            return Ok(());
        }
    }
    Err(format!(
        "replacement {name} did not answer $SRV.PING within {} s",
        env.plan.recovery_bound.as_secs()
    ))
}

fn show(d: Option<Duration>) -> String {
    d.map_or("-- (not within the bound)".into(), |d| {
        format!("{:.2} s", d.as_secs_f64())
    })
}

/// What a fault struck: a description, the node to restart, the
/// replacement worker that must come up.
type Struck = (String, Option<usize>, Option<(Kind, String)>);

async fn strike(
    env: &Env<'_>,
    rng: &mut StdRng,
    fault: Fault,
    notes: &mut Vec<String>,
) -> anyhow::Result<Struck> {
    match fault {
        Fault::FollowerNode | Fault::LeaderNode => {
            let leader = stream_leader(env.admin).await?;
            let leader_index = env
                .fleet
                .node_index(&leader)
                .ok_or_else(|| anyhow!("stream leader {leader} is not one of our nodes"))?;
            let node = if fault == Fault::LeaderNode {
                leader_index
            } else {
                let followers: Vec<usize> = (0..env.fleet.node_count())
                    .filter(|&i| i != leader_index)
                    .collect();
                *followers.choose(rng).context("no follower")?
            };
            env.fleet.kill_node(node).await?;
            let role = if node == leader_index {
                "leader"
            } else {
                "follower"
            };
            Ok((
                format!("node {} ({role})", env.fleet.node_name(node)),
                Some(node),
                None,
            ))
        }
        Fault::CommandWorker => kill_and_replace(env, Kind::Command, None).await,
        Fault::Snapshotter => kill_and_replace(env, Kind::Snapshotter, None).await,
        Fault::ProcessWorker => kill_and_replace(env, Kind::Process, None).await,
        Fault::ApplyingProjector => {
            let pid = applying_projector(env.admin).await;
            if pid.is_none() {
                notes.push(
                    "no progress announcement with a pid within 5 s: killed the oldest projector"
                        .into(),
                );
            }
            kill_and_replace(env, Kind::Projector, pid).await
        }
        Fault::Redis => {
            env.fleet.restart_redis_empty().await?;
            Ok(("redis-server".into(), None, None))
        }
    }
}

/// SIGKILLs the worker of `kind` with `pid` (else the oldest) and starts a
/// replacement at once.
async fn kill_and_replace(env: &Env<'_>, kind: Kind, pid: Option<u32>) -> anyhow::Result<Struck> {
    let members = env.fleet.members(kind);
    let pid = match pid {
        Some(pid) if members.iter().any(|(_, p)| *p == pid) => pid,
        Some(pid) => {
            return Err(anyhow!(
                "pid {pid} is not one of our {} processes",
                kind.binary()
            ))
        }
        None => members.first().map(|(_, p)| *p).context("none running")?,
    };
    let name = env.fleet.kill_pid(pid).context("already gone")?;
    let replacement = env.fleet.spawn(kind)?;
    Ok((
        format!("{name} (pid {pid}); replacement {replacement}"),
        None,
        Some((kind, replacement)),
    ))
}

/// The server name of the event stream's leader (stream info, served by
/// the leader), retried through an election for up to 15 s.
async fn stream_leader(admin: &Client) -> anyhow::Result<String> {
    let js = async_nats::jetstream::new(admin.clone());
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if let Ok(stream) = js.get_stream("EVENTS").await {
            if let Some(leader) = stream
                .cached_info()
                .cluster
                .as_ref()
                .and_then(|c| c.leader.clone())
            {
                return Ok(leader);
            }
        }
        if Instant::now() >= deadline {
            return Err(anyhow!("no stream leader known within 15 s"));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The PID of the projector copy applying `accounts`: it announces each
/// batch on `jetsource.progress.accounts` with its `pid`.
async fn applying_projector(admin: &Client) -> Option<u32> {
    let mut announcements = admin.subscribe("jetsource.progress.accounts").await.ok()?;
    let deadline = Instant::now() + Duration::from_secs(5);
    while let Ok(Some(message)) = tokio::time::timeout_at(deadline, announcements.next()).await {
        let body: serde_json::Value = serde_json::from_slice(&message.payload).unwrap_or_default();
        if let Some(pid) = body["pid"].as_u64().and_then(|p| u32::try_from(p).ok()) {
            return Some(pid);
        }
    }
    None
}

/// Starts node `node` again after `node_down`; a note if that failed.
async fn restart_node_later(env: &Env<'_>, node: Option<usize>) -> Option<String> {
    let node = node?;
    tokio::time::sleep(env.plan.node_down).await;
    match env.fleet.start_node(node).await {
        Ok(()) => {
            say(&format!("node {} restarted", env.fleet.node_name(node)));
            None
        }
        Err(e) => Some(format!(
            "node {} did not restart: {e:#}",
            env.fleet.node_name(node)
        )),
    }
}

/// The probe: command recovery, then query recovery, each from `t0`.
async fn measure(
    env: &Env<'_>,
    k: usize,
    t0: Instant,
) -> (Option<Duration>, Option<Duration>, Option<String>) {
    let deadline = t0 + env.plan.recovery_bound;
    let command = Command {
        account: PROBE_ACCOUNT.into(),
        command_type: "Deposit",
        data: json!({"amount": 1}),
        command_id: format!("probe-{k}"),
    };
    let patience = Patience {
        request: Duration::from_secs(1),
        deadline,
    };
    let record = client::send(env.probe, env.stats, command, patience).await;
    let outcome = record.outcome.clone();
    lock(env.ledger).push(record);
    let Outcome::Acked {
        version, sequence, ..
    } = outcome
    else {
        return (None, None, Some(format!("probe command: {outcome:?}")));
    };
    let commands = t0.elapsed();
    // The probe account was opened empty and only probes deposit 1 there.
    let expected = (version.saturating_sub(1), version);
    match query_until_correct(env, sequence, expected, deadline).await {
        Ok(()) => (Some(commands), Some(t0.elapsed()), None),
        Err(last) => (
            Some(commands),
            None,
            Some(format!("probe query, last answer: {last}")),
        ),
    }
}

/// Queries the probe account until it shows `(balance, version)`.
async fn query_until_correct(
    env: &Env<'_>,
    sequence: u64,
    expected: (u64, u64),
    deadline: Instant,
) -> Result<(), String> {
    let mut last = String::from("none");
    while Instant::now() < deadline {
        let subject = format!("query.account.{PROBE_ACCOUNT}");
        let answer = client::query(
            env.probe,
            env.stats,
            &subject,
            Some(sequence),
            Duration::from_secs(1),
        )
        .await;
        match answer {
            Answer::Ok { data, .. } => {
                let got = (data["balance"].as_u64(), data["version"].as_u64());
                if got == (Some(expected.0), Some(expected.1)) {
                    return Ok(());
                }
                last = format!(
                    "balance {} version {} (expected {} and {})",
                    data["balance"], data["version"], expected.0, expected.1
                );
            }
            Answer::Error(e) => last = e.to_string(),
            Answer::NoReply(e) => last = e,
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Err(last)
}
