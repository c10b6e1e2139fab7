//! What a projection is: Rust code that turns one event into Redis writes,
//! and answers the queries it declares from the keys it wrote.

use std::borrow::Cow;
use std::sync::Arc;

use futures::future::BoxFuture;
use jetsource_core::aggregate::Registry;
use jetsource_core::envelope::RecordedEvent;
use serde_json::Value;

use crate::keys::KeySpace;
use crate::read::{QueryCall, QueryError, QuerySpec, ReadView};

/// One Redis command, e.g. `HINCRBY <key> balance 100`. Projections emit
/// commands instead of running them so the runtime can apply a whole batch,
/// with its checkpoint, in one atomic Lua call per partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Op(pub Vec<String>);

impl Op {
    pub fn new(command: &str, key: String) -> Self {
        Self(vec![command.to_owned(), key])
    }

    pub fn arg(mut self, arg: impl ToString) -> Self {
        self.0.push(arg.to_string());
        self
    }
}

/// An event this projection cannot apply: bad payload, unknown type, a
/// value out of range. Dead-lettered after `projector.max_attempts`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ProjectionError(pub String);

/// Decodes an event into the domain's `#[serde(tag = "type", content =
/// "data")]` enum with one parse. The data is checked to be exactly one
/// JSON value first, so it cannot smuggle in a second `type`.
pub fn decode<E: serde::de::DeserializeOwned>(event: &RecordedEvent) -> Result<E, ProjectionError> {
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

/// A read model kept in Redis.
///
/// `project` must be deterministic and must not read Redis: the runtime
/// applies its output with the partition checkpoint in one atomic step, and
/// may call it again for a redelivered event.
pub trait Projection: Send + Sync + std::fmt::Debug + 'static {
    /// Name in keys, consumer names and `jetsource projection` commands.
    fn name(&self) -> &'static str;

    /// Aggregate types whose events this projection reads; events of other
    /// types are passed over without being decoded (and are never dead
    /// letters of this projection).
    fn aggregate_types(&self) -> &'static [&'static str];

    /// Appends the writes for `event` to `ops`, all keys from `keys` (the
    /// event's partition). Events the projection does not care about add
    /// nothing.
    fn project(
        &self,
        event: &RecordedEvent,
        keys: &KeySpace,
        ops: &mut Vec<Op>,
    ) -> Result<(), ProjectionError>;

    /// The queries this projection answers. Names are unique across an
    /// application (checked when the projector starts).
    fn queries(&self) -> &'static [QuerySpec] {
        &[]
    }

    /// Answers `call`, one of [`Self::queries`], reading only `view`.
    /// The reply's `data` is what this returns.
    fn answer<'a>(
        &'a self,
        call: &'a QueryCall,
        _view: &'a ReadView,
    ) -> BoxFuture<'a, Result<Value, QueryError>> {
        Box::pin(async move {
            Err(QueryError::Invalid(format!(
                "projection {} declares no query {}",
                self.name(),
                call.name
            )))
        })
    }
}

/// `projections`, each reading events through the aggregates' upcasters
/// in `registry` (events of types it does not know pass unchanged). Every
/// path that projects (live, rebuild, gap fill, dead-letter replay) goes
/// through `project`, so wrapping once covers them all.
pub fn with_upcasting(
    registry: &Registry,
    projections: Vec<Arc<dyn Projection>>,
) -> Vec<Arc<dyn Projection>> {
    projections
        .into_iter()
        .map(|inner| {
            Arc::new(Upcasting {
                inner,
                registry: registry.clone(),
            }) as Arc<dyn Projection>
        })
        .collect()
}

#[derive(Debug)]
struct Upcasting {
    inner: Arc<dyn Projection>,
    registry: Registry,
}

impl Projection for Upcasting {
    fn name(&self) -> &'static str {
        self.inner.name()
    }

    fn aggregate_types(&self) -> &'static [&'static str] {
        self.inner.aggregate_types()
    }

    fn project(
        &self,
        event: &RecordedEvent,
        keys: &KeySpace,
        ops: &mut Vec<Op>,
    ) -> Result<(), ProjectionError> {
        let Some(aggregate) = self.registry.get(&event.aggregate_type) else {
            return self.inner.project(event, keys, ops);
        };
        match aggregate.upcast(event.stored()) {
            Ok(Cow::Borrowed(_)) => self.inner.project(event, keys, ops),
            Ok(Cow::Owned(data)) => {
                let mut current = event.clone();
                current.data = data.into();
                current.schema_version = aggregate.event_schema_version();
                self.inner.project(&current, keys, ops)
            }
            Err(e) => Err(ProjectionError(e.to_string())),
        }
    }

    fn queries(&self) -> &'static [QuerySpec] {
        self.inner.queries()
    }

    fn answer<'a>(
        &'a self,
        call: &'a QueryCall,
        view: &'a ReadView,
    ) -> BoxFuture<'a, Result<Value, QueryError>> {
        self.inner.answer(call, view)
    }
}
