//! Configuration, layered, later layers winning: built-in defaults < file
//! (`--config` or `JETSOURCE_CONFIG`) < `NATS_URL` (the variable NATS tools
//! share; sets `nats.url` only) < `JETSOURCE__...` variables
//! (`JETSOURCE__NATS__URL` style: prefix `JETSOURCE`, `__` between levels).
//! Every binary loads through [`Config::load`], so the rule is the same for
//! all of them. `jetsource.example.toml` at the repository root documents
//! every key.

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
    pub http: HttpConfig,
    pub gateway: GatewayConfig,
    pub trace: TraceConfig,
    pub process: ProcessConfig,
    pub privacy: PrivacyConfig,
}

/// Crypto-shredding of personal data (docs/ARCHITECTURE.md).
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PrivacyConfig {
    /// Key-value bucket of the data subjects' keys (replicated like the
    /// event stream; only the command worker and admin may read it).
    pub key_bucket: String,
    /// How long a worker other than the command worker keeps a key it was
    /// given. A forget reaches workers at once; this bounds how long one
    /// that missed it (disconnected) could still open the subject's data.
    pub key_cache_secs: u64,
}

impl Default for PrivacyConfig {
    fn default() -> Self {
        Self {
            key_bucket: "JETSOURCE_KEYS".into(),
            key_cache_secs: 60,
        }
    }
}

/// The process worker (`<app>-process`): process managers.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ProcessConfig {
    /// Process instances driven at once by one worker.
    pub max_in_flight: usize,
    /// The stream holding deadlines (NATS message schedules; a stream of
    /// its own, since schedules need purges the event stream forbids).
    pub deadline_stream: String,
}

impl Default for ProcessConfig {
    fn default() -> Self {
        Self {
            max_in_flight: 64,
            deadline_stream: "DEADLINES".into(),
        }
    }
}

/// Distributed tracing (docs/TRACING.md): W3C trace context through NATS
/// headers and the stored events, exported over OTLP when configured.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TraceConfig {
    /// OTLP/HTTP (protobuf) traces endpoint, the full URL, e.g.
    /// `http://otel-collector:4318/v1/traces`; empty: tracing off.
    pub otlp_endpoint: String,
}

/// A secret from configuration (a password, a token, an nkey seed): kept
/// out of `Debug` output, so a logged configuration never shows it.
#[derive(Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The secret itself, for the one call that needs it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(..)")
    }
}

/// The worker's HTTP listener: `GET /healthz`, `GET /readyz`.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HttpConfig {
    /// `host:port` to listen on; empty turns the listener off. The default,
    /// an ephemeral loopback port (logged at start-up), lets several copies
    /// run on one host; give a fixed port where probes need one.
    pub listen: String,
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:0".into(),
        }
    }
}

/// The HTTP API gateway (`*-gateway`, docs/GATEWAY.md).
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GatewayConfig {
    /// `host:port` of the API (and of its `/healthz`, `/readyz`,
    /// `/metrics`).
    pub listen: String,
    /// API keys, as `role=<sha256 of the key, hex>` separated by commas;
    /// roles `read`, `write`, `admin`. Only hashes are configured, never
    /// the keys. None: every API request is refused (401).
    pub api_keys: Secret,
    /// Largest request body accepted (413 beyond).
    pub max_body_bytes: usize,
    /// Origins allowed to call the API from a browser (CORS), comma
    /// separated; empty: none (same-origin only, e.g. the console).
    pub cors_origins: String,
    /// How long a command or query may take before the gateway answers
    /// 504 (a query's own `timeout_ms` counts within it).
    pub request_timeout_ms: u64,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:8080".into(),
            api_keys: Secret::default(),
            max_body_bytes: 1 << 20,
            cors_origins: String::new(),
            request_timeout_ms: 30_000,
        }
    }
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
    /// Also snapshot an aggregate whose newest event lies more than this
    /// many stream sequences after its last snapshot (its first event when
    /// it has none); 0 turns it off. A load reads the stream from the
    /// snapshot on, and the server walks every block of the stream in that
    /// stretch, not only the aggregate's events: this bounds what a cold
    /// load of any aggregate costs, however thinly its events are spread
    /// (docs/ARCHITECTURE.md, "Snapshots").
    pub max_tail_sequences: u64,
}

/// About one 8 MB block of the event stream holds this many events of a
/// few hundred bytes: a cold load then walks one or two blocks.
pub const DEFAULT_MAX_TAIL_SEQUENCES: u64 = 25_000;

impl Default for SnapshotConfig {
    fn default() -> Self {
        Self {
            bucket: "SNAPSHOTS".into(),
            every: 100,
            every_by_type: Default::default(),
            slow_load_ms: 50,
            queue_group: "jetsource-snapshotter".into(),
            cache_size: 10_000,
            max_tail_sequences: DEFAULT_MAX_TAIL_SEQUENCES,
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
    /// `redis://[user:password@]host:port/db`, or `rediss://` for TLS. The
    /// projector writes through it (an ACL user allowed to write its keys).
    pub url: String,
    /// The same server as a user that may only read, for queries; empty:
    /// queries use `url`.
    pub query_url: Option<String>,
    /// CA certificate (PEM) that signs the server's certificate, for
    /// `rediss://`; default: the system's roots.
    pub tls_ca_file: Option<PathBuf>,
    /// Client certificate and key (PEM) for servers that verify clients.
    pub tls_cert_file: Option<PathBuf>,
    pub tls_key_file: Option<PathBuf>,
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
            query_url: None,
            tls_ca_file: None,
            tls_cert_file: None,
            tls_key_file: None,
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
    /// One or more comma-separated server URLs (`nats://`, or `tls://` to
    /// require TLS).
    pub url: String,
    /// Optional `.creds` file (JWT + nkey). At most one way to authenticate:
    /// `credentials`, `user` + `password`, `token` or `nkey_seed`.
    pub credentials: Option<PathBuf>,
    pub user: Option<String>,
    pub password: Option<Secret>,
    pub token: Option<Secret>,
    /// An nkey seed (`SU...`), e.g. from `JETSOURCE__NATS__NKEY_SEED`.
    pub nkey_seed: Option<Secret>,
    /// CA certificate (PEM) that signs the servers' certificates; setting it
    /// requires TLS.
    pub tls_ca_file: Option<PathBuf>,
    /// Client certificate and key (PEM) for servers that verify clients.
    pub tls_cert_file: Option<PathBuf>,
    pub tls_key_file: Option<PathBuf>,
    /// Subject prefix of this process's reply inboxes. Unset: `_INBOX.<user>`
    /// with `user`, else NATS's `_INBOX`. The shipped accounts let each role
    /// subscribe to its own `_INBOX.<role>.>` only, so one role cannot read
    /// replies meant for another (docs/SECURITY.md); set it when
    /// authenticating by nkey or creds file.
    pub inbox_prefix: Option<String>,
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
            user: None,
            password: None,
            token: None,
            nkey_seed: None,
            tls_ca_file: None,
            tls_cert_file: None,
            tls_key_file: None,
            inbox_prefix: None,
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

    /// The reply-inbox prefix in effect (see [`NatsConfig::inbox_prefix`]).
    pub fn inbox_prefix(&self) -> String {
        match (&self.inbox_prefix, &self.user) {
            (Some(prefix), _) => prefix.clone(),
            (None, Some(user)) => format!("_INBOX.{user}"),
            (None, None) => "_INBOX".to_owned(),
        }
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
    /// Commit concurrent appends together (group commit:
    /// docs/ARCHITECTURE.md). It pays where the server fsyncs every write
    /// (`sync_interval: always`, the durable setting `make run` and `make
    /// cluster` use): one batch is synced once. With the default interval a
    /// single node stages each batch on disk, which costs more than the
    /// plain appends it replaces: turn it off there.
    pub group_commit: bool,
    /// Appends a process keeps in flight one by one before it commits the
    /// ones waiting behind them together, as one atomic batch. Unset: 16. 0
    /// groups whatever arrives while the previous write is in flight (tests
    /// use it to force groups).
    pub group_commit_after: Option<usize>,
    /// Give every appended event a link in its aggregate's hash chain
    /// (`Jetsource-Hash`, see docs/ARCHITECTURE.md, "Tamper evidence").
    /// Off only to measure what it costs: events appended without it break
    /// the chain of every aggregate that had one.
    pub chain: bool,
    /// Ed25519 private key (PKCS#8 PEM) that signs every event's hash,
    /// named `<key id>.key`; the id goes into `Jetsource-Signing-Key`.
    /// Unset: events are not signed. `jetsource keygen` makes one.
    pub signing_key: Option<PathBuf>,
    /// Directory of trusted public keys, `<key id>.pub` (PEM) each:
    /// signatures are checked against them (the signing key's own public
    /// key is trusted too). Keep the old keys' files after a rotation.
    pub trusted_keys: Option<PathBuf>,
    /// Check the chain (and signatures, when keys are trusted) of every
    /// event folded into a loaded aggregate; a broken link fails the load.
    pub verify_on_load: bool,
    /// Every event must be signed by a trusted key. Without it, only events
    /// after a signed one must be, so history from before signing verifies,
    /// and so would one rewritten whole without signatures. Turn it on
    /// once every event is signed.
    pub require_signatures: bool,
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            stream: "EVENTS".into(),
            replicas: 1,
            duplicate_window_secs: 600,
            read_batch: 1000,
            group_commit: true,
            group_commit_after: None,
            chain: true,
            signing_key: None,
            trusted_keys: None,
            verify_on_load: true,
            require_signatures: false,
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

/// The environment variable NATS tools (the `nats` CLI, client libraries)
/// read the server URL from. It sets `nats.url`, above the file and below
/// [`JETSOURCE_NATS_URL_VAR`].
pub const NATS_URL_VAR: &str = "NATS_URL";

/// jetsource's own variable for `nats.url`: the explicit one, it wins over
/// [`NATS_URL_VAR`].
pub const JETSOURCE_NATS_URL_VAR: &str = "JETSOURCE__NATS__URL";

/// Prefix of the variables that set any key (`JETSOURCE__<SECTION>__<KEY>`).
const ENV_PREFIX: &str = "JETSOURCE";
const ENV_SEPARATOR: &str = "__";

/// `NATS_URL` as a configuration layer of its own (only `nats.url`), placed
/// between the file and the `JETSOURCE__` variables.
#[derive(Debug, Clone)]
struct NatsUrlVar(String);

impl config::Source for NatsUrlVar {
    fn clone_into_box(&self) -> Box<dyn config::Source + Send + Sync> {
        Box::new(self.clone())
    }

    fn collect(&self) -> Result<config::Map<String, config::Value>, config::ConfigError> {
        let origin = format!("environment variable {NATS_URL_VAR}");
        let mut map = config::Map::new();
        map.insert(
            "nats.url".to_owned(),
            config::Value::new(Some(&origin), self.0.clone()),
        );
        Ok(map)
    }
}

/// Checks a `nats.url` value: one or more comma-separated servers, each
/// `nats://`, `tls://`, `ws://` or `wss://` URL with a host, or a bare
/// `host:port`. A bare word (`garbage`, `localhost`) is refused: the client
/// would read it as a host name and only fail, later, to reach it.
pub fn check_nats_url(url: &str) -> Result<(), String> {
    let expected = "expected nats://host:port, tls://host:port or host:port \
                    (ws:// and wss:// too), several comma-separated";
    if url.trim().is_empty() {
        return Err(format!("it is empty; {expected}"));
    }
    for server in url.split(',').map(str::trim) {
        if server.is_empty() {
            return Err(format!("{url:?} has an empty entry; {expected}"));
        }
        if !server.contains("://") {
            let port_given = server
                .rsplit_once(':')
                .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok());
            if !port_given {
                return Err(format!("{server:?} is not a NATS server URL; {expected}"));
            }
        }
        let address: async_nats::ServerAddr = server
            .parse()
            .map_err(|e| format!("{server:?} is not a NATS server URL ({e}); {expected}"))?;
        if address.host().is_empty() {
            return Err(format!("{server:?} has no host; {expected}"));
        }
    }
    Ok(())
}

impl Config {
    /// Loads, each layer overriding the ones before it: the built-in
    /// defaults, then `file` (or `$JETSOURCE_CONFIG`), then `$NATS_URL`
    /// (for `nats.url`), then the `JETSOURCE__...` variables.
    pub fn load(file: Option<&Path>) -> Result<Self, ConfigError> {
        let mut env = config::Map::new();
        for (key, value) in std::env::vars_os() {
            // Skipped like the config crate skips them: a key that is not
            // Unicode cannot name one of ours.
            let Ok(key) = key.into_string() else { continue };
            match value.into_string() {
                Ok(value) => {
                    env.insert(key, value);
                }
                Err(_) if is_ours(&key) => {
                    return Err(ConfigError::Invalid(format!(
                        "environment variable {key} is not valid UTF-8"
                    )))
                }
                Err(_) => {}
            }
        }
        Self::load_with_env(file, env)
    }

    /// [`Config::load`] with `env` standing in for the process environment.
    fn load_with_env(
        file: Option<&Path>,
        env: config::Map<String, String>,
    ) -> Result<Self, ConfigError> {
        let file = file
            .map(Path::to_path_buf)
            .or_else(|| env.get("JETSOURCE_CONFIG").map(PathBuf::from));
        // An empty NATS_URL is unset, as for the NATS tools.
        let nats_url = env.get(NATS_URL_VAR).filter(|url| !url.is_empty()).cloned();
        // The config crate matches the prefix in any case; so does this, to
        // name the variable as the user spelled it.
        let jetsource_url_var = env
            .keys()
            .find(|k| k.eq_ignore_ascii_case(JETSOURCE_NATS_URL_VAR))
            .cloned();
        let mut builder = config::Config::builder();
        if let Some(file) = &file {
            builder = builder.add_source(config::File::from(file.as_path()).required(true));
        }
        if let Some(url) = &nats_url {
            builder = builder.add_source(NatsUrlVar(url.clone()));
        }
        let layered = builder
            .add_source(
                config::Environment::with_prefix(ENV_PREFIX)
                    .prefix_separator(ENV_SEPARATOR)
                    .separator(ENV_SEPARATOR)
                    .try_parsing(true)
                    .source(Some(env)),
            )
            .build()?;
        let config: Config = layered.try_deserialize()?;
        if let Err(why) = check_nats_url(&config.nats.url) {
            let origin = match (&jetsource_url_var, &nats_url, &file) {
                (Some(var), _, _) => format!("environment variable {var}"),
                (None, Some(_), _) => format!("environment variable {NATS_URL_VAR}"),
                (None, None, Some(file)) => format!("nats.url in {}", file.display()),
                (None, None, None) => "nats.url".to_owned(),
            };
            return Err(ConfigError::Invalid(format!("{origin}: {why}")));
        }
        config.validate()?;
        Ok(config)
    }

    /// Credentials and TLS settings that cannot work together are refused
    /// at load, not discovered at the first connection.
    fn validate_security(&self) -> Result<(), ConfigError> {
        let invalid = |m: &str| Err(ConfigError::Invalid(m.to_owned()));
        let n = &self.nats;
        let methods = [
            n.credentials.is_some(),
            n.user.is_some() || n.password.is_some(),
            n.token.is_some(),
            n.nkey_seed.is_some(),
        ];
        if methods.iter().filter(|m| **m).count() > 1 {
            return invalid(
                "nats: set one way to authenticate: credentials, user + password, token or nkey_seed",
            );
        }
        if n.user.is_some() != n.password.is_some() {
            return invalid("nats.user and nats.password go together");
        }
        if n.tls_cert_file.is_some() != n.tls_key_file.is_some() {
            return invalid("nats.tls_cert_file and nats.tls_key_file go together");
        }
        let prefix = n.inbox_prefix();
        if prefix.is_empty()
            || prefix
                .split('.')
                .any(|t| t.is_empty() || t == "*" || t == ">" || t.contains(char::is_whitespace))
        {
            return Err(ConfigError::Invalid(format!(
                "nats: inbox prefix {prefix:?} (from nats.inbox_prefix or nats.user) is not a \
                 subject: use dot-separated tokens without spaces or wildcards"
            )));
        }
        let r = &self.redis;
        if r.tls_cert_file.is_some() != r.tls_key_file.is_some() {
            return invalid("redis.tls_cert_file and redis.tls_key_file go together");
        }
        Ok(())
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
        self.validate_security()?;
        if !jetsource_aggregate::is_valid_token(&self.process.deadline_stream) {
            return invalid("process.deadline_stream must be 1..64 characters of [A-Za-z0-9_-]");
        }
        if self.process.max_in_flight == 0 {
            return invalid("process.max_in_flight must be at least 1");
        }
        if !jetsource_aggregate::is_valid_token(&self.projector.dead_letter_stream) {
            return invalid(
                "projector.dead_letter_stream must be 1..64 characters of [A-Za-z0-9_-]",
            );
        }
        Ok(())
    }
}

/// Whether an environment variable is one [`Config::load`] reads.
fn is_ours(key: &str) -> bool {
    key == NATS_URL_VAR
        || key == "JETSOURCE_CONFIG"
        || key
            .to_ascii_uppercase()
            .starts_with(&format!("{ENV_PREFIX}{ENV_SEPARATOR}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An environment of exactly these variables (tests never read or
    /// change the process's).
    fn env(vars: &[(&str, &str)]) -> config::Map<String, String> {
        vars.iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    fn file_with(text: &str) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("j.toml");
        std::fs::write(&path, text).expect("write");
        (dir, path)
    }

    #[test]
    fn credentials_come_from_the_environment_and_never_show_in_debug() {
        let config = Config::load_with_env(
            None,
            env(&[
                ("JETSOURCE__NATS__USER", "command"),
                ("JETSOURCE__NATS__PASSWORD", "s3cret-pw"),
                (
                    "JETSOURCE__REDIS__QUERY_URL",
                    "redis://reader:pw@127.0.0.1:6379/",
                ),
                ("JETSOURCE__HTTP__LISTEN", ""),
            ]),
        )
        .expect("load");
        assert_eq!(config.nats.user.as_deref(), Some("command"));
        assert_eq!(
            config.nats.password.as_ref().map(Secret::expose),
            Some("s3cret-pw")
        );
        assert_eq!(config.http.listen, "");
        let shown = format!("{config:?}");
        assert!(!shown.contains("s3cret-pw"), "{shown}");
        assert_eq!(HttpConfig::default().listen, "127.0.0.1:0");
    }

    #[test]
    fn security_settings_that_cannot_work_together_are_refused() {
        for (vars, says) in [
            (
                vec![("JETSOURCE__NATS__USER", "u")],
                "nats.user and nats.password go together",
            ),
            (
                vec![
                    ("JETSOURCE__NATS__TOKEN", "t"),
                    ("JETSOURCE__NATS__NKEY_SEED", "SUAB"),
                ],
                "one way to authenticate",
            ),
            (
                vec![("JETSOURCE__NATS__TLS_CERT_FILE", "/c.pem")],
                "nats.tls_cert_file and nats.tls_key_file",
            ),
            (
                vec![("JETSOURCE__REDIS__TLS_KEY_FILE", "/k.pem")],
                "redis.tls_cert_file and redis.tls_key_file",
            ),
        ] {
            let err = Config::load_with_env(None, env(&vars)).expect_err("refused");
            assert!(err.to_string().contains(says), "{vars:?}: {err}");
        }
    }

    #[test]
    fn defaults_file_then_environment() {
        let (_dir, path) = file_with(
            "[nats]\nurl = \"nats://file:1\"\n[store]\nreplicas = 3\n[command]\nmax_retries = 2\n",
        );
        let config =
            Config::load_with_env(Some(&path), env(&[("JETSOURCE__STORE__REPLICAS", "5")]))
                .expect("load");
        assert_eq!(config.nats.url, "nats://file:1", "file beats default");
        assert_eq!(config.store.replicas, 5, "environment beats file");
        assert_eq!(config.command.max_retries, 2);
        assert_eq!(config.store.stream, "EVENTS", "default kept");
    }

    #[test]
    fn the_file_can_come_from_jetsource_config() {
        let (_dir, path) = file_with("[command]\nmax_retries = 2\n");
        let path = path.to_str().expect("utf-8 path");
        let config = Config::load_with_env(None, env(&[("JETSOURCE_CONFIG", path)])).expect("load");
        assert_eq!(config.command.max_retries, 2);
    }

    #[test]
    fn nats_url_sits_between_the_file_and_jetsource_variables() {
        let (_dir, path) = file_with("[nats]\nurl = \"nats://file:1\"\n");
        let no_file = None;
        let load = |file: Option<&Path>, vars: &[(&str, &str)]| {
            Config::load_with_env(file, env(vars))
                .expect("load")
                .nats
                .url
        };
        assert_eq!(load(no_file, &[]), NatsConfig::default().url);
        assert_eq!(
            load(no_file, &[("NATS_URL", "nats://plain:2")]),
            "nats://plain:2",
            "NATS_URL beats the default"
        );
        assert_eq!(load(Some(&path), &[]), "nats://file:1");
        assert_eq!(
            load(Some(&path), &[("NATS_URL", "nats://plain:2")]),
            "nats://plain:2",
            "NATS_URL beats the file"
        );
        assert_eq!(
            load(
                Some(&path),
                &[
                    ("NATS_URL", "nats://plain:2"),
                    ("JETSOURCE__NATS__URL", "nats://ours:3")
                ]
            ),
            "nats://ours:3",
            "JETSOURCE__NATS__URL beats NATS_URL"
        );
        assert_eq!(
            load(Some(&path), &[("NATS_URL", "")]),
            "nats://file:1",
            "an empty NATS_URL is unset"
        );
        assert_eq!(
            load(
                no_file,
                &[("NATS_URL", "nats://a:4222, nats://b:4222,tls://c:4443")]
            ),
            "nats://a:4222, nats://b:4222,tls://c:4443",
            "a cluster list is one value"
        );
        // NATS_URL sets nats.url only; other NATS_ variables are not ours.
        let config = Config::load_with_env(
            None,
            env(&[("NATS_URL", "nats://plain:2"), ("NATS_CREDS", "/x.creds")]),
        )
        .expect("load");
        assert_eq!(config.nats.credentials, None);
    }

    #[test]
    fn a_bad_nats_url_is_refused_at_load_naming_where_it_came_from() {
        for (vars, named) in [
            (
                vec![("JETSOURCE__NATS__URL", "garbage")],
                "JETSOURCE__NATS__URL",
            ),
            (vec![("NATS_URL", "garbage")], "NATS_URL"),
            (
                vec![("NATS_URL", "nats://ok:4222"), ("JETSOURCE__NATS__URL", "")],
                "JETSOURCE__NATS__URL",
            ),
            (vec![("NATS_URL", "http://web:80")], "NATS_URL"),
        ] {
            let err = Config::load_with_env(None, env(&vars)).expect_err("refused");
            let text = err.to_string();
            assert!(matches!(err, ConfigError::Invalid(_)), "{text}");
            assert!(
                text.contains(&format!("environment variable {named}")),
                "{vars:?}: {text}"
            );
            assert!(
                text.contains("nats://host:port"),
                "says what is expected: {text}"
            );
        }
        let (_dir, path) = file_with("[nats]\nurl = \"localhost\"\n");
        let err = Config::load_with_env(Some(&path), env(&[])).expect_err("refused");
        assert!(err.to_string().contains("nats.url in "), "{err}");
    }

    #[test]
    fn nats_urls_accepted_and_refused() {
        for good in [
            "nats://127.0.0.1:4222",
            "nats://server",
            "tls://nats.example.com:4443",
            "ws://127.0.0.1:8080",
            "wss://nats.example.com",
            "nats://user:pass@127.0.0.1:4222",
            "127.0.0.1:4222",
            "localhost:4222",
            "[::1]:4222",
            "nats://[::1]:4222",
            "nats://a:4222,nats://b:4222, nats://c:4222",
        ] {
            assert_eq!(check_nats_url(good), Ok(()), "{good}");
        }
        for bad in [
            "",
            " ",
            "garbage",
            "localhost",
            "nats://",
            "nats://:4222",
            "http://127.0.0.1:4222",
            "127.0.0.1:notaport",
            "127.0.0.1:99999",
            ":4222",
            "nats://a:4222,",
            "nats://a:4222,,nats://b:4222",
            "nats://a:4222,garbage",
            "nats://a b:4222",
        ] {
            assert!(check_nats_url(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn unknown_keys_and_bad_values_are_errors() {
        let (_dir, path) = file_with("[nats]\nurll = \"x\"\n");
        let err = Config::load_with_env(Some(&path), env(&[])).expect_err("typo");
        assert!(err.to_string().contains("urll"), "{err}");
        std::fs::write(&path, "[store]\nstream = \"a.b\"\n").expect("write");
        let err = Config::load_with_env(Some(&path), env(&[])).expect_err("bad stream");
        assert!(err.to_string().contains("store.stream"), "{err}");
    }

    #[test]
    fn the_shipped_example_parses_to_the_defaults() {
        let example = concat!(env!("CARGO_MANIFEST_DIR"), "/../../jetsource.example.toml");
        let config = Config::load_with_env(Some(Path::new(example)), env(&[]))
            .expect("example config loads");
        assert_eq!(config.nats.url, NatsConfig::default().url);
        assert_eq!(config.store.stream, StoreConfig::default().stream);
        assert_eq!(
            config.command.cache_capacity,
            CommandConfig::default().cache_capacity
        );
        assert_eq!(
            config.process.deadline_stream,
            ProcessConfig::default().deadline_stream
        );
        assert_eq!(config.store.chain, StoreConfig::default().chain);
        assert_eq!(
            config.privacy.key_bucket,
            PrivacyConfig::default().key_bucket
        );
    }
}
