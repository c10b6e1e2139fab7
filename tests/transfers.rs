//! Multi-aggregate commands under load: transfers in both directions among
//! a few accounts, from many clients, through three worker processes, with
//! fsync per message, on one node and on a 3-node R3 cluster that loses a
//! node mid-run. A reader of the whole stream then checks that money is
//! conserved at every stream sequence, that no transfer is half applied
//! (its two events are adjacent, one command), and that every acknowledged
//! transfer is stored exactly once and every refused one not at all.

#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::ops::ControlFlow;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use jetsource_bank::account::AccountEvent;
use jetsource_core::envelope::RecordedEvent;
use jetsource_core::protocol::{decode_reply, CommandOutcome, ErrorBody, ErrorCode};
use jetsource_test_support::{NatsCluster, NatsServer, Sync};
use jetsource_tests::{wait_for_service, Process};
use serde_json::json;

const ACCOUNTS: usize = 4;
const START: u64 = 1_000;
const CLIENTS: usize = 24;
const TRANSFERS_PER_CLIENT: usize = 20;
const WORKERS: usize = 3;

/// Sends until the answer is definite, resending with the same command id
/// after a lost reply or `unavailable`/`timeout` (a node dying). Any other
/// error than a refusal fails the test.
async fn send_until_definite(
    client: &async_nats::Client,
    from: &str,
    body: &serde_json::Value,
    deadline: Instant,
) -> Result<CommandOutcome, ErrorBody> {
    loop {
        let request = client.request(format!("cmd.account.{from}"), body.to_string().into());
        if let Ok(Ok(reply)) = tokio::time::timeout(Duration::from_secs(12), request).await {
            match decode_reply::<CommandOutcome>(&reply.payload).unwrap() {
                Err(e) if matches!(e.code, ErrorCode::Unavailable | ErrorCode::Timeout) => {}
                Err(e) => {
                    assert!(
                        matches!(e.code, ErrorCode::Rejected | ErrorCode::Conflict),
                        "{from} {body}: {:?} {}",
                        e.code,
                        e.message
                    );
                    return Err(e);
                }
                Ok(outcome) => return Ok(outcome),
            }
        }
        assert!(
            Instant::now() < deadline,
            "{from} {body}: no definite answer in time"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Outcome of the load: command ids of acknowledged and refused transfers.
#[derive(Default)]
struct Sent {
    acknowledged: Vec<String>,
    refused: Vec<String>,
}

/// Opens the accounts, then runs every client's transfers; `acked` counts
/// acknowledged transfers as they come (the fault schedule watches it).
async fn run_load(client: &async_nats::Client, acked: Arc<AtomicUsize>) -> Sent {
    let deadline = Instant::now() + Duration::from_secs(240);
    for a in 0..ACCOUNTS {
        let body = json!({"type": "OpenAccount", "data": {"owner": "o", "initial_deposit": START}, "command_id": "open"});
        send_until_definite(client, &format!("t{a}"), &body, deadline)
            .await
            .unwrap();
    }
    let mut tasks = Vec::new();
    for c in 0..CLIENTS {
        let client = client.clone();
        let acked = acked.clone();
        tasks.push(tokio::spawn(async move {
            let mut sent = Sent::default();
            for k in 0..TRANSFERS_PER_CLIENT {
                let from = (c + k) % ACCOUNTS;
                let to = (from + 1 + (c * 7 + k * 3) % (ACCOUNTS - 1)) % ACCOUNTS;
                let amount = 1 + (c * 31 + k * 17) % 300;
                let command_id = format!("x{c}-{k}");
                let body = json!({"type": "Transfer", "data": {"to": format!("t{to}"), "amount": amount}, "command_id": command_id});
                let from = format!("t{from}");
                match send_until_definite(&client, &from, &body, deadline).await {
                    Ok(first) => {
                        acked.fetch_add(1, Ordering::Relaxed);
                        if k % 4 == 0 {
                            // A client that resends gets the first outcome.
                            let again = send_until_definite(&client, &from, &body, deadline)
                                .await
                                .unwrap();
                            assert!(again.duplicate, "{command_id}: resend stored again");
                            assert_eq!(again.sequence, first.sequence, "{command_id}");
                            assert_eq!(again.others, first.others, "{command_id}");
                        }
                        sent.acknowledged.push(command_id);
                    }
                    Err(_) => sent.refused.push(command_id),
                }
            }
            sent
        }));
    }
    let mut all = Sent::default();
    for task in tasks {
        let sent = task.await.unwrap();
        all.acknowledged.extend(sent.acknowledged);
        all.refused.extend(sent.refused);
    }
    all
}

/// Every event of the stream, in order, as the stream leader has them:
/// read until the sequences run without a gap up to the leader's last (a
/// replica that answers a read may lag behind a node that restarted).
async fn whole_stream(client: &async_nats::Client, url: &str) -> Vec<RecordedEvent> {
    let store = jetsource_tests::open_store(client, url).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let last = store.last_sequence().await;
        let mut events = Vec::new();
        let read = store
            .read_all(1, |chunk| {
                events.extend(chunk);
                ControlFlow::Continue(())
            })
            .await;
        if let (Ok(last), Ok(())) = (last, read) {
            let events: Vec<RecordedEvent> = events
                .into_iter()
                .map(|m| m.into_event().unwrap())
                .collect();
            let complete = events.len() as u64 == last
                && events.iter().zip(1..).all(|(e, seq)| e.sequence == seq);
            if complete {
                return events;
            }
        }
        assert!(
            Instant::now() < deadline,
            "the stream could not be read whole"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn decode(event: &RecordedEvent) -> AccountEvent {
    let data: serde_json::Value = serde_json::from_slice(&event.data).unwrap();
    serde_json::from_value(json!({"type": event.event_type, "data": data})).unwrap()
}

/// Folds the stream in order and checks the invariants (module docs).
fn check(events: &[RecordedEvent], sent: &Sent) {
    let mut balances: HashMap<&str, i128> = HashMap::new();
    let mut opened = 0;
    let mut stored: HashMap<&str, usize> = HashMap::new();
    for (i, event) in events.iter().enumerate() {
        let decoded = decode(event);
        let id = event.aggregate_id.as_str();
        if let AccountEvent::AccountOpened { .. } = decoded {
            opened += 1;
        }
        if let Some(m) = decoded.movement() {
            let change = i128::from(m.amount);
            let balance = balances.entry(id).or_default();
            *balance += if m.credit { change } else { -change };
            assert!(*balance >= 0, "#{}: {id} below zero", event.sequence);
        }
        match &decoded {
            AccountEvent::TransferSent { to, amount } => {
                let next = events.get(i + 1).expect("a transfer's second half");
                let command = event.command_id.as_deref().unwrap();
                assert_eq!(
                    (next.aggregate_id.as_str(), decode(next)),
                    (
                        to.as_str(),
                        AccountEvent::TransferReceived {
                            from: id.to_owned(),
                            amount: *amount
                        }
                    ),
                    "#{}: the transfer's other side must follow it directly",
                    event.sequence
                );
                assert_eq!(next.command_id.as_deref(), Some(command));
                assert_eq!(
                    next.command_aggregate.as_deref(),
                    Some(format!("account.{id}").as_str())
                );
                *stored.entry(command).or_default() += 1;
            }
            AccountEvent::TransferReceived { .. } => {
                let before = &events[i - 1];
                assert!(
                    matches!(decode(before), AccountEvent::TransferSent { .. }),
                    "#{}: a received half without its sent half",
                    event.sequence
                );
            }
            AccountEvent::AccountOpened { .. } => continue,
            _ => {}
        }
        if !matches!(decoded, AccountEvent::TransferSent { .. }) {
            let sum: i128 = balances.values().sum();
            assert_eq!(
                sum,
                i128::from(START) * opened,
                "#{}: money is not conserved",
                event.sequence
            );
        }
    }
    assert_eq!(opened, ACCOUNTS as i128);
    for command in &sent.acknowledged {
        assert_eq!(
            stored.get(command.as_str()),
            Some(&1),
            "{command}: acknowledged, stored once"
        );
    }
    for command in &sent.refused {
        assert_eq!(
            stored.get(command.as_str()),
            None,
            "{command}: refused, stored"
        );
    }
    assert_eq!(
        stored.len(),
        sent.acknowledged.len(),
        "only acknowledged transfers are stored"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_transfers_conserve_money_on_one_node() {
    let server = NatsServer::start_with(Sync::Always);
    let client = server.client().await;
    let _workers: Vec<Process> = (0..WORKERS)
        .map(|_| Process::start("jetsource-command", &server, &[]))
        .collect();
    wait_for_service(&client, "jetsource-command", WORKERS).await;
    let sent = run_load(&client, Arc::default()).await;
    assert!(
        sent.acknowledged.len() > CLIENTS * TRANSFERS_PER_CLIENT / 2,
        "most transfers go through: {} of {}",
        sent.acknowledged.len(),
        CLIENTS * TRANSFERS_PER_CLIENT
    );
    check(&whole_stream(&client, &server.url()).await, &sent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_transfers_conserve_money_on_a_cluster_that_loses_a_node() {
    let mut cluster = NatsCluster::start_with(Sync::Always);
    let client = cluster.client().await;
    let urls = cluster.urls();
    let _workers: Vec<Process> = (0..WORKERS)
        .map(|_| {
            Process::start_at(
                "jetsource-command",
                &urls,
                &[("JETSOURCE__STORE__REPLICAS", "3")],
                None,
            )
        })
        .collect();
    wait_for_service(&client, "jetsource-command", WORKERS).await;
    let acked = Arc::new(AtomicUsize::new(0));
    let load = tokio::spawn({
        let client = client.clone();
        let acked = acked.clone();
        async move { run_load(&client, acked).await }
    });
    // Kill a node a third of the way in and bring it back at two thirds.
    let total = CLIENTS * TRANSFERS_PER_CLIENT;
    let deadline = Instant::now() + Duration::from_secs(240);
    for (share, fault) in [(3, true), (2, false)] {
        while acked.load(Ordering::Relaxed) < total / share && !load.is_finished() {
            assert!(Instant::now() < deadline, "the load stalled");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if fault {
            cluster.kill_node(1);
        } else {
            cluster.start_node(1);
        }
    }
    let sent = load.await.unwrap();
    assert!(
        sent.acknowledged.len() > total / 2,
        "most transfers go through: {} of {total}",
        sent.acknowledged.len()
    );
    check(&whole_stream(&client, &urls).await, &sent);
}
