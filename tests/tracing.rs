//! W3C trace context end to end (docs/TRACING.md): a `traceparent` from a
//! NATS client or an HTTP caller continues through the gateway and the
//! command worker's spans, is stored with the events, and the projector's
//! apply span links to it; the workers export their spans over OTLP/HTTP to
//! a receiver in this test.

#![allow(clippy::unwrap_used)]

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use jetsource_core::protocol::{decode_reply, CommandOutcome};
use jetsource_test_support::requests::query;
use jetsource_test_support::{free_port, NatsServer, RedisServer};
use jetsource_tests::http::sha256_hex;
use jetsource_tests::{wait_for_service, Process};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use prost::Message;
use serde_json::json;

/// A span as received: names and ids in hex.
#[derive(Debug, Clone)]
struct Received {
    name: String,
    trace_id: String,
    span_id: String,
    parent_span_id: String,
    links: Vec<(String, String)>,
}

type Sink = Arc<Mutex<Vec<Received>>>;

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

async fn traces(State(sink): State<Sink>, body: Bytes) -> StatusCode {
    let Ok(request) = ExportTraceServiceRequest::decode(body) else {
        return StatusCode::BAD_REQUEST;
    };
    let mut sink = sink.lock().unwrap();
    for resource in request.resource_spans {
        for scope in resource.scope_spans {
            for span in scope.spans {
                sink.push(Received {
                    name: span.name,
                    trace_id: hex(&span.trace_id),
                    span_id: hex(&span.span_id),
                    parent_span_id: hex(&span.parent_span_id),
                    links: span
                        .links
                        .iter()
                        .map(|l| (hex(&l.trace_id), hex(&l.span_id)))
                        .collect(),
                });
            }
        }
    }
    StatusCode::OK
}

/// An OTLP/HTTP traces receiver on a free loopback port: its endpoint URL
/// and what it received.
async fn receiver() -> (String, Sink) {
    let sink = Sink::default();
    let app = axum::Router::new()
        .route("/v1/traces", axum::routing::post(traces))
        .with_state(sink.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (format!("http://{addr}/v1/traces"), sink)
}

fn find<'a>(spans: &'a [Received], name: &str, trace_id: &str) -> &'a Received {
    spans
        .iter()
        .find(|s| s.name == name && s.trace_id == trace_id)
        .unwrap_or_else(|| panic!("no span {name:?} in trace {trace_id}: {spans:#?}"))
}

const CLIENT_TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CLIENT_SPAN: &str = "00f067aa0ba902b7";
const HTTP_TRACE: &str = "0af7651916cd43dd8448eb211c80319c";
const HTTP_SPAN: &str = "b7ad6b7169203331";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_trace_shows_request_decision_append_and_projection() {
    let (endpoint, sink) = receiver().await;
    let nats = NatsServer::start();
    let redis = RedisServer::start();
    let client = nats.client().await;
    let redis_url = redis.url();
    let gateway_addr = format!("127.0.0.1:{}", free_port());
    let key = "trace-test-key";
    let keys = format!("write={}", sha256_hex(key));
    let env = |extra: &[(&'static str, String)]| {
        let mut env = vec![("JETSOURCE__TRACE__OTLP_ENDPOINT", endpoint.clone())];
        env.extend_from_slice(extra);
        env
    };
    let start = |binary: &str, env: Vec<(&'static str, String)>| {
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        Process::start(binary, &nats, &env)
    };
    let command = start("jetsource-command", env(&[]));
    let projector = start(
        "jetsource-projector",
        env(&[("JETSOURCE__REDIS__URL", redis_url.clone())]),
    );
    let gateway = start(
        "jetsource-gateway",
        env(&[
            ("JETSOURCE__GATEWAY__LISTEN", gateway_addr.clone()),
            ("JETSOURCE__GATEWAY__API_KEYS", keys),
        ]),
    );
    wait_for_service(&client, "jetsource-command", 1).await;
    wait_for_service(&client, "jetsource-projector", 1).await;

    // A NATS client's command, with its trace context.
    let mut headers = async_nats::HeaderMap::new();
    let traceparent = format!("00-{CLIENT_TRACE}-{CLIENT_SPAN}-01");
    headers.insert("traceparent", traceparent.as_str());
    let body = json!({"type": "OpenAccount", "data": {"owner": "ada"}});
    let reply = client
        .request_with_headers("cmd.account.t-1", headers, body.to_string().into())
        .await
        .unwrap();
    let opened: CommandOutcome = decode_reply(&reply.payload).unwrap().unwrap();

    // An HTTP caller's, through the gateway.
    let deposited = http_command(&gateway_addr, key, "t-1").await;
    let last = opened.sequence.max(deposited);
    query(
        &client,
        "query.account.t-1",
        json!({"min_sequence": last, "timeout_ms": 10_000}),
    )
    .await
    .unwrap();

    // The stored event carries the trace context of the append.
    let js = async_nats::jetstream::new(client.clone());
    let stream = js.get_stream("EVENTS").await.unwrap();
    let stored = stream.get_raw_message(opened.sequence).await.unwrap();
    let stored_parent = stored
        .headers
        .iter()
        .find(|(name, _)| AsRef::<str>::as_ref(*name).eq_ignore_ascii_case("traceparent"))
        .and_then(|(_, values)| values.first())
        .unwrap_or_else(|| panic!("no traceparent on the stored event: {:?}", stored.headers))
        .as_str()
        .to_owned();

    // Stopping flushes the spans.
    for mut worker in [gateway, command, projector] {
        worker.signal("TERM");
        assert!(worker.wait(Duration::from_secs(10)).success());
    }
    let spans = wait_for_spans(&sink, Duration::from_secs(10));

    // Client -> receive command -> command -> append; the event stores
    // the append span's context; the apply span links to it.
    let received = find(&spans, "receive command", CLIENT_TRACE);
    assert_eq!(received.parent_span_id, CLIENT_SPAN);
    let decided = find(&spans, "command", CLIENT_TRACE);
    assert_eq!(decided.parent_span_id, received.span_id);
    let append = find(&spans, "append", CLIENT_TRACE);
    assert_eq!(append.parent_span_id, decided.span_id);
    assert_eq!(
        stored_parent,
        format!("00-{CLIENT_TRACE}-{}-01", append.span_id)
    );
    let linked = (CLIENT_TRACE.to_owned(), append.span_id.clone());
    assert!(
        spans
            .iter()
            .any(|s| s.name == "apply" && s.links.contains(&linked)),
        "no apply span links to the append: {spans:#?}"
    );

    // HTTP caller -> gateway -> command worker, one trace.
    let http = find(&spans, "http request", HTTP_TRACE);
    assert_eq!(http.parent_span_id, HTTP_SPAN);
    let received = find(&spans, "receive command", HTTP_TRACE);
    assert_eq!(received.parent_span_id, http.span_id);
    find(&spans, "append", HTTP_TRACE);
}

/// A deposit through the gateway with the HTTP caller's trace context; its
/// sequence.
async fn http_command(addr: &str, key: &str, id: &str) -> u64 {
    let addr = addr.to_owned();
    let key = key.to_owned();
    let id = id.to_owned();
    tokio::task::spawn_blocking(move || {
        use std::io::{Read, Write};
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let body = json!({"type": "Deposit", "data": {"amount": 5}}).to_string();
            let attempt = std::net::TcpStream::connect(&addr).map(|mut socket| {
                write!(
                    socket,
                    "POST /v1/commands/account/{id} HTTP/1.0\r\nHost: {addr}\r\nAuthorization: Bearer {key}\r\n\
                     traceparent: 00-{HTTP_TRACE}-{HTTP_SPAN}-01\r\nContent-Type: application/json\r\n\
                     Content-Length: {}\r\n\r\n{body}",
                    body.len()
                )
                .unwrap();
                let mut response = String::new();
                socket.read_to_string(&mut response).unwrap();
                response
            });
            if let Ok(response) = attempt {
                if response.contains(" 200 ") {
                    let body = response.split_once("\r\n\r\n").unwrap().1;
                    let reply: serde_json::Value = serde_json::from_str(body).unwrap();
                    return reply["sequence"].as_u64().unwrap();
                }
            }
            assert!(Instant::now() < deadline, "the gateway did not take the command");
            std::thread::sleep(Duration::from_millis(100));
        }
    })
    .await
    .unwrap()
}

/// The spans received once the exports have settled: at least the ones the
/// assertions need arrived (the workers flush on exit).
fn wait_for_spans(sink: &Sink, within: Duration) -> Vec<Received> {
    let deadline = Instant::now() + within;
    loop {
        let spans = sink.lock().unwrap().clone();
        let names = [
            "receive command",
            "command",
            "append",
            "apply",
            "http request",
        ];
        if names.iter().all(|n| spans.iter().any(|s| s.name == *n)) || Instant::now() > deadline {
            return spans;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
