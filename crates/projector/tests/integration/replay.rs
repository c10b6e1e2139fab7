//! Dead letters replayed once the projection code is fixed.

#![allow(clippy::unwrap_used)]

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crate::common::Env;
use jetsource_core::envelope::RecordedEvent;
use jetsource_projector::keys::{partition_of, KeySpace};
use jetsource_projector::projection::{Op, Projection, ProjectionError};
use jetsource_projector::redis_store::RedisStore;
use serde_json::json;

/// Sums deposits, but refuses a deposit of 13 until "fixed".
#[derive(Debug)]
struct Picky {
    fixed: Arc<AtomicBool>,
}

impl Projection for Picky {
    fn name(&self) -> &'static str {
        "picky"
    }

    fn aggregate_types(&self) -> &'static [&'static str] {
        &["account"]
    }

    fn project(
        &self,
        event: &RecordedEvent,
        keys: &KeySpace,
        ops: &mut Vec<Op>,
    ) -> Result<(), ProjectionError> {
        if event.event_type != "Deposited" {
            return Ok(());
        }
        let data: serde_json::Value = serde_json::from_slice(&event.data).unwrap();
        let amount = data["amount"].as_u64().unwrap();
        if amount == 13 && !self.fixed.load(Ordering::SeqCst) {
            return Err(ProjectionError("13 is unlucky".into()));
        }
        ops.push(
            Op::new("HINCRBY", keys.key(&format!("sum:{}", event.aggregate_id)))
                .arg("total")
                .arg(amount),
        );
        Ok(())
    }
}

async fn total(redis: &RedisStore, id: &str) -> i64 {
    let meta = redis.meta("picky").await.unwrap().unwrap();
    let keys = KeySpace::new(
        "picky",
        meta.active,
        partition_of("account", id, meta.partitions),
    );
    let mut con = redis.connection();
    let total: Option<i64> = redis::cmd("HGET")
        .arg(keys.key(&format!("sum:{id}")))
        .arg("total")
        .query_async(&mut con)
        .await
        .unwrap();
    total.unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_dead_letter_replays_once_the_projection_is_fixed() {
    let mut env = Env::start().await;
    let fixed = Arc::new(AtomicBool::new(false));
    let mut projections: Vec<Arc<dyn Projection>> = vec![
        Arc::new(jetsource_bank::read_models::Accounts {
            recent_transactions: 5,
        }),
        Arc::new(jetsource_bank::read_models::Users),
    ];
    projections.push(Arc::new(Picky {
        fixed: fixed.clone(),
    }));
    env.add_projector_with(projections.clone()).await;

    env.send(
        "account",
        "r1",
        json!({"type": "OpenAccount", "data": {"owner": "o"}}),
    )
    .await
    .unwrap();
    for amount in [5, 13, 7] {
        env.send(
            "account",
            "r1",
            json!({"type": "Deposit", "data": {"amount": amount}}),
        )
        .await
        .unwrap();
    }
    let last = env.last_sequence().await;
    // The accounts read model has everything; wait for it as a barrier.
    env.query("query.account.r1", json!({"min_sequence": last}))
        .await
        .unwrap();
    let redis = RedisStore::connect(&env.redis.url()).await.unwrap();
    // `picky` runs its own consumer; wait for its watermark too.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let meta = redis.meta("picky").await.unwrap();
        if let Some(meta) = meta {
            if redis.watermark("picky", meta.active).await.unwrap() >= last {
                break;
            }
        }
        assert!(
            std::time::Instant::now() < deadline,
            "picky did not catch up"
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert_eq!(total(&redis, "r1").await, 12, "13 was dead-lettered");

    let js = async_nats::jetstream::new(env.client.clone());
    let mut stream = js.get_stream("DEADLETTERS").await.unwrap();
    let store = env.store().await;
    // Still broken: kept, with the reason.
    let results = jetsource_projector::dlq::replay(&mut stream, &store, &redis, &projections, None)
        .await
        .unwrap();
    assert_eq!(results.len(), 1);
    assert_eq!(results[0].result, "kept");
    assert!(results[0]
        .reason
        .as_deref()
        .unwrap()
        .contains("13 is unlucky"));
    assert_eq!(total(&redis, "r1").await, 12);

    fixed.store(true, Ordering::SeqCst);
    let results = jetsource_projector::dlq::replay(&mut stream, &store, &redis, &projections, None)
        .await
        .unwrap();
    assert_eq!(results.len(), 1);
    assert_eq!(results[0].result, "replayed");
    assert_eq!(total(&redis, "r1").await, 25);
    // Gone from the dead letters; replaying again does nothing.
    assert!(jetsource_projector::dlq::list(&mut stream)
        .await
        .unwrap()
        .is_empty());
    let results = jetsource_projector::dlq::replay(&mut stream, &store, &redis, &projections, None)
        .await
        .unwrap();
    assert!(results.is_empty());
    assert_eq!(total(&redis, "r1").await, 25);
}
