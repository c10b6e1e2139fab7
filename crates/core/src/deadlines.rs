//! Durable deadlines for process managers, on NATS message schedules
//! (ADR-51, nats-server 2.12+).
//!
//! A deadline is a one-shot schedule message on
//! `deadline.sched.<process>.<id>.<name>` with `Nats-Schedule: @at <time>`
//! and `Nats-Schedule-Target: deadline.due.<process>.<id>.<name>`. When
//! the time comes, the stream leader writes the schedule's body to the
//! target subject (and purges the schedule), where the process worker's
//! durable consumer picks it up. Schedules live in the stream, so they
//! survive restarts of servers and workers; a deadline that passed while
//! the servers were down fires as soon as they are back.
//!
//! Why a stream of their own: enabling schedules turns on rollups and
//! purges, which the event stream must never allow. Nothing here is
//! history: a schedule is replaced (rollup per subject) when published
//! again and purged when it fires or is cancelled; a due message is purged
//! once handled. There is no age limit, which would also remove schedules
//! due later than it.
//!
//! A due message may come more than once (a leader change while it fires)
//! or after the instance stopped waiting: the body carries the deadline's
//! time, and the process worker only acts on a deadline its instance still
//! waits for at that very time.

use std::time::Duration;

use async_nats::header::{NATS_MESSAGE_ID, NATS_SCHEDULE, NATS_SCHEDULE_TARGET};
use async_nats::jetstream::consumer::{pull, AckPolicy, PullConsumer};
use async_nats::jetstream::message::PublishMessage;
use async_nats::jetstream::stream::{self, RetentionPolicy, StorageType};
use async_nats::jetstream::{self, context::CreateStreamErrorKind};
use async_nats::HeaderMap;
use serde::{Deserialize, Serialize};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use crate::store::{codes, StoreError, StoreErrorKind};

/// Subjects of schedule messages: `deadline.sched.<process>.<id>.<name>`.
pub const SCHEDULE_PREFIX: &str = "deadline.sched";
/// Subjects the schedules fire on: `deadline.due.<process>.<id>.<name>`.
pub const DUE_PREFIX: &str = "deadline.due";

/// The body of a schedule and of the due message it produces.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Due {
    pub process: String,
    pub id: String,
    pub name: String,
    /// The deadline's time, Unix milliseconds.
    pub at_ms: u64,
}

/// The deadline stream.
#[derive(Debug, Clone)]
pub struct Deadlines {
    js: jetstream::Context,
    stream: String,
}

impl Deadlines {
    /// Opens the deadline stream `name`, creating it when missing (file
    /// storage, `replicas` copies, schedules enabled).
    pub async fn open(
        js: &jetstream::Context,
        name: &str,
        replicas: usize,
    ) -> Result<Self, StoreError> {
        let config = stream::Config {
            name: name.to_owned(),
            subjects: vec![format!("{SCHEDULE_PREFIX}.>"), format!("{DUE_PREFIX}.>")],
            storage: StorageType::File,
            num_replicas: replicas,
            retention: RetentionPolicy::Limits,
            allow_message_schedules: true,
            allow_rollup: true,
            duplicate_window: Duration::from_secs(120),
            ..Default::default()
        };
        match js.create_stream(config).await {
            Ok(_) => {}
            Err(e) => match e.kind() {
                CreateStreamErrorKind::JetStream(api)
                    if api.error_code().0 == codes::STREAM_NAME_EXISTS => {}
                CreateStreamErrorKind::JetStream(api) => {
                    return Err(StoreError::jetstream(
                        &format!("cannot create the deadline stream {name}"),
                        Some(api.error_code().0),
                        &e,
                    ))
                }
                _ => {
                    return Err(StoreError::new(
                        StoreErrorKind::Unavailable,
                        format!("cannot create the deadline stream {name}: {e}"),
                    ))
                }
            },
        }
        Ok(Self {
            js: js.clone(),
            stream: name.to_owned(),
        })
    }

    /// Schedules `due` (again: the same deadline published twice is one
    /// schedule, the later replacing the earlier).
    pub async fn schedule(&self, due: &Due) -> Result<(), StoreError> {
        let tail = format!("{}.{}.{}", due.process, due.id, due.name);
        let at = OffsetDateTime::from_unix_timestamp_nanos(i128::from(due.at_ms) * 1_000_000)
            .ok()
            .and_then(|t| t.format(&Rfc3339).ok())
            .ok_or_else(|| {
                StoreError::new(
                    StoreErrorKind::Rejected,
                    format!("deadline {tail} has an impossible time {}", due.at_ms),
                )
            })?;
        let mut headers = HeaderMap::new();
        headers.insert(NATS_SCHEDULE, format!("@at {at}").as_str());
        headers.insert(
            NATS_SCHEDULE_TARGET,
            format!("{DUE_PREFIX}.{tail}").as_str(),
        );
        headers.insert(NATS_MESSAGE_ID, format!("{tail}.{}", due.at_ms).as_str());
        let body = serde_json::to_vec(due).expect("serializes");
        let publish = PublishMessage::build()
            .payload(body.into())
            .headers(headers);
        let stored = async {
            self.js
                .send_publish(format!("{SCHEDULE_PREFIX}.{tail}"), publish)
                .await
                .map_err(|e| StoreError::publish("schedule a deadline", &e))?
                .await
                .map_err(|e| StoreError::publish("schedule a deadline", &e))
        };
        match stored.await {
            Ok(_) => Ok(()),
            // Another copy is storing this very schedule right now.
            Err(e) if e.code() == Some(codes::DUPLICATE_MSG_ID_IN_PROCESS) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Cancels deadline `name` of an instance, if it has not fired.
    pub async fn cancel(&self, process: &str, id: &str, name: &str) -> Result<(), StoreError> {
        self.purge(&format!("{SCHEDULE_PREFIX}.{process}.{id}.{name}"))
            .await
    }

    /// Removes a due message that was handled, trying a few times over a
    /// few seconds (a leader election): once acknowledged it is never
    /// delivered again, so one left behind would only take room.
    pub async fn handled(&self, due: &Due) -> Result<(), StoreError> {
        let subject = format!("{DUE_PREFIX}.{}.{}.{}", due.process, due.id, due.name);
        let mut backoff = Duration::from_millis(200);
        let mut attempt = 0;
        loop {
            attempt += 1;
            match self.purge(&subject).await {
                Err(e) if attempt < 5 => {
                    tracing::debug!(%subject, error = %e, "cannot remove a handled deadline yet");
                    tokio::time::sleep(backoff).await;
                    backoff *= 2;
                }
                other => return other,
            }
        }
    }

    async fn purge(&self, subject: &str) -> Result<(), StoreError> {
        let what = "purge a deadline";
        let stream = self
            .js
            .get_stream(&self.stream)
            .await
            .map_err(|e| StoreError::jetstream(what, codes::code_in(&e), &e))?;
        stream
            .purge()
            .filter(subject)
            .await
            .map_err(|e| StoreError::jetstream(what, codes::code_in(&e), &e))?;
        Ok(())
    }

    /// The durable consumer of `process`'s due deadlines, shared by every
    /// copy of the process worker.
    pub async fn consumer(&self, process: &str) -> Result<PullConsumer, StoreError> {
        let what = format!("cannot create the deadline consumer of {process}");
        let stream = self
            .js
            .get_stream(&self.stream)
            .await
            .map_err(|e| StoreError::jetstream(&what, codes::code_in(&e), &e))?;
        stream
            .create_consumer(pull::Config {
                durable_name: Some(format!("process-{process}")),
                filter_subject: format!("{DUE_PREFIX}.{process}.>"),
                ack_policy: AckPolicy::Explicit,
                ack_wait: Duration::from_secs(10),
                ..Default::default()
            })
            .await
            .map_err(|e| StoreError::jetstream(&what, codes::code_in(&e), &e))
    }
}
