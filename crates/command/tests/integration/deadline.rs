//! The command deadline: however the event store behaves, a command is
//! answered `unavailable` once [`COMMAND_DEADLINE`] has passed, not after
//! each store call's own timeout (docs/PROTOCOL.md, "Read-only mode").

#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use jetsource_command::{Snapshots, Worker, COMMAND_DEADLINE};
use jetsource_core::config::{CommandConfig, NatsConfig, SnapshotConfig, StoreConfig};
use jetsource_core::protocol::ErrorCode;
use jetsource_core::snapshot::SnapshotStore;
use jetsource_core::store::EventStore;
use jetsource_test_support::{NatsServer, TcpProxy};

/// The worker's store connection goes silent (a half-open connection:
/// nothing answers, nothing fails) while each store call may wait a minute
/// (`nats.request_timeout_ms`): the command is answered `unavailable` at
/// the deadline.
#[tokio::test]
async fn a_silent_event_store_is_answered_unavailable_at_the_command_deadline() {
    let server = NatsServer::start();
    let proxy = TcpProxy::start(server.port());
    let nats = NatsConfig {
        url: format!("nats://127.0.0.1:{}", proxy.port()),
        request_timeout_ms: 60_000,
        ..Default::default()
    };
    let client = jetsource_core::connect(&nats, "deadline-test")
        .await
        .unwrap();
    let store = EventStore::open_when_available(client.clone(), &nats, &StoreConfig::default())
        .await
        .unwrap();
    let snapshots = Snapshots {
        store: SnapshotStore::open_when_available(store.jetstream(), &SnapshotConfig::default(), 1)
            .await
            .unwrap(),
        client,
        slow_load: None,
    };
    let worker = Worker::new(
        store,
        snapshots,
        jetsource_bank::registry(),
        CommandConfig::default(),
    );
    let opened = worker
        .handle(
            "cmd.account.d1",
            br#"{"type": "OpenAccount", "data": {"owner": "o"}, "command_id": "open"}"#,
        )
        .await;
    assert!(opened.is_ok(), "{opened:?}");

    proxy.freeze();
    let started = Instant::now();
    let reply = worker
        .handle(
            "cmd.account.d1",
            br#"{"type": "Deposit", "data": {"amount": 1}, "command_id": "d1"}"#,
        )
        .await;
    let took = started.elapsed();
    let error = reply.unwrap_err();
    assert_eq!(error.code, ErrorCode::Unavailable, "{}", error.message);
    assert!(error.message.contains("retry"), "{}", error.message);
    assert!(
        took >= COMMAND_DEADLINE && took < COMMAND_DEADLINE + Duration::from_secs(5),
        "answered after {took:?}, the deadline is {COMMAND_DEADLINE:?}"
    );
}
