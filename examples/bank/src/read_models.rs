//! Read models of the bank and the queries they answer.
//!
//! | subject | data |
//! |---|---|
//! | `query.account.<id>` | the account, with its recent transactions |
//! | `query.accounts.top` | open accounts by balance, highest first (`limit`, default 10, at most 1000) |
//! | `query.accounts.totals` | `open_accounts`, `balance_sum` |
//! | `query.user.<id>` | the user |
//!
//! `accounts` (per partition):
//! - `account:<id>` hash: `owner`, `balance`, `status`, `version`,
//!   `updated_at` (RFC 3339), `sequence`
//! - `account:<id>:transactions` list, newest first, capped: JSON
//!   `{"sequence", "type", "amount", "at"}`
//! - `accounts:by_balance` sorted set of open accounts, score = balance
//! - `totals` hash: `open_accounts`, `balance_sum`
//!
//! `users` (per partition):
//! - `user:<id>` hash: `name`, `version`, `updated_at`, `sequence`; a deleted
//!   user has no key.

use std::collections::HashMap;

use jetsource::futures::future::BoxFuture;
use jetsource::redis;
use jetsource::serde_json::{json, Value};
use jetsource::{
    decode, KeySpace, Op, Param, ParamKind, Projection, ProjectionError, QueryCall, QueryError,
    QuerySpec, ReadView, RecordedEvent,
};
use time::format_description::well_known::Rfc3339;

use crate::account::AccountEvent;
use crate::user::UserEvent;

/// Largest amount the read models accept: sums are Redis 64-bit integers.
pub const MAX_AMOUNT: u64 = 1 << 53;

fn at(event: &RecordedEvent) -> String {
    event.timestamp.format(&Rfc3339).unwrap_or_default()
}

fn amount(amount: u64) -> Result<i64, ProjectionError> {
    if amount == 0 || amount > MAX_AMOUNT {
        return Err(ProjectionError(format!(
            "amount {amount} is outside 1..={MAX_AMOUNT}"
        )));
    }
    Ok(amount as i64)
}

#[derive(Debug)]
pub struct Accounts {
    pub recent_transactions: usize,
}

impl Projection for Accounts {
    fn name(&self) -> &'static str {
        "accounts"
    }

    fn aggregate_types(&self) -> &'static [&'static str] {
        &["account"]
    }

    fn project(
        &self,
        event: &RecordedEvent,
        keys: &KeySpace,
        ops: &mut Vec<Op>,
    ) -> Result<(), ProjectionError> {
        if event.aggregate_type != "account" {
            return Ok(());
        }
        let id = &event.aggregate_id;
        let account = keys.key(&format!("account:{id}"));
        let ranking = keys.key("accounts:by_balance");
        let totals = keys.key("totals");
        let transactions = keys.key(&format!("account:{id}:transactions"));
        let at = at(event);
        let stamp = |op: Op| {
            op.arg("version")
                .arg(event.aggregate_version)
                .arg("updated_at")
                .arg(&at)
                .arg("sequence")
                .arg(event.sequence)
        };
        let mut transaction = |kind: &str, signed: i64| {
            // `kind` is one of our event names and `at` an RFC 3339 time:
            // nothing to escape, and no JSON tree to build per event.
            let entry = format!(
                r#"{{"sequence":{},"type":"{kind}","amount":{signed},"at":"{at}"}}"#,
                event.sequence
            );
            ops.push(Op::new("LPUSH", transactions.clone()).arg(entry));
            ops.push(
                Op::new("LTRIM", transactions.clone())
                    .arg(0)
                    .arg(self.recent_transactions.saturating_sub(1)),
            );
        };
        match decode::<AccountEvent>(event)? {
            AccountEvent::AccountOpened { owner } => {
                ops.push(stamp(
                    Op::new("HSET", account)
                        .arg("owner")
                        .arg(owner)
                        .arg("status")
                        .arg("open")
                        .arg("balance")
                        .arg(0),
                ));
                ops.push(Op::new("ZADD", ranking).arg(0).arg(id));
                ops.push(Op::new("HINCRBY", totals).arg("open_accounts").arg(1));
            }
            AccountEvent::AccountClosed {} => {
                ops.push(stamp(Op::new("HSET", account).arg("status").arg("closed")));
                ops.push(Op::new("ZREM", ranking).arg(id));
                ops.push(Op::new("HINCRBY", totals).arg("open_accounts").arg(-1));
            }
            moved => {
                let movement = moved.movement().expect("every other event moves money");
                let size = amount(movement.amount)?;
                let signed = if movement.credit { size } else { -size };
                transaction(movement.kind, signed);
                ops.push(
                    Op::new("HINCRBY", account.clone())
                        .arg("balance")
                        .arg(signed),
                );
                ops.push(stamp(Op::new("HSET", account)));
                ops.push(Op::new("ZINCRBY", ranking).arg(signed).arg(id));
                ops.push(Op::new("HINCRBY", totals).arg("balance_sum").arg(signed));
            }
        }
        Ok(())
    }

    fn queries(&self) -> &'static [QuerySpec] {
        ACCOUNT_QUERIES
    }

    fn answer<'a>(
        &'a self,
        call: &'a QueryCall,
        view: &'a ReadView,
    ) -> BoxFuture<'a, Result<Value, QueryError>> {
        Box::pin(async move {
            match call.name {
                "account" => account(view, call.key()).await,
                "accounts.top" => {
                    let limit = call.integer("limit").unwrap_or(10);
                    if limit < 0 {
                        return Err(QueryError::Invalid(format!(
                            "limit must be a non-negative integer, not {limit}"
                        )));
                    }
                    top(view, limit.clamp(1, 1000) as usize).await
                }
                _ => totals(view).await,
            }
        })
    }
}

/// Before queries were declared, every bank query accepted `limit` (and
/// only `accounts.top` used it): clients that send it everywhere keep
/// working.
const IGNORED_LIMIT: &[Param] = &[Param {
    name: "limit",
    kind: ParamKind::Integer { default: None },
    about: "accepted for compatibility, ignored",
}];

const ACCOUNT_QUERIES: &[QuerySpec] = &[
    QuerySpec {
        name: "account",
        key: Some("id"),
        params: IGNORED_LIMIT,
        about: "an account with its recent transactions",
    },
    QuerySpec {
        name: "accounts.top",
        key: None,
        params: &[Param {
            name: "limit",
            kind: ParamKind::Integer { default: Some(10) },
            about: "how many accounts (1 to 1000)",
        }],
        about: "open accounts by balance, highest first",
    },
    QuerySpec {
        name: "accounts.totals",
        key: None,
        params: IGNORED_LIMIT,
        about: "number of open accounts and the sum of their balances",
    },
];

fn number(fields: &HashMap<String, String>, name: &str) -> Value {
    fields
        .get(name)
        .and_then(|v| v.parse::<i64>().ok())
        .map_or(Value::Null, Value::from)
}

async fn account(view: &ReadView, id: &str) -> Result<Value, QueryError> {
    let keys = view.keys_for("account", id);
    let (fields, transactions): (HashMap<String, String>, Vec<String>) = redis::pipe()
        .atomic()
        .cmd("HGETALL")
        .arg(keys.key(&format!("account:{id}")))
        .cmd("LRANGE")
        .arg(keys.key(&format!("account:{id}:transactions")))
        .arg(0)
        .arg(-1)
        .query_async(&mut view.connection())
        .await?;
    if fields.is_empty() {
        return Err(QueryError::NotFound(format!("account {id} not found")));
    }
    let transactions: Vec<Value> = transactions
        .iter()
        .filter_map(|t| jetsource::serde_json::from_str(t).ok())
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

/// Merges each partition's top `limit` into the overall top `limit`.
async fn top(view: &ReadView, limit: usize) -> Result<Value, QueryError> {
    let mut pipe = redis::pipe();
    for keys in view.partitions() {
        pipe.cmd("ZREVRANGE")
            .arg(keys.key("accounts:by_balance"))
            .arg(0)
            .arg(limit - 1)
            .arg("WITHSCORES");
    }
    let pages: Vec<Vec<(String, i64)>> = pipe.query_async(&mut view.connection()).await?;
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
async fn totals(view: &ReadView) -> Result<Value, QueryError> {
    let mut pipe = redis::pipe();
    for keys in view.partitions() {
        pipe.cmd("HMGET")
            .arg(keys.key("totals"))
            .arg("open_accounts")
            .arg("balance_sum");
    }
    let rows: Vec<(Option<i64>, Option<i64>)> = pipe.query_async(&mut view.connection()).await?;
    let (open, sum) = rows.iter().fold((0i64, 0i64), |(o, s), (a, b)| {
        (o + a.unwrap_or(0), s + b.unwrap_or(0))
    });
    Ok(json!({"open_accounts": open, "balance_sum": sum}))
}

#[derive(Debug)]
pub struct Users;

impl Projection for Users {
    fn name(&self) -> &'static str {
        "users"
    }

    fn aggregate_types(&self) -> &'static [&'static str] {
        &["user"]
    }

    fn project(
        &self,
        event: &RecordedEvent,
        keys: &KeySpace,
        ops: &mut Vec<Op>,
    ) -> Result<(), ProjectionError> {
        if event.aggregate_type != "user" {
            return Ok(());
        }
        let user = keys.key(&format!("user:{}", event.aggregate_id));
        match decode::<UserEvent>(event)? {
            UserEvent::UserCreated { name } | UserEvent::UserNameUpdated { name } => {
                ops.push(
                    Op::new("HSET", user)
                        .arg("name")
                        .arg(name)
                        .arg("version")
                        .arg(event.aggregate_version)
                        .arg("updated_at")
                        .arg(at(event))
                        .arg("sequence")
                        .arg(event.sequence),
                );
            }
            UserEvent::UserDeleted {} => ops.push(Op::new("DEL", user)),
        }
        Ok(())
    }

    fn queries(&self) -> &'static [QuerySpec] {
        &[QuerySpec {
            name: "user",
            key: Some("id"),
            params: IGNORED_LIMIT,
            about: "a user",
        }]
    }

    fn answer<'a>(
        &'a self,
        call: &'a QueryCall,
        view: &'a ReadView,
    ) -> BoxFuture<'a, Result<Value, QueryError>> {
        Box::pin(async move {
            let id = call.key();
            let fields: HashMap<String, String> = redis::cmd("HGETALL")
                .arg(view.keys_for("user", id).key(&format!("user:{id}")))
                .query_async(&mut view.connection())
                .await?;
            if fields.is_empty() {
                return Err(QueryError::NotFound(format!("user {id} not found")));
            }
            Ok(json!({
                "id": id,
                "name": fields.get("name"),
                "version": number(&fields, "version"),
                "sequence": number(&fields, "sequence"),
                "updated_at": fields.get("updated_at"),
            }))
        })
    }
}
