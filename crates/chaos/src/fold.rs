//! What each account's read model must show: a fresh fold of its events
//! from the stream (state through the domain's own `apply`, the rest as the
//! `accounts` projection defines it, crates/projector/src/example.rs), and
//! the field-by-field comparison with what `query.account.<id>` answered.

use std::collections::BTreeMap;

use jetsource_aggregate::Aggregate;
use jetsource_bank::account::{Account, AccountEvent, AccountState, AccountStatus};
use jetsource_core::envelope::RecordedEvent;
use serde_json::{json, Value};
use time::format_description::well_known::Rfc3339;

use crate::fleet::RECENT_TRANSACTIONS;

/// One entry of `recent_transactions`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transaction {
    pub sequence: u64,
    pub kind: String,
    pub amount: i64,
    pub at: String,
}

impl std::fmt::Display for Transaction {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "#{} {} {:+}", self.sequence, self.kind, self.amount)
    }
}

/// An account as its events say it is.
#[derive(Debug, Clone, Default)]
pub struct Expected {
    pub state: AccountState,
    pub version: u64,
    pub sequence: u64,
    pub updated_at: String,
    /// Newest first, at most [`RECENT_TRANSACTIONS`].
    pub transactions: Vec<Transaction>,
    /// Events the domain could not decode (would be dead letters).
    pub undecodable: usize,
}

impl Expected {
    pub fn is_open(&self) -> bool {
        self.state.status == AccountStatus::Open
    }
}

/// Folds every `account` event, in stream order, per account id.
pub fn fold(events: &[RecordedEvent]) -> BTreeMap<String, Expected> {
    let mut accounts: BTreeMap<String, Expected> = BTreeMap::new();
    for event in events.iter().filter(|e| e.aggregate_type == "account") {
        let account = accounts.entry(event.aggregate_id.clone()).or_default();
        apply(account, event);
    }
    accounts
}

fn apply(account: &mut Expected, event: &RecordedEvent) {
    let at = event.timestamp.format(&Rfc3339).unwrap_or_default();
    account.version = event.aggregate_version;
    account.sequence = event.sequence;
    account.updated_at.clone_from(&at);
    let Some(decoded) = decode(event) else {
        account.undecodable += 1;
        return;
    };
    let signed = decoded.movement().map(|m| {
        let size = m.amount as i64;
        (m.kind, if m.credit { size } else { -size })
    });
    if let Some((kind, amount)) = signed {
        account.transactions.insert(
            0,
            Transaction {
                sequence: event.sequence,
                kind: kind.into(),
                amount,
                at,
            },
        );
        account.transactions.truncate(RECENT_TRANSACTIONS);
    }
    account.state = Account::apply(std::mem::take(&mut account.state), &decoded);
}

fn decode(event: &RecordedEvent) -> Option<AccountEvent> {
    let data: Value = serde_json::from_slice(&event.data).ok()?;
    serde_json::from_value(json!({"type": event.event_type, "data": data})).ok()
}

/// One field that differs.
#[derive(Debug, Clone)]
pub struct Mismatch {
    pub account: String,
    pub field: &'static str,
    pub expected: String,
    pub actual: String,
}

/// Compares a `query.account.<id>` answer (`Err`: the error it gave) with
/// the fold.
pub fn compare(id: &str, expected: &Expected, answer: &Result<Value, String>) -> Vec<Mismatch> {
    let miss = |field, expected: String, actual: String| Mismatch {
        account: id.to_owned(),
        field,
        expected,
        actual,
    };
    let data = match answer {
        Ok(data) => data,
        Err(e) => return vec![miss("answer", "the account".into(), e.clone())],
    };
    let status = match expected.state.status {
        AccountStatus::New => "new",
        AccountStatus::Open => "open",
        AccountStatus::Closed => "closed",
    };
    let fields: [(&'static str, Value, &Value); 6] = [
        ("owner", json!(expected.state.owner), &data["owner"]),
        ("status", json!(status), &data["status"]),
        ("balance", json!(expected.state.balance), &data["balance"]),
        ("version", json!(expected.version), &data["version"]),
        ("sequence", json!(expected.sequence), &data["sequence"]),
        (
            "updated_at",
            json!(expected.updated_at),
            &data["updated_at"],
        ),
    ];
    let mut out: Vec<Mismatch> = fields
        .into_iter()
        .filter(|(_, want, got)| want != *got)
        .map(|(field, want, got)| miss(field, want.to_string(), got.to_string()))
        .collect();
    let actual = transactions(&data["recent_transactions"]);
    if actual != expected.transactions {
        let (want, got) = diff(&expected.transactions, &actual);
        out.push(miss("recent_transactions", want, got));
    }
    out
}

fn transactions(value: &Value) -> Vec<Transaction> {
    value
        .as_array()
        .map(|entries| {
            entries
                .iter()
                .map(|t| Transaction {
                    sequence: t["sequence"].as_u64().unwrap_or(0),
                    kind: t["type"].as_str().unwrap_or_default().to_owned(),
                    amount: t["amount"].as_i64().unwrap_or(0),
                    at: t["at"].as_str().unwrap_or_default().to_owned(),
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Says how two transaction lists differ: entries missing from the read
/// model, entries it has that the events do not, else order or timestamps.
fn diff(expected: &[Transaction], actual: &[Transaction]) -> (String, String) {
    let missing: Vec<String> = expected
        .iter()
        .filter(|t| !actual.iter().any(|a| a.sequence == t.sequence))
        .map(ToString::to_string)
        .collect();
    let extra: Vec<String> = actual
        .iter()
        .filter(|a| !expected.iter().any(|t| t.sequence == a.sequence))
        .map(ToString::to_string)
        .collect();
    let want = format!("{} entries", expected.len());
    let got = if missing.is_empty() && extra.is_empty() {
        format!(
            "{} entries, same sequences but other order/type/amount/at",
            actual.len()
        )
    } else {
        let mut parts = vec![format!("{} entries", actual.len())];
        if !missing.is_empty() {
            parts.push(format!("missing {}", shorten(&missing)));
        }
        if !extra.is_empty() {
            parts.push(format!(
                "extra (not among the newest {RECENT_TRANSACTIONS} of the events) {}",
                shorten(&extra)
            ));
        }
        parts.join("; ")
    };
    (want, got)
}

fn shorten(items: &[String]) -> String {
    const SHOWN: usize = 4;
    let mut text = items
        .iter()
        .take(SHOWN)
        .cloned()
        .collect::<Vec<_>>()
        .join(", ");
    if items.len() > SHOWN {
        text.push_str(&format!(" and {} more", items.len() - SHOWN));
    }
    text
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A stored `account` event, for tests.
    pub(crate) fn event(
        sequence: u64,
        id: &str,
        version: u64,
        command_id: &str,
        kind: &str,
        data: Value,
    ) -> RecordedEvent {
        RecordedEvent {
            sequence,
            timestamp: time::OffsetDateTime::UNIX_EPOCH + time::Duration::seconds(sequence as i64),
            aggregate_type: "account".into(),
            aggregate_id: id.into(),
            aggregate_version: version,
            event_id: format!("e{sequence}"),
            event_type: kind.into(),
            schema_version: 1,
            command_id: Some(command_id.into()),
            correlation_id: None,
            causation_id: None,
            data: serde_json::to_vec(&data).unwrap_or_default().into(),
            ..Default::default()
        }
    }

    fn history() -> Vec<RecordedEvent> {
        let mut events = vec![
            event(1, "a", 1, "open", "AccountOpened", json!({"owner": "ada"})),
            event(2, "a", 2, "open", "Deposited", json!({"amount": 100})),
        ];
        for k in 0..25u64 {
            events.push(event(
                3 + k,
                "a",
                3 + k,
                &format!("w{k}"),
                "Withdrawn",
                json!({"amount": 1}),
            ));
        }
        events
    }

    #[test]
    fn the_fold_follows_the_domain_and_the_projection() {
        let accounts = fold(&history());
        let a = &accounts["a"];
        assert_eq!(a.state.balance, 75);
        assert_eq!(a.state.owner, "ada");
        assert!(a.is_open());
        assert_eq!((a.version, a.sequence), (27, 27));
        assert_eq!(
            a.transactions.len(),
            RECENT_TRANSACTIONS,
            "capped like the read model"
        );
        assert_eq!(
            a.transactions[0].to_string(),
            "#27 Withdrawn -1",
            "newest first"
        );
    }

    #[test]
    fn a_read_model_that_lost_an_event_is_named_field_by_field() {
        let accounts = fold(&history());
        let expected = &accounts["a"];
        // The read model missed the withdrawal at sequence 20.
        let mut transactions: Vec<Value> = expected
            .transactions
            .iter()
            .filter(|t| t.sequence != 20)
            .map(
                |t| json!({"sequence": t.sequence, "type": t.kind, "amount": t.amount, "at": t.at}),
            )
            .collect();
        transactions.push(json!({"sequence": 7, "type": "Withdrawn", "amount": -1, "at": "x"}));
        let answer = json!({
            "owner": "ada", "status": "open", "balance": 76, "version": 27, "sequence": 27,
            "updated_at": expected.updated_at, "recent_transactions": transactions,
        });
        let mismatches = compare("a", expected, &Ok(answer.clone()));
        let fields: Vec<&str> = mismatches.iter().map(|m| m.field).collect();
        assert_eq!(fields, ["balance", "recent_transactions"]);
        assert_eq!(
            (
                mismatches[0].expected.as_str(),
                mismatches[0].actual.as_str()
            ),
            ("75", "76")
        );
        assert!(
            mismatches[1].actual.contains("missing #20 Withdrawn -1"),
            "{:?}",
            mismatches[1]
        );
        assert!(
            mismatches[1]
                .actual
                .contains("of the events) #7 Withdrawn -1"),
            "{:?}",
            mismatches[1]
        );
        let failed = compare("a", expected, &Err("timeout: not yet".into()));
        assert_eq!(failed[0].field, "answer");
    }
}
