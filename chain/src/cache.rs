//! A lock-free cache of where 4 KiB groups of a chain's *lower* layers resolve.
//!
//! Everything below the top is opened read-only and never changes while the chain is open,
//! so a resolution found once stays true: no invalidation is ever needed. The table is
//! direct-mapped by the group's low bits (a colliding group just evicts the other; neighbouring
//! groups share cache lines), fixed in size, and each slot is one `AtomicU32` holding
//! `(tag + 1) << 8 | source`, where `tag` is the group's remaining high bits and `source` is
//! the depth of the layer holding the whole group as data, or [`ZEROS`] when it reads as
//! zeros. Slot 0 means empty. Four bytes a slot keep the table small enough to stay in cache
//! while data streams past it on every read.

use std::sync::atomic::{AtomicU32, Ordering};

/// The group reads as zeros (no layer has it, or a layer says Zero).
pub const ZEROS: u8 = 0xFF;

/// Cache granularity in bytes.
pub const GROUP: u64 = 4096;

/// The cache.
pub struct ResolutionCache {
    slots: Box<[AtomicU32]>,
    bits: u32,
}

impl std::fmt::Debug for ResolutionCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ResolutionCache({} slots)", self.slots.len())
    }
}

impl ResolutionCache {
    /// A cache of `2^bits` slots (4 bytes each).
    pub fn new(bits: u32) -> Self {
        let bits = bits.min(30);
        ResolutionCache {
            slots: (0..1usize << bits).map(|_| AtomicU32::new(0)).collect(),
            bits,
        }
    }

    /// The slot of `group` and the tag it stores there (`None`: too large to cache).
    fn slot(&self, group: u64) -> Option<(&AtomicU32, u32)> {
        let tag = u32::try_from((group >> self.bits) + 1)
            .ok()
            .filter(|&t| t < 1 << 24)?;
        let index = (group & ((1 << self.bits) - 1)) as usize;
        Some((self.slots.get(index)?, tag))
    }

    /// The cached source of `group`, if any.
    pub fn get(&self, group: u64) -> Option<u8> {
        let (slot, tag) = self.slot(group)?;
        let v = slot.load(Ordering::Relaxed);
        (v >> 8 == tag).then_some(v as u8)
    }

    /// Records that `group` resolves to `source`. Groups whose tag does not fit 24 bits are
    /// not cached.
    pub fn put(&self, group: u64, source: u8) {
        if let Some((slot, tag)) = self.slot(group) {
            slot.store((tag << 8) | u32::from(source), Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hits_misses_and_evictions() {
        let c = ResolutionCache::new(4);
        assert_eq!(c.get(5), None);
        c.put(5, 3);
        assert_eq!(c.get(5), Some(3));
        c.put(0, ZEROS);
        assert_eq!(c.get(0), Some(ZEROS));
        // Fill far more groups than slots: every answer is either right or a miss.
        for g in 0..1000 {
            c.put(g, (g % 7) as u8);
        }
        for g in 0..1000 {
            if let Some(s) = c.get(g) {
                assert_eq!(s, (g % 7) as u8);
            }
        }
        // The last 16 groups written own their slots.
        assert_eq!(c.get(999), Some((999 % 7) as u8));
        // Groups too large to tag are never cached (and never alias small ones).
        let huge = 1u64 << 40;
        c.put(huge, 3);
        assert_eq!(c.get(huge), None);
        c.put(0, 1);
        c.put(1 << 4, 2);
        assert_eq!(c.get(0), None, "same slot, other tag");
        assert_eq!(c.get(1 << 4), Some(2));
    }
}
