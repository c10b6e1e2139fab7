//! The API's handlers: each checks the key's role, turns the HTTP request
//! into the NATS protocol's (or a store read), and the answer back into
//! HTTP (docs/GATEWAY.md). The OpenAPI document is generated from the
//! annotations here.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures::StreamExt;
use jetsource_core::aggregate::is_valid_token;
use jetsource_core::loader::{event_json, state_at, Until};
use jetsource_core::protocol::{decode_reply, ErrorBody};
use jetsource_core::store::FollowFrom;
use serde::Deserialize;
use serde_json::{json, Map, Value};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use crate::auth::Role;
use crate::error::ApiError;
use crate::{Api, Gateway};

type Shared = State<Arc<Gateway>>;

/// The connected half of the gateway, or `unavailable` while it starts.
pub(crate) fn api(gateway: &Gateway) -> Result<&Api, ApiError> {
    gateway
        .api
        .get()
        .ok_or_else(|| ApiError::unavailable("the gateway is still connecting to NATS; retry"))
}

fn token(what: &str, value: &str) -> Result<(), ApiError> {
    if is_valid_token(value) {
        Ok(())
    } else {
        Err(ApiError::invalid(format!(
            "{what} {value:?} is invalid: use 1 to 64 characters of A-Z a-z 0-9 _ -"
        )))
    }
}

/// A NATS request with the gateway's bound; `no responders` and silence
/// become `unavailable` (commands: safe to resend with the same id) or
/// `timeout` (queries).
async fn request(
    api: &Api,
    subject: String,
    body: Vec<u8>,
    wait: Duration,
    silence: fn(String) -> ApiError,
) -> Result<Value, ApiError> {
    use async_nats::RequestErrorKind;
    let mut headers = async_nats::HeaderMap::new();
    jetsource_core::telemetry::inject_nats(&mut headers);
    let sent = api
        .client
        .request_with_headers(subject.clone(), headers, body.into());
    let reply = match tokio::time::timeout(wait, sent).await {
        Ok(Ok(reply)) => reply,
        Ok(Err(e)) if e.kind() == RequestErrorKind::NoResponders => {
            return Err(ApiError::unavailable(format!(
                "no worker serves {subject} right now; retry"
            )))
        }
        Ok(Err(e)) => return Err(silence(format!("{subject}: {e}"))),
        Err(_) => return Err(silence(format!("{subject}: no answer within {wait:?}"))),
    };
    decode_reply::<Value>(&reply.payload)
        .map_err(|e| {
            ApiError::Protocol(ErrorBody::new(
                jetsource_core::protocol::ErrorCode::Internal,
                format!("the worker's reply on {subject} is not a jetsource reply: {e}"),
            ))
        })?
        .map_err(ApiError::Protocol)
}

/// A JSON object body, within `gateway.max_body_bytes`.
fn object_body(body: Result<Bytes, BytesRejection>) -> Result<Map<String, Value>, ApiError> {
    let body = body.map_err(|e| match e.status() {
        StatusCode::PAYLOAD_TOO_LARGE => ApiError::TooLarge(format!(
            "request body too large: {e} (gateway.max_body_bytes)"
        )),
        _ => ApiError::invalid(format!("cannot read the request body: {e}")),
    })?;
    match serde_json::from_slice::<Value>(&body) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => Err(ApiError::invalid("the body must be a JSON object")),
        Err(e) => Err(ApiError::invalid(format!("the body is not JSON: {e}"))),
    }
}

/// Sends a command. The body is the command as on NATS (`{"type", "data",
/// "command_id"?, "expected_version"?, "correlation_id"?}`); an
/// `Idempotency-Key` header is its command id.
#[utoipa::path(
    post,
    path = "/v1/commands/{aggregate_type}/{aggregate_id}",
    params(
        ("aggregate_type" = String, Path, description = "A registered aggregate type"),
        ("aggregate_id" = String, Path, description = "1-64 of A-Z a-z 0-9 _ -"),
        ("Idempotency-Key" = Option<String>, Header, description = "Becomes the command id: a resend with the same key is never applied twice"),
    ),
    request_body(content = Object, description = "The command: {\"type\": \"Deposit\", \"data\": {...}}"),
    responses(
        (status = 200, description = "Stored: version, sequence, events, duplicate"),
        (status = 400, description = "invalid"), (status = 401, description = "no or unknown API key"),
        (status = 403, description = "the key's role may not send commands"),
        (status = 409, description = "conflict"), (status = 413, description = "body too large"),
        (status = 422, description = "rejected by a business rule"),
        (status = 503, description = "unavailable: resend with the same Idempotency-Key"),
    ),
    security(("api_key" = [])),
)]
pub async fn send_command(
    State(gateway): Shared,
    Path((aggregate_type, aggregate_id)): Path<(String, String)>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    gateway.keys.require(&headers, Role::Write)?;
    let api = api(&gateway)?;
    token("aggregate type", &aggregate_type)?;
    token("aggregate id", &aggregate_id)?;
    let mut command = object_body(body)?;
    if let Some(key) = headers.get("idempotency-key") {
        let key = key
            .to_str()
            .map_err(|_| ApiError::invalid("Idempotency-Key must be text"))?;
        match command.get("command_id") {
            Some(Value::String(id)) if id != key => {
                return Err(ApiError::invalid(
                    "the body's command_id and the Idempotency-Key header differ",
                ))
            }
            _ => {
                command.insert("command_id".into(), key.into());
            }
        }
    }
    let subject = format!("cmd.{aggregate_type}.{aggregate_id}");
    let body = serde_json::to_vec(&command).unwrap_or_default();
    let outcome = request(api, subject, body, gateway.timeout, ApiError::unavailable).await?;
    Ok(Json(outcome))
}

/// Runs a declared query. Parameters come from the URL's query string,
/// typed as the query declares them; `min_sequence` (or the
/// `X-Min-Sequence` header) waits for the read model to reflect that
/// sequence (read-your-writes), `timeout_ms` bounds the wait.
#[utoipa::path(
    get,
    path = "/v1/queries/{name}/{key}",
    params(
        ("name" = String, Path, description = "The query's name, e.g. account or accounts.top"),
        ("key" = String, Path, description = "The query's key (omit the segment for a query without one: /v1/queries/{name})"),
        ("min_sequence" = Option<u64>, Query, description = "Answer only once the read model reflects this stream sequence"),
        ("timeout_ms" = Option<u64>, Query, description = "How long to wait for min_sequence"),
        ("X-Min-Sequence" = Option<u64>, Header, description = "Same as min_sequence"),
    ),
    responses(
        (status = 200, description = "{\"sequence\": the stream sequence reflected, \"data\": ...}"),
        (status = 400, description = "invalid (unknown query or parameter)"),
        (status = 404, description = "not_found"), (status = 503, description = "unavailable"),
        (status = 504, description = "timeout: the read model did not reach min_sequence in time"),
    ),
    security(("api_key" = [])),
)]
pub async fn keyed_query(
    state: Shared,
    Path((name, key)): Path<(String, String)>,
    headers: HeaderMap,
    Query(params): Query<Vec<(String, String)>>,
) -> Result<Json<Value>, ApiError> {
    run_query(state, name, Some(key), headers, params).await
}

/// A declared query without a key (`/v1/queries/accounts.top`).
pub async fn query(
    state: Shared,
    Path(name): Path<String>,
    headers: HeaderMap,
    Query(params): Query<Vec<(String, String)>>,
) -> Result<Json<Value>, ApiError> {
    run_query(state, name, None, headers, params).await
}

async fn run_query(
    State(gateway): Shared,
    name: String,
    key: Option<String>,
    headers: HeaderMap,
    params: Vec<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    gateway.keys.require(&headers, Role::Read)?;
    let api = api(&gateway)?;
    let subject = match &key {
        Some(key) => format!("query.{name}.{key}"),
        None => format!("query.{name}"),
    };
    let route = gateway.router.route(&subject)?;
    let mut body = Map::new();
    let header_min = headers.get("x-min-sequence").map(|v| {
        (
            "min_sequence".to_owned(),
            v.to_str().unwrap_or("").to_owned(),
        )
    });
    for (param, value) in params.into_iter().chain(header_min) {
        let typed = if jetsource_projector::read::RESERVED_PARAMS.contains(&param.as_str()) {
            value.parse::<u64>().map(Value::from).map_err(|_| {
                ApiError::invalid(format!(
                    "{param} must be a non-negative integer, not {value:?}"
                ))
            })?
        } else {
            route
                .spec
                .param_from_text(&param, &value)
                .map_err(ApiError::invalid)?
        };
        body.insert(param, typed);
    }
    let body = serde_json::to_vec(&body).unwrap_or_default();
    let answer = request(api, subject, body, gateway.timeout, ApiError::timeout).await?;
    Ok(Json(answer))
}

#[derive(Debug, Deserialize)]
pub struct Page {
    /// Events after this stream sequence (0: from the first).
    #[serde(default)]
    after: u64,
    limit: Option<usize>,
}

/// Page size of a history when the request names none, and the largest.
const PAGE: usize = 100;
const MAX_PAGE: usize = 1000;

/// An aggregate's events in order, a page at a time, data in the current
/// schema. `next_after` continues it; `null` at the end.
#[utoipa::path(
    get,
    path = "/v1/aggregates/{aggregate_type}/{aggregate_id}/events",
    params(
        ("aggregate_type" = String, Path), ("aggregate_id" = String, Path),
        ("after" = Option<u64>, Query, description = "Events after this stream sequence"),
        ("limit" = Option<usize>, Query, description = "At most this many (default 100, at most 1000)"),
    ),
    responses((status = 200, description = "{\"events\": [...], \"next_after\": sequence or null}"), (status = 404, description = "no events")),
    security(("api_key" = [])),
)]
pub async fn history(
    State(gateway): Shared,
    Path((aggregate_type, aggregate_id)): Path<(String, String)>,
    headers: HeaderMap,
    Query(page): Query<Page>,
) -> Result<Json<Value>, ApiError> {
    gateway.keys.require(&headers, Role::Read)?;
    let api = api(&gateway)?;
    token("aggregate type", &aggregate_type)?;
    token("aggregate id", &aggregate_id)?;
    let limit = page.limit.unwrap_or(PAGE).clamp(1, MAX_PAGE);
    // Read through the stream leader: a replica that lags must not end a
    // page early or answer "no events".
    let events = api
        .store
        .read_confirmed(&aggregate_type, &aggregate_id, page.after + 1)
        .await
        .map_err(store_error)?;
    if events.is_empty() && page.after == 0 {
        return Err(ApiError::not_found(format!(
            "{aggregate_type} {aggregate_id} has no events"
        )));
    }
    let aggregate = api.registry.get(&aggregate_type);
    let shown: Vec<Value> = events
        .iter()
        .take(limit)
        .map(|e| event_json(aggregate.map(|a| a.as_ref()), e))
        .collect();
    let next_after = (events.len() > limit).then(|| events[limit - 1].sequence);
    Ok(Json(json!({"events": shown, "next_after": next_after})))
}

#[derive(Debug, Deserialize)]
pub struct At {
    at_sequence: Option<u64>,
    at_time: Option<String>,
}

/// An aggregate's state now, or as it was at a stream sequence or a time
/// (the temporal query).
#[utoipa::path(
    get,
    path = "/v1/aggregates/{aggregate_type}/{aggregate_id}/state",
    params(
        ("aggregate_type" = String, Path), ("aggregate_id" = String, Path),
        ("at_sequence" = Option<u64>, Query, description = "As of this stream sequence"),
        ("at_time" = Option<String>, Query, description = "As of this RFC 3339 time"),
    ),
    responses((status = 200, description = "{\"version\", \"sequence\", \"timestamp\", \"state\", \"snapshot\"}"), (status = 404, description = "no events at that point")),
    security(("api_key" = [])),
)]
pub async fn state(
    State(gateway): Shared,
    Path((aggregate_type, aggregate_id)): Path<(String, String)>,
    headers: HeaderMap,
    Query(at): Query<At>,
) -> Result<Json<Value>, ApiError> {
    gateway.keys.require(&headers, Role::Read)?;
    let api = api(&gateway)?;
    token("aggregate id", &aggregate_id)?;
    let aggregate = api.registry.get(&aggregate_type).ok_or_else(|| {
        ApiError::invalid(format!(
            "unknown aggregate type {aggregate_type:?}; known types: {}",
            api.registry.types().collect::<Vec<_>>().join(", ")
        ))
    })?;
    let until = match (at.at_sequence, &at.at_time) {
        (Some(sequence), _) => Until::Sequence(sequence),
        (None, Some(t)) => Until::Time(OffsetDateTime::parse(t, &Rfc3339).map_err(|_| {
            ApiError::invalid(format!(
                "at_time {t:?} is not an RFC 3339 time like 2026-01-31T12:00:00Z"
            ))
        })?),
        (None, None) => Until::End,
    };
    let (loaded, used) = state_at(
        &api.store,
        &api.snapshots,
        aggregate.as_ref(),
        &aggregate_id,
        until,
    )
    .await
    .map_err(|e| match e {
        jetsource_core::loader::LoadError::Store(e) => store_error(e),
        other => ApiError::Protocol(ErrorBody::new(
            other
                .own_code()
                .unwrap_or(jetsource_core::protocol::ErrorCode::Internal),
            other.to_string(),
        )),
    })?;
    if loaded.version == 0 {
        return Err(ApiError::not_found(format!(
            "{aggregate_type} {aggregate_id} has no events at that point"
        )));
    }
    let snapshot = match used {
        jetsource_core::loader::SnapshotUse::Used { version } => json!({"version": version}),
        _ => Value::Null,
    };
    Ok(Json(json!({
        "aggregate_type": aggregate_type,
        "aggregate_id": aggregate_id,
        "version": loaded.version,
        "sequence": loaded.last_sequence,
        "timestamp": loaded.last_timestamp.and_then(|t| t.format(&Rfc3339).ok()),
        "state": aggregate.state_to_json(&loaded.state),
        "snapshot": snapshot,
    })))
}

pub(crate) fn store_error(e: jetsource_core::store::StoreError) -> ApiError {
    use jetsource_core::ErrorClass;
    match e.class() {
        ErrorClass::Transient => ApiError::unavailable(e.to_string()),
        _ => ApiError::Protocol(ErrorBody::new(
            jetsource_core::protocol::ErrorCode::Internal,
            e.to_string(),
        )),
    }
}

#[derive(Debug, Deserialize)]
pub struct Live {
    aggregate_type: String,
    aggregate_id: Option<String>,
    /// Events after this sequence first (also the `Last-Event-ID` header a
    /// reconnecting EventSource sends).
    after: Option<u64>,
}

/// Live events as Server-Sent Events: every event of an aggregate type, or
/// of one aggregate, as it is stored. Each SSE event has the stream
/// sequence as its `id` (a reconnecting browser resumes after it), the
/// event type as its `event`, and the event as JSON (data in the current
/// schema) as its `data`.
#[utoipa::path(
    get,
    path = "/v1/events/live",
    params(
        ("aggregate_type" = String, Query), ("aggregate_id" = Option<String>, Query),
        ("after" = Option<u64>, Query, description = "Start after this stream sequence; default: from now"),
        ("Last-Event-ID" = Option<u64>, Header, description = "Same as after"),
    ),
    responses((status = 200, description = "text/event-stream")),
    security(("api_key" = [])),
)]
pub async fn live(
    State(gateway): Shared,
    headers: HeaderMap,
    Query(live): Query<Live>,
) -> Result<Response, ApiError> {
    gateway.keys.require(&headers, Role::Read)?;
    let api = api(&gateway)?;
    token("aggregate type", &live.aggregate_type)?;
    let filter = match &live.aggregate_id {
        Some(id) => {
            token("aggregate id", id)?;
            format!("events.{}.{id}", live.aggregate_type)
        }
        None => format!("events.{}.>", live.aggregate_type),
    };
    let resume = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok());
    let from = live
        .after
        .or(resume)
        .map_or(FollowFrom::Now, FollowFrom::After);
    let events = api.store.follow(&filter, from).await.map_err(store_error)?;
    let aggregate = api.registry.get(&live.aggregate_type).cloned();
    let mut stopping = gateway.stopping.clone();
    let stream = events
        .map(move |event| sse_event(aggregate.as_deref(), event))
        .take_until(async move {
            let _ = stopping.wait_for(|s| *s).await;
        });
    Ok(Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response())
}

fn sse_event(
    aggregate: Option<&dyn jetsource_core::aggregate::DynAggregate>,
    event: Result<jetsource_core::envelope::RecordedEvent, jetsource_core::store::StoreError>,
) -> Result<Event, std::convert::Infallible> {
    Ok(match event {
        Ok(event) => Event::default()
            .id(event.sequence.to_string())
            .event(event.event_type.clone())
            .data(event_json(aggregate, &event).to_string()),
        Err(e) => Event::default()
            .event("error")
            .data(json!({"code": "unavailable", "message": e.to_string()}).to_string()),
    })
}

/// Every declared query, as `GET /v1/queries` lists them.
pub async fn list_queries(
    State(gateway): Shared,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    gateway.keys.require(&headers, Role::Read)?;
    let queries: Vec<Value> = gateway
        .router
        .queries()
        .map(|(spec, projection)| {
            json!({
                "name": spec.name,
                "key": spec.key,
                "projection": projection.name(),
                "about": spec.about,
                "params": spec.params.iter().map(|p| json!({"name": p.name, "about": p.about})).collect::<Vec<_>>(),
            })
        })
        .collect();
    Ok(Json(json!({"queries": queries})))
}

/// Anything else: the protocol's `not_found`, not an empty 404.
pub async fn fallback() -> ApiError {
    ApiError::not_found("no such API route; see /openapi.json")
}

#[derive(Debug, utoipa::OpenApi)]
#[openapi(
    info(title = "jetsource gateway", description = "Commands, queries, histories, state at any point and live events of a jetsource application (docs/GATEWAY.md)."),
    paths(send_command, keyed_query, history, state, live),
    modifiers(&ApiKeyScheme),
)]
pub struct ApiDoc;

struct ApiKeyScheme;

impl utoipa::Modify for ApiKeyScheme {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "api_key",
            SecurityScheme::Http(Http::new(HttpAuthScheme::Bearer)),
        );
    }
}

/// `GET /openapi.json`: needs no key (it holds no data).
pub async fn openapi() -> Json<utoipa::openapi::OpenApi> {
    use utoipa::OpenApi;
    Json(ApiDoc::openapi())
}
