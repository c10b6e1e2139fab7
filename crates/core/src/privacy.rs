//! Crypto-shredding: personal fields stored encrypted with their data
//! subject's key, and erased everywhere by destroying that key.
//!
//! Writing (the command worker): the fields an aggregate marks
//! ([`jetsource_aggregate::personal`]) are each replaced by
//! `"jetsource-sealed:v1:<base64 nonce|ciphertext>"`, AES-256-GCM of the
//! field's JSON with the subject's key, bound (as associated data) to the
//! aggregate, the subject and the field. The event says whose and which in
//! `Jetsource-Data-Subject` and `Jetsource-Sealed` (comma-separated JSON
//! pointers). The hash chain covers the stored, encrypted bytes, so
//! forgetting never breaks verification.
//!
//! Reading (every read path, through the event store): sealed fields are
//! opened with the subject's key; once the subject is forgotten (or the
//! field cannot be opened) they read as `null` and the event lists them
//! in `erased`. Never ciphertext, never an error.
//!
//! Keys live in the key bucket ([`crate::store::keys`]), readable by the
//! command worker and the admin role only. Other workers (projector,
//! snapshotter, gateway, process) ask a command worker for a subject's key
//! on [`KEY_SUBJECT`] and keep it at most `privacy.key_cache_secs`.
//! `jetsource forget` publishes [`FORGOTTEN_SUBJECT`] so every worker drops
//! it at once and clears what it holds in memory.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use base64::Engine as _;
use bytes::Bytes;
use futures::StreamExt;
use jetsource_aggregate::personal::{PersonalData, Sealing};
use jetsource_aggregate::NewEvent;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::envelope::RecordedEvent;
use crate::store::keys::{KeyBucket, Stored};
use crate::store::{StoreError, StoreErrorKind};

/// Header: whose personal data the event holds.
pub const DATA_SUBJECT: &str = "Jetsource-Data-Subject";
/// Header: the sealed fields, JSON pointers separated by commas.
pub const SEALED: &str = "Jetsource-Sealed";
/// Request-reply: a command worker answers with a subject's key.
pub const KEY_SUBJECT: &str = "jetsource.privacy.key";
/// Published by `jetsource forget` with the subject as body.
pub const FORGOTTEN_SUBJECT: &str = "jetsource.privacy.forgotten";

const SEALED_PREFIX: &str = "jetsource-sealed:v1:";
/// The shortest a fetched key is kept (`privacy.key_cache_secs` below it is
/// raised to it).
const MIN_KEY_CACHE: Duration = Duration::from_secs(1);
const NONCE_LEN: usize = 12;
const KEY_LEN: usize = 32;

/// Why personal data could not be sealed or keys not be had.
#[derive(Debug, Clone, thiserror::Error)]
pub enum PrivacyError {
    /// The subject was forgotten: its personal data is never stored again.
    #[error("data subject {0} was forgotten (jetsource forget): its personal data cannot be stored again")]
    Forgotten(String),
    #[error("data subject {0:?} is not valid: use 1 to 64 characters of A-Z a-z 0-9 _ -")]
    InvalidSubject(String),
    #[error("{0}")]
    Data(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl PrivacyError {
    pub fn class(&self) -> crate::ErrorClass {
        match self {
            PrivacyError::Store(e) => e.class(),
            _ => crate::ErrorClass::Permanent,
        }
    }
}

/// A subject's key as a worker knows it.
#[derive(Clone, PartialEq, Eq)]
enum Known {
    Key([u8; KEY_LEN]),
    /// Forgotten: nothing sealed for it can be opened, ever.
    Gone,
    /// No key (yet): nothing sealed for it can be opened now. Kept only
    /// as long as a key would be: it may be made later.
    Absent,
}

impl std::fmt::Debug for Known {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Known::Key(_) => f.write_str("Key(..)"),
            Known::Gone => f.write_str("Gone"),
            Known::Absent => f.write_str("Absent"),
        }
    }
}

/// Where a worker gets keys.
#[derive(Debug, Clone)]
pub enum KeySource {
    /// The key bucket itself (command worker, admin).
    Bucket(KeyBucket),
    /// A command worker, asked on [`KEY_SUBJECT`].
    Service {
        client: async_nats::Client,
        timeout: Duration,
    },
    /// No access: sealed fields cannot be read (a load fails).
    None,
}

/// The answer on [`KEY_SUBJECT`].
#[derive(Debug, Serialize, Deserialize)]
struct KeyReply {
    /// `active`, `forgotten` or `absent`.
    state: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    key: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

/// Keys and what to do with them, shared by a worker's tasks.
#[derive(Debug)]
pub struct Privacy {
    source: KeySource,
    ttl: Duration,
    cache: Mutex<HashMap<String, (Known, Instant)>>,
    /// Counts subjects forgotten while this process ran: workers compare it
    /// to drop state they built from plaintext.
    epoch: AtomicU64,
}

/// A subject name: a token, as it names a key-value key and a header.
pub fn check_subject(subject: &str) -> Result<(), PrivacyError> {
    if jetsource_aggregate::is_valid_token(subject) {
        Ok(())
    } else {
        Err(PrivacyError::InvalidSubject(subject.to_owned()))
    }
}

fn aad(aggregate: &str, subject: &str, pointer: &str) -> Vec<u8> {
    format!("{aggregate}\n{subject}\n{pointer}").into_bytes()
}

fn random<const N: usize>() -> [u8; N] {
    let mut bytes = [0u8; N];
    getrandom::getrandom(&mut bytes).expect("the operating system's random source");
    bytes
}

impl Privacy {
    pub fn new(source: KeySource, ttl: Duration) -> Arc<Self> {
        Arc::new(Self {
            source,
            // A key must outlive the read that fetched it.
            ttl: ttl.max(MIN_KEY_CACHE),
            cache: Mutex::new(HashMap::new()),
            epoch: AtomicU64::new(0),
        })
    }

    /// Keys straight from the key bucket: the command worker, and the
    /// admin's CLI. Cached `privacy.key_cache_secs` at most (a forget
    /// notification drops them at once).
    pub fn from_bucket(
        store: &crate::store::EventStore,
        config: &crate::config::Config,
    ) -> Arc<Self> {
        let bucket = KeyBucket::new(
            store.jetstream().clone(),
            &config.privacy.key_bucket,
            config.store.replicas,
        );
        Self::new(
            KeySource::Bucket(bucket),
            Duration::from_secs(config.privacy.key_cache_secs),
        )
    }

    /// Keys from a command worker: the projector, snapshotter, gateway and
    /// process worker. Kept `privacy.key_cache_secs` at most.
    pub fn from_service(client: async_nats::Client, config: &crate::config::Config) -> Arc<Self> {
        Self::new(
            KeySource::Service {
                client,
                timeout: config.nats.request_timeout(),
            },
            Duration::from_secs(config.privacy.key_cache_secs),
        )
    }

    /// Listens for forgotten subjects in a task of its own, for as long as
    /// `client` lives.
    pub fn start_listening(self: &Arc<Self>, client: async_nats::Client) {
        let privacy = self.clone();
        tokio::spawn(async move {
            if let Err(e) = privacy.listen(client).await {
                tracing::warn!(error = %e, "cannot listen for forgotten data subjects");
            }
        });
    }

    /// No key access at all (tools and tests that never meet personal
    /// data).
    pub fn none() -> Arc<Self> {
        Self::new(KeySource::None, Duration::ZERO)
    }

    pub fn source(&self) -> &KeySource {
        &self.source
    }

    /// Changes each time a subject is forgotten.
    pub fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Relaxed)
    }

    /// Takes note that `subject` was forgotten: its key is dropped at once.
    pub fn forgotten(&self, subject: &str) {
        if let Ok(mut cache) = self.cache.lock() {
            cache.insert(subject.to_owned(), (Known::Gone, Instant::now()));
        }
        self.epoch.fetch_add(1, Ordering::Relaxed);
    }

    fn cached(&self, subject: &str) -> Option<Known> {
        let cache = self.cache.lock().ok()?;
        let (known, at) = cache.get(subject)?;
        // A forgotten subject stays forgotten; keys are asked for again.
        (*known == Known::Gone || at.elapsed() < self.ttl).then(|| known.clone())
    }

    /// Caches what a source said, unless the subject is known forgotten
    /// already (an answer that left the source before a forget must not
    /// bring its key back); returns what is cached now.
    fn remember(&self, subject: &str, known: Known) -> Known {
        let Ok(mut cache) = self.cache.lock() else {
            return known;
        };
        if let Some((Known::Gone, _)) = cache.get(subject) {
            return Known::Gone;
        }
        cache.insert(subject.to_owned(), (known.clone(), Instant::now()));
        known
    }

    /// The key of `subject` for reading, from the cache or the source.
    async fn key(&self, subject: &str) -> Result<Known, PrivacyError> {
        if let Some(known) = self.cached(subject) {
            return Ok(known);
        }
        let known = match &self.source {
            KeySource::Bucket(bucket) => known(bucket.read(subject).await?),
            KeySource::Service { client, timeout } => ask(client, *timeout, subject).await?,
            KeySource::None => {
                return Err(StoreError::new(
                    StoreErrorKind::Misconfigured,
                    "this process has no access to data keys and cannot read personal data",
                )
                .into())
            }
        };
        Ok(self.remember(subject, known))
    }

    async fn key_uncached(&self, subject: &str) -> Result<Known, PrivacyError> {
        match &self.source {
            KeySource::Bucket(bucket) => Ok(known(bucket.read(subject).await?)),
            _ => self.key(subject).await,
        }
    }

    /// Erases `subject`'s key for good (see [`KeyBucket::forget`]) and tells
    /// every worker to drop it. Only with the bucket (the admin).
    pub async fn forget(
        &self,
        client: &async_nats::Client,
        subject: &str,
    ) -> Result<(), PrivacyError> {
        check_subject(subject)?;
        let KeySource::Bucket(bucket) = &self.source else {
            return Err(StoreError::new(
                StoreErrorKind::Misconfigured,
                "forgetting needs the key bucket (the admin role)",
            )
            .into());
        };
        bucket.forget(subject).await?;
        self.forgotten(subject);
        client
            .publish(FORGOTTEN_SUBJECT, subject.to_owned().into())
            .await
            .map_err(|e| StoreError::new(StoreErrorKind::Unavailable, e.to_string()))?;
        client
            .flush()
            .await
            .map_err(|e| StoreError::new(StoreErrorKind::Unavailable, e.to_string()))?;
        Ok(())
    }

    /// Whether `subject` is forgotten, as the source says now.
    pub async fn is_gone(&self, subject: &str) -> Result<bool, PrivacyError> {
        Ok(self.key(subject).await? == Known::Gone)
    }

    /// The key of `subject` for writing: made when there is none yet;
    /// refused once the subject is forgotten. Only with the bucket.
    async fn key_for_writing(&self, subject: &str) -> Result<[u8; KEY_LEN], PrivacyError> {
        check_subject(subject)?;
        let KeySource::Bucket(bucket) = &self.source else {
            return Err(StoreError::new(
                StoreErrorKind::Misconfigured,
                "only a command worker stores personal data",
            )
            .into());
        };
        if let Some(Known::Key(key)) = self.cached(subject) {
            return Ok(key);
        }
        let stored = match bucket.read(subject).await? {
            Stored::Absent => {
                bucket
                    .create(subject, Bytes::copy_from_slice(&random::<KEY_LEN>()))
                    .await?
            }
            other => other,
        };
        match self.remember(subject, known(stored)) {
            Known::Key(key) => Ok(key),
            Known::Gone => Err(PrivacyError::Forgotten(subject.to_owned())),
            Known::Absent => Err(StoreError::new(
                StoreErrorKind::Unavailable,
                format!("the key of data subject {subject} was made but cannot be read yet; retry"),
            )
            .into()),
        }
    }

    /// Seals the personal fields of `event` (of aggregate
    /// `<aggregate_type>.<aggregate_id>`) that `rule` marks.
    pub async fn seal(
        &self,
        aggregate_type: &str,
        aggregate_id: &str,
        event: &mut NewEvent,
        rule: &PersonalData,
    ) -> Result<(), PrivacyError> {
        let mut data: Value = serde_json::from_slice(&event.data)
            .map_err(|e| PrivacyError::Data(format!("event data is not JSON: {e}")))?;
        let Some(Sealing { subject, fields }) =
            rule.sealing(aggregate_id, &data).map_err(|at| {
                PrivacyError::Data(format!("personal data without a data subject: {at}"))
            })?
        else {
            return Ok(());
        };
        let key = self.key_for_writing(&subject).await?;
        let cipher = Aes256Gcm::new_from_slice(&key).expect("a 32-byte key");
        let aggregate = format!("{aggregate_type}.{aggregate_id}");
        for pointer in &fields {
            let Some(value) = data.pointer_mut(pointer) else {
                continue;
            };
            let plain = serde_json::to_vec(value).expect("JSON serializes");
            let nonce = random::<NONCE_LEN>();
            let sealed = cipher
                .encrypt(
                    Nonce::from_slice(&nonce),
                    Payload {
                        msg: &plain,
                        aad: &aad(&aggregate, &subject, pointer),
                    },
                )
                .map_err(|e| PrivacyError::Data(format!("cannot encrypt {pointer}: {e}")))?;
            let text =
                base64::engine::general_purpose::STANDARD.encode([&nonce[..], &sealed].concat());
            *value = Value::String(format!("{SEALED_PREFIX}{text}"));
        }
        event.data = serde_json::to_vec(&data).expect("JSON serializes");
        event.sealed = Some(Sealing { subject, fields });
        Ok(())
    }

    /// Opens the sealed fields of `event` with a key this process holds;
    /// `Err(subject)` when the key must be fetched first.
    pub fn open_cached(&self, event: &mut RecordedEvent) -> Result<(), String> {
        let Some(subject) = event.data_subject.clone() else {
            return Ok(());
        };
        if event.stored_data.is_some() {
            return Ok(());
        }
        if check_subject(&subject).is_err() {
            // No key can exist for it: nothing to ask anyone.
            open_with(event, &subject, &Known::Absent);
            return Ok(());
        }
        match self.cached(&subject) {
            Some(known) => {
                open_with(event, &subject, &known);
                Ok(())
            }
            None => Err(subject),
        }
    }

    /// Opens the sealed fields of every event, fetching keys as needed.
    pub async fn open(&self, events: &mut [RecordedEvent]) -> Result<(), PrivacyError> {
        for event in events {
            if let Err(subject) = self.open_cached(event) {
                self.key(&subject).await?;
                if let Err(subject) = self.open_cached(event) {
                    // Fetched, then dropped by a forget meanwhile: gone.
                    open_with(event, &subject, &Known::Gone);
                }
            }
        }
        Ok(())
    }

    /// Fetches the key of `subject` into the cache.
    pub async fn fetch(&self, subject: &str) -> Result<(), PrivacyError> {
        self.key(subject).await.map(|_| ())
    }

    /// Drops keys on [`FORGOTTEN_SUBJECT`] until the subscription ends.
    pub async fn listen(self: Arc<Self>, client: async_nats::Client) -> Result<(), StoreError> {
        let mut forgotten = client
            .subscribe(FORGOTTEN_SUBJECT)
            .await
            .map_err(|e| StoreError::new(StoreErrorKind::Unavailable, e.to_string()))?;
        while let Some(message) = forgotten.next().await {
            let subject = String::from_utf8_lossy(&message.payload).into_owned();
            tracing::info!(%subject, "data subject forgotten: its key is dropped");
            self.forgotten(&subject);
        }
        Ok(())
    }

    /// Answers [`KEY_SUBJECT`] from the key bucket (command workers, one
    /// queue group) until the subscription ends.
    pub async fn serve(
        self: Arc<Self>,
        client: async_nats::Client,
        queue_group: String,
    ) -> Result<(), StoreError> {
        let mut requests = client
            .queue_subscribe(KEY_SUBJECT, queue_group)
            .await
            .map_err(|e| StoreError::new(StoreErrorKind::Unavailable, e.to_string()))?;
        while let Some(request) = requests.next().await {
            let Some(reply) = request.reply else { continue };
            let subject = String::from_utf8_lossy(&request.payload).into_owned();
            let answer = match check_subject(&subject) {
                Err(e) => KeyReply {
                    state: "invalid".into(),
                    key: None,
                    error: Some(e.to_string()),
                },
                // Fresh from the bucket, never from this worker's cache:
                // the asker keeps it for its own while.
                Ok(()) => match self.key_uncached(&subject).await {
                    Ok(Known::Key(key)) => KeyReply {
                        state: "active".into(),
                        key: Some(base64::engine::general_purpose::STANDARD.encode(key)),
                        error: None,
                    },
                    Ok(Known::Gone) => KeyReply {
                        state: "gone".into(),
                        key: None,
                        error: None,
                    },
                    Ok(Known::Absent) => KeyReply {
                        state: "absent".into(),
                        key: None,
                        error: None,
                    },
                    Err(e) => KeyReply {
                        state: "unavailable".into(),
                        key: None,
                        error: Some(e.to_string()),
                    },
                },
            };
            let body = serde_json::to_vec(&answer).unwrap_or_default();
            let _ = client.publish(reply, body.into()).await;
        }
        Ok(())
    }
}

fn known(stored: Stored) -> Known {
    match stored {
        Stored::Key(bytes) if bytes.len() == KEY_LEN => {
            let mut key = [0u8; KEY_LEN];
            key.copy_from_slice(&bytes);
            Known::Key(key)
        }
        Stored::Absent => Known::Absent,
        // Forgotten, or a value that is no key.
        Stored::Key(_) | Stored::Forgotten => Known::Gone,
    }
}

async fn ask(
    client: &async_nats::Client,
    timeout: Duration,
    subject: &str,
) -> Result<Known, PrivacyError> {
    let unavailable = |why: String| {
        PrivacyError::Store(StoreError::new(
            StoreErrorKind::Unavailable,
            format!("no command worker gave the key of data subject {subject}: {why}; retry"),
        ))
    };
    let request = client.request(KEY_SUBJECT, subject.to_owned().into());
    let reply = tokio::time::timeout(timeout, request)
        .await
        .map_err(|_| unavailable("timed out".into()))?
        .map_err(|e| unavailable(e.to_string()))?;
    let answer: KeyReply =
        serde_json::from_slice(&reply.payload).map_err(|e| unavailable(e.to_string()))?;
    match (answer.state.as_str(), answer.key) {
        ("active", Some(text)) => {
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(text)
                .map_err(|e| unavailable(e.to_string()))?;
            Ok(known(Stored::Key(bytes.into())))
        }
        ("gone", _) => Ok(Known::Gone),
        ("absent", _) => Ok(Known::Absent),
        _ => Err(unavailable(answer.error.unwrap_or_default())),
    }
}

/// Opens (or, with no key, erases) the sealed fields of `event`, keeping
/// the stored bytes in `stored_data` for the hash chain.
fn open_with(event: &mut RecordedEvent, subject: &str, known: &Known) {
    let Ok(mut data) = serde_json::from_slice::<Value>(&event.data) else {
        return;
    };
    let aggregate = format!("{}.{}", event.aggregate_type, event.aggregate_id);
    let pointers: Vec<String> = event
        .sealed
        .as_deref()
        .unwrap_or_default()
        .split(',')
        .filter(|p| !p.is_empty())
        .map(str::to_owned)
        .collect();
    let mut erased = Vec::new();
    for pointer in pointers {
        let Some(value) = data.pointer_mut(&pointer) else {
            continue;
        };
        let opened = match known {
            Known::Key(key) => open_value(key, &aggregate, subject, &pointer, value),
            Known::Gone | Known::Absent => None,
        };
        match opened {
            Some(plain) => *value = plain,
            None => {
                *value = Value::Null;
                erased.push(pointer);
            }
        }
    }
    let opened = Bytes::from(serde_json::to_vec(&data).expect("JSON serializes"));
    event.stored_data = Some(std::mem::replace(&mut event.data, opened));
    event.erased = erased;
}

fn open_value(
    key: &[u8; KEY_LEN],
    aggregate: &str,
    subject: &str,
    pointer: &str,
    value: &Value,
) -> Option<Value> {
    let text = value.as_str()?.strip_prefix(SEALED_PREFIX)?;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(text)
        .ok()?;
    if bytes.len() < NONCE_LEN {
        return None;
    }
    let (nonce, sealed) = bytes.split_at(NONCE_LEN);
    let cipher = Aes256Gcm::new_from_slice(key).ok()?;
    let plain = cipher
        .decrypt(
            Nonce::from_slice(nonce),
            Payload {
                msg: sealed,
                aad: &aad(aggregate, subject, pointer),
            },
        )
        .ok()?;
    serde_json::from_slice(&plain).ok()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_forgotten_subject_stays_forgotten_whatever_answers_arrive_late() {
        let privacy = Privacy::none();
        assert_eq!(
            privacy.remember("s", Known::Key([7; KEY_LEN])),
            Known::Key([7; KEY_LEN])
        );
        privacy.forgotten("s");
        // A key fetched before the forget, answered after it.
        assert_eq!(privacy.remember("s", Known::Key([7; KEY_LEN])), Known::Gone);
        assert_eq!(privacy.cached("s"), Some(Known::Gone));
    }

    #[test]
    fn an_invalid_subject_header_reads_as_erased_without_asking() {
        let privacy = Privacy::none();
        let mut event = crate::store::StoredMessage {
            subject: "events.user.u1".into(),
            sequence: 1,
            timestamp: time::OffsetDateTime::UNIX_EPOCH,
            headers: None,
            payload: Bytes::from_static(br#"{"name":"jetsource-sealed:v1:AAAA"}"#),
        };
        let mut headers = async_nats::HeaderMap::new();
        for (k, v) in [
            ("Jetsource-Event-Id", "e"),
            ("Jetsource-Event-Type", "UserCreated"),
            ("Jetsource-Schema-Version", "1"),
            ("Jetsource-Aggregate-Version", "1"),
            (DATA_SUBJECT, "no.such/subject"),
            (SEALED, "/name"),
        ] {
            headers.insert(k, v);
        }
        event.headers = Some(headers);
        let mut event = event.into_event().unwrap();
        privacy.open_cached(&mut event).unwrap();
        assert_eq!(&event.data[..], br#"{"name":null}"#);
        assert_eq!(event.erased, ["/name"]);
    }
}
