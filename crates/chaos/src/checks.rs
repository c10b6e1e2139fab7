//! The checks of issue 9, each a pass/fail with a precise detail. They are
//! judged on evidence gathered after the load stopped: the ledger of every
//! command's outcome, the stream as the leader delivers it, each replica's
//! state, the read models at the stream's last sequence, the fault records
//! and the workers' exits.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::Duration;

use futures::StreamExt;
use jetsource_core::envelope::RecordedEvent;
use jetsource_core::integrity::TrustedKeys;
use jetsource_core::protocol::ErrorCode;
use jetsource_core::verify::Verifier;
use serde_json::Value;
use tokio::time::Instant;

use crate::client::{self, Answer, Command, Outcome, Record};
use crate::faults::{Fault, FaultRecord};
use crate::fleet::{lock, Stopped, STOP_BOUND};
use crate::fold::{Expected, Mismatch};
use crate::load::Stats;
use crate::stream::{same_data, Contents, Replica};

/// One check's verdict.
#[derive(Debug, Clone)]
pub struct Check {
    pub name: &'static str,
    pub passed: bool,
    pub detail: String,
}

pub fn check(name: &'static str, passed: bool, detail: String) -> Check {
    Check {
        name,
        passed,
        detail,
    }
}

/// The read models as queried at the end.
#[derive(Debug)]
pub struct ReadModels {
    /// How long the projectors took to reach the stream's last sequence
    /// after the load stopped (`None`: not within the deadline).
    pub caught_up: Option<Duration>,
    pub accounts: BTreeMap<String, Result<Value, String>>,
    pub totals: Result<Value, String>,
    /// `unavailable` answers met (and retried) meanwhile, with the last
    /// one: with Redis up, a copy answering that is wedged (issue 9, 3).
    pub unavailable: (u64, Option<String>),
}

/// Waits until `query.accounts.totals` reflects `min_sequence`, then asks
/// every account's read model at that sequence (16 at a time); each query
/// is retried on `timeout`, `unavailable` or no reply until `within`.
/// Catching up is timed from `load_end`.
pub async fn query_read_models(
    client: &async_nats::Client,
    stats: &Stats,
    ids: Vec<String>,
    min_sequence: u64,
    load_end: Instant,
    within: Duration,
) -> ReadModels {
    let deadline = Instant::now() + within;
    let seen = Mutex::new((0, None));
    let unavailable = &seen;
    let totals = ask(
        client,
        stats,
        "query.accounts.totals".into(),
        min_sequence,
        deadline,
        unavailable,
    )
    .await;
    let caught_up = totals.is_ok().then(|| load_end.elapsed());
    let accounts = futures::stream::iter(ids)
        .map(|id| async move {
            let subject = format!("query.account.{id}");
            (
                id,
                ask(client, stats, subject, min_sequence, deadline, unavailable).await,
            )
        })
        .buffer_unordered(16)
        .collect()
        .await;
    let unavailable = lock(&seen).clone();
    ReadModels {
        caught_up,
        accounts,
        totals,
        unavailable,
    }
}

/// Every field of every account's read model that differs from the fold.
pub fn mismatches(
    expected: &BTreeMap<String, Expected>,
    read_models: &ReadModels,
) -> Vec<Mismatch> {
    let not_queried = Err("not queried".to_owned());
    expected
        .iter()
        .flat_map(|(id, want)| {
            let answer = read_models.accounts.get(id).unwrap_or(&not_queried);
            crate::fold::compare(id, want, answer)
        })
        .collect()
}

/// One query with `min_sequence`, retried while the answer is not definite.
async fn ask(
    client: &async_nats::Client,
    stats: &Stats,
    subject: String,
    min_sequence: u64,
    deadline: Instant,
    unavailable: &Mutex<(u64, Option<String>)>,
) -> Result<Value, String> {
    loop {
        let wait = deadline
            .saturating_duration_since(Instant::now())
            .clamp(Duration::from_millis(100), Duration::from_secs(10));
        let answer = client::query(client, stats, &subject, Some(min_sequence), wait).await;
        let last = match answer {
            Answer::Ok { data, .. } => return Ok(data),
            Answer::Error(e) if !matches!(e.code, ErrorCode::Timeout | ErrorCode::Unavailable) => {
                return Err(e.to_string())
            }
            Answer::Error(e) => {
                if e.code == ErrorCode::Unavailable {
                    let mut seen = lock(unavailable);
                    seen.0 += 1;
                    seen.1 = Some(format!("{subject}: {}", e.message));
                }
                e.to_string()
            }
            Answer::NoReply(e) => e,
        };
        if Instant::now() >= deadline {
            return Err(format!("no definite answer in time, last: {last}"));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Everything the checks judge.
#[derive(Debug)]
pub struct Evidence<'a> {
    pub records: &'a [Record],
    pub stream: &'a Contents,
    pub replicas: &'a Result<Vec<Replica>, String>,
    pub expected: &'a BTreeMap<String, Expected>,
    pub read_models: &'a ReadModels,
    pub mismatches: &'a [Mismatch],
    pub faults: &'a [FaultRecord],
    pub stopped: &'a [Stopped],
    pub stats: &'a Stats,
    pub recovery_bound: Duration,
    /// How long the loyalty process took to settle after the load.
    pub settled: &'a Result<Duration, String>,
    /// The writers' public key.
    pub trusted: &'a TrustedKeys,
}

/// All twelve checks, in report order.
pub fn judge(e: &Evidence<'_>) -> Vec<Check> {
    let stored = stored_by_command(&e.stream.events);
    vec![
        acked_stored_once(e, &stored),
        refused_not_stored(e.records, &stored),
        transfers_whole(&e.stream.events),
        chains_intact(&e.stream.events, e.trusted),
        crate::processes::rewards(&e.stream.events, e.settled),
        replicas_equal(e.replicas, e.stream.last_sequence),
        read_models(e),
        totals(e.expected, &e.read_models.totals),
        no_internal(e.stats),
        recovered(e.faults, e.recovery_bound, &COMMANDS),
        recovered(e.faults, e.recovery_bound, &QUERIES),
        shutdown(e.stopped),
    ]
}

/// Every aggregate's hash chain holds link by link and every event is
/// signed by the writers' key (`jetsource verify`'s checks), whatever the
/// faults did to the writers and the nodes in between; and the stream has
/// no hole.
fn chains_intact(events: &[RecordedEvent], trusted: &TrustedKeys) -> Check {
    let mut verifier = Verifier::new(trusted);
    for event in events {
        verifier.event(event);
    }
    let report = verifier.finish();
    let holes = events
        .iter()
        .zip(1..)
        .filter(|(e, seq)| e.sequence != *seq)
        .count();
    let findings: Vec<String> = report
        .findings
        .iter()
        .take(3)
        .map(|f| format!("{} at {}: {}", f.aggregate, f.sequence, f.detail))
        .collect();
    check(
        "chains-intact",
        report.findings.is_empty() && report.signatures_checked == report.events && holes == 0,
        format!(
            "{} events of {} aggregates, {} signatures checked, {} broken{}{}",
            report.events,
            report.aggregates,
            report.signatures_checked,
            report.findings.len(),
            if findings.is_empty() {
                String::new()
            } else {
                format!(": {}", findings.join("; "))
            },
            if holes > 0 {
                format!(", {holes} events out of place in the stream")
            } else {
                String::new()
            },
        ),
    )
}

type Key = (String, String);

/// Stored events per (account the command was sent to, command id): a
/// transfer's event on the receiving account belongs to the sender's
/// command (`Jetsource-Command-Aggregate`). Events without a command id
/// under an empty id (every command of ours has one). Accounts only: the
/// loyalty process's instances are checked by `process-rewards`.
fn stored_by_command(events: &[RecordedEvent]) -> HashMap<Key, Vec<&RecordedEvent>> {
    let mut map: HashMap<Key, Vec<&RecordedEvent>> = HashMap::new();
    for event in events.iter().filter(|e| e.aggregate_type == "account") {
        let id = event.command_id.clone().unwrap_or_default();
        let owner = match event.command_aggregate.as_deref() {
            Some(owner) => owner.split_once('.').map_or(owner, |(_, id)| id),
            None => &event.aggregate_id,
        };
        map.entry((owner.to_owned(), id)).or_default().push(event);
    }
    map
}

/// Every transfer is whole: its `TransferSent` is directly followed, in
/// the stream, by the receiving account's `TransferReceived` of the same
/// command and amount, and no `TransferReceived` stands alone. So money is
/// conserved at every stream sequence outside the one between two halves,
/// and no reader ever sees half a transfer.
fn transfers_whole(events: &[RecordedEvent]) -> Check {
    let mut problems = Tally::default();
    let mut transfers = 0;
    // (the other account, the amount) of a transfer's half.
    let half = |e: &RecordedEvent| -> Option<(String, u64)> {
        let data: Value = serde_json::from_slice(&e.data).ok()?;
        let other = data.get("to").or_else(|| data.get("from"))?;
        Some((other.as_str()?.to_owned(), data.get("amount")?.as_u64()?))
    };
    for (i, event) in events.iter().enumerate() {
        let at = format!("#{} {}", event.sequence, event.aggregate_id);
        match event.event_type.as_str() {
            "TransferSent" => {
                transfers += 1;
                let owner = format!("account.{}", event.aggregate_id);
                let whole = events.get(i + 1).is_some_and(|next| {
                    let amount = half(event).map(|(_, amount)| amount);
                    next.event_type == "TransferReceived"
                        && next.command_id == event.command_id
                        && next.command_aggregate.as_deref() == Some(owner.as_str())
                        && amount.is_some()
                        && half(event) == Some((next.aggregate_id.clone(), amount.unwrap_or(0)))
                        && half(next) == Some((event.aggregate_id.clone(), amount.unwrap_or(0)))
                });
                if !whole {
                    problems.add("sent without its received half right after it", at);
                }
            }
            "TransferReceived" => {
                let sent = i
                    .checked_sub(1)
                    .is_some_and(|p| events[p].event_type == "TransferSent");
                if !sent {
                    problems.add("received without its sent half right before it", at);
                }
            }
            _ => {}
        }
    }
    let detail = if problems.is_empty() {
        format!("{transfers} transfers, each stored whole and adjacent: money conserved at every command boundary")
    } else {
        format!("{transfers} transfers: {}", problems.render())
    };
    check("transfers-whole", problems.is_empty(), detail)
}

fn key(command: &Command) -> Key {
    (command.account.clone(), command.command_id.clone())
}

/// Events a command appends when it is accepted (on every account it
/// involves).
fn events_of(command: &Command) -> usize {
    let initial = command.data["initial_deposit"].as_u64().unwrap_or(0);
    if (command.command_type == "OpenAccount" && initial > 0) || command.command_type == "Transfer"
    {
        2
    } else {
        1
    }
}

/// Problems of one kind, counted, with the first few examples.
#[derive(Default)]
struct Tally(BTreeMap<&'static str, (usize, Vec<String>)>);

impl Tally {
    fn add(&mut self, kind: &'static str, example: String) {
        let (n, examples) = self.0.entry(kind).or_default();
        *n += 1;
        if examples.len() < 3 {
            examples.push(example);
        }
    }

    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    fn render(&self) -> String {
        self.0
            .iter()
            .map(|(kind, (n, ex))| format!("{n} {kind} (e.g. {})", ex.join("; ")))
            .collect::<Vec<_>>()
            .join(". ")
    }
}

/// Every acknowledged command is stored exactly once, as acknowledged
/// (same last sequence and version), and nothing else is stored: no
/// doubled undecided command, no event we never sent.
fn acked_stored_once(e: &Evidence<'_>, stored: &HashMap<Key, Vec<&RecordedEvent>>) -> Check {
    let mut problems = Tally::default();
    let mut acked = 0;
    let sent: HashMap<Key, &Record> = e.records.iter().map(|r| (key(&r.command), r)).collect();
    for record in e.records {
        let k = key(&record.command);
        let found = stored.get(&k).map_or(&[][..], Vec::as_slice);
        let want = events_of(&record.command);
        let id = format!("{}/{}", k.0, k.1);
        match &record.outcome {
            Outcome::Acked {
                version, sequence, ..
            } => {
                acked += 1;
                // The version acknowledged is the account's own; the
                // sequence that of the command's last event anywhere.
                let own_version = found
                    .iter()
                    .rfind(|e| e.command_aggregate.is_none())
                    .map(|e| e.aggregate_version);
                match found.last() {
                    None => problems.add("acknowledged but not stored", id),
                    Some(_) if found.len() != want => problems.add(
                        "stored more than once",
                        format!("{id}: {} events, expected {want}", found.len()),
                    ),
                    Some(last) if (last.sequence, own_version) != (*sequence, Some(*version)) => {
                        problems.add(
                            "stored other than acknowledged",
                            format!(
                                "{id}: acked seq {sequence} v{version}, stored seq {} v{own_version:?}",
                                last.sequence
                            ),
                        )
                    }
                    Some(_) => {}
                }
            }
            Outcome::Undecided { .. } if found.len() > want => problems.add(
                "undecided but stored more than once",
                format!("{id}: {} events", found.len()),
            ),
            _ => {}
        }
    }
    for (k, events) in stored {
        // The loyalty process's commands: checked by `process-rewards`.
        if !sent.contains_key(k) && !k.1.starts_with(crate::processes::COMMAND_PREFIX) {
            problems.add(
                "stored but never sent",
                format!("{}/{:?} seq {}", k.0, k.1, events[0].sequence),
            );
        }
    }
    for malformed in &e.stream.malformed {
        problems.add(
            "stored messages that are not jetsource events",
            malformed.clone(),
        );
    }
    let detail = if problems.is_empty() {
        format!("{acked} acknowledged commands, each stored exactly once as acknowledged; {} events, nothing else stored", e.stream.events.len())
    } else {
        format!("{acked} acknowledged: {}", problems.render())
    };
    check("acked-stored-once", problems.is_empty(), detail)
}

/// A refused command (any error reply that is not ambiguous) wrote nothing.
fn refused_not_stored(records: &[Record], stored: &HashMap<Key, Vec<&RecordedEvent>>) -> Check {
    let mut by_code: BTreeMap<&'static str, usize> = BTreeMap::new();
    let mut problems = Tally::default();
    for record in records {
        if let Outcome::Refused { code, message } = &record.outcome {
            *by_code.entry(code.as_str()).or_default() += 1;
            if let Some(events) = stored.get(&key(&record.command)) {
                let id = format!("{}/{}", record.command.account, record.command.command_id);
                problems.add(
                    "refused but stored",
                    format!(
                        "{id}: answered {code} ({message}), stored at seq {}",
                        events[0].sequence
                    ),
                );
            }
        }
    }
    let counts = by_code
        .iter()
        .map(|(c, n)| format!("{n} {c}"))
        .collect::<Vec<_>>()
        .join(", ");
    let detail = if problems.is_empty() {
        format!(
            "refused: {}; none stored",
            if counts.is_empty() {
                "none".into()
            } else {
                counts
            }
        )
    } else {
        format!("refused: {counts}; {}", problems.render())
    };
    check("refused-not-stored", problems.is_empty(), detail)
}

/// All three replicas hold the same messages, up to the last sequence.
fn replicas_equal(replicas: &Result<Vec<Replica>, String>, last_sequence: u64) -> Check {
    let replicas = match replicas {
        Ok(r) => r,
        Err(e) => {
            return check(
                "replicas-equal",
                false,
                format!("cannot read the replicas: {e}"),
            )
        }
    };
    let equal = replicas.windows(2).all(|w| same_data(&w[0], &w[1]));
    let complete = replicas.iter().all(|r| r.last_seq >= last_sequence);
    let states = replicas
        .iter()
        .map(|r| {
            format!(
                "{}: {} msgs, {} bytes, seq {}..{}",
                r.node, r.messages, r.bytes, r.first_seq, r.last_seq
            )
        })
        .collect::<Vec<_>>()
        .join("; ");
    let verdict = match (equal, complete) {
        (true, true) => "equal".to_owned(),
        (false, _) => "DIFFER".to_owned(),
        (true, false) => format!("behind the stream's last sequence {last_sequence}"),
    };
    check(
        "replicas-equal",
        equal && complete,
        format!("{} replicas {verdict}: {states}", replicas.len()),
    )
}

/// Every account's read model equals the fold of its events.
fn read_models(e: &Evidence<'_>) -> Check {
    let wrong: std::collections::BTreeSet<&str> =
        e.mismatches.iter().map(|m| m.account.as_str()).collect();
    let mut by_field: BTreeMap<&str, usize> = BTreeMap::new();
    for m in e.mismatches {
        *by_field.entry(m.field).or_default() += 1;
    }
    let fields = by_field
        .iter()
        .map(|(f, n)| format!("{f} {n}"))
        .collect::<Vec<_>>()
        .join(", ");
    let caught_up = e
        .read_models
        .caught_up
        .map_or("never caught up with the stream".into(), |d| {
            format!(
                "read models at the last sequence {:.1} s after the load stopped",
                d.as_secs_f64()
            )
        });
    let mut detail = if wrong.is_empty() {
        format!(
            "{} accounts equal to a fresh fold at sequence {}; {caught_up}",
            e.expected.len(),
            e.stream.last_sequence
        )
    } else {
        format!(
            "{} of {} accounts differ from a fresh fold at sequence {} (fields: {fields}); {caught_up}",
            wrong.len(),
            e.expected.len(),
            e.stream.last_sequence
        )
    };
    let (unavailable, last) = &e.read_models.unavailable;
    if *unavailable > 0 {
        detail.push_str(&format!(
            "; {unavailable} queries answered unavailable with Redis up (a wedged projector copy?), last: {}",
            last.as_deref().unwrap_or("")
        ));
    }
    check("read-models", wrong.is_empty() && *unavailable == 0, detail)
}

/// `query.accounts.totals` equals the fold's open accounts and balance sum.
fn totals(expected: &BTreeMap<String, Expected>, answer: &Result<Value, String>) -> Check {
    let open = expected.values().filter(|a| a.is_open()).count() as u64;
    let sum: u64 = expected.values().map(|a| a.state.balance).sum();
    let want = format!("open_accounts {open}, balance_sum {sum}");
    match answer {
        Ok(got) => {
            let ok = got["open_accounts"].as_u64() == Some(open)
                && got["balance_sum"].as_u64() == Some(sum);
            let got = format!(
                "open_accounts {}, balance_sum {}",
                got["open_accounts"], got["balance_sum"]
            );
            let detail = if ok {
                want
            } else {
                format!("expected {want}, got {got}")
            };
            check("totals", ok, detail)
        }
        Err(e) => check("totals", false, format!("expected {want}, got error: {e}")),
    }
}

/// No reply, to a command or a query, was `internal`.
fn no_internal(stats: &Stats) -> Check {
    use std::sync::atomic::Ordering::Relaxed;
    let (commands, queries) = (
        stats.internal.load(Relaxed),
        stats.query_internal.load(Relaxed),
    );
    let mut detail = format!("{commands} command and {queries} query replies were internal");
    let messages = stats.internal_messages();
    if !messages.is_empty() {
        let mut top: Vec<(&String, &u64)> = messages.iter().collect();
        top.sort_by(|a, b| b.1.cmp(a.1));
        let shown: Vec<String> = top
            .iter()
            .take(3)
            .map(|(m, n)| format!("{n}x {m:?}"))
            .collect();
        detail.push_str(&format!(": {}", shown.join("; ")));
    }
    check("no-internal", commands + queries == 0, detail)
}

/// Which side a recovery check looks at: the probe's time, and the faults
/// whose replacement worker serves that side (the snapshotter serves
/// command loading).
struct Side {
    name: &'static str,
    time: fn(&FaultRecord) -> Option<Duration>,
    replaced: &'static [Fault],
}

const COMMANDS: Side = Side {
    name: "commands-recover",
    time: |f| f.commands,
    replaced: &[Fault::CommandWorker, Fault::Snapshotter],
};

const QUERIES: Side = Side {
    name: "queries-recover",
    time: |f| f.queries,
    replaced: &[Fault::ApplyingProjector],
};

/// Each fault was injected, the side answered correctly again within the
/// bound, and the replacement worker serving it came up.
fn recovered(faults: &[FaultRecord], bound: Duration, side: &Side) -> Check {
    let problems: Vec<String> = faults
        .iter()
        .enumerate()
        .filter_map(|(i, f)| {
            let what = if f.target == "-" {
                "not injected".to_owned()
            } else if (side.time)(f).is_none_or(|d| d > bound) {
                format!("not recovered within {} s", bound.as_secs())
            } else if side.replaced.contains(&f.fault) && f.replacement_failed.is_some() {
                f.replacement_failed.clone().unwrap_or_default()
            } else {
                return None;
            };
            Some(format!("fault {} ({:?}): {what}", i + 1, f.fault))
        })
        .collect();
    let worst = faults
        .iter()
        .filter_map(|f| (side.time)(f).map(|d| (d, f.fault)))
        .max_by_key(|(d, _)| *d)
        .map_or("none".into(), |(d, f)| {
            format!("{:.2} s after {f:?}", d.as_secs_f64())
        });
    let detail = if problems.is_empty() {
        format!(
            "{} faults, all within {} s; slowest {worst}",
            faults.len(),
            bound.as_secs()
        )
    } else {
        format!("{}; slowest measured {worst}", problems.join("; "))
    };
    check(side.name, problems.is_empty(), detail)
}

/// Every worker running at the end exited within [`STOP_BOUND`] of SIGTERM
/// (one that had died on its own is named, not timed).
fn shutdown(stopped: &[Stopped]) -> Check {
    let timed: Vec<&Stopped> = stopped.iter().filter(|s| !s.early).collect();
    let slow: Vec<String> = timed
        .iter()
        .filter(|s| s.after.is_none_or(|d| d > STOP_BOUND))
        .map(|s| match s.after {
            Some(d) => format!("{} ({:.1} s)", s.name, d.as_secs_f64()),
            None => format!("{} (did not stop)", s.name),
        })
        .collect();
    let slowest = timed
        .iter()
        .filter_map(|s| s.after.map(|d| (d, &s.name)))
        .max_by_key(|(d, _)| *d)
        .map_or("none".into(), |(d, n)| {
            format!("{n} {:.2} s", d.as_secs_f64())
        });
    let mut detail = if slow.is_empty() {
        format!(
            "{} workers stopped within {} s of SIGTERM; slowest {slowest}",
            timed.len(),
            STOP_BOUND.as_secs()
        )
    } else {
        format!(
            "slower than {} s: {}",
            STOP_BOUND.as_secs(),
            slow.join(", ")
        )
    };
    let early: Vec<&str> = stopped
        .iter()
        .filter(|s| s.early)
        .map(|s| s.name.as_str())
        .collect();
    if !early.is_empty() {
        detail.push_str(&format!("; already exited before: {}", early.join(", ")));
    }
    check("shutdown", !timed.is_empty() && slow.is_empty(), detail)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::fold::tests::event;

    fn record(account: &str, id: &str, command_type: &'static str, outcome: Outcome) -> Record {
        Record {
            command: Command {
                account: account.into(),
                command_type,
                data: json!({"amount": 5}),
                command_id: id.into(),
            },
            outcome,
            attempts: 1,
        }
    }

    fn acked(version: u64, sequence: u64) -> Outcome {
        Outcome::Acked {
            version,
            sequence,
            events: 1,
        }
    }

    fn judge_stream(records: &[Record], events: Vec<RecordedEvent>) -> (Check, Check) {
        let stream = Contents {
            last_sequence: events.len() as u64,
            messages: events.len() as u64,
            events,
            malformed: vec![],
        };
        let stats = Stats::default();
        let evidence = Evidence {
            records,
            stream: &stream,
            replicas: &Ok(vec![]),
            expected: &BTreeMap::new(),
            read_models: &ReadModels {
                caught_up: None,
                accounts: BTreeMap::new(),
                totals: Err("-".into()),
                unavailable: (0, None),
            },
            mismatches: &[],
            faults: &[],
            stopped: &[],
            stats: &stats,
            recovery_bound: Duration::from_secs(30),
            settled: &Ok(Duration::ZERO),
            trusted: &TrustedKeys::default(),
        };
        let stored = stored_by_command(&stream.events);
        (
            acked_stored_once(&evidence, &stored),
            refused_not_stored(records, &stored),
        )
    }

    #[test]
    fn chains_intact_needs_every_event_linked_and_signed() {
        let events = vec![
            event(1, "a", 1, "open", "AccountOpened", json!({"owner": "o"})),
            event(2, "a", 2, "d1", "Deposited", json!({"amount": 5})),
        ];
        // Written without hashes or signatures: not what the run's writers do.
        let check = chains_intact(&events, &TrustedKeys::default());
        assert!(!check.passed, "{}", check.detail);
        let mut gap = events.clone();
        gap.remove(0);
        let check = chains_intact(&gap, &TrustedKeys::default());
        assert!(
            !check.passed && check.detail.contains("broken"),
            "{}",
            check.detail
        );
    }

    #[test]
    fn acknowledged_commands_stored_once_as_acknowledged_pass() {
        let records = [
            record("a", "d1", "Deposit", acked(2, 2)),
            record(
                "a",
                "w1",
                "Withdraw",
                Outcome::Refused {
                    code: ErrorCode::Rejected,
                    message: "no".into(),
                },
            ),
        ];
        let events = vec![
            event(1, "a", 1, "open", "AccountOpened", json!({"owner": "o"})),
            event(2, "a", 2, "d1", "Deposited", json!({"amount": 5})),
        ];
        let mut records = records.to_vec();
        records.push(record("a", "open", "OpenAccount", acked(1, 1)));
        let (once, refused) = judge_stream(&records, events);
        assert!(once.passed, "{}", once.detail);
        assert!(refused.passed, "{}", refused.detail);
    }

    #[test]
    fn doubled_missing_unknown_and_refused_but_stored_commands_fail() {
        let records = [
            record("a", "d1", "Deposit", acked(1, 1)),
            record("a", "d2", "Deposit", acked(3, 3)),
            record(
                "a",
                "w1",
                "Withdraw",
                Outcome::Refused {
                    code: ErrorCode::Internal,
                    message: "oops".into(),
                },
            ),
        ];
        let events = vec![
            event(1, "a", 1, "d1", "Deposited", json!({"amount": 5})),
            event(2, "a", 2, "d1", "Deposited", json!({"amount": 5})),
            event(3, "a", 3, "w1", "Withdrawn", json!({"amount": 5})),
            event(4, "a", 4, "x9", "Deposited", json!({"amount": 5})),
        ];
        let (once, refused) = judge_stream(&records, events);
        assert!(!once.passed);
        for problem in [
            "stored more than once",
            "acknowledged but not stored",
            "stored but never sent",
        ] {
            assert!(once.detail.contains(problem), "{problem}: {}", once.detail);
        }
        assert!(!refused.passed);
        assert!(
            refused
                .detail
                .contains("a/w1: answered internal (oops), stored at seq 3"),
            "{}",
            refused.detail
        );
    }

    fn transfer(seq: u64, from: &str, to: &str, id: &str, amount: u64) -> [RecordedEvent; 2] {
        let sent = event(
            seq,
            from,
            2,
            id,
            "TransferSent",
            json!({"to": to, "amount": amount}),
        );
        let mut received = event(
            seq + 1,
            to,
            2,
            id,
            "TransferReceived",
            json!({"from": from, "amount": amount}),
        );
        received.command_aggregate = Some(format!("account.{from}"));
        [sent, received]
    }

    #[test]
    fn a_transfer_is_one_command_of_its_sender_stored_whole() {
        let mut records = vec![
            record("a", "open", "OpenAccount", acked(1, 1)),
            record("b", "open", "OpenAccount", acked(1, 2)),
        ];
        let mut t = record("a", "t1", "Transfer", acked(2, 4));
        t.command.data = json!({"to": "b", "amount": 5});
        records.push(t);
        let mut events = vec![
            event(1, "a", 1, "open", "AccountOpened", json!({"owner": "o"})),
            event(2, "b", 1, "open", "AccountOpened", json!({"owner": "o"})),
        ];
        events.extend(transfer(3, "a", "b", "t1", 5));
        let (once, refused) = judge_stream(&records, events.clone());
        assert!(once.passed, "{}", once.detail);
        assert!(refused.passed, "{}", refused.detail);
        let whole = transfers_whole(&events);
        assert!(whole.passed, "{}", whole.detail);
    }

    #[test]
    fn a_split_or_mismatched_transfer_fails() {
        let [sent, received] = transfer(1, "a", "b", "t1", 5);
        let between = event(2, "c", 1, "d", "Deposited", json!({"amount": 1}));
        let split = transfers_whole(&[sent.clone(), between, received.clone()]);
        assert!(!split.passed);
        assert!(
            split.detail.contains("sent without its received half"),
            "{}",
            split.detail
        );
        assert!(
            split.detail.contains("received without its sent half"),
            "{}",
            split.detail
        );
        let [_, other_amount] = transfer(1, "a", "b", "t1", 6);
        let wrong = transfers_whole(&[sent.clone(), other_amount]);
        assert!(!wrong.passed, "{}", wrong.detail);
        let alone = transfers_whole(&[sent]);
        assert!(!alone.passed, "{}", alone.detail);
    }
}
