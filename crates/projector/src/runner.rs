//! Keeps one generation of one projection up to date: a durable pull
//! consumer on `events.>` in a pinned-client priority group, so exactly one
//! projector copy applies it at a time (per-aggregate order across copies)
//! and a standby takes over when that copy stops pulling.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tracing::Instrument;

use async_nats::jetstream::consumer::{
    pull, AckPolicy, DeliverPolicy, PriorityPolicy, PullConsumer,
};
use async_nats::jetstream::Message;
use futures::future::BoxFuture;
use futures::stream::FuturesOrdered;
use futures::{FutureExt, StreamExt};
use jetsource_core::envelope::{EnvelopeError, RecordedEvent, EVENT_SUBJECT_PREFIX};
use jetsource_core::store::{StoreError, StoredMessage};
use jetsource_core::ErrorClass;
use tokio::sync::{mpsc, watch};

use crate::dlq::DlqError;
use crate::keys::{partition_of, KeySpace};
use crate::projection::{Op, Projection, ProjectionError};
use crate::redis_store::{PartitionBatch, PreparedWrite, Written};
use crate::shared::Shared;

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
    /// The runner stopped by itself: its generation is retired, Redis lost
    /// the projection's metadata, or Redis lost writes it had confirmed
    /// (the manager starts a wanted generation again, from its watermark).
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

/// Why a batch could not be prepared. The runner retries it with back-off
/// whatever the class: an event is never skipped for a NATS failure.
#[derive(Debug, thiserror::Error)]
pub enum BatchError {
    /// Reading the events of a gap from the stream failed.
    #[error("cannot read a gap from the stream: {0}")]
    Gap(#[source] StoreError),
    /// Storing an event the projection cannot apply as a dead letter failed.
    #[error(transparent)]
    DeadLetter(#[from] DlqError),
    /// The key of an event's personal fields could not be had.
    #[error("cannot open personal data: {0}")]
    Keys(#[source] StoreError),
}

impl BatchError {
    pub fn class(&self) -> ErrorClass {
        match self {
            BatchError::Gap(e) | BatchError::Keys(e) => e.class(),
            BatchError::DeadLetter(e) => e.class(),
        }
    }
}

/// Why an event goes to the dead letters (the reason stored with it).
#[derive(Debug, thiserror::Error)]
enum Unapplicable {
    /// The message is not a jetsource event.
    #[error(transparent)]
    Envelope(#[from] EnvelopeError),
    /// The projection refused it every time.
    #[error("{source} (after {attempts} attempts)")]
    Refused {
        source: ProjectionError,
        attempts: u32,
    },
}

/// A batch on its way from the puller to the writer.
struct Batch {
    /// The Redis writes, `None` when every message was applied already (a
    /// redelivery) or for a watermark raised over other types' events.
    /// Shared with the writes in flight, which may be sent again.
    write: Option<Arc<PreparedWrite>>,
    /// What the watermark becomes once this batch and every one before it
    /// are applied: its newest sequence (or, over other types' events, the
    /// stream's last one). `None` for a redelivery, which moves nothing.
    watermark: Option<u64>,
    /// Newest message of the batch: acknowledging it covers all older ones
    /// (`AckPolicy::All`). `None` for a watermark raised over other types'
    /// events, which acknowledges nothing.
    newest: Option<Message>,
    /// Messages the consumer still had after this batch.
    pending: u64,
    /// Events the batch applies (0 for a redelivery or a raised watermark).
    events: usize,
    /// Trace contexts of the commands whose events it applies (distinct, at
    /// most [`MAX_LINKS`]): the apply span links to them.
    traces: Vec<String>,
}

/// Links of one apply span: enough to find the commands of a small batch;
/// a large batch (a backlog) links to its first ones.
const MAX_LINKS: usize = 32;

/// One running generation of one projection: what every step of its runner
/// needs.
struct Run {
    shared: Arc<Shared>,
    projection: Arc<dyn Projection>,
    generation: u64,
    /// The generation's partition count (fixed when it was created).
    partitions: u32,
    progress: Arc<Progress>,
}

impl Run {
    fn name(&self) -> &'static str {
        self.projection.name()
    }

    /// Tells the manager this generation stopped by itself (retired, or
    /// Redis lost its metadata).
    fn report_stopped(&self) {
        self.progress.stopped.store(true, Ordering::SeqCst);
        self.shared.wake_managers();
    }
}

/// Turns true when the runner is to stop.
type Stop = watch::Receiver<bool>;

/// Waits `delay` before a retry: `false` (at once) when `stop` turns true
/// meanwhile.
async fn pause(stop: &mut Stop, delay: Duration) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(delay) => true,
        _ = stop.wait_for(|s| *s) => false,
    }
}

/// Exponential back-off between retries: 100 ms, doubling, at most 2 s.
struct Backoff(Duration);

impl Backoff {
    fn new() -> Self {
        Self(Duration::from_millis(100))
    }

    /// Waits the current delay (see [`pause`]) and doubles it.
    async fn pause(&mut self, stop: &mut Stop) -> bool {
        let go_on = pause(stop, self.0).await;
        self.0 = (self.0 * 2).min(Duration::from_secs(2));
        go_on
    }
}

/// Runs until `stop` turns true or the generation is retired.
///
/// Two stages run side by side: the puller reads messages, fills gaps,
/// projects and encodes the next batch while the writer applies the
/// earlier ones in Redis (up to two writes in flight, see [`Window`]) and
/// acknowledges them. With one stage after the other the projector and
/// Redis took turns, each idle half of the time.
pub async fn run(
    shared: Arc<Shared>,
    projection: Arc<dyn Projection>,
    generation: u64,
    progress: Arc<Progress>,
    mut stop: Stop,
) {
    let Some(consumer) = create_consumer(&shared, projection.as_ref(), generation, &mut stop).await
    else {
        return;
    };
    report_if_empty(&shared, &consumer, &progress).await;
    let run = Run {
        shared,
        projection,
        generation,
        partitions: 0,
        progress,
    };
    let Some((watermark, partitions)) = read_start(&run, &mut stop).await else {
        return;
    };
    let run = Arc::new(Run { partitions, ..run });
    // One batch waiting beside the writer's two in flight keeps both
    // stages busy; more would only hold memory (and make batches smaller:
    // messages join the next batch while it cannot be handed over).
    let (batches, queue) = mpsc::channel::<Batch>(1);
    let writer = tokio::spawn(write_batches(run.clone(), queue, watermark, stop.clone()));
    let abort = writer.abort_handle();
    let puller = Puller::new(&run, watermark).pull(consumer, batches, stop);
    tokio::select! {
        _ = puller => abort.abort(),
        _ = writer => {}
    }
}

/// The generation's durable consumer, created (or found) with retries;
/// `None` when `stop` turned true first.
async fn create_consumer(
    shared: &Shared,
    projection: &dyn Projection,
    generation: u64,
    stop: &mut Stop,
) -> Option<PullConsumer> {
    let config = consumer_config(projection, generation, shared.config.failover());
    loop {
        match shared.store.create_consumer(config.clone()).await {
            Ok(consumer) => return Some(consumer),
            Err(e) => {
                tracing::warn!(projection = projection.name(), generation, error = %e, "cannot create consumer; retrying");
                if !pause(stop, Duration::from_secs(1)).await {
                    return None;
                }
            }
        }
    }
}

/// An empty stream (or a consumer with nothing left) is caught up before
/// the first batch; a rebuild of it can switch at once.
async fn report_if_empty(shared: &Shared, consumer: &PullConsumer, progress: &Progress) {
    if let Ok(info) = consumer.clone().info().await {
        if info.num_pending == 0 && info.num_ack_pending == 0 {
            progress.caught_up.store(true, Ordering::SeqCst);
            shared.wake_managers();
        }
    }
}

/// The generation's watermark and partition count, read with retries.
/// `None` when `stop` turned true first, or when the generation is gone
/// from the metadata (reported as stopped).
async fn read_start(run: &Run, stop: &mut Stop) -> Option<(u64, u32)> {
    let (redis, name, generation) = (&run.shared.redis, run.name(), run.generation);
    loop {
        let read = async {
            let watermark = redis.watermark(name, generation).await?;
            let meta = redis.meta(name).await?;
            Ok::<_, redis::RedisError>((watermark, meta.and_then(|m| m.partitions_of(generation))))
        };
        match read.await {
            Ok((watermark, Some(partitions))) => return Some((watermark, partitions)),
            Ok((_, None)) => {
                run.report_stopped();
                return None;
            }
            Err(e) => {
                tracing::warn!(projection = name, error = %e, "cannot read the watermark; retrying");
                if !pause(stop, Duration::from_secs(1)).await {
                    return None;
                }
            }
        }
    }
}

/// A delivered message not yet in a batch: stream sequence, messages the
/// consumer had left after it, the message.
type Delivered = (u64, u64, Message);

/// Chunks of a pull subscription, as they arrive.
type Chunks = futures::stream::ReadyChunks<pull::Stream>;

/// What the puller does next.
enum Step<'a> {
    Stop,
    /// The pull subscription ended: open a new one.
    Reopen,
    /// The writer has room for the pending messages.
    Send(mpsc::Permit<'a, Batch>),
    Chunk(Vec<Result<Message, pull::MessagesError>>),
    /// Idle: time to look for other types' events to raise the watermark over.
    Advance,
}

/// The pulling stage: reads messages and turns them into prepared batches,
/// gap-free from the watermark.
///
/// Batches grow with the load: while the writer is busy, arriving messages
/// join the next batch (up to `projector.batch_size`), so a backlog is
/// applied in large Redis round trips and a trickle in small, prompt ones.
struct Puller<'a> {
    run: &'a Run,
    /// Everything up to here is prepared (handed to the writer).
    prepared: u64,
    /// Per partition, the sequence of its last event in a batch handed to
    /// the writer (0: none since the runner started): the precondition of
    /// the partition's next write ([`PartitionBatch::after`]).
    partition_last: Vec<u64>,
    /// Delivery (consumer) sequences grow by one for every delivery to any
    /// copy, redeliveries included: a run with no jump since our last one
    /// means nothing was delivered elsewhere meanwhile, so no event between
    /// the watermark and the batch can be missing. A jump (or the first
    /// batch) may hide a hole, which [`Run::prepare`] reads from the stream.
    last_delivery: Option<u64>,
    pending: Vec<Delivered>,
    /// The deliveries of `pending` follow the last batch's without a jump.
    contiguous: bool,
    /// The consumer delivers only the projection's own aggregate types, so
    /// the watermark would stop at its last own event while other types'
    /// events go on. When the consumer has nothing left (`caught_up`),
    /// [`advance`] raises it over them: at once after a batch, then every
    /// [`ADVANCE_EVERY`] while idle.
    caught_up: bool,
    next_advance: tokio::time::Instant,
}

impl<'a> Puller<'a> {
    fn new(run: &'a Run, watermark: u64) -> Self {
        Self {
            run,
            prepared: watermark,
            partition_last: vec![0; run.partitions.max(1) as usize],
            last_delivery: None,
            pending: Vec::new(),
            contiguous: false,
            caught_up: true,
            next_advance: tokio::time::Instant::now(),
        }
    }

    /// Pulls until `stop` or until the writer is gone.
    async fn pull(mut self, consumer: PullConsumer, batches: mpsc::Sender<Batch>, mut stop: Stop) {
        let mut consumer = consumer;
        loop {
            let Some(mut chunks) = self.subscribe(&consumer, &mut stop).await else {
                return;
            };
            let gone = loop {
                match self.step(&mut chunks, &batches, &mut stop).await {
                    Step::Stop => return,
                    Step::Reopen => break false,
                    Step::Chunk(chunk) => {
                        if self.receive(chunk) {
                            break true;
                        }
                    }
                    Step::Advance => {
                        if !self.advance(&batches).await {
                            return;
                        }
                    }
                    Step::Send(permit) => {
                        let Some(batch) = self.take_batch(&mut stop).await else {
                            return;
                        };
                        self.caught_up = batch.pending == 0;
                        self.next_advance = tokio::time::Instant::now();
                        permit.send(batch);
                    }
                }
            };
            if gone {
                match self.recreate(&mut stop).await {
                    Some(again) => consumer = again,
                    None => return,
                }
            }
        }
    }

    /// The consumer was deleted behind our back (by hand, or with a stream
    /// restore): created again if the generation is still wanted (active or
    /// building), from the start of the stream; the watermark skips what
    /// was applied. A retired generation's consumer is deleted on purpose:
    /// then the runner stops and tells the manager.
    async fn recreate(&self, stop: &mut Stop) -> Option<PullConsumer> {
        let (name, generation) = (self.run.name(), self.run.generation);
        let mut backoff = Backoff::new();
        let wanted = loop {
            match self.run.shared.redis.meta(name).await {
                Ok(meta) => {
                    break meta.is_some_and(|m| {
                        m.active == generation || m.building.is_some_and(|(b, _)| b == generation)
                    })
                }
                Err(e) => {
                    tracing::warn!(projection = name, error = %e, "cannot read the projection's metadata; retrying");
                    if !backoff.pause(stop).await {
                        return None;
                    }
                }
            }
        };
        if !wanted {
            self.run.report_stopped();
            return None;
        }
        tracing::warn!(
            projection = name,
            generation,
            "consumer deleted; creating it again"
        );
        create_consumer(
            &self.run.shared,
            self.run.projection.as_ref(),
            generation,
            stop,
        )
        .await
    }

    /// A pull subscription in the priority group, with retries; `None` when
    /// `stop` turned true first.
    async fn subscribe(&self, consumer: &PullConsumer, stop: &mut Stop) -> Option<Chunks> {
        let batch_size = self.run.shared.config.batch_size;
        // Pull expiry well below the failover time, so the pin is renewed.
        let expires = self.run.shared.config.failover() / 4;
        loop {
            let messages = consumer
                .stream()
                .group(PRIORITY_GROUP)
                .max_messages_per_batch(batch_size)
                .expires(expires)
                .heartbeat(expires / 2)
                .messages()
                .await;
            match messages {
                Ok(messages) => return Some(messages.ready_chunks(batch_size)),
                Err(e) => {
                    let (projection, generation) = (self.run.name(), self.run.generation);
                    tracing::warn!(projection, generation, error = %e, "cannot pull; retrying");
                    if !pause(stop, Duration::from_secs(1)).await {
                        return None;
                    }
                }
            }
        }
    }

    /// Waits for the next thing to do: stop, hand the pending messages to
    /// the writer once it has room, take more messages while the batch has
    /// room, or raise the watermark while idle.
    async fn step<'b>(
        &self,
        chunks: &mut Chunks,
        batches: &'b mpsc::Sender<Batch>,
        stop: &mut Stop,
    ) -> Step<'b> {
        let room = self.pending.len() < self.run.shared.config.batch_size;
        let idle = self.caught_up && self.pending.is_empty();
        tokio::select! {
            biased;
            _ = stop.wait_for(|s| *s) => Step::Stop,
            permit = batches.reserve(), if !self.pending.is_empty() => {
                permit.map_or(Step::Stop, Step::Send)
            }
            chunk = chunks.next(), if room => chunk.map_or(Step::Reopen, Step::Chunk),
            _ = tokio::time::sleep_until(self.next_advance), if idle => Step::Advance,
        }
    }

    /// Adds delivered messages to the pending ones, noting whether their
    /// deliveries follow each other.
    /// Takes a chunk of pulled messages; `true` when the pull stream said
    /// the consumer no longer exists (deleted: the server said so, or
    /// nothing answers the pull requests).
    fn receive(&mut self, chunk: Vec<Result<Message, pull::MessagesError>>) -> bool {
        if self.pending.is_empty() {
            self.contiguous = self.last_delivery.is_some();
        }
        let projection = self.run.name();
        let mut gone = false;
        for item in chunk {
            let message = match item {
                Ok(message) => message,
                Err(e)
                    if matches!(
                        e.kind(),
                        pull::MessagesErrorKind::ConsumerDeleted
                            | pull::MessagesErrorKind::NoResponders
                    ) =>
                {
                    gone = true;
                    continue;
                }
                Err(e) => {
                    tracing::debug!(projection, error = %e, "pull stream notice");
                    continue;
                }
            };
            match message.info() {
                Ok(info) => {
                    let delivery = info.consumer_sequence;
                    if self.last_delivery.is_some_and(|last| delivery != last + 1) {
                        self.contiguous = false;
                    }
                    self.last_delivery = Some(delivery);
                    self.pending
                        .push((info.stream_sequence, info.pending, message));
                }
                Err(e) => {
                    self.contiguous = false;
                    tracing::debug!(projection, error = %e, "message without metadata");
                }
            }
        }
        gone
    }

    /// Raises the watermark over other types' events if it may (see
    /// [`advance`]). `false` when the writer is gone.
    async fn advance(&mut self, batches: &mpsc::Sender<Batch>) -> bool {
        self.next_advance = tokio::time::Instant::now() + ADVANCE_EVERY;
        let run = self.run;
        match advance(&run.shared, run.projection.as_ref(), self.prepared).await {
            Ok(Some(to)) => {
                // Raised by the writer in its turn, so never over a batch
                // handed to it before and not yet applied.
                let batch = Batch {
                    write: None,
                    watermark: Some(to),
                    newest: None,
                    pending: 0,
                    events: 0,
                    traces: Vec::new(),
                };
                if batches.send(batch).await.is_err() {
                    return false;
                }
                self.prepared = to;
            }
            Ok(None) => {}
            Err(e) => {
                tracing::debug!(projection = run.name(), error = %e, "cannot advance the watermark")
            }
        }
        true
    }

    /// Turns the pending messages into a batch for the writer, retrying what
    /// fails (reading a gap, storing a dead letter) until it succeeds. `None`
    /// when `stop` turned true meanwhile.
    async fn take_batch(&mut self, stop: &mut Stop) -> Option<Batch> {
        let pending = &mut self.pending;
        let newest_at = (0..pending.len()).max_by_key(|&i| pending[i].0)?;
        let (newest_sequence, left, newest) = pending.swap_remove(newest_at);
        let mut messages = collect(self.prepared, (newest_sequence, &newest), pending);
        let run = self.run;
        let mut backoff = Backoff::new();
        let write = loop {
            let attempt = run
                .prepare(
                    self.prepared,
                    newest_sequence,
                    &mut messages,
                    self.contiguous,
                    &mut self.partition_last,
                )
                .await;
            match attempt {
                Ok(write) => break write,
                Err(e) => {
                    tracing::warn!(projection = run.name(), generation = run.generation, error = %e, class = ?e.class(), "cannot prepare a batch; retrying");
                    if !backoff.pause(stop).await {
                        return None;
                    }
                }
            }
        };
        self.prepared = self.prepared.max(newest_sequence);
        let events = if write.is_some() { messages.len() } else { 0 };
        let mut traces: Vec<String> = Vec::new();
        let carried = messages.values().filter_map(|m| {
            let value = m
                .headers
                .as_ref()?
                .get(jetsource_core::telemetry::TRACEPARENT)?;
            Some(value.as_str().to_owned())
        });
        for traceparent in carried {
            if traces.len() == MAX_LINKS {
                break;
            }
            if !traces.contains(&traceparent) {
                traces.push(traceparent);
            }
        }
        Some(Batch {
            watermark: write.is_some().then_some(newest_sequence),
            write: write.map(Arc::new),
            newest: Some(newest),
            pending: left,
            events,
            traces,
        })
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
) -> Result<Option<u64>, StoreError> {
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

/// Writes in flight at most: while Redis runs one batch, the next is on its
/// way, so Redis does not sit idle while a reply travels back and the next
/// batch is sent.
const IN_FLIGHT: usize = 2;

/// The reply to one write of a batch.
type Reply = BoxFuture<'static, Result<Written, redis::RedisError>>;

/// A batch the writer holds from the moment it takes it until it is
/// finished (applied, reflected in the watermark, acknowledged).
struct Held {
    batch: Batch,
    /// The batch's `apply` span, linked to the commands it applies: one
    /// for all its writes.
    span: tracing::Span,
    /// Every batch before this one was applied when its latest write was
    /// sent, so no earlier batch can explain a refusal of it.
    sent_alone: bool,
}

/// The batches the writer holds, oldest first, with the replies of their
/// latest writes (one per held batch, in the same order).
///
/// Two writes in flight are safe because of one invariant, kept by the
/// apply script and by the order in which this window finishes batches:
///
/// - **A partition's write applies only on top of all its earlier events.**
///   Each partition of batch N+1 carries the sequence of that partition's
///   last event in the batches before it ([`PartitionBatch::after`]); the
///   apply script refuses the partition, writing nothing, while the
///   partition checkpoint is below it. So if the write of batch N fails (or
///   runs later, or only partly) and that of N+1 runs, N+1 cannot apply an
///   event of an aggregate before an earlier one, nor move a checkpoint
///   over an event that N has still to apply. Partitions of N+1 that N did
///   not touch may apply: their order is not at stake.
/// - **The watermark and the acknowledgements follow only what is known to
///   be applied.** Batches are finished strictly in order, and only when
///   the reply of their write says every partition applied
///   ([`Written::Applied`]); only then is the watermark raised over the
///   batch (by its own call, never in the pipeline of a write that may
///   still fail, and only from the watermark the batch was written on)
///   and its newest message acknowledged (`AckPolicy::All`). A batch after
///   a failed or refused one is never finished first; neither is a
///   watermark raised over other types' events while idle, which is a
///   batch like the others.
///
/// On a failure the window forgets the replies in flight (the writes may
/// still run in Redis, late; the invariant makes that harmless) and,
/// after a back-off, writes every held batch again, oldest first. That is
/// the rewind: the held batches are exactly those not yet finished, and
/// writing again skips what any earlier attempt applied (partition
/// checkpoints). A refusal of a batch written while an earlier one was
/// still in flight is written again at once, now alone. A refusal of a
/// batch written alone, or a watermark found below the one this runner
/// raised, means Redis lost writes it had confirmed (restarted from an
/// older snapshot): the runner stops, and the manager starts it again
/// from the watermark Redis has. The new runner's first batch reads every
/// event between that watermark and its first delivery from the stream
/// (as after any start); the messages the old runner held come back after
/// the ack wait.
struct Window {
    redis: crate::redis_store::RedisStore,
    held: VecDeque<Held>,
    replies: FuturesOrdered<Reply>,
}

impl Window {
    fn new(run: &Run) -> Self {
        Self {
            redis: run.shared.redis.clone(),
            held: VecDeque::new(),
            replies: FuturesOrdered::new(),
        }
    }

    fn has_room(&self) -> bool {
        self.held.len() < IN_FLIGHT
    }

    /// Takes a batch and writes it at once.
    fn take(&mut self, run: &Run, batch: Batch) {
        let span = match batch.write {
            // One span per batch, linked to the commands it applies
            // (docs/TRACING.md).
            Some(_) => {
                let span = tracing::info_span!(
                    "apply",
                    projection = run.name(),
                    generation = run.generation,
                    events = batch.events
                );
                for traceparent in &batch.traces {
                    jetsource_core::telemetry::link(&span, traceparent);
                }
                span
            }
            None => tracing::Span::none(),
        };
        let held = Held {
            batch,
            span,
            sent_alone: self.held.is_empty(),
        };
        self.replies.push_back(write(&self.redis, &held));
        self.held.push_back(held);
    }

    /// Forgets the replies in flight: their writes may still run, and
    /// nothing depends on them any more.
    fn forget(&mut self) {
        self.replies = FuturesOrdered::new();
    }

    /// Writes every held batch again, oldest first.
    fn write_again(&mut self) {
        self.forget();
        for (i, held) in self.held.iter_mut().enumerate() {
            held.sent_alone = i == 0;
            self.replies.push_back(write(&self.redis, held));
        }
    }
}

/// One write of a held batch. A batch without writes (a redelivery, a
/// watermark raised over other types' events) is applied as it is.
fn write(redis: &crate::redis_store::RedisStore, held: &Held) -> Reply {
    match &held.batch.write {
        None => futures::future::ready(Ok(Written::Applied { applied: 0 })).boxed(),
        Some(write) => {
            let (redis, write) = (redis.clone(), write.clone());
            async move { redis.write(&write).await }
                .instrument(held.span.clone())
                .boxed()
        }
    }
}

/// Applies prepared batches, up to [`IN_FLIGHT`] at once, and finishes
/// them in order (see [`Window`]), from `watermark`, the one the puller
/// started from. Returns when the generation is retired, Redis lost
/// confirmed writes, `stop` turns true or the puller is gone.
async fn write_batches(
    run: Arc<Run>,
    mut queue: mpsc::Receiver<Batch>,
    mut watermark: u64,
    mut stop: Stop,
) {
    let (name, generation) = (run.name(), run.generation);
    let mut window = Window::new(&run);
    let mut backoff = Backoff::new();
    loop {
        let room = window.has_room();
        let reply = tokio::select! {
            biased;
            _ = stop.wait_for(|s| *s) => return,
            Some(reply) = window.replies.next() => reply,
            batch = queue.recv(), if room => {
                match batch {
                    Some(batch) => window.take(&run, batch),
                    None => return,
                }
                continue;
            }
        };
        match reply {
            Ok(Written::Applied { .. }) => {
                let Some(held) = window.held.front() else {
                    continue;
                };
                match finish(&run, &held.batch, &mut watermark, &mut stop).await {
                    Finished::Done => {
                        window.held.pop_front();
                        backoff = Backoff::new();
                    }
                    Finished::Stopped => return,
                    Finished::Lost => {
                        tracing::warn!(
                            projection = name,
                            generation,
                            watermark,
                            "the watermark fell below the one this runner raised: Redis lost confirmed writes (restarted from an older snapshot?); starting again from its watermark"
                        );
                        run.report_stopped();
                        return;
                    }
                }
            }
            Ok(Written::Retired) => {
                run.report_stopped();
                return;
            }
            Ok(Written::Refused) if !window.held.front().is_some_and(|h| h.sent_alone) => {
                tracing::debug!(
                    projection = name,
                    generation,
                    "batch refused: an earlier one was not applied yet when it was sent; writing it again"
                );
                window.write_again();
            }
            Ok(Written::Refused) => {
                tracing::warn!(
                    projection = name,
                    generation,
                    "batch refused although every batch before it was applied: Redis lost confirmed writes (restarted from an older snapshot?); starting again from its watermark"
                );
                run.report_stopped();
                return;
            }
            Err(e) => {
                tracing::warn!(projection = name, generation, error = %e, class = ?crate::redis_store::class(&e), "batch failed; retrying");
                window.forget();
                if !backoff.pause(&mut stop).await {
                    return;
                }
                window.write_again();
            }
        }
    }
}

/// What became of finishing a batch.
enum Finished {
    Done,
    Stopped,
    /// The watermark in Redis is below `watermark`: Redis lost writes.
    Lost,
}

/// Finishes an applied batch (every batch before it is finished): raises
/// the watermark over it, from `watermark` (the one the earlier batches
/// left, which it then moves), then acknowledges it and reports the
/// progress. In this order: an acknowledged event is never redelivered,
/// so the watermark must already cover it (a restarted runner starts from
/// the watermark).
async fn finish(run: &Run, batch: &Batch, watermark: &mut u64, stop: &mut Stop) -> Finished {
    if let Some(to) = batch.watermark {
        match raise(run, *watermark, to, stop).await {
            Some(Some(raised)) => *watermark = raised,
            Some(None) => return Finished::Lost,
            None => return Finished::Stopped,
        }
    }
    // AckPolicy::All: acking the newest covers every older one, which
    // are all applied now.
    if let Some(newest) = &batch.newest {
        if let Err(e) = newest.ack().await {
            tracing::warn!(projection = run.name(), error = %e, "ack failed; the batch will be redelivered and skipped");
        }
    }
    record_progress(run, batch);
    run.progress
        .caught_up
        .store(batch.pending == 0, Ordering::SeqCst);
    run.shared
        .announce(run.name(), run.generation, *watermark)
        .await;
    if batch.pending == 0 {
        run.shared.wake_managers();
    }
    Finished::Done
}

/// Raises the watermark from `from` to `to` (see
/// [`crate::redis_store::RedisStore::raise_watermark`]), retrying with
/// back-off until Redis answers. `None` when `stop` turned true first.
async fn raise(run: &Run, from: u64, to: u64, stop: &mut Stop) -> Option<Option<u64>> {
    let mut backoff = Backoff::new();
    loop {
        let raised = tokio::select! {
            raised = run.shared.redis.raise_watermark(run.name(), run.generation, from, to) => raised,
            _ = stop.wait_for(|s| *s) => return None,
        };
        match raised {
            Ok(raised) => {
                if let Some(watermark) = raised {
                    run.progress.watermark.store(watermark, Ordering::SeqCst);
                }
                return Some(raised);
            }
            Err(e) => {
                tracing::warn!(projection = run.name(), generation = run.generation, error = %e, "cannot raise the watermark; retrying");
                if !backoff.pause(stop).await {
                    return None;
                }
            }
        }
    }
}

/// Metrics of an applied batch (docs/METRICS.md): events applied, batch
/// size, and the lag behind the stream in events and in seconds (the age
/// of its newest event; 0 once nothing is pending).
fn record_progress(run: &Run, batch: &Batch) {
    use jetsource_core::metrics;
    let projection = run.name();
    if batch.events > 0 {
        ::metrics::counter!(metrics::PROJECTOR_EVENTS, "projection" => projection)
            .increment(batch.events as u64);
        ::metrics::histogram!(metrics::PROJECTOR_BATCH, "projection" => projection)
            .record(batch.events as f64);
    }
    ::metrics::gauge!(metrics::PROJECTOR_LAG_EVENTS, "projection" => projection)
        .set(batch.pending as f64);
    let age = match (
        batch.pending,
        batch.newest.as_ref().and_then(|m| m.info().ok()),
    ) {
        (0, _) | (_, None) => 0.0,
        (_, Some(info)) => (time::OffsetDateTime::now_utc() - info.published)
            .as_seconds_f64()
            .max(0.0),
    };
    ::metrics::gauge!(metrics::PROJECTOR_LAG_SECONDS, "projection" => projection).set(age);
}

/// The messages above `prepared`, by stream sequence, as stored messages.
/// Moved, not cloned (header maps are the costliest part of a message),
/// except the newest, which stays behind to be acknowledged.
fn collect(
    prepared: u64,
    (newest_sequence, newest): (u64, &Message),
    pending: &mut Vec<Delivered>,
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

/// A projected event: its partition, that partition's keys, its writes.
type Projected = (u32, KeySpace, Vec<Op>);

impl Run {
    /// Brings a batch from `prepared` (everything up to it is already on its
    /// way to Redis) to `newest_sequence`: adds the projection's events in
    /// that range from the stream to `messages` unless the deliveries were
    /// `contiguous`, projects them in order and encodes the writes, each
    /// partition's with its precondition from `partition_last` (which it
    /// then moves to the partition's last event). `None` when there is
    /// nothing new to write. May be called again with the same `messages`
    /// after an error.
    ///
    /// Messages may arrive out of order or with holes: after a failover,
    /// those delivered to the copy that died come back only after the ack
    /// wait, while newer ones flow here. The holes are read from the stream
    /// directly, so an event is never applied after a later one of its
    /// aggregate.
    async fn prepare(
        &self,
        prepared: u64,
        newest_sequence: u64,
        messages: &mut BTreeMap<u64, StoredMessage>,
        contiguous: bool,
        partition_last: &mut [u64],
    ) -> Result<Option<PreparedWrite>, BatchError> {
        if newest_sequence <= prepared {
            return Ok(None);
        }
        if !contiguous {
            self.fill_gaps(prepared + 1, newest_sequence, messages)
                .await?;
        }
        let by_partition = self.project(messages).await?;
        // Nothing below can fail: the batch is handed to the writer, and
        // the next one's preconditions follow this one's last events.
        let partitions = by_partition
            .into_iter()
            .map(|(partition, mut batch)| {
                if let Some(last) = partition_last.get_mut(partition as usize) {
                    batch.after = *last;
                    if let Some(&(sequence, _)) = batch.events.last() {
                        *last = sequence;
                    }
                }
                batch
            })
            .collect();
        Ok(Some(self.shared.redis.prepare(
            self.name(),
            self.generation,
            partitions,
        )))
    }

    /// Adds the projection's events with sequences `from..=to` that
    /// `messages` lacks, read from the stream.
    async fn fill_gaps(
        &self,
        from: u64,
        to: u64,
        messages: &mut BTreeMap<u64, StoredMessage>,
    ) -> Result<(), BatchError> {
        let before = messages.len();
        for filter in filter_subjects(self.projection.as_ref()) {
            // Complete up to the newest delivered event even when the
            // replica answering lags (see `EventStore::read_through`).
            let missing = self
                .shared
                .store
                .read_through(&filter, from, to)
                .await
                .map_err(BatchError::Gap)?;
            for m in missing {
                messages.entry(m.sequence).or_insert(m);
            }
        }
        if messages.len() > before {
            tracing::debug!(
                projection = self.name(),
                from,
                to,
                filled = messages.len() - before,
                "filled a gap from the stream"
            );
        }
        Ok(())
    }

    /// Projects messages (in stream order) into per-partition batches;
    /// events the projection cannot apply go to the dead letters.
    async fn project(
        &self,
        messages: &BTreeMap<u64, StoredMessage>,
    ) -> Result<BTreeMap<u32, PartitionBatch>, BatchError> {
        let mut by_partition: BTreeMap<u32, PartitionBatch> = BTreeMap::new();
        for (&sequence, message) in messages {
            let aggregate_type = message.subject.split('.').nth(1).unwrap_or("");
            if !self.projection.aggregate_types().contains(&aggregate_type) {
                continue;
            }
            let event = match RecordedEvent::from_parts(
                &message.subject,
                sequence,
                message.timestamp,
                message.headers.as_ref(),
                message.payload.clone(),
            ) {
                Ok(event) => {
                    let mut event = [event];
                    self.shared
                        .store
                        .open_events(&mut event)
                        .await
                        .map_err(BatchError::Keys)?;
                    let [event] = event;
                    Ok(event)
                }
                Err(e) => Err(Unapplicable::from(e)),
            };
            match event.and_then(|event| self.project_one(&event)) {
                Ok((_, _, ops)) if ops.is_empty() => {}
                Ok((partition, keys, ops)) => by_partition
                    .entry(partition)
                    .or_insert_with(|| PartitionBatch {
                        checkpoint: keys.checkpoint(),
                        after: 0,
                        events: Vec::new(),
                    })
                    .events
                    .push((sequence, ops)),
                Err(reason) => self.dead_letter(sequence, message, &reason).await?,
            }
        }
        Ok(by_partition)
    }

    /// The writes of one event, trying the projection up to
    /// `projector.max_attempts` times; the reason when it cannot be applied.
    fn project_one(&self, event: &RecordedEvent) -> Result<Projected, Unapplicable> {
        let partition = partition_of(&event.aggregate_type, &event.aggregate_id, self.partitions);
        let keys = KeySpace::new(self.name(), self.generation, partition);
        let mut attempt = 0;
        loop {
            attempt += 1;
            let mut ops = Vec::new();
            match self.projection.project(event, &keys, &mut ops) {
                Ok(()) => return Ok((partition, keys, ops)),
                Err(source) if attempt >= self.shared.config.max_attempts => {
                    return Err(Unapplicable::Refused {
                        source,
                        attempts: attempt,
                    })
                }
                Err(_) => continue,
            }
        }
    }

    /// Stores an event the projection cannot apply as a dead letter.
    async fn dead_letter(
        &self,
        sequence: u64,
        message: &StoredMessage,
        reason: &Unapplicable,
    ) -> Result<(), DlqError> {
        let reason = reason.to_string();
        tracing::warn!(projection = self.name(), sequence, subject = %message.subject, %reason, "dead-lettering an event");
        let letter = crate::dlq::Letter {
            projection: self.name(),
            generation: self.generation,
            original_subject: &message.subject,
            original_sequence: sequence,
            original_headers: message.headers.as_ref(),
            payload: message.payload.clone(),
            reason: &reason,
        };
        crate::dlq::publish(&self.shared.js, &letter).await?;
        ::metrics::counter!(jetsource_core::metrics::DEAD_LETTERS, "projection" => self.name())
            .increment(1);
        Ok(())
    }
}
