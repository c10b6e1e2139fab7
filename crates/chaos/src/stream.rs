//! What the cluster holds, read independently of the code under test: the
//! whole event stream through an ordered consumer (delivered by the stream
//! leader, unlike direct gets, which a lagging replica may answer), and
//! each node's own replica state from its HTTP monitoring endpoint.

use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use async_nats::jetstream::consumer::pull::OrderedConfig;
use async_nats::jetstream::consumer::DeliverPolicy;
use async_nats::Client;
use futures::StreamExt;
use jetsource_core::envelope::RecordedEvent;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;

pub const STREAM: &str = "EVENTS";

/// The stream as read at the end of the run.
#[derive(Debug, Default)]
pub struct Contents {
    /// The stream's last sequence when the read started.
    pub last_sequence: u64,
    /// Messages the stream reported holding.
    pub messages: u64,
    pub events: Vec<RecordedEvent>,
    /// Stored messages that are not valid jetsource events.
    pub malformed: Vec<String>,
}

/// Reads every message up to the stream's current last sequence.
pub async fn read_all(admin: &Client, within: Duration) -> anyhow::Result<Contents> {
    let deadline = Instant::now() + within;
    let js = async_nats::jetstream::new(admin.clone());
    let mut stream = js.get_stream(STREAM).await.context("stream info")?;
    let state = stream.info().await.context("stream info")?.state.clone();
    let mut contents = Contents {
        last_sequence: state.last_sequence,
        messages: state.messages,
        ..Default::default()
    };
    if state.messages == 0 {
        return Ok(contents);
    }
    let consumer = stream
        .create_consumer(OrderedConfig {
            filter_subject: "events.>".into(),
            deliver_policy: DeliverPolicy::All,
            ..Default::default()
        })
        .await
        .context("ordered consumer")?;
    let mut messages = consumer.messages().await.context("ordered consumer")?;
    while contents.events.len() + contents.malformed.len() < state.messages as usize {
        let next = tokio::time::timeout_at(deadline, messages.next())
            .await
            .map_err(|_| anyhow!("reading the stream took longer than {within:?}"))?
            .ok_or_else(|| anyhow!("the ordered consumer ended early"))?;
        let message = next.map_err(|e| anyhow!("reading the stream: {e}"))?;
        let info = message
            .info()
            .map_err(|e| anyhow!("message metadata: {e}"))?;
        let (sequence, published) = (info.stream_sequence, info.published);
        match RecordedEvent::from_parts(
            message.subject.as_str(),
            sequence,
            published,
            message.headers.as_ref(),
            message.payload.clone(),
        ) {
            Ok(event) => contents.events.push(event),
            Err(e) => contents.malformed.push(e.to_string()),
        }
        if sequence >= state.last_sequence {
            break;
        }
    }
    Ok(contents)
}

/// One node's copy of the stream, from its `/jsz`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Replica {
    pub node: String,
    pub messages: u64,
    pub bytes: u64,
    pub first_seq: u64,
    pub last_seq: u64,
    pub leader: bool,
}

/// Each node's replica state; polled until all agree and reach
/// `last_sequence` (a node restarted late may still be catching up), or
/// `within` has passed: then the last, disagreeing, states.
pub async fn replicas(
    nodes: &[(String, u16)],
    last_sequence: u64,
    within: Duration,
) -> Result<Vec<Replica>, String> {
    let deadline = Instant::now() + within;
    loop {
        let states = read_replicas(nodes).await;
        let settled = states.as_ref().is_ok_and(|s| {
            s.iter().all(|r| r.last_seq >= last_sequence)
                && s.windows(2).all(|w| same_data(&w[0], &w[1]))
        });
        if settled || Instant::now() >= deadline {
            return states;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Whether two replicas hold the same messages.
pub fn same_data(a: &Replica, b: &Replica) -> bool {
    (a.messages, a.bytes, a.first_seq, a.last_seq) == (b.messages, b.bytes, b.first_seq, b.last_seq)
}

async fn read_replicas(nodes: &[(String, u16)]) -> Result<Vec<Replica>, String> {
    let mut out = Vec::new();
    for (node, port) in nodes {
        let jsz = http_get(*port, "/jsz?accounts=true&streams=true")
            .await
            .map_err(|e| format!("{node}: {e:#}"))?;
        out.push(replica(node, &jsz).ok_or_else(|| format!("{node}: no stream {STREAM} in /jsz"))?);
    }
    Ok(out)
}

/// The stream's entry in a `/jsz?accounts=true&streams=true` document.
fn replica(node: &str, jsz: &Value) -> Option<Replica> {
    let detail = jsz["account_details"]
        .as_array()?
        .iter()
        .filter_map(|a| a["stream_detail"].as_array())
        .flatten()
        .find(|s| s["name"] == STREAM)?;
    let state = &detail["state"];
    let n = |field: &str| state[field].as_u64().unwrap_or(0);
    Some(Replica {
        node: node.to_owned(),
        messages: n("messages"),
        bytes: n("bytes"),
        first_seq: n("first_seq"),
        last_seq: n("last_seq"),
        leader: detail["cluster"]["leader"].as_str() == Some(node),
    })
}

/// A minimal HTTP/1.0 GET on loopback, for the monitoring endpoint (the
/// server closes the connection after the answer).
async fn http_get(port: u16, path: &str) -> anyhow::Result<Value> {
    let io = async {
        let mut socket = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
        let request = format!("GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n");
        socket.write_all(request.as_bytes()).await?;
        let mut response = Vec::new();
        socket.read_to_end(&mut response).await?;
        anyhow::Ok(response)
    };
    let response = tokio::time::timeout(Duration::from_secs(5), io)
        .await
        .map_err(|_| anyhow!("no answer within 5 s"))??;
    let text = String::from_utf8_lossy(&response);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .context("not an HTTP response")?;
    if !head.starts_with("HTTP/1.1 200") && !head.starts_with("HTTP/1.0 200") {
        bail!("{}", head.lines().next().unwrap_or_default());
    }
    Ok(serde_json::from_str(body)?)
}
