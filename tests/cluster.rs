//! A three-node JetStream cluster with replicas 3: the command worker keeps
//! taking commands when a node dies, and no acknowledged event is lost.

#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use jetsource_core::protocol::{decode_reply, CommandOutcome, ErrorBody, ErrorCode};
use jetsource_test_support::NatsCluster;
use jetsource_tests::{wait_for_service, Process};
use serde_json::json;

/// Sends a command, retrying `unavailable` and transport errors (a leader
/// election) until `deadline`. With a command id, a retry is idempotent.
async fn send(
    client: &async_nats::Client,
    id: &str,
    body: serde_json::Value,
    deadline: Instant,
) -> CommandOutcome {
    loop {
        let reply = client
            .request(format!("cmd.account.{id}"), body.to_string().into())
            .await;
        if let Ok(reply) = reply {
            match decode_reply::<CommandOutcome>(&reply.payload).unwrap() {
                Ok(outcome) => return outcome,
                Err(ErrorBody { code, message, .. }) => {
                    assert!(
                        matches!(code, ErrorCode::Unavailable | ErrorCode::Timeout),
                        "{id}: a permanent error during failover: {code:?} {message}"
                    )
                }
            }
        }
        assert!(
            Instant::now() < deadline,
            "{id}: no answer before the deadline"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_survive_the_loss_of_a_node_with_replicas_3() {
    let mut cluster = NatsCluster::start();
    let client = cluster.client().await;
    let urls = cluster.urls();
    let _worker = Process::start_at(
        "jetsource-command",
        &urls,
        &[("JETSOURCE__STORE__REPLICAS", "3")],
        None,
    );
    wait_for_service(&client, "jetsource-command", 1).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    let opened = send(
        &client,
        "c1",
        json!({"type": "OpenAccount", "data": {"owner": "o"}, "command_id": "open"}),
        deadline,
    )
    .await;
    assert_eq!(opened.version, 1);
    let js = async_nats::jetstream::new(client.clone());
    let mut stream = js.get_stream("EVENTS").await.unwrap();
    assert_eq!(stream.info().await.unwrap().config.num_replicas, 3);

    let mut deposits = 0;
    for round in 0..3 {
        // Kill one node (never all: a majority stays up), deposit, restart it.
        cluster.kill_node(round);
        for k in 0..5 {
            let outcome = send(
                &client,
                "c1",
                json!({"type": "Deposit", "data": {"amount": 1}, "command_id": format!("d{round}-{k}")}),
                deadline,
            )
            .await;
            deposits += 1;
            assert_eq!(
                outcome.version,
                1 + deposits,
                "one event per deposit, none doubled"
            );
        }
        cluster.start_node(round);
    }
    // Every acknowledged event is in the stream, in order, exactly once.
    let store = jetsource_core::store::EventStore::open(
        client.clone(),
        &jetsource_core::config::NatsConfig {
            url: urls.clone(),
            ..Default::default()
        },
        &jetsource_core::config::StoreConfig {
            replicas: 3,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let mut versions = Vec::new();
    store
        .read("account", "c1", 1, |chunk| {
            versions.extend(chunk.iter().map(|e| e.aggregate_version));
            std::ops::ControlFlow::Continue(())
        })
        .await
        .unwrap();
    assert_eq!(versions, (1..=16).collect::<Vec<u64>>());
}
