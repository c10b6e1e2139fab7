//! Queries on the example read models, over NATS request-reply in the queue
//! group `jetsource-projector`:
//!
//! | subject | data |
//! |---|---|
//! | `query.account.<id>` | the account, with its recent transactions |
//! | `query.accounts.top` | open accounts by balance, highest first (`limit`, default 10, at most 1000) |
//! | `query.accounts.totals` | `open_accounts`, `balance_sum` |
//! | `query.user.<id>` | the user |
//!
//! Body (optional): `{"min_sequence": N, "timeout_ms": T, "limit": L}`.
//! Reply: `{"ok": true, "sequence": W, "data": ...}` where every event up to
//! stream sequence W is reflected; with `min_sequence`, W >= N or the reply
//! is error `timeout`.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use jetsource_core::config::Config;
use jetsource_core::micro::{self, Endpoint, MicroService};
use jetsource_core::protocol::{ErrorBody, ErrorCode};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::sync::watch;

use crate::keys::{partition_of, KeySpace};
use crate::redis_store::Meta;
use crate::{Shared, SERVICE_NAME};

/// Default wait for `min_sequence` when the query names no `timeout_ms`.
const DEFAULT_WAIT: Duration = Duration::from_secs(5);
const MAX_IN_FLIGHT: usize = 1024;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct QueryRequest {
    min_sequence: Option<u64>,
    timeout_ms: Option<u64>,
    limit: Option<usize>,
}

#[derive(Debug, Serialize)]
struct QueryReply {
    /// Every event up to this stream sequence is reflected.
    sequence: u64,
    data: Value,
}

enum Route<'a> {
    Account(&'a str),
    Top,
    Totals,
    User(&'a str),
}

fn route(subject: &str) -> Result<(&'static str, Route<'_>), ErrorBody> {
    let tokens: Vec<&str> = subject.split('.').collect();
    let route = match tokens.as_slice() {
        ["query", "account", id] => ("accounts", Route::Account(id)),
        ["query", "accounts", "top"] => ("accounts", Route::Top),
        ["query", "accounts", "totals"] => ("accounts", Route::Totals),
        ["query", "user", id] => ("users", Route::User(id)),
        _ => {
            return Err(ErrorBody::invalid(format!(
                "unknown query {subject:?}; known: query.account.<id>, query.accounts.top, query.accounts.totals, query.user.<id>"
            )))
        }
    };
    if let Route::Account(id) | Route::User(id) = route.1 {
        if !jetsource_core::aggregate::is_valid_token(id) {
            return Err(ErrorBody::invalid(format!(
                "id {id:?} is invalid: use 1 to 64 characters of A-Z a-z 0-9 _ -"
            )));
        }
    }
    Ok(route)
}

/// The reply to a failed Redis call. Every call is bounded in time (a
/// connection that stops answering is replaced), so an outage or a slow
/// Redis answers `unavailable` promptly: retry. An error that a retry
/// cannot cure (an unexpected reply) is `internal`.
fn unavailable(e: redis::RedisError) -> ErrorBody {
    match crate::redis_store::class(&e) {
        jetsource_core::ErrorClass::Permanent => {
            tracing::error!(error = %e, "query failed in Redis");
            ErrorBody::new(ErrorCode::Internal, format!("Redis: {e}"))
        }
        _ => ErrorBody::new(ErrorCode::Unavailable, format!("Redis: {e}; retry")),
    }
}

/// Subscribes to `query.>` and serves until `stop`; the returned task drains
/// the subscription and finishes queries in flight.
pub(crate) async fn serve(
    shared: Arc<Shared>,
    config: &Config,
    mut stop: watch::Receiver<bool>,
) -> Result<tokio::task::JoinHandle<()>, String> {
    let queue_group = config.projector.queue_group.clone();
    let requests = shared
        .client
        .queue_subscribe("query.>", queue_group.clone())
        .await
        .map_err(|e| e.to_string())?;
    let service = MicroService::start(
        &shared.client,
        SERVICE_NAME,
        env!("CARGO_PKG_VERSION"),
        "jetsource projector: Redis read models and queries",
        vec![Endpoint {
            name: "queries".into(),
            subject: "query.>".into(),
            queue_group,
        }],
    )
    .await
    .map_err(|e| e.to_string())?;
    let client = shared.client.clone();
    let handle = move |message: async_nats::Message| {
        let shared = shared.clone();
        async move {
            let reply = handle(&shared, message.subject.as_str(), &message.payload).await;
            (message.reply, reply)
        }
    };
    Ok(tokio::spawn(async move {
        micro::serve(
            &client,
            requests,
            &service,
            "queries",
            MAX_IN_FLIGHT,
            handle,
            async move {
                let _ = stop.wait_for(|s| *s).await;
            },
        )
        .await;
        service.stop();
    }))
}

async fn handle(shared: &Shared, subject: &str, payload: &[u8]) -> Result<QueryReply, ErrorBody> {
    let (projection, route) = route(subject)?;
    let request: QueryRequest = if payload.iter().all(u8::is_ascii_whitespace) {
        QueryRequest::default()
    } else {
        serde_json::from_slice(payload)
            .map_err(|e| ErrorBody::invalid(format!("query body is not valid: {e}")))?
    };
    // A rebuild may switch generations and delete the old keys while this
    // query reads them. Reading the metadata again afterwards tells: if the
    // generation is still active, the keys were intact when read.
    let mut attempts = 0;
    let (sequence, data) = loop {
        attempts += 1;
        let (meta, sequence) = wait_for(shared, projection, &request).await?;
        let data = match &route {
            Route::Account(id) => account(shared, &meta, id).await,
            Route::User(id) => user(shared, &meta, id).await,
            Route::Top => top(shared, &meta, request.limit.unwrap_or(10).clamp(1, 1000)).await,
            Route::Totals => totals(shared, &meta).await,
        };
        let still = shared.redis.meta(projection).await.map_err(unavailable)?;
        if still.is_some_and(|m| m.active == meta.active) || attempts >= 5 {
            break (sequence, data?);
        }
    };
    Ok(QueryReply { sequence, data })
}

/// The active generation and its watermark, waiting for `min_sequence`.
/// Redis is the judge; announcements from the applying copy only say when
/// to look again.
async fn wait_for(
    shared: &Shared,
    projection: &str,
    request: &QueryRequest,
) -> Result<(Meta, u64), ErrorBody> {
    let wait = request
        .timeout_ms
        .map(Duration::from_millis)
        .unwrap_or(DEFAULT_WAIT)
        .min(shared.config.max_wait());
    let deadline = tokio::time::Instant::now() + wait;
    let mut updates = shared.watermark_updates(projection);
    loop {
        if let Some(updates) = updates.as_mut() {
            // Mark what we have seen before reading Redis, so an
            // announcement arriving meanwhile is not missed.
            updates.borrow_and_update();
        }
        let meta = shared.redis.meta(projection).await.map_err(unavailable)?;
        let (meta, watermark) = match meta {
            Some(meta) => {
                let watermark = shared
                    .redis
                    .watermark(projection, meta.active)
                    .await
                    .map_err(unavailable)?;
                (Some(meta), watermark)
            }
            None => (None, 0),
        };
        let min = request.min_sequence.unwrap_or(0);
        match meta {
            Some(meta) if watermark >= min => return Ok((meta, watermark)),
            None if request.min_sequence.is_none() => {
                return Err(ErrorBody::new(
                    ErrorCode::Unavailable,
                    format!("read model {projection} is being built; is jetsource-projector running? retry, or pass min_sequence to wait"),
                ))
            }
            _ => {}
        }
        let timed_out = ErrorBody::new(
            ErrorCode::Timeout,
            format!(
                "read model {projection} reflects sequence {watermark}, not yet {min}, after {} ms; retry or raise timeout_ms",
                wait.as_millis()
            ),
        );
        let Some(updates) = updates.as_mut() else {
            return Err(timed_out);
        };
        if tokio::time::timeout_at(deadline, updates.changed())
            .await
            .is_err()
        {
            return Err(timed_out);
        }
    }
}

fn not_found(what: &str, id: &str) -> ErrorBody {
    ErrorBody::new(ErrorCode::NotFound, format!("{what} {id} not found"))
}

fn number(fields: &HashMap<String, String>, name: &str) -> Value {
    fields
        .get(name)
        .and_then(|v| v.parse::<i64>().ok())
        .map_or(Value::Null, Value::from)
}

async fn account(shared: &Shared, meta: &Meta, id: &str) -> Result<Value, ErrorBody> {
    let keys = KeySpace::new(
        "accounts",
        meta.active,
        partition_of("account", id, meta.partitions),
    );
    let mut con = shared.redis.connection();
    let (fields, transactions): (HashMap<String, String>, Vec<String>) = redis::pipe()
        .atomic()
        .cmd("HGETALL")
        .arg(keys.key(&format!("account:{id}")))
        .cmd("LRANGE")
        .arg(keys.key(&format!("account:{id}:transactions")))
        .arg(0)
        .arg(-1)
        .query_async(&mut con)
        .await
        .map_err(unavailable)?;
    if fields.is_empty() {
        return Err(not_found("account", id));
    }
    let transactions: Vec<Value> = transactions
        .iter()
        .filter_map(|t| serde_json::from_str(t).ok())
        .collect();
    Ok(json!({
        "id": id,
        "owner": fields.get("owner"),
        "status": fields.get("status"),
        "balance": number(&fields, "balance"),
        "version": number(&fields, "version"),
        "sequence": number(&fields, "sequence"),
        "updated_at": fields.get("updated_at"),
        "recent_transactions": transactions,
    }))
}

async fn user(shared: &Shared, meta: &Meta, id: &str) -> Result<Value, ErrorBody> {
    let keys = KeySpace::new(
        "users",
        meta.active,
        partition_of("user", id, meta.partitions),
    );
    let mut con = shared.redis.connection();
    let fields: HashMap<String, String> = redis::cmd("HGETALL")
        .arg(keys.key(&format!("user:{id}")))
        .query_async(&mut con)
        .await
        .map_err(unavailable)?;
    if fields.is_empty() {
        return Err(not_found("user", id));
    }
    Ok(json!({
        "id": id,
        "name": fields.get("name"),
        "version": number(&fields, "version"),
        "sequence": number(&fields, "sequence"),
        "updated_at": fields.get("updated_at"),
    }))
}

/// Merges each partition's top `limit` into the overall top `limit`.
async fn top(shared: &Shared, meta: &Meta, limit: usize) -> Result<Value, ErrorBody> {
    let mut pipe = redis::pipe();
    for partition in 0..meta.partitions {
        let keys = KeySpace::new("accounts", meta.active, partition);
        pipe.cmd("ZREVRANGE")
            .arg(keys.key("accounts:by_balance"))
            .arg(0)
            .arg(limit - 1)
            .arg("WITHSCORES");
    }
    let mut con = shared.redis.connection();
    let pages: Vec<Vec<(String, i64)>> = pipe.query_async(&mut con).await.map_err(unavailable)?;
    let mut all: Vec<(String, i64)> = pages.into_iter().flatten().collect();
    all.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    all.truncate(limit);
    Ok(Value::from(
        all.into_iter()
            .map(|(id, balance)| json!({"id": id, "balance": balance}))
            .collect::<Vec<_>>(),
    ))
}

/// Sums the per-partition totals.
async fn totals(shared: &Shared, meta: &Meta) -> Result<Value, ErrorBody> {
    let mut pipe = redis::pipe();
    for partition in 0..meta.partitions {
        let keys = KeySpace::new("accounts", meta.active, partition);
        pipe.cmd("HMGET")
            .arg(keys.key("totals"))
            .arg("open_accounts")
            .arg("balance_sum");
    }
    let mut con = shared.redis.connection();
    let rows: Vec<(Option<i64>, Option<i64>)> =
        pipe.query_async(&mut con).await.map_err(unavailable)?;
    let (open, sum) = rows.iter().fold((0i64, 0i64), |(o, s), (a, b)| {
        (o + a.unwrap_or(0), s + b.unwrap_or(0))
    });
    Ok(json!({"open_accounts": open, "balance_sum": sum}))
}
