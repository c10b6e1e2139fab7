//! Recently used aggregates, kept in memory so a command usually costs one
//! append and no read.
//!
//! A cached aggregate may be behind the store when another worker wrote it.
//! That is safe: every append carries the cached last sequence as
//! `Nats-Expected-Last-Subject-Sequence`, so a decision taken on a stale
//! state is refused by the server and decided again after a catch-up.

use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex};

use jetsource_core::loader::Loaded;
use lru::LruCache;

/// One aggregate's cached state. The async mutex serializes the commands of
/// one aggregate inside one worker, so they do not conflict with each other.
#[derive(Debug, Default)]
pub struct Slot {
    /// `None` until first loaded.
    pub loaded: Option<Loaded>,
    /// The store may hold events this copy has not seen (after a conflict,
    /// a timeout or a duplicate).
    pub stale: bool,
}

pub type SharedSlot = Arc<tokio::sync::Mutex<Slot>>;

#[derive(Debug)]
pub struct Cache {
    slots: Mutex<LruCache<String, SharedSlot>>,
    /// The privacy epoch the slots were loaded under (see
    /// [`Cache::drop_all_before`]).
    epoch: std::sync::atomic::AtomicU64,
}

impl Cache {
    pub fn new(capacity: usize) -> Self {
        let capacity = NonZeroUsize::new(capacity).unwrap_or(NonZeroUsize::MIN);
        Self {
            slots: Mutex::new(LruCache::new(capacity)),
            epoch: Default::default(),
        }
    }

    /// Drops every slot when `epoch` moved on: a data subject was
    /// forgotten, and cached states may hold its personal data in the
    /// clear. Rare, so all go rather than tracking whose is where.
    pub fn drop_all_before(&self, epoch: u64) {
        use std::sync::atomic::Ordering;
        if self.epoch.swap(epoch, Ordering::Relaxed) != epoch {
            self.slots.lock().unwrap_or_else(|p| p.into_inner()).clear();
        }
    }

    /// The slot of `key`, created empty when missing. Evicting a slot that a
    /// request still holds is harmless: the request keeps its `Arc`, and a
    /// new slot simply loads again.
    pub fn slot(&self, key: &str) -> SharedSlot {
        let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(slot) = slots.get(key) {
            return slot.clone();
        }
        let slot = SharedSlot::default();
        slots.put(key.to_owned(), slot.clone());
        slot
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.slots.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounded_and_shared() {
        let cache = Cache::new(2);
        let a = cache.slot("a");
        assert!(Arc::ptr_eq(&a, &cache.slot("a")));
        cache.slot("b");
        cache.slot("c");
        assert_eq!(cache.len(), 2);
        assert!(!Arc::ptr_eq(&a, &cache.slot("a")), "a was evicted");
    }
}
