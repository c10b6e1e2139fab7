//! Keeps one generation of one projection up to date: a durable pull
//! consumer on `events.>` in a pinned-client priority group, so exactly one
//! projector copy applies it at a time (per-aggregate order across copies)
//! and a standby takes over when that copy stops pulling.

use std::collections::BTreeMap;
use std::ops::ControlFlow;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::consumer::{pull, AckPolicy, DeliverPolicy, PriorityPolicy};
use async_nats::jetstream::Message;
use futures::StreamExt;
use jetsource_core::envelope::EVENT_SUBJECT_PREFIX;
use jetsource_core::store::StoredMessage;
use tokio::sync::watch;

use crate::keys::{partition_of, KeySpace};
use crate::projection::Projection;
use crate::redis_store::{PartitionBatch, RedisStore};
use crate::Shared;

/// Priority group every projector copy pulls in.
pub const PRIORITY_GROUP: &str = "projectors";

/// Durable consumer name of a projection generation.
pub fn consumer_name(projection: &str, generation: u64) -> String {
    format!("{projection}-g{generation}")
}

/// What a running generation reports to its manager.
#[derive(Debug, Default)]
pub struct Progress {
    /// The last batch left nothing pending: the generation is live.
    pub caught_up: AtomicBool,
    pub watermark: AtomicU64,
    /// The runner found its generation retired or Redis emptied, and stopped.
    pub stopped: AtomicBool,
}

pub fn consumer_config(projection: &str, generation: u64, failover: Duration) -> pull::Config {
    pull::Config {
        durable_name: Some(consumer_name(projection, generation)),
        description: Some(format!(
            "jetsource projection {projection}, generation {generation}"
        )),
        filter_subject: format!("{EVENT_SUBJECT_PREFIX}.>"),
        deliver_policy: DeliverPolicy::All,
        ack_policy: AckPolicy::All,
        ack_wait: Duration::from_secs(30),
        max_ack_pending: 20_000,
        priority_policy: PriorityPolicy::PinnedClient,
        priority_groups: vec![PRIORITY_GROUP.to_owned()],
        priority_timeout: failover,
        ..Default::default()
    }
}

enum Outcome {
    /// Applied; the generation's watermark is now this.
    Applied(u64),
    /// The generation is no longer active or building (switched away, or
    /// Redis lost the metadata): stop.
    Retired,
}

/// Runs until `stop` turns true or the generation is retired.
pub async fn run(
    shared: Arc<Shared>,
    projection: Arc<dyn Projection>,
    generation: u64,
    progress: Arc<Progress>,
    mut stop: watch::Receiver<bool>,
) {
    let name = projection.name();
    let failover = shared.config.failover();
    let consumer = loop {
        match shared
            .events
            .create_consumer(consumer_config(name, generation, failover))
            .await
        {
            Ok(consumer) => break consumer,
            Err(e) => {
                tracing::warn!(projection = name, generation, error = %e, "cannot create consumer; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    _ = stop.wait_for(|s| *s) => return,
                }
            }
        }
    };
    // An empty stream (or a consumer with nothing left) is caught up before
    // the first batch; a rebuild of it can switch at once.
    if let Ok(info) = consumer.clone().info().await {
        if info.num_pending == 0 && info.num_ack_pending == 0 {
            progress.caught_up.store(true, Ordering::SeqCst);
            shared.wake_managers();
        }
    }
    let mut watermark = loop {
        match shared.redis.watermark(name, generation).await {
            Ok(w) => break w,
            Err(e) => {
                tracing::warn!(projection = name, error = %e, "cannot read the watermark; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    _ = stop.wait_for(|s| *s) => return,
                }
            }
        }
    };
    // Pull expiry well below the failover time, so the pin is renewed.
    let expires = failover / 4;
    let mut backoff = Duration::from_millis(100);
    'pull: loop {
        let messages = match consumer
            .stream()
            .group(PRIORITY_GROUP)
            .max_messages_per_batch(shared.config.batch_size)
            .expires(expires)
            .heartbeat(expires / 2)
            .messages()
            .await
        {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(projection = name, generation, error = %e, "cannot pull; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(1)) => continue 'pull,
                    _ = stop.wait_for(|s| *s) => return,
                }
            }
        };
        let mut chunks = messages.ready_chunks(shared.config.batch_size);
        loop {
            let chunk = tokio::select! {
                biased;
                _ = stop.wait_for(|s| *s) => return,
                chunk = chunks.next() => chunk,
            };
            let Some(chunk) = chunk else { continue 'pull };
            let mut batch = Vec::with_capacity(chunk.len());
            for item in chunk {
                match item {
                    Ok(message) => batch.push(message),
                    Err(e) => tracing::debug!(projection = name, error = %e, "pull stream notice"),
                }
            }
            let Some((newest, info)) = batch
                .iter()
                .filter_map(|m| m.info().ok().map(|i| (m, i)))
                .max_by_key(|(_, i)| i.stream_sequence)
            else {
                continue;
            };
            let newest_sequence = info.stream_sequence;
            let pending = info.pending;
            // Apply everything from the watermark up to the newest message,
            // in stream order, with no gap. Messages may arrive out of order
            // or with holes: after a failover, those delivered to the copy
            // that died come back only after the ack wait, while newer ones
            // flow here. The holes are read from the stream directly, so an
            // event is never applied after a later one of its aggregate.
            loop {
                let applied = fill_and_apply(
                    &shared,
                    projection.as_ref(),
                    generation,
                    watermark,
                    newest_sequence,
                    &batch,
                )
                .await;
                match applied {
                    Ok(Some(raised)) => {
                        watermark = raised;
                        break;
                    }
                    Ok(None) => {
                        progress.stopped.store(true, Ordering::SeqCst);
                        shared.wake_managers();
                        return;
                    }
                    Err(e) => {
                        tracing::warn!(projection = name, generation, error = %e, "batch failed; retrying");
                        tokio::select! {
                            _ = tokio::time::sleep(backoff) => {}
                            _ = stop.wait_for(|s| *s) => return,
                        }
                        backoff = (backoff * 2).min(Duration::from_secs(2));
                    }
                }
            }
            backoff = Duration::from_millis(100);
            // AckPolicy::All: acking the newest covers every older one, which
            // are all applied now.
            if let Err(e) = newest.ack().await {
                tracing::warn!(projection = name, error = %e, "ack failed; the batch will be redelivered and skipped");
            }
            progress.watermark.store(watermark, Ordering::SeqCst);
            progress.caught_up.store(pending == 0, Ordering::SeqCst);
            shared.announce(name, generation, watermark).await;
            if pending == 0 {
                shared.wake_managers();
            }
        }
    }
}

/// Brings the generation from `watermark` to `newest`: takes the batch's
/// messages above the watermark, reads any missing sequence from the stream,
/// and applies them all in order. Returns the new watermark, or `None` when
/// the generation was retired.
async fn fill_and_apply(
    shared: &Shared,
    projection: &dyn Projection,
    generation: u64,
    watermark: u64,
    newest: u64,
    batch: &[Message],
) -> Result<Option<u64>, String> {
    if newest <= watermark {
        return Ok(Some(watermark));
    }
    let mut messages: BTreeMap<u64, StoredMessage> = BTreeMap::new();
    for message in batch {
        let Ok(info) = message.info() else { continue };
        if info.stream_sequence > watermark {
            messages.insert(
                info.stream_sequence,
                StoredMessage {
                    subject: message.subject.to_string(),
                    sequence: info.stream_sequence,
                    timestamp: info.published,
                    headers: message.headers.clone(),
                    payload: message.payload.clone(),
                },
            );
        }
    }
    let expected = newest - watermark;
    if messages.len() as u64 != expected {
        let mut missing = Vec::new();
        shared
            .store
            .read_all(watermark + 1, |chunk| {
                for m in chunk {
                    if m.sequence > newest {
                        return ControlFlow::Break(());
                    }
                    missing.push(m);
                }
                ControlFlow::Continue(())
            })
            .await
            .map_err(|e| e.to_string())?;
        for m in missing {
            messages.entry(m.sequence).or_insert(m);
        }
        tracing::debug!(
            projection = projection.name(),
            from = watermark + 1,
            to = newest,
            "filled a gap from the stream"
        );
    }
    let messages: Vec<StoredMessage> = messages.into_values().collect();
    match apply_batch(shared, projection, generation, &messages).await? {
        Outcome::Retired => Ok(None),
        Outcome::Applied(raised) => Ok(Some(raised)),
    }
}

/// Projects a batch and applies it: per partition, one atomic Lua call that
/// skips what the partition checkpoint already covers; then the watermark.
async fn apply_batch(
    shared: &Shared,
    projection: &dyn Projection,
    generation: u64,
    batch: &[StoredMessage],
) -> Result<Outcome, String> {
    let name = projection.name();
    let redis: &RedisStore = &shared.redis;
    let meta = redis.meta(name).await.map_err(|e| e.to_string())?;
    let Some(partitions) = meta.and_then(|m| m.partitions_of(generation)) else {
        return Ok(Outcome::Retired);
    };
    let mut by_partition: BTreeMap<u32, PartitionBatch> = BTreeMap::new();
    let mut last_sequence = 0;
    for message in batch {
        let sequence = message.sequence;
        last_sequence = sequence;
        let aggregate_type = message.subject.split('.').nth(1).unwrap_or("");
        if !projection.aggregate_types().contains(&aggregate_type) {
            continue;
        }
        let event = message.clone().into_event();
        let projected = match event {
            Err(e) => Err(e.to_string()),
            Ok(event) => {
                let partition =
                    partition_of(&event.aggregate_type, &event.aggregate_id, partitions);
                let keys = KeySpace::new(name, generation, partition);
                let mut attempt = 0;
                loop {
                    attempt += 1;
                    let mut ops = Vec::new();
                    match projection.project(&event, &keys, &mut ops) {
                        Ok(()) => break Ok((partition, keys, ops)),
                        Err(e) if attempt >= shared.config.max_attempts => {
                            break Err(format!("{e} (after {attempt} attempts)"))
                        }
                        Err(_) => continue,
                    }
                }
            }
        };
        match projected {
            Ok((_, _, ops)) if ops.is_empty() => {}
            Ok((partition, keys, ops)) => by_partition
                .entry(partition)
                .or_insert_with(|| PartitionBatch {
                    checkpoint: keys.checkpoint(),
                    events: Vec::new(),
                })
                .events
                .push((sequence, ops)),
            Err(reason) => {
                tracing::warn!(projection = name, sequence, subject = %message.subject, %reason, "dead-lettering an event");
                crate::dlq::publish(
                    &shared.js,
                    &crate::dlq::Letter {
                        projection: name,
                        generation,
                        original_subject: &message.subject,
                        original_sequence: sequence,
                        original_headers: message.headers.as_ref(),
                        payload: message.payload.clone(),
                        reason: &reason,
                    },
                )
                .await?;
            }
        }
    }
    let partitions: Vec<_> = by_partition.into_values().collect();
    redis.apply(&partitions).await.map_err(|e| e.to_string())?;
    let watermark = redis
        .raise_watermark(name, generation, last_sequence)
        .await
        .map_err(|e| e.to_string())?;
    Ok(Outcome::Applied(watermark))
}
