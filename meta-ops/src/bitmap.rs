//! [`Bitmap`]: a fixed-size bitmap of atomic words, one bit per block of a job's range.
//!
//! Guest writes set bits from many threads at once (`fetch_or`), the job claims them
//! (`fetch_and`), and a counter of set bits is kept exact by counting only the bits each
//! operation actually flipped, so progress and the pivot test never scan the whole map.

use std::sync::atomic::{AtomicU64, Ordering};

/// A bitmap of `len` bits with an exact count of the bits set.
#[derive(Debug)]
pub(crate) struct Bitmap {
    words: Vec<AtomicU64>,
    len: u64,
    ones: AtomicU64,
}

/// The mask of bits `[lo, hi)` of one word (`lo < hi <= 64`).
fn mask(lo: u64, hi: u64) -> u64 {
    let upper = if hi >= 64 { u64::MAX } else { (1u64 << hi) - 1 };
    upper & !((1u64 << lo) - 1)
}

impl Bitmap {
    /// A bitmap of `len` clear bits.
    pub(crate) fn new(len: u64) -> Self {
        let n = len.div_ceil(64) as usize;
        Bitmap {
            words: (0..n).map(|_| AtomicU64::new(0)).collect(),
            len,
            ones: AtomicU64::new(0),
        }
    }

    /// Number of bits.
    pub(crate) fn len(&self) -> u64 {
        self.len
    }

    /// Number of bits set now.
    pub(crate) fn count(&self) -> u64 {
        self.ones.load(Ordering::Acquire)
    }

    /// Calls `f(word index, mask)` for the words covering bits `[start, end)` (clipped).
    fn words_of(&self, start: u64, end: u64, mut f: impl FnMut(usize, u64)) {
        let end = end.min(self.len);
        let mut b = start;
        while b < end {
            let w = b / 64;
            let lo = b % 64;
            let hi = (end - w * 64).min(64);
            f(w as usize, mask(lo, hi));
            b = (w + 1) * 64;
        }
    }

    /// Sets bits `[start, end)`; returns how many were clear before.
    pub(crate) fn set(&self, start: u64, end: u64) -> u64 {
        let mut flipped = 0u64;
        self.words_of(start, end, |w, m| {
            if let Some(word) = self.words.get(w) {
                let old = word.fetch_or(m, Ordering::AcqRel);
                flipped += u64::from((m & !old).count_ones());
            }
        });
        self.ones.fetch_add(flipped, Ordering::AcqRel);
        flipped
    }

    /// Whether every bit of `[start, end)` is clear.
    pub(crate) fn all_clear(&self, start: u64, end: u64) -> bool {
        let mut clear = true;
        self.words_of(start, end, |w, m| {
            if let Some(word) = self.words.get(w) {
                clear &= word.load(Ordering::Acquire) & m == 0;
            }
        });
        clear
    }

    /// Clears bits `[start, end)` and returns the ones that were set, as `(first, last + 1)`
    /// runs in order.
    pub(crate) fn take(&self, start: u64, end: u64) -> Vec<(u64, u64)> {
        let mut runs: Vec<(u64, u64)> = Vec::new();
        let mut taken = 0u64;
        self.words_of(start, end, |w, m| {
            let Some(word) = self.words.get(w) else {
                return;
            };
            let mut old = word.fetch_and(!m, Ordering::AcqRel) & m;
            taken += u64::from(old.count_ones());
            while old != 0 {
                let lo = u64::from(old.trailing_zeros());
                let run = u64::from((!(old >> lo)).trailing_zeros());
                let (a, b) = (w as u64 * 64 + lo, w as u64 * 64 + lo + run);
                match runs.last_mut() {
                    Some(last) if last.1 == a => last.1 = b,
                    _ => runs.push((a, b)),
                }
                old = if lo + run >= 64 {
                    0
                } else {
                    old & !mask(lo, lo + run)
                };
            }
        });
        self.ones.fetch_sub(taken, Ordering::AcqRel);
        runs
    }

    /// The first set bit at or after `from`, if any.
    pub(crate) fn next_set(&self, from: u64) -> Option<u64> {
        if from >= self.len {
            return None;
        }
        let mut w = (from / 64) as usize;
        let mut m = mask(from % 64, 64);
        while let Some(word) = self.words.get(w) {
            let v = word.load(Ordering::Acquire) & m;
            if v != 0 {
                let bit = w as u64 * 64 + u64::from(v.trailing_zeros());
                return (bit < self.len).then_some(bit);
            }
            w += 1;
            m = u64::MAX;
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_take_count_and_runs() {
        let b = Bitmap::new(200);
        assert_eq!(b.set(3, 70), 67);
        assert_eq!(b.set(60, 80), 10);
        assert_eq!(b.count(), 77);
        assert_eq!(b.set(150, 200), 50);
        assert_eq!(b.next_set(0), Some(3));
        assert_eq!(b.next_set(80), Some(150));
        assert!(!b.all_clear(0, 4) && b.all_clear(80, 150));
        assert_eq!(b.take(0, 100), vec![(3, 80)]);
        assert_eq!(b.count(), 50);
        assert_eq!(b.take(0, 300), vec![(150, 200)]);
        assert_eq!(b.count(), 0);
        assert_eq!(b.next_set(0), None);
        b.set(63, 65);
        b.set(127, 129);
        assert_eq!(b.take(0, 200), vec![(63, 65), (127, 129)]);
        b.set(0, 200);
        assert_eq!(b.take(0, 200), vec![(0, 200)]);
    }
}
