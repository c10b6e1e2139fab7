//! Keeps one generation of one projection up to date: a durable pull
//! consumer on `events.>` in a pinned-client priority group, so exactly one
//! projector copy applies it at a time (per-aggregate order across copies)
//! and a standby takes over when that copy stops pulling.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::consumer::{
    pull, AckPolicy, DeliverPolicy, PriorityPolicy, PullConsumer,
};
use async_nats::jetstream::Message;
use futures::StreamExt;
use jetsource_core::envelope::{RecordedEvent, EVENT_SUBJECT_PREFIX};
use jetsource_core::store::StoredMessage;
use tokio::sync::{mpsc, watch};

use crate::keys::{partition_of, KeySpace};
use crate::projection::Projection;
use crate::redis_store::{PartitionBatch, PreparedWrite};
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

/// Subjects of the events a projection reads: `events.<type>.>` per
/// aggregate type (all events if it names none). The server filters, so a
/// projection of a rare type does not receive, parse and skip everything
/// else in the stream.
pub fn filter_subjects(projection: &dyn Projection) -> Vec<String> {
    let types = projection.aggregate_types();
    if types.is_empty() {
        return vec![format!("{EVENT_SUBJECT_PREFIX}.>")];
    }
    types
        .iter()
        .map(|t| format!("{EVENT_SUBJECT_PREFIX}.{t}.>"))
        .collect()
}

pub fn consumer_config(
    projection: &dyn Projection,
    generation: u64,
    failover: Duration,
) -> pull::Config {
    let name = projection.name();
    let mut filters = filter_subjects(projection);
    let (filter_subject, filter_subjects) = if filters.len() == 1 {
        (filters.remove(0), Vec::new())
    } else {
        (String::new(), filters)
    };
    pull::Config {
        durable_name: Some(consumer_name(name, generation)),
        description: Some(format!(
            "jetsource projection {name}, generation {generation}"
        )),
        filter_subject,
        filter_subjects,
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

/// A batch on its way from the puller to the writer.
struct Batch {
    /// The Redis writes, `None` when every message was applied already (a
    /// redelivery): the batch is then only acknowledged.
    write: Option<PreparedWrite>,
    /// Newest message of the batch: acknowledging it covers all older ones
    /// (`AckPolicy::All`). `None` for a watermark raised over other types'
    /// events, which acknowledges nothing.
    newest: Option<Message>,
    /// Messages the consumer still had after this batch.
    pending: u64,
}

/// Runs until `stop` turns true or the generation is retired.
///
/// Two stages run side by side: the puller reads messages, fills gaps,
/// projects and encodes batch N+1 while the writer applies batch N in Redis
/// and acknowledges it. With one stage after the other the projector and
/// Redis took turns, each idle half of the time.
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
            .create_consumer(consumer_config(projection.as_ref(), generation, failover))
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
    // The watermark and the partition count (fixed per generation).
    let (watermark, partitions) = loop {
        let read = async {
            let watermark = shared.redis.watermark(name, generation).await?;
            let meta = shared.redis.meta(name).await?;
            Ok::<_, redis::RedisError>((watermark, meta.and_then(|m| m.partitions_of(generation))))
        };
        match read.await {
            Ok((watermark, Some(partitions))) => break (watermark, partitions),
            Ok((_, None)) => {
                progress.stopped.store(true, Ordering::SeqCst);
                shared.wake_managers();
                return;
            }
            Err(e) => {
                tracing::warn!(projection = name, error = %e, "cannot read the watermark; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    _ = stop.wait_for(|s| *s) => return,
                }
            }
        }
    };
    // Two batches in flight keep both stages busy; more would only hold
    // memory.
    let (batches, queue) = mpsc::channel::<Batch>(2);
    let writer = tokio::spawn(write_batches(
        shared.clone(),
        name,
        generation,
        progress.clone(),
        queue,
        stop.clone(),
    ));
    let abort = writer.abort_handle();
    let puller = pull_batches(
        &shared,
        projection.as_ref(),
        generation,
        partitions,
        watermark,
        &consumer,
        batches,
        stop,
    );
    tokio::select! {
        _ = puller => abort.abort(),
        _ = writer => {}
    }
}

/// Pulls messages and turns them into prepared batches, gap-free from the
/// watermark, until `stop` or until the writer is gone.
///
/// Batches grow with the load: while the writer is busy, arriving messages
/// join the next batch (up to `projector.batch_size`), so a backlog is
/// applied in large Redis round trips and a trickle in small, prompt ones.
#[allow(clippy::too_many_arguments)]
async fn pull_batches(
    shared: &Shared,
    projection: &dyn Projection,
    generation: u64,
    partitions: u32,
    watermark: u64,
    consumer: &PullConsumer,
    batches: mpsc::Sender<Batch>,
    mut stop: watch::Receiver<bool>,
) {
    let name = projection.name();
    let batch_size = shared.config.batch_size;
    // Everything up to here is prepared (handed to the writer).
    let mut prepared = watermark;
    // Delivery (consumer) sequences grow by one for every delivery to any
    // copy, redeliveries included: a run with no jump since our last one
    // means nothing was delivered elsewhere meanwhile, so no event between
    // the watermark and the batch can be missing. A jump (or the first
    // batch) may hide a hole, which `prepare` reads from the stream.
    let mut last_delivery: Option<u64> = None;
    let mut pending: Vec<(u64, u64, Message)> = Vec::new();
    let mut contiguous = false;
    // The consumer delivers only the projection's own aggregate types, so
    // the watermark would stop at its last own event while other types'
    // events go on. When the consumer has nothing left, `advance` raises it
    // over them: at once after a batch, then every `ADVANCE_EVERY` while
    // idle.
    let mut caught_up = true;
    let mut next_advance = tokio::time::Instant::now();
    // Pull expiry well below the failover time, so the pin is renewed.
    let expires = shared.config.failover() / 4;
    'pull: loop {
        let messages = match consumer
            .stream()
            .group(PRIORITY_GROUP)
            .max_messages_per_batch(batch_size)
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
        let mut chunks = messages.ready_chunks(batch_size);
        loop {
            let room = pending.len() < batch_size;
            enum Next<'a, C> {
                Send(Result<mpsc::Permit<'a, Batch>, mpsc::error::SendError<()>>),
                Chunk(Option<C>),
                Advance,
            }
            let idle = caught_up && pending.is_empty();
            let next = tokio::select! {
                biased;
                _ = stop.wait_for(|s| *s) => return,
                permit = batches.reserve(), if !pending.is_empty() => Next::Send(permit),
                chunk = chunks.next(), if room => Next::Chunk(chunk),
                _ = tokio::time::sleep_until(next_advance), if idle => Next::Advance,
            };
            match next {
                Next::Advance => {
                    next_advance = tokio::time::Instant::now() + ADVANCE_EVERY;
                    match advance(shared, projection, prepared).await {
                        Ok(Some(to)) => {
                            let write = shared.redis.prepare(name, generation, Vec::new(), to);
                            let batch = Batch {
                                write: Some(write),
                                newest: None,
                                pending: 0,
                            };
                            if batches.send(batch).await.is_err() {
                                return;
                            }
                            prepared = to;
                        }
                        Ok(None) => {}
                        Err(e) => {
                            tracing::debug!(projection = name, error = %e, "cannot advance the watermark")
                        }
                    }
                }
                Next::Send(permit) => {
                    let Ok(permit) = permit else { return };
                    let Some(batch) = take_batch(
                        shared,
                        projection,
                        generation,
                        partitions,
                        &mut prepared,
                        &mut pending,
                        contiguous,
                        &mut stop,
                    )
                    .await
                    else {
                        return;
                    };
                    caught_up = batch.pending == 0;
                    next_advance = tokio::time::Instant::now();
                    permit.send(batch);
                }
                Next::Chunk(None) => continue 'pull,
                Next::Chunk(Some(chunk)) => {
                    if pending.is_empty() {
                        contiguous = last_delivery.is_some();
                    }
                    for item in chunk {
                        match item {
                            Ok(message) => match message.info() {
                                Ok(info) => {
                                    let delivery = info.consumer_sequence;
                                    if last_delivery.is_some_and(|last| delivery != last + 1) {
                                        contiguous = false;
                                    }
                                    last_delivery = Some(delivery);
                                    pending.push((info.stream_sequence, info.pending, message));
                                }
                                Err(e) => {
                                    contiguous = false;
                                    tracing::debug!(projection = name, error = %e, "message without metadata");
                                }
                            },
                            Err(e) => {
                                tracing::debug!(projection = name, error = %e, "pull stream notice")
                            }
                        }
                    }
                }
            }
        }
    }
}

/// How often an idle runner looks for other types' events to raise its
/// watermark over.
const ADVANCE_EVERY: Duration = Duration::from_millis(100);

/// The sequence the watermark may rise to over events of other types: the
/// stream's last sequence, if no event of the projection's types lies
/// between `prepared` and it (such an event is on its way through the
/// consumer and raises the watermark itself). Every sequence up to the
/// stream's last one exists once it is read, so nothing can appear below it
/// later.
///
/// Both reads are answered by the stream leader. A direct get would do for
/// the second on a single node, but on a replicated stream any replica may
/// answer it, and one that has not yet received the projection's next
/// event answers "none": the watermark would then jump over an event that
/// the consumer delivers a moment later and the batch skips as applied.
async fn advance(
    shared: &Shared,
    projection: &dyn Projection,
    prepared: u64,
) -> Result<Option<u64>, jetsource_core::store::StoreError> {
    let last = shared.store.last_sequence().await?;
    if last <= prepared {
        return Ok(None);
    }
    for filter in filter_subjects(projection) {
        if let Some(next) = shared.store.leader_next(&filter, prepared + 1).await? {
            if next.sequence <= last {
                return Ok(None);
            }
        }
    }
    Ok(Some(last))
}

/// Turns the pending messages into a batch for the writer, retrying what
/// fails (reading a gap, storing a dead letter) until it succeeds. `None`
/// when `stop` turned true meanwhile.
#[allow(clippy::too_many_arguments)]
async fn take_batch(
    shared: &Shared,
    projection: &dyn Projection,
    generation: u64,
    partitions: u32,
    prepared: &mut u64,
    pending: &mut Vec<(u64, u64, Message)>,
    contiguous: bool,
    stop: &mut watch::Receiver<bool>,
) -> Option<Batch> {
    let newest_at = (0..pending.len()).max_by_key(|&i| pending[i].0)?;
    let (newest_sequence, left, newest) = pending.swap_remove(newest_at);
    let mut messages = collect(*prepared, (newest_sequence, &newest), pending);
    let mut backoff = Duration::from_millis(100);
    let write = loop {
        let attempt = prepare(
            shared,
            projection,
            generation,
            partitions,
            *prepared,
            newest_sequence,
            &mut messages,
            contiguous,
        )
        .await;
        match attempt {
            Ok(write) => break write,
            Err(e) => {
                tracing::warn!(projection = projection.name(), generation, error = %e, "cannot prepare a batch; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = stop.wait_for(|s| *s) => return None,
                }
                backoff = (backoff * 2).min(Duration::from_secs(2));
            }
        }
    };
    *prepared = (*prepared).max(newest_sequence);
    Some(Batch {
        write,
        newest: Some(newest),
        pending: left,
    })
}

/// Applies prepared batches in order and acknowledges them. Returns when
/// the generation is retired, `stop` turns true or the puller is gone.
async fn write_batches(
    shared: Arc<Shared>,
    name: &'static str,
    generation: u64,
    progress: Arc<Progress>,
    mut queue: mpsc::Receiver<Batch>,
    mut stop: watch::Receiver<bool>,
) {
    while let Some(batch) = queue.recv().await {
        if let Some(write) = &batch.write {
            let mut backoff = Duration::from_millis(100);
            loop {
                match shared.redis.write(write).await {
                    Ok(Some(written)) => {
                        progress
                            .watermark
                            .store(written.watermark, Ordering::SeqCst);
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
        }
        // AckPolicy::All: acking the newest covers every older one, which
        // are all applied now.
        if let Some(newest) = &batch.newest {
            if let Err(e) = newest.ack().await {
                tracing::warn!(projection = name, error = %e, "ack failed; the batch will be redelivered and skipped");
            }
        }
        let watermark = progress.watermark.load(Ordering::SeqCst);
        progress
            .caught_up
            .store(batch.pending == 0, Ordering::SeqCst);
        shared.announce(name, generation, watermark).await;
        if batch.pending == 0 {
            shared.wake_managers();
        }
    }
}

/// The messages above `prepared`, by stream sequence, as stored messages.
/// Moved, not cloned (header maps are the costliest part of a message),
/// except the newest, which stays behind to be acknowledged.
fn collect(
    prepared: u64,
    (newest_sequence, newest): (u64, &Message),
    pending: &mut Vec<(u64, u64, Message)>,
) -> BTreeMap<u64, StoredMessage> {
    let published = |message: &Message| {
        message
            .info()
            .map(|i| i.published)
            .unwrap_or(time::OffsetDateTime::UNIX_EPOCH)
    };
    let mut messages = BTreeMap::new();
    if newest_sequence > prepared {
        messages.insert(
            newest_sequence,
            StoredMessage {
                subject: newest.subject.to_string(),
                sequence: newest_sequence,
                timestamp: published(newest),
                headers: newest.headers.clone(),
                payload: newest.payload.clone(),
            },
        );
    }
    for (sequence, _, message) in pending.drain(..) {
        if sequence > prepared {
            let timestamp = published(&message);
            let async_nats::Message {
                subject,
                headers,
                payload,
                ..
            } = message.message;
            messages.insert(
                sequence,
                StoredMessage {
                    subject: subject.to_string(),
                    sequence,
                    timestamp,
                    headers,
                    payload,
                },
            );
        }
    }
    messages
}

/// Brings a batch from `prepared` (everything up to it is already on its
/// way to Redis) to `newest_sequence`: adds the projection's events in that
/// range from the stream to `messages` unless the deliveries were
/// `contiguous`, projects them in order and encodes the writes. `None` when
/// there is nothing new to write. May be called again with the same
/// `messages` after an error.
///
/// Messages may arrive out of order or with holes: after a failover, those
/// delivered to the copy that died come back only after the ack wait, while
/// newer ones flow here. The holes are read from the stream directly, so an
/// event is never applied after a later one of its aggregate.
#[allow(clippy::too_many_arguments)]
async fn prepare(
    shared: &Shared,
    projection: &dyn Projection,
    generation: u64,
    partitions: u32,
    prepared: u64,
    newest_sequence: u64,
    messages: &mut BTreeMap<u64, StoredMessage>,
    contiguous: bool,
) -> Result<Option<PreparedWrite>, String> {
    if newest_sequence <= prepared {
        return Ok(None);
    }
    if !contiguous {
        let before = messages.len();
        for filter in filter_subjects(projection) {
            // Complete up to the newest delivered event even when the
            // replica answering lags (see `EventStore::read_through`).
            let missing = shared
                .store
                .read_through(&filter, prepared + 1, newest_sequence)
                .await
                .map_err(|e| e.to_string())?;
            for m in missing {
                messages.entry(m.sequence).or_insert(m);
            }
        }
        if messages.len() > before {
            tracing::debug!(
                projection = projection.name(),
                from = prepared + 1,
                to = newest_sequence,
                filled = messages.len() - before,
                "filled a gap from the stream"
            );
        }
    }
    let by_partition = project(shared, projection, generation, partitions, messages).await?;
    Ok(Some(shared.redis.prepare(
        projection.name(),
        generation,
        by_partition,
        newest_sequence,
    )))
}

/// Projects messages (in stream order) into per-partition batches; events
/// the projection cannot apply go to the dead letters.
async fn project(
    shared: &Shared,
    projection: &dyn Projection,
    generation: u64,
    partitions: u32,
    messages: &BTreeMap<u64, StoredMessage>,
) -> Result<Vec<PartitionBatch>, String> {
    let name = projection.name();
    let mut by_partition: BTreeMap<u32, PartitionBatch> = BTreeMap::new();
    for (&sequence, message) in messages {
        let aggregate_type = message.subject.split('.').nth(1).unwrap_or("");
        if !projection.aggregate_types().contains(&aggregate_type) {
            continue;
        }
        let event = RecordedEvent::from_parts(
            &message.subject,
            sequence,
            message.timestamp,
            message.headers.as_ref(),
            message.payload.clone(),
        );
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
    Ok(by_partition.into_values().collect())
}
