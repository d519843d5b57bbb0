//! A lock-free cache of where 4 KiB groups of a chain's *lower* layers resolve.
//!
//! Everything below the top is opened read-only and never changes while the chain is open,
//! so a resolution found once stays true: no invalidation is ever needed. The table is
//! direct-mapped (a colliding group just evicts the other), fixed in size, and each slot is one
//! `AtomicU64` holding `(group + 1) << 8 | source`, where `source` is the depth of the layer
//! holding the whole group as data, or [`ZEROS`] when it reads as zeros. Slot 0 means empty.

use std::sync::atomic::{AtomicU64, Ordering};

/// The group reads as zeros (no layer has it, or a layer says Zero).
pub const ZEROS: u8 = 0xFF;

/// Cache granularity in bytes.
pub const GROUP: u64 = 4096;

/// The cache.
pub struct ResolutionCache {
    slots: Box<[AtomicU64]>,
    mask: u64,
}

impl std::fmt::Debug for ResolutionCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ResolutionCache({} slots)", self.slots.len())
    }
}

impl ResolutionCache {
    /// A cache of `2^bits` slots (8 bytes each).
    pub fn new(bits: u32) -> Self {
        let n = 1usize << bits.min(30);
        ResolutionCache {
            slots: (0..n).map(|_| AtomicU64::new(0)).collect(),
            mask: n as u64 - 1,
        }
    }

    fn slot(&self, group: u64) -> &AtomicU64 {
        // Fibonacci hashing spreads neighbouring groups over the table.
        let h = group.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 20;
        &self.slots[(h & self.mask) as usize]
    }

    /// The cached source of `group`, if any.
    pub fn get(&self, group: u64) -> Option<u8> {
        let v = self.slot(group).load(Ordering::Relaxed);
        (v != 0 && v >> 8 == group.wrapping_add(1)).then_some(v as u8)
    }

    /// Records that `group` resolves to `source`. Groups past 2^56 are not cached.
    pub fn put(&self, group: u64, source: u8) {
        if group < (1 << 56) - 1 {
            self.slot(group)
                .store(((group + 1) << 8) | u64::from(source), Ordering::Relaxed);
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
    }
}
