//! `backup` and `restore`: the event store's streams (events, dead letters,
//! snapshots) through JetStream's own snapshot/restore API, with a manifest
//! that is checked again after a restore.
//!
//! Backup, per stream: `$JS.API.STREAM.SNAPSHOT.<stream>` with a deliver
//! subject; the server sends the stream's files (an s2-compressed tar, kept
//! as it comes in `<stream>.snapshot`) in chunks, each with a reply subject
//! that is acked for flow control, the last one empty (status 204, or an
//! error status). The snapshot is a point in time: its state (messages,
//! first and last sequence) goes into `manifest.json` with a checksum over
//! the messages up to its last sequence, read back through an ordered
//! consumer. A stream that lost messages of that range while it was read
//! (the dead-letter and snapshot streams delete) is snapshotted again.
//!
//! Restore, per stream: `$JS.API.STREAM.RESTORE.<stream>` with the saved
//! configuration and state; the chunks go, in order, as requests to the
//! returned subject (each answered empty, or with an error), then an empty
//! request ends it and is answered with the stream's info. JetStream
//! refuses to restore over an existing stream; so does `restore`, before it
//! sends anything, unless `--force` deletes them first. Then every stream
//! is verified against the manifest: message count, first and last
//! sequence, checksum.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, Context as _};
use async_nats::jetstream::consumer::pull::OrderedConfig;
use async_nats::jetstream::consumer::DeliverPolicy;
use async_nats::{HeaderMap, Request};
use futures::StreamExt;
use jetsource_core::protocol::ErrorCode;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use crate::args::{BackupArgs, RestoreArgs};
use crate::context::Context;
use crate::exit::Failure;
use crate::output::Out;

/// The manifest's file name in a backup directory.
pub const MANIFEST: &str = "manifest.json";
/// Version of the backup layout.
const FORMAT: u32 = 1;
/// Snapshot chunk size asked of the server; restore uploads the same.
const CHUNK: usize = 128 * 1024;
/// How long one API call, chunk or step of a read-back may take.
const WAIT: Duration = Duration::from_secs(60);
/// Snapshots of one stream before giving up on it changing under us.
const ATTEMPTS: usize = 5;
/// JetStream's error code for "stream not found".
const STREAM_NOT_FOUND: u64 = 10059;

#[derive(Debug, Serialize, Deserialize)]
pub struct Manifest {
    pub format: u32,
    pub created_at: String,
    pub streams: Vec<StreamBackup>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StreamBackup {
    pub name: String,
    /// The snapshot as the server sent it, in the backup directory.
    pub file: String,
    pub file_bytes: u64,
    pub file_sha256: String,
    /// The stream's configuration and state as the server reported them
    /// with the snapshot (sent back as they are on restore).
    pub config: Value,
    pub state: Value,
    pub messages: u64,
    pub first_sequence: u64,
    pub last_sequence: u64,
    /// SHA-256 over (sequence, subject, headers, body) of every message
    /// from `first_sequence` to `last_sequence`, in order (see [`hash_message`]).
    pub checksum: String,
}

pub async fn backup(ctx: &Context, args: BackupArgs, out: &mut Out<'_>) -> anyhow::Result<()> {
    let dir = args.dir;
    if dir.join(MANIFEST).exists() {
        return Err(Failure::invalid(format!(
            "{} already holds a backup ({MANIFEST}): back up into a new directory",
            dir.display()
        ))
        .into());
    }
    std::fs::create_dir_all(&dir)
        .with_context(|| format!("cannot create the directory {}", dir.display()))?;
    let client = ctx.client().await?;
    // Snapshots and dead letters refer to events: taken before the event
    // stream, they never refer to one after its backup.
    let candidates = [
        (format!("KV_{}", ctx.config.snapshot.bucket), false),
        (ctx.config.projector.dead_letter_stream.clone(), false),
        (ctx.config.store.stream.clone(), true),
    ];
    if stream_info(&client, &ctx.config.store.stream)
        .await?
        .is_none()
    {
        return Err(Failure::not_found(format!(
            "the event stream {} does not exist: nothing to back up",
            ctx.config.store.stream
        ))
        .into());
    }
    let mut streams = Vec::new();
    for (name, required) in candidates {
        if stream_info(&client, &name).await?.is_none() {
            if required {
                return Err(Failure::not_found(format!(
                    "the event stream {name} does not exist: nothing to back up"
                ))
                .into());
            }
            if !out.json {
                out.line(format_args!("{name}: does not exist, skipped"))?;
            }
            continue;
        }
        let backup = backup_stream(&client, &name, &dir, out).await?;
        if !out.json {
            out.line(format_args!(
                "{name}: {} messages, sequences {}..={}, {} bytes in {}",
                backup.messages,
                backup.first_sequence,
                backup.last_sequence,
                backup.file_bytes,
                backup.file
            ))?;
        }
        streams.push(backup);
    }
    let manifest = Manifest {
        format: FORMAT,
        created_at: crate::rfc3339(time::OffsetDateTime::now_utc()),
        streams,
    };
    // Written last, and whole: a directory without it is no backup.
    let partial = dir.join(format!("{MANIFEST}.partial"));
    std::fs::write(&partial, serde_json::to_vec_pretty(&manifest)?)?;
    std::fs::rename(&partial, dir.join(MANIFEST))?;
    if out.json {
        return out.doc(&manifest);
    }
    out.line(format_args!(
        "backup written to {} ({MANIFEST})",
        dir.display()
    ))
}

async fn backup_stream(
    client: &async_nats::Client,
    name: &str,
    dir: &Path,
    out: &mut Out<'_>,
) -> anyhow::Result<StreamBackup> {
    let file = format!("{name}.snapshot");
    for attempt in 1..=ATTEMPTS {
        let path = dir.join(&file);
        let (config, state, file_bytes, file_sha256) = snapshot(client, name, &path, out).await?;
        let number = |k: &str| state[k].as_u64().unwrap_or(0);
        let (messages, first, last) = (number("messages"), number("first_seq"), number("last_seq"));
        let (read, checksum) = checksum(client, name, first, last, out).await?;
        if read == messages {
            return Ok(StreamBackup {
                name: name.to_owned(),
                file,
                file_bytes,
                file_sha256,
                config,
                state,
                messages,
                first_sequence: first,
                last_sequence: last,
                checksum,
            });
        }
        out.warn(format_args!(
            "{name}: {read} of the snapshot's {messages} messages were still there when read back \
             (deleted meanwhile); snapshot again ({attempt}/{ATTEMPTS})"
        ));
    }
    Err(Failure::unavailable(format!(
        "{name} kept losing messages while it was backed up; retry when it is quieter"
    ))
    .into())
}

/// Takes a snapshot of `name` into `path`; returns the stream's config and
/// state at the snapshot, the file's size and SHA-256.
async fn snapshot(
    client: &async_nats::Client,
    name: &str,
    path: &Path,
    out: &mut Out<'_>,
) -> anyhow::Result<(Value, Value, u64, String)> {
    let inbox = client.new_inbox();
    let mut chunks = client.subscribe(inbox.clone()).await?;
    client.flush().await?;
    let reply = api(
        client,
        &format!("$JS.API.STREAM.SNAPSHOT.{name}"),
        &json!({"deliver_subject": inbox, "no_consumers": true, "chunk_size": CHUNK}),
    )
    .await?;
    let (config, state) = (reply["config"].clone(), reply["state"].clone());
    let mut file = std::io::BufWriter::new(
        std::fs::File::create(path).with_context(|| format!("cannot create {}", path.display()))?,
    );
    let mut hasher = Sha256::new();
    let mut total = 0u64;
    let bar = out.progress(state["bytes"].as_u64().unwrap_or(0), "bytes (stored)");
    bar.set_message(format!("{name} snapshot"));
    loop {
        let chunk = tokio::time::timeout(WAIT, chunks.next())
            .await
            .map_err(|_| {
                Failure::new(
                    ErrorCode::Timeout,
                    format!("the snapshot of {name} stalled: no chunk within {WAIT:?}"),
                )
            })?
            .ok_or_else(|| anyhow!("the snapshot subscription of {name} ended"))?;
        if chunk.payload.is_empty() {
            if let Some(status) = chunk.status.filter(|s| s.as_u16() != 204) {
                out.abandon(&bar);
                return Err(Failure::unavailable(format!(
                    "the snapshot of {name} failed: {} {}",
                    status.as_u16(),
                    chunk.description.as_deref().unwrap_or("")
                ))
                .into());
            }
            break;
        }
        file.write_all(&chunk.payload)?;
        hasher.update(&chunk.payload);
        total += chunk.payload.len() as u64;
        bar.set_position(total);
        if let Some(ack) = chunk.reply {
            client.publish(ack, bytes::Bytes::new()).await?;
        }
    }
    file.flush()?;
    file.into_inner()
        .map_err(|e| anyhow!("writing {}: {e}", path.display()))?
        .sync_all()?;
    out.finish(&bar);
    Ok((config, state, total, hex(&hasher.finalize())))
}

/// How many messages the stream holds from `first` to `last` now, and the
/// checksum over them: read through an ordered consumer.
async fn checksum(
    client: &async_nats::Client,
    name: &str,
    first: u64,
    last: u64,
    out: &mut Out<'_>,
) -> anyhow::Result<(u64, String)> {
    let mut hasher = Sha256::new();
    let mut count = 0u64;
    let now = stream_info(client, name)
        .await?
        .ok_or_else(|| Failure::not_found(format!("the stream {name} is gone")))?;
    let now_messages = now["state"]["messages"].as_u64().unwrap_or(0);
    let now_last = now["state"]["last_seq"].as_u64().unwrap_or(0);
    if first == 0 || last < first || now_messages == 0 || now_last < first {
        return Ok((0, hex(&hasher.finalize())));
    }
    let js = async_nats::jetstream::new(client.clone());
    let stream = js.get_stream(name).await?;
    let consumer = stream
        .create_consumer(OrderedConfig {
            deliver_policy: DeliverPolicy::ByStartSequence {
                start_sequence: first,
            },
            ..Default::default()
        })
        .await
        .with_context(|| format!("cannot read {name}"))?;
    let mut messages = consumer.messages().await?;
    let bar = out.progress(last - first + 1, "messages");
    bar.set_message(format!("{name} checksum"));
    loop {
        let message = tokio::time::timeout(WAIT, messages.next())
            .await
            .map_err(|_| {
                Failure::new(
                    ErrorCode::Timeout,
                    format!("reading {name} stalled: no message within {WAIT:?}"),
                )
            })?
            .ok_or_else(|| anyhow!("reading {name}: the ordered consumer ended"))?
            .map_err(|e| anyhow!("reading {name}: {e}"))?;
        let info = message.info().map_err(|e| anyhow!("reading {name}: {e}"))?;
        let (sequence, pending) = (info.stream_sequence, info.pending);
        if sequence > last {
            break;
        }
        hash_message(
            &mut hasher,
            sequence,
            message.subject.as_str(),
            message.headers.as_ref(),
            &message.payload,
        );
        count += 1;
        bar.set_position(sequence - first + 1);
        if sequence == last || pending == 0 {
            break;
        }
    }
    out.finish(&bar);
    Ok((count, hex(&hasher.finalize())))
}

/// Feeds one message into the checksum: sequence (8 bytes big-endian),
/// then length-prefixed (8 bytes) subject, headers (names sorted, each
/// name with its values in order) and body.
pub fn hash_message(
    hasher: &mut Sha256,
    sequence: u64,
    subject: &str,
    headers: Option<&HeaderMap>,
    body: &[u8],
) {
    let mut field = |bytes: &[u8]| {
        hasher.update((bytes.len() as u64).to_be_bytes());
        hasher.update(bytes);
    };
    field(&sequence.to_be_bytes());
    field(subject.as_bytes());
    let mut names: Vec<_> = headers.map(|h| h.iter().collect()).unwrap_or_default();
    names.sort_by(|a, b| AsRef::<str>::as_ref(a.0).cmp(b.0.as_ref()));
    field(&(names.len() as u64).to_be_bytes());
    for (name, values) in names {
        field(AsRef::<[u8]>::as_ref(name));
        field(&(values.len() as u64).to_be_bytes());
        for value in values {
            field(value.as_str().as_bytes());
        }
    }
    field(body);
}

pub async fn restore(ctx: &Context, args: RestoreArgs, out: &mut Out<'_>) -> anyhow::Result<()> {
    let manifest = read_manifest(&args.dir)?;
    let replicas = args.replicas.unwrap_or(ctx.config.store.replicas);
    if !(1..=5).contains(&replicas) {
        return Err(Failure::invalid("--replicas must be between 1 and 5").into());
    }
    for stream in &manifest.streams {
        check_file(&args.dir, stream)?;
    }
    let client = ctx.client().await?;
    let mut existing = Vec::new();
    for stream in &manifest.streams {
        if stream_info(&client, &stream.name).await?.is_some() {
            existing.push(stream.name.as_str());
        }
    }
    if !existing.is_empty() && !args.force {
        return Err(Failure::new(
            ErrorCode::Conflict,
            format!(
                "refusing to restore: the stream(s) {} already exist on this server; restore onto \
                 a server without them, or pass --force to delete them (and everything in them) first",
                existing.join(", ")
            ),
        )
        .into());
    }
    for name in existing {
        api(
            &client,
            &format!("$JS.API.STREAM.DELETE.{name}"),
            &json!({}),
        )
        .await?;
        out.warn(format_args!("{name}: deleted (--force)"));
    }
    let mut results = Vec::new();
    let mut failures = Vec::new();
    for stream in &manifest.streams {
        upload(&client, &args.dir, stream, replicas, out).await?;
        let result = verify(&client, stream, out).await?;
        if let Some(why) = result["mismatch"].as_str() {
            failures.push(format!("{}: {why}", stream.name));
        }
        if !out.json {
            out.line(format_args!(
                "{}: restored {} messages, sequences {}..={}, {}",
                stream.name,
                result["messages"],
                result["first_sequence"],
                result["last_sequence"],
                result["mismatch"]
                    .as_str()
                    .map_or("verified".to_owned(), |m| format!("MISMATCH: {m}"))
            ))?;
        }
        results.push(result);
    }
    let verified = failures.is_empty();
    if out.json {
        out.doc(&json!({"verified": verified, "replicas": replicas, "streams": results}))?;
    }
    if !verified {
        return Err(Failure {
            code: ErrorCode::Internal,
            message: format!(
                "the restored store does not match the backup's manifest: {}",
                failures.join("; ")
            ),
            printed: out.json,
        }
        .into());
    }
    Ok(())
}

fn read_manifest(dir: &Path) -> anyhow::Result<Manifest> {
    let path = dir.join(MANIFEST);
    let text = std::fs::read(&path).map_err(|e| {
        Failure::invalid(format!(
            "{} is not a backup: cannot read {}: {e}",
            dir.display(),
            path.display()
        ))
    })?;
    let manifest: Manifest = serde_json::from_slice(&text)
        .map_err(|e| Failure::invalid(format!("{} is damaged: {e}", path.display())))?;
    if manifest.format != FORMAT {
        return Err(Failure::invalid(format!(
            "{} has backup format {}; this version reads {FORMAT}",
            path.display(),
            manifest.format
        ))
        .into());
    }
    Ok(manifest)
}

fn snapshot_path(dir: &Path, stream: &StreamBackup) -> anyhow::Result<PathBuf> {
    if stream.file.contains(['/', '\\']) || stream.file.starts_with('.') {
        return Err(
            Failure::invalid(format!("bad file name {:?} in the manifest", stream.file)).into(),
        );
    }
    Ok(dir.join(&stream.file))
}

/// The snapshot file is the one the manifest describes (size, SHA-256).
fn check_file(dir: &Path, stream: &StreamBackup) -> anyhow::Result<()> {
    let path = snapshot_path(dir, stream)?;
    let mut file = std::fs::File::open(&path)
        .map_err(|e| Failure::invalid(format!("cannot read {}: {e}", path.display())))?;
    let mut hasher = Sha256::new();
    let mut buffer = vec![0; CHUNK];
    let mut size = 0u64;
    loop {
        let n = file.read(&mut buffer)?;
        if n == 0 {
            break;
        }
        hasher.update(&buffer[..n]);
        size += n as u64;
    }
    if size != stream.file_bytes || hex(&hasher.finalize()) != stream.file_sha256 {
        return Err(Failure::invalid(format!(
            "{} is damaged: its size or SHA-256 differs from the manifest",
            path.display()
        ))
        .into());
    }
    Ok(())
}

async fn upload(
    client: &async_nats::Client,
    dir: &Path,
    stream: &StreamBackup,
    replicas: usize,
    out: &mut Out<'_>,
) -> anyhow::Result<()> {
    let name = &stream.name;
    let mut config = stream.config.clone();
    config["num_replicas"] = json!(replicas);
    let reply = api(
        client,
        &format!("$JS.API.STREAM.RESTORE.{name}"),
        &json!({"config": config, "state": stream.state}),
    )
    .await?;
    let deliver = reply["deliver_subject"]
        .as_str()
        .ok_or_else(|| anyhow!("the restore of {name} was answered without a deliver subject"))?
        .to_owned();
    let mut file = std::fs::File::open(snapshot_path(dir, stream)?)?;
    let bar = out.progress(stream.file_bytes, "bytes");
    bar.set_message(format!("{name} restore"));
    let mut buffer = vec![0; CHUNK];
    let mut sent = 0u64;
    loop {
        let n = read_full(&mut file, &mut buffer)?;
        if n == 0 {
            break;
        }
        let answer = send(client, &deliver, buffer[..n].to_vec(), name).await?;
        if !answer.payload.is_empty() {
            check_api_reply(&answer.payload, &format!("restoring {name}"))?;
        }
        sent += n as u64;
        bar.set_position(sent);
    }
    let done = send(client, &deliver, Vec::new(), name).await?;
    check_api_reply(&done.payload, &format!("restoring {name}"))?;
    out.finish(&bar);
    Ok(())
}

fn read_full(file: &mut std::fs::File, buffer: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buffer.len() {
        match file.read(&mut buffer[n..])? {
            0 => break,
            read => n += read,
        }
    }
    Ok(n)
}

async fn send(
    client: &async_nats::Client,
    subject: &str,
    body: Vec<u8>,
    name: &str,
) -> anyhow::Result<async_nats::Message> {
    let request = Request::new().payload(body.into()).timeout(Some(WAIT));
    client
        .send_request(subject.to_owned(), request)
        .await
        .map_err(|e| Failure::unavailable(format!("restoring {name}: {e}")).into())
}

/// The restored stream against its manifest entry.
async fn verify(
    client: &async_nats::Client,
    stream: &StreamBackup,
    out: &mut Out<'_>,
) -> anyhow::Result<Value> {
    let name = &stream.name;
    let info = stream_info(client, name)
        .await?
        .ok_or_else(|| anyhow!("{name} is not there after its restore"))?;
    let number = |k: &str| info["state"][k].as_u64().unwrap_or(0);
    let (messages, first, last) = (number("messages"), number("first_seq"), number("last_seq"));
    let (read, checksum) = checksum(client, name, first, last, out).await?;
    let mut mismatches = Vec::new();
    for (what, got, want) in [
        ("messages", messages, stream.messages),
        ("messages read back", read, stream.messages),
        ("first sequence", first, stream.first_sequence),
        ("last sequence", last, stream.last_sequence),
    ] {
        // An empty stream's first sequence is 0 or last + 1, as it came.
        if got != want && !(what == "first sequence" && messages == 0 && stream.messages == 0) {
            mismatches.push(format!("{what} {got}, the backup has {want}"));
        }
    }
    if checksum != stream.checksum {
        mismatches.push("checksum differs".to_owned());
    }
    Ok(json!({
        "name": name,
        "messages": messages,
        "first_sequence": first,
        "last_sequence": last,
        "checksum": checksum,
        "mismatch": if mismatches.is_empty() { Value::Null } else { json!(mismatches.join(", ")) },
    }))
}

/// `$JS.API.STREAM.INFO.<name>`: the info, or `None` if there is no such
/// stream.
async fn stream_info(client: &async_nats::Client, name: &str) -> anyhow::Result<Option<Value>> {
    let subject = format!("$JS.API.STREAM.INFO.{name}");
    let reply = request(client, &subject, &json!({})).await?;
    let value: Value = serde_json::from_slice(&reply.payload)
        .with_context(|| format!("the answer on {subject} is not JSON"))?;
    if value["error"]["err_code"].as_u64() == Some(STREAM_NOT_FOUND) {
        return Ok(None);
    }
    check_api_value(value, &subject).map(Some)
}

/// A JetStream API request; its answer, or the error it carries.
async fn api(client: &async_nats::Client, subject: &str, body: &Value) -> anyhow::Result<Value> {
    let reply = request(client, subject, body).await?;
    check_api_reply(&reply.payload, subject)
}

async fn request(
    client: &async_nats::Client,
    subject: &str,
    body: &Value,
) -> anyhow::Result<async_nats::Message> {
    let request = Request::new()
        .payload(body.to_string().into())
        .timeout(Some(WAIT));
    client
        .send_request(subject.to_owned(), request)
        .await
        .map_err(|e| {
            Failure::unavailable(format!(
                "JetStream did not answer on {subject}: {e} (is JetStream enabled for this user?)"
            ))
            .into()
        })
}

fn check_api_reply(payload: &[u8], what: &str) -> anyhow::Result<Value> {
    let value: Value = serde_json::from_slice(payload)
        .with_context(|| format!("the answer {what} is not JSON"))?;
    check_api_value(value, what)
}

fn check_api_value(value: Value, what: &str) -> anyhow::Result<Value> {
    match value.get("error") {
        None | Some(Value::Null) => Ok(value),
        Some(error) => {
            let code = match error["code"].as_u64() {
                Some(404) => ErrorCode::NotFound,
                Some(400) => ErrorCode::Invalid,
                Some(503) => ErrorCode::Unavailable,
                _ => ErrorCode::Internal,
            };
            Err(Failure::new(
                code,
                format!(
                    "JetStream refused {what}: {} (error {})",
                    error["description"].as_str().unwrap_or("no description"),
                    error["err_code"]
                ),
            )
            .into())
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn the_checksum_sees_every_part_of_a_message() {
        let sum = |seq: u64, subject: &str, headers: &[(&str, &str)], body: &[u8]| {
            let mut map = HeaderMap::new();
            for (k, v) in headers {
                map.append(*k, *v);
            }
            let mut hasher = Sha256::new();
            hash_message(&mut hasher, seq, subject, Some(&map), body);
            hex(&hasher.finalize())
        };
        let base = sum(1, "events.a.1", &[("A", "1"), ("B", "2")], b"x");
        assert_eq!(base, sum(1, "events.a.1", &[("B", "2"), ("A", "1")], b"x"));
        assert_ne!(base, sum(2, "events.a.1", &[("A", "1"), ("B", "2")], b"x"));
        assert_ne!(base, sum(1, "events.a.2", &[("A", "1"), ("B", "2")], b"x"));
        assert_ne!(base, sum(1, "events.a.1", &[("A", "1"), ("B", "3")], b"x"));
        assert_ne!(base, sum(1, "events.a.1", &[("A", "1"), ("B", "2")], b"y"));
        assert_ne!(base, sum(1, "events.a.", &[("A", "1"), ("B", "2")], b"1x"));
    }
}
