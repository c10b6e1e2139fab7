//! Queries are part of a projection: it declares them ([`QuerySpec`]) and
//! answers them from its own key space ([`ReadView`]). The projector routes
//! requests to them generically; nothing in the framework knows any query.
//!
//! Subject scheme (docs/PROTOCOL.md): a query named `a.b` is asked on
//! `query.a.b`, or on `query.a.b.<key>` when it declares a key (one subject
//! token, e.g. an aggregate id). Parameters travel in the JSON body next to
//! the framework's own `min_sequence` and `timeout_ms`.

use serde_json::{Map, Value};

use crate::keys::{partition_of, KeySpace};
use crate::redis_store::Connection;

/// A query a projection answers.
#[derive(Debug, Clone, Copy)]
pub struct QuerySpec {
    /// One or more subject tokens, e.g. `account` or `accounts.top`.
    pub name: &'static str,
    /// Name of the key carried as the subject's last token (e.g. `id`),
    /// if the query takes one.
    pub key: Option<&'static str>,
    /// Body parameters; a body naming anything else is refused as invalid.
    pub params: &'static [Param],
    /// One line for `jetsource query --list` and the docs.
    pub about: &'static str,
}

/// A body parameter of a query.
#[derive(Debug, Clone, Copy)]
pub struct Param {
    pub name: &'static str,
    pub kind: ParamKind,
    pub about: &'static str,
}

/// A parameter's JSON type and its value when the body omits it. The
/// framework checks the type; ranges and meaning are the query's business.
#[derive(Debug, Clone, Copy)]
pub enum ParamKind {
    Integer { default: Option<i64> },
    Text { default: Option<&'static str> },
}

/// Body fields every query accepts, handled by the framework.
pub const RESERVED_PARAMS: [&str; 2] = ["min_sequence", "timeout_ms"];

impl QuerySpec {
    /// A parameter given as text (a command-line flag, a URL's query
    /// string) as the JSON value this query declares for it.
    pub fn param_from_text(&self, name: &str, value: &str) -> Result<Value, String> {
        let Some(param) = self.params.iter().find(|p| p.name == name) else {
            let known: Vec<&str> = self.params.iter().map(|p| p.name).collect();
            let known = if known.is_empty() {
                "it takes none".to_owned()
            } else {
                format!("its parameters: {}", known.join(", "))
            };
            return Err(format!(
                "query {} has no parameter {name:?}; {known}",
                self.name
            ));
        };
        match param.kind {
            ParamKind::Integer { .. } => value
                .parse::<i64>()
                .map(Value::from)
                .map_err(|_| format!("{name} must be an integer, not {value:?}")),
            ParamKind::Text { .. } => Ok(Value::from(value)),
        }
    }

    /// The subject pattern clients use: `query.accounts.top`,
    /// `query.account.<id>`.
    pub fn subject_pattern(&self) -> String {
        match self.key {
            Some(key) => format!("query.{}.<{key}>", self.name),
            None => format!("query.{}", self.name),
        }
    }

    /// The subject for this query with `key` (ignored if it takes none).
    pub fn subject(&self, key: Option<&str>) -> String {
        match (self.key, key) {
            (Some(_), Some(key)) => format!("query.{}.{key}", self.name),
            _ => format!("query.{}", self.name),
        }
    }

    /// Checks a body's parameters against the declaration and fills in
    /// defaults. `body` is a JSON object without the reserved fields.
    pub fn params_from(&self, body: Map<String, Value>) -> Result<Map<String, Value>, String> {
        let mut params = Map::new();
        for (name, value) in body {
            let Some(param) = self.params.iter().find(|p| p.name == name) else {
                let known: Vec<_> = self
                    .params
                    .iter()
                    .map(|p| p.name)
                    .chain(RESERVED_PARAMS)
                    .collect();
                return Err(format!(
                    "unknown field {name:?} for query {}; known: {}",
                    self.name,
                    known.join(", ")
                ));
            };
            let fits = match param.kind {
                ParamKind::Integer { .. } => value.is_i64() || value.is_null(),
                ParamKind::Text { .. } => value.is_string() || value.is_null(),
            };
            if !fits {
                return Err(format!(
                    "{name} must be {}, not {value}",
                    match param.kind {
                        ParamKind::Integer { .. } => "an integer",
                        ParamKind::Text { .. } => "a string",
                    }
                ));
            }
            if !value.is_null() {
                params.insert(name, value);
            }
        }
        for param in self.params {
            let default = match param.kind {
                ParamKind::Integer { default } => default.map(Value::from),
                ParamKind::Text { default } => default.map(Value::from),
            };
            if let (false, Some(default)) = (params.contains_key(param.name), default) {
                params.insert(param.name.to_owned(), default);
            }
        }
        Ok(params)
    }
}

/// One query to answer: which, for what key, with which parameters
/// (checked against the declaration, defaults filled in).
#[derive(Debug, Clone)]
pub struct QueryCall {
    pub name: &'static str,
    pub key: Option<String>,
    pub params: Map<String, Value>,
}

impl QueryCall {
    /// The key token; queries that declare a key always get one.
    pub fn key(&self) -> &str {
        self.key.as_deref().unwrap_or_default()
    }

    pub fn integer(&self, name: &str) -> Option<i64> {
        self.params.get(name).and_then(Value::as_i64)
    }

    pub fn text(&self, name: &str) -> Option<&str> {
        self.params.get(name).and_then(Value::as_str)
    }
}

/// Why a query has no answer. Redis failures are classed by the framework
/// (`unavailable` when a retry may help, `internal` otherwise).
#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    /// Error code `not_found`: the thing asked for does not exist.
    #[error("{0}")]
    NotFound(String),
    /// Error code `invalid`: the request can never succeed as it is.
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Redis(#[from] redis::RedisError),
}

/// What a query may read: the projection's active generation, one
/// consistent view while the query runs (the framework retries a query
/// that raced a generation switch).
#[derive(Debug)]
pub struct ReadView {
    pub(crate) projection: &'static str,
    pub(crate) generation: u64,
    pub(crate) partitions: u32,
    pub(crate) connection: Connection,
}

impl ReadView {
    /// The key space of the partition holding an aggregate's keys, as
    /// `Projection::project` got it for that aggregate's events.
    pub fn keys_for(&self, aggregate_type: &str, aggregate_id: &str) -> KeySpace {
        KeySpace::new(
            self.projection,
            self.generation,
            partition_of(aggregate_type, aggregate_id, self.partitions),
        )
    }

    /// Every partition's key space: indexes kept per partition (a ranking,
    /// a list per customer) are merged across them by the query.
    pub fn partitions(&self) -> impl Iterator<Item = KeySpace> + '_ {
        (0..self.partitions).map(|p| KeySpace::new(self.projection, self.generation, p))
    }

    /// A read connection: every call ends within `redis.timeout_ms`.
    pub fn connection(&self) -> Connection {
        self.connection.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const TOP: QuerySpec = QuerySpec {
        name: "accounts.top",
        key: None,
        params: &[
            Param {
                name: "limit",
                kind: ParamKind::Integer { default: Some(10) },
                about: "",
            },
            Param {
                name: "after",
                kind: ParamKind::Text { default: None },
                about: "",
            },
        ],
        about: "",
    };

    fn body(v: Value) -> Map<String, Value> {
        v.as_object().cloned().unwrap_or_default()
    }

    #[test]
    fn defaults_fill_in_and_types_are_checked() {
        let params = TOP.params_from(Map::new()).unwrap_or_default();
        assert_eq!(params.get("limit"), Some(&json!(10)));
        assert!(!params.contains_key("after"));
        let params = TOP
            .params_from(body(json!({"limit": 3, "after": "x"})))
            .unwrap_or_default();
        assert_eq!(params.get("limit"), Some(&json!(3)));
        assert_eq!(params.get("after"), Some(&json!("x")));
        assert!(TOP
            .params_from(body(json!({"limit": "3"})))
            .is_err_and(|e| e.contains("integer")));
        assert!(TOP
            .params_from(body(json!({"limit": 1.5})))
            .is_err_and(|e| e.contains("integer")));
        assert!(TOP
            .params_from(body(json!({"offset": 1})))
            .is_err_and(|e| e.contains("unknown field \"offset\"") && e.contains("limit")));
    }

    #[test]
    fn subjects_follow_the_scheme() {
        assert_eq!(TOP.subject_pattern(), "query.accounts.top");
        let account = QuerySpec {
            name: "account",
            key: Some("id"),
            params: &[],
            about: "",
        };
        assert_eq!(account.subject_pattern(), "query.account.<id>");
        assert_eq!(account.subject(Some("a1")), "query.account.a1");
    }
}
