//! Request-reply with the fleet: one request, waited for as long as the
//! caller says (not the client's default request timeout), its failure
//! told by what it means.

use std::time::Duration;

use async_nats::{Message, Request, RequestErrorKind};
use jetsource_core::protocol::ErrorCode;

use crate::exit::Failure;

/// Who serves a subject.
#[derive(Debug, Clone, Copy)]
pub enum Server {
    CommandWorker,
    Projector,
}

impl Server {
    fn what(self) -> &'static str {
        match self {
            Server::CommandWorker => "command worker",
            Server::Projector => "projector",
        }
    }

    fn binary(self) -> String {
        crate::worker_binary(match self {
            Server::CommandWorker => "command",
            Server::Projector => "projector",
        })
    }

    /// What a client-side timeout leaves open.
    fn after_timeout(self) -> &'static str {
        match self {
            Server::CommandWorker => {
                "; the command may or may not have been applied: resend it with the same --command-id (never applied twice)"
            }
            Server::Projector => "; retry",
        }
    }
}

/// Sends `body` on `subject` and waits up to `wait` for the reply.
pub async fn request(
    client: &async_nats::Client,
    subject: &str,
    body: Vec<u8>,
    wait: Duration,
    server: Server,
) -> Result<Message, Failure> {
    let request = Request::new().payload(body.into()).timeout(Some(wait));
    client
        .send_request(subject.to_owned(), request)
        .await
        .map_err(|e| {
            let ms = wait.as_millis();
            let (what, binary) = (server.what(), server.binary());
            match e.kind() {
                RequestErrorKind::NoResponders => Failure::unavailable(format!(
                    "no {what} is subscribed to {subject} (no responders): is {binary} running?"
                )),
                RequestErrorKind::TimedOut => Failure::new(
                    ErrorCode::Timeout,
                    format!(
                        "no reply on {subject} within {ms} ms from the {what} serving it{}",
                        server.after_timeout()
                    ),
                ),
                RequestErrorKind::InvalidSubject => {
                    Failure::invalid(format!("{subject:?} is not a valid NATS subject"))
                }
                RequestErrorKind::MaxPayloadExceeded => {
                    Failure::invalid(format!("the request on {subject} is too large: {e}"))
                }
                RequestErrorKind::Other => {
                    Failure::unavailable(format!("request on {subject} failed: {e}"))
                }
            }
        })
}
