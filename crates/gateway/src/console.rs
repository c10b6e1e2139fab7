//! The web console (`GET /console`, docs/GATEWAY.md) and the read-only
//! routes it uses beyond the API's: the application's types, projection
//! status, the stream and its replicas. The page is one file of HTML and
//! JavaScript compiled into the binary; it calls the API with the key the
//! user enters (kept in the tab's sessionStorage), so it knows nothing the
//! key may not read, and works for any application.

use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, HeaderMap};
use axum::response::{Html, IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};

use crate::api::{api, store_error};
use crate::auth::Role;
use crate::error::ApiError;
use crate::Gateway;

type Shared = State<Arc<Gateway>>;

/// The console page. Served without a key: it holds no data.
pub async fn page() -> Response {
    (
        [
            (header::CACHE_CONTROL, "no-store"),
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'self'; script-src 'unsafe-inline'; style-src 'unsafe-inline'",
            ),
        ],
        Html(include_str!("console.html")),
    )
        .into_response()
}

/// The application's aggregate types and projections.
pub async fn types(State(gateway): Shared, headers: HeaderMap) -> Result<Json<Value>, ApiError> {
    gateway.keys.require(&headers, Role::Read)?;
    let api = api(&gateway)?;
    Ok(Json(json!({
        "aggregate_types": api.registry.types().collect::<Vec<_>>(),
        "projections": api.projections.iter().map(|p| p.name()).collect::<Vec<_>>(),
    })))
}

/// Every projection's generation, checkpoint and lag (as `jetsource
/// projection status`).
pub async fn projections(
    State(gateway): Shared,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    gateway.keys.require(&headers, Role::Read)?;
    let api = api(&gateway)?;
    let last = api
        .store
        .info()
        .await
        .map_err(store_error)?
        .state
        .last_sequence;
    let mut rows = Vec::new();
    for name in api.projections.iter().map(|p| p.name()) {
        let row =
            jetsource_projector::status::projection_status(&api.redis, &api.store, name, last)
                .await
                .map_err(|e| ApiError::unavailable(format!("Redis: {e}; retry")))?;
        rows.push(row);
    }
    Ok(Json(json!({"projections": rows})))
}

/// The event stream: size, sequences, and in a cluster its leader and each
/// replica's state.
pub async fn stream(State(gateway): Shared, headers: HeaderMap) -> Result<Json<Value>, ApiError> {
    gateway.keys.require(&headers, Role::Read)?;
    let api = api(&gateway)?;
    let info = api.store.info().await.map_err(store_error)?;
    let cluster = info.cluster.as_ref().map(|c| {
        json!({
            "name": c.name,
            "leader": c.leader,
            "replicas": c.replicas.iter().map(|p| json!({
                "name": p.name,
                "current": p.current,
                "offline": p.offline,
                "lag": p.lag,
                "active_ms": p.active.as_millis() as u64,
            })).collect::<Vec<_>>(),
        })
    });
    Ok(Json(json!({
        "name": info.config.name,
        "replicas": info.config.num_replicas,
        "messages": info.state.messages,
        "bytes": info.state.bytes,
        "first_sequence": info.state.first_sequence,
        "last_sequence": info.state.last_sequence,
        "cluster": cluster,
    })))
}

/// The dead-letter stream, `None` while no projection ever needed it.
async fn dead_letter_stream(
    api: &crate::Api,
) -> Result<Option<async_nats::jetstream::stream::Stream>, ApiError> {
    use async_nats::jetstream::context::GetStreamErrorKind;
    match api.store.jetstream().get_stream(&api.dead_letters).await {
        Ok(stream) => Ok(Some(stream)),
        Err(e)
            if matches!(
                e.kind(),
                GetStreamErrorKind::JetStream(ref a)
                    if a.error_code().0 == jetsource_core::store::codes::STREAM_NOT_FOUND
            ) =>
        {
            Ok(None)
        }
        Err(e) => Err(ApiError::unavailable(format!(
            "cannot open the dead-letter stream: {e}; retry"
        ))),
    }
}

fn dlq_error(e: jetsource_projector::dlq::DlqError) -> ApiError {
    match e.class() {
        jetsource_core::ErrorClass::Transient => ApiError::unavailable(e.to_string()),
        _ => ApiError::Protocol(jetsource_core::protocol::ErrorBody::new(
            jetsource_core::protocol::ErrorCode::Internal,
            e.to_string(),
        )),
    }
}

/// Every dead letter, oldest first, with its reason.
pub async fn dead_letters(
    State(gateway): Shared,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    gateway.keys.require(&headers, Role::Read)?;
    let api = api(&gateway)?;
    let letters = match dead_letter_stream(api).await? {
        Some(mut stream) => jetsource_projector::dlq::list(&mut stream)
            .await
            .map_err(dlq_error)?,
        None => Vec::new(),
    };
    Ok(Json(json!({"dead_letters": letters})))
}

/// Applies one dead letter again with the current projection code (as
/// `jetsource dlq replay <seq>`): it leaves the stream if it applies now,
/// and is kept with the new reason if not. Needs role admin.
pub async fn replay(
    State(gateway): Shared,
    axum::extract::Path(sequence): axum::extract::Path<u64>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    gateway.keys.require(&headers, Role::Admin)?;
    let api = api(&gateway)?;
    let Some(mut stream) = dead_letter_stream(api).await? else {
        return Err(ApiError::not_found(format!("no dead letter {sequence}")));
    };
    let results = jetsource_projector::dlq::replay(
        &mut stream,
        &api.store,
        &api.redis,
        &api.projections,
        Some(sequence),
    )
    .await
    .map_err(dlq_error)?;
    let Some(result) = results.into_iter().next() else {
        return Err(ApiError::not_found(format!("no dead letter {sequence}")));
    };
    Ok(Json(json!(result)))
}
