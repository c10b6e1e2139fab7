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
    let store = open_store(&client, &urls).await;
    // Confirmed by the stream leader: a replica restarted a moment ago may
    // still be catching up.
    let versions: Vec<u64> = store
        .read_confirmed("account", "c1", 1)
        .await
        .unwrap()
        .iter()
        .map(|e| e.aggregate_version)
        .collect();
    assert_eq!(versions, (1..=16).collect::<Vec<u64>>());
}

/// Issue 9's finding: on a replicated stream the server reports a wrong
/// expected sequence with error 10164 (10071 on one node); it was answered
/// `internal` instead of being retried as a conflict. Two workers, many
/// clients on two accounts: every command ends `ok` (or, after the
/// worker's retries, `conflict`), never `internal`, and every acknowledged
/// one is stored exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writers_on_a_replicated_stream_conflict_and_retry_never_internal() {
    let cluster = NatsCluster::start();
    let client = cluster.client().await;
    let urls = cluster.urls();
    let _workers: Vec<Process> = (0..2)
        .map(|_| {
            Process::start_at(
                "jetsource-command",
                &urls,
                &[("JETSOURCE__STORE__REPLICAS", "3")],
                None,
            )
        })
        .collect();
    wait_for_service(&client, "jetsource-command", 2).await;
    let deadline = Instant::now() + Duration::from_secs(120);
    for id in ["h0", "h1"] {
        send(
            &client,
            id,
            json!({"type": "OpenAccount", "data": {"owner": "o"}, "command_id": "open"}),
            deadline,
        )
        .await;
    }
    let mut tasks = Vec::new();
    for c in 0..16 {
        let client = client.clone();
        tasks.push(tokio::spawn(async move {
            let mut acked = Vec::new();
            for k in 0..25 {
                let id = format!("h{}", (c + k) % 2);
                let command_id = format!("c{c}-{k}");
                let body =
                    json!({"type": "Deposit", "data": {"amount": 1}, "command_id": command_id});
                let outcome = send_until_definite(&client, &id, body, deadline).await;
                if let Some(outcome) = outcome {
                    acked.push((id, command_id, outcome.sequence));
                }
            }
            acked
        }));
    }
    let mut acked = Vec::new();
    for task in tasks {
        acked.extend(task.await.unwrap());
    }
    assert!(!acked.is_empty());
    let store = open_store(&client, &urls).await;
    for id in ["h0", "h1"] {
        let events = store.read_confirmed("account", id, 1).await.unwrap();
        let mut stored: Vec<&str> = events
            .iter()
            .filter_map(|e| e.command_id.as_deref())
            .filter(|c| *c != "open")
            .collect();
        stored.sort_unstable();
        let mut expected: Vec<&str> = acked
            .iter()
            .filter(|(a, _, _)| a == id)
            .map(|(_, c, _)| c.as_str())
            .collect();
        expected.sort_unstable();
        assert_eq!(stored, expected, "{id}: every acknowledged command once");
    }
}

/// Sends until the answer is definite: `Some` when acknowledged, `None`
/// when the worker gave up with `conflict` (nothing stored). Resends after
/// a timeout or `unavailable` with the same command id. Panics on any other
/// error, `internal` above all.
async fn send_until_definite(
    client: &async_nats::Client,
    id: &str,
    body: serde_json::Value,
    deadline: Instant,
) -> Option<CommandOutcome> {
    loop {
        let reply = client
            .request(format!("cmd.account.{id}"), body.to_string().into())
            .await;
        if let Ok(reply) = reply {
            match decode_reply::<CommandOutcome>(&reply.payload).unwrap() {
                Ok(outcome) => return Some(outcome),
                Err(ErrorBody {
                    code: ErrorCode::Conflict,
                    ..
                }) => return None,
                Err(ErrorBody { code, message, .. }) => assert!(
                    matches!(code, ErrorCode::Unavailable | ErrorCode::Timeout),
                    "{id}: {code:?} {message}"
                ),
            }
        }
        assert!(
            Instant::now() < deadline,
            "{id}: no definite answer in time"
        );
    }
}

/// The event store of the cluster, retrying while a restarted node makes
/// the cluster elect leaders (requests time out meanwhile).
async fn open_store(client: &async_nats::Client, urls: &str) -> jetsource_core::store::EventStore {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let opened = jetsource_core::store::EventStore::open(
            client.clone(),
            &jetsource_core::config::NatsConfig {
                url: urls.to_owned(),
                ..Default::default()
            },
            &jetsource_core::config::StoreConfig {
                replicas: 3,
                ..Default::default()
            },
        )
        .await;
        match opened {
            Ok(store) => return store,
            Err(e) => assert!(
                e.class() == jetsource_core::ErrorClass::Transient && Instant::now() < deadline,
                "cannot open the event store: {e}"
            ),
        }
    }
}

/// A refusal is not checked by the server, so it must be decided on every
/// acknowledged event, not on a replica that lags. Two workers take turns
/// at random (queue group): each deposits 1, then a withdrawal of 1 must
/// succeed, whichever worker gets it and whatever replica it reads from.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusal_is_decided_on_every_acknowledged_event() {
    let cluster = NatsCluster::start();
    let client = cluster.client().await;
    let urls = cluster.urls();
    let _workers: Vec<Process> = (0..2)
        .map(|_| {
            Process::start_at(
                "jetsource-command",
                &urls,
                &[("JETSOURCE__STORE__REPLICAS", "3")],
                None,
            )
        })
        .collect();
    wait_for_service(&client, "jetsource-command", 2).await;
    let deadline = Instant::now() + Duration::from_secs(120);
    send(
        &client,
        "r1",
        json!({"type": "OpenAccount", "data": {"owner": "o"}, "command_id": "open"}),
        deadline,
    )
    .await;
    for k in 0..300 {
        for (kind, command) in [("Deposit", "d"), ("Withdraw", "w")] {
            let body =
                json!({"type": kind, "data": {"amount": 1}, "command_id": format!("{command}{k}")});
            let reply = client
                .request("cmd.account.r1", body.to_string().into())
                .await
                .unwrap();
            let outcome = decode_reply::<CommandOutcome>(&reply.payload).unwrap();
            assert!(outcome.is_ok(), "{kind} #{k}: {outcome:?}");
        }
    }
}

/// A worker started while the cluster has no quorum (nodes restarting)
/// waits for the event stream instead of exiting, and serves once the
/// nodes are back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_started_without_quorum_waits_for_the_stream() {
    let mut cluster = NatsCluster::start();
    let client = cluster.client().await;
    let urls = cluster.urls();
    // The stream exists (an R3 stream cannot be created on two nodes);
    // then the cluster loses its majority.
    open_store(&client, &urls).await;
    cluster.kill_node(1);
    cluster.kill_node(2);
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("worker.log");
    let mut worker = Process::start_at(
        "jetsource-command",
        &urls,
        &[("JETSOURCE__STORE__REPLICAS", "3")],
        Some(&log),
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while !std::fs::read_to_string(&log)
        .unwrap_or_default()
        .contains("not available yet; retrying")
    {
        assert!(
            worker.try_status().is_none(),
            "the worker exited: {}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        assert!(Instant::now() < deadline, "the worker never retried");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    cluster.start_node(1);
    cluster.start_node(2);
    wait_for_service(&client, "jetsource-command", 1).await;
    let outcome = send(
        &client,
        "q1",
        json!({"type": "OpenAccount", "data": {"owner": "o"}, "command_id": "open"}),
        Instant::now() + Duration::from_secs(60),
    )
    .await;
    assert_eq!(outcome.version, 1);
}
