//! The projector's writer keeps two batch writes to Redis in flight
//! (`runner::Window`). These tests make Redis fail or lose writes while it
//! catches up a backlog, and check what the window promises: the watermark
//! never covers an event that is not applied, and in the end every event
//! is applied exactly once, in stream order.

#![allow(clippy::unwrap_used)]

use std::future::Future;
use std::time::{Duration, Instant};

use jetsource_projector::keys::{partition_of, KeySpace};
use jetsource_projector::redis_store::RedisStore;
use serde_json::json;

use crate::common::{Backlog, Env};

/// The read model under test (the bank's `accounts`, alone).
const PROJECTION: &str = "accounts";
/// Its generation, created by the test before the projector starts, so
/// that the test knows its keys from the start.
const GENERATION: u64 = 7;

/// Polls `condition` until it holds; panics after 30 s.
async fn wait_until<F, Fut>(what: &str, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(30);
    while !condition().await {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

async fn connection(env: &Env) -> redis::aio::MultiplexedConnection {
    redis::Client::open(env.redis.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

/// How many error replies of `kind` (`OOM`, `WRONGTYPE`) Redis has sent.
async fn errors(con: &mut redis::aio::MultiplexedConnection, kind: &str) -> u64 {
    let info: String = redis::cmd("INFO")
        .arg("errorstats")
        .query_async(con)
        .await
        .unwrap();
    let prefix = format!("errorstat_{kind}:count=");
    info.lines()
        .find_map(|line| line.strip_prefix(&prefix))
        .map_or(0, |n| n.trim().parse().unwrap())
}

/// The bank's `accounts` projection alone, on a generation the test made.
async fn start_projector(env: &mut Env, store: &RedisStore) {
    start_projector_on(env, store, env.redis.url()).await;
}

/// [`start_projector`] with Redis reached at `redis_url`.
async fn start_projector_on(env: &mut Env, store: &RedisStore, redis_url: String) {
    store
        .init_meta(PROJECTION, GENERATION, env.config().projector.partitions)
        .await
        .unwrap();
    let mut config = env.config();
    config.redis.url = redis_url;
    let projections = jetsource_bank::projections(&config)
        .into_iter()
        .filter(|p| p.name() == PROJECTION)
        .collect();
    env.add_projector_configured(config, projections).await;
}

/// Ways to make Redis fail the projector's writes.
#[derive(Debug, Clone, Copy)]
enum Fault {
    /// `maxmemory` below what Redis uses: every write is refused with OOM
    /// (a script fails at its first write, so nothing of it is written).
    OutOfMemory,
    /// A partition's checkpoint turned into a hash: the apply script fails
    /// on it (WRONGTYPE) before writing anything, in that partition only;
    /// the other partitions of the same batches apply.
    Partition(u32),
}

impl Fault {
    fn error(self) -> &'static str {
        match self {
            Fault::OutOfMemory => "OOM",
            Fault::Partition(_) => "WRONGTYPE",
        }
    }

    /// The checkpoint and where the fault keeps its value meanwhile.
    fn keys(partition: u32) -> (String, String) {
        let keys = KeySpace::new(PROJECTION, GENERATION, partition);
        (keys.checkpoint(), keys.key("checkpoint-kept-by-test"))
    }

    async fn inject(self, con: &mut redis::aio::MultiplexedConnection) {
        match self {
            Fault::OutOfMemory => {
                let _: () = redis::cmd("CONFIG")
                    .arg("SET")
                    .arg("maxmemory")
                    .arg(1)
                    .query_async(con)
                    .await
                    .unwrap();
            }
            Fault::Partition(partition) => {
                let (checkpoint, kept) = Self::keys(partition);
                let script = r#"
local value = redis.call('GET', KEYS[1])
redis.call('DEL', KEYS[1], KEYS[2])
if value then redis.call('SET', KEYS[2], value) end
redis.call('HSET', KEYS[1], 'fault', 1)
"#;
                let _: () = redis::Script::new(script)
                    .key(checkpoint)
                    .key(kept)
                    .invoke_async(con)
                    .await
                    .unwrap();
            }
        }
    }

    async fn clear(self, con: &mut redis::aio::MultiplexedConnection) {
        match self {
            Fault::OutOfMemory => {
                let _: () = redis::cmd("CONFIG")
                    .arg("SET")
                    .arg("maxmemory")
                    .arg(0)
                    .query_async(con)
                    .await
                    .unwrap();
            }
            Fault::Partition(partition) => {
                let (checkpoint, kept) = Self::keys(partition);
                let script = r#"
local value = redis.call('GET', KEYS[2])
redis.call('DEL', KEYS[1], KEYS[2])
if value then redis.call('SET', KEYS[1], value) end
"#;
                let _: () = redis::Script::new(script)
                    .key(checkpoint)
                    .key(kept)
                    .invoke_async(con)
                    .await
                    .unwrap();
            }
        }
    }
}

/// The watermark promises that every event up to it is applied: each
/// account's read model has at least the version its events up to the
/// watermark give it. Read straight from Redis (queries read in a
/// transaction, which Redis refuses while it is out of memory). Returns the
/// watermark.
async fn assert_watermark_truthful(env: &Env, store: &RedisStore, backlog: &[Backlog]) -> u64 {
    let partitions = env.config().projector.partitions;
    let mut con = connection(env).await;
    let watermark = store.watermark(PROJECTION, GENERATION).await.unwrap();
    for account in backlog {
        let version = account.version_at(watermark);
        if version == 0 {
            continue;
        }
        let partition = partition_of("account", &account.id, partitions);
        let key = KeySpace::new(PROJECTION, GENERATION, partition)
            .key(&format!("account:{}", account.id));
        let applied: Option<u64> = redis::cmd("HGET")
            .arg(key)
            .arg("version")
            .query_async(&mut con)
            .await
            .unwrap();
        let applied = applied.unwrap_or(0);
        assert!(
            applied >= version,
            "the watermark is {watermark}, but {} is at version {applied}, not {version}: the watermark covers events that are not applied",
            account.id
        );
    }
    watermark
}

/// Every account exactly as its events make it: each deposit counted once
/// (balance, totals) and the latest ones listed in stream order.
async fn assert_applied_exactly_once_in_order(env: &Env, backlog: &[Backlog]) {
    let last = env.last_sequence().await;
    let wait = json!({"min_sequence": last, "timeout_ms": 30_000});
    let recent = env.config().projector.recent_transactions;
    for account in backlog {
        let reply = env
            .query(&format!("query.account.{}", account.id), wait.clone())
            .await
            .unwrap_or_else(|e| panic!("{}: {e}", account.id));
        let data = &reply["data"];
        assert_eq!(
            data["balance"],
            account.balance(),
            "balance of {}",
            account.id
        );
        assert_eq!(
            data["version"],
            account.deposits.len() + 1,
            "version of {}",
            account.id
        );
        let listed: Vec<u64> = data["recent_transactions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["sequence"].as_u64().unwrap())
            .collect();
        let expected: Vec<u64> = account
            .deposits
            .iter()
            .rev()
            .take(recent)
            .map(|(sequence, _)| *sequence)
            .collect();
        assert_eq!(listed, expected, "latest transactions of {}", account.id);
    }
    let totals = env
        .query("query.accounts.totals", wait.clone())
        .await
        .unwrap();
    let sum: u64 = backlog.iter().map(Backlog::balance).sum();
    assert_eq!(
        totals["data"],
        json!({"open_accounts": backlog.len(), "balance_sum": sum})
    );
}

/// Redis refuses the projector's writes again and again while it catches
/// up a backlog with two writes in flight: out of memory (every write
/// fails), or one partition failing while the other partitions of the
/// same batches apply. While a fault lasts, the watermark never covers an
/// event that is not applied (a watermark raised in the pipeline of a
/// write that then failed would); after each, the projector goes on; in
/// the end nothing is lost, doubled or reordered (a later batch applied
/// over an earlier one that failed would lose the earlier one's events).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_failing_writes_with_two_in_flight_loses_doubles_and_reorders_nothing() {
    let mut env = Env::start().await;
    let partitions = env.config().projector.partitions;
    let backlog = env.append_backlog("w", 64, 150).await;
    let last = env.last_sequence().await;
    let store = RedisStore::connect(&env.redis.url()).await.unwrap();
    let mut con = connection(&env).await;

    let batch_size = env.config().projector.batch_size as u64;
    let mut watermark = 0;
    let mut rounds = 0;
    for i in 0..8u32 {
        // Every stretch of the backlog has events of every account, so
        // every batch writes every partition, and the next write fails.
        if watermark + 4 * batch_size >= last {
            break;
        }
        let fault = if i % 2 == 0 {
            Fault::Partition(i / 2 % partitions)
        } else {
            Fault::OutOfMemory
        };
        let before = errors(&mut con, fault.error()).await;
        fault.inject(&mut con).await;
        if i == 0 {
            // The first fault is there before the projector's first write.
            start_projector(&mut env, &store).await;
        }
        // A write failed, was written again after its back-off, and failed
        // again: the window has been through a rewind under the fault.
        wait_until(&format!("{fault:?} fails writes twice"), || {
            let mut con = con.clone();
            async move { errors(&mut con, fault.error()).await >= before + 2 }
        })
        .await;
        let during = assert_watermark_truthful(&env, &store, &backlog).await;
        assert!(during >= watermark);
        println!("{fault:?}: the watermark stays at {during} of {last}");
        fault.clear(&mut con).await;
        rounds += 1;
        // The projector goes on; the next fault comes at once, so that the
        // backlog lasts.
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            watermark = store.watermark(PROJECTION, GENERATION).await.unwrap();
            if watermark > during {
                break;
            }
            assert!(Instant::now() < deadline, "no progress after {fault:?}");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
    assert!(
        rounds >= 4,
        "the backlog was applied after {rounds} faults: make it larger"
    );
    assert_applied_exactly_once_in_order(&env, &backlog).await;
}

/// Redis comes back from an older snapshot (killed, restarted from its last
/// save): the writes of batches the projector had confirmed, acknowledged
/// and covered by the watermark are gone. Its next batch is refused (its
/// partitions' checkpoints are below the events it was written on), or
/// its watermark found below the one it raised; the runner starts again
/// from the watermark Redis has and reads the lost events from the stream
/// again. Applying that batch over the restored checkpoints instead, and
/// raising the watermark over it, would lose every event in between.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_restored_from_an_older_snapshot_is_caught_up_again_exactly() {
    let mut env = Env::start().await;
    let store = RedisStore::connect(&env.redis.url()).await.unwrap();
    let mut con = connection(&env).await;
    start_projector(&mut env, &store).await;
    let applied = |sequence: u64| {
        let store = store.clone();
        move || {
            let store = store.clone();
            async move { store.watermark(PROJECTION, GENERATION).await.unwrap_or(0) >= sequence }
        }
    };

    let mut backlog = env.append_backlog("s", 12, 10).await;
    wait_until(
        "the first events are applied",
        applied(env.last_sequence().await),
    )
    .await;
    let _: () = redis::cmd("SAVE").query_async(&mut con).await.unwrap();
    // Applied, acknowledged and covered by the watermark after the save.
    let lost = env.append_backlog("l", 12, 10).await;
    wait_until(
        "the events after the save are applied",
        applied(env.last_sequence().await),
    )
    .await;
    assert_watermark_truthful(&env, &store, &lost).await;
    drop(con);
    env.redis.kill();
    env.redis.start_again();
    wait_until("Redis answers again", || {
        let store = store.clone();
        async move { store.watermark(PROJECTION, GENERATION).await.is_ok() }
    })
    .await;
    assert!(
        store.watermark(PROJECTION, GENERATION).await.unwrap()
            < lost.iter().map(|a| a.opened).min().unwrap(),
        "Redis is back as it was at the save"
    );

    // New events: the projector's next batch meets the older state, and
    // the runner starts again from the restored watermark. Its first batch
    // reads the lost events from the stream (the old runner's unacknowledged
    // messages would come back only after the ack wait).
    backlog.extend(lost);
    let lost_up_to = env.last_sequence().await;
    let mut next = 0;
    let deadline = Instant::now() + Duration::from_secs(30);
    while store.watermark(PROJECTION, GENERATION).await.unwrap_or(0) < lost_up_to {
        assert!(
            Instant::now() < deadline,
            "the lost events were not applied again"
        );
        backlog.extend(env.append_backlog(&format!("n{next}-"), 1, 0).await);
        next += 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_watermark_truthful(&env, &store, &backlog).await;
    // And on from there.
    backlog.extend(env.append_backlog("m", 12, 10).await);
    assert_applied_exactly_once_in_order(&env, &backlog).await;
}

/// Redis stops answering (the projector's connections go silent, as in a
/// partition) while the projector catches up, so its writes hang in flight
/// until their timeout (`redis.write_timeout_ms`, 10 s). A stop then ends
/// at once, well within the stop budget: nothing waits for those writes,
/// whose batches are simply not acknowledged (delivered again later, and
/// applied once).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stop_with_writes_hanging_in_flight_ends_at_once() {
    let mut env = Env::start().await;
    let backlog = env.append_backlog("h", 64, 60).await;
    let last = env.last_sequence().await;
    let store = RedisStore::connect(&env.redis.url()).await.unwrap();
    let proxy = jetsource_test_support::TcpProxy::start(env.redis.port());
    start_projector_on(&mut env, &store, proxy.redis_url()).await;
    wait_until("the projector is applying the backlog", || {
        let store = store.clone();
        async move { store.watermark(PROJECTION, GENERATION).await.unwrap() > 0 }
    })
    .await;
    proxy.freeze();
    let frozen = store.watermark(PROJECTION, GENERATION).await.unwrap();
    assert!(frozen < last, "the backlog was applied before the freeze");

    let started = Instant::now();
    env.stop_projector(0).await;
    let took = started.elapsed();
    assert!(
        took < jetsource_core::STOP_BUDGET,
        "the stop took {took:?}: something waited for a write in flight"
    );
    // Nothing was lost: a new copy, on a Redis that answers, applies the
    // rest exactly once.
    start_projector(&mut env, &store).await;
    assert_applied_exactly_once_in_order(&env, &backlog).await;
}
