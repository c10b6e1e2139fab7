//! The snapshotter against a real nats-server: snapshots every N events,
//! snapshot-aware loading equal to full replay at every version, temporal
//! rules, and damaged snapshots ignored then replaced.

#![allow(clippy::unwrap_used)]

use std::ops::ControlFlow;
use std::time::{Duration, Instant};

use jetsource_core::config::{Config, NatsConfig};
use jetsource_core::loader::{Loaded, SnapshotUse, Until};
use jetsource_core::protocol::{decode_reply, CommandOutcome};
use jetsource_core::snapshot::{Snapshot, SnapshotStore};
use jetsource_core::store::EventStore;
use jetsource_test_support::{wait_for_service, NatsServer};
use serde_json::json;
use tokio::sync::watch;

struct Env {
    server: NatsServer,
    client: async_nats::Client,
    stop: watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

fn config(server: &NatsServer) -> Config {
    let mut config = Config {
        nats: NatsConfig {
            url: server.url(),
            ..Default::default()
        },
        ..Default::default()
    };
    config.snapshot.every = 10;
    // One kept state: an event of another aggregate evicts it, so due
    // snapshots come both from states folded in memory and from reloads.
    config.snapshot.cache_size = 1;
    config
}

impl Env {
    async fn start() -> Self {
        Self::start_with(|_| {}).await
    }

    async fn start_with(tweak: fn(&mut Config)) -> Self {
        let server = NatsServer::start();
        let client = server.client().await;
        let (stop, _) = watch::channel(false);
        let mut env = Self {
            server,
            client,
            stop,
            tasks: Vec::new(),
        };
        let mut rx = env.stop.subscribe();
        let mut c = config(&env.server);
        tweak(&mut c);
        env.tasks.push(tokio::spawn(async move {
            jetsource_command::run(c, jetsource_bank::registry(), async move {
                let _ = rx.wait_for(|s| *s).await;
            })
            .await
            .unwrap();
        }));
        let mut rx = env.stop.subscribe();
        let mut c = config(&env.server);
        tweak(&mut c);
        env.tasks.push(tokio::spawn(async move {
            jetsource_snapshotter::run(c, jetsource_bank::registry(), async move {
                let _ = rx.wait_for(|s| *s).await;
            })
            .await
            .unwrap();
        }));
        wait_for_service(&env.client, "jetsource-command", 1).await;
        wait_for_service(&env.client, "jetsource-snapshotter", 1).await;
        env
    }

    async fn send(&self, id: &str, body: serde_json::Value) -> CommandOutcome {
        jetsource_test_support::requests::send(&self.client, "account", id, body)
            .await
            .unwrap()
    }

    async fn stores(&self) -> (EventStore, SnapshotStore) {
        let c = config(&self.server);
        let store = EventStore::open(self.client.clone(), &c.nats, &c.store)
            .await
            .unwrap();
        let snapshots = SnapshotStore::open(store.jetstream(), &c.snapshot, 1)
            .await
            .unwrap();
        (store, snapshots)
    }

    /// Waits until the stored snapshot of `id` is valid and at least at `version`.
    async fn wait_for_snapshot(&self, id: &str, version: u64) -> Snapshot {
        let (_, snapshots) = self.stores().await;
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(bytes) = snapshots.get_raw("account", id).await.unwrap() {
                if let Ok(s) = Snapshot::decode(&bytes, 1) {
                    if s.version >= version {
                        return s;
                    }
                }
            }
            assert!(
                Instant::now() < deadline,
                "no snapshot of {id} at version {version}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    async fn shutdown(self) {
        self.stop.send_replace(true);
        for t in self.tasks {
            t.await.unwrap();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn snapshot_plus_tail_equals_full_replay_at_every_version() {
    let env = Env::start().await;
    env.send("s1", json!({"type": "OpenAccount", "data": {"owner": "o"}}))
        .await;
    for i in 1..=95u64 {
        env.send("s1", json!({"type": "Deposit", "data": {"amount": i}}))
            .await;
        if i % 20 == 0 {
            env.send(
                &format!("other{i}"),
                json!({"type": "OpenAccount", "data": {"owner": "x"}}),
            )
            .await;
        }
    }
    let snapshot = env.wait_for_snapshot("s1", 90).await;
    assert_eq!(
        snapshot.version, 90,
        "every 10 events: the last one is at 90"
    );
    let (store, snapshots) = env.stores().await;
    let registry = jetsource_bank::registry();
    let account = registry.get("account").unwrap().as_ref();

    let mut events = Vec::new();
    store
        .read("account", "s1", 1, |chunk| {
            events.extend(chunk);
            ControlFlow::Continue(())
        })
        .await
        .unwrap();
    assert_eq!(events.len(), 96);
    for event in &events {
        let at = Until::Sequence(event.sequence);
        let full = Loaded::load(&store, account, "s1", at).await.unwrap();
        let (fast, used) = Loaded::load_with_snapshot(&store, &snapshots, account, "s1", at)
            .await
            .unwrap();
        assert_eq!(fast.version, event.aggregate_version);
        assert_eq!(fast.version, full.version);
        assert_eq!(fast.last_sequence, full.last_sequence);
        assert_eq!(
            account.state_to_json(&fast.state),
            account.state_to_json(&full.state)
        );
        if event.aggregate_version >= 90 {
            assert_eq!(used, SnapshotUse::Used { version: 90 });
        } else {
            assert_eq!(
                used,
                SnapshotUse::TooNew,
                "a snapshot past the point is not used"
            );
        }
        // By time: the same rule.
        let (by_time, _) = Loaded::load_with_snapshot(
            &store,
            &snapshots,
            account,
            "s1",
            Until::Time(event.timestamp),
        )
        .await
        .unwrap();
        assert!(by_time.version >= event.aggregate_version);
        assert_eq!(
            account.state_to_json(&by_time.state),
            account.state_to_json(
                &Loaded::load(&store, account, "s1", Until::Time(event.timestamp))
                    .await
                    .unwrap()
                    .state
            )
        );
    }
    // A fresh worker (cold cache) starts from the snapshot and continues.
    let reply = env
        .send("s1", json!({"type": "Withdraw", "data": {"amount": 1}}))
        .await;
    assert_eq!(reply.version, 97);
    env.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn damaged_snapshots_are_ignored_then_replaced() {
    let env = Env::start().await;
    env.send(
        "s2",
        json!({"type": "OpenAccount", "data": {"owner": "o", "initial_deposit": 100}}),
    )
    .await;
    for _ in 0..8 {
        env.send("s2", json!({"type": "Deposit", "data": {"amount": 10}}))
            .await;
    }
    let good = env.wait_for_snapshot("s2", 10).await;
    let (store, snapshots) = env.stores().await;
    let registry = jetsource_bank::registry();
    let account = registry.get("account").unwrap().as_ref();
    let full = Loaded::load(&store, account, "s2", Until::End)
        .await
        .unwrap();
    let expected = account.state_to_json(&full.state);
    assert_eq!(expected["balance"], 180);

    let mut bad_checksum = good.clone();
    bad_checksum.state["balance"] = json!(999_999);
    let mut old_schema = good.clone();
    old_schema.state_schema = 0;
    let old_schema = old_schema.seal();
    let mut wrong_state = good.clone();
    wrong_state.state = json!({"balance": "much"});
    let wrong_state = wrong_state.seal();
    for (what, bytes) in [
        ("garbage", b"\x00\x01 not json".to_vec()),
        ("checksum", serde_json::to_vec(&bad_checksum).unwrap()),
        ("schema", serde_json::to_vec(&old_schema).unwrap()),
        ("state", serde_json::to_vec(&wrong_state).unwrap()),
    ] {
        snapshots.put_raw("account.s2", bytes).await.unwrap();
        let (loaded, used) =
            Loaded::load_with_snapshot(&store, &snapshots, account, "s2", Until::End)
                .await
                .unwrap();
        assert!(matches!(used, SnapshotUse::Ignored(_)), "{what}: {used:?}");
        assert_eq!(
            account.state_to_json(&loaded.state),
            expected,
            "{what}: the right state anyway"
        );
        assert_eq!(loaded.version, full.version);
    }
    // The command path is not disturbed by the damaged snapshot...
    for _ in 0..10 {
        env.send("s2", json!({"type": "Deposit", "data": {"amount": 1}}))
            .await;
    }
    // ...and the snapshotter replaces it with a good one.
    let replaced = env.wait_for_snapshot("s2", 20).await;
    assert_eq!(replaced.version, 20);
    assert_eq!(replaced.state["balance"], 190);
    env.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rebuild_writes_a_snapshot_of_every_aggregate() {
    let env = Env::start().await;
    for id in ["r1", "r2", "r3"] {
        env.send(
            id,
            json!({"type": "OpenAccount", "data": {"owner": "o", "initial_deposit": 5}}),
        )
        .await;
    }
    let (store, snapshots) = env.stores().await;
    let registry = jetsource_bank::registry();
    let mut calls = Vec::new();
    let written = jetsource_snapshotter::rebuild(
        &store,
        &snapshots,
        &registry,
        Some("account"),
        |done, total| calls.push((done, total)),
    )
    .await
    .unwrap();
    assert_eq!(written, 3);
    assert_eq!(calls.last(), Some(&(3, 3)));
    for id in ["r1", "r2", "r3"] {
        let bytes = snapshots.get_raw("account", id).await.unwrap().unwrap();
        let snapshot = Snapshot::decode(&bytes, 1).unwrap();
        assert_eq!(snapshot.version, 2);
        assert_eq!(snapshot.state["balance"], 5);
    }
    env.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_snapshot_request_is_served_and_answered() {
    let env = Env::start().await;
    env.send(
        "q1",
        json!({"type": "OpenAccount", "data": {"owner": "o", "initial_deposit": 7}}),
    )
    .await;
    env.send("q1", json!({"type": "Deposit", "data": {"amount": 3}}))
        .await;
    // Three events, none a snapshot point (every 10): only the request
    // makes one.
    let reply = env
        .client
        .request(
            jetsource_command::snapshot_request_subject("account", "q1"),
            "".into(),
        )
        .await
        .unwrap();
    let answer = decode_reply::<serde_json::Value>(&reply.payload)
        .unwrap()
        .unwrap();
    assert_eq!(answer, json!({"snapshot": "stored"}));
    let snapshot = env.wait_for_snapshot("q1", 3).await;
    assert_eq!(snapshot.state["balance"], 10);
    // Asked again: the same version is there already.
    let reply = env
        .client
        .request(
            jetsource_command::snapshot_request_subject("account", "q1"),
            "".into(),
        )
        .await
        .unwrap();
    let answer = decode_reply::<serde_json::Value>(&reply.payload)
        .unwrap()
        .unwrap();
    assert_eq!(answer, json!({"snapshot": "kept"}));
    // A malformed request is refused, not taken for a fault.
    let reply = env
        .client
        .request("jetsource.snapshot.request.nosuchtype.x1", "".into())
        .await
        .unwrap();
    let refused = decode_reply::<serde_json::Value>(&reply.payload)
        .unwrap()
        .unwrap_err();
    assert_eq!(refused.code, jetsource_core::protocol::ErrorCode::Invalid);
    env.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rebuild_never_replaces_a_newer_snapshot() {
    let env = Env::start().await;
    for id in ["n1", "n2"] {
        env.send(
            id,
            json!({"type": "OpenAccount", "data": {"owner": "o", "initial_deposit": 5}}),
        )
        .await;
    }
    let (store, snapshots) = env.stores().await;
    let registry = jetsource_bank::registry();
    let account = registry.get("account").unwrap().as_ref();
    let rebuilt = |id: &'static str| {
        let store = store.clone();
        async move {
            let loaded = Loaded::load(&store, account, id, Until::End).await.unwrap();
            loaded.to_snapshot(account, id).unwrap()
        }
    };
    let stored = |id: &'static str| {
        let snapshots = snapshots.clone();
        async move {
            let bytes = snapshots.get_raw("account", id).await.unwrap().unwrap();
            Snapshot::decode(&bytes, 1).unwrap()
        }
    };
    // n1 has a snapshot newer than the events the rebuild reads (as one
    // the snapshotter wrote after more events had come in), n2 an older
    // one.
    let mut newer = rebuilt("n1").await;
    newer.version += 5;
    newer.sequence += 100;
    newer.state["balance"] = json!(42);
    let newer = newer.seal();
    let mut older = rebuilt("n2").await;
    older.version = 1;
    older.state["balance"] = json!(0);
    let older = older.seal();
    for (key, snapshot) in [("account.n1", &newer), ("account.n2", &older)] {
        let bytes = serde_json::to_vec(snapshot).unwrap();
        snapshots.put_raw(key, bytes).await.unwrap();
    }
    let rebuild = || {
        jetsource_snapshotter::rebuild(&store, &snapshots, &registry, Some("account"), |_, _| {})
    };
    assert_eq!(rebuild().await.unwrap(), 1, "only n2 is written");
    assert_eq!(stored("n1").await, newer, "the newer snapshot stays");
    let n2 = stored("n2").await;
    assert_eq!((n2.version, n2.state["balance"].clone()), (2, json!(5)));

    // One of the same version is replaced: a rebuild after a fix to the
    // fold writes the state the fixed fold gives.
    let mut wrong = rebuilt("n2").await;
    wrong.state["balance"] = json!(999);
    let wrong = wrong.seal();
    let bytes = serde_json::to_vec(&wrong).unwrap();
    snapshots.put_raw("account.n2", bytes).await.unwrap();
    assert_eq!(rebuild().await.unwrap(), 1);
    assert_eq!(stored("n2").await.state["balance"], 5);
    assert_eq!(stored("n1").await, newer);
    env.shutdown().await;
}

/// An aggregate whose events are spread thinly over the stream gets a
/// snapshot whenever its newest event lies more than
/// `snapshot.max_tail_sequences` after its last one, long before `every`
/// events, so a cold load never reads a long stretch of the stream;
/// aggregates whose whole history is short get none. Both with its state
/// kept in memory and with it evicted at every event (read back from the
/// bucket and the store).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn thinly_spread_aggregates_are_snapshotted_within_the_tail_limit() {
    const LIMIT: u64 = 40;
    for cache_size in [1, 1_000] {
        let env = Env::start_with(if cache_size == 1 {
            |c: &mut Config| {
                c.snapshot.every = 1_000;
                c.snapshot.max_tail_sequences = LIMIT;
            }
        } else {
            |c: &mut Config| {
                c.snapshot.every = 1_000;
                c.snapshot.max_tail_sequences = LIMIT;
                c.snapshot.cache_size = 1_000;
            }
        })
        .await;
        let open = |owner: &str| json!({"type": "OpenAccount", "data": {"owner": owner}});
        env.send("dense", open("d")).await;
        for _ in 0..20 {
            env.send("dense", json!({"type": "Deposit", "data": {"amount": 1}}))
                .await;
        }
        env.send("thin", open("t")).await;
        let mut thin_last = 0;
        for i in 0..30 {
            for n in 0..15 {
                env.send(&format!("noise{i}-{n}"), open("n")).await;
            }
            let outcome = env
                .send("thin", json!({"type": "Deposit", "data": {"amount": 1}}))
                .await;
            thin_last = outcome.sequence;
        }
        let (store, snapshots) = env.stores().await;
        // Caught up: nothing pending on the snapshotter's consumer.
        let mut stream = store.jetstream().get_stream("EVENTS").await.unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let mut consumer = stream
                .get_consumer::<async_nats::jetstream::consumer::pull::Config>("snapshotter")
                .await
                .unwrap();
            let info = consumer.info().await.unwrap();
            if info.num_pending == 0 && info.num_ack_pending == 0 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the snapshotter did not catch up"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let _ = stream.info().await.unwrap();
        let thin = snapshots.sequence("account", "thin").await.unwrap();
        let thin = thin.expect("no snapshot of the thinly spread aggregate");
        assert!(
            thin_last - thin <= LIMIT,
            "cache {cache_size}: snapshot at {thin}, last event at {thin_last}"
        );
        assert_eq!(snapshots.sequence("account", "dense").await.unwrap(), None);
        assert_eq!(
            snapshots.sequence("account", "noise0-0").await.unwrap(),
            None
        );
        let account = jetsource_bank::registry().get("account").unwrap().clone();
        let (with, used) =
            Loaded::load_with_snapshot(&store, &snapshots, account.as_ref(), "thin", Until::End)
                .await
                .unwrap();
        assert!(matches!(used, SnapshotUse::Used { .. }), "{used:?}");
        let full = Loaded::load(&store, account.as_ref(), "thin", Until::End)
            .await
            .unwrap();
        assert_eq!((with.version, with.last_sequence), (31, thin_last));
        assert_eq!(
            account.state_to_json(&with.state),
            account.state_to_json(&full.state)
        );
        env.shutdown().await;
    }
}
