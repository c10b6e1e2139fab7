//! Configuration, layered: built-in defaults < file (`--config` or
//! `JETSOURCE_CONFIG`) < environment (`JETSOURCE__NATS__URL` style: prefix
//! `JETSOURCE`, `__` between levels). `jetsource.example.toml` at the
//! repository root documents every key.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// Everything any jetsource process reads. Each process looks only at the
/// sections it needs, so one file can serve the whole fleet.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub nats: NatsConfig,
    pub store: StoreConfig,
    pub command: CommandConfig,
    pub redis: RedisConfig,
    pub projector: ProjectorConfig,
    pub snapshot: SnapshotConfig,
    pub log: LogConfig,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SnapshotConfig {
    /// JetStream key-value bucket holding the latest snapshot per aggregate,
    /// replicated like the event stream (`store.replicas`).
    pub bucket: String,
    /// Take a snapshot every this many events of an aggregate.
    pub every: u64,
    /// Per aggregate type overrides of `every`, e.g. `{ account = 50 }`.
    pub every_by_type: std::collections::BTreeMap<String, u64>,
    /// Also snapshot an aggregate whose loading took longer than this (the
    /// command worker asks the snapshotter); 0 turns it off.
    pub slow_load_ms: u64,
    /// Queue group of the snapshotter's request endpoint.
    pub queue_group: String,
    /// Aggregates whose state the snapshotter keeps in memory while their
    /// events go by (least recently used beyond that are dropped and
    /// reloaded when next needed).
    pub cache_size: usize,
}

impl Default for SnapshotConfig {
    fn default() -> Self {
        Self {
            bucket: "SNAPSHOTS".into(),
            every: 100,
            every_by_type: Default::default(),
            slow_load_ms: 50,
            queue_group: "jetsource-snapshotter".into(),
            cache_size: 10_000,
        }
    }
}

impl SnapshotConfig {
    /// The snapshot interval of `aggregate_type`.
    pub fn every(&self, aggregate_type: &str) -> u64 {
        self.every_by_type
            .get(aggregate_type)
            .copied()
            .unwrap_or(self.every)
            .max(1)
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RedisConfig {
    /// `redis://host:port/db`.
    pub url: String,
    /// Longest a read (queries, metadata, watermarks) may take, connecting
    /// included. A connection on which a call timed out is replaced.
    pub timeout_ms: u64,
    /// Longest one batch of writes (up to `projector.batch_size` events in
    /// one round trip) may take. Batches have a connection of their own, so
    /// reads never wait behind them.
    pub write_timeout_ms: u64,
}

impl Default for RedisConfig {
    fn default() -> Self {
        Self {
            url: "redis://127.0.0.1:6379/".into(),
            timeout_ms: 2_000,
            write_timeout_ms: 10_000,
        }
    }
}

impl RedisConfig {
    pub fn timeout(&self) -> Duration {
        Duration::from_millis(self.timeout_ms)
    }

    pub fn write_timeout(&self) -> Duration {
        Duration::from_millis(self.write_timeout_ms)
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ProjectorConfig {
    /// Queue group of the query endpoints shared by all projector copies.
    pub queue_group: String,
    /// Redis partitions (hash tags) per read model. Fixed per generation;
    /// a rebuild picks up a new value.
    pub partitions: u32,
    /// Most events applied in one Redis round trip.
    pub batch_size: usize,
    /// How long the active copy may stop pulling before a standby takes
    /// over its projections.
    pub failover_ms: u64,
    /// Attempts to project an event before it goes to the dead-letter stream.
    pub max_attempts: u32,
    /// JetStream stream of dead-lettered events (subjects `deadletter.>`).
    pub dead_letter_stream: String,
    /// Entries kept in each account's recent-transactions list.
    pub recent_transactions: usize,
    /// Longest a query may wait for `min_sequence`.
    pub max_wait_ms: u64,
}

impl ProjectorConfig {
    pub fn failover(&self) -> Duration {
        Duration::from_millis(self.failover_ms)
    }

    pub fn max_wait(&self) -> Duration {
        Duration::from_millis(self.max_wait_ms)
    }
}

impl Default for ProjectorConfig {
    fn default() -> Self {
        Self {
            queue_group: "jetsource-projector".into(),
            partitions: 16,
            batch_size: 1_000,
            failover_ms: 5_000,
            max_attempts: 3,
            dead_letter_stream: "DEADLETTERS".into(),
            recent_transactions: 20,
            max_wait_ms: 30_000,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NatsConfig {
    /// One or more comma-separated server URLs.
    pub url: String,
    /// Optional `.creds` file (JWT + nkey).
    pub credentials: Option<PathBuf>,
    /// Bound on each NATS request (JetStream API calls, acks, direct gets).
    pub request_timeout_ms: u64,
    /// How long start-up waits for the first connection.
    pub connect_timeout_ms: u64,
}

impl Default for NatsConfig {
    fn default() -> Self {
        Self {
            url: "nats://127.0.0.1:4222".into(),
            credentials: None,
            request_timeout_ms: 5_000,
            connect_timeout_ms: 10_000,
        }
    }
}

impl NatsConfig {
    pub fn request_timeout(&self) -> Duration {
        Duration::from_millis(self.request_timeout_ms.max(1))
    }

    pub fn connect_timeout(&self) -> Duration {
        Duration::from_millis(self.connect_timeout_ms.max(1))
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StoreConfig {
    /// JetStream stream holding every event, subjects `events.>`.
    pub stream: String,
    /// 1 on a single node, 3 in a cluster.
    pub replicas: usize,
    /// How long `Nats-Msg-Id` deduplication remembers a command id.
    pub duplicate_window_secs: u64,
    /// Events fetched per direct-get batch when loading an aggregate.
    pub read_batch: usize,
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            stream: "EVENTS".into(),
            replicas: 1,
            duplicate_window_secs: 600,
            read_batch: 1000,
        }
    }
}

impl StoreConfig {
    pub fn duplicate_window(&self) -> Duration {
        Duration::from_secs(self.duplicate_window_secs)
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CommandConfig {
    /// Queue group shared by every copy of `jetsource-command`.
    pub queue_group: String,
    /// Aggregates kept in memory (least recently used are dropped).
    pub cache_capacity: usize,
    /// Times a command is decided again after a store conflict before the
    /// worker answers `conflict`.
    pub max_retries: u32,
    /// Requests handled at once by one worker; more wait in NATS.
    pub max_in_flight: usize,
    /// Largest request body accepted, in bytes.
    pub max_request_bytes: usize,
}

impl Default for CommandConfig {
    fn default() -> Self {
        Self {
            queue_group: "jetsource-command".into(),
            cache_capacity: 10_000,
            max_retries: 8,
            max_in_flight: 1024,
            max_request_bytes: 64 * 1024,
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line, for log shippers.
    Json,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    pub format: LogFormat,
    /// Default filter when `RUST_LOG` is not set.
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            format: LogFormat::Text,
            level: "info".into(),
        }
    }
}

/// Configuration could not be read or does not make sense.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot load configuration: {0}")]
    Load(#[from] config::ConfigError),
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

impl Config {
    /// Loads defaults, then `file` (or `$JETSOURCE_CONFIG`), then the
    /// environment.
    pub fn load(file: Option<&Path>) -> Result<Self, ConfigError> {
        let env_file = std::env::var_os("JETSOURCE_CONFIG").map(PathBuf::from);
        let file = file.map(Path::to_path_buf).or(env_file);
        let mut builder = config::Config::builder();
        if let Some(file) = &file {
            builder = builder.add_source(config::File::from(file.as_path()).required(true));
        }
        let layered = builder
            .add_source(
                config::Environment::with_prefix("JETSOURCE")
                    .prefix_separator("__")
                    .separator("__")
                    .try_parsing(true),
            )
            .build()?;
        let config: Config = layered.try_deserialize()?;
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |m: &str| Err(ConfigError::Invalid(m.to_owned()));
        if !jetsource_aggregate::is_valid_token(&self.store.stream) {
            return invalid("store.stream must be 1..64 characters of [A-Za-z0-9_-]");
        }
        if !(1..=5).contains(&self.store.replicas) {
            return invalid("store.replicas must be between 1 and 5");
        }
        if self.store.read_batch == 0 || self.store.read_batch > 10_000 {
            return invalid("store.read_batch must be between 1 and 10000");
        }
        if self.command.cache_capacity == 0 {
            return invalid("command.cache_capacity must be at least 1");
        }
        if self.command.max_in_flight == 0 {
            return invalid("command.max_in_flight must be at least 1");
        }
        if self.command.max_request_bytes < 256 {
            return invalid("command.max_request_bytes must be at least 256");
        }
        if !(1..=1024).contains(&self.projector.partitions) {
            return invalid("projector.partitions must be between 1 and 1024");
        }
        if self.projector.batch_size == 0 || self.projector.batch_size > 10_000 {
            return invalid("projector.batch_size must be between 1 and 10000");
        }
        if self.projector.max_attempts == 0 {
            return invalid("projector.max_attempts must be at least 1");
        }
        if self.projector.failover_ms < 1_000 {
            return invalid("projector.failover_ms must be at least 1000");
        }
        if self.redis.timeout_ms == 0 || self.redis.write_timeout_ms == 0 {
            return invalid("redis.timeout_ms and redis.write_timeout_ms must be at least 1");
        }
        if self.snapshot.cache_size == 0 {
            return invalid("snapshot.cache_size must be at least 1");
        }
        if self.snapshot.every == 0 || self.snapshot.every_by_type.values().any(|&n| n == 0) {
            return invalid("snapshot.every (and every_by_type) must be at least 1");
        }
        if !jetsource_aggregate::is_valid_token(&self.snapshot.bucket) {
            return invalid("snapshot.bucket must be 1..64 characters of [A-Za-z0-9_-]");
        }
        if !jetsource_aggregate::is_valid_token(&self.projector.dead_letter_stream) {
            return invalid(
                "projector.dead_letter_stream must be 1..64 characters of [A-Za-z0-9_-]",
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_file_then_environment() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("j.toml");
        std::fs::write(
            &path,
            "[nats]\nurl = \"nats://file:1\"\n[store]\nreplicas = 3\n[command]\nmax_retries = 2\n",
        )
        .expect("write");
        // Only this test touches these variables.
        std::env::set_var("JETSOURCE__STORE__REPLICAS", "5");
        let config = Config::load(Some(&path)).expect("load");
        std::env::remove_var("JETSOURCE__STORE__REPLICAS");
        assert_eq!(config.nats.url, "nats://file:1", "file beats default");
        assert_eq!(config.store.replicas, 5, "environment beats file");
        assert_eq!(config.command.max_retries, 2);
        assert_eq!(config.store.stream, "EVENTS", "default kept");
    }

    #[test]
    fn unknown_keys_and_bad_values_are_errors() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("j.toml");
        std::fs::write(&path, "[nats]\nurll = \"x\"\n").expect("write");
        let err = Config::load(Some(&path)).expect_err("typo");
        assert!(err.to_string().contains("urll"), "{err}");
        std::fs::write(&path, "[store]\nstream = \"a.b\"\n").expect("write");
        let err = Config::load(Some(&path)).expect_err("bad stream");
        assert!(err.to_string().contains("store.stream"), "{err}");
    }

    #[test]
    fn the_shipped_example_parses_to_the_defaults() {
        let example = concat!(env!("CARGO_MANIFEST_DIR"), "/../../jetsource.example.toml");
        let config = Config::load(Some(Path::new(example))).expect("example config loads");
        assert_eq!(config.nats.url, NatsConfig::default().url);
        assert_eq!(config.store.stream, StoreConfig::default().stream);
        assert_eq!(
            config.command.cache_capacity,
            CommandConfig::default().cache_capacity
        );
    }
}
