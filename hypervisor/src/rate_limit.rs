//! A token bucket for what the guest can make the host do at will (log
//! lines): `rate` tokens a second, at most `burst` saved, drops counted.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Instant;

/// A token bucket: `rate` tokens a second, at most `burst` saved.
pub struct TokenBucket {
    rate: f64,
    burst: f64,
    state: Mutex<(f64, Instant)>,
    dropped: AtomicU64,
}

impl TokenBucket {
    pub fn new(rate: f64, burst: f64) -> Self {
        Self {
            rate,
            burst,
            state: Mutex::new((burst, Instant::now())),
            dropped: AtomicU64::new(0),
        }
    }

    /// Takes a token at `now`; counts a drop when there is none.
    pub fn take_at(&self, now: Instant) -> bool {
        let mut state = crate::bus::lock(&self.state);
        let (tokens, last) = *state;
        let refilled = (tokens + now.saturating_duration_since(last).as_secs_f64() * self.rate)
            .min(self.burst);
        if refilled >= 1.0 {
            *state = (refilled - 1.0, now);
            true
        } else {
            *state = (refilled, now);
            self.dropped.fetch_add(1, Ordering::Relaxed);
            false
        }
    }

    /// Drops counted since the last call.
    pub fn take_dropped(&self) -> u64 {
        self.dropped.swap(0, Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn the_bucket_passes_bursts_then_the_rate_and_counts_drops() {
        let bucket = TokenBucket::new(10.0, 5.0);
        let t0 = Instant::now();
        let passed = (0..100).filter(|_| bucket.take_at(t0)).count();
        assert_eq!(passed, 5, "a burst");
        assert_eq!(bucket.take_dropped(), 95);
        // One second later: ten more, not a hundred.
        let t1 = t0 + Duration::from_secs(1);
        let passed = (0..100).filter(|_| bucket.take_at(t1)).count();
        assert_eq!(passed, 5, "refill is capped at the burst");
        let t2 = t1 + Duration::from_millis(300);
        assert_eq!((0..100).filter(|_| bucket.take_at(t2)).count(), 3);
        assert_eq!(bucket.take_dropped(), 95 + 97);
    }
}
