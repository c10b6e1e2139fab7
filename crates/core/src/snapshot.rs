//! Snapshots: an aggregate's state at some version, so loading replays only
//! the tail. A snapshot is a cache, never a source of truth: one with an
//! unknown format or state schema, a bad checksum or undecodable data is
//! ignored (loading falls back to a full replay) and replaced later.
//!
//! Stored in a JetStream key-value bucket (`snapshot.bucket`, replicated like
//! the event stream), key `<aggregate_type>.<aggregate_id>`, value JSON:
//!
//! ```json
//! {"format": 2, "aggregate_type": "account", "aggregate_id": "a1",
//!  "state_schema": 1, "version": 200, "sequence": 5123,
//!  "timestamp": "2026-11-22T05:00:00Z", "taken_at": "...",
//!  "recent_commands": [["cmd-1", 5100]],
//!  "last_hash": "9f2c...", "signed": false, "subjects": ["user-u1"],
//!  "state": {...},
//!  "checksum": "crc32:1a2b3c4d"}
//! ```
//!
//! `timestamp` is the time of the event at `sequence`; temporal queries use a
//! snapshot only if it does not go past the requested point. The checksum
//! covers everything but `taken_at` and itself.

use async_nats::jetstream::{self, kv};
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use time::OffsetDateTime;

use crate::config::SnapshotConfig;
use crate::store::{codes, StoreError, StoreErrorKind};

/// The snapshot envelope this version writes and reads.
/// 2 added the hash-chain head; format 1 snapshots are ignored (replay).
pub const SNAPSHOT_FORMAT: u32 = 2;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Snapshot {
    pub format: u32,
    pub aggregate_type: String,
    pub aggregate_id: String,
    pub state_schema: u32,
    pub version: u64,
    pub sequence: u64,
    #[serde(with = "time::serde::rfc3339")]
    pub timestamp: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    pub taken_at: OffsetDateTime,
    pub recent_commands: Vec<(String, u64)>,
    /// Hash-chain head at `version` (hash of the event at `sequence`), so
    /// appends after a snapshot load keep the chain.
    pub last_hash: Option<String>,
    /// Some event up to `version` was signed.
    pub signed: bool,
    /// Data subjects whose personal data the state was built from: a
    /// snapshot of a forgotten one is never used (and `jetsource forget`
    /// deletes it).
    pub subjects: Vec<String>,
    pub state: Value,
    pub checksum: String,
}

impl Snapshot {
    fn digest(&self) -> String {
        let mut hasher = crc32fast::Hasher::new();
        let head = format!(
            "{}|{}|{}|{}|{}|{}|{}|",
            self.format,
            self.aggregate_type,
            self.aggregate_id,
            self.state_schema,
            self.version,
            self.sequence,
            self.timestamp.unix_timestamp_nanos()
        );
        hasher.update(head.as_bytes());
        hasher.update(self.last_hash.as_deref().unwrap_or("-").as_bytes());
        hasher.update(if self.signed { b"|s|" } else { b"|u|" });
        hasher.update(self.subjects.join(",").as_bytes());
        // serde_json maps are ordered, so this encoding is canonical.
        hasher.update(&serde_json::to_vec(&self.recent_commands).unwrap_or_default());
        hasher.update(&serde_json::to_vec(&self.state).unwrap_or_default());
        format!("crc32:{:08x}", hasher.finalize())
    }

    /// Seals a snapshot: sets format and checksum.
    pub fn seal(mut self) -> Self {
        self.format = SNAPSHOT_FORMAT;
        self.checksum = self.digest();
        self
    }

    /// Decodes and checks a stored snapshot; the error says why it is unusable.
    pub fn decode(bytes: &[u8], state_schema: u32) -> Result<Self, String> {
        let snapshot: Snapshot =
            serde_json::from_slice(bytes).map_err(|e| format!("undecodable snapshot: {e}"))?;
        if snapshot.format != SNAPSHOT_FORMAT {
            return Err(format!("unknown snapshot format {}", snapshot.format));
        }
        if snapshot.state_schema != state_schema {
            return Err(format!(
                "state schema {} is not the current {state_schema}",
                snapshot.state_schema
            ));
        }
        if snapshot.checksum != snapshot.digest() {
            return Err("checksum mismatch".into());
        }
        Ok(snapshot)
    }

    pub fn key(aggregate_type: &str, aggregate_id: &str) -> String {
        format!("{aggregate_type}.{aggregate_id}")
    }
}

/// What a write did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Written {
    Stored,
    /// An equal or newer snapshot is already there.
    Kept,
}

#[derive(Debug, Clone)]
pub struct SnapshotStore {
    kv: kv::Store,
    bucket: String,
}

/// Whether a key-value write was refused because the entry's revision was
/// not the expected one: another writer got there first. async-nats names
/// only the single-node code of that refusal
/// ([`kv::UpdateErrorKind::WrongLastRevision`]); a replicated bucket
/// answers with the other one, found by number.
fn changed_meanwhile(e: &(dyn std::error::Error + 'static)) -> bool {
    codes::code_in(e).and_then(codes::kind_of) == Some(StoreErrorKind::WrongLastSequence)
}

fn unavailable(what: &str, e: impl std::fmt::Display) -> StoreError {
    StoreError::new(
        StoreErrorKind::Unavailable,
        format!("{what}: {e}; check that nats-server is up, then retry"),
    )
}

impl SnapshotStore {
    /// Opens the bucket, creating it when missing.
    /// Like [`SnapshotStore::open`], retrying while the bucket is not
    /// available (see [`crate::until_available`]): for workers starting on
    /// a cluster that elects leaders or while another copy creates it.
    pub async fn open_when_available(
        js: &jetstream::Context,
        config: &SnapshotConfig,
        replicas: usize,
    ) -> Result<Self, StoreError> {
        crate::until_available(
            "the snapshot bucket",
            |e: &StoreError| e.class() == crate::ErrorClass::Transient,
            || Self::open(js, config, replicas),
        )
        .await
    }

    pub async fn open(
        js: &jetstream::Context,
        config: &SnapshotConfig,
        replicas: usize,
    ) -> Result<Self, StoreError> {
        let kv = match js.get_key_value(&config.bucket).await {
            Ok(kv) => kv,
            Err(_) => {
                let created = js
                    .create_key_value(kv::Config {
                        bucket: config.bucket.clone(),
                        description: "jetsource snapshots: latest state per aggregate (a cache)"
                            .into(),
                        history: 1,
                        num_replicas: replicas,
                        storage: jetstream::stream::StorageType::File,
                        ..Default::default()
                    })
                    .await;
                match created {
                    Ok(kv) => kv,
                    // Another process created it first.
                    Err(create) => js
                        .get_key_value(&config.bucket)
                        .await
                        .map_err(|_| unavailable("cannot open the snapshot bucket", create))?,
                }
            }
        };
        Ok(Self {
            kv,
            bucket: config.bucket.clone(),
        })
    }

    pub fn bucket(&self) -> &str {
        &self.bucket
    }

    /// The stored bytes of an aggregate's snapshot, if any.
    pub async fn get_raw(
        &self,
        aggregate_type: &str,
        aggregate_id: &str,
    ) -> Result<Option<Vec<u8>>, StoreError> {
        self.kv
            .get(Snapshot::key(aggregate_type, aggregate_id))
            .await
            .map(|v| v.map(|b| b.to_vec()))
            .map_err(|e| unavailable("cannot read a snapshot", e))
    }

    /// The stream sequence an aggregate's stored snapshot was taken at,
    /// `None` without a readable one. May come from a replica that lags
    /// (an older snapshot or none): callers may only take that as a reason
    /// to snapshot again, never as one not to.
    pub async fn sequence(
        &self,
        aggregate_type: &str,
        aggregate_id: &str,
    ) -> Result<Option<u64>, StoreError> {
        #[derive(serde::Deserialize)]
        struct At {
            sequence: u64,
        }
        let bytes = self.get_raw(aggregate_type, aggregate_id).await?;
        Ok(bytes.and_then(|b| serde_json::from_slice::<At>(&b).ok().map(|at| at.sequence)))
    }

    /// Deletes an aggregate's snapshot with its history (`jetsource
    /// forget`: it may hold a forgotten subject's data in the clear).
    pub async fn remove(&self, aggregate_type: &str, aggregate_id: &str) -> Result<(), StoreError> {
        self.kv
            .purge(Snapshot::key(aggregate_type, aggregate_id))
            .await
            .map_err(|e| unavailable("cannot delete a snapshot", e))
    }

    /// Stores raw bytes under a key: for tests and repairs.
    pub async fn put_raw(&self, key: &str, bytes: Vec<u8>) -> Result<(), StoreError> {
        self.kv
            .put(key, bytes.into())
            .await
            .map(|_| ())
            .map_err(|e| unavailable("cannot write a snapshot", e))
    }

    /// Stores `snapshot` unless an equal or newer valid one is there. Several
    /// snapshotter copies may race: compare-and-set on the entry's revision
    /// makes the newest win. An unusable stored snapshot counts as older.
    pub async fn put_if_newer(
        &self,
        snapshot: &Snapshot,
        state_schema: u32,
    ) -> Result<Written, StoreError> {
        self.put_unless(snapshot, state_schema, |stored| {
            stored.version >= snapshot.version
        })
        .await
    }

    /// Stores `snapshot` unless a valid one of a higher version is there,
    /// replacing one of the same version: for a rebuild from the events
    /// (the fold may have been fixed since). Compare-and-set like
    /// [`SnapshotStore::put_if_newer`], so a newer snapshot written meanwhile
    /// (the snapshotter keeps running) is never replaced by this older one.
    pub async fn put_unless_newer(
        &self,
        snapshot: &Snapshot,
        state_schema: u32,
    ) -> Result<Written, StoreError> {
        self.put_unless(snapshot, state_schema, |stored| {
            stored.version > snapshot.version
        })
        .await
    }

    /// Stores `snapshot` unless the valid snapshot stored is one to `keep`;
    /// looks again when another writer changed the entry in between.
    async fn put_unless(
        &self,
        snapshot: &Snapshot,
        state_schema: u32,
        keep: impl Fn(&Snapshot) -> bool,
    ) -> Result<Written, StoreError> {
        let key = Snapshot::key(&snapshot.aggregate_type, &snapshot.aggregate_id);
        let bytes = serde_json::to_vec(snapshot).unwrap_or_default();
        for _ in 0..10 {
            let stored = self
                .kv
                .entry(&key)
                .await
                .map_err(|e| unavailable("cannot read a snapshot", e))?
                .filter(|entry| entry.operation == kv::Operation::Put);
            let valid = stored
                .as_ref()
                .and_then(|entry| Snapshot::decode(&entry.value, state_schema).ok());
            if valid.is_some_and(|existing| keep(&existing)) {
                return Ok(Written::Kept);
            }
            let revision = stored.map(|entry| entry.revision);
            if self.compare_and_set(&key, &bytes, revision).await? {
                return Ok(Written::Stored);
            }
            // Another copy wrote meanwhile: look again.
        }
        Err(unavailable(
            "cannot write a snapshot",
            "the entry kept changing under concurrent writers",
        ))
    }

    /// Writes `bytes` under `key` if the entry is still at `revision` (`None`:
    /// if it has no value); `false` when another writer changed it first.
    async fn compare_and_set(
        &self,
        key: &str,
        bytes: &[u8],
        revision: Option<u64>,
    ) -> Result<bool, StoreError> {
        let value = bytes::Bytes::copy_from_slice(bytes);
        let what = "cannot write a snapshot";
        match revision {
            Some(revision) => match self.kv.update(key, value, revision).await {
                Ok(_) => Ok(true),
                Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => Ok(false),
                Err(e) if changed_meanwhile(&e) => Ok(false),
                Err(e) => Err(StoreError::jetstream(what, codes::code_in(&e), e)),
            },
            None => match self.kv.create(key, value).await {
                Ok(_) => Ok(true),
                Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => Ok(false),
                Err(e) if changed_meanwhile(&e) => Ok(false),
                Err(e) => Err(StoreError::jetstream(what, codes::code_in(&e), e)),
            },
        }
    }

    /// Every key in the bucket.
    pub async fn keys(&self) -> Result<Vec<String>, StoreError> {
        let mut keys = self
            .kv
            .keys()
            .await
            .map_err(|e| unavailable("cannot list snapshots", e))?;
        let mut out = Vec::new();
        while let Some(key) = keys.next().await {
            out.push(key.map_err(|e| unavailable("cannot list snapshots", e))?);
        }
        Ok(out)
    }
}
