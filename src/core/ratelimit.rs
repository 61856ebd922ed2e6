//! A token-bucket rate limiter for log lines that clients or disks can trigger.
//!
//! Sans-io: the caller passes `now` (time since any fixed origin) on every call, so the limiter
//! is deterministic under test.

use std::time::Duration;

/// Token bucket: up to `burst` events at once, refilled at `per_second` events per second.
/// Denied events are counted so the next allowed log line can say how many were suppressed.
#[derive(Debug, Clone)]
pub struct RateLimiter {
    burst: u32,
    per_second: u32,
    /// Tokens scaled by 1e9 (nanotokens), so refills need no floating point.
    nanotokens: u128,
    last: Duration,
    suppressed: u64,
}

const NANO: u128 = 1_000_000_000;

impl RateLimiter {
    /// A full bucket of `burst` tokens refilled at `per_second` (both at least 1).
    pub fn new(burst: u32, per_second: u32) -> RateLimiter {
        let burst = burst.max(1);
        RateLimiter {
            burst,
            per_second: per_second.max(1),
            nanotokens: burst as u128 * NANO,
            last: Duration::ZERO,
            suppressed: 0,
        }
    }

    /// Take one token at time `now`. `Some(n)` allows the event and says that `n` events were
    /// suppressed since the last allowed one; `None` suppresses it. A `now` earlier than a
    /// previous one is treated as no time passing.
    pub fn allow(&mut self, now: Duration) -> Option<u64> {
        if now > self.last {
            let elapsed_ns = (now - self.last).as_nanos();
            let add = elapsed_ns.saturating_mul(self.per_second as u128);
            self.nanotokens = (self.nanotokens + add).min(self.burst as u128 * NANO);
            self.last = now;
        }
        if self.nanotokens >= NANO {
            self.nanotokens -= NANO;
            Some(std::mem::take(&mut self.suppressed))
        } else {
            self.suppressed += 1;
            None
        }
    }

    /// Events suppressed since the last allowed one.
    pub fn suppressed(&self) -> u64 {
        self.suppressed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(v: u64) -> Duration {
        Duration::from_millis(v)
    }

    #[test]
    fn burst_then_suppress() {
        let mut r = RateLimiter::new(3, 1);
        assert_eq!(r.allow(ms(0)), Some(0));
        assert_eq!(r.allow(ms(0)), Some(0));
        assert_eq!(r.allow(ms(0)), Some(0));
        assert_eq!(r.allow(ms(0)), None);
        assert_eq!(r.allow(ms(500)), None);
        assert_eq!(r.suppressed(), 2);
        // One token after one second; it reports the two suppressed events.
        assert_eq!(r.allow(ms(1000)), Some(2));
        assert_eq!(r.allow(ms(1000)), None);
    }

    #[test]
    fn refill_rate_and_cap() {
        let mut r = RateLimiter::new(2, 10);
        assert!(r.allow(ms(0)).is_some());
        assert!(r.allow(ms(0)).is_some());
        assert!(r.allow(ms(0)).is_none());
        // 10 per second: one token per 100 ms.
        assert!(r.allow(ms(99)).is_none());
        assert_eq!(r.allow(ms(100)), Some(2));
        // A long idle period refills only up to the burst.
        let mut allowed = 0;
        for _ in 0..10 {
            if r.allow(ms(60_000)).is_some() {
                allowed += 1;
            }
        }
        assert_eq!(allowed, 2);
    }

    #[test]
    fn steady_rate_over_time() {
        let mut r = RateLimiter::new(1, 5);
        let mut allowed = 0;
        // 10 seconds of an event every millisecond: about 5 per second get through.
        for t in 0..10_000 {
            if r.allow(ms(t)).is_some() {
                allowed += 1;
            }
        }
        assert!((50..=51).contains(&allowed), "allowed {allowed}");
    }

    #[test]
    fn time_going_backwards_is_harmless() {
        let mut r = RateLimiter::new(1, 1);
        assert!(r.allow(ms(5000)).is_some());
        assert!(r.allow(ms(1000)).is_none());
        assert!(r.allow(ms(5999)).is_none());
        assert!(r.allow(ms(6000)).is_some());
    }
}
