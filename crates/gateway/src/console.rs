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
        "projections": api.projections,
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
    for name in &api.projections {
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
