//! Shared set-up for worker tests: a real nats-server and in-process workers.

#![allow(dead_code, clippy::unwrap_used)]

use jetsource_core::config::{Config, NatsConfig};
use jetsource_core::protocol::{CommandOutcome, ErrorBody};
use jetsource_test_support::{NatsServer, Sync};
use serde_json::Value;
use tokio::sync::watch;

pub struct Fleet {
    pub server: NatsServer,
    pub client: async_nats::Client,
    stop: watch::Sender<bool>,
    workers: Vec<tokio::task::JoinHandle<Result<(), jetsource_command::RunError>>>,
}

pub fn config(server: &NatsServer) -> Config {
    let mut config = Config {
        nats: NatsConfig {
            url: server.url(),
            ..Default::default()
        },
        ..Default::default()
    };
    config.command.max_request_bytes = 4096;
    config
}

impl Fleet {
    /// A server and `workers` in-process copies of the command worker, each
    /// with its own NATS connection, ready to serve.
    pub async fn start(workers: usize) -> Self {
        Self::start_with(workers, Sync::Default).await
    }

    pub async fn start_with(workers: usize, sync: Sync) -> Self {
        let server = NatsServer::start_with(sync);
        let client = server.client().await;
        let (stop, _) = watch::channel(false);
        let mut fleet = Self {
            server,
            client,
            stop,
            workers: Vec::new(),
        };
        for _ in 0..workers {
            fleet.add_worker(config(&fleet.server));
        }
        fleet.wait_for_workers(workers).await;
        fleet
    }

    pub fn add_worker(&mut self, config: Config) {
        let mut stop = self.stop.subscribe();
        self.workers.push(tokio::spawn(jetsource_command::run(
            config,
            jetsource_bank::registry(),
            async move {
                let _ = stop.wait_for(|s| *s).await;
            },
        )));
    }

    pub async fn wait_for_workers(&self, n: usize) {
        jetsource_test_support::wait_for_service(&self.client, "jetsource-command", n).await;
    }

    pub async fn shutdown(mut self) {
        self.stop.send_replace(true);
        for worker in self.workers.drain(..) {
            worker.await.unwrap().unwrap();
        }
    }

    pub async fn raw(&self, subject: &str, body: impl Into<bytes::Bytes>) -> Value {
        let reply = self
            .client
            .request(subject.to_owned(), body.into())
            .await
            .unwrap();
        serde_json::from_slice(&reply.payload).unwrap()
    }

    pub async fn send(
        &self,
        aggregate_type: &str,
        id: &str,
        body: Value,
    ) -> Result<CommandOutcome, ErrorBody> {
        jetsource_test_support::requests::send(&self.client, aggregate_type, id, body).await
    }

    /// The event store, as a worker opens it.
    pub async fn store(&self) -> jetsource_core::store::EventStore {
        jetsource_core::store::EventStore::open(
            self.client.clone(),
            &config(&self.server).nats,
            &Default::default(),
        )
        .await
        .unwrap()
    }

    pub async fn stream_messages(&self) -> u64 {
        let js = async_nats::jetstream::new(self.client.clone());
        let mut stream = js.get_stream("EVENTS").await.unwrap();
        stream.info().await.unwrap().state.messages
    }
}
