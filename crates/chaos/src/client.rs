//! A client as docs/PROTOCOL.md tells one to behave: every command carries
//! a command id, an ambiguous outcome (no answer in time, no responders,
//! `unavailable`, `timeout`) is resent with the same id until a definite
//! answer or a deadline, and every definite answer is recorded.

use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::Context;
use async_nats::{Client, RequestErrorKind};
use jetsource_core::protocol::{decode_reply, CommandOutcome, ErrorBody, ErrorCode};
use serde_json::{json, Value};
use tokio::time::Instant;

use crate::load::Stats;

/// Connects to the cluster (any node) as NATS user `role` (`user`,
/// `password`) over TLS trusting `ca`, with the role's own reply inboxes
/// (the only ones nats/accounts.conf lets it read), retrying until `within`
/// has passed.
pub async fn connect(
    urls: &str,
    ca: &Path,
    name: &str,
    role: (&str, &str),
    within: Duration,
) -> anyhow::Result<Client> {
    let servers: Vec<&str> = urls.split(',').collect();
    let deadline = Instant::now() + within;
    loop {
        let attempt =
            async_nats::ConnectOptions::with_user_and_password(role.0.into(), role.1.into())
                .custom_inbox_prefix(format!("_INBOX.{}", role.0))
                .add_root_certificates(ca.to_owned())
                .require_tls(true)
                .name(name)
                .connect(servers.as_slice())
                .await;
        match attempt {
            Ok(client) => return Ok(client),
            Err(e) if Instant::now() >= deadline => {
                return Err(e).with_context(|| format!("cannot connect to {urls}"))
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

/// A command as sent: which aggregate, what, and under which id.
#[derive(Debug, Clone)]
pub struct Command {
    pub account: String,
    pub command_type: &'static str,
    pub data: Value,
    pub command_id: String,
}

/// The definite result of a command, or why there was none.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// `ok`: stored, with the aggregate's version and the stream sequence of
    /// the command's last event.
    Acked {
        version: u64,
        sequence: u64,
        /// On every aggregate the command involved.
        events: usize,
    },
    /// An error reply that is not ambiguous (`invalid`, `rejected`,
    /// `conflict`, `internal`, ...): nothing may have been stored.
    Refused { code: ErrorCode, message: String },
    /// Still ambiguous at the deadline: may or may not be stored (at most
    /// once).
    Undecided { last: String },
}

/// A command and its outcome.
#[derive(Debug, Clone)]
pub struct Record {
    pub command: Command,
    pub outcome: Outcome,
    /// Requests sent: 1 + resends.
    pub attempts: u32,
}

/// How long to wait for each reply, and for a definite one.
#[derive(Debug, Clone, Copy)]
pub struct Patience {
    pub request: Duration,
    pub deadline: Instant,
}

/// One answer to one request.
enum Reply {
    Definite(Outcome),
    Ambiguous { kind: &'static str, detail: String },
}

/// Sends `command`, resending the same body (same command id) after each
/// ambiguous outcome, with a short backoff, until a definite answer or the
/// deadline.
pub async fn send(client: &Client, stats: &Stats, command: Command, patience: Patience) -> Record {
    let subject = format!("cmd.account.{}", command.account);
    let body = json!({
        "type": command.command_type,
        "data": command.data,
        "command_id": command.command_id,
    })
    .to_string();
    let mut attempts = 0u32;
    loop {
        attempts += 1;
        let reply = request(client, &subject, &body, patience.request).await;
        let outcome = match reply {
            Reply::Definite(outcome) => outcome,
            Reply::Ambiguous { kind, detail } => {
                stats.ambiguous(kind);
                if Instant::now() >= patience.deadline {
                    Outcome::Undecided {
                        last: format!("{kind}: {detail}"),
                    }
                } else {
                    stats.resends.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(backoff(attempts)).await;
                    continue;
                }
            }
        };
        stats.record(&outcome);
        return Record {
            command,
            outcome,
            attempts,
        };
    }
}

/// 50 ms doubling to 1 s: quick after a blip, gentle during an election.
fn backoff(attempts: u32) -> Duration {
    Duration::from_millis(50u64 << attempts.min(5)).min(Duration::from_secs(1))
}

async fn request(client: &Client, subject: &str, body: &str, timeout: Duration) -> Reply {
    let request = async_nats::Request::new()
        .payload(body.to_owned().into())
        .timeout(Some(timeout));
    let message = match client.send_request(subject.to_owned(), request).await {
        Ok(message) => message,
        Err(e) => {
            let kind = match e.kind() {
                RequestErrorKind::TimedOut => "no reply in time",
                RequestErrorKind::NoResponders => "no responders",
                _ => "request failed",
            };
            return Reply::Ambiguous {
                kind,
                detail: e.to_string(),
            };
        }
    };
    match decode_reply::<CommandOutcome>(&message.payload) {
        Ok(Ok(outcome)) => Reply::Definite(Outcome::Acked {
            version: outcome.version,
            sequence: outcome.sequence,
            events: outcome.events.len()
                + outcome.others.iter().map(|o| o.events.len()).sum::<usize>(),
        }),
        Ok(Err(ErrorBody { code, message })) => match code {
            ErrorCode::Unavailable => Reply::Ambiguous {
                kind: "unavailable",
                detail: message,
            },
            ErrorCode::Timeout => Reply::Ambiguous {
                kind: "timeout",
                detail: message,
            },
            code => Reply::Definite(Outcome::Refused { code, message }),
        },
        Err(e) => Reply::Ambiguous {
            kind: "undecodable reply",
            detail: e.to_string(),
        },
    }
}

/// A query's answer.
#[derive(Debug, Clone)]
pub enum Answer {
    Ok {
        sequence: u64,
        data: Value,
    },
    Error(ErrorBody),
    /// No reply (timeout, no responders, connection trouble).
    NoReply(String),
}

/// Sends a query, waiting for `min_sequence` up to `wait` on the server
/// side. `internal` replies are counted in `stats`.
pub async fn query(
    client: &Client,
    stats: &Stats,
    subject: &str,
    min_sequence: Option<u64>,
    wait: Duration,
) -> Answer {
    let mut body = json!({"timeout_ms": wait.as_millis() as u64});
    if let Some(min) = min_sequence {
        body["min_sequence"] = min.into();
    }
    let request = async_nats::Request::new()
        .payload(body.to_string().into())
        .timeout(Some(wait + Duration::from_secs(2)));
    let message = match client.send_request(subject.to_owned(), request).await {
        Ok(message) => message,
        Err(e) => return Answer::NoReply(e.to_string()),
    };
    match decode_reply::<Value>(&message.payload) {
        Ok(Ok(mut value)) => Answer::Ok {
            sequence: value["sequence"].as_u64().unwrap_or(0),
            data: value["data"].take(),
        },
        Ok(Err(error)) => {
            if error.code == ErrorCode::Internal {
                stats.query_internal.fetch_add(1, Ordering::Relaxed);
                stats.remember_internal(&format!("query {subject}: {}", error.message));
            }
            Answer::Error(error)
        }
        Err(e) => Answer::NoReply(format!("undecodable reply: {e}")),
    }
}
