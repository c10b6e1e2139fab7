//! Read models of the example domain.
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

use jetsource_core::envelope::RecordedEvent;
use jetsource_example::account::AccountEvent;
use jetsource_example::user::UserEvent;
use serde::de::DeserializeOwned;
use time::format_description::well_known::Rfc3339;

use crate::keys::KeySpace;
use crate::projection::{Op, Projection, ProjectionError};

/// Largest amount the read models accept: sums are Redis 64-bit integers.
pub const MAX_AMOUNT: u64 = 1 << 53;

/// Decodes an event into the domain's `{"type", "data"}` enum with one
/// parse. The data is checked to be exactly one JSON value first, so it
/// cannot smuggle in a second `type`.
fn decode<E: DeserializeOwned>(event: &RecordedEvent) -> Result<E, ProjectionError> {
    let data: &serde_json::value::RawValue = serde_json::from_slice(&event.data)
        .map_err(|e| ProjectionError(format!("data is not JSON: {e}")))?;
    let tag = serde_json::to_string(&event.event_type).unwrap_or_default();
    let mut doc = String::with_capacity(tag.len() + data.get().len() + 20);
    doc.push_str("{\"type\":");
    doc.push_str(&tag);
    doc.push_str(",\"data\":");
    doc.push_str(data.get());
    doc.push('}');
    serde_json::from_str(&doc)
        .map_err(|e| ProjectionError(format!("cannot decode {}: {e}", event.event_type)))
}

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
            AccountEvent::Deposited { amount: a } | AccountEvent::Withdrawn { amount: a } => {
                let deposit = event.event_type == "Deposited";
                let signed = if deposit { amount(a)? } else { -amount(a)? };
                transaction(if deposit { "Deposited" } else { "Withdrawn" }, signed);
                ops.push(
                    Op::new("HINCRBY", account.clone())
                        .arg("balance")
                        .arg(signed),
                );
                ops.push(stamp(Op::new("HSET", account)));
                ops.push(Op::new("ZINCRBY", ranking).arg(signed).arg(id));
                ops.push(Op::new("HINCRBY", totals).arg("balance_sum").arg(signed));
            }
            AccountEvent::AccountClosed {} => {
                ops.push(stamp(Op::new("HSET", account).arg("status").arg("closed")));
                ops.push(Op::new("ZREM", ranking).arg(id));
                ops.push(Op::new("HINCRBY", totals).arg("open_accounts").arg(-1));
            }
        }
        Ok(())
    }
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
}

/// The example domain's projections, by name.
pub fn projections(recent_transactions: usize) -> Vec<std::sync::Arc<dyn Projection>> {
    vec![
        std::sync::Arc::new(Accounts {
            recent_transactions,
        }),
        std::sync::Arc::new(Users),
    ]
}
