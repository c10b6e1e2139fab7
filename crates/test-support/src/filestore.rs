//! Tampering with a stopped nats-server's file store, as someone with
//! access to its disk could: change a stored message, remove one, swap
//! two. The server, started again, serves the result as if it had stored
//! it, which is what the hash chain exists to expose.
//!
//! The format is nats-server's (server/filestore.go): a stream's messages
//! live in `msgs/<n>.blk`, records back to back, little-endian:
//! `u32 length (bit 31: has headers) | u64 seq | i64 ts | u16 subject
//! length | subject | [u32 header length | headers] | payload | 8-byte
//! checksum`. The checksum is HighwayHash-64, keyed with
//! `sha256("<stream>-<n>")`, over `seq | ts | subject | headers | payload`.
//! A record with a wrong checksum is cut off at recovery, so every record
//! written here gets a right one. `msgs/index.db` (the server's summary of
//! the blocks) is deleted, so the server rebuilds its state from the blocks.

use std::path::{Path, PathBuf};

use highway::{HighwayHash, HighwayHasher, Key};
use sha2::{Digest, Sha256};

const HAS_HEADERS: u32 = 1 << 31;
const HEAD_LEN: usize = 22;
const CHECKSUM_LEN: usize = 8;

/// One stored message as the block holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// The sequence with the server's flag bits (erased, tombstone).
    pub seq: u64,
    pub ts: i64,
    pub subject: Vec<u8>,
    /// The raw header block (`NATS/1.0\r\n...`), empty without headers.
    pub headers: Vec<u8>,
    pub payload: Vec<u8>,
}

impl Record {
    /// The sequence without flag bits.
    pub fn sequence(&self) -> u64 {
        self.seq & !(3 << 62)
    }

    /// Replaces the value of header `name` (which must be there).
    pub fn set_header(&mut self, name: &str, value: &str) {
        let text = String::from_utf8(self.headers.clone()).expect("headers are text");
        let prefix = format!("{name}: ");
        let mut found = false;
        let lines: Vec<String> = text
            .split("\r\n")
            .map(|line| match line.strip_prefix(&prefix) {
                Some(_) => {
                    found = true;
                    format!("{prefix}{value}")
                }
                None => line.to_owned(),
            })
            .collect();
        assert!(found, "no header {name} in {text:?}");
        self.headers = lines.join("\r\n").into_bytes();
    }
}

/// A stream's directory in a stopped server's store.
#[derive(Debug)]
pub struct StoredStream {
    dir: PathBuf,
    name: String,
}

impl StoredStream {
    /// The stream `name` under `store_dir` (a server's `store_dir`), in
    /// whichever account holds it.
    pub fn find(store_dir: &Path, name: &str) -> Self {
        let accounts = store_dir.join("jetstream");
        let dir = std::fs::read_dir(&accounts)
            .unwrap_or_else(|e| panic!("{}: {e}", accounts.display()))
            .filter_map(Result::ok)
            .map(|account| account.path().join("streams").join(name))
            .find(|dir| dir.join("msgs").is_dir())
            .unwrap_or_else(|| panic!("no stream {name} under {}", accounts.display()));
        Self {
            dir,
            name: name.to_owned(),
        }
    }

    /// Changes the message at `sequence` with `change`.
    pub fn alter(&self, sequence: u64, change: impl FnOnce(&mut Record)) {
        let mut change = Some(change);
        self.rewrite(|records| {
            let Some(at) = find(records, sequence) else {
                return false;
            };
            if let Some(change) = change.take() {
                change(&mut records[at]);
            }
            true
        });
    }

    /// Removes the message at `sequence` from its block.
    pub fn remove(&self, sequence: u64) {
        self.rewrite(|records| {
            find(records, sequence)
                .map(|at| records.remove(at))
                .is_some()
        });
    }

    /// Exchanges the subjects, headers and payloads of the messages at
    /// `a` and `b`, which keep their sequences and times: each appears
    /// where the other was stored.
    pub fn swap(&self, a: u64, b: u64) {
        self.rewrite(|records| {
            let (Some(i), Some(j)) = (find(records, a), find(records, b)) else {
                return false;
            };
            let (x, y) = (records[i].clone(), records[j].clone());
            for (at, from) in [(i, y), (j, x)] {
                records[at].subject = from.subject;
                records[at].headers = from.headers;
                records[at].payload = from.payload;
            }
            true
        });
    }

    /// Hands the records of every block to `change` (one block at a time,
    /// in order) and writes back the blocks it says it changed. Panics if
    /// none did.
    fn rewrite(&self, change: impl FnMut(&mut Vec<Record>) -> bool) {
        assert!(
            rewrite_store(&self.dir, &self.name, change),
            "no block of {} held the messages",
            self.name
        );
    }
}

/// Replaces `original` with `replacement` (same length) in the body of
/// every stored record under a clustered node's `store_dir` that carries
/// `marker` (an event id): the stream's own copy, and the copy in the
/// stream's Raft log, from which a node would otherwise rebuild the
/// stream. What someone who edits a replica's disk has to change. Returns
/// how many records changed.
pub fn replace_everywhere(
    store_dir: &Path,
    marker: &[u8],
    original: &[u8],
    replacement: &[u8],
) -> usize {
    assert_eq!(original.len(), replacement.len(), "same length only");
    let mut changed = 0;
    let mut dirs = vec![store_dir.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).unwrap().filter_map(Result::ok) {
            let path = entry.path();
            if !path.is_dir() {
                continue;
            }
            if path.join("msgs").is_dir() {
                // A file store: a stream's, or a Raft group's log, named
                // after its directory.
                let name = path.file_name().unwrap().to_str().unwrap().to_owned();
                rewrite_store(&path, &name, |records| {
                    let mut any = false;
                    for r in records.iter_mut() {
                        let Some(at) = find_bytes(&r.headers, marker)
                            .map(|_| 0)
                            .or_else(|| find_bytes(&r.payload, marker))
                        else {
                            continue;
                        };
                        if let Some(i) = find_bytes(&r.payload[at..], original) {
                            r.payload[at + i..at + i + original.len()].copy_from_slice(replacement);
                            any = true;
                            changed += 1;
                        }
                    }
                    any
                });
            } else {
                dirs.push(path);
            }
        }
    }
    changed
}

fn find_bytes(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// [`StoredStream::rewrite`] on the file store in `dir` named `name`;
/// whether any block changed.
fn rewrite_store(dir: &Path, name: &str, mut change: impl FnMut(&mut Vec<Record>) -> bool) -> bool {
    {
        let msgs = dir.join("msgs");
        let mut blocks: Vec<(u32, PathBuf)> = std::fs::read_dir(&msgs)
            .unwrap()
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter_map(|p| {
                let index = p
                    .file_name()?
                    .to_str()?
                    .strip_suffix(".blk")?
                    .parse()
                    .ok()?;
                Some((index, p))
            })
            .collect();
        blocks.sort();
        let mut changed = false;
        for (index, path) in blocks {
            let mut records = parse(&std::fs::read(&path).unwrap());
            if !change(&mut records) {
                continue;
            }
            let key = block_key(name, index);
            let bytes: Vec<u8> = records.iter().flat_map(|r| encode(&key, r)).collect();
            std::fs::write(&path, bytes).unwrap();
            changed = true;
        }
        if changed {
            // Made from the blocks as they were: without it the server
            // rebuilds its state from the blocks as they are now.
            let _ = std::fs::remove_file(msgs.join("index.db"));
        }
        changed
    }
}

/// Index of the record with `sequence` in a block.
fn find(records: &[Record], sequence: u64) -> Option<usize> {
    records.iter().position(|r| r.sequence() == sequence)
}

fn block_key(stream: &str, index: u32) -> Key {
    let digest = Sha256::digest(format!("{stream}-{index}").as_bytes());
    Key(std::array::from_fn(|i| {
        u64::from_le_bytes(digest[i * 8..i * 8 + 8].try_into().unwrap())
    }))
}

fn parse(mut bytes: &[u8]) -> Vec<Record> {
    let u32_at = |b: &[u8], at: usize| u32::from_le_bytes(b[at..at + 4].try_into().unwrap());
    let mut records = Vec::new();
    while bytes.len() >= HEAD_LEN {
        let raw_len = u32_at(bytes, 0);
        let len = (raw_len & !HAS_HEADERS) as usize;
        let record = &bytes[..len];
        let seq = u64::from_le_bytes(record[4..12].try_into().unwrap());
        let ts = i64::from_le_bytes(record[12..20].try_into().unwrap());
        let subject_len = u16::from_le_bytes(record[20..22].try_into().unwrap()) as usize;
        let mut at = HEAD_LEN;
        let subject = record[at..at + subject_len].to_vec();
        at += subject_len;
        let mut headers = Vec::new();
        if raw_len & HAS_HEADERS != 0 {
            let header_len = u32_at(record, at) as usize;
            headers = record[at + 4..at + 4 + header_len].to_vec();
            at += 4 + header_len;
        }
        let payload = record[at..len - CHECKSUM_LEN].to_vec();
        records.push(Record {
            seq,
            ts,
            subject,
            headers,
            payload,
        });
        bytes = &bytes[len..];
    }
    records
}

fn encode(key: &Key, r: &Record) -> Vec<u8> {
    let with_headers = !r.headers.is_empty();
    let len = HEAD_LEN
        + r.subject.len()
        + if with_headers { 4 + r.headers.len() } else { 0 }
        + r.payload.len()
        + CHECKSUM_LEN;
    let flag = if with_headers { HAS_HEADERS } else { 0 };
    let mut out = Vec::with_capacity(len);
    out.extend_from_slice(&(len as u32 | flag).to_le_bytes());
    out.extend_from_slice(&r.seq.to_le_bytes());
    out.extend_from_slice(&r.ts.to_le_bytes());
    out.extend_from_slice(&(r.subject.len() as u16).to_le_bytes());
    out.extend_from_slice(&r.subject);
    if with_headers {
        out.extend_from_slice(&(r.headers.len() as u32).to_le_bytes());
        out.extend_from_slice(&r.headers);
    }
    out.extend_from_slice(&r.payload);
    let mut hasher = HighwayHasher::new(*key);
    hasher.append(&out[4..20]);
    hasher.append(&r.subject);
    hasher.append(&r.headers);
    hasher.append(&r.payload);
    out.extend_from_slice(&hasher.finalize64().to_le_bytes());
    out
}
