//! The projector's Redis connections against a real redis-server: every
//! call ends within its timeout, a connection that stops answering is
//! replaced, and Redis going away (for longer than any retry schedule) and
//! coming back empty needs no restart of the client.

#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use jetsource_core::config::RedisConfig;
use jetsource_core::ErrorClass;
use jetsource_projector::redis_store::{class, RedisStore, Written};
use jetsource_test_support::{RedisServer, TcpProxy};

const TIMEOUT: Duration = Duration::from_millis(500);

fn config(url: String) -> RedisConfig {
    RedisConfig {
        url,
        timeout_ms: TIMEOUT.as_millis() as u64,
        write_timeout_ms: TIMEOUT.as_millis() as u64,
        ..RedisConfig::default()
    }
}

/// Calls `meta` until it succeeds, up to `within`; returns how many calls
/// failed first.
async fn until_meta_answers(store: &RedisStore, within: Duration) -> usize {
    let deadline = Instant::now() + within;
    let mut failed = 0;
    loop {
        match store.meta("p").await {
            Ok(_) => return failed,
            Err(e) => {
                assert_eq!(class(&e), ErrorClass::Transient, "{e}");
                failed += 1;
            }
        }
        assert!(
            Instant::now() < deadline,
            "Redis calls still fail after {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_connection_that_stops_answering_is_replaced() {
    let redis = RedisServer::start();
    let proxy = TcpProxy::start(redis.port());
    let store = RedisStore::connect_with(&config(proxy.redis_url()))
        .await
        .unwrap();
    store.init_meta("p", 7, 4).await.unwrap();
    assert_eq!(store.meta("p").await.unwrap().unwrap().active, 7);
    assert_eq!(store.watermark("p", 7).await.unwrap(), 0);

    // The open connections go silent: Redis is fine, nothing comes back.
    proxy.freeze();
    let started = Instant::now();
    let error = store.meta("p").await.unwrap_err();
    assert!(error.is_timeout(), "{error}");
    assert_eq!(class(&error), ErrorClass::Transient);
    assert!(
        started.elapsed() < TIMEOUT * 2,
        "the call took {:?}, its bound is {TIMEOUT:?}",
        started.elapsed()
    );
    // The timed-out connection was retired: the next call opens a new one.
    assert_eq!(until_meta_answers(&store, TIMEOUT * 4).await, 0);
    assert_eq!(store.meta("p").await.unwrap().unwrap().active, 7);

    // The same for the connection that writes batches.
    let batch = store.prepare("p", 7, Vec::new());
    assert_eq!(
        store.write(&batch).await.unwrap(),
        Written::Applied { applied: 0 }
    );
    proxy.freeze();
    let error = store.write(&batch).await.unwrap_err();
    assert!(error.is_timeout(), "{error}");
    assert_eq!(
        store.write(&batch).await.unwrap(),
        Written::Applied { applied: 0 }
    );
    // The freeze silenced the connection for reads too: the watermark
    // (raised on it) waits for its replacement.
    until_meta_answers(&store, TIMEOUT * 4).await;
    assert_eq!(store.raise_watermark("p", 7, 0, 6).await.unwrap(), Some(6));
    assert_eq!(store.watermark("p", 7).await.unwrap(), 6);
}

#[tokio::test]
async fn redis_down_then_back_empty_needs_no_new_client() {
    let mut redis = RedisServer::start();
    let store = RedisStore::connect_with(&config(redis.url()))
        .await
        .unwrap();
    store.init_meta("p", 1, 4).await.unwrap();
    let batch = store.prepare("p", 1, Vec::new());
    assert_eq!(
        store.write(&batch).await.unwrap(),
        Written::Applied { applied: 0 }
    );
    assert_eq!(store.raise_watermark("p", 1, 0, 9).await.unwrap(), Some(9));

    redis.kill();
    // Down: every call fails promptly and transiently, none waits for a
    // reconnection schedule.
    let down = Instant::now();
    let mut calls = 0;
    while down.elapsed() < Duration::from_secs(3) {
        let started = Instant::now();
        let error = store.meta("p").await.unwrap_err();
        assert_eq!(class(&error), ErrorClass::Transient, "{error}");
        assert!(started.elapsed() < TIMEOUT * 2, "{:?}", started.elapsed());
        let error = store.write(&batch).await.unwrap_err();
        assert_eq!(class(&error), ErrorClass::Transient, "{error}");
        let error = store.raise_watermark("p", 1, 9, 10).await.unwrap_err();
        assert_eq!(class(&error), ErrorClass::Transient, "{error}");
        calls += 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(calls > 10);

    // Back, empty: the same store works again (there is no retry budget
    // that could have run out meanwhile), scripts reloaded.
    redis.start_again();
    until_meta_answers(&store, Duration::from_secs(5)).await;
    assert_eq!(
        store.meta("p").await.unwrap(),
        None,
        "Redis came back empty"
    );
    // The connection for batches comes back too (after its pause).
    let written = loop {
        match store.write(&batch).await {
            Ok(written) => break written,
            Err(e) => assert_eq!(class(&e), ErrorClass::Transient, "{e}"),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(
        written,
        Written::Retired,
        "generation 1 is gone with the data"
    );
    store.init_meta("p", 2, 4).await.unwrap();
    let batch = store.prepare("p", 2, Vec::new());
    assert_eq!(
        store.write(&batch).await.unwrap(),
        Written::Applied { applied: 0 }
    );
    assert_eq!(store.raise_watermark("p", 2, 0, 3).await.unwrap(), Some(3));
}

/// Reads do not wait behind a batch of writes of their own process: they
/// run on a connection of their own and are answered between the batch's
/// partitions. (On one shared connection every read queued behind the
/// batch, and with redis-rs' 500 ms default timeout, while Redis was busy,
/// every read failed; so did the batches, which were then sent again.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_are_answered_while_a_long_batch_is_written() {
    use jetsource_projector::projection::Op;
    use jetsource_projector::redis_store::PartitionBatch;

    let redis = RedisServer::start();
    let store = RedisStore::connect(&redis.url()).await.unwrap();
    // 200 partitions of 1000 events: a batch far larger than the projector
    // writes, so it takes a while (about half a second here).
    let (partitions, events_per_partition) = (200u32, 1000u64);
    store.init_meta("p", 1, partitions).await.unwrap();
    let batches: Vec<PartitionBatch> = (0..partitions)
        .map(|p| PartitionBatch {
            checkpoint: format!("p:{{{p}}}:checkpoint"),
            after: 0,
            events: (1..=events_per_partition)
                .map(|i| {
                    let key = format!("p:{{{p}}}:h{}", i % 50);
                    (
                        u64::from(p) * events_per_partition + i,
                        vec![Op::new("HSET", key).arg(format!("f{i}")).arg(i)],
                    )
                })
                .collect(),
        })
        .collect();
    let write = store.prepare("p", 1, batches);
    let writing = {
        let store = store.clone();
        tokio::spawn(async move {
            let started = Instant::now();
            let written = store.write(&write).await;
            (written, started.elapsed())
        })
    };
    let mut reads = 0;
    let mut slowest = Duration::ZERO;
    while !writing.is_finished() {
        let started = Instant::now();
        store.meta("p").await.unwrap();
        slowest = slowest.max(started.elapsed());
        reads += 1;
    }
    let (written, took) = writing.await.unwrap();
    let written = written.unwrap();
    println!("the batch took {took:?}; {reads} reads meanwhile, the slowest {slowest:?}");
    assert_eq!(
        written,
        Written::Applied {
            applied: u64::from(partitions) * events_per_partition
        }
    );
    assert!(reads > 1);
    assert!(
        slowest < took / 4,
        "a read took {slowest:?}: it waited behind the batch ({took:?})"
    );
}
