//! Logging and tracing set-up (docs/TRACING.md). `RUST_LOG` wins over
//! `log.level`; `log.format = "json"` emits one JSON object per line with
//! span fields (command id, aggregate, sequence) included.
//!
//! With `trace.otlp_endpoint` set, spans are also exported over OTLP and
//! W3C trace context travels: a `traceparent` NATS or HTTP header makes the
//! receiving span its child ([`continue_from_nats`],
//! [`continue_from_traceparent`]), outgoing requests carry the current one
//! ([`inject_nats`]), every appended event stores it ([`current_traceparent`],
//! header `traceparent`), and the projector's apply span links to the
//! events it applies ([`link`]). With it unset, nothing is recorded and
//! these functions do nothing.

use std::collections::HashMap;

use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::{TraceContextExt, TracerProvider};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{fmt, EnvFilter, Layer};

use crate::config::{LogConfig, LogFormat, TraceConfig};

/// The W3C header name, on NATS messages, HTTP requests and stored events.
pub const TRACEPARENT: &str = "traceparent";

/// Keeps the span exporter; [`Telemetry::shutdown`] sends what is left.
#[derive(Debug, Default)]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Exports the spans still buffered, within `bound`. Call last, after
    /// the worker stopped.
    pub async fn shutdown(self, bound: std::time::Duration) {
        let Some(provider) = self.provider else {
            return;
        };
        // The SDK blocks the calling thread while it flushes.
        let flushed = tokio::task::spawn_blocking(move || provider.shutdown());
        if tokio::time::timeout(bound, flushed).await.is_err() {
            eprintln!("trace export did not finish within {bound:?}; spans may be lost");
        }
    }
}

/// Installs the global subscriber, and the OTLP exporter when configured.
/// Call once, inside the Tokio runtime (the exporter runs on it).
pub fn init(config: &LogConfig, trace: &TraceConfig, service: &str) -> Telemetry {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&config.level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let log = match config.format {
        LogFormat::Text => fmt::layer()
            .with_writer(std::io::stderr)
            .with_target(false)
            .boxed(),
        LogFormat::Json => fmt::layer()
            .with_writer(std::io::stderr)
            .json()
            .with_current_span(true)
            .with_span_list(false)
            .boxed(),
    };
    let provider = exporter(trace, service);
    // Spans are traced at info whatever the log level: quieting the logs
    // (RUST_LOG=warn) must not cut traces, or the trace context stored
    // with events.
    let otel = provider.as_ref().map(|p| {
        tracing_opentelemetry::layer()
            .with_tracer(p.tracer("jetsource"))
            .with_filter(tracing_subscriber::filter::LevelFilter::INFO)
    });
    // A second init (tests, embedding) keeps the first subscriber.
    let _ = tracing_subscriber::registry()
        .with(log.with_filter(filter))
        .with(otel)
        .try_init();
    Telemetry { provider }
}

fn exporter(trace: &TraceConfig, service: &str) -> Option<SdkTracerProvider> {
    use opentelemetry_otlp::{Protocol, WithExportConfig};
    let endpoint = trace.otlp_endpoint.trim();
    if endpoint.is_empty() {
        return None;
    }
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_protocol(Protocol::HttpBinary)
        .with_endpoint(endpoint)
        .with_timeout(std::time::Duration::from_secs(3))
        .build();
    let exporter = match exporter {
        Ok(exporter) => exporter,
        Err(e) => {
            eprintln!("trace.otlp_endpoint {endpoint:?}: {e}; tracing stays off");
            return None;
        }
    };
    let processor =
        opentelemetry_sdk::trace::span_processor_with_async_runtime::BatchSpanProcessor::builder(
            exporter,
            opentelemetry_sdk::runtime::Tokio,
        )
        .build();
    Some(
        SdkTracerProvider::builder()
            .with_span_processor(processor)
            .with_resource(
                opentelemetry_sdk::Resource::builder()
                    .with_service_name(service.to_owned())
                    .build(),
            )
            .build(),
    )
}

/// Makes `span` a child of the trace context a `traceparent` value names
/// (from an HTTP request); a missing or malformed one leaves it a root.
pub fn continue_from_traceparent(span: &tracing::Span, traceparent: Option<&str>) {
    let Some(traceparent) = traceparent else {
        return;
    };
    let carrier = HashMap::from([(TRACEPARENT.to_owned(), traceparent.to_owned())]);
    let context = TraceContextPropagator::new().extract(&carrier);
    if context.span().span_context().is_valid() {
        let _ = span.set_parent(context);
    }
}

/// [`continue_from_traceparent`] with a NATS message's headers.
pub fn continue_from_nats(span: &tracing::Span, headers: Option<&async_nats::HeaderMap>) {
    let traceparent = headers.and_then(|h| h.get(TRACEPARENT)).map(|v| v.as_str());
    continue_from_traceparent(span, traceparent);
}

/// The current span's trace context as a `traceparent` value; `None` when
/// tracing is off or there is no span.
pub fn current_traceparent() -> Option<String> {
    let context = tracing::Span::current().context();
    if !context.span().span_context().is_valid() {
        return None;
    }
    let mut carrier = HashMap::new();
    TraceContextPropagator::new().inject_context(&context, &mut carrier);
    carrier.remove(TRACEPARENT)
}

/// Adds the current trace context to an outgoing NATS request's headers.
pub fn inject_nats(headers: &mut async_nats::HeaderMap) {
    if let Some(traceparent) = current_traceparent() {
        headers.insert(TRACEPARENT, traceparent.as_str());
    }
}

/// Links `span` to the trace context a stored event carries: the
/// projector's apply span to the commands whose events it applies.
pub fn link(span: &tracing::Span, traceparent: &str) {
    let carrier = HashMap::from([(TRACEPARENT.to_owned(), traceparent.to_owned())]);
    let context = TraceContextPropagator::new().extract(&carrier);
    let linked = context.span().span_context().clone();
    if linked.is_valid() {
        span.add_link(linked);
    }
}
