//! Two workers, many concurrent clients, a few hot accounts: no lost update,
//! no doubled event, per-aggregate order intact.

#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use crate::common::Fleet;
use jetsource_core::config::{NatsConfig, StoreConfig};
use jetsource_core::loader::{Loaded, Until};
use jetsource_core::protocol::{decode_reply, CommandOutcome, ErrorBody, ErrorCode};
use jetsource_core::store::EventStore;
use serde_json::json;

const ACCOUNTS: usize = 4;
const CLIENTS: usize = 32;
const OPS_PER_CLIENT: usize = 25;

/// Sends with a command id and resends on `unavailable` or a lost reply, so
/// every operation ends in a definite outcome.
async fn send_until_definite(
    client: &async_nats::Client,
    account: &str,
    body: serde_json::Value,
) -> Result<CommandOutcome, ErrorBody> {
    for _ in 0..20 {
        let request = client.request(format!("cmd.account.{account}"), body.to_string().into());
        match tokio::time::timeout(Duration::from_secs(10), request).await {
            Ok(Ok(reply)) => match decode_reply(&reply.payload).unwrap() {
                Err(e) if e.code == ErrorCode::Unavailable => continue,
                definite => return definite,
            },
            _ => continue,
        }
    }
    panic!("no definite outcome for {body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_clients_on_two_workers_lose_no_update() {
    let fleet = Fleet::start(2).await;
    for a in 0..ACCOUNTS {
        fleet
            .send(
                "account",
                &format!("hot-{a}"),
                json!({"type": "OpenAccount", "data": {"owner": "o"}}),
            )
            .await
            .unwrap();
    }

    let mut tasks = Vec::new();
    for c in 0..CLIENTS {
        let client = fleet.client.clone();
        tasks.push(tokio::spawn(async move {
            // (account, signed amount, version, sequence) of every acknowledged op
            let mut acked = Vec::new();
            let mut conflicts = 0;
            for op in 0..OPS_PER_CLIENT {
                let account = format!("hot-{}", (c + op) % ACCOUNTS);
                // Deterministic mix: mostly deposits, some withdrawals that
                // may be refused for lack of funds.
                let amount = ((c * 7 + op * 13) % 50 + 1) as i64;
                let (kind, signed) = if (c + op) % 3 == 0 {
                    ("Withdraw", -amount)
                } else {
                    ("Deposit", amount)
                };
                let body = json!({
                    "type": kind,
                    "data": {"amount": amount},
                    "command_id": format!("c{c}-op{op}"),
                });
                match send_until_definite(&client, &account, body).await {
                    Ok(outcome) => {
                        assert_eq!(outcome.events.len(), 1);
                        acked.push((account, signed, outcome.version, outcome.sequence));
                    }
                    Err(e) if e.code == ErrorCode::Conflict => conflicts += 1,
                    Err(e) if e.code == ErrorCode::Rejected => {
                        assert!(e.message.contains("insufficient funds"), "{e}");
                    }
                    Err(e) => panic!("unexpected error {e}"),
                }
            }
            (acked, conflicts)
        }));
    }
    let mut acked = Vec::new();
    let mut conflicts = 0;
    for task in tasks {
        let (a, c) = task.await.unwrap();
        acked.extend(a);
        conflicts += c;
    }
    println!(
        "{} acknowledged, {conflicts} gave up on conflicts",
        acked.len()
    );
    assert!(
        acked.len() > CLIENTS * OPS_PER_CLIENT / 2,
        "most operations must succeed"
    );

    let mut expected: BTreeMap<String, i64> = BTreeMap::new();
    let mut versions: BTreeMap<String, BTreeSet<u64>> = BTreeMap::new();
    let mut sequences = BTreeSet::new();
    for (account, signed, version, sequence) in &acked {
        *expected.entry(account.clone()).or_default() += signed;
        assert!(
            versions
                .entry(account.clone())
                .or_default()
                .insert(*version),
            "two acknowledged commands on {account} claim version {version}"
        );
        assert!(
            sequences.insert(*sequence),
            "sequence {sequence} acknowledged twice"
        );
    }

    // Every acknowledged command is in the stream exactly once, nothing else
    // is, and a fresh fold gives the acknowledged balance.
    let store = EventStore::open(
        fleet.client.clone(),
        &NatsConfig {
            url: fleet.server.url(),
            ..Default::default()
        },
        &StoreConfig::default(),
    )
    .await
    .unwrap();
    let registry = jetsource_bank::registry();
    let aggregate = registry.get("account").unwrap();
    for a in 0..ACCOUNTS {
        let id = format!("hot-{a}");
        let loaded = Loaded::load(&store, aggregate.as_ref(), &id, Until::End)
            .await
            .unwrap();
        let state = aggregate.state_to_json(&loaded.state);
        let want = expected.get(&id).copied().unwrap_or(0);
        assert_eq!(state["balance"].as_i64().unwrap(), want, "balance of {id}");
        let ops = versions.get(&id).map_or(0, BTreeSet::len) as u64;
        assert_eq!(
            loaded.version,
            ops + 1,
            "{id}: opened plus one event per acknowledged op"
        );
        // Versions of acknowledged ops are exactly 2..=version: gap-free order.
        let got: Vec<u64> = versions[&id].iter().copied().collect();
        assert_eq!(got, (2..=loaded.version).collect::<Vec<_>>());
    }
    assert_eq!(
        fleet.stream_messages().await,
        ACCOUNTS as u64 + acked.len() as u64
    );
    fleet.shutdown().await;
}
