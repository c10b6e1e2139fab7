//! Multi-aggregate commands end to end: the bank's `Transfer`, sent to one
//! account, decides over two and appends both sides atomically.

#![allow(clippy::unwrap_used)]

use crate::common::Fleet;
use jetsource_core::protocol::{ErrorCode, OtherOutcome, ReplyEvent};
use serde_json::json;

async fn open(fleet: &Fleet, id: &str, deposit: u64) {
    fleet
        .send(
            "account",
            id,
            json!({"type": "OpenAccount", "data": {"owner": "o", "initial_deposit": deposit}}),
        )
        .await
        .unwrap();
}

fn transfer(to: &str, amount: u64, command_id: &str) -> serde_json::Value {
    json!({"type": "Transfer", "data": {"to": to, "amount": amount}, "command_id": command_id})
}

/// The balance a fresh fold of the stored events gives.
async fn balance(fleet: &Fleet, id: &str) -> u64 {
    let store = fleet.store().await;
    let events = store.read_confirmed("account", id, 1).await.unwrap();
    let registry = jetsource_bank::registry();
    let account = registry.get("account").unwrap();
    let state = account
        .fold(&account.initial(), &mut events.iter().map(|e| e.stored()))
        .unwrap();
    account.state_to_json(&state)["balance"].as_u64().unwrap()
}

#[tokio::test]
async fn a_transfer_appends_both_sides_in_one_batch() {
    let fleet = Fleet::start(1).await;
    open(&fleet, "a", 100).await;
    open(&fleet, "b", 0).await;
    let before = fleet.stream_messages().await;
    let sent = fleet
        .send("account", "a", transfer("b", 30, "t1"))
        .await
        .unwrap();
    assert_eq!(sent.version, 3, "a: opened, deposited, sent");
    assert_eq!(
        sent.sequence,
        before + 2,
        "sequence is the command's last event"
    );
    assert_eq!(
        sent.events,
        [ReplyEvent {
            event_type: "TransferSent".into(),
            data: json!({"to": "b", "amount": 30}),
        }]
    );
    assert_eq!(
        sent.others,
        [OtherOutcome {
            aggregate_type: "account".into(),
            aggregate_id: "b".into(),
            version: 2,
            events: vec![ReplyEvent {
                event_type: "TransferReceived".into(),
                data: json!({"from": "a", "amount": 30}),
            }],
        }]
    );
    // Both events carry the command; b's names a as its owner.
    let store = fleet.store().await;
    let a = store.read_confirmed("account", "a", 1).await.unwrap();
    let b = store.read_confirmed("account", "b", 1).await.unwrap();
    let (sent_event, received) = (a.last().unwrap(), b.last().unwrap());
    assert_eq!(
        received.sequence,
        sent_event.sequence + 1,
        "adjacent in the stream"
    );
    assert_eq!(sent_event.command_id.as_deref(), Some("t1"));
    assert_eq!(sent_event.command_aggregate, None);
    assert_eq!(received.command_id.as_deref(), Some("t1"));
    assert_eq!(received.command_aggregate.as_deref(), Some("account.a"));
    assert_eq!(received.correlation_id, sent_event.correlation_id);

    // A resend is answered with the first outcome, both sides, and stores
    // nothing.
    let again = fleet
        .send("account", "a", transfer("b", 30, "t1"))
        .await
        .unwrap();
    assert!(again.duplicate);
    assert_eq!(
        (again.version, again.sequence, &again.events, &again.others),
        (sent.version, sent.sequence, &sent.events, &sent.others)
    );
    assert_eq!(fleet.stream_messages().await, before + 2);

    // The command id is a's: b's own command with the same id is not a
    // resend of the transfer, and vice versa.
    let own = fleet
        .send(
            "account",
            "b",
            json!({"type": "Withdraw", "data": {"amount": 5}, "command_id": "t1"}),
        )
        .await
        .unwrap();
    assert!(!own.duplicate, "b's own t1 is a new command");
    assert_eq!(own.version, 3);
    assert_eq!(balance(&fleet, "a").await, 70);
    assert_eq!(balance(&fleet, "b").await, 25);
    fleet.shutdown().await;
}

#[tokio::test]
async fn a_refused_transfer_stores_nothing_on_either_side() {
    let fleet = Fleet::start(1).await;
    open(&fleet, "a", 10).await;
    open(&fleet, "b", 0).await;
    let before = fleet.stream_messages().await;
    let refusals = [
        (
            transfer("b", 11, "x1"),
            ErrorCode::Rejected,
            "insufficient funds",
        ),
        (
            transfer("nobody", 1, "x2"),
            ErrorCode::Rejected,
            "account nobody is not open",
        ),
        (
            transfer("a", 1, "x3"),
            ErrorCode::Invalid,
            "the aggregate it is sent to",
        ),
        (
            transfer("b.c", 1, "x4"),
            ErrorCode::Invalid,
            "not a valid aggregate id",
        ),
        (transfer("b", 0, "x5"), ErrorCode::Invalid, "positive"),
        (
            json!({"type": "Transfer", "data": {"to": "b"}}),
            ErrorCode::Invalid,
            "amount",
        ),
    ];
    for (body, code, text) in refusals {
        let e = fleet.send("account", "a", body.clone()).await.unwrap_err();
        assert_eq!(e.code, code, "{body}: {}", e.message);
        assert!(e.message.contains(text), "{body}: {}", e.message);
    }
    fleet
        .send("account", "b", json!({"type": "CloseAccount", "data": {}}))
        .await
        .unwrap();
    let closed = fleet
        .send("account", "a", transfer("b", 1, "x6"))
        .await
        .unwrap_err();
    assert_eq!(closed.code, ErrorCode::Rejected);
    assert!(
        closed.message.contains("account b is closed"),
        "{}",
        closed.message
    );
    assert_eq!(fleet.stream_messages().await, before + 1, "only the close");
    fleet.shutdown().await;
}
