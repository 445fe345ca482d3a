//! [`Backoff`]: the delay before an async task's next attempt: exponential in
//! the attempt number, capped, with jitter so that tasks failing together do
//! not retry together.

use std::time::Duration;

use rand::Rng;

/// Exponential back-off with ±25 % jitter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    /// Delay after the first failed attempt.
    pub base: Duration,
    /// Ceiling.
    pub max: Duration,
}

impl Backoff {
    /// The delay before the attempt after failed attempt number `attempt` (1-based).
    pub fn delay(&self, attempt: u32) -> Duration {
        let exp = attempt.saturating_sub(1).min(30);
        let raw = self.base.saturating_mul(1u32 << exp).min(self.max);
        let jitter = rand::rng().random_range(0.75..=1.25);
        // Not `mul_f64`, which panics past `Duration::MAX`.
        Duration::try_from_secs_f64(raw.as_secs_f64() * jitter)
            .unwrap_or(self.max)
            .min(self.max)
    }

    /// A delay a handler chose ([`super::TaskError::retry_after`]), held to
    /// the ceiling like the back-off's own.
    pub fn capped(&self, delay: Duration) -> Duration {
        delay.min(self.max)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_with_jitter_and_caps() {
        let b = Backoff {
            base: Duration::from_secs(1),
            max: Duration::from_secs(60),
        };
        for attempt in 1..=4 {
            let nominal = 1u64 << (attempt - 1);
            let d = b.delay(attempt).as_secs_f64();
            assert!(
                d >= nominal as f64 * 0.75 && d <= nominal as f64 * 1.25,
                "attempt {attempt}: {d}"
            );
        }
        assert!(b.delay(40) <= Duration::from_secs(60));
        let spread: std::collections::HashSet<u128> =
            (0..20).map(|_| b.delay(3).as_micros()).collect();
        assert!(spread.len() > 1, "jitter varies the delay");
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            #![proptest_config(crate::task::arbitrary::config())]

            #[test]
            fn delays_stay_under_the_ceiling(
                base in any::<u64>().prop_map(Duration::from_nanos),
                max in prop_oneof![any::<u64>().prop_map(Duration::from_secs), Just(Duration::MAX)],
                attempt in any::<u32>(),
                chosen in prop_oneof![any::<u64>().prop_map(Duration::from_secs), Just(Duration::MAX)],
            ) {
                let b = Backoff { base, max };
                prop_assert!(b.delay(attempt) <= max);
                prop_assert!(b.capped(chosen) <= max);
            }
        }
    }
}
