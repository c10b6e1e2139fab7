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
