//! Exponential backoff with jitter, for every retry loop that waits on something outside the
//! process (a server still starting, a broker restarting).

use std::time::Duration;

/// Exponential backoff with jitter: each pause is drawn between half and all of
/// `min * 2^n` (capped at `max`), so many nodes waiting for one server do not retry in step.
#[derive(Debug, Clone)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    failures: u32,
    seed: u64,
}

impl Backoff {
    /// Pauses from `min`, doubling after each failure up to `max`.
    pub fn new(min: Duration, max: Duration) -> Self {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs().wrapping_mul(1_000_000_007) ^ u64::from(d.subsec_nanos()))
            .unwrap_or(0);
        Backoff {
            min,
            max,
            failures: 0,
            seed: now ^ (u64::from(std::process::id()) << 32) | 1,
        }
    }

    /// The pause before the next try.
    pub fn next_pause(&mut self) -> Duration {
        let ceiling = self
            .min
            .saturating_mul(1u32 << self.failures.min(16))
            .min(self.max);
        self.failures = self.failures.saturating_add(1);
        // xorshift64: jitter needs spread, not cryptographic randomness.
        self.seed ^= self.seed << 13;
        self.seed ^= self.seed >> 7;
        self.seed ^= self.seed << 17;
        let fraction = 0.5 + (self.seed >> 11) as f64 / (1u64 << 53) as f64 / 2.0;
        ceiling.mul_f64(fraction)
    }
}

#[cfg(test)]
mod tests {
    use super::Backoff;
    use std::time::Duration;

    #[test]
    fn backoff_grows_to_its_cap_with_jitter() {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(3));
        let pauses: Vec<Duration> = (0..40).map(|_| backoff.next_pause()).collect();
        assert!(pauses[0] >= Duration::from_millis(50) && pauses[0] <= Duration::from_millis(100));
        assert!(
            pauses.iter().all(|p| *p <= Duration::from_secs(3)),
            "{pauses:?}"
        );
        let late = &pauses[10..];
        assert!(
            late.iter().all(|p| *p >= Duration::from_millis(1500)),
            "{late:?}"
        );
        let distinct: std::collections::HashSet<_> = late.iter().collect();
        assert!(distinct.len() > 20, "no jitter: {late:?}");
    }
}
