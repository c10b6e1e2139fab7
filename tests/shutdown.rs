//! Every worker ends within 10 s of SIGTERM whatever state its servers are
//! in (issue 9): NATS gone, Redis gone (projector), a 3-node cluster that
//! lost its quorum. Each test starts the worker against real servers,
//! waits until it serves, breaks the servers, sends SIGTERM and times the
//! exit.

#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use jetsource_test_support::{NatsCluster, NatsServer, RedisServer};
use jetsource_tests::{wait_for_service, Process};

/// The standard: every process ends within this of SIGTERM.
const LIMIT: Duration = Duration::from_secs(10);

/// Sends SIGTERM to `worker` and returns how long it took to exit, which
/// must be cleanly and within [`LIMIT`].
fn terminate(mut worker: Process, what: &str) -> Duration {
    let started = Instant::now();
    worker.signal("TERM");
    let status = worker.wait(LIMIT);
    let took = started.elapsed();
    println!("{what}: exited {took:?} after SIGTERM ({status})");
    assert!(status.success(), "{what}: {status}");
    took
}

async fn single_node(binary: &str, service: &str, fault: Fault) -> Duration {
    let mut nats = NatsServer::start();
    let mut redis = RedisServer::start();
    let client = nats.client().await;
    let url = redis.url();
    let worker = Process::start(binary, &nats, &[("JETSOURCE__REDIS__URL", url.as_str())]);
    wait_for_service(&client, service, 1).await;
    match fault {
        Fault::Nats => nats.kill(),
        Fault::Redis => redis.kill(),
        Fault::NatsAndRedis => {
            redis.kill();
            nats.kill();
        }
    }
    terminate(worker, &format!("{binary} with {fault:?} gone"))
}

/// With NATS and Redis up, a stop waits for nothing: each worker is gone
/// well before the stop budget that bounds a stop with servers gone.
#[tokio::test]
async fn every_worker_stops_promptly_with_its_servers_up() {
    let nats = NatsServer::start();
    let redis = RedisServer::start();
    let client = nats.client().await;
    let url = redis.url();
    let env = [("JETSOURCE__REDIS__URL", url.as_str())];
    let workers: Vec<(&str, Process)> = WORKERS
        .into_iter()
        .map(|(binary, _)| (binary, Process::start(binary, &nats, &env)))
        .collect();
    for (_, service) in WORKERS {
        wait_for_service(&client, service, 1).await;
    }
    for (binary, worker) in workers {
        let took = terminate(worker, &format!("{binary} with its servers up"));
        assert!(
            took < jetsource_core::STOP_BUDGET,
            "{binary} took {took:?} to stop with NATS and Redis up"
        );
    }
}

/// Every worker binary and its service name (the shop's process worker
/// stands for the process worker: the bank has no process).
const WORKERS: [(&str, &str); 4] = [
    ("jetsource-command", "jetsource-command"),
    ("jetsource-projector", "jetsource-projector"),
    ("jetsource-snapshotter", "jetsource-snapshotter"),
    ("shop-process", "jetsource-process"),
];

/// The server(s) killed before SIGTERM.
#[derive(Debug, Clone, Copy)]
enum Fault {
    Nats,
    Redis,
    NatsAndRedis,
}

#[tokio::test]
async fn command_worker_stops_with_nats_gone() {
    single_node("jetsource-command", "jetsource-command", Fault::Nats).await;
}

#[tokio::test]
async fn snapshotter_stops_with_nats_gone() {
    single_node(
        "jetsource-snapshotter",
        "jetsource-snapshotter",
        Fault::Nats,
    )
    .await;
}

#[tokio::test]
async fn process_worker_stops_with_nats_gone() {
    single_node("shop-process", "jetsource-process", Fault::Nats).await;
}

#[tokio::test]
async fn projector_stops_with_nats_gone() {
    single_node("jetsource-projector", "jetsource-projector", Fault::Nats).await;
}

#[tokio::test]
async fn projector_stops_with_redis_gone() {
    single_node("jetsource-projector", "jetsource-projector", Fault::Redis).await;
}

#[tokio::test]
async fn projector_stops_with_nats_and_redis_gone() {
    single_node(
        "jetsource-projector",
        "jetsource-projector",
        Fault::NatsAndRedis,
    )
    .await;
}

/// Every worker on a 3-node cluster with replicas 3, connected to the
/// two nodes that then die (the streams lose their quorum; the workers
/// reconnect to the third node, if they learnt of it, where JetStream
/// answers nothing); then each worker gets SIGTERM.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_worker_stops_on_a_cluster_that_lost_its_quorum() {
    let mut cluster = NatsCluster::start();
    let redis = RedisServer::start();
    let client = cluster.client().await;
    // Only the nodes about to die: the workers are connected to one of them.
    let urls = cluster
        .urls()
        .split(',')
        .skip(1)
        .collect::<Vec<_>>()
        .join(",");
    let url = redis.url();
    let env = [
        ("JETSOURCE__STORE__REPLICAS", "3"),
        ("JETSOURCE__REDIS__URL", url.as_str()),
    ];
    let workers: Vec<(&str, Process)> = WORKERS
        .into_iter()
        .map(|(binary, _)| (binary, Process::start_at(binary, &urls, &env, None)))
        .collect();
    for (_, service) in WORKERS {
        wait_for_service(&client, service, 1).await;
    }
    cluster.kill_node(1);
    cluster.kill_node(2);
    // SIGTERM to all at once, as a fleet shutdown does; each is timed.
    let started = Instant::now();
    let mut workers: Vec<(&str, Process)> = workers;
    for (_, worker) in &workers {
        worker.signal("TERM");
    }
    for (binary, worker) in &mut workers {
        let status = worker.wait(LIMIT.saturating_sub(started.elapsed()));
        println!(
            "{binary} on a cluster without quorum: exited {:?} after SIGTERM ({status})",
            started.elapsed()
        );
        assert!(status.success(), "{binary}: {status}");
    }
}
