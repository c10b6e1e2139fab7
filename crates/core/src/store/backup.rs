//! Stream backups through JetStream's own snapshot and restore API (the
//! stream's files, so every message keeps its sequence), and a checksum
//! over a stream's messages that is the same before and after.
//!
//! Snapshot: `$JS.API.STREAM.SNAPSHOT.<stream>` with a deliver subject; the
//! server answers with the stream's config and state at the snapshot, then
//! sends the files (an s2-compressed tar) in chunks to the deliver subject,
//! each with a reply subject acked for flow control, and ends with an empty
//! message (status 204, or an error status).
//!
//! Restore: `$JS.API.STREAM.RESTORE.<stream>` with the config and state,
//! answered with a subject; the chunks go to it in order as requests (each
//! answered empty, or with an error), and an empty request ends the
//! restore, answered with the stream's info or an error. The server refuses
//! to restore over an existing stream.
//!
//! The CLI's `backup` and `restore` drive these; nothing else may (the
//! event stream is managed in this module's parent only).

use std::io::{Read, Write};
use std::time::Duration;

use async_nats::jetstream::consumer::pull::OrderedConfig;
use async_nats::jetstream::consumer::DeliverPolicy;
use async_nats::{HeaderMap, Request};
use futures::StreamExt;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use super::codes::{NO_MESSAGE_FOUND, STREAM_NOT_FOUND};
use super::{StoreError, StoreErrorKind};

/// Snapshot chunk size asked of the server; a restore uploads the same.
pub const CHUNK: usize = 128 * 1024;
/// How long one API call, one chunk or one message of a read-back may take.
const WAIT: Duration = Duration::from_secs(60);
/// How long a restore chunk is resent while its subject has no interest
/// yet on this server (see [`send_chunk`]).
const INTEREST_WAIT: Duration = Duration::from_secs(10);

/// What a snapshot saved.
#[derive(Debug, Clone)]
pub struct Snapshot {
    /// The stream's configuration and state at the snapshot, as the server
    /// sent them (a restore sends them back).
    pub config: Value,
    pub state: Value,
    /// Size and SHA-256 (hex) of the snapshot data written.
    pub bytes: u64,
    pub sha256: String,
}

/// `$JS.API.STREAM.INFO.<name>`: the stream's info as JSON, `None` if
/// there is no such stream.
pub async fn stream_info(
    client: &async_nats::Client,
    name: &str,
) -> Result<Option<Value>, StoreError> {
    let subject = format!("$JS.API.STREAM.INFO.{name}");
    let reply = request(client, &subject, json!({}).to_string().into_bytes()).await?;
    let value = parse(&reply.payload, &subject)?;
    if value["error"]["err_code"].as_u64() == Some(STREAM_NOT_FOUND) {
        return Ok(None);
    }
    check(value, &subject).map(Some)
}

/// Deletes the stream `name` with all its messages.
pub async fn delete_stream(client: &async_nats::Client, name: &str) -> Result<(), StoreError> {
    api(client, &format!("$JS.API.STREAM.DELETE.{name}"), json!({})).await?;
    Ok(())
}

/// Takes a snapshot of `name` (without its consumers) into `out`; calls
/// `progress` with the bytes written so far and the stream's stored bytes
/// (the snapshot is compressed: usually fewer).
pub async fn snapshot(
    client: &async_nats::Client,
    name: &str,
    out: &mut dyn Write,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<Snapshot, StoreError> {
    let what = format!("the snapshot of {name}");
    let inbox = client.new_inbox();
    let mut chunks = client
        .subscribe(inbox.clone())
        .await
        .map_err(|e| StoreError::unavailable(&what, e))?;
    client
        .flush()
        .await
        .map_err(|e| StoreError::unavailable(&what, e))?;
    let reply = api(
        client,
        &format!("$JS.API.STREAM.SNAPSHOT.{name}"),
        json!({"deliver_subject": inbox, "no_consumers": true, "chunk_size": CHUNK}),
    )
    .await?;
    let stored = reply["state"]["bytes"].as_u64().unwrap_or(0);
    let mut hasher = Sha256::new();
    let mut bytes = 0u64;
    loop {
        let chunk = tokio::time::timeout(WAIT, chunks.next())
            .await
            .map_err(|_| {
                StoreError::new(
                    StoreErrorKind::Unavailable,
                    format!("{what} stalled: no chunk within {WAIT:?}"),
                )
            })?
            .ok_or_else(|| {
                StoreError::new(
                    StoreErrorKind::Unavailable,
                    format!("{what}: the subscription ended"),
                )
            })?;
        if chunk.payload.is_empty() {
            if let Some(status) = chunk.status.filter(|s| s.as_u16() != 204) {
                return Err(StoreError::new(
                    StoreErrorKind::Unavailable,
                    format!(
                        "{what} failed: {} {}",
                        status.as_u16(),
                        chunk.description.as_deref().unwrap_or("")
                    ),
                ));
            }
            break;
        }
        out.write_all(&chunk.payload).map_err(|e| {
            StoreError::new(StoreErrorKind::Rejected, format!("{what}: writing: {e}"))
        })?;
        hasher.update(&chunk.payload);
        bytes += chunk.payload.len() as u64;
        progress(bytes, stored);
        if let Some(ack) = chunk.reply {
            client
                .publish(ack, bytes::Bytes::new())
                .await
                .map_err(|e| StoreError::unavailable(&what, e))?;
        }
    }
    Ok(Snapshot {
        config: reply["config"].clone(),
        state: reply["state"].clone(),
        bytes,
        sha256: hex(&hasher.finalize()),
    })
}

/// Restores the stream `name` from snapshot data read from `input`, with
/// `config` and `state` as saved by [`snapshot`]; calls `progress` with the
/// bytes sent so far. Fails if the stream exists.
pub async fn restore(
    client: &async_nats::Client,
    name: &str,
    config: &Value,
    state: &Value,
    input: &mut dyn Read,
    progress: &mut dyn FnMut(u64),
) -> Result<(), StoreError> {
    let what = format!("the restore of {name}");
    let reply = api(
        client,
        &format!("$JS.API.STREAM.RESTORE.{name}"),
        json!({"config": config, "state": state}),
    )
    .await?;
    let deliver = reply["deliver_subject"]
        .as_str()
        .ok_or_else(|| {
            StoreError::new(
                StoreErrorKind::Rejected,
                format!("{what}: answered without a deliver subject"),
            )
        })?
        .to_owned();
    let mut buffer = vec![0; CHUNK];
    let mut sent = 0u64;
    loop {
        let n = read_full(input, &mut buffer).map_err(|e| {
            StoreError::new(StoreErrorKind::Rejected, format!("{what}: reading: {e}"))
        })?;
        if n == 0 {
            break;
        }
        let answer = send_chunk(client, &deliver, buffer[..n].to_vec()).await?;
        if !answer.payload.is_empty() {
            check(parse(&answer.payload, &what)?, &what)?;
        }
        sent += n as u64;
        progress(sent);
    }
    let done = send_chunk(client, &deliver, Vec::new()).await?;
    check(parse(&done.payload, &what)?, &what)?;
    Ok(())
}

/// How many messages the stream `name` holds from `first` to `last` now,
/// and the checksum over them (see [`hash_message`]), read through an
/// ordered consumer; calls `progress` with the messages read so far.
pub async fn checksum(
    client: &async_nats::Client,
    name: &str,
    first: u64,
    last: u64,
    progress: &mut dyn FnMut(u64),
) -> Result<(u64, String), StoreError> {
    let what = format!("reading {name}");
    let mut hasher = Sha256::new();
    let mut count = 0u64;
    let now = stream_info(client, name).await?.ok_or_else(|| {
        StoreError::new(
            StoreErrorKind::NotFound,
            format!("the stream {name} is gone"),
        )
    })?;
    let now_messages = now["state"]["messages"].as_u64().unwrap_or(0);
    let now_last = now["state"]["last_seq"].as_u64().unwrap_or(0);
    if first == 0 || last < first || now_messages == 0 || now_last < first {
        return Ok((0, hex(&hasher.finalize())));
    }
    let js = async_nats::jetstream::new(client.clone());
    let stream = js
        .get_stream(name)
        .await
        .map_err(|e| StoreError::unavailable(&what, e))?;
    let consumer = stream
        .create_consumer(OrderedConfig {
            deliver_policy: DeliverPolicy::ByStartSequence {
                start_sequence: first,
            },
            ..Default::default()
        })
        .await
        .map_err(|e| StoreError::unavailable(&what, e))?;
    let mut messages = consumer
        .messages()
        .await
        .map_err(|e| StoreError::unavailable(&what, e))?;
    loop {
        let message = tokio::time::timeout(WAIT, messages.next())
            .await
            .map_err(|_| {
                StoreError::new(
                    StoreErrorKind::Unavailable,
                    format!("{what} stalled: no message within {WAIT:?}"),
                )
            })?
            .ok_or_else(|| {
                StoreError::new(
                    StoreErrorKind::Unavailable,
                    format!("{what}: the ordered consumer ended"),
                )
            })?
            .map_err(|e| StoreError::unavailable(&what, e))?;
        let info = message
            .info()
            .map_err(|e| StoreError::new(StoreErrorKind::Corrupt, format!("{what}: {e}")))?;
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
        progress(sequence - first + 1);
        // `pending` may be 0 too early (a consumer on a stream just
        // restored in a cluster): the stream leader decides.
        if sequence == last
            || (pending == 0 && !has_message_between(client, name, sequence + 1, last).await?)
        {
            break;
        }
    }
    Ok((count, hex(&hasher.finalize())))
}

/// Whether the stream `name` holds a message from `from` to `last`, asked
/// of its leader (`$JS.API.STREAM.MSG.GET` for the next message).
async fn has_message_between(
    client: &async_nats::Client,
    name: &str,
    from: u64,
    last: u64,
) -> Result<bool, StoreError> {
    let subject = format!("$JS.API.STREAM.MSG.GET.{name}");
    let body = json!({"seq": from, "next_by_subj": ">"});
    let reply = request(client, &subject, body.to_string().into_bytes()).await?;
    let value = parse(&reply.payload, &subject)?;
    if value["error"]["err_code"].as_u64() == Some(NO_MESSAGE_FOUND) {
        return Ok(false);
    }
    let value = check(value, &subject)?;
    Ok(value["message"]["seq"].as_u64().is_some_and(|s| s <= last))
}

/// Feeds one message into a checksum: sequence, subject, headers (names
/// sorted, each with its values in order) and body, every field prefixed
/// with its length (8 bytes, big-endian).
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

/// SHA-256 of data read from `input` to its end, and its size.
pub fn sha256_of(input: &mut dyn Read) -> std::io::Result<(u64, String)> {
    let mut hasher = Sha256::new();
    let mut buffer = vec![0; CHUNK];
    let mut size = 0u64;
    loop {
        let n = input.read(&mut buffer)?;
        if n == 0 {
            return Ok((size, hex(&hasher.finalize())));
        }
        hasher.update(&buffer[..n]);
        size += n as u64;
    }
}

fn read_full(input: &mut dyn Read, buffer: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buffer.len() {
        match input.read(&mut buffer[n..])? {
            0 => break,
            read => n += read,
        }
    }
    Ok(n)
}

/// A JetStream API request; its answer, or the error it carries.
async fn api(client: &async_nats::Client, subject: &str, body: Value) -> Result<Value, StoreError> {
    let reply = request(client, subject, body.to_string().into_bytes()).await?;
    check(parse(&reply.payload, subject)?, subject)
}

async fn request(
    client: &async_nats::Client,
    subject: &str,
    body: Vec<u8>,
) -> Result<async_nats::Message, StoreError> {
    let request = Request::new().payload(body.into()).timeout(Some(WAIT));
    client
        .send_request(subject.to_owned(), request)
        .await
        .map_err(|e| StoreError::unavailable(&format!("JetStream on {subject}"), e))
}

/// A restore chunk. In a cluster the server that takes the restore
/// subscribes to `deliver` itself, and the interest reaches the server this
/// client is connected to a moment later (over the routes): until then a
/// chunk has no responders. Nothing received it then, so it is sent again,
/// for up to [`INTEREST_WAIT`].
async fn send_chunk(
    client: &async_nats::Client,
    deliver: &str,
    body: Vec<u8>,
) -> Result<async_nats::Message, StoreError> {
    let deadline = tokio::time::Instant::now() + INTEREST_WAIT;
    loop {
        let request = Request::new()
            .payload(body.clone().into())
            .timeout(Some(WAIT));
        match client.send_request(deliver.to_owned(), request).await {
            Ok(answer) => return Ok(answer),
            Err(e)
                if e.kind() == async_nats::RequestErrorKind::NoResponders
                    && tokio::time::Instant::now() < deadline =>
            {
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
            Err(e) => {
                return Err(StoreError::unavailable(
                    &format!("JetStream on {deliver}"),
                    e,
                ))
            }
        }
    }
}

fn parse(payload: &[u8], what: &str) -> Result<Value, StoreError> {
    serde_json::from_slice(payload).map_err(|e| {
        StoreError::new(
            StoreErrorKind::Rejected,
            format!("{what}: the answer is not JSON: {e}"),
        )
    })
}

fn check(value: Value, what: &str) -> Result<Value, StoreError> {
    match value.get("error") {
        None | Some(Value::Null) => Ok(value),
        Some(error) => Err(StoreError::jetstream(
            what,
            error["err_code"].as_u64().or(Some(0)),
            error["description"].as_str().unwrap_or("refused"),
        )),
    }
}

/// Lower-case hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
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
