//! Bounded retries with exponential backoff for transient remote failures.

use std::future::Future;
use std::time::Duration;

use super::error::RemoteError;

/// The longest wait between two tries.
const MAX_DELAY: Duration = Duration::from_secs(2);

/// How often and how patiently to retry.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Retry {
    /// Retries after the first try.
    pub retries: u32,
    /// The first delay; each next one doubles, up to [`MAX_DELAY`].
    pub delay: Duration,
}

impl Retry {
    /// The delay before retry number `attempt` (0-based), with up to 25% jitter so that many
    /// readers do not come back at once.
    pub fn delay(&self, attempt: u32) -> Duration {
        let base = self
            .delay
            .saturating_mul(1u32 << attempt.min(16))
            .min(MAX_DELAY);
        // std's RandomState draws fresh keys per process and thread: random enough for jitter.
        let jitter = (std::hash::BuildHasher::hash_one(
            &std::collections::hash_map::RandomState::new(),
            attempt,
        ) % 256) as u32;
        base + base * jitter / 1024
    }

    /// Runs `op` until it succeeds, fails for good, or the retries are spent.
    pub async fn run<T, F, Fut>(&self, mut op: F) -> Result<T, RemoteError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, RemoteError>>,
    {
        let mut attempt = 0;
        loop {
            match op().await {
                Err(e) if e.is_transient() && attempt < self.retries => {
                    tokio::time::sleep(self.delay(attempt)).await;
                    attempt += 1;
                }
                r => return r,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    #[test]
    fn retries_transient_failures_a_bounded_number_of_times() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        let policy = Retry {
            retries: 3,
            delay: Duration::from_millis(1),
        };
        let tries = AtomicU32::new(0);
        let r: Result<(), _> = rt.block_on(policy.run(|| async {
            tries.fetch_add(1, Ordering::Relaxed);
            Err(RemoteError::Status {
                url: "u".into(),
                status: 503,
            })
        }));
        assert!(r.is_err());
        assert_eq!(tries.load(Ordering::Relaxed), 4);

        tries.store(0, Ordering::Relaxed);
        let r = rt.block_on(policy.run(|| async {
            if tries.fetch_add(1, Ordering::Relaxed) < 2 {
                Err(RemoteError::Transport {
                    url: "u".into(),
                    detail: "connection reset".into(),
                })
            } else {
                Ok(7)
            }
        }));
        assert_eq!(r, Ok(7));

        tries.store(0, Ordering::Relaxed);
        let r: Result<(), _> = rt.block_on(policy.run(|| async {
            tries.fetch_add(1, Ordering::Relaxed);
            Err(RemoteError::Status {
                url: "u".into(),
                status: 404,
            })
        }));
        assert!(r.is_err());
        assert_eq!(tries.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn delays_grow_and_are_capped() {
        let p = Retry {
            retries: 10,
            delay: Duration::from_millis(100),
        };
        assert!(p.delay(0) >= Duration::from_millis(100));
        assert!(p.delay(0) < Duration::from_millis(130));
        assert!(p.delay(3) >= Duration::from_millis(800));
        assert!(p.delay(30) <= MAX_DELAY + MAX_DELAY / 4);
    }
}
