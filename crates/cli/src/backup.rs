//! `backup` and `restore`: the event store's streams (events, dead letters,
//! snapshots) through JetStream's own snapshot/restore API
//! (`jetsource_core::store::backup`), with a manifest that is checked again
//! after a restore.
//!
//! Backup: each stream's snapshot is kept as the server sends it in
//! `<stream>.snapshot`; its state at the snapshot (messages, first and last
//! sequence) goes into `manifest.json` with a checksum over the messages up
//! to its last sequence, read back right after. A stream that lost messages
//! of that range meanwhile (the dead-letter and snapshot streams delete) is
//! snapshotted again. Snapshots and dead letters are taken before the event
//! stream, so none refers to an event after the backup.
//!
//! Restore: refused, before anything is sent, if a snapshot file does not
//! match the manifest or if any of the backup's streams exists (unless
//! `--force` deletes them). Then each stream is restored and verified
//! against the manifest: message count, first and last sequence, checksum.

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use indicatif::ProgressBar;
use jetsource_core::protocol::ErrorCode;
use jetsource_core::store::backup as js;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::args::{BackupArgs, RestoreArgs};
use crate::context::Context;
use crate::exit::Failure;
use crate::output::Out;

/// The manifest's file name in a backup directory.
pub const MANIFEST: &str = "manifest.json";
/// Version of the backup layout.
const FORMAT: u32 = 1;
/// Snapshots of one stream before giving up on it changing under us.
const ATTEMPTS: usize = 5;

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
    /// from `first_sequence` to `last_sequence`, in order (see [`js::hash_message`]).
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
        format!("KV_{}", ctx.config.snapshot.bucket),
        ctx.config.projector.dead_letter_stream.clone(),
        ctx.config.store.stream.clone(),
    ];
    if js::stream_info(&client, &ctx.config.store.stream)
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
    for name in candidates {
        if js::stream_info(&client, &name).await?.is_none() {
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
        let js::Snapshot {
            config,
            state,
            bytes: file_bytes,
            sha256: file_sha256,
        } = snapshot(client, name, &path, out).await?;
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

/// Takes a snapshot of `name` into `path`.
async fn snapshot(
    client: &async_nats::Client,
    name: &str,
    path: &Path,
    out: &mut Out<'_>,
) -> anyhow::Result<js::Snapshot> {
    let mut file = std::io::BufWriter::new(
        std::fs::File::create(path).with_context(|| format!("cannot create {}", path.display()))?,
    );
    let bar = out.progress(0, "bytes");
    bar.set_message(format!("{name} snapshot"));
    let mut progress = |n: u64, stored: u64| {
        bar.set_length(stored.max(n));
        bar.set_position(n);
    };
    let snapshot = js::snapshot(client, name, &mut file, &mut progress).await;
    let snapshot = match snapshot {
        Ok(snapshot) => snapshot,
        Err(e) => {
            out.abandon(&bar);
            return Err(e.into());
        }
    };
    out.finish(&bar);
    file.into_inner()
        .map_err(|e| anyhow::anyhow!("writing {}: {e}", path.display()))?
        .sync_all()?;
    Ok(snapshot)
}

/// [`js::checksum`] with a progress bar.
async fn checksum(
    client: &async_nats::Client,
    name: &str,
    first: u64,
    last: u64,
    out: &mut Out<'_>,
) -> anyhow::Result<(u64, String)> {
    let bar: ProgressBar = out.progress(last.saturating_sub(first) + 1, "messages");
    bar.set_message(format!("{name} checksum"));
    let result = js::checksum(client, name, first, last, &mut |n| bar.set_position(n)).await;
    out.finish(&bar);
    Ok(result?)
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
        if js::stream_info(&client, &stream.name).await?.is_some() {
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
        js::delete_stream(&client, name).await?;
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
    let (size, sha256) = js::sha256_of(&mut file)?;
    if size != stream.file_bytes || sha256 != stream.file_sha256 {
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
    let mut file = std::fs::File::open(snapshot_path(dir, stream)?)?;
    let bar = out.progress(stream.file_bytes, "bytes");
    bar.set_message(format!("{name} restore"));
    let restored = js::restore(client, name, &config, &stream.state, &mut file, &mut |n| {
        bar.set_position(n)
    })
    .await;
    match restored {
        Ok(()) => out.finish(&bar),
        Err(e) => {
            out.abandon(&bar);
            return Err(e.into());
        }
    }
    Ok(())
}

/// The restored stream against its manifest entry.
async fn verify(
    client: &async_nats::Client,
    stream: &StreamBackup,
    out: &mut Out<'_>,
) -> anyhow::Result<Value> {
    let name = &stream.name;
    let info = js::stream_info(client, name)
        .await?
        .ok_or_else(|| anyhow::anyhow!("{name} is not there after its restore"))?;
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
