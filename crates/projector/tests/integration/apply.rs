//! The apply script against a real Redis: merged batches are applied whole
//! or, when a checkpoint lies inside them, event by event; a batch written
//! before (or without) the batch that precedes it is refused in every
//! partition that batch touches, writing nothing there, whatever order the
//! writes run in and whichever of them fails; the watermark rises only
//! from where its writer left it. Nothing is doubled, lost or reordered.

#![allow(clippy::unwrap_used)]

use jetsource_projector::projection::Op;
use jetsource_projector::redis_store::{PartitionBatch, RedisStore, Written};
use jetsource_test_support::RedisServer;

const PROJECTION: &str = "t";
const GENERATION: u64 = 1;

/// A deposit into partition `p` (keys `{p}:...`): its own marker first
/// (`{p}:event:<sequence>`, which a test can make fail), the partition's
/// total, and its log.
fn deposit_in(p: &str, sequence: u64, amount: i64) -> (u64, Vec<Op>) {
    (
        sequence,
        vec![
            Op::new("HSET", format!("{{{p}}}:event:{sequence}"))
                .arg("amount")
                .arg(amount),
            Op::new("HINCRBY", format!("{{{p}}}:totals"))
                .arg("sum")
                .arg(amount),
            Op::new("LPUSH", format!("{{{p}}}:log")).arg(sequence),
        ],
    )
}

fn deposit(sequence: u64, amount: i64) -> (u64, Vec<Op>) {
    deposit_in("p", sequence, amount)
}

/// Partition `p`'s share of a batch, written on top of its event `after`.
fn part(p: &str, after: u64, events: Vec<(u64, Vec<Op>)>) -> PartitionBatch {
    PartitionBatch {
        checkpoint: format!("{{{p}}}:checkpoint"),
        after,
        events,
    }
}

fn batch(events: Vec<(u64, Vec<Op>)>) -> Vec<PartitionBatch> {
    vec![part("p", 0, events)]
}

async fn connection(url: &str) -> redis::aio::MultiplexedConnection {
    let client = redis::Client::open(url).unwrap();
    client.get_multiplexed_async_connection().await.unwrap()
}

/// Partition `p`'s total, its log oldest first, and its checkpoint.
async fn state_of(url: &str, p: &str) -> (i64, Vec<u64>, u64) {
    let mut con = connection(url).await;
    let sum: Option<i64> = redis::cmd("HGET")
        .arg(format!("{{{p}}}:totals"))
        .arg("sum")
        .query_async(&mut con)
        .await
        .unwrap();
    let mut log: Vec<u64> = redis::cmd("LRANGE")
        .arg(format!("{{{p}}}:log"))
        .arg(0)
        .arg(-1)
        .query_async(&mut con)
        .await
        .unwrap();
    log.reverse();
    let checkpoint: Option<u64> = redis::cmd("GET")
        .arg(format!("{{{p}}}:checkpoint"))
        .query_async(&mut con)
        .await
        .unwrap();
    (sum.unwrap_or(0), log, checkpoint.unwrap_or(0))
}

async fn state(url: &str) -> (i64, Vec<u64>, u64) {
    state_of(url, "p").await
}

fn applied(written: Written) -> u64 {
    match written {
        Written::Applied { applied } => applied,
        other => panic!("not applied: {other:?}"),
    }
}

#[tokio::test]
async fn merged_batches_apply_once_even_over_a_partly_applied_range() {
    let server = RedisServer::start();
    let store = RedisStore::connect(&server.url()).await.unwrap();
    store.init_meta(PROJECTION, GENERATION, 1).await.unwrap();

    // Events 1 and 2 applied one by one (a single event is never merged).
    for e in [deposit(1, 10), deposit(2, 20)] {
        let w = store.prepare(PROJECTION, GENERATION, batch(vec![e]));
        assert_eq!(applied(store.write(&w).await.unwrap()), 1);
    }
    // A batch of 1..=5 (a redelivery overlapping what is applied): merged,
    // refused by the script, sent again event by event.
    let events: Vec<_> = (1..=5).map(|s| deposit(s, s as i64 * 10)).collect();
    let w = store.prepare(PROJECTION, GENERATION, batch(events.clone()));
    assert_eq!(
        applied(store.write(&w).await.unwrap()),
        3,
        "events 3, 4 and 5"
    );
    assert_eq!(state(&server.url()).await, (150, vec![1, 2, 3, 4, 5], 5));

    // The same batch again: all at or below the checkpoint, skipped.
    let w = store.prepare(PROJECTION, GENERATION, batch(events));
    assert_eq!(applied(store.write(&w).await.unwrap()), 0);
    // A fresh range: merged and applied whole.
    let events: Vec<_> = (6..=9).map(|s| deposit(s, 1)).collect();
    let w = store.prepare(PROJECTION, GENERATION, batch(events));
    assert_eq!(applied(store.write(&w).await.unwrap()), 4);
    assert_eq!(
        state(&server.url()).await,
        (154, (1..=9).collect::<Vec<_>>(), 9)
    );
}

/// Batches N and N+1 as the runner prepares them: N+1's partitions carry
/// the last event N gave them. `a` gets two events in each (merged, the
/// `m` form), `b` one (the `e` form), `c` only appears in N+1.
fn two_batches(
    store: &RedisStore,
) -> (
    jetsource_projector::redis_store::PreparedWrite,
    jetsource_projector::redis_store::PreparedWrite,
) {
    let n = store.prepare(
        PROJECTION,
        GENERATION,
        vec![
            part("a", 0, vec![deposit_in("a", 1, 10), deposit_in("a", 2, 20)]),
            part("b", 0, vec![deposit_in("b", 3, 30)]),
        ],
    );
    let n1 = store.prepare(
        PROJECTION,
        GENERATION,
        vec![
            part("a", 2, vec![deposit_in("a", 4, 40), deposit_in("a", 5, 50)]),
            part("b", 3, vec![deposit_in("b", 6, 60)]),
            part("c", 0, vec![deposit_in("c", 7, 70)]),
        ],
    );
    (n, n1)
}

/// The end state of [`two_batches`] applied exactly once, in order.
async fn assert_both_applied_once_in_order(url: &str) {
    assert_eq!(state_of(url, "a").await, (120, vec![1, 2, 4, 5], 5));
    assert_eq!(state_of(url, "b").await, (90, vec![3, 6], 6));
    assert_eq!(state_of(url, "c").await, (70, vec![7], 7));
}

#[tokio::test]
async fn a_batch_that_runs_before_the_one_before_it_is_refused_and_writes_nothing_there() {
    let server = RedisServer::start();
    let url = server.url();
    let store = RedisStore::connect(&url).await.unwrap();
    store.init_meta(PROJECTION, GENERATION, 3).await.unwrap();
    let (n, n1) = two_batches(&store);

    // N+1 runs first (N is still on its way, or failed): refused. The
    // partitions N touches are left as they were; `c`, whose events have
    // nothing before them, may apply.
    assert_eq!(store.write(&n1).await.unwrap(), Written::Refused);
    assert_eq!(state_of(&url, "a").await, (0, vec![], 0));
    assert_eq!(state_of(&url, "b").await, (0, vec![], 0));
    assert_eq!(state_of(&url, "c").await, (70, vec![7], 7));

    // N, then N+1 again (the runner's rewind): everything once, in order.
    assert_eq!(applied(store.write(&n).await.unwrap()), 3);
    assert_eq!(applied(store.write(&n1).await.unwrap()), 3, "4, 5 and 6");
    // A late copy of either (a write given up on that ran after all):
    // nothing.
    assert_eq!(applied(store.write(&n).await.unwrap()), 0);
    assert_eq!(applied(store.write(&n1).await.unwrap()), 0);
    assert_both_applied_once_in_order(&url).await;
}

/// The failure two writes in flight must survive: N fails in Redis (here a
/// script error on its first write in partition `a`, so nothing of `a` is
/// written) while N+1, right behind it on the same connection, would
/// succeed. Without the precondition N+1 would apply events 4 and 5 and
/// move `a`'s checkpoint past 1 and 2, which N's retry would then skip.
#[tokio::test]
async fn a_failed_write_followed_by_a_successful_one_applies_nothing_out_of_order() {
    let server = RedisServer::start();
    let url = server.url();
    let store = RedisStore::connect(&url).await.unwrap();
    store.init_meta(PROJECTION, GENERATION, 3).await.unwrap();
    let (n, n1) = two_batches(&store);
    // The connection for batches is open and the script loaded, so that
    // the two writes below run in the order they are made.
    let other = store.prepare(
        PROJECTION,
        GENERATION,
        vec![part("o", 0, vec![deposit_in("o", 100, 1)])],
    );
    assert_eq!(applied(store.write(&other).await.unwrap()), 1);
    let mut con = connection(&url).await;
    // Event 1's marker holds a list: its HSET fails (WRONGTYPE).
    let _: () = redis::cmd("RPUSH")
        .arg("{a}:event:1")
        .arg("trap")
        .query_async(&mut con)
        .await
        .unwrap();

    // Both in flight at once, N first on the connection.
    let (first, second) = tokio::join!(store.write(&n), store.write(&n1));
    let error = first.unwrap_err();
    assert!(error.to_string().contains("WRONGTYPE"), "{error}");
    assert_eq!(second.unwrap(), Written::Refused);
    assert_eq!(state_of(&url, "a").await, (0, vec![], 0), "nothing of a");
    // `b` applied N's event 3 in N's pipeline, so N+1's event 6 followed.
    assert_eq!(state_of(&url, "b").await, (90, vec![3, 6], 6));

    // The fault goes away; both are written again, in flight together.
    let _: () = redis::cmd("DEL")
        .arg("{a}:event:1")
        .query_async(&mut con)
        .await
        .unwrap();
    let (first, second) = tokio::join!(store.write(&n), store.write(&n1));
    assert_eq!(applied(first.unwrap()), 2, "1 and 2");
    assert_eq!(applied(second.unwrap()), 2, "4 and 5");
    assert_both_applied_once_in_order(&url).await;
}

#[tokio::test]
async fn the_watermark_rises_only_from_where_its_writer_left_it() {
    let server = RedisServer::start();
    let store = RedisStore::connect(&server.url()).await.unwrap();
    let raise = |from, to| store.raise_watermark(PROJECTION, GENERATION, from, to);
    assert_eq!(raise(0, 5).await.unwrap(), Some(5));
    assert_eq!(raise(5, 3).await.unwrap(), Some(5), "never lowered");
    // Another writer's higher watermark is no loss.
    assert_eq!(raise(2, 4).await.unwrap(), Some(5));
    // Below where this writer left it: Redis lost what it confirmed.
    assert_eq!(raise(7, 9).await.unwrap(), None);
    assert_eq!(store.watermark(PROJECTION, GENERATION).await.unwrap(), 5);
}
