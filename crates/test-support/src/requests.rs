//! Requests as a client sends them: a command on `cmd.<type>.<id>`, a query
//! on `query.<name>[.<key>]`, decoded into the wire protocol's types. Every
//! test that talks to a fleet uses these instead of its own copy.

use std::time::Duration;

use jetsource_core::protocol::{decode_reply, CommandOutcome, ErrorBody};
use serde::de::DeserializeOwned;
use serde_json::Value;

/// How long a test waits for any reply before failing: far beyond what a
/// healthy fleet needs, short enough to fail a wedged one.
const REPLY_WAIT: Duration = Duration::from_secs(40);

async fn request<T: DeserializeOwned>(
    client: &async_nats::Client,
    subject: String,
    body: &Value,
) -> Result<T, ErrorBody> {
    let request = client.request(subject.clone(), body.to_string().into());
    let reply = match tokio::time::timeout(REPLY_WAIT, request).await {
        Ok(Ok(reply)) => reply,
        Ok(Err(e)) => panic!("request on {subject} failed: {e}"),
        Err(_) => panic!("no reply on {subject} within {REPLY_WAIT:?}"),
    };
    decode_reply(&reply.payload)
        .unwrap_or_else(|e| panic!("reply on {subject} is not a jetsource reply: {e}"))
}

/// Sends `body` (`{"type", "data", ...}`) as a command to
/// `cmd.<aggregate_type>.<id>`.
pub async fn send(
    client: &async_nats::Client,
    aggregate_type: &str,
    id: &str,
    body: Value,
) -> Result<CommandOutcome, ErrorBody> {
    request(client, format!("cmd.{aggregate_type}.{id}"), &body).await
}

/// Asks a query on `subject`; `Ok({"sequence", "data"})` or the error.
pub async fn query(
    client: &async_nats::Client,
    subject: &str,
    body: Value,
) -> Result<Value, ErrorBody> {
    request(client, subject.to_owned(), &body).await
}
