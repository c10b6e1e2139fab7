//! The apply script against a real Redis: merged batches are applied whole
//! or, when a checkpoint lies inside them, event by event; nothing is
//! doubled or lost either way.

#![allow(clippy::unwrap_used)]

use jetsource_projector::projection::Op;
use jetsource_projector::redis_store::{PartitionBatch, RedisStore};
use jetsource_test_support::RedisServer;

const PROJECTION: &str = "t";
const GENERATION: u64 = 1;

fn deposit(sequence: u64, amount: i64) -> (u64, Vec<Op>) {
    (
        sequence,
        vec![
            Op::new("HINCRBY", "{p}:totals".into())
                .arg("sum")
                .arg(amount),
            Op::new("LPUSH", "{p}:log".into()).arg(sequence),
        ],
    )
}

fn batch(events: Vec<(u64, Vec<Op>)>) -> Vec<PartitionBatch> {
    vec![PartitionBatch {
        checkpoint: "{p}:checkpoint".into(),
        events,
    }]
}

async fn state(url: &str) -> (i64, Vec<u64>, u64) {
    let client = redis::Client::open(url).unwrap();
    let mut con = client.get_multiplexed_async_connection().await.unwrap();
    let sum: Option<i64> = redis::cmd("HGET")
        .arg("{p}:totals")
        .arg("sum")
        .query_async(&mut con)
        .await
        .unwrap();
    let mut log: Vec<u64> = redis::cmd("LRANGE")
        .arg("{p}:log")
        .arg(0)
        .arg(-1)
        .query_async(&mut con)
        .await
        .unwrap();
    log.reverse();
    let checkpoint: Option<u64> = redis::cmd("GET")
        .arg("{p}:checkpoint")
        .query_async(&mut con)
        .await
        .unwrap();
    (sum.unwrap_or(0), log, checkpoint.unwrap_or(0))
}

#[tokio::test]
async fn merged_batches_apply_once_even_over_a_partly_applied_range() {
    let server = RedisServer::start();
    let store = RedisStore::connect(&server.url()).await.unwrap();
    store.init_meta(PROJECTION, GENERATION, 1).await.unwrap();

    // Events 1 and 2 applied one by one (a single event is never merged).
    for e in [deposit(1, 10), deposit(2, 20)] {
        let w = store.prepare(PROJECTION, GENERATION, batch(vec![e]), 0);
        assert_eq!(store.write(&w).await.unwrap().unwrap().applied, 1);
    }
    // A batch of 1..=5 (a redelivery overlapping what is applied): merged,
    // refused by the script, sent again event by event.
    let events: Vec<_> = (1..=5).map(|s| deposit(s, s as i64 * 10)).collect();
    let w = store.prepare(PROJECTION, GENERATION, batch(events.clone()), 5);
    let written = store.write(&w).await.unwrap().unwrap();
    assert_eq!(written.applied, 3, "events 3, 4 and 5");
    assert_eq!(written.watermark, 5);
    assert_eq!(state(&server.url()).await, (150, vec![1, 2, 3, 4, 5], 5));

    // The same batch again: all at or below the checkpoint, skipped.
    let w = store.prepare(PROJECTION, GENERATION, batch(events), 5);
    assert_eq!(store.write(&w).await.unwrap().unwrap().applied, 0);
    // A fresh range: merged and applied whole.
    let events: Vec<_> = (6..=9).map(|s| deposit(s, 1)).collect();
    let w = store.prepare(PROJECTION, GENERATION, batch(events), 9);
    assert_eq!(store.write(&w).await.unwrap().unwrap().applied, 4);
    assert_eq!(
        state(&server.url()).await,
        (154, (1..=9).collect::<Vec<_>>(), 9)
    );
}
