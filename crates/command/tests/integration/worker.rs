//! The command worker end to end over NATS request-reply, against a real
//! nats-server.

#![allow(clippy::unwrap_used)]

use crate::common::Fleet;
use jetsource_core::protocol::{CommandOutcome, ErrorCode};
use serde_json::{json, Value};

/// What a resend of the command that got `first` is answered.
fn resent(first: &CommandOutcome) -> CommandOutcome {
    assert!(!first.duplicate, "the first outcome is not a duplicate");
    CommandOutcome {
        duplicate: true,
        ..first.clone()
    }
}

#[tokio::test]
async fn commands_end_to_end() {
    let fleet = Fleet::start(1).await;
    let open = fleet
        .send(
            "account",
            "a1",
            json!({"type": "OpenAccount", "data": {"owner": "ada"}}),
        )
        .await
        .unwrap();
    assert_eq!((open.version, open.sequence), (1, 1));
    assert_eq!(open.events[0].event_type, "AccountOpened");
    assert_eq!(open.events[0].data, json!({"owner": "ada"}));

    let deposit = fleet
        .send(
            "account",
            "a1",
            json!({"type": "Deposit", "data": {"amount": 100}}),
        )
        .await
        .unwrap();
    assert_eq!((deposit.version, deposit.sequence), (2, 2));

    let err = fleet
        .send(
            "account",
            "a1",
            json!({"type": "Withdraw", "data": {"amount": 101}}),
        )
        .await
        .unwrap_err();
    assert_eq!(err.code, ErrorCode::Rejected);
    assert!(
        err.message.contains("insufficient funds"),
        "{}",
        err.message
    );

    let err = fleet
        .send("account", "a1", json!({"type": "CloseAccount"}))
        .await
        .unwrap_err();
    assert_eq!(err.code, ErrorCode::Rejected);

    fleet
        .send(
            "account",
            "a1",
            json!({"type": "Withdraw", "data": {"amount": 100}}),
        )
        .await
        .unwrap();
    let closed = fleet
        .send("account", "a1", json!({"type": "CloseAccount", "data": {}}))
        .await
        .unwrap();
    assert_eq!((closed.version, closed.sequence), (4, 4));

    // The raw wire shape.
    let raw = fleet
        .raw(
            "cmd.user.u1",
            r#"{"type":"CreateUser","data":{"name":"Ada"}}"#,
        )
        .await;
    assert_eq!(
        raw,
        json!({"ok": true, "version": 1, "sequence": 5,
               "events": [{"type": "UserCreated", "data": {"name": "Ada"}}]})
    );
    // Renaming to the same name decides nothing and appends nothing.
    let same = fleet
        .send(
            "user",
            "u1",
            json!({"type": "RenameUser", "data": {"name": "Ada"}}),
        )
        .await
        .unwrap();
    assert_eq!((same.version, same.sequence, same.events.len()), (1, 5, 0));
    assert_eq!(fleet.stream_messages().await, 5);
    fleet.shutdown().await;
}

#[tokio::test]
async fn a_multi_event_command_is_one_atomic_append() {
    let fleet = Fleet::start(1).await;
    let open = fleet
        .send(
            "account",
            "a1",
            json!({"type": "OpenAccount", "data": {"owner": "ada", "initial_deposit": 250}}),
        )
        .await
        .unwrap();
    assert_eq!((open.version, open.sequence), (2, 2));
    let types: Vec<_> = open.events.iter().map(|e| e.event_type.as_str()).collect();
    assert_eq!(types, ["AccountOpened", "Deposited"]);
    let withdraw = fleet
        .send(
            "account",
            "a1",
            json!({"type": "Withdraw", "data": {"amount": 250}}),
        )
        .await
        .unwrap();
    assert_eq!(withdraw.version, 3);
    fleet.shutdown().await;
}

#[tokio::test]
async fn a_resent_command_returns_the_first_outcome_and_appends_nothing() {
    let mut fleet = Fleet::start(1).await;
    fleet
        .send(
            "account",
            "a1",
            json!({"type": "OpenAccount", "data": {"owner": "ada"}}),
        )
        .await
        .unwrap();
    fleet
        .send(
            "account",
            "a1",
            json!({"type": "Deposit", "data": {"amount": 30}}),
        )
        .await
        .unwrap();
    // Withdrawing everything succeeds once; deciding it again would be
    // refused, so a resend must not be decided again.
    let withdraw = json!({"type": "Withdraw", "data": {"amount": 30}, "command_id": "w-1"});
    let first = fleet.send("account", "a1", withdraw.clone()).await.unwrap();
    let again = fleet.send("account", "a1", withdraw.clone()).await.unwrap();
    assert_eq!(again, resent(&first));
    assert_eq!(fleet.stream_messages().await, 3);

    // A multi-event command resent.
    let open = json!({"type": "OpenAccount", "data": {"owner": "bo", "initial_deposit": 5}, "command_id": "o-2"});
    let first_open = fleet.send("account", "a2", open.clone()).await.unwrap();
    assert_eq!(
        fleet.send("account", "a2", open.clone()).await.unwrap(),
        resent(&first_open)
    );
    assert_eq!(fleet.stream_messages().await, 5);

    // A second copy with a cold cache, and a resend after newer commands.
    fleet.add_worker(crate::common::config(&fleet.server));
    fleet.wait_for_workers(2).await;
    fleet
        .send(
            "account",
            "a2",
            json!({"type": "Deposit", "data": {"amount": 1}}),
        )
        .await
        .unwrap();
    for _ in 0..6 {
        // Queue groups spread these over both copies.
        assert_eq!(
            fleet.send("account", "a1", withdraw.clone()).await.unwrap(),
            resent(&first)
        );
        assert_eq!(
            fleet.send("account", "a2", open.clone()).await.unwrap(),
            resent(&first_open)
        );
    }
    assert_eq!(fleet.stream_messages().await, 6);
    fleet.shutdown().await;
}

#[tokio::test]
async fn a_resend_answered_from_history_says_duplicate() {
    let fleet = Fleet::start(1).await;
    fleet
        .send(
            "account",
            "a1",
            json!({"type": "OpenAccount", "data": {"owner": "ada"}}),
        )
        .await
        .unwrap();
    let deposit =
        json!({"type": "Deposit", "data": {"amount": 5}, "command_id": "dep-x"}).to_string();
    let first = fleet.raw("cmd.account.a1", deposit.clone()).await;
    assert_eq!(first["ok"], true, "{first}");
    assert!(
        first.get("duplicate").is_none(),
        "a fresh append carries no duplicate field: {first}"
    );
    let again = fleet.raw("cmd.account.a1", deposit).await;
    assert_eq!(again["duplicate"], true, "{again}");
    // Otherwise the very same reply.
    let mut without = again.clone();
    without.as_object_mut().unwrap().remove("duplicate");
    assert_eq!(without, first);
    assert_eq!(
        fleet.stream_messages().await,
        2,
        "the deposit is stored once"
    );
    fleet.shutdown().await;
}

/// Past the aggregate's recent command ids (64), a resend is decided again
/// and JetStream's `Nats-Msg-Id` deduplication drops its append: that answer
/// comes from history too.
#[tokio::test]
async fn a_resend_deduplicated_by_jetstream_says_duplicate() {
    let fleet = Fleet::start(1).await;
    fleet
        .send(
            "account",
            "a1",
            json!({"type": "OpenAccount", "data": {"owner": "ada"}}),
        )
        .await
        .unwrap();
    let deposit = json!({"type": "Deposit", "data": {"amount": 5}, "command_id": "old"});
    let first = fleet.send("account", "a1", deposit.clone()).await.unwrap();
    let later = jetsource_core::loader::RECENT_COMMANDS as u64 + 1;
    for k in 0..later {
        fleet
            .send(
                "account",
                "a1",
                json!({"type": "Deposit", "data": {"amount": 1}, "command_id": format!("d{k}")}),
            )
            .await
            .unwrap();
    }
    let stored = fleet.stream_messages().await;
    assert_eq!(stored, 2 + later);
    let again = fleet.send("account", "a1", deposit).await.unwrap();
    assert_eq!(again, resent(&first));
    assert_eq!(fleet.stream_messages().await, stored, "nothing appended");
    fleet.shutdown().await;
}

#[tokio::test]
async fn service_stats_count_refusals_apart_from_errors() {
    let fleet = Fleet::start(1).await;
    let ok = [
        json!({"type": "OpenAccount", "data": {"owner": "ada"}}),
        json!({"type": "Deposit", "data": {"amount": 10}}),
        json!({"type": "Withdraw", "data": {"amount": 4}}),
    ];
    for body in &ok {
        fleet.send("account", "a1", body.clone()).await.unwrap();
    }
    // Refusals of every kind: the domain's, the client's, a version mismatch.
    let refused = [
        (
            json!({"type": "Withdraw", "data": {"amount": 500}}),
            ErrorCode::Rejected,
        ),
        (json!({"type": "CloseAccount"}), ErrorCode::Rejected),
        (
            json!({"type": "Deposit", "data": {"amount": 0}}),
            ErrorCode::Invalid,
        ),
        (json!({"type": "Teleport"}), ErrorCode::Invalid),
        (
            json!({"type": "Deposit", "data": {"amount": 1}, "expected_version": 1}),
            ErrorCode::Conflict,
        ),
    ];
    for (body, code) in &refused {
        let err = fleet.send("account", "a1", body.clone()).await.unwrap_err();
        assert_eq!(err.code, *code, "{body}");
    }

    // Counted before the reply is sent: no waiting needed.
    let stats = fleet.raw("$SRV.STATS.jetsource-command", "").await;
    assert_eq!(stats["type"], "io.nats.micro.v1.stats_response");
    let endpoint = &stats["endpoints"][0];
    assert_eq!(endpoint["name"], "commands");
    assert_eq!(
        endpoint["num_requests"],
        (ok.len() + refused.len()) as u64,
        "{stats}"
    );
    assert_eq!(endpoint["num_errors"], 0, "refusals are no errors: {stats}");
    assert_eq!(endpoint["last_error"], "", "{stats}");
    assert_eq!(
        endpoint["data"]["num_rejections"],
        refused.len() as u64,
        "{stats}"
    );
    let last = endpoint["data"]["last_rejection"].as_str().unwrap();
    assert!(last.starts_with("conflict: expected version 1"), "{last}");
    // Still the micro stats shape other tools read.
    for field in ["processing_time", "average_processing_time", "subject"] {
        assert!(endpoint.get(field).is_some(), "{field} missing: {stats}");
    }
    assert!(matches!(endpoint["data"], Value::Object(_)));
    fleet.shutdown().await;
}

#[tokio::test]
async fn expected_version_is_enforced() {
    let fleet = Fleet::start(1).await;
    fleet
        .send(
            "user",
            "u1",
            json!({"type": "CreateUser", "data": {"name": "A"}, "expected_version": 0}),
        )
        .await
        .unwrap();
    let err = fleet
        .send(
            "user",
            "u1",
            json!({"type": "RenameUser", "data": {"name": "B"}, "expected_version": 0}),
        )
        .await
        .unwrap_err();
    assert_eq!(err.code, ErrorCode::Conflict);
    assert!(err.message.contains("version 1"), "{}", err.message);
    let ok = fleet
        .send(
            "user",
            "u1",
            json!({"type": "RenameUser", "data": {"name": "B"}, "expected_version": 1}),
        )
        .await
        .unwrap();
    assert_eq!(ok.version, 2);
    assert_eq!(fleet.stream_messages().await, 2);
    fleet.shutdown().await;
}

#[tokio::test]
async fn bad_requests_get_clear_errors_and_append_nothing() {
    let fleet = Fleet::start(1).await;
    fleet
        .send(
            "account",
            "a1",
            json!({"type": "OpenAccount", "data": {"owner": "ada"}}),
        )
        .await
        .unwrap();
    let deep = format!("{}{}", "[".repeat(2_000), "]".repeat(2_000));
    let huge =
        json!({"type": "Deposit", "data": {"amount": 1, "pad": "x".repeat(5000)}}).to_string();
    let table: Vec<(&str, Vec<u8>, ErrorCode, &str)> = vec![
        (
            "cmd.account.a1",
            b"{".to_vec(),
            ErrorCode::Invalid,
            "not a valid command",
        ),
        (
            "cmd.account.a1",
            b"".to_vec(),
            ErrorCode::Invalid,
            "not a valid command",
        ),
        (
            "cmd.account.a1",
            b"[]".to_vec(),
            ErrorCode::Invalid,
            "not a valid command",
        ),
        (
            "cmd.account.a1",
            vec![0xff, 0xfe, 0x00],
            ErrorCode::Invalid,
            "not a valid command",
        ),
        (
            "cmd.account.a1",
            deep.into_bytes(),
            ErrorCode::Invalid,
            "not a valid command",
        ),
        (
            "cmd.account.a1",
            huge.into_bytes(),
            ErrorCode::Invalid,
            "limit is 4096",
        ),
        (
            "cmd.account.a1",
            br#"{"data":{"amount":1}}"#.to_vec(),
            ErrorCode::Invalid,
            "missing field `type`",
        ),
        (
            "cmd.account.a1",
            br#"{"type":"Deposit","data":{"amount":1},"extra":1}"#.to_vec(),
            ErrorCode::Invalid,
            "unknown field `extra`",
        ),
        (
            "cmd.account.a1",
            br#"{"type":"Teleport","data":{}}"#.to_vec(),
            ErrorCode::Invalid,
            "unknown variant `Teleport`",
        ),
        (
            "cmd.account.a1",
            br#"{"type":"Deposit","data":{"amount":"ten"}}"#.to_vec(),
            ErrorCode::Invalid,
            "invalid type",
        ),
        (
            "cmd.account.a1",
            br#"{"type":"Deposit","data":{"amount":-5}}"#.to_vec(),
            ErrorCode::Invalid,
            "Deposit",
        ),
        (
            "cmd.account.a1",
            br#"{"type":"Deposit","data":{"amount":1.5}}"#.to_vec(),
            ErrorCode::Invalid,
            "Deposit",
        ),
        (
            "cmd.account.a1",
            br#"{"type":"Deposit","data":{"amount":18446744073709551616}}"#.to_vec(),
            ErrorCode::Invalid,
            "Deposit",
        ),
        (
            "cmd.account.a1",
            br#"{"type":"Deposit","data":{"amount":0}}"#.to_vec(),
            ErrorCode::Invalid,
            "positive",
        ),
        (
            "cmd.account.a1",
            br#"{"type":"Deposit","data":{"amount":1,"currency":"EUR"}}"#.to_vec(),
            ErrorCode::Invalid,
            "unknown field `currency`",
        ),
        (
            "cmd.account.a1",
            br#"{"type":"Deposit","data":[1]}"#.to_vec(),
            ErrorCode::Invalid,
            "JSON object",
        ),
        (
            "cmd.account.a1",
            br#"{"type":"Deposit","data":{"amount":1},"command_id":"has space"}"#.to_vec(),
            ErrorCode::Invalid,
            "command_id",
        ),
        (
            "cmd.account.a1",
            br#"{"type":"Deposit","data":{"amount":1},"command_id":""}"#.to_vec(),
            ErrorCode::Invalid,
            "command_id",
        ),
        (
            "cmd.account.a1",
            br#"{"type":"Deposit","data":{"amount":1},"expected_version":"1"}"#.to_vec(),
            ErrorCode::Invalid,
            "expected_version",
        ),
        (
            "cmd.account.a1",
            br#"{"type":"Deposit","data":{"amount":1},"correlation_id":"a\nb"}"#.to_vec(),
            ErrorCode::Invalid,
            "correlation_id",
        ),
        (
            "cmd.account.a1",
            br#"{"type":"OpenAccount","data":{"owner":"again"}}"#.to_vec(),
            ErrorCode::Rejected,
            "already exists",
        ),
        (
            "cmd.account.nobody",
            br#"{"type":"Deposit","data":{"amount":1}}"#.to_vec(),
            ErrorCode::Rejected,
            "not open",
        ),
        (
            "cmd.widget.w1",
            br#"{"type":"Deposit","data":{"amount":1}}"#.to_vec(),
            ErrorCode::Invalid,
            "unknown aggregate type \"widget\"",
        ),
        (
            "cmd.account.a1.extra",
            br#"{"type":"Deposit","data":{"amount":1}}"#.to_vec(),
            ErrorCode::Invalid,
            "cmd.<aggregate_type>.<aggregate_id>",
        ),
        (
            "cmd.account.a=1",
            br#"{"type":"Deposit","data":{"amount":1}}"#.to_vec(),
            ErrorCode::Invalid,
            "aggregate id",
        ),
        (
            "cmd.account.aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
            br#"{"type":"OpenAccount","data":{"owner":"x"}}"#.to_vec(),
            ErrorCode::Invalid,
            "aggregate id",
        ),
    ];
    for (subject, body, code, fragment) in table {
        let reply = fleet.raw(subject, body.clone()).await;
        assert_eq!(
            reply["ok"],
            false,
            "{subject} {:?}",
            String::from_utf8_lossy(&body)
        );
        assert_eq!(
            reply["error"]["code"],
            code.as_str(),
            "{subject} {:?}: {reply}",
            String::from_utf8_lossy(&body)
        );
        let message = reply["error"]["message"].as_str().unwrap();
        assert!(
            message.contains(fragment),
            "{message:?} should mention {fragment:?}"
        );
    }
    assert_eq!(fleet.stream_messages().await, 1, "nothing was appended");
    // Still serving.
    let ok = fleet
        .send(
            "account",
            "a1",
            json!({"type": "Deposit", "data": {"amount": 1}}),
        )
        .await
        .unwrap();
    assert_eq!(ok.version, 2);
    fleet.shutdown().await;
}
