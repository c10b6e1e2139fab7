//! The event store on JetStream: one stream, one subject per aggregate.
//!
//! This is the only module that talks to JetStream streams. Invariants it
//! keeps:
//! - history is append-only: the stream is created with `deny_delete`,
//!   `deny_purge`, no rollups, no TTLs and no limits, and start-up refuses a
//!   stream whose settings would let the server drop events;
//! - every append carries `Nats-Expected-Last-Subject-Sequence`, so two
//!   writers deciding on the same state cannot both win;
//! - the events of one append land together or not at all: one event is one
//!   plain publish; several are one JetStream atomic batch (ADR-50);
//! - an append carrying a command id also carries `Nats-Msg-Id`, so a resend
//!   within the duplicate window is acknowledged as a duplicate, not stored.

use std::ops::ControlFlow;
use std::sync::Arc;
use std::time::Duration;

use async_nats::header::{
    NATS_BATCH_COMMIT, NATS_BATCH_ID, NATS_BATCH_SEQUENCE, NATS_EXPECTED_LAST_SUBJECT_SEQUENCE,
    NATS_MESSAGE_ID,
};
use async_nats::jetstream;
use async_nats::jetstream::consumer;
use async_nats::jetstream::context::{CreateStreamErrorKind, PublishError, PublishErrorKind};
use async_nats::jetstream::message::PublishMessage;
use async_nats::jetstream::stream::{self, PersistenceMode, RetentionPolicy, StorageType};
use async_nats::{Client, HeaderMap};
use bytes::Bytes;
use futures::StreamExt;
use jetsource_aggregate::NewEvent;
use serde::Deserialize;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;
use tokio::sync::Semaphore;

pub mod backup;
pub mod codes;
mod consumers;
pub mod group;
pub mod keys;
pub use consumers::FollowFrom;

use crate::config::{NatsConfig, StoreConfig};
use crate::envelope::{self, event_subject, RecordedEvent};
use crate::integrity::{self, ChainHash, Integrity, Linked};
use crate::privacy::Privacy;
use crate::ErrorClass;

/// Past this many messages still to read, a read goes on through a consumer
/// instead of batched direct gets (see `read_streamed`). Creating
/// the consumer costs an API round trip (a meta-layer proposal on a
/// cluster), which only pays on long reads.
const BULK_READ_AFTER: u64 = 4_000;

/// How long a reading consumer outlives its read (the server deletes it).
const READER_IDLE_EXPIRY: Duration = Duration::from_secs(5);

/// How long long reads stay on direct gets after a consumer could not be
/// created or stalled.
const STREAMING_PAUSE: Duration = Duration::from_secs(60);

/// How a read through a consumer ended.
enum Streamed {
    /// Everything was handed on, or the visitor stopped.
    Done,
    /// Go on with direct gets from this sequence.
    Resume(u64),
}

/// Most events one command may produce: the server's atomic batch limit.
pub const MAX_EVENTS_PER_APPEND: usize = 1000;

/// What went wrong talking to the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreErrorKind {
    /// The aggregate has events after the expected sequence: someone else
    /// appended first.
    WrongLastSequence,
    /// NATS or the stream did not answer in time, or is not there right now.
    Unavailable,
    /// The append is larger than the server or jetsource accepts.
    TooLarge,
    /// The stream exists with settings jetsource cannot work with.
    IncompatibleStream,
    /// A stored message is not a jetsource event.
    Corrupt,
    /// The command id was already stored (a multi-event command resent within
    /// the duplicate window); the server stored nothing and did not say where
    /// the original is. Find it with [`EventStore::find_command`].
    DuplicateCommand,
    /// The stream leader has no such message (internal to leader reads).
    NotFound,
    /// The server refused the request for another reason.
    Rejected,
    /// jetsource's own configuration cannot be used (a key file).
    Misconfigured,
}

#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct StoreError {
    kind: StoreErrorKind,
    message: String,
    /// The JetStream API error code behind it, if the server sent one.
    code: Option<u64>,
}

impl StoreError {
    pub fn new(kind: StoreErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
            code: None,
        }
    }

    /// A refusal by the server with API error `code`, classed by
    /// [`codes::kind_of`]; `fallback` for codes without a special meaning.
    fn from_code(code: u64, fallback: StoreErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind: codes::kind_of(code).unwrap_or(fallback),
            message: message.into(),
            code: Some(code),
        }
    }

    /// A failed JetStream request other than an append: refused by the
    /// server with API error `code` (classed by [`codes::kind_of`],
    /// [`StoreErrorKind::Rejected`] for codes without a special meaning), or
    /// not answered at all (no code: [`StoreErrorKind::Unavailable`]).
    pub fn jetstream(what: &str, code: Option<u64>, e: impl std::fmt::Display) -> Self {
        match code {
            Some(code) => Self::from_code(code, StoreErrorKind::Rejected, format!("{what}: {e}")),
            None => Self::unavailable(what, e),
        }
    }

    /// A failed publish to a stream other than the event stream (a dead
    /// letter), classed like an append's.
    pub fn publish(what: &str, e: &PublishError) -> Self {
        Self {
            kind: publish_kind(e),
            message: format!("{what}: {e}"),
            code: codes::code_in(e),
        }
    }

    pub fn kind(&self) -> StoreErrorKind {
        self.kind
    }

    /// The JetStream API error code, when the server refused with one.
    pub fn code(&self) -> Option<u64> {
        self.code
    }

    pub fn class(&self) -> ErrorClass {
        match self.kind {
            StoreErrorKind::WrongLastSequence => ErrorClass::Conflict,
            StoreErrorKind::Unavailable => ErrorClass::Transient,
            StoreErrorKind::TooLarge
            | StoreErrorKind::NotFound
            | StoreErrorKind::IncompatibleStream
            | StoreErrorKind::Corrupt
            | StoreErrorKind::DuplicateCommand
            | StoreErrorKind::Misconfigured
            | StoreErrorKind::Rejected => ErrorClass::Permanent,
        }
    }

    fn unavailable(what: &str, e: impl std::fmt::Display) -> Self {
        Self::new(
            StoreErrorKind::Unavailable,
            format!(
                "{what}: {e}; check that nats-server is up and JetStream is enabled, then retry"
            ),
        )
    }
}

impl From<envelope::EnvelopeError> for StoreError {
    fn from(e: envelope::EnvelopeError) -> Self {
        Self::new(StoreErrorKind::Corrupt, e.to_string())
    }
}

/// One append: the events of one command for one aggregate.
#[derive(Debug, Clone, Copy)]
pub struct Append<'a> {
    pub aggregate_type: &'a str,
    pub aggregate_id: &'a str,
    /// Stream sequence of the aggregate's last event, 0 for a new aggregate.
    pub expected_last_sequence: u64,
    /// The aggregate's version before these events (its event count).
    pub version: u64,
    pub events: &'a [NewEvent],
    pub schema_version: u32,
    pub command_id: Option<&'a str>,
    pub correlation_id: &'a str,
    pub causation_id: &'a str,
    /// For the other aggregates of a multi-aggregate command: `<type>.<id>`
    /// of the aggregate the command was sent to, which owns its command id
    /// (header `Jetsource-Command-Aggregate`; no `Nats-Msg-Id`).
    pub command_aggregate: Option<&'a str>,
    /// Hash of the aggregate's last event (the one at
    /// `expected_last_sequence`), `None` for a new aggregate or one whose
    /// last event has none: the first link of this append's chain.
    pub previous_hash: Option<ChainHash>,
}

/// Where an append landed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Appended {
    pub first_sequence: u64,
    pub last_sequence: u64,
    /// The server had already stored this command (same `Nats-Msg-Id` within
    /// the duplicate window) and stored nothing now. The sequences are those
    /// of the original append's first message.
    pub duplicate: bool,
    /// Hash of the last event appended (the aggregate's new chain head);
    /// `None` for a duplicate or with `store.chain` off.
    pub last_hash: Option<ChainHash>,
    /// The events were signed.
    pub signed: bool,
}

/// One append made ready to write: its messages with every header but the
/// batch headers, which depend on the write it ends up in.
#[derive(Debug)]
pub(crate) struct Prepared {
    subject: String,
    messages: Vec<(HeaderMap, Bytes)>,
    expected_last_sequence: u64,
    /// Hash of its last message.
    last_hash: Option<ChainHash>,
    signed: bool,
}

impl Prepared {
    /// Where it landed, given the sequence of its first message.
    pub(crate) fn appended(&self, first_sequence: u64) -> Appended {
        Appended {
            first_sequence,
            last_sequence: first_sequence + self.messages.len() as u64 - 1,
            duplicate: false,
            last_hash: self.last_hash,
            signed: self.last_hash.is_some() && self.signed,
        }
    }
}

/// The `Nats-Msg-Id` of a command's first event. Scoped to the aggregate, so
/// command ids need only be unique per aggregate.
pub fn message_id(aggregate_type: &str, aggregate_id: &str, command_id: &str) -> String {
    format!("{aggregate_type}.{aggregate_id}.{command_id}")
}

#[derive(Debug, Clone)]
pub struct EventStore {
    client: Client,
    js: jetstream::Context,
    stream_name: String,
    read_batch: usize,
    timeout: Duration,
    /// Atomic batches this process keeps open at once. The server allows 50
    /// per stream (error 10210 beyond); staying under it in each process
    /// turns a burst of multi-event commands into a short queue instead of
    /// errors.
    batch_permits: Arc<Semaphore>,
    /// Where appends queue to be committed together; `None` in the group
    /// committer's own handle, which writes them.
    group: Option<group::Handle>,
    /// Until when long reads stay on direct gets because a reading consumer
    /// could not be created (no right to, no meta leader) or stalled: a
    /// refusal without a reply costs a whole request timeout, which each
    /// read must not pay.
    streaming_paused_until: Arc<std::sync::Mutex<Option<std::time::Instant>>>,
    /// Hash chain and signatures on appends, checks on loads.
    integrity: Integrity,
    /// Keys for opening personal fields on every read.
    privacy: Arc<Privacy>,
}

/// How long [`EventStore::open`] keeps retrying a stream that is not
/// available yet.
pub const OPEN_RETRY_FOR: Duration = Duration::from_secs(30);

/// Atomic batches one process keeps open at once (the server allows 50 per
/// stream, shared by every process).
pub const MAX_OPEN_BATCHES: usize = 16;

/// The stream jetsource needs, from configuration.
pub fn desired_stream(config: &StoreConfig) -> stream::Config {
    stream::Config {
        name: config.stream.clone(),
        description: Some("jetsource event store: append-only, one subject per aggregate".into()),
        subjects: vec![format!("{}.>", envelope::EVENT_SUBJECT_PREFIX)],
        storage: StorageType::File,
        num_replicas: config.replicas,
        retention: RetentionPolicy::Limits,
        max_messages: -1,
        max_bytes: -1,
        max_messages_per_subject: -1,
        max_age: Duration::ZERO,
        duplicate_window: config.duplicate_window(),
        deny_delete: true,
        deny_purge: true,
        allow_rollup: false,
        allow_direct: true,
        allow_atomic_publish: true,
        allow_message_ttl: false,
        ..Default::default()
    }
}

/// Differences that matter between an existing stream and the one jetsource
/// needs, one line each, empty when compatible.
pub fn incompatibilities(actual: &stream::Config, desired: &stream::Config) -> Vec<String> {
    let mut out = Vec::new();
    let mut check = |name: &str, ok: bool, have: String, want: String| {
        if !ok {
            out.push(format!("{name} is {have}, jetsource needs {want}"));
        }
    };
    check(
        "subjects",
        actual.subjects == desired.subjects,
        format!("{:?}", actual.subjects),
        format!("{:?}", desired.subjects),
    );
    check(
        "storage",
        actual.storage == desired.storage,
        format!("{:?}", actual.storage),
        "File".into(),
    );
    // More copies than configured lose nothing (a CLI run without
    // `store.replicas` against a replicated stream reads it fine); fewer do.
    check(
        "replicas",
        actual.num_replicas >= desired.num_replicas,
        actual.num_replicas.to_string(),
        format!("at least {} (store.replicas)", desired.num_replicas),
    );
    check(
        "retention",
        actual.retention == RetentionPolicy::Limits,
        format!("{:?}", actual.retention),
        "Limits".into(),
    );
    let unlimited = |v: i64| v <= 0;
    check(
        "max_msgs",
        unlimited(actual.max_messages),
        actual.max_messages.to_string(),
        "unlimited (-1): limits would drop history".into(),
    );
    check(
        "max_bytes",
        unlimited(actual.max_bytes),
        actual.max_bytes.to_string(),
        "unlimited (-1): limits would drop history".into(),
    );
    check(
        "max_msgs_per_subject",
        unlimited(actual.max_messages_per_subject),
        actual.max_messages_per_subject.to_string(),
        "unlimited (-1): limits would drop history".into(),
    );
    check(
        "max_age",
        actual.max_age.is_zero(),
        format!("{:?}", actual.max_age),
        "0 (keep forever)".into(),
    );
    check(
        "duplicate_window",
        actual.duplicate_window == desired.duplicate_window,
        format!("{:?}", actual.duplicate_window),
        format!(
            "{:?} (store.duplicate_window_secs)",
            desired.duplicate_window
        ),
    );
    for (name, have, want) in [
        ("deny_delete", actual.deny_delete, true),
        ("deny_purge", actual.deny_purge, true),
        ("allow_rollup_hdrs", actual.allow_rollup, false),
        ("allow_direct", actual.allow_direct, true),
        ("allow_atomic", actual.allow_atomic_publish, true),
        ("allow_msg_ttl", actual.allow_message_ttl, false),
        ("sealed", actual.sealed, false),
    ] {
        check(name, have == want, have.to_string(), want.to_string());
    }
    check(
        "persist_mode",
        !matches!(actual.persist_mode, Some(PersistenceMode::Async)),
        "async".into(),
        "default (atomic batches need it)".into(),
    );
    out
}

#[derive(Debug, Deserialize)]
struct ApiErrorResponse {
    error: Option<ApiError>,
}

#[derive(Debug, Deserialize)]
struct ApiError {
    #[serde(default)]
    err_code: u64,
    #[serde(default)]
    description: String,
}

impl EventStore {
    /// Connects to the event stream, creating it when missing. An existing
    /// stream is never changed: if its settings differ in a way that matters,
    /// this fails and names each difference.
    ///
    /// Transient failures are retried for up to [`OPEN_RETRY_FOR`] (a
    /// cluster electing its leaders), then reported. Workers use
    /// [`EventStore::open_when_available`].
    pub async fn open(
        client: Client,
        nats: &NatsConfig,
        config: &StoreConfig,
    ) -> Result<Self, StoreError> {
        Self::open_retrying(client, nats, config, Some(OPEN_RETRY_FOR)).await
    }

    /// Like [`EventStore::open`], retrying transient failures for as long as
    /// it takes, with a warning each time: a worker started while the
    /// cluster has no quorum (nodes restarting, a whole cluster coming up)
    /// waits for it instead of exiting. Permanent failures (an incompatible
    /// stream, a refused creation) return at once. Callers race it against
    /// their shutdown signal.
    pub async fn open_when_available(
        client: Client,
        nats: &NatsConfig,
        config: &StoreConfig,
    ) -> Result<Self, StoreError> {
        Self::open_retrying(client, nats, config, None).await
    }

    /// Opens, retrying transient failures (see [`crate::until_available`])
    /// until `retry_for` has passed, or for as long as it takes.
    async fn open_retrying(
        client: Client,
        nats: &NatsConfig,
        config: &StoreConfig,
        retry_for: Option<Duration>,
    ) -> Result<Self, StoreError> {
        let deadline = retry_for.map(|d| tokio::time::Instant::now() + d);
        let transient = |e: &StoreError| {
            e.class() == ErrorClass::Transient
                && deadline.is_none_or(|d| tokio::time::Instant::now() < d)
        };
        crate::until_available("the event stream", transient, || {
            Self::open_once(client.clone(), nats, config)
        })
        .await
    }

    async fn open_once(
        client: Client,
        nats: &NatsConfig,
        config: &StoreConfig,
    ) -> Result<Self, StoreError> {
        let js = jetstream::ContextBuilder::new()
            .timeout(nats.request_timeout())
            .backpressure_on_inflight(true)
            .build(client.clone());
        let desired = desired_stream(config);
        match js.create_stream(desired.clone()).await {
            Ok(_) => {}
            Err(e) => {
                match e.kind() {
                    CreateStreamErrorKind::JetStream(api)
                        if api.error_code().0 == codes::STREAM_NAME_EXISTS =>
                    {
                        let mut existing = js.get_stream(&config.stream).await.map_err(|e| {
                            StoreError::unavailable("cannot read the event stream", e)
                        })?;
                        let info = existing.info().await.map_err(|e| {
                            StoreError::unavailable("cannot read the event stream", e)
                        })?;
                        let problems = incompatibilities(&info.config, &desired);
                        if !problems.is_empty() {
                            return Err(StoreError::new(
                            StoreErrorKind::IncompatibleStream,
                            format!(
                                "stream {} exists with settings jetsource cannot use: {}. jetsource never rewrites an existing stream; fix the configuration or migrate the stream by hand",
                                config.stream,
                                problems.join("; ")
                            ),
                        ));
                        }
                    }
                    CreateStreamErrorKind::JetStream(api) => {
                        return Err(StoreError::from_code(
                            api.error_code().0,
                            StoreErrorKind::Rejected,
                            format!("cannot create stream {}: {api}", config.stream),
                        ))
                    }
                    _ => return Err(StoreError::unavailable("cannot create the event stream", e)),
                }
            }
        }
        let mut store = Self {
            client,
            js,
            stream_name: config.stream.clone(),
            read_batch: config.read_batch,
            timeout: nats.request_timeout(),
            batch_permits: Arc::new(Semaphore::new(MAX_OPEN_BATCHES)),
            streaming_paused_until: Arc::default(),
            group: None,
            integrity: Integrity::from_config(config).map_err(|e| {
                StoreError::new(
                    StoreErrorKind::Misconfigured,
                    format!("cannot use the configured signing or trusted keys: {e}"),
                )
            })?,
            privacy: Privacy::none(),
        };
        if config.group_commit {
            store.group = Some(group::Handle::start(
                store.clone(),
                config.group_commit_after,
            ));
        }
        Ok(store)
    }

    /// This handle with `privacy` opening personal fields on its reads
    /// (every handle sharing the group committer).
    pub fn with_privacy(mut self, privacy: Arc<Privacy>) -> Self {
        self.privacy = privacy;
        self
    }

    pub fn privacy(&self) -> &Arc<Privacy> {
        &self.privacy
    }

    /// Opens the personal fields of `events` (see [`crate::privacy`]).
    pub async fn open_events(&self, events: &mut [RecordedEvent]) -> Result<(), StoreError> {
        self.privacy.open(events).await.map_err(privacy_error)
    }

    /// What appends are sealed with and loads check.
    pub fn integrity(&self) -> &Integrity {
        &self.integrity
    }

    pub fn stream_name(&self) -> &str {
        &self.stream_name
    }

    /// The JetStream context, for workers that own other JetStream objects
    /// (consumers, key-value buckets).
    pub fn jetstream(&self) -> &jetstream::Context {
        &self.js
    }

    pub async fn info(&self) -> Result<stream::Info, StoreError> {
        let mut stream = self
            .js
            .get_stream(&self.stream_name)
            .await
            .map_err(|e| StoreError::unavailable("cannot read the event stream", e))?;
        stream
            .info()
            .await
            .cloned()
            .map_err(|e| StoreError::unavailable("cannot read the event stream", e))
    }

    /// The headers of the `index`th event of `append`; `previous` is the
    /// hash of the event before it, which this one's hash covers.
    fn event_headers(
        &self,
        append: &Append<'_>,
        index: usize,
        event: &NewEvent,
        previous: Option<&ChainHash>,
    ) -> (HeaderMap, Option<ChainHash>) {
        let mut headers = HeaderMap::new();
        let event_id = uuid::Uuid::now_v7().to_string();
        let version = append.version + index as u64 + 1;
        headers.insert(envelope::EVENT_ID, event_id.as_str());
        headers.insert(envelope::EVENT_TYPE, event.event_type.as_str());
        headers.insert(
            envelope::SCHEMA_VERSION,
            append.schema_version.to_string().as_str(),
        );
        headers.insert(envelope::AGGREGATE_VERSION, version.to_string().as_str());
        if let Some(command_id) = append.command_id {
            headers.insert(envelope::COMMAND_ID, command_id);
        }
        if let Some(owner) = append.command_aggregate {
            headers.insert(envelope::COMMAND_AGGREGATE, owner);
        }
        headers.insert(envelope::CORRELATION_ID, append.correlation_id);
        headers.insert(envelope::CAUSATION_ID, append.causation_id);
        if let Some(traceparent) = crate::telemetry::current_traceparent() {
            headers.insert(crate::telemetry::TRACEPARENT, traceparent.as_str());
        }
        if index == 0 {
            // Only the first message of a batch may carry these: the server
            // checks the expected sequence per message at commit time, and a
            // later message of the same aggregate would see the first one.
            headers.insert(
                NATS_EXPECTED_LAST_SUBJECT_SEQUENCE,
                append.expected_last_sequence.to_string().as_str(),
            );
            if let (Some(command_id), None) = (append.command_id, append.command_aggregate) {
                headers.insert(
                    NATS_MESSAGE_ID,
                    message_id(append.aggregate_type, append.aggregate_id, command_id).as_str(),
                );
            }
        }
        let sealed = event
            .sealed
            .as_ref()
            .map(|s| (s.subject.as_str(), s.fields.join(",")));
        if let Some((subject, fields)) = &sealed {
            headers.insert(crate::privacy::DATA_SUBJECT, *subject);
            headers.insert(crate::privacy::SEALED, fields.as_str());
        }
        if !self.integrity.chain {
            return (headers, None);
        }
        let hash = integrity::link(
            previous,
            &Linked {
                aggregate_type: append.aggregate_type,
                aggregate_id: append.aggregate_id,
                aggregate_version: version,
                event_id: &event_id,
                event_type: &event.event_type,
                schema_version: append.schema_version,
                command_id: append.command_id,
                command_aggregate: append.command_aggregate,
                correlation_id: Some(append.correlation_id),
                causation_id: Some(append.causation_id),
                data_subject: sealed.as_ref().map(|s| s.0),
                sealed: sealed.as_ref().map(|s| s.1.as_str()),
                data: &event.data,
            },
        );
        headers.insert(integrity::HASH, hash.to_string().as_str());
        if let Some(signer) = &self.integrity.signer {
            headers.insert(integrity::SIGNATURE, signer.sign(&hash).as_str());
            headers.insert(integrity::SIGNING_KEY, signer.key_id());
        }
        (headers, Some(hash))
    }

    /// Appends the events of one command atomically, guarded by the expected
    /// last sequence of the aggregate's subject.
    ///
    /// Concurrent appends may be committed together (group commit, see
    /// [`group`]): each still gets exactly the answer it would get alone.
    pub async fn append(&self, append: &Append<'_>) -> Result<Appended, StoreError> {
        let prepared = self.prepare(append)?;
        match &self.group {
            Some(group) => group.submit(prepared).await,
            None => self.write_alone(&prepared).await,
        }
    }

    /// Appends the events of one command for several aggregates (a
    /// multi-aggregate command) atomically: one JetStream atomic batch in
    /// which each aggregate's first event carries its own expected last
    /// sequence and `Nats-Msg-Id`. All are stored or none; the batch is
    /// refused whole (wrong last sequence) when any aggregate changed. The
    /// answer has one entry per append, in order, `None` for an append with
    /// no events. Never grouped with other commands' appends: it is a batch
    /// of its own already.
    pub async fn append_together(
        &self,
        appends: &[Append<'_>],
    ) -> Result<Vec<Option<Appended>>, StoreError> {
        let prepared = appends
            .iter()
            .filter(|a| !a.events.is_empty())
            .map(|a| self.prepare(a))
            .collect::<Result<Vec<_>, _>>()?;
        let total: usize = prepared.iter().map(|p| p.messages.len()).sum();
        if total > MAX_EVENTS_PER_APPEND {
            return Err(StoreError::new(
                StoreErrorKind::TooLarge,
                format!(
                    "a command may produce at most {MAX_EVENTS_PER_APPEND} events, this one produced {total}"
                ),
            ));
        }
        let mut subjects: Vec<&str> = prepared.iter().map(|p| p.subject.as_str()).collect();
        subjects.sort_unstable();
        if subjects.windows(2).any(|w| w[0] == w[1]) {
            return Err(StoreError::new(
                StoreErrorKind::Rejected,
                "an aggregate appears twice in one multi-aggregate append",
            ));
        }
        let (first, duplicate) = match prepared.as_slice() {
            [] => {
                return Err(StoreError::new(
                    StoreErrorKind::Rejected,
                    "an append needs at least one event",
                ))
            }
            // One event in all: a plain publish, which may be acknowledged
            // as a duplicate (the original's sequence).
            [alone] => {
                let appended = self.write_alone(alone).await?;
                (appended.first_sequence, appended.duplicate)
            }
            _ => {
                let refs: Vec<&Prepared> = prepared.iter().collect();
                (self.write_batch(&refs).await? + 1 - total as u64, false)
            }
        };
        let mut landed = prepared.iter().scan(first, |next, p| {
            let appended = Appended {
                duplicate,
                last_hash: p.last_hash.filter(|_| !duplicate),
                ..p.appended(*next)
            };
            *next += p.messages.len() as u64;
            Some(appended)
        });
        Ok(appends
            .iter()
            .map(|a| (!a.events.is_empty()).then(|| landed.next()).flatten())
            .collect())
    }

    /// The messages of one append, headers and all, checked for size.
    fn prepare(&self, append: &Append<'_>) -> Result<Prepared, StoreError> {
        match append.events.len() {
            0 => Err(StoreError::new(
                StoreErrorKind::Rejected,
                "an append needs at least one event",
            )),
            n if n > MAX_EVENTS_PER_APPEND => Err(StoreError::new(
                StoreErrorKind::TooLarge,
                format!(
                    "a command may produce at most {MAX_EVENTS_PER_APPEND} events, this one produced {n}"
                ),
            )),
            _ => {
                let mut last_hash = append.previous_hash;
                let messages = append
                    .events
                    .iter()
                    .enumerate()
                    .map(|(index, event)| {
                        let (headers, hash) =
                            self.event_headers(append, index, event, last_hash.as_ref());
                        last_hash = hash;
                        (headers, Bytes::copy_from_slice(&event.data))
                    })
                    .collect();
                Ok(Prepared {
                    subject: event_subject(append.aggregate_type, append.aggregate_id),
                    messages,
                    expected_last_sequence: append.expected_last_sequence,
                    last_hash: self.integrity.chain.then_some(last_hash).flatten(),
                    signed: self.integrity.signer.is_some(),
                })
            }
        }
    }

    /// Writes one append on its own: one event as a plain publish, several
    /// as an atomic batch of their own.
    pub(crate) async fn write_alone(&self, prepared: &Prepared) -> Result<Appended, StoreError> {
        if let [(headers, payload)] = prepared.messages.as_slice() {
            let publish = PublishMessage::build()
                .payload(payload.clone())
                .headers(headers.clone());
            let ack = self
                .js
                .send_publish(prepared.subject.clone(), publish)
                .await
                .map_err(publish_error)?
                .await
                .map_err(publish_error)?;
            return Ok(Appended {
                duplicate: ack.duplicate,
                last_hash: prepared.last_hash.filter(|_| !ack.duplicate),
                ..prepared.appended(ack.sequence)
            });
        }
        let last = self.write_batch(&[prepared]).await?;
        let count = prepared.messages.len() as u64;
        Ok(prepared.appended(last + 1 - count))
    }

    /// Writes the messages of `appends`, in order, as one JetStream atomic
    /// batch and returns the stream sequence of its last message. Holds one
    /// of this process's batch permits, and retries the server's "too many
    /// open batches" a few times before reporting it (other processes share
    /// the server's limit).
    pub(crate) async fn write_batch(&self, appends: &[&Prepared]) -> Result<u64, StoreError> {
        let _permit = self
            .batch_permits
            .acquire()
            .await
            .map_err(|e| StoreError::unavailable("atomic batch", e))?;
        let mut backoff = Duration::from_millis(5);
        let mut attempt = 0;
        loop {
            attempt += 1;
            match self.send_batch(appends).await {
                Err(e) if is_too_many_batches(&e) && attempt < 6 => {
                    tokio::time::sleep(backoff).await;
                    backoff *= 2;
                }
                other => return other,
            }
        }
    }

    /// JetStream atomic batch (ADR-50): the first message is a request the
    /// server answers with an empty reply once the batch is open, the middle
    /// ones are plain publishes (a gap makes the server reject the batch), the
    /// last carries `Nats-Batch-Commit` and gets the pub ack. Nothing is
    /// visible until the commit, and a failed check at commit stores nothing.
    async fn send_batch(&self, appends: &[&Prepared]) -> Result<u64, StoreError> {
        let total: usize = appends.iter().map(|a| a.messages.len()).sum();
        if total < 2 {
            return Err(StoreError::new(
                StoreErrorKind::Rejected,
                "an atomic batch needs at least two messages",
            ));
        }
        let batch_id = uuid::Uuid::new_v4().simple().to_string();
        let mut messages = Vec::with_capacity(total);
        for append in appends {
            for (headers, payload) in &append.messages {
                messages.push((&append.subject, headers, payload));
            }
        }
        for (index, (subject, headers, payload)) in messages.into_iter().enumerate() {
            let mut headers = headers.clone();
            headers.insert(NATS_BATCH_ID, batch_id.as_str());
            headers.insert(NATS_BATCH_SEQUENCE, (index + 1).to_string().as_str());
            if index == 0 {
                let reply = tokio::time::timeout(
                    self.timeout,
                    self.client
                        .request_with_headers(subject.clone(), headers, payload.clone()),
                )
                .await
                .map_err(|_| StoreError::unavailable("atomic batch start", "timed out"))?
                .map_err(|e| StoreError::unavailable("atomic batch start", e))?;
                if !reply.payload.is_empty() {
                    return Err(batch_reply_error(&reply.payload));
                }
            } else if index == total - 1 {
                headers.insert(NATS_BATCH_COMMIT, "1");
                let publish = PublishMessage::build()
                    .payload(payload.clone())
                    .headers(headers);
                let ack = self
                    .js
                    .send_publish(subject.clone(), publish)
                    .await
                    .map_err(publish_error)?
                    .await
                    .map_err(publish_error)?;
                return Ok(ack.sequence);
            } else {
                self.client
                    .publish_with_headers(subject.clone(), headers, payload.clone())
                    .await
                    .map_err(|e| StoreError::unavailable("atomic batch publish", e))?;
            }
        }
        unreachable!("the loop returns at the last message")
    }

    /// Reads an aggregate's events in order, starting at stream sequence
    /// `from` (inclusive), handing them to `visit` a chunk at a time until it
    /// breaks or the history ends. Uses batched direct gets (server 2.11+),
    /// which any replica may answer: a lagging replica can return a slightly
    /// stale tail, which the expected-sequence check on append catches.
    pub async fn read(
        &self,
        aggregate_type: &str,
        aggregate_id: &str,
        from: u64,
        mut visit: impl FnMut(Vec<RecordedEvent>) -> ControlFlow<()>,
    ) -> Result<(), StoreError> {
        let subject = event_subject(aggregate_type, aggregate_id);
        let mut from = from;
        loop {
            let mut failure = None;
            // A personal field whose key this process does not hold stops
            // the read there: the key is fetched, and the read goes on.
            let mut needs_key = None;
            let mut stopped = false;
            self.read_stored(&subject, from, |chunk| {
                let mut events = Vec::with_capacity(chunk.len());
                for message in chunk {
                    let sequence = message.sequence;
                    match message.into_event() {
                        Ok(mut event) => match self.privacy.open_cached(&mut event) {
                            Ok(()) => events.push(event),
                            Err(key) => {
                                needs_key = Some((key, sequence));
                                break;
                            }
                        },
                        Err(e) => {
                            failure = Some(StoreError::from(e));
                            return ControlFlow::Break(());
                        }
                    }
                }
                if !events.is_empty() && visit(events).is_break() {
                    stopped = true;
                    return ControlFlow::Break(());
                }
                match needs_key {
                    Some(_) => ControlFlow::Break(()),
                    None => ControlFlow::Continue(()),
                }
            })
            .await?;
            if let Some(e) = failure {
                return Err(e);
            }
            match needs_key {
                Some((key, sequence)) if !stopped => {
                    self.privacy.fetch(&key).await.map_err(privacy_error)?;
                    from = sequence;
                }
                _ => return Ok(()),
            }
        }
    }

    /// Reads every stored message from stream sequence `from` on, in stream
    /// order, as it is stored (a message that is not a valid event is handed
    /// over too, for the caller to judge).
    pub async fn read_all(
        &self,
        from: u64,
        visit: impl FnMut(Vec<StoredMessage>) -> ControlFlow<()>,
    ) -> Result<(), StoreError> {
        let filter = format!("{}.>", envelope::EVENT_SUBJECT_PREFIX);
        self.read_stored(&filter, from, visit).await
    }

    async fn read_stored(
        &self,
        subject: &str,
        from: u64,
        mut visit: impl FnMut(Vec<StoredMessage>) -> ControlFlow<()>,
    ) -> Result<(), StoreError> {
        let inbox = self.client.new_inbox();
        let mut replies = self
            .client
            .subscribe(inbox.clone())
            .await
            .map_err(|e| StoreError::unavailable("direct get", e))?;
        let api = format!("$JS.API.DIRECT.GET.{}", self.stream_name);
        let mut next = from.max(1);
        let mut streamed = false;
        loop {
            let request = serde_json::json!({
                "seq": next,
                "next_by_subj": subject,
                "batch": self.read_batch,
            });
            self.client
                .publish_with_reply(api.clone(), inbox.clone(), request.to_string().into())
                .await
                .map_err(|e| StoreError::unavailable("direct get", e))?;
            let mut chunk = Vec::new();
            let pending = loop {
                let message = tokio::time::timeout(self.timeout, replies.next())
                    .await
                    .map_err(|_| {
                        StoreError::unavailable(
                            &format!("reading {subject}"),
                            format!("no answer within {:?}", self.timeout),
                        )
                    })?
                    .ok_or_else(|| StoreError::unavailable("direct get", "subscription closed"))?;
                match message.status.map(|s| s.as_u16()) {
                    None => chunk.push(stored_message(message)?),
                    Some(204) => {
                        // End of batch: `Nats-Num-Pending` counts what is left.
                        break header_u64(message.headers.as_ref(), "Nats-Num-Pending")
                            .unwrap_or(0);
                    }
                    Some(404) => break 0,
                    Some(503) => {
                        return Err(StoreError::unavailable(
                            &format!("reading {subject}"),
                            format!("stream {} has no responders", self.stream_name),
                        ))
                    }
                    Some(status) => {
                        return Err(StoreError::new(
                            StoreErrorKind::Rejected,
                            format!(
                                "direct get on {} answered {status} {}",
                                self.stream_name,
                                message.description.unwrap_or_default()
                            ),
                        ))
                    }
                }
            };
            let last_seen = chunk.last().map(|e| e.sequence);
            if !chunk.is_empty() && visit(chunk).is_break() {
                break;
            }
            match last_seen {
                Some(seq) if pending > BULK_READ_AFTER && !streamed && self.may_stream() => {
                    streamed = true;
                    match self.read_streamed(subject, seq + 1, &mut visit).await {
                        Streamed::Done => break,
                        Streamed::Resume(from) => next = from,
                    }
                }
                Some(seq) if pending > 0 => next = seq + 1,
                _ => break,
            }
        }
        // Dropping the subscriber unsubscribes.
        Ok(())
    }

    /// The rest of a long read, through a short-lived consumer of its own
    /// (R1, in memory, no acks): the server streams a consumer's messages
    /// about three times as fast as it answers batched direct gets (which
    /// build a header block per message), and its messages carry fewer
    /// headers to parse. Like a direct get, the consumer may sit on a
    /// replica that lags; callers treat both alike.
    ///
    /// Only an accelerator: if the consumer cannot be created (no meta
    /// leader during an election, the server's consumer limit) or stalls,
    /// the read resumes with direct gets after the last message handed on.
    async fn read_streamed(
        &self,
        subject: &str,
        from: u64,
        visit: &mut impl FnMut(Vec<StoredMessage>) -> ControlFlow<()>,
    ) -> Streamed {
        let created = async {
            self.stream()
                .await?
                .create_consumer(consumer::pull::Config {
                    filter_subject: subject.to_owned(),
                    deliver_policy: consumer::DeliverPolicy::ByStartSequence {
                        start_sequence: from,
                    },
                    ack_policy: consumer::AckPolicy::None,
                    // Gone by itself soon after the read: no delete right
                    // needed, which would reach the durable consumers too.
                    inactive_threshold: READER_IDLE_EXPIRY,
                    memory_storage: true,
                    num_replicas: 1,
                    ..Default::default()
                })
                .await
                .map_err(|e| StoreError::unavailable("creating a reading consumer", e))
        };
        let consumer = match created.await {
            Ok(consumer) => consumer,
            Err(e) => {
                self.pause_streaming(subject, &e);
                return Streamed::Resume(from);
            }
        };
        let mut next = from;
        let outcome = if consumer.cached_info().num_pending == 0 {
            Ok(Streamed::Done)
        } else {
            self.stream_messages(&consumer, &mut next, visit).await
        };
        outcome.unwrap_or_else(|e| {
            self.pause_streaming(subject, &e);
            Streamed::Resume(next)
        })
    }

    /// After a consumer could not be created or stalled: the next reads
    /// stay on direct gets for a while rather than each paying a timeout.
    fn pause_streaming(&self, subject: &str, e: &StoreError) {
        tracing::warn!(%subject, error = %e, "a long read goes on with direct gets; consumers unused for {STREAMING_PAUSE:?}");
        if let Ok(mut until) = self.streaming_paused_until.lock() {
            *until = Some(std::time::Instant::now() + STREAMING_PAUSE);
        }
    }

    fn may_stream(&self) -> bool {
        self.streaming_paused_until
            .lock()
            .map(|until| until.is_none_or(|t| std::time::Instant::now() >= t))
            .unwrap_or(true)
    }

    /// Hands on `consumer`'s messages a chunk at a time until none is
    /// pending or `visit` breaks; `next` follows the last one handed on.
    async fn stream_messages(
        &self,
        consumer: &consumer::PullConsumer,
        next: &mut u64,
        visit: &mut impl FnMut(Vec<StoredMessage>) -> ControlFlow<()>,
    ) -> Result<Streamed, StoreError> {
        let failed = |e: &dyn std::fmt::Display| StoreError::unavailable("reading a consumer", e);
        let mut messages = consumer
            .stream()
            .max_messages_per_batch(self.read_batch.max(100))
            .messages()
            .await
            .map_err(|e| failed(&e))?;
        let mut chunk = Vec::with_capacity(self.read_batch);
        let mut delivered = 0;
        loop {
            let message = tokio::time::timeout(self.timeout, messages.next())
                .await
                .map_err(|_| failed(&format!("no message within {:?}", self.timeout)))?
                .ok_or_else(|| failed(&"the consumer ended"))?
                .map_err(|e| failed(&e))?;
            let info = message.info().map_err(|e| failed(&e))?;
            let (sequence, timestamp, pending) =
                (info.stream_sequence, info.published, info.pending);
            // Core NATS may drop a message (a slow client): a gap in the
            // consumer's own count ends the stream, direct gets go on.
            delivered += 1;
            if info.consumer_sequence != delivered {
                return Err(failed(&"a message was lost in delivery"));
            }
            let (message, _) = message.split();
            chunk.push(StoredMessage {
                subject: message.subject.to_string(),
                sequence,
                timestamp,
                headers: message.headers,
                payload: message.payload,
            });
            if pending == 0 || chunk.len() >= self.read_batch {
                *next = sequence + 1;
                if visit(std::mem::take(&mut chunk)).is_break() || pending == 0 {
                    return Ok(Streamed::Done);
                }
            }
        }
    }

    /// An aggregate's events from stream sequence `from` on, every one the
    /// stream leader had when asked (see [`EventStore::read_through`]): for
    /// answers that must not miss the newest events, such as a history or
    /// "no such aggregate".
    pub async fn read_confirmed(
        &self,
        aggregate_type: &str,
        aggregate_id: &str,
        from: u64,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        let subject = event_subject(aggregate_type, aggregate_id);
        let last = self.leader_last_sequence(&subject).await?;
        let messages = self.read_through(&subject, from, last).await?;
        let mut events = messages
            .into_iter()
            .map(StoredMessage::into_event)
            .collect::<Result<Vec<_>, _>>()?;
        self.open_events(&mut events).await?;
        Ok(events)
    }

    /// Every stored message on subjects matching `filter` with a sequence
    /// in `from..=through`, in stream order, none missing, even on a
    /// replicated stream whose replicas lag.
    ///
    /// The bulk comes from batched direct gets, which any replica may
    /// answer. A replica holds a prefix of the stream, so what it returns is
    /// complete up to the last message it returned, and if that lies beyond
    /// `through` nothing more is needed. Otherwise the replica may simply
    /// not have the rest yet, so the stream leader, which has every
    /// acknowledged message, is asked for the next match; only its "none
    /// up to `through`" ends the read.
    pub async fn read_through(
        &self,
        filter: &str,
        from: u64,
        through: u64,
    ) -> Result<Vec<StoredMessage>, StoreError> {
        let mut out: Vec<StoredMessage> = Vec::new();
        let mut next = from.max(1);
        while next <= through {
            let mut beyond = false;
            self.read_stored(filter, next, |chunk| {
                for message in chunk {
                    if message.sequence > through {
                        beyond = true;
                        return ControlFlow::Break(());
                    }
                    out.push(message);
                }
                ControlFlow::Continue(())
            })
            .await?;
            if beyond {
                break;
            }
            let complete_to = out.last().map_or(next - 1, |m| m.sequence).max(next - 1);
            match self.leader_next(filter, complete_to + 1).await? {
                Some(message) if message.sequence <= through => {
                    next = message.sequence + 1;
                    out.push(message);
                }
                _ => break,
            }
        }
        Ok(out)
    }

    /// The first message on `filter` at or after `from` as the stream
    /// leader has it (`$JS.API.STREAM.MSG.GET`, answered by the leader
    /// only), `None` if the leader has none. Unlike a direct get's, this
    /// `None` means no such message has been acknowledged. One round trip
    /// per message: for deciding that nothing is missing, not for bulk.
    pub async fn leader_next(
        &self,
        filter: &str,
        from: u64,
    ) -> Result<Option<StoredMessage>, StoreError> {
        let stream = self.stream().await?;
        let got = stream
            .raw_message_builder()
            .sequence(from.max(1))
            .next_by_subject(filter)
            .send()
            .await;
        leader_found(
            got,
            &format!("reading the next message on {filter} from the leader"),
        )
    }

    /// Sequence of the last message on `subject` as the stream leader has
    /// it, 0 if there is none.
    pub async fn leader_last_sequence(&self, subject: &str) -> Result<u64, StoreError> {
        let stream = self.stream().await?;
        let got = stream
            .raw_message_builder()
            .last_by_subject(subject)
            .send()
            .await;
        let found = leader_found(
            got,
            &format!("reading the last message on {subject} from the leader"),
        )?;
        Ok(found.map_or(0, |m| m.sequence))
    }

    /// The stream's last sequence as the stream leader reports it (stream
    /// info is answered by the leader).
    pub async fn last_sequence(&self) -> Result<u64, StoreError> {
        Ok(self.info().await?.state.last_sequence)
    }

    /// A handle on the event stream, without the info round trip.
    async fn stream(&self) -> Result<jetstream::stream::Stream<()>, StoreError> {
        self.js
            .get_stream_no_info(&self.stream_name)
            .await
            .map_err(|e| StoreError::unavailable("cannot open the event stream", e))
    }

    /// Subjects of the stream matching `filter` (e.g. `events.account.*`):
    /// one per aggregate.
    pub async fn subjects(&self, filter: &str) -> Result<Vec<String>, StoreError> {
        let stream = self.stream().await?;
        let mut subjects = stream
            .info_with_subjects(filter)
            .await
            .map_err(|e| StoreError::unavailable("cannot list the event stream's subjects", e))?;
        let mut out = Vec::new();
        while let Some(entry) = subjects.next().await {
            let (subject, _count) =
                entry.map_err(|e| StoreError::unavailable("cannot list subjects", e))?;
            out.push(subject);
        }
        out.sort();
        Ok(out)
    }

    /// Version and sequence of an aggregate's last event, `None` if it has
    /// none, as the stream leader has it.
    pub async fn last_version(
        &self,
        aggregate_type: &str,
        aggregate_id: &str,
    ) -> Result<Option<(u64, u64)>, StoreError> {
        let stream = self.stream().await?;
        let subject = event_subject(aggregate_type, aggregate_id);
        let got = stream
            .raw_message_builder()
            .last_by_subject(subject.as_str())
            .send()
            .await;
        Ok(leader_found(got, "reading the last event")?.map(|m| {
            (
                header_u64(m.headers.as_ref(), envelope::AGGREGATE_VERSION).unwrap_or(0),
                m.sequence,
            )
        }))
    }

    /// The event at stream sequence `sequence`, `None` if there is none, as
    /// the stream leader has it.
    pub async fn get(&self, sequence: u64) -> Result<Option<RecordedEvent>, StoreError> {
        let stream = self.stream().await?;
        let got = stream.raw_message_builder().sequence(sequence).send().await;
        match leader_found(got, &format!("reading event {sequence}"))? {
            Some(message) => {
                let mut event = [message.into_event()?];
                self.open_events(&mut event).await?;
                let [event] = event;
                Ok(Some(event))
            }
            None => Ok(None),
        }
    }

    /// The chain hash of the event at `sequence` (as the stream leader has
    /// it), `None` for 0, a missing event or one without a hash: what an
    /// append guarded by `sequence` links to. For writers that do not keep
    /// the aggregate loaded (tools, tests); workers take it from the state
    /// they decided on.
    pub async fn hash_at(&self, sequence: u64) -> Result<Option<ChainHash>, StoreError> {
        if sequence == 0 {
            return Ok(None);
        }
        Ok(self
            .get(sequence)
            .await?
            .and_then(|e| e.hash.as_deref().and_then(ChainHash::parse)))
    }

    /// Scans an aggregate's history for the events of `command_id`. Slow on
    /// long histories; only for resends too old for the caller's cache.
    pub async fn find_command(
        &self,
        aggregate_type: &str,
        aggregate_id: &str,
        command_id: &str,
    ) -> Result<Option<Vec<RecordedEvent>>, StoreError> {
        let mut found: Vec<RecordedEvent> = Vec::new();
        self.read(aggregate_type, aggregate_id, 1, |chunk| {
            for event in chunk {
                if event.own_command_id() == Some(command_id) {
                    found.push(event);
                } else if !found.is_empty() {
                    return ControlFlow::Break(());
                }
            }
            ControlFlow::Continue(())
        })
        .await?;
        Ok((!found.is_empty()).then_some(found))
    }

    /// The events an earlier command appended, starting at the sequence of
    /// its first event: used to answer a resent command with its original
    /// outcome.
    pub async fn read_command(
        &self,
        aggregate_type: &str,
        aggregate_id: &str,
        first_sequence: u64,
        command_id: &str,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        let mut events = Vec::new();
        self.read(aggregate_type, aggregate_id, first_sequence, |chunk| {
            for event in chunk {
                if event.command_id.as_deref() != Some(command_id) {
                    return ControlFlow::Break(());
                }
                events.push(event);
            }
            ControlFlow::Continue(())
        })
        .await?;
        if events.is_empty() {
            // The replica that answered has not got the command's events
            // yet; the leader has them.
            let subject = event_subject(aggregate_type, aggregate_id);
            let mut next = first_sequence;
            while let Some(message) = self.leader_next(&subject, next).await? {
                let mut event = [message.into_event()?];
                self.open_events(&mut event).await?;
                let [event] = event;
                if event.command_id.as_deref() != Some(command_id) {
                    break;
                }
                next = event.sequence + 1;
                events.push(event);
            }
        }
        if events.is_empty() {
            return Err(StoreError::new(
                StoreErrorKind::Unavailable,
                format!(
                    "command {command_id} was stored at sequence {first_sequence} but that event cannot be read yet; retry"
                ),
            ));
        }
        Ok(events)
    }
}

fn privacy_error(e: crate::privacy::PrivacyError) -> StoreError {
    match e {
        crate::privacy::PrivacyError::Store(e) => e,
        other => StoreError::new(StoreErrorKind::Rejected, other.to_string()),
    }
}

fn header_u64(headers: Option<&HeaderMap>, name: &str) -> Option<u64> {
    headers?.get(name)?.as_str().parse().ok()
}

/// A message as the stream holds it, before it is read as an event.
#[derive(Debug, Clone)]
pub struct StoredMessage {
    pub subject: String,
    pub sequence: u64,
    pub timestamp: OffsetDateTime,
    pub headers: Option<HeaderMap>,
    pub payload: Bytes,
}

impl StoredMessage {
    pub fn into_event(self) -> Result<RecordedEvent, envelope::EnvelopeError> {
        RecordedEvent::from_parts(
            &self.subject,
            self.sequence,
            self.timestamp,
            self.headers.as_ref(),
            self.payload,
        )
    }
}

/// A leader read's message, `None` when the leader has none.
fn leader_found(
    result: Result<jetstream::message::StreamMessage, jetstream::stream::RawMessageError>,
    what: &str,
) -> Result<Option<StoredMessage>, StoreError> {
    use jetstream::stream::RawMessageErrorKind;
    match result {
        Ok(m) => Ok(Some(StoredMessage {
            subject: m.subject.to_string(),
            sequence: m.sequence,
            timestamp: m.time,
            headers: Some(m.headers),
            payload: m.payload,
        })),
        Err(e) => match e.kind() {
            RawMessageErrorKind::NoMessageFound => Ok(None),
            RawMessageErrorKind::JetStream(api) => {
                let code = api.error_code().0;
                match codes::kind_of(code) {
                    Some(StoreErrorKind::NotFound) => Ok(None),
                    _ => Err(StoreError::from_code(
                        code,
                        StoreErrorKind::Unavailable,
                        format!("{what}: {api}; retry"),
                    )),
                }
            }
            _ => Err(StoreError::unavailable(what, e)),
        },
    }
}

fn stored_message(message: async_nats::Message) -> Result<StoredMessage, StoreError> {
    let headers = message.headers.as_ref();
    let corrupt = |what: &str| {
        StoreError::new(
            StoreErrorKind::Corrupt,
            format!("direct get reply without {what}"),
        )
    };
    let subject = headers
        .and_then(|h| h.get("Nats-Subject"))
        .ok_or_else(|| corrupt("Nats-Subject"))?
        .as_str()
        .to_owned();
    let sequence = header_u64(headers, "Nats-Sequence").ok_or_else(|| corrupt("Nats-Sequence"))?;
    let timestamp = headers
        .and_then(|h| h.get("Nats-Time-Stamp"))
        .and_then(|v| OffsetDateTime::parse(v.as_str(), &Rfc3339).ok())
        .ok_or_else(|| corrupt("a valid Nats-Time-Stamp"))?;
    Ok(StoredMessage {
        subject,
        sequence,
        timestamp,
        headers: message.headers,
        payload: message.payload,
    })
}

/// What a failed publish means: by the server's API error code when it
/// sent one, otherwise by the client's view of what went wrong.
fn publish_kind(e: &PublishError) -> StoreErrorKind {
    match codes::code_in(e) {
        Some(code) => codes::kind_of(code).unwrap_or(StoreErrorKind::Rejected),
        None => match e.kind() {
            PublishErrorKind::WrongLastSequence => StoreErrorKind::WrongLastSequence,
            PublishErrorKind::MaxPayloadExceeded => StoreErrorKind::TooLarge,
            PublishErrorKind::TimedOut
            | PublishErrorKind::BrokenPipe
            | PublishErrorKind::MaxAckPending
            | PublishErrorKind::StreamNotFound => StoreErrorKind::Unavailable,
            PublishErrorKind::WrongLastMessageId | PublishErrorKind::Other => {
                StoreErrorKind::Rejected
            }
        },
    }
}

fn publish_error(e: PublishError) -> StoreError {
    let kind = publish_kind(&e);
    let code = codes::code_in(&e);
    let message = match (kind, code) {
        (StoreErrorKind::WrongLastSequence, _) => {
            "the aggregate changed since it was loaded (wrong last sequence)".to_owned()
        }
        (StoreErrorKind::Unavailable, Some(codes::BATCH_TOO_MANY_INFLIGHT)) => format!(
            "too many atomic batches open on the stream (error {}); retry",
            codes::BATCH_TOO_MANY_INFLIGHT
        ),
        // "No responders": nothing subscribes to the event subjects, as
        // when the stream is gone or, on a cluster, has no leader (quorum
        // lost: docs/PROTOCOL.md, "Read-only mode").
        (StoreErrorKind::Unavailable, None) if e.kind() == PublishErrorKind::StreamNotFound => {
            "append failed: no server takes the event stream's appends (the stream is missing, or has no leader: a cluster that lost its quorum); retry".to_owned()
        }
        (StoreErrorKind::Unavailable, _) => {
            format!("append failed: {e}; the event store is not reachable, retry")
        }
        (StoreErrorKind::DuplicateCommand, _) => format!("command already stored: {e}"),
        _ => format!("append refused by the server: {e}"),
    };
    StoreError {
        kind,
        message,
        code,
    }
}

fn is_too_many_batches(e: &StoreError) -> bool {
    e.code == Some(codes::BATCH_TOO_MANY_INFLIGHT)
}

fn batch_reply_error(payload: &[u8]) -> StoreError {
    match serde_json::from_slice::<ApiErrorResponse>(payload) {
        Ok(ApiErrorResponse { error: Some(error) }) => {
            let kind = codes::kind_of(error.err_code).unwrap_or(StoreErrorKind::Rejected);
            let message = match kind {
                StoreErrorKind::WrongLastSequence => {
                    "the aggregate changed since it was loaded (wrong last sequence)".to_owned()
                }
                _ => format!(
                    "atomic batch refused: {} (error {})",
                    error.description, error.err_code
                ),
            };
            StoreError::from_code(error.err_code, kind, message)
        }
        _ => StoreError::new(
            StoreErrorKind::Rejected,
            format!(
                "atomic batch start got an unexpected reply: {}",
                String::from_utf8_lossy(payload)
            ),
        ),
    }
}
