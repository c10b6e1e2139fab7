//! For random command sequences, the state from a snapshot plus the tail
//! equals the state from a full replay, at every version. Pure: no server.

#![allow(clippy::unwrap_used)]

use jetsource_core::aggregate::{DynAggregate, NewEvent};
use jetsource_core::loader::Loaded;
use jetsource_core::snapshot::Snapshot;
use proptest::prelude::*;
use serde_json::json;

#[derive(Debug, Clone)]
enum Cmd {
    Deposit(u64),
    Withdraw(u64),
    Close,
}

fn cmd() -> impl Strategy<Value = Cmd> {
    prop_oneof![
        5 => (1u64..1000).prop_map(Cmd::Deposit),
        4 => (1u64..1500).prop_map(Cmd::Withdraw),
        1 => Just(Cmd::Close),
    ]
}

/// Runs the commands through the domain; returns every accepted event.
fn history(account: &dyn DynAggregate, initial: u64, commands: &[Cmd]) -> Vec<NewEvent> {
    let mut state = account.initial();
    let mut events = Vec::new();
    let mut run = |t: &str, data: serde_json::Value, state: &mut _| {
        if let Ok(d) = account
            .parse(t, data)
            .and_then(|c| account.decide(state, &c))
        {
            *state = d.state;
            events.extend(d.events);
        }
    };
    run(
        "OpenAccount",
        json!({"owner": "p", "initial_deposit": initial}),
        &mut state,
    );
    for c in commands {
        match c {
            Cmd::Deposit(a) => run("Deposit", json!({"amount": a}), &mut state),
            Cmd::Withdraw(a) => run("Withdraw", json!({"amount": a}), &mut state),
            Cmd::Close => run("CloseAccount", json!({}), &mut state),
        }
    }
    events
}

fn fold(
    account: &dyn DynAggregate,
    from: Loaded,
    events: &[NewEvent],
    first_sequence: u64,
) -> Loaded {
    let mut loaded = from;
    let mut iter = events
        .iter()
        .map(|e| jetsource_core::aggregate::StoredEvent {
            event_type: &e.event_type,
            schema_version: 1,
            data: &e.data,
        });
    loaded.state = account.fold(&loaded.state, &mut iter).unwrap();
    loaded.version += events.len() as u64;
    if !events.is_empty() {
        loaded.last_sequence = first_sequence + events.len() as u64 - 1;
        loaded.last_timestamp = Some(
            time::OffsetDateTime::UNIX_EPOCH + time::Duration::seconds(loaded.last_sequence as i64),
        );
    }
    loaded
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn snapshot_plus_tail_equals_full_replay(initial in 0u64..500, commands in prop::collection::vec(cmd(), 0..60)) {
        let registry = jetsource_bank::registry();
        let account = registry.get("account").unwrap().as_ref();
        let events = history(account, initial, &commands);
        let full = fold(account, Loaded::empty(account), &events, 1);
        for k in 1..=events.len() {
            // Snapshot at version k, through its stored bytes.
            let at_k = fold(account, Loaded::empty(account), &events[..k], 1);
            let snapshot = at_k.to_snapshot(account, "p1").unwrap();
            let bytes = serde_json::to_vec(&snapshot).unwrap();
            let decoded = Snapshot::decode(&bytes, account.state_schema_version()).unwrap();
            prop_assert_eq!(decoded.version, k as u64);
            let restored = Loaded::from_snapshot(account, decoded).unwrap();
            prop_assert_eq!(account.state_to_json(&restored.state), account.state_to_json(&at_k.state));
            let resumed = fold(account, restored, &events[k..], k as u64 + 1);
            prop_assert_eq!(resumed.version, full.version);
            prop_assert_eq!(resumed.last_sequence, full.last_sequence);
            prop_assert_eq!(account.state_to_json(&resumed.state), account.state_to_json(&full.state));
        }
    }
}

#[test]
fn a_damaged_snapshot_is_refused_with_a_reason() {
    let registry = jetsource_bank::registry();
    let account = registry.get("account").unwrap().as_ref();
    let events = history(account, 10, &[Cmd::Deposit(5)]);
    let loaded = fold(account, Loaded::empty(account), &events, 1);
    let snapshot = loaded.to_snapshot(account, "p1").unwrap();
    let good = serde_json::to_vec(&snapshot).unwrap();
    assert!(Snapshot::decode(&good, 1).is_ok());

    let mut tampered = snapshot.clone();
    tampered.state["balance"] = json!(1_000_000);
    let err = Snapshot::decode(&serde_json::to_vec(&tampered).unwrap(), 1).unwrap_err();
    assert!(err.contains("checksum"), "{err}");

    let mut old = snapshot.clone();
    old.state_schema = 0;
    let old = old.seal();
    let err = Snapshot::decode(&serde_json::to_vec(&old).unwrap(), 1).unwrap_err();
    assert!(err.contains("schema"), "{err}");

    let mut future = snapshot.clone();
    future.format = 9;
    let err = Snapshot::decode(&serde_json::to_vec(&future).unwrap(), 1).unwrap_err();
    assert!(err.contains("format"), "{err}");

    let err = Snapshot::decode(b"{not json", 1).unwrap_err();
    assert!(err.contains("undecodable"), "{err}");
    // Valid envelope and checksum, but state of the wrong shape.
    let mut wrong = snapshot;
    wrong.state = json!({"balance": "lots"});
    let wrong = wrong.seal();
    let decoded = Snapshot::decode(&serde_json::to_vec(&wrong).unwrap(), 1).unwrap();
    assert!(Loaded::from_snapshot(account, decoded).is_err());
}
