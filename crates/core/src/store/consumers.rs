//! Durable consumers on the event stream, for the workers that follow it
//! (the projector's generations, the snapshotter). They are created, listed
//! and deleted here, like everything else that touches the event stream;
//! the workers only read and acknowledge the messages their consumers
//! deliver.

use async_nats::jetstream::consumer::{pull, PullConsumer};
use async_nats::jetstream::stream::{ConsumerError, ConsumerErrorKind};
use futures::StreamExt;

use super::{codes, EventStore, StoreError, StoreErrorKind};

impl EventStore {
    /// Creates the durable pull consumer `config` describes on the event
    /// stream, or binds to it if it exists with the same settings.
    pub async fn create_consumer(&self, config: pull::Config) -> Result<PullConsumer, StoreError> {
        let name = config.durable_name.clone().unwrap_or_default();
        self.stream()
            .await?
            .create_consumer(config)
            .await
            .map_err(|e| consumer_error(&format!("cannot create consumer {name}"), e))
    }

    /// Deletes the consumer `name` of the event stream.
    pub async fn delete_consumer(&self, name: &str) -> Result<(), StoreError> {
        self.stream()
            .await?
            .delete_consumer(name)
            .await
            .map(|_| ())
            .map_err(|e| consumer_error(&format!("cannot delete consumer {name}"), e))
    }

    /// The names of the event stream's consumers.
    pub async fn consumer_names(&self) -> Result<Vec<String>, StoreError> {
        let what = "cannot list the event stream's consumers";
        let mut names = self.stream().await?.consumer_names();
        let mut out = Vec::new();
        while let Some(name) = names.next().await {
            out.push(name.map_err(|e| StoreError::jetstream(what, codes::code_in(&e), &e))?);
        }
        Ok(out)
    }
}

/// Where [`EventStore::follow`] starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FollowFrom {
    /// Events stored from now on.
    Now,
    /// Events after this stream sequence (a client resuming from the last
    /// one it saw).
    After(u64),
}

impl EventStore {
    /// Events matching `filter` (a subject such as `events.account.acc-1`
    /// or `events.account.>`) in stream order, as they are stored, through
    /// an ordered consumer of the server's own: nothing to acknowledge,
    /// nothing left behind when the stream is dropped, and the client
    /// recreates it from the last sequence seen after a disconnection. For
    /// live views (the gateway's Server-Sent Events).
    pub async fn follow(
        &self,
        filter: &str,
        from: FollowFrom,
    ) -> Result<
        impl futures::Stream<Item = Result<crate::envelope::RecordedEvent, StoreError>>,
        StoreError,
    > {
        use async_nats::jetstream::consumer::{pull::OrderedConfig, DeliverPolicy};
        let deliver_policy = match from {
            FollowFrom::Now => DeliverPolicy::New,
            FollowFrom::After(sequence) => DeliverPolicy::ByStartSequence {
                start_sequence: sequence + 1,
            },
        };
        let consumer = self
            .stream()
            .await?
            .create_consumer(OrderedConfig {
                filter_subject: filter.to_owned(),
                deliver_policy,
                ..Default::default()
            })
            .await
            .map_err(|e| consumer_error("cannot follow the event stream", e))?;
        let messages = consumer
            .messages()
            .await
            .map_err(|e| StoreError::unavailable("cannot follow the event stream", e))?;
        let store = self.clone();
        Ok(messages.then(move |message| {
            let store = store.clone();
            async move {
                let message = message
                    .map_err(|e| StoreError::unavailable("following the event stream", e))?;
                let info = message.info().map_err(|e| {
                    StoreError::new(
                        StoreErrorKind::Corrupt,
                        format!("event without metadata: {e}"),
                    )
                })?;
                let event = crate::envelope::RecordedEvent::from_parts(
                    message.subject.as_str(),
                    info.stream_sequence,
                    info.published,
                    message.headers.as_ref(),
                    message.payload.clone(),
                )
                .map_err(|e| StoreError::new(StoreErrorKind::Corrupt, e.to_string()))?;
                // Personal fields opened (or erased), as on every read.
                let mut event = [event];
                store.open_events(&mut event).await?;
                let [event] = event;
                Ok(event)
            }
        }))
    }
}

fn consumer_error(what: &str, e: ConsumerError) -> StoreError {
    match e.kind() {
        ConsumerErrorKind::JetStream(api) => {
            StoreError::jetstream(what, Some(api.error_code().0), &e)
        }
        ConsumerErrorKind::InvalidName | ConsumerErrorKind::InvalidConsumerType => {
            StoreError::new(StoreErrorKind::Rejected, format!("{what}: {e}"))
        }
        ConsumerErrorKind::TimedOut | ConsumerErrorKind::Request | ConsumerErrorKind::Other => {
            StoreError::jetstream(what, codes::code_in(&e), &e)
        }
    }
}
