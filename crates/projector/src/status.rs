//! A projection's state as operators see it (`jetsource projection status`,
//! the gateway's console): its active generation, checkpoint, lag behind
//! the stream in events and in time, and a rebuild in progress.

use jetsource_core::store::EventStore;
use serde_json::{json, Value};

use crate::redis_store::RedisStore;

/// The status of projection `name`, the stream's last sequence being
/// `last` (one stream info for all projections).
pub async fn projection_status(
    redis: &RedisStore,
    store: &EventStore,
    name: &str,
    last: u64,
) -> Result<Value, redis::RedisError> {
    let Some(meta) = redis.meta(name).await? else {
        return Ok(json!({"projection": name, "state": "not built (no projector has run)"}));
    };
    let checkpoint = redis.watermark(name, meta.active).await?;
    let lag = last.saturating_sub(checkpoint);
    // Lag in time: how long the oldest event not yet applied has waited.
    let lag_seconds = match (lag, store.get(checkpoint + 1).await) {
        (1.., Ok(Some(event))) => (time::OffsetDateTime::now_utc() - event.timestamp)
            .as_seconds_f64()
            .max(0.0),
        _ => 0.0,
    };
    let rebuild = match meta.building {
        Some((generation, _)) => {
            let done = redis.watermark(name, generation).await?;
            json!({"generation": generation, "checkpoint": done})
        }
        None => Value::Null,
    };
    Ok(json!({
        "projection": name,
        "state": "active",
        "generation": meta.active,
        "partitions": meta.partitions,
        "checkpoint": checkpoint,
        "stream_last_sequence": last,
        "lag_events": lag,
        "lag_seconds": lag_seconds,
        "rebuild": rebuild,
    }))
}
