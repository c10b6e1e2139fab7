//! The read side as shipped: `jetsource-projector` processes, the CLI's
//! projection and dead-letter commands, a projector killed mid-batch. The
//! tests that promise exactness run twice: on one node and on a 3-node
//! cluster with replicas 3 and `sync_interval: always`, where replicas can
//! lag behind the stream leader.

#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use jetsource_core::protocol::{decode_reply, CommandOutcome};
use jetsource_test_support::{NatsCluster, NatsServer, RedisServer};
use jetsource_tests::{cli_at, wait_for_service, Process};
use serde_json::{json, Value};

/// Where the event stream lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Topology {
    /// One nats-server, stream with one replica.
    Single,
    /// Three clustered nats-servers, stream with three replicas.
    Cluster,
}

#[allow(dead_code)] // the servers are held so they stop on drop
enum Nats {
    Single(NatsServer),
    Cluster(NatsCluster),
}

struct Fleet {
    _nats: Nats,
    nats_url: String,
    replicas: &'static str,
    redis: RedisServer,
    client: async_nats::Client,
    _workers: Vec<Process>,
}

impl Fleet {
    async fn start() -> Self {
        Self::start_on(Topology::Single).await
    }

    /// A fleet on `topology`: on a cluster, two command workers.
    async fn start_on(topology: Topology) -> Self {
        let (nats, nats_url, client, replicas, copies) = match topology {
            Topology::Single => {
                let server = NatsServer::start();
                let client = server.client().await;
                let url = server.url();
                (Nats::Single(server), url, client, "1", 1)
            }
            Topology::Cluster => {
                let cluster = NatsCluster::start();
                let client = cluster.client().await;
                let url = cluster.urls();
                (Nats::Cluster(cluster), url, client, "3", 2)
            }
        };
        let redis = RedisServer::start();
        let workers = (0..copies)
            .map(|_| {
                Process::start_at(
                    "jetsource-command",
                    &nats_url,
                    &[("JETSOURCE__STORE__REPLICAS", replicas)],
                    None,
                )
            })
            .collect();
        wait_for_service(&client, "jetsource-command", copies).await;
        Self {
            _nats: nats,
            nats_url,
            replicas,
            redis,
            client,
            _workers: workers,
        }
    }

    fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("JETSOURCE__REDIS__URL", self.redis.url()),
            ("JETSOURCE__STORE__REPLICAS", self.replicas.into()),
            ("JETSOURCE__PROJECTOR__FAILOVER_MS", "1000".into()),
            ("JETSOURCE__PROJECTOR__BATCH_SIZE", "50".into()),
            ("JETSOURCE__PROJECTOR__PARTITIONS", "4".into()),
        ]
    }

    fn projector(&self) -> Process {
        let env = self.env();
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        Process::start_at("jetsource-projector", &self.nats_url, &env, None)
    }

    fn cli(&self, args: &[&str]) -> (i32, String, String) {
        let env = self.env();
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        cli_at(&self.nats_url, &env, args)
    }

    async fn send(&self, id: &str, body: Value) -> CommandOutcome {
        jetsource_test_support::requests::send(&self.client, "account", id, body)
            .await
            .unwrap()
    }

    /// `accounts` accounts with `deposits` deposits each, sent concurrently
    /// (each acknowledged before the next).
    /// Returns each account's expected balance.
    async fn load(&self, accounts: usize, deposits: u64) -> Vec<(String, u64)> {
        let mut tasks = Vec::new();
        for a in 0..accounts {
            let client = self.client.clone();
            tasks.push(tokio::spawn(async move {
                let id = format!("k{a}");
                let open = json!({"type": "OpenAccount", "data": {"owner": "o"}, "command_id": "open"});
                acknowledged(&client, &id, &open).await;
                let mut balance = 0;
                for d in 1..=deposits {
                    let amount = (a as u64 * 7 + d) % 50 + 1;
                    let body = json!({"type": "Deposit", "data": {"amount": amount}, "command_id": format!("d{d}")});
                    acknowledged(&client, &id, &body).await;
                    balance += amount;
                }
                (id, balance)
            }));
        }
        let mut out = Vec::new();
        for t in tasks {
            out.push(t.await.unwrap());
        }
        out
    }

    async fn last_sequence(&self) -> u64 {
        let js = async_nats::jetstream::new(self.client.clone());
        js.get_stream("EVENTS")
            .await
            .unwrap()
            .info()
            .await
            .unwrap()
            .state
            .last_sequence
    }

    async fn query(&self, subject: &str, body: Value) -> Value {
        let reply = self
            .client
            .request(subject.to_owned(), body.to_string().into())
            .await
            .unwrap();
        let value: Value = serde_json::from_slice(&reply.payload).unwrap();
        assert_eq!(value["ok"], true, "{subject}: {value}");
        value
    }

    /// Every account's balance and the totals are exactly the expected ones.
    async fn assert_exact(&self, expected: &[(String, u64)], deposits: u64) {
        let last = self.last_sequence().await;
        let wait = json!({"min_sequence": last, "timeout_ms": 30000});
        let mut sum = 0;
        for (id, balance) in expected {
            let reply = self
                .query(&format!("query.account.{id}"), wait.clone())
                .await;
            assert_eq!(reply["data"]["balance"], *balance, "balance of {id}");
            assert_eq!(reply["data"]["version"], deposits + 1, "version of {id}");
            sum += balance;
        }
        let totals = self.query("query.accounts.totals", wait).await;
        assert_eq!(
            totals["data"],
            json!({"open_accounts": expected.len(), "balance_sum": sum})
        );
    }

    async fn redis_watermark(&self) -> u64 {
        let redis = jetsource_projector::redis_store::RedisStore::connect(&self.redis.url())
            .await
            .unwrap();
        match redis.meta("accounts").await.unwrap() {
            Some(meta) => redis.watermark("accounts", meta.active).await.unwrap(),
            None => 0,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_projector_killed_mid_batch_and_restarted_loses_and_doubles_nothing() {
    killed_mid_batch(Topology::Single).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cluster_a_projector_killed_mid_batch_and_restarted_loses_and_doubles_nothing() {
    killed_mid_batch(Topology::Cluster).await;
}

async fn killed_mid_batch(topology: Topology) {
    let fleet = Fleet::start_on(topology).await;
    // A backlog first, so the projector is busy catching up when killed.
    let expected = fleet.load(20, 150).await;
    let last = fleet.last_sequence().await;
    let first = fleet.projector();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let watermark = fleet.redis_watermark().await;
        if watermark > 0 {
            assert!(
                watermark < last,
                "caught up before it could be killed; make the backlog bigger"
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the projector never started applying"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    first.signal("KILL");
    drop(first);
    let _second = fleet.projector();
    wait_for_service(&fleet.client, "jetsource-projector", 1).await;
    fleet.assert_exact(&expected, 150).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cli_rebuild_switches_without_downtime_and_status_reports_lag() {
    let fleet = Fleet::start().await;
    let _projector = fleet.projector();
    wait_for_service(&fleet.client, "jetsource-projector", 1).await;
    let expected = fleet.load(10, 100).await;
    fleet.assert_exact(&expected, 100).await;

    let (code, out, err) = fleet.cli(&["--json", "projection", "status"]);
    assert_eq!(code, 0, "{err}");
    let status: Vec<Value> = serde_json::from_str(&out).unwrap();
    let accounts = status
        .iter()
        .find(|s| s["projection"] == "accounts")
        .unwrap();
    let last = fleet.last_sequence().await;
    assert_eq!(accounts["checkpoint"], last);
    assert_eq!(accounts["lag_events"], 0);
    let old_generation = accounts["generation"].as_u64().unwrap();

    // Queries keep answering, exactly, while the rebuild runs.
    let rebuild = {
        let env = fleet.env();
        let url = fleet.nats_url.clone();
        tokio::task::spawn_blocking(move || {
            let output =
                std::process::Command::new(jetsource_test_support::workspace_binary("jetsource"))
                    .args(["--url", &url, "projection", "rebuild", "accounts"])
                    .envs(env)
                    .output()
                    .unwrap();
            (
                output.status.code().unwrap_or(-1),
                String::from_utf8_lossy(&output.stdout).into_owned(),
                String::from_utf8_lossy(&output.stderr).into_owned(),
            )
        })
    };
    let sum: u64 = expected.iter().map(|(_, b)| b).sum();
    let mut served = 0;
    while !rebuild.is_finished() {
        let totals = fleet.query("query.accounts.totals", json!({})).await;
        assert_eq!(
            totals["data"]["balance_sum"], sum,
            "a query during the rebuild"
        );
        served += 1;
    }
    let (code, out, err) = rebuild.await.unwrap();
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("rebuilt accounts"), "{out}");
    assert!(out.contains("events/s"), "{out}");
    assert!(served > 0);

    let (_, out, _) = fleet.cli(&["--json", "projection", "status"]);
    let status: Vec<Value> = serde_json::from_str(&out).unwrap();
    let accounts = status
        .iter()
        .find(|s| s["projection"] == "accounts")
        .unwrap();
    let new_generation = accounts["generation"].as_u64().unwrap();
    assert!(new_generation > old_generation);
    assert_eq!(accounts["rebuild"], Value::Null);
    fleet.assert_exact(&expected, 100).await;
    // The old key space is gone.
    let mut redis = redis::Client::open(fleet.redis.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let old: Vec<String> = redis::cmd("KEYS")
        .arg(jetsource_projector::keys::generation_pattern(
            "accounts",
            old_generation,
        ))
        .query_async(&mut redis)
        .await
        .unwrap();
    assert!(old.is_empty(), "old keys left: {}", old.len());

    // Rebuilding an unknown projection is a one-line error.
    let (code, _, err) = fleet.cli(&["projection", "rebuild", "nope"]);
    assert_ne!(code, 0);
    assert!(err.contains("unknown projection"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cli_lists_dead_letters_and_keeps_those_that_still_fail() {
    let fleet = Fleet::start().await;
    // Before any projector ran there is no dead-letter stream: that is an
    // empty list (the server's "stream not found", 10059), not an error.
    let (code, out, err) = fleet.cli(&["dlq", "list"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("no dead letters"), "{out}");
    let _projector = fleet.projector();
    wait_for_service(&fleet.client, "jetsource-projector", 1).await;
    let (code, out, _) = fleet.cli(&["dlq", "list"]);
    assert_eq!(code, 0);
    assert!(out.contains("no dead letters"));
    fleet
        .send("d1", json!({"type": "OpenAccount", "data": {"owner": "o"}}))
        .await;
    // Valid for the domain, too large for the read model's 64-bit sums.
    let huge = fleet
        .send(
            "d1",
            json!({"type": "Deposit", "data": {"amount": 1u64 << 60}}),
        )
        .await;
    fleet
        .send("d1", json!({"type": "Deposit", "data": {"amount": 5}}))
        .await;
    let reply = fleet
        .query(
            "query.account.d1",
            json!({"min_sequence": huge.sequence + 1}),
        )
        .await;
    assert_eq!(
        reply["data"]["balance"], 5,
        "the poison event was skipped, the next one applied"
    );

    let (code, out, err) = fleet.cli(&["--json", "dlq", "list"]);
    assert_eq!(code, 0, "{err}");
    let letters: Vec<Value> = serde_json::from_str(&out).unwrap();
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0]["original_sequence"], huge.sequence);
    assert!(
        letters[0]["reason"].as_str().unwrap().contains("outside"),
        "{}",
        letters[0]
    );
    let (code, out, err) = fleet.cli(&["dlq", "replay"]);
    assert_ne!(code, 0);
    assert!(out.contains("kept: still fails"), "{out}");
    assert!(err.contains("kept"), "{err}");
    let (_, out, _) = fleet.cli(&["--json", "dlq", "list"]);
    assert_eq!(serde_json::from_str::<Vec<Value>>(&out).unwrap().len(), 1);
    let (code, out, _) = fleet.cli(&["query", "account", "d1"]);
    assert_eq!(code, 0);
    assert!(out.contains("\"balance\": 5"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn when_the_active_projector_dies_a_standby_takes_over_exactly() {
    standby_takes_over(Topology::Single).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cluster_when_the_active_projector_dies_a_standby_takes_over_exactly() {
    standby_takes_over(Topology::Cluster).await;
}

/// Issue 9's finding: on a replicated stream, with one client, one
/// projector and no fault, read models missed events (a lagging replica's
/// "nothing more" moved the watermark past them). Deposits one at a time,
/// so the projector is idle, and raising its watermark, between events
/// (600 of them: the old code lost some in each of three runs).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cluster_an_idle_projector_misses_no_event_of_a_trickle() {
    let fleet = Fleet::start_on(Topology::Cluster).await;
    let _projector = fleet.projector();
    wait_for_service(&fleet.client, "jetsource-projector", 1).await;
    let mut expected = Vec::new();
    for a in 0..3 {
        let id = format!("t{a}");
        fleet
            .send(&id, json!({"type": "OpenAccount", "data": {"owner": "o"}}))
            .await;
        expected.push((id, 0));
    }
    for d in 0..600u64 {
        let (id, balance) = &mut expected[(d % 3) as usize];
        let amount = d % 7 + 1;
        fleet
            .send(id, json!({"type": "Deposit", "data": {"amount": amount}}))
            .await;
        *balance += amount;
    }
    fleet.assert_exact(&expected, 200).await;
}

async fn standby_takes_over(topology: Topology) {
    let fleet = Fleet::start_on(topology).await;
    let active = fleet.projector();
    wait_for_service(&fleet.client, "jetsource-projector", 1).await;
    let first = fleet.load(5, 20).await;
    fleet.assert_exact(&first, 20).await; // the first copy holds the pin now
    let _standby = fleet.projector();
    wait_for_service(&fleet.client, "jetsource-projector", 2).await;
    let more = {
        let client = fleet.client.clone();
        tokio::spawn(async move {
            for i in 0..400u64 {
                let body = json!({"type": "Deposit", "data": {"amount": 1}});
                let reply = client
                    .request(format!("cmd.account.k{}", i % 5), body.to_string().into())
                    .await
                    .unwrap();
                assert!(decode_reply::<CommandOutcome>(&reply.payload)
                    .unwrap()
                    .is_ok());
            }
        })
    };
    active.signal("KILL");
    drop(active);
    more.await.unwrap();
    let expected: Vec<(String, u64)> = first.iter().map(|(id, b)| (id.clone(), b + 80)).collect();
    fleet.assert_exact(&expected, 100).await;
}

/// Sends `body` to `account.<id>` until it is acknowledged, as a client
/// does: a command that got no answer or `unavailable` (a loaded cluster
/// timing out an append) is sent again with its command id, which never
/// applies it twice. Any other error fails the test.
async fn acknowledged(client: &async_nats::Client, id: &str, body: &Value) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let request = client.request(format!("cmd.account.{id}"), body.to_string().into());
        if let Ok(Ok(reply)) = tokio::time::timeout(Duration::from_secs(10), request).await {
            match decode_reply::<CommandOutcome>(&reply.payload).unwrap() {
                Ok(_) => return,
                Err(e) if e.code == jetsource_core::protocol::ErrorCode::Unavailable => {}
                Err(e) => panic!("{id} {body}: {e:?}"),
            }
        }
        assert!(Instant::now() < deadline, "{id} {body}: never acknowledged");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
