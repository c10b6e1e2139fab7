//! The data-key bucket: one AES-256 key per data subject, in a JetStream
//! key-value bucket (`privacy.key_bucket`, replicated like the event
//! stream) that only the command worker and the admin role may read
//! (nats/accounts.conf). Every read is answered by the stream leader: a
//! replica that lags must never make a key look absent (a writer would
//! then try to make a second one) or a forgotten one look alive.
//!
//! A key is written once, guarded by "no message on this subject yet", so
//! two writers cannot make two keys, and a forgotten subject (its key
//! erased, a purge marker left in its place) can never get a new one.

use async_nats::jetstream::{self, kv};
use async_nats::HeaderMap;
use bytes::Bytes;

use super::{codes, leader_found, StoreError, StoreErrorKind};

/// A subject's key as the bucket has it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stored {
    Key(Bytes),
    /// Erased by `jetsource forget`: a purge marker stands in its place.
    Forgotten,
    /// Never made.
    Absent,
}

#[derive(Debug, Clone)]
pub struct KeyBucket {
    js: jetstream::Context,
    bucket: String,
    replicas: usize,
}

fn unavailable(what: &str, e: impl std::fmt::Display) -> StoreError {
    StoreError::new(
        StoreErrorKind::Unavailable,
        format!("{what}: {e}; check that nats-server is up, then retry"),
    )
}

impl KeyBucket {
    /// A handle; the bucket is made when the first key is.
    pub fn new(js: jetstream::Context, bucket: &str, replicas: usize) -> Self {
        Self {
            js,
            bucket: bucket.to_owned(),
            replicas,
        }
    }

    fn stream_name(&self) -> String {
        format!("KV_{}", self.bucket)
    }

    fn subject(&self, data_subject: &str) -> String {
        format!("$KV.{}.{data_subject}", self.bucket)
    }

    /// The key of `data_subject`, from the stream leader.
    pub async fn read(&self, data_subject: &str) -> Result<Stored, StoreError> {
        let stream = match self.js.get_stream_no_info(self.stream_name()).await {
            Ok(stream) => stream,
            Err(e) => return Err(unavailable("cannot open the key bucket", e)),
        };
        let got = stream
            .raw_message_builder()
            .last_by_subject(self.subject(data_subject))
            .send()
            .await;
        let found = match leader_found(got, "reading a data key") {
            Ok(found) => found,
            // No bucket yet: no key was ever made.
            Err(e) if e.code() == Some(codes::STREAM_NOT_FOUND) => None,
            Err(e) => return Err(e),
        };
        Ok(match found {
            None => Stored::Absent,
            Some(message) => {
                let operation = message
                    .headers
                    .as_ref()
                    .and_then(|h| h.get("KV-Operation").map(|v| v.as_str().to_owned()));
                match operation.as_deref() {
                    Some("DEL") | Some("PURGE") => Stored::Forgotten,
                    _ => Stored::Key(message.payload),
                }
            }
        })
    }

    /// Stores `key` for `data_subject` unless the subject has any entry
    /// (a key, or the marker of a forgotten one); returns what is stored
    /// afterwards.
    pub async fn create(&self, data_subject: &str, key: Bytes) -> Result<Stored, StoreError> {
        self.ensure_bucket().await?;
        let mut headers = HeaderMap::new();
        headers.insert(async_nats::header::NATS_EXPECTED_LAST_SUBJECT_SEQUENCE, "0");
        let published = self
            .js
            .publish_with_headers(self.subject(data_subject), headers, key.clone())
            .await;
        let acked = match published {
            Ok(ack) => ack.await,
            Err(e) => Err(e),
        };
        match acked {
            Ok(_) => Ok(Stored::Key(key)),
            // Someone made it first, or it was forgotten.
            Err(e) if StoreError::publish("", &e).kind() == StoreErrorKind::WrongLastSequence => {
                self.read(data_subject).await
            }
            Err(e) => Err(StoreError::publish("storing a data key", &e)),
        }
    }

    /// Erases `data_subject`'s key for good: every stored revision is
    /// deleted with the server's secure erase (its bytes overwritten on
    /// disk), then a purge marker takes its place, which no key can
    /// follow. Forgetting a subject that never had a key leaves the marker
    /// too: it stays forgotten.
    pub async fn forget(&self, data_subject: &str) -> Result<(), StoreError> {
        let kv = self.ensure_bucket().await?;
        let stream = self
            .js
            .get_stream_no_info(self.stream_name())
            .await
            .map_err(|e| unavailable("cannot open the key bucket", e))?;
        if let Stored::Key(_) = self.read(data_subject).await? {
            let got = stream
                .raw_message_builder()
                .last_by_subject(self.subject(data_subject))
                .send()
                .await;
            if let Some(message) = leader_found(got, "reading a data key")? {
                stream
                    .delete_message(message.sequence)
                    .await
                    .map_err(|e| unavailable("erasing a data key", e))?;
            }
        }
        kv.purge(data_subject)
            .await
            .map_err(|e| unavailable("purging a data key", e))
    }

    async fn ensure_bucket(&self) -> Result<kv::Store, StoreError> {
        if let Ok(kv) = self.js.get_key_value(&self.bucket).await {
            return Ok(kv);
        }
        // A key-value bucket's stream, made by hand: unlike the client's
        // buckets it lets its messages be deleted, which is how a key is
        // securely erased.
        let created = self
            .js
            .create_stream(jetstream::stream::Config {
                name: self.stream_name(),
                description: Some(
                    "jetsource data keys: one per data subject (crypto-shredding)".into(),
                ),
                subjects: vec![format!("$KV.{}.>", self.bucket)],
                max_messages_per_subject: 1,
                discard: jetstream::stream::DiscardPolicy::New,
                allow_rollup: true,
                deny_delete: false,
                allow_direct: true,
                num_replicas: self.replicas,
                storage: jetstream::stream::StorageType::File,
                ..Default::default()
            })
            .await;
        match created {
            Ok(_) => self
                .js
                .get_key_value(&self.bucket)
                .await
                .map_err(|e| unavailable("cannot open the key bucket", e)),
            Err(create) => {
                // Another process made it first.
                self.js
                    .get_key_value(&self.bucket)
                    .await
                    .map_err(|_| unavailable("cannot create the key bucket", create))
            }
        }
    }
}
