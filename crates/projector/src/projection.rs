//! What a projection is: Rust code that turns one event into Redis writes.

use jetsource_core::envelope::RecordedEvent;

use crate::keys::KeySpace;

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
}
