//! [`RetryPolicy`]: when a failed daemon instance runs again (BMW's rule).
//!
//! The first retries wait `base` (10 s); once the retry count passes
//! `threshold`, each further delay doubles, up to `max` (15 min).

use std::time::Duration;

/// The back-off of a failed daemon instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Delay of the first retries.
    pub base: Duration,
    /// Retry count after which delays double.
    pub threshold: u32,
    /// Ceiling of a delay.
    pub max: Duration,
}

impl RetryPolicy {
    /// The delay before retry number `retry_count` (1-based).
    ///
    /// ```
    /// use std::time::Duration;
    /// let p = bmw::daemon::RetryPolicy { base: Duration::from_secs(10), threshold: 5, max: Duration::from_secs(900) };
    /// assert_eq!(p.delay(1), Duration::from_secs(10));
    /// assert_eq!(p.delay(5), Duration::from_secs(10));
    /// assert_eq!(p.delay(6), Duration::from_secs(20));
    /// assert_eq!(p.delay(7), Duration::from_secs(40));
    /// assert_eq!(p.delay(30), Duration::from_secs(900));
    /// ```
    pub fn delay(&self, retry_count: u32) -> Duration {
        let doublings = retry_count.saturating_sub(self.threshold).min(32);
        self.base
            .checked_mul(1u32 << doublings.min(31))
            .unwrap_or(self.max)
            .min(self.max)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_past_threshold_and_caps() {
        let p = RetryPolicy {
            base: Duration::from_secs(10),
            threshold: 2,
            max: Duration::from_secs(60),
        };
        let delays: Vec<u64> = (1..=7).map(|n| p.delay(n).as_secs()).collect();
        assert_eq!(delays, [10, 10, 20, 40, 60, 60, 60]);
        assert_eq!(p.delay(u32::MAX), Duration::from_secs(60));
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
                threshold in any::<u32>(),
                retry in any::<u32>(),
            ) {
                let p = RetryPolicy { base, threshold, max };
                prop_assert!(p.delay(retry) <= max);
            }
        }
    }
}
