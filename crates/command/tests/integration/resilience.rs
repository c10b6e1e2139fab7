//! The worker when the store goes away: clear `unavailable` answers, no lost
//! acknowledged event, recovery without a restart of the worker.

#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use crate::common::Fleet;
use jetsource_core::protocol::{decode_reply, CommandOutcome, ErrorBody, ErrorCode};
use jetsource_test_support::Sync;
use serde_json::json;

async fn try_send(
    client: &async_nats::Client,
    subject: &str,
    body: &serde_json::Value,
) -> Option<Result<CommandOutcome, ErrorBody>> {
    let request = client.request(subject.to_owned(), body.to_string().into());
    match tokio::time::timeout(Duration::from_secs(5), request).await {
        Ok(Ok(reply)) => Some(decode_reply(&reply.payload).unwrap()),
        _ => None,
    }
}

#[tokio::test]
async fn a_server_crash_loses_no_acknowledged_event_and_the_worker_recovers() {
    let mut fleet = Fleet::start_with(1, Sync::Always).await;
    fleet
        .send(
            "account",
            "a1",
            json!({"type": "OpenAccount", "data": {"owner": "o"}}),
        )
        .await
        .unwrap();
    let mut acknowledged = 0;
    for i in 1..=20 {
        fleet
            .send(
                "account",
                "a1",
                json!({"type": "Deposit", "data": {"amount": i}}),
            )
            .await
            .unwrap();
        acknowledged += i;
    }

    fleet.server.restart(); // SIGKILL, then start on the same port and data

    // The worker reconnects on its own; the first command after the crash
    // gets through once it has (resent with the same id until it does).
    let client = fleet.server.client().await;
    let body = json!({"type": "Deposit", "data": {"amount": 1000}, "command_id": "after-crash"});
    let deadline = Instant::now() + Duration::from_secs(30);
    let outcome = loop {
        match try_send(&client, "cmd.account.a1", &body).await {
            Some(Ok(outcome)) => break outcome,
            Some(Err(e)) => assert_eq!(e.code, ErrorCode::Unavailable, "{e}"),
            None => {}
        }
        assert!(Instant::now() < deadline, "the worker did not recover");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(
        outcome.version, 22,
        "open + 20 deposits survived, this is the 22nd event"
    );
    let state = try_send(
        &client,
        "cmd.account.a1",
        &json!({"type": "Withdraw", "data": {"amount": acknowledged + 1000}}),
    )
    .await
    .unwrap()
    .unwrap();
    assert_eq!(state.version, 23, "the whole balance was there to withdraw");
}

#[tokio::test]
async fn a_missing_stream_is_unavailable_and_the_worker_keeps_serving() {
    let fleet = Fleet::start(1).await;
    fleet
        .send(
            "account",
            "a1",
            json!({"type": "OpenAccount", "data": {"owner": "o"}}),
        )
        .await
        .unwrap();
    let js = async_nats::jetstream::new(fleet.client.clone());
    // deny_delete/deny_purge protect events; deleting the whole stream is an
    // account permission, which tests have.
    js.delete_stream("EVENTS").await.unwrap();

    for (id, body) in [
        ("a1", json!({"type": "Deposit", "data": {"amount": 1}})),
        ("a2", json!({"type": "OpenAccount", "data": {"owner": "o"}})),
    ] {
        let err = fleet.send("account", id, body).await.unwrap_err();
        assert_eq!(err.code, ErrorCode::Unavailable, "{err}");
        assert!(err.message.contains("retry"), "{}", err.message);
    }
    // Bad input is still answered at once.
    let err = fleet
        .send("account", "a1", json!({"type": "Nope"}))
        .await
        .unwrap_err();
    assert_eq!(err.code, ErrorCode::Invalid);
    fleet.shutdown().await;
}
