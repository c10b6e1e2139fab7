//! Redis access for projections: atomic batch application with checkpoints,
//! watermarks and generation metadata, as Lua scripts.
//!
//! Two [`Connection`]s, each bounding every call and replacing itself when a
//! call times out or breaks it: one for batches of writes (large, may take a
//! while), one for everything small (metadata, watermarks, queries), which
//! so never waits behind a batch of its own process.
//!
//! With `redis.query_url` set, the pure reads (queries, metadata and
//! watermark reads) use a third connection, as that URL's user, which may
//! be an ACL user allowed to read only; everything that writes (batches,
//! the metadata scripts, deleting generations) stays on `redis.url`'s user.
//! Both honour `redis.tls_ca_file`/`tls_cert_file`/`tls_key_file` for
//! `rediss://` URLs (docs/TLS.md).

mod connection;

use std::time::Duration;

use jetsource_core::config::RedisConfig;
use redis::{RedisError, Script};

pub use connection::{class, client, Connection, RECONNECT_PAUSE};

use crate::keys::{meta_key, watermark_key};
use crate::projection::Op;

/// Applies a partition's events in stream order, each only if its sequence
/// is above the partition checkpoint, and moves the checkpoint, atomically.
/// A redelivered event is skipped; a crash between this call and the ack
/// loses nothing and doubles nothing.
///
/// **Precondition** (`after`, ARGV[2]): the checkpoint must have reached
/// the last event of this partition in the batches the runner wrote before
/// this one; if not, an earlier batch's write of this partition failed or
/// has not run yet, and the script returns -2 without writing anything.
/// This is what makes two batches in flight safe: whichever order Redis
/// runs them in, and whichever of them fails, a partition's events are
/// applied in stream order and none is skipped (see `runner::Window`).
///
/// ARGV is flat so the script decodes nothing. After `form, after`: `e`
/// form, per event: `sequence, op_count`, then per op `argc, command, key,
/// args...`. `m` form (a merged batch, see [`merge`]): `first, last,
/// events, op_count, ops...`, applied whole or not at all: -1 when the
/// checkpoint lies inside the range, and the caller sends the `e` form
/// instead. Each op runs straight from ARGV with `unpack(ARGV, from, to)`;
/// an earlier version sent JSON and spent a fifth of Redis' time in
/// `cjson.decode`.
const APPLY: &str = r#"
local checkpoint = tonumber(redis.call('GET', KEYS[1]) or '0')
if checkpoint < tonumber(ARGV[2]) then return -2 end
local function run(i, ops)
  for _ = 1, ops do
    local argc = tonumber(ARGV[i])
    redis.call(unpack(ARGV, i + 1, i + argc))
    i = i + 1 + argc
  end
end
if ARGV[1] == 'm' then
  local first, last = tonumber(ARGV[3]), tonumber(ARGV[4])
  if checkpoint >= last then return 0 end
  if checkpoint >= first then return -1 end
  run(7, tonumber(ARGV[6]))
  redis.call('SET', KEYS[1], ARGV[4])
  return tonumber(ARGV[5])
end
local applied = 0
local i = 3
local n = #ARGV
while i <= n do
  local sequence = tonumber(ARGV[i])
  local ops = tonumber(ARGV[i + 1])
  i = i + 2
  if sequence > checkpoint then
    run(i, ops)
    checkpoint = sequence
    applied = applied + 1
  end
  for _ = 1, ops do
    i = i + 1 + tonumber(ARGV[i])
  end
end
redis.call('SET', KEYS[1], string.format('%d', checkpoint))
return applied
"#;

/// Commands known to touch exactly the key at index 1: batches made only of
/// these may be merged.
const SINGLE_KEY: &[&str] = &[
    "APPEND",
    "DECR",
    "DECRBY",
    "EXPIRE",
    "HDEL",
    "HINCRBY",
    "HINCRBYFLOAT",
    "HSET",
    "HSETNX",
    "INCR",
    "INCRBY",
    "LPUSH",
    "LREM",
    "LTRIM",
    "PERSIST",
    "PEXPIRE",
    "RPUSH",
    "SADD",
    "SET",
    "SREM",
    "XADD",
    "ZADD",
    "ZINCRBY",
    "ZREM",
];

/// One write of a merged batch: the op at `ops[op]` of event `event`, with
/// its amount replaced by `amount` when increments were added up into it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Merged {
    pub event: usize,
    pub op: usize,
    pub amount: Option<i64>,
}

/// Merges a partition's events into one list of writes, adding up integer
/// increments of the same counter (`HINCRBY key field`, `ZINCRBY key member`,
/// `INCRBY key`) when nothing else touched that key in between. Writes to
/// different keys commute, so a later increment may join an earlier one.
/// `None` when there is nothing to merge or a command is not known to be
/// single-key. A merged batch must be applied whole (the APPLY `m` form).
/// Refers to the ops instead of copying them: this runs for every batch.
pub fn merge(events: &[(u64, Vec<Op>)]) -> Option<Vec<Merged>> {
    if events.len() < 2 {
        return None;
    }
    let mut out: Vec<Merged> = Vec::new();
    // Per key: index in `out` of the last write to it.
    let mut last_write: std::collections::HashMap<&str, usize> = std::collections::HashMap::new();
    let mut merged_any = false;
    let args_of = |m: &Merged| &events[m.event].1[m.op].0;
    for (e, (_, ops)) in events.iter().enumerate() {
        for (o, op) in ops.iter().enumerate() {
            let args = &op.0;
            if args.len() < 2 || !SINGLE_KEY.iter().any(|c| c.eq_ignore_ascii_case(&args[0])) {
                return None;
            }
            let key = args[1].as_str();
            // (amount index, counter index) of an integer increment.
            let increment = match args.len() {
                4 if args[0].eq_ignore_ascii_case("HINCRBY") => Some((3, Some(2))),
                4 if args[0].eq_ignore_ascii_case("ZINCRBY") => Some((2, Some(3))),
                3 if args[0].eq_ignore_ascii_case("INCRBY") => Some((2, None)),
                _ => None,
            };
            if let (Some((at, counter)), Some(&prev)) = (increment, last_write.get(key)) {
                let earlier = args_of(&out[prev]);
                let same_counter = earlier.len() == args.len()
                    && earlier[0].eq_ignore_ascii_case(&args[0])
                    && counter.is_none_or(|c| earlier[c] == args[c]);
                if same_counter {
                    let sum = out[prev]
                        .amount
                        .or_else(|| earlier[at].parse::<i64>().ok())
                        .zip(args[at].parse::<i64>().ok())
                        .and_then(|(a, b)| a.checked_add(b));
                    if let Some(sum) = sum {
                        out[prev].amount = Some(sum);
                        merged_any = true;
                        continue;
                    }
                }
            }
            last_write.insert(key, out.len());
            out.push(Merged {
                event: e,
                op: o,
                amount: None,
            });
        }
    }
    merged_any.then_some(out)
}

/// The amount's position in a merged increment.
fn amount_index(command: &str) -> usize {
    if command.eq_ignore_ascii_case("HINCRBY") {
        3
    } else {
        2
    }
}

/// Raises a watermark to ARGV[1], never lowers it, and returns it. Only
/// from ARGV[2] or above: a watermark below it has lost what the caller
/// saw applied (Redis restarted from an older snapshot), so the caller's
/// batches no longer sit on applied events, and the script returns -1
/// without writing.
const RAISE: &str = r#"
local current = tonumber(redis.call('GET', KEYS[1]) or '0')
if current < tonumber(ARGV[2]) then return -1 end
if tonumber(ARGV[1]) > current then
  redis.call('SET', KEYS[1], ARGV[1])
  return tonumber(ARGV[1])
end
return current
"#;

/// Applies a replayed dead letter once: the set remembers replayed sequences.
const REPLAY: &str = r#"
if redis.call('SADD', KEYS[1], ARGV[1]) == 0 then
  return 0
end
for _, op in ipairs(cjson.decode(ARGV[2])) do
  redis.call(unpack(op))
end
return 1
"#;

/// Creates the metadata of a projection if it has none. Returns the active
/// generation.
const INIT: &str = r#"
if redis.call('HSETNX', KEYS[1], 'active', ARGV[1]) == 1 then
  redis.call('HSET', KEYS[1], 'partitions', ARGV[2])
end
return redis.call('HGET', KEYS[1], 'active')
"#;

/// Starts a rebuild unless one is running or the projection is unknown.
const START_REBUILD: &str = r#"
if redis.call('EXISTS', KEYS[1]) == 0 then return 'missing' end
if redis.call('HSETNX', KEYS[1], 'building', ARGV[1]) == 0 then
  return 'busy:' .. redis.call('HGET', KEYS[1], 'building')
end
redis.call('HSET', KEYS[1], 'partitions_building', ARGV[2])
return 'ok'
"#;

/// Makes a caught-up rebuild the active generation, atomically.
const SWITCH: &str = r#"
if redis.call('HGET', KEYS[1], 'building') ~= ARGV[1] then return 0 end
local partitions = redis.call('HGET', KEYS[1], 'partitions_building')
redis.call('HSET', KEYS[1], 'active', ARGV[1], 'partitions', partitions)
redis.call('HDEL', KEYS[1], 'building', 'partitions_building')
return 1
"#;

/// One partition's share of a batch: its checkpoint key, the precondition
/// on it, and its events, in stream order, each with the writes it
/// projects to.
#[derive(Debug, Clone)]
pub struct PartitionBatch {
    pub checkpoint: String,
    /// The sequence of this partition's last event in the batches written
    /// before this one (0 if there was none): the apply script refuses the
    /// partition while its checkpoint is below it (see [`APPLY`]).
    pub after: u64,
    pub events: Vec<(u64, Vec<Op>)>,
}

/// A batch encoded by [`RedisStore::prepare`], ready to be written (and
/// written again, unchanged, as often as it takes: every attempt applies
/// only what is not applied yet).
#[derive(Debug)]
pub struct PreparedWrite {
    pipe: redis::Pipeline,
    generation: u64,
    applies: usize,
    /// The unmerged batch, kept when a partition was merged.
    fallback: Option<Fallback>,
}

#[derive(Debug)]
struct Fallback {
    projection: String,
    partitions: Vec<PartitionBatch>,
}

/// What [`RedisStore::write`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Written {
    /// Every event of the batch is applied now: `applied` of them by this
    /// write, the others before (at or below their partition checkpoint).
    Applied { applied: u64 },
    /// At least one partition refused the batch (its precondition did not
    /// hold): an event of an earlier batch in that partition is not applied
    /// yet. Refused partitions wrote nothing; the others may have applied
    /// their part. Write the earlier batch, then this one again.
    Refused,
    /// The generation is retired, or Redis lost the projection's metadata:
    /// its runner stops.
    Retired,
}

/// The replies of one pipeline of [`RedisStore::write`].
struct Replies {
    live: bool,
    applied: u64,
    /// A merged partition met a checkpoint inside its range.
    partial: bool,
    refused: bool,
}

/// A projection's generations, from `jetsource:<projection>:meta`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Meta {
    pub active: u64,
    pub partitions: u32,
    pub building: Option<(u64, u32)>,
}

impl Meta {
    fn from_fields(fields: &std::collections::HashMap<String, u64>) -> Option<Self> {
        let &active = fields.get("active")?;
        let partitions = fields.get("partitions").copied().unwrap_or(1) as u32;
        let building = fields.get("building").map(|&g| {
            (
                g,
                fields
                    .get("partitions_building")
                    .copied()
                    .unwrap_or(u64::from(partitions)) as u32,
            )
        });
        Some(Self {
            active,
            partitions,
            building,
        })
    }

    /// Partition count of `generation`, if it is active or building.
    pub fn partitions_of(&self, generation: u64) -> Option<u32> {
        if generation == self.active {
            return Some(self.partitions);
        }
        match self.building {
            Some((g, p)) if g == generation => Some(p),
            _ => None,
        }
    }
}

#[derive(Clone)]
pub struct RedisStore {
    /// The metadata scripts (they write the metadata): small and quick,
    /// as `redis.url`'s user.
    reads: Connection,
    /// Queries, metadata and watermark reads (read-only commands): as
    /// `redis.query_url`'s user if set, else the same as `reads`.
    queries: Connection,
    /// Batches (apply, replay, deleting a generation).
    writes: Connection,
    apply: Script,
    raise: Script,
    replay: Script,
    init: Script,
    start_rebuild: Script,
    switch: Script,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RedisStore")
    }
}

/// `redis.query_url`, unless unset or empty.
fn query_url(config: &RedisConfig) -> Option<&str> {
    config.query_url.as_deref().filter(|u| !u.trim().is_empty())
}

fn is_noscript(e: &RedisError) -> bool {
    e.code() == Some("NOSCRIPT")
}

impl RedisStore {
    /// Connects to `url` with the default timeouts ([`RedisConfig`]).
    pub async fn connect(url: &str) -> Result<Self, RedisError> {
        Self::connect_with(&RedisConfig {
            url: url.to_owned(),
            ..Default::default()
        })
        .await
    }

    /// Connects as `config` says and checks that Redis answers, so a wrong
    /// URL fails at start. Later outages are survived: every call is
    /// bounded and fails with a transient error while Redis is away, and
    /// the connections come back by themselves.
    pub async fn connect_with(config: &RedisConfig) -> Result<Self, RedisError> {
        let store = Self::lazy(config)?;
        let mut con = store.reads.clone();
        let _: String = redis::cmd("PING").query_async(&mut con).await?;
        if query_url(config).is_some() {
            let mut con = store.queries.clone();
            let _: String = redis::cmd("PING").query_async(&mut con).await?;
        }
        Ok(store)
    }

    /// Like [`RedisStore::connect_with`], without waiting for Redis: the
    /// connections open on first use.
    pub fn lazy(config: &RedisConfig) -> Result<Self, RedisError> {
        let client = client(&config.url, config)?;
        let reads = Connection::new(client.clone(), "reads", config.timeout());
        let queries = match query_url(config) {
            Some(url) => Connection::new(self::client(url, config)?, "queries", config.timeout()),
            None => reads.clone(),
        };
        Ok(Self {
            reads,
            queries,
            writes: Connection::new(client, "writes", config.write_timeout()),
            apply: Script::new(APPLY),
            raise: Script::new(RAISE),
            replay: Script::new(REPLAY),
            init: Script::new(INIT),
            start_rebuild: Script::new(START_REBUILD),
            switch: Script::new(SWITCH),
        })
    }

    /// The connection for reads (queries, metadata), as `redis.query_url`'s
    /// user when that is set: every call on it ends within
    /// [`RedisConfig::timeout_ms`].
    pub fn connection(&self) -> Connection {
        self.queries.clone()
    }

    /// Longest a read takes before it fails.
    pub fn read_timeout(&self) -> Duration {
        self.reads.timeout()
    }

    async fn load_scripts(&self) -> Result<(), RedisError> {
        let mut con = self.writes.clone();
        for script in [&self.apply, &self.replay] {
            script.prepare_invoke().load_async(&mut con).await?;
        }
        Ok(())
    }

    /// Encodes a batch for [`RedisStore::write`]: the projection's metadata
    /// (to learn whether the generation is still live) and one APPLY per
    /// partition (merged where [`merge`] can), as one pipeline. The
    /// watermark is not part of it: it is raised
    /// ([`RedisStore::raise_watermark`]) once this batch and every one
    /// before it are known to be applied.
    pub fn prepare(
        &self,
        projection: &str,
        generation: u64,
        partitions: Vec<PartitionBatch>,
    ) -> PreparedWrite {
        let (pipe, merged) = self.encode(projection, &partitions, true);
        PreparedWrite {
            pipe,
            generation,
            applies: partitions.len(),
            fallback: merged.then(|| Fallback {
                projection: projection.to_owned(),
                partitions,
            }),
        }
    }

    /// The pipeline of a batch, and whether a partition was merged.
    fn encode(
        &self,
        projection: &str,
        partitions: &[PartitionBatch],
        merging: bool,
    ) -> (redis::Pipeline, bool) {
        let mut pipe = redis::pipe();
        let mut merged_any = false;
        pipe.cmd("HGETALL").arg(meta_key(projection));
        for PartitionBatch {
            checkpoint,
            after,
            events,
        } in partitions
        {
            let cmd = pipe
                .cmd("EVALSHA")
                .arg(self.apply.get_hash())
                .arg(1)
                .arg(checkpoint);
            let merged = if merging { merge(events) } else { None };
            match (merged, events.first(), events.last()) {
                (Some(writes), Some((first, _)), Some((last, _))) => {
                    merged_any = true;
                    cmd.arg("m")
                        .arg(after)
                        .arg(first)
                        .arg(last)
                        .arg(events.len())
                        .arg(writes.len());
                    for w in &writes {
                        let args = &events[w.event].1[w.op].0;
                        cmd.arg(args.len());
                        match w.amount {
                            None => {
                                cmd.arg(args);
                            }
                            Some(amount) => {
                                let at = amount_index(&args[0]);
                                cmd.arg(&args[..at]).arg(amount).arg(&args[at + 1..]);
                            }
                        }
                    }
                }
                _ => {
                    cmd.arg("e").arg(after);
                    for (sequence, ops) in events {
                        cmd.arg(sequence).arg(ops.len());
                        for op in ops {
                            cmd.arg(op.0.len()).arg(&op.0);
                        }
                    }
                }
            }
        }
        (pipe, merged_any)
    }

    /// Runs a prepared batch in one round trip. The metadata is read before
    /// the writes in the same pipeline. Safe to call again with the same
    /// batch, and safe to call while the write of another batch is in
    /// flight: see [`Written`].
    pub async fn write(&self, prepared: &PreparedWrite) -> Result<Written, RedisError> {
        let first = self
            .run(&prepared.pipe, prepared.generation, prepared.applies)
            .await?;
        let replies = match &prepared.fallback {
            // A merged partition met a checkpoint inside its range (a batch
            // partly applied before a failover): send every partition event
            // by event; those already applied are skipped.
            Some(fallback) if first.live && first.partial && !first.refused => {
                let (pipe, _) = self.encode(&fallback.projection, &fallback.partitions, false);
                let again = self
                    .run(&pipe, prepared.generation, prepared.applies)
                    .await?;
                Replies {
                    applied: first.applied + again.applied,
                    ..again
                }
            }
            _ => first,
        };
        Ok(if !replies.live {
            Written::Retired
        } else if replies.refused || replies.partial {
            Written::Refused
        } else {
            Written::Applied {
                applied: replies.applied,
            }
        })
    }

    async fn run(
        &self,
        pipe: &redis::Pipeline,
        generation: u64,
        applies: usize,
    ) -> Result<Replies, RedisError> {
        let mut con = self.writes.clone();
        let replies: Vec<redis::Value> = match pipe.query_async(&mut con).await {
            Err(e) if is_noscript(&e) => {
                self.load_scripts().await?;
                pipe.query_async(&mut con).await?
            }
            other => other?,
        };
        let parse = |e: redis::ParsingError| RedisError::from(e);
        let mut replies = replies.into_iter();
        let meta: std::collections::HashMap<String, u64> =
            redis::from_redis_value(replies.next().unwrap_or(redis::Value::Nil)).map_err(parse)?;
        let mut out = Replies {
            live: Meta::from_fields(&meta)
                .and_then(|m| m.partitions_of(generation))
                .is_some(),
            applied: 0,
            partial: false,
            refused: false,
        };
        for _ in 0..applies {
            let n: i64 = redis::from_redis_value(replies.next().unwrap_or(redis::Value::Nil))
                .map_err(parse)?;
            match u64::try_from(n) {
                Ok(n) => out.applied += n,
                Err(_) if n == -1 => out.partial = true,
                // -2: the precondition did not hold.
                Err(_) => out.refused = true,
            }
        }
        Ok(out)
    }

    /// Raises the generation's watermark from `from` to `to` (never
    /// lowers it) and returns it; `None`, writing nothing, when the
    /// watermark is below `from`: Redis lost writes (restarted from an
    /// older snapshot). The watermark promises that every event up to it
    /// is reflected: call this only once the batches up to `to` are all
    /// applied ([`Written::Applied`]), never from inside their pipelines,
    /// whose writes may still fail; `from` is the watermark those batches
    /// were written on.
    pub async fn raise_watermark(
        &self,
        projection: &str,
        generation: u64,
        from: u64,
        to: u64,
    ) -> Result<Option<u64>, RedisError> {
        let mut con = self.reads.clone();
        let raised: i64 = self
            .raise
            .key(watermark_key(projection, generation))
            .arg(to)
            .arg(from)
            .invoke_async(&mut con)
            .await?;
        Ok(u64::try_from(raised).ok())
    }

    pub async fn watermark(&self, projection: &str, generation: u64) -> Result<u64, RedisError> {
        let mut con = self.queries.clone();
        let value: Option<u64> = redis::cmd("GET")
            .arg(watermark_key(projection, generation))
            .query_async(&mut con)
            .await?;
        Ok(value.unwrap_or(0))
    }

    /// Applies a replayed dead letter's writes unless it was replayed before.
    pub async fn replay(
        &self,
        replayed_key: &str,
        sequence: u64,
        ops: &[Op],
    ) -> Result<bool, RedisError> {
        let mut con = self.writes.clone();
        let json = serde_json::to_string(&ops.iter().map(|o| &o.0).collect::<Vec<_>>())
            .unwrap_or_default();
        let applied: u64 = self
            .replay
            .key(replayed_key)
            .arg(sequence)
            .arg(json)
            .invoke_async(&mut con)
            .await?;
        Ok(applied == 1)
    }

    /// The projection's metadata, `None` when Redis has none (never started,
    /// or Redis lost its data).
    pub async fn meta(&self, projection: &str) -> Result<Option<Meta>, RedisError> {
        let mut con = self.queries.clone();
        let fields: std::collections::HashMap<String, u64> = redis::cmd("HGETALL")
            .arg(meta_key(projection))
            .query_async(&mut con)
            .await?;
        Ok(Meta::from_fields(&fields))
    }

    /// Creates the metadata if missing; returns the active generation.
    pub async fn init_meta(
        &self,
        projection: &str,
        generation: u64,
        partitions: u32,
    ) -> Result<u64, RedisError> {
        let mut con = self.reads.clone();
        self.init
            .key(meta_key(projection))
            .arg(generation)
            .arg(partitions)
            .invoke_async(&mut con)
            .await
    }

    /// "ok", "missing" or "busy:<generation>".
    pub async fn start_rebuild(
        &self,
        projection: &str,
        generation: u64,
        partitions: u32,
    ) -> Result<String, RedisError> {
        let mut con = self.reads.clone();
        self.start_rebuild
            .key(meta_key(projection))
            .arg(generation)
            .arg(partitions)
            .invoke_async(&mut con)
            .await
    }

    /// Makes `generation` active if it is the one being built.
    pub async fn switch(&self, projection: &str, generation: u64) -> Result<bool, RedisError> {
        let mut con = self.reads.clone();
        let switched: u64 = self
            .switch
            .key(meta_key(projection))
            .arg(generation)
            .invoke_async(&mut con)
            .await?;
        Ok(switched == 1)
    }

    /// Deletes every key of a retired generation, a SCAN page at a time.
    pub async fn delete_generation(
        &self,
        projection: &str,
        generation: u64,
    ) -> Result<u64, RedisError> {
        let mut con = self.writes.clone();
        let pattern = crate::keys::generation_pattern(projection, generation);
        let mut cursor: u64 = 0;
        let mut deleted = 0;
        loop {
            let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(&pattern)
                .arg("COUNT")
                .arg(1000)
                .query_async(&mut con)
                .await?;
            if !keys.is_empty() {
                let n: u64 = redis::cmd("UNLINK")
                    .arg(&keys)
                    .query_async(&mut con)
                    .await?;
                deleted += n;
            }
            if next == 0 {
                break;
            }
            cursor = next;
        }
        let _: u64 = redis::cmd("UNLINK")
            .arg(watermark_key(projection, generation))
            .query_async(&mut con)
            .await?;
        Ok(deleted)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn op(args: &[&str]) -> Op {
        Op(args.iter().map(|a| (*a).to_owned()).collect())
    }

    /// The merged writes as the ops the script runs.
    fn merged(events: &[(u64, Vec<Op>)]) -> Option<Vec<Op>> {
        Some(
            merge(events)?
                .iter()
                .map(|m| {
                    let mut op = events[m.event].1[m.op].clone();
                    if let Some(amount) = m.amount {
                        let at = amount_index(&op.0[0]);
                        op.0[at] = amount.to_string();
                    }
                    op
                })
                .collect(),
        )
    }

    #[test]
    fn increments_of_one_counter_add_up_across_events() {
        let events = vec![
            (
                1,
                vec![
                    op(&["HINCRBY", "t", "sum", "5"]),
                    op(&["HSET", "a", "v", "1"]),
                ],
            ),
            (
                2,
                vec![
                    op(&["HINCRBY", "t", "sum", "-2"]),
                    op(&["HSET", "b", "v", "1"]),
                ],
            ),
            (
                3,
                vec![
                    op(&["ZINCRBY", "r", "3", "a"]),
                    op(&["ZINCRBY", "r", "4", "a"]),
                ],
            ),
        ];
        assert_eq!(
            merged(&events).unwrap(),
            vec![
                op(&["HINCRBY", "t", "sum", "3"]),
                op(&["HSET", "a", "v", "1"]),
                op(&["HSET", "b", "v", "1"]),
                op(&["ZINCRBY", "r", "7", "a"]),
            ]
        );
    }

    #[test]
    fn merging_never_moves_a_write_past_another_of_the_same_key() {
        let events = vec![
            (1, vec![op(&["HINCRBY", "a", "balance", "5"])]),
            (2, vec![op(&["HSET", "a", "balance", "0"])]),
            (3, vec![op(&["HINCRBY", "a", "balance", "1"])]),
            (4, vec![op(&["HINCRBY", "a", "other", "1"])]),
            (5, vec![op(&["HINCRBY", "a", "balance", "1"])]),
            (
                6,
                vec![
                    op(&["ZINCRBY", "r", "1", "x"]),
                    op(&["ZINCRBY", "r", "1", "y"]),
                ],
            ),
        ];
        assert_eq!(merged(&events), None, "nothing may be merged here");
    }

    #[test]
    fn unknown_commands_and_overflows_are_not_merged() {
        let unknown = vec![
            (1, vec![op(&["HINCRBY", "t", "n", "1"])]),
            (2, vec![op(&["SUNIONSTORE", "d", "t", "u"])]),
            (3, vec![op(&["HINCRBY", "t", "n", "1"])]),
        ];
        assert_eq!(merged(&unknown), None);
        let big = i64::MAX.to_string();
        let overflow = vec![
            (1, vec![op(&["INCRBY", "n", &big])]),
            (2, vec![op(&["INCRBY", "n", "1"])]),
        ];
        assert_eq!(merged(&overflow), None);
        assert_eq!(merged(&overflow[..1]), None, "one event: nothing to merge");
    }
}
