//! Tamper evidence: a hash chain per aggregate, optionally signed.
//!
//! Every event the store appends carries `Jetsource-Hash`, the SHA-256 of
//! the previous event's hash (of the same aggregate), the event's
//! identifying headers and its body exactly as stored (see [`link`]). The
//! command worker computes it at append time from the state it decided on,
//! and the append's expected-sequence guard makes sure that state's last
//! event is the one actually before it, so a chain never forks.
//!
//! With `store.signing_key` set, the writer also signs each hash with
//! Ed25519 (`Jetsource-Signature`, base64) and names its key
//! (`Jetsource-Signing-Key`, the key file's name). Verifiers hold public
//! keys in `store.trusted_keys`, one `<key id>.pub` per key, so rotating
//! a key is adding a file: old events keep verifying under their key id.
//!
//! What it proves: any change to a stored event's body or identifying
//! headers, any event removed from or moved within an aggregate's history
//! (before its newest event), shows as a broken link. Without signatures a
//! writer who can rewrite storage can also recompute the hashes; with them
//! (required by the verifier: [`TrustedKeys::required`]) he also needs a
//! private key. Neither can show that an aggregate's newest
//! events, or a whole aggregate, were removed: nothing after them refers to
//! them (`jetsource verify --all` also reports gaps in the stream's
//! sequence, which an append-only stream never has).

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;
use std::sync::Arc;

use base64::Engine as _;
use ed25519_dalek::pkcs8::{DecodePrivateKey, DecodePublicKey, EncodePrivateKey, EncodePublicKey};
use ed25519_dalek::{Signer as _, SigningKey, VerifyingKey};
use sha2::{Digest, Sha256};

use crate::envelope::{self, RecordedEvent};

/// Header: the event's link in its aggregate's chain, hex SHA-256.
pub const HASH: &str = "Jetsource-Hash";
/// Header: Ed25519 signature of the hash, base64.
pub const SIGNATURE: &str = "Jetsource-Signature";
/// Header: the id of the key that signed (its file name without `.key`).
pub const SIGNING_KEY: &str = "Jetsource-Signing-Key";

/// Domain separation: what the hash and the signature are of.
const CHAIN_DOMAIN: &[u8] = b"jetsource-chain-v1";
const SIGNATURE_DOMAIN: &[u8] = b"jetsource-event-signature-v1";

/// One link of an aggregate's chain.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct ChainHash([u8; 32]);

impl ChainHash {
    pub fn parse(hex_text: &str) -> Option<Self> {
        let mut bytes = [0u8; 32];
        hex::decode_to_slice(hex_text, &mut bytes).ok()?;
        Some(Self(bytes))
    }
}

impl fmt::Display for ChainHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for ChainHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ChainHash({self})")
    }
}

/// What a link covers: everything that identifies an event, as stored.
/// Not the stream sequence or timestamp (the server assigns them after the
/// hash is made; a restore into another stream renumbers them) nor the
/// trace context.
#[derive(Debug, Clone, Copy)]
pub struct Linked<'a> {
    pub aggregate_type: &'a str,
    pub aggregate_id: &'a str,
    pub aggregate_version: u64,
    pub event_id: &'a str,
    pub event_type: &'a str,
    pub schema_version: u32,
    pub command_id: Option<&'a str>,
    pub command_aggregate: Option<&'a str>,
    pub correlation_id: Option<&'a str>,
    pub causation_id: Option<&'a str>,
    pub data_subject: Option<&'a str>,
    pub sealed: Option<&'a str>,
    /// As stored: personal fields sealed.
    pub data: &'a [u8],
}

impl<'a> Linked<'a> {
    pub fn of(event: &'a RecordedEvent) -> Self {
        Self {
            aggregate_type: &event.aggregate_type,
            aggregate_id: &event.aggregate_id,
            aggregate_version: event.aggregate_version,
            event_id: &event.event_id,
            event_type: &event.event_type,
            schema_version: event.schema_version,
            command_id: event.command_id.as_deref(),
            command_aggregate: event.command_aggregate.as_deref(),
            correlation_id: event.correlation_id.as_deref(),
            causation_id: event.causation_id.as_deref(),
            data_subject: event.data_subject.as_deref(),
            sealed: event.sealed.as_deref(),
            data: event.stored_data.as_ref().unwrap_or(&event.data),
        }
    }
}

/// The link of `event` after `previous` (`None` for an aggregate's first
/// event, or the first after events written without hashes). Every field
/// is length-prefixed, so no two different events hash the same input.
pub fn link(previous: Option<&ChainHash>, event: &Linked<'_>) -> ChainHash {
    let mut hasher = Sha256::new();
    let mut field = |bytes: &[u8]| {
        hasher.update((bytes.len() as u64).to_be_bytes());
        hasher.update(bytes);
    };
    field(CHAIN_DOMAIN);
    field(previous.map_or(&[][..], |p| &p.0[..]));
    field(envelope::event_subject(event.aggregate_type, event.aggregate_id).as_bytes());
    field(event.aggregate_version.to_string().as_bytes());
    field(event.event_id.as_bytes());
    field(event.event_type.as_bytes());
    field(event.schema_version.to_string().as_bytes());
    field(optional(event.command_id));
    field(optional(event.command_aggregate));
    field(optional(event.correlation_id));
    field(optional(event.causation_id));
    field(optional(event.data_subject));
    field(optional(event.sealed));
    field(event.data);
    ChainHash(hasher.finalize().into())
}

fn optional(value: Option<&str>) -> &[u8] {
    value.unwrap_or_default().as_bytes()
}

fn signed_bytes(hash: &ChainHash) -> Vec<u8> {
    [SIGNATURE_DOMAIN, &hash.0[..]].concat()
}

/// Why a key file cannot be used.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{path}: {reason}")]
pub struct KeyError {
    pub path: String,
    pub reason: String,
}

/// Key ids go into a header value and a file name: letters, digits, '-'
/// and '_'.
fn valid_key_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

const KEY_ID_RULE: &str =
    "a key file is named <key id>.key or <key id>.pub, the id made of letters, digits, '-' and '_'";

/// The id of the key in `path`: its file name up to the first dot.
fn key_id(path: &Path) -> Result<String, KeyError> {
    let id = path
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.split('.').next())
        .unwrap_or_default();
    if valid_key_id(id) {
        Ok(id.to_owned())
    } else {
        Err(KeyError {
            path: path.display().to_string(),
            reason: KEY_ID_RULE.into(),
        })
    }
}

/// The writer's signing key.
#[derive(Clone)]
pub struct Signer {
    key_id: String,
    key: SigningKey,
}

impl fmt::Debug for Signer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Signer")
            .field("key_id", &self.key_id)
            .finish_non_exhaustive()
    }
}

impl Signer {
    /// Reads a PKCS#8 PEM Ed25519 private key named `<key id>.key`.
    pub fn load(path: &Path) -> Result<Self, KeyError> {
        let key_id = key_id(path)?;
        let fail = |reason: String| KeyError {
            path: path.display().to_string(),
            reason,
        };
        let pem = std::fs::read_to_string(path).map_err(|e| fail(format!("cannot read: {e}")))?;
        let key = SigningKey::from_pkcs8_pem(&pem)
            .map_err(|e| fail(format!("not a PKCS#8 PEM Ed25519 private key: {e}")))?;
        Ok(Self { key_id, key })
    }

    /// A new random key with id `key_id`.
    pub fn generate(key_id: &str) -> Result<Self, KeyError> {
        if !valid_key_id(key_id) {
            return Err(KeyError {
                path: key_id.to_owned(),
                reason: KEY_ID_RULE.into(),
            });
        }
        let mut seed = [0u8; 32];
        getrandom::getrandom(&mut seed).map_err(|e| KeyError {
            path: key_id.to_owned(),
            reason: format!("no randomness: {e}"),
        })?;
        Ok(Self {
            key_id: key_id.to_owned(),
            key: SigningKey::from_bytes(&seed),
        })
    }

    /// Writes `<dir>/<id>.key` (private, mode 0600) and `<dir>/<id>.pub`.
    pub fn write(&self, dir: &Path) -> Result<(), KeyError> {
        let fail = |path: &Path, reason: String| KeyError {
            path: path.display().to_string(),
            reason,
        };
        let private = dir.join(format!("{}.key", self.key_id));
        let public = dir.join(format!("{}.pub", self.key_id));
        let pem = self
            .key
            .to_pkcs8_pem(Default::default())
            .map_err(|e| fail(&private, e.to_string()))?;
        write_private(&private, pem.as_bytes()).map_err(|e| fail(&private, e.to_string()))?;
        let public_pem = self
            .key
            .verifying_key()
            .to_public_key_pem(Default::default())
            .map_err(|e| fail(&public, e.to_string()))?;
        std::fs::write(&public, public_pem).map_err(|e| fail(&public, e.to_string()))
    }

    pub fn key_id(&self) -> &str {
        &self.key_id
    }

    /// The signature of `hash`, base64.
    pub fn sign(&self, hash: &ChainHash) -> String {
        let signature = self.key.sign(&signed_bytes(hash));
        base64::engine::general_purpose::STANDARD.encode(signature.to_bytes())
    }
}

fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    file.write_all(bytes)
}

/// The public keys a verifier trusts, by key id.
#[derive(Debug, Clone, Default)]
pub struct TrustedKeys {
    keys: BTreeMap<String, VerifyingKey>,
    /// Every event must be signed by one of them (`store.require_signatures`,
    /// `verify --require-signatures`). Otherwise only events after a signed
    /// one must be: history written before signing was on still verifies,
    /// but so would a history rewritten whole without signatures.
    pub required: bool,
}

impl TrustedKeys {
    /// Every `<key id>.pub` (PEM, SubjectPublicKeyInfo) in `dir`.
    pub fn load(dir: &Path) -> Result<Self, KeyError> {
        let fail = |path: &Path, reason: String| KeyError {
            path: path.display().to_string(),
            reason,
        };
        let entries = std::fs::read_dir(dir).map_err(|e| fail(dir, format!("cannot list: {e}")))?;
        let mut keys = BTreeMap::new();
        for entry in entries {
            let path = entry.map_err(|e| fail(dir, e.to_string()))?.path();
            if path.extension().and_then(|e| e.to_str()) != Some("pub") {
                continue;
            }
            let pem = std::fs::read_to_string(&path)
                .map_err(|e| fail(&path, format!("cannot read: {e}")))?;
            let key = VerifyingKey::from_public_key_pem(&pem)
                .map_err(|e| fail(&path, format!("not a PEM Ed25519 public key: {e}")))?;
            keys.insert(key_id(&path)?, key);
        }
        Ok(Self {
            keys,
            required: false,
        })
    }

    pub fn add(&mut self, signer: &Signer) {
        self.keys
            .insert(signer.key_id.clone(), signer.key.verifying_key());
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    pub fn ids(&self) -> impl Iterator<Item = &str> {
        self.keys.keys().map(String::as_str)
    }

    fn check(&self, key_id: &str, hash: &ChainHash, signature: &str) -> Result<(), Broken> {
        let key = self
            .keys
            .get(key_id)
            .ok_or_else(|| Broken::UnknownKey(key_id.to_owned()))?;
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(signature)
            .ok()
            .and_then(|b| ed25519_dalek::Signature::from_slice(&b).ok())
            .ok_or_else(|| Broken::BadSignature(key_id.to_owned()))?;
        key.verify_strict(&signed_bytes(hash), &bytes)
            .map_err(|_| Broken::BadSignature(key_id.to_owned()))
    }
}

/// What a writer puts on events and a reader checks, from `[store]`.
#[derive(Debug, Clone)]
pub struct Integrity {
    /// Hash-chain appended events (`store.chain`).
    pub chain: bool,
    pub signer: Option<Arc<Signer>>,
    /// Keys signatures are checked against; include the signer's own.
    pub trusted: Arc<TrustedKeys>,
    /// Check every event folded into a loaded aggregate.
    pub verify_on_load: bool,
}

impl Integrity {
    pub fn from_config(config: &crate::config::StoreConfig) -> Result<Self, KeyError> {
        let mut trusted = match &config.trusted_keys {
            Some(dir) => TrustedKeys::load(dir)?,
            None => TrustedKeys::default(),
        };
        trusted.required = config.require_signatures;
        let signer = match &config.signing_key {
            Some(path) => {
                let signer = Signer::load(path)?;
                trusted.add(&signer);
                Some(Arc::new(signer))
            }
            None => None,
        };
        Ok(Self {
            chain: config.chain,
            signer,
            trusted: Arc::new(trusted),
            verify_on_load: config.verify_on_load,
        })
    }
}

impl Default for Integrity {
    fn default() -> Self {
        Self {
            chain: true,
            signer: None,
            trusted: Arc::default(),
            verify_on_load: true,
        }
    }
}

/// The first thing wrong with an aggregate's history.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Broken {
    #[error(
        "body or headers changed: the stored hash does not match the event and its predecessor"
    )]
    Altered,
    #[error("event missing: version {expected} expected, version {found} found")]
    Missing { expected: u64, found: u64 },
    #[error("order changed: version {found} stored where version {expected} belongs")]
    Reordered { expected: u64, found: u64 },
    #[error("hash missing on an event after hashed ones")]
    Unhashed,
    #[error("hash header is not a SHA-256 in hex")]
    BadHash,
    #[error("signature missing (after signed events, or required)")]
    Unsigned,
    #[error("signed with unknown key {0} (not among the trusted keys)")]
    UnknownKey(String),
    #[error("wrong signature for key {0}")]
    BadSignature(String),
}

impl Broken {
    /// A short stable name, for reports and scripts.
    pub fn code(&self) -> &'static str {
        match self {
            Broken::Altered => "altered",
            Broken::Missing { .. } => "missing",
            Broken::Reordered { .. } => "reordered",
            Broken::Unhashed => "unhashed",
            Broken::BadHash => "bad-hash",
            Broken::Unsigned => "unsigned",
            Broken::UnknownKey(_) => "unknown-key",
            Broken::BadSignature(_) => "bad-signature",
        }
    }
}

/// Where an aggregate's chain stands after its events so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Head {
    pub version: u64,
    /// The last event's hash; `None` before the first event or while the
    /// history so far was written without hashes.
    pub hash: Option<ChainHash>,
    /// Some event so far was signed: every later one must be.
    pub signed: bool,
}

impl Head {
    /// Checks that `event` is the next link and moves on to it. Signatures
    /// are checked only when `trusted` holds keys. On error the head stays.
    pub fn advance(&mut self, event: &RecordedEvent, trusted: &TrustedKeys) -> Result<(), Broken> {
        let expected = self.version + 1;
        if event.aggregate_version > expected {
            return Err(Broken::Missing {
                expected,
                found: event.aggregate_version,
            });
        }
        if event.aggregate_version < expected {
            return Err(Broken::Reordered {
                expected,
                found: event.aggregate_version,
            });
        }
        let hash = match event.hash.as_deref() {
            None if self.hash.is_some() || (trusted.required && !trusted.is_empty()) => {
                return Err(Broken::Unhashed)
            }
            None => None,
            Some(text) => {
                let stored = ChainHash::parse(text).ok_or(Broken::BadHash)?;
                if link(self.hash.as_ref(), &Linked::of(event)) != stored {
                    return Err(Broken::Altered);
                }
                Some(stored)
            }
        };
        let signed = match (&hash, &event.signature, &event.signing_key) {
            (Some(hash), Some(signature), Some(key_id)) => {
                if !trusted.is_empty() {
                    trusted.check(key_id, hash, signature)?;
                }
                true
            }
            _ if (self.signed || trusted.required) && !trusted.is_empty() => {
                return Err(Broken::Unsigned)
            }
            _ => false,
        };
        *self = Head {
            version: expected,
            hash,
            signed: self.signed || signed,
        };
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use time::OffsetDateTime;

    /// A chain of `n` events of aggregate `a1`, hashed and signed by
    /// `signer` as the store writes them.
    fn chain(n: u64, signer: Option<&Signer>) -> Vec<RecordedEvent> {
        let mut previous = None;
        (1..=n)
            .map(|version| {
                let mut event = RecordedEvent {
                    sequence: version * 10,
                    timestamp: OffsetDateTime::UNIX_EPOCH,
                    aggregate_type: "account".into(),
                    aggregate_id: "a1".into(),
                    aggregate_version: version,
                    event_id: format!("e{version}"),
                    event_type: "Deposited".into(),
                    schema_version: 1,
                    command_id: Some(format!("c{version}")),
                    correlation_id: Some("corr".into()),
                    causation_id: Some("cause".into()),
                    data: Bytes::from(format!(r#"{{"amount":{version}}}"#)),
                    ..Default::default()
                };
                let hash = link(previous.as_ref(), &Linked::of(&event));
                event.hash = Some(hash.to_string());
                if let Some(signer) = signer {
                    event.signature = Some(signer.sign(&hash));
                    event.signing_key = Some(signer.key_id().to_owned());
                }
                previous = Some(hash);
                event
            })
            .collect()
    }

    /// The first broken link of `events`, as (version, what).
    fn first_break(events: &[RecordedEvent], trusted: &TrustedKeys) -> Option<(u64, Broken)> {
        let mut head = Head::default();
        events.iter().find_map(|e| {
            head.advance(e, trusted)
                .err()
                .map(|b| (e.aggregate_version, b))
        })
    }

    fn trusting(signers: &[&Signer]) -> TrustedKeys {
        let mut trusted = TrustedKeys::default();
        for signer in signers {
            trusted.add(signer);
        }
        trusted
    }

    #[test]
    fn an_untouched_chain_verifies() {
        let none = TrustedKeys::default();
        assert_eq!(first_break(&chain(5, None), &none), None);
        let key = Signer::generate("k1").unwrap();
        assert_eq!(first_break(&chain(5, Some(&key)), &trusting(&[&key])), None);
    }

    #[test]
    fn each_kind_of_tampering_is_named_at_its_event() {
        let none = TrustedKeys::default();
        let mut body = chain(5, None);
        body[2].data = Bytes::from_static(br#"{"amount":999}"#);
        assert_eq!(first_break(&body, &none), Some((3, Broken::Altered)));

        let mut header = chain(5, None);
        header[3].event_type = "Withdrawn".into();
        assert_eq!(first_break(&header, &none), Some((4, Broken::Altered)));

        let mut missing = chain(5, None);
        missing.remove(2);
        assert_eq!(
            first_break(&missing, &none),
            Some((
                4,
                Broken::Missing {
                    expected: 3,
                    found: 4
                }
            ))
        );

        let mut moved = chain(5, None);
        moved.swap(1, 2);
        let (version, broken) = first_break(&moved, &none).unwrap();
        assert_eq!(version, 3);
        assert_eq!(broken.code(), "missing", "a head alone cannot look ahead");

        // Renumbering the versions to hide a removal breaks the hashes.
        let mut renumbered = chain(5, None);
        renumbered.remove(2);
        for (i, e) in renumbered.iter_mut().enumerate() {
            e.aggregate_version = i as u64 + 1;
        }
        assert_eq!(first_break(&renumbered, &none), Some((3, Broken::Altered)));

        let mut stripped = chain(5, None);
        stripped[4].hash = None;
        assert_eq!(first_break(&stripped, &none), Some((5, Broken::Unhashed)));
    }

    #[test]
    fn signatures_need_a_trusted_key_and_survive_rotation() {
        let old = Signer::generate("2026-11").unwrap();
        let new = Signer::generate("2026-12").unwrap();
        let mut events = chain(3, Some(&old));
        // Re-signed history after a rotation: later events under the new key.
        let tail = chain(5, Some(&new));
        events.extend(tail.into_iter().skip(3));
        assert_eq!(first_break(&events, &trusting(&[&old, &new])), None);
        assert_eq!(
            first_break(&events, &trusting(&[&new])),
            Some((1, Broken::UnknownKey("2026-11".into())))
        );

        let mut forged = events.clone();
        forged[3].signature =
            Some(old.sign(&ChainHash::parse(forged[3].hash.as_deref().unwrap()).unwrap()));
        assert_eq!(
            first_break(&forged, &trusting(&[&old, &new])),
            Some((4, Broken::BadSignature("2026-12".into())))
        );

        let mut unsigned = events.clone();
        unsigned[4].signature = None;
        assert_eq!(
            first_break(&unsigned, &trusting(&[&old, &new])),
            Some((5, Broken::Unsigned))
        );
        // Without trusted keys only the chain is checked.
        assert_eq!(first_break(&forged, &TrustedKeys::default()), None);
        // A history rewritten whole without signatures passes unless
        // signatures are required.
        let bare = chain(3, None);
        let mut both = trusting(&[&old, &new]);
        assert_eq!(first_break(&bare, &both), None);
        both.required = true;
        assert_eq!(first_break(&bare, &both), Some((1, Broken::Unsigned)));
        let mut stripped = bare.clone();
        stripped[0].hash = None;
        assert_eq!(first_break(&stripped, &both), Some((1, Broken::Unhashed)));
    }

    /// A throwaway pair made by `openssl genpkey -algorithm ed25519` and
    /// `openssl pkey -pubout`, as `make run` makes its development key.
    #[test]
    fn keys_made_by_openssl_load() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("dev-1.key"),
            "-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEIJi5Xc9W/lj4ZdpYJ0F2h9o16sqIJt0X3uHpEitYa9pD\n-----END PRIVATE KEY-----\n",
        )
        .unwrap();
        std::fs::write(
            dir.path().join("dev-1.pub"),
            "-----BEGIN PUBLIC KEY-----\nMCowBQYDK2VwAyEAF/jjQ4r5JDROlUrV7WJMxSWdIFkUjarnPkbzjJbOPZs=\n-----END PUBLIC KEY-----\n",
        )
        .unwrap();
        let signer = Signer::load(&dir.path().join("dev-1.key")).unwrap();
        let trusted = TrustedKeys::load(dir.path()).unwrap();
        assert_eq!(first_break(&chain(3, Some(&signer)), &trusted), None);
    }

    #[test]
    fn keys_round_trip_through_their_files() {
        let dir = tempfile::tempdir().unwrap();
        let signer = Signer::generate("ops-1").unwrap();
        signer.write(dir.path()).unwrap();
        let loaded = Signer::load(&dir.path().join("ops-1.key")).unwrap();
        assert_eq!(loaded.key_id(), "ops-1");
        let trusted = TrustedKeys::load(dir.path()).unwrap();
        assert_eq!(trusted.ids().collect::<Vec<_>>(), ["ops-1"]);
        let events = chain(2, Some(&loaded));
        assert_eq!(first_break(&events, &trusted), None);
        assert!(Signer::generate("no/slash").is_err());
        assert!(signer.write(dir.path()).is_err(), "never overwrites a key");
    }
}
