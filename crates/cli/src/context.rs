//! What every command works with: the configuration, the application's
//! aggregates and projections, and connections opened when a command needs
//! them (after its arguments were checked).

use std::sync::Arc;

use jetsource_core::aggregate::{DynAggregate, Registry};
use jetsource_core::config::Config;
use jetsource_core::snapshot::SnapshotStore;
use jetsource_core::store::EventStore;
use jetsource_projector::projection::Projection;
use jetsource_projector::redis_store::RedisStore;

use crate::args::Cli;
use crate::exit::Failure;

/// The CLI waits at most this long for NATS when it starts.
const CONNECT_TIMEOUT_MS: u64 = 5000;

#[derive(Debug)]
pub struct Context {
    pub config: Config,
    pub registry: Registry,
    pub projections: Vec<Arc<dyn Projection>>,
}

impl Context {
    /// Loads the configuration (`--config`, environment) and applies
    /// `--url`, checking it before anything connects.
    pub fn load(
        cli: &Cli,
        registry: Registry,
        projections: impl FnOnce(&Config) -> Vec<Arc<dyn Projection>>,
    ) -> anyhow::Result<Self> {
        let mut config = Config::load(cli.config.as_deref())?;
        if let Some(url) = &cli.url {
            jetsource_core::config::check_nats_url(url)
                .map_err(|why| Failure::invalid(format!("--url: {why}")))?;
            config.nats.url.clone_from(url);
        }
        config.nats.connect_timeout_ms = config.nats.connect_timeout_ms.min(CONNECT_TIMEOUT_MS);
        Ok(Self {
            projections: projections(&config),
            registry,
            config,
        })
    }

    pub async fn client(&self) -> anyhow::Result<async_nats::Client> {
        Ok(jetsource_core::connect(&self.config.nats, "jetsource-cli").await?)
    }

    pub async fn store(&self) -> anyhow::Result<EventStore> {
        let client = self.client().await?;
        let store = EventStore::open(client.clone(), &self.config.nats, &self.config.store).await?;
        // The admin reads the key bucket itself.
        let privacy = jetsource_core::privacy::Privacy::from_bucket(&store, &self.config);
        privacy.start_listening(client);
        Ok(store.with_privacy(privacy))
    }

    pub async fn snapshots(&self, store: &EventStore) -> anyhow::Result<SnapshotStore> {
        Ok(SnapshotStore::open(
            store.jetstream(),
            &self.config.snapshot,
            self.config.store.replicas,
        )
        .await?)
    }

    pub async fn redis(&self) -> anyhow::Result<RedisStore> {
        // With the configured TLS files and query user, as the projector.
        let url = &self.config.redis.url;
        RedisStore::connect_with(&self.config.redis)
            .await
            .map_err(|e| {
                let hint = if e.is_connection_refusal() {
                    "; is redis-server running?"
                } else {
                    ""
                };
                Failure::new(
                    crate::exit::redis_code(&e),
                    format!("cannot reach Redis at {url}: {e}{hint}"),
                )
                .into()
            })
    }

    /// A registered aggregate type, or invalid input naming the known ones.
    pub fn aggregate(&self, aggregate_type: &str) -> Result<&Arc<dyn DynAggregate>, Failure> {
        crate::check_token("aggregate type", aggregate_type)?;
        self.registry.get(aggregate_type).ok_or_else(|| {
            Failure::invalid(format!(
                "unknown aggregate type {aggregate_type:?}; known types: {}",
                self.registry.types().collect::<Vec<_>>().join(", ")
            ))
        })
    }

    /// A registered aggregate type that takes commands (a process's
    /// instances take none), or invalid input naming those that do.
    pub fn command_target(&self, aggregate_type: &str) -> Result<(), Failure> {
        crate::check_token("aggregate type", aggregate_type)?;
        let processes: Vec<&str> = self
            .registry
            .processes()
            .map(|p| p.process_type())
            .collect();
        if processes.contains(&aggregate_type) {
            return Err(Failure::invalid(format!(
                "{aggregate_type} is a process: its instances take no commands (read them with `state` and `history`)"
            )));
        }
        if self.registry.get(aggregate_type).is_none() {
            let types: Vec<&str> = self
                .registry
                .types()
                .filter(|t| !processes.contains(t))
                .collect();
            return Err(Failure::invalid(format!(
                "unknown aggregate type {aggregate_type:?}; known types: {}",
                types.join(", ")
            )));
        }
        Ok(())
    }

    pub fn projection_names(&self) -> Vec<&'static str> {
        self.projections.iter().map(|p| p.name()).collect()
    }
}
