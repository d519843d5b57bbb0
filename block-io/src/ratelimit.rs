//! [`RateLimiter`]: a token bucket in bytes per second, shared by many threads.
//!
//! Online jobs take tokens for every chunk they copy so that guest I/O keeps the bandwidth.
//! Tokens refill continuously at `rate` per second up to `burst`. A request larger than the
//! burst is admitted once the bucket is full and drives it negative (debt), so huge requests
//! still pass but pay for themselves. [`RateLimiter::try_acquire`] never blocks and says how
//! long to wait, which suits async callers; [`RateLimiter::acquire`] sleeps.

use std::time::{Duration, Instant};

use parking_lot::Mutex;

#[derive(Debug)]
struct Bucket {
    rate: u64,
    burst: u64,
    tokens: f64,
    last: Instant,
}

/// A thread-safe token bucket.
#[derive(Debug)]
pub struct RateLimiter {
    bucket: Mutex<Bucket>,
}

impl Bucket {
    fn refill(&mut self, now: Instant) {
        let dt = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + dt * self.rate as f64).min(self.burst as f64);
    }
}

impl RateLimiter {
    /// A limiter allowing `rate` units per second with bursts of up to `burst` units; it starts
    /// full. A `rate` of 0 means unlimited.
    pub fn new(rate: u64, burst: u64) -> Self {
        let burst = burst.max(1);
        RateLimiter {
            bucket: Mutex::new(Bucket {
                rate,
                burst,
                tokens: burst as f64,
                last: Instant::now(),
            }),
        }
    }

    /// Changes the rate (0 = unlimited) and burst; tokens already held are kept up to the new
    /// burst.
    pub fn set_rate(&self, rate: u64, burst: u64) {
        let mut b = self.bucket.lock();
        b.refill(Instant::now());
        b.rate = rate;
        b.burst = burst.max(1);
        b.tokens = b.tokens.min(b.burst as f64);
    }

    /// The current rate (0 = unlimited).
    pub fn rate(&self) -> u64 {
        self.bucket.lock().rate
    }

    /// Takes `n` tokens if it can now; otherwise returns how long to wait before trying again.
    pub fn try_acquire(&self, n: u64) -> Result<(), Duration> {
        self.try_acquire_at(n, Instant::now())
    }

    fn try_acquire_at(&self, n: u64, now: Instant) -> Result<(), Duration> {
        let mut b = self.bucket.lock();
        if b.rate == 0 {
            return Ok(());
        }
        b.refill(now);
        // Requests above the burst need a full bucket, then go into debt.
        let need = (n as f64).min(b.burst as f64);
        if b.tokens >= need {
            b.tokens -= n as f64;
            return Ok(());
        }
        let wait = (need - b.tokens) / b.rate as f64;
        Err(Duration::from_secs_f64(wait.max(1e-6)))
    }

    /// Takes `n` tokens, sleeping until they are there.
    pub fn acquire(&self, n: u64) {
        while let Err(wait) = self.try_acquire(n) {
            std::thread::sleep(wait);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_refills_at_rate() {
        let l = RateLimiter::new(1000, 1000);
        let t0 = Instant::now();
        assert!(l.try_acquire_at(1000, t0).is_ok());
        let wait = l.try_acquire_at(500, t0).unwrap_err();
        assert!((wait.as_secs_f64() - 0.5).abs() < 0.01, "{wait:?}");
        assert!(l
            .try_acquire_at(500, t0 + Duration::from_millis(600))
            .is_ok());
    }

    #[test]
    fn oversized_request_goes_into_debt() {
        let l = RateLimiter::new(100, 100);
        let t0 = Instant::now();
        assert!(l.try_acquire_at(1000, t0).is_ok());
        // 900 units of debt plus 100 needed = 10 s at 100/s.
        let wait = l.try_acquire_at(100, t0).unwrap_err();
        assert!((wait.as_secs_f64() - 10.0).abs() < 0.05, "{wait:?}");
    }

    #[test]
    fn zero_rate_is_unlimited_and_threads_share() {
        let l = std::sync::Arc::new(RateLimiter::new(0, 1));
        assert!(l.try_acquire(u64::MAX).is_ok());
        l.set_rate(1_000_000, 10_000);
        let hs: Vec<_> = (0..4)
            .map(|_| {
                let l = l.clone();
                std::thread::spawn(move || {
                    for _ in 0..10 {
                        l.acquire(1000);
                    }
                })
            })
            .collect();
        for h in hs {
            h.join().unwrap();
        }
        assert_eq!(l.rate(), 1_000_000);
    }
}
