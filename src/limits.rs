//! Per-key rate limits: GCRA (the generic cell rate algorithm, a token bucket kept as one
//! timestamp) on one atomic per key, so the request path takes no lock.
//!
//! A limit of `N/P` lets a key make `N` requests at once and then one every `P/N`: the state is
//! the theoretical arrival time (TAT) of the next request; a request is allowed when taking one
//! more emission interval keeps the TAT within one period of now.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// `N` requests per period, as written (`100/s`, `5000/h`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    /// Requests per period.
    pub count: u32,
    /// The period.
    pub period: Duration,
}

impl Rate {
    /// Parses `N/s`, `N/m`, `N/h` or `N/d` (N from 1 to 1,000,000,000).
    pub fn parse(text: &str) -> Result<Rate, String> {
        let bad = || format!("{text:?} is not a limit like 100/s, 600/m, 5000/h or 100000/d");
        let (count, unit) = text.trim().split_once('/').ok_or_else(bad)?;
        let count: u32 = count.trim().parse().map_err(|_| bad())?;
        if count == 0 || count > 1_000_000_000 {
            return Err(bad());
        }
        let period = match unit.trim() {
            "s" => Duration::from_secs(1),
            "m" => Duration::from_secs(60),
            "h" => Duration::from_secs(3600),
            "d" => Duration::from_secs(86_400),
            _ => return Err(bad()),
        };
        Ok(Rate { count, period })
    }

    /// The period in whole seconds (the `w` parameter of `RateLimit-Policy`).
    pub fn window_seconds(&self) -> u64 {
        self.period.as_secs()
    }

    fn interval_ns(&self) -> u64 {
        (self.period.as_nanos() / u128::from(self.count)).max(1) as u64
    }
}

/// What the limiter says about one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Go on; `remaining` more would be allowed right now, and the budget is full again in
    /// `reset` seconds.
    Allow {
        /// Requests left in the current window.
        remaining: u64,
        /// Seconds until the budget is whole again.
        reset: u64,
    },
    /// Over the limit: try again in `retry_after` seconds.
    Deny {
        /// Seconds until one request would be allowed.
        retry_after: u64,
    },
}

/// Nanoseconds on a monotonic clock (never 0).
pub fn now_ns() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    let start = START.get_or_init(Instant::now);
    start.elapsed().as_nanos() as u64 + 1_000_000_000
}

/// Takes one request from the budget whose state is `tat`, at `now` (from [`now_ns`]).
pub fn take(tat: &AtomicU64, rate: Rate, now: u64) -> Verdict {
    let interval = rate.interval_ns();
    let period = rate.period.as_nanos() as u64;
    let mut current = tat.load(Ordering::Relaxed);
    loop {
        let next = current.max(now) + interval;
        let ahead = next - now;
        if ahead > period {
            let wait = ahead - period;
            return Verdict::Deny {
                retry_after: wait.div_ceil(1_000_000_000).max(1),
            };
        }
        match tat.compare_exchange_weak(current, next, Ordering::Relaxed, Ordering::Relaxed) {
            Ok(_) => {
                return Verdict::Allow {
                    remaining: (period - ahead) / interval,
                    reset: ahead.div_ceil(1_000_000_000),
                }
            }
            Err(seen) => current = seen,
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn parses_the_four_units_and_refuses_the_rest() {
        assert_eq!(Rate::parse("100/s").unwrap().period, Duration::from_secs(1));
        assert_eq!(
            Rate::parse("5/d").unwrap().period,
            Duration::from_secs(86_400)
        );
        for bad in ["0/s", "10", "10/w", "-1/s", "x/s", "10/ s/"] {
            assert!(Rate::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_burst_of_n_then_one_per_interval() {
        let rate = Rate::parse("10/s").unwrap();
        let tat = AtomicU64::new(0);
        let t0 = 5_000_000_000;
        for i in 0..10 {
            match take(&tat, rate, t0) {
                Verdict::Allow { remaining, .. } => assert_eq!(remaining, 9 - i),
                other => panic!("request {i}: {other:?}"),
            }
        }
        assert_eq!(take(&tat, rate, t0), Verdict::Deny { retry_after: 1 });
        // 100 ms later exactly one more fits.
        assert!(matches!(
            take(&tat, rate, t0 + 100_000_000),
            Verdict::Allow { .. }
        ));
        assert!(matches!(
            take(&tat, rate, t0 + 100_000_000),
            Verdict::Deny { .. }
        ));
        // A full period later the whole budget is back.
        let later = t0 + 1_200_000_000;
        assert_eq!(
            take(&tat, rate, later),
            Verdict::Allow {
                remaining: 9,
                reset: 1
            }
        );
    }

    #[test]
    fn a_daily_limit_says_when_to_come_back() {
        let rate = Rate::parse("2/d").unwrap();
        let tat = AtomicU64::new(0);
        let t0 = 1_000_000_000;
        assert!(matches!(take(&tat, rate, t0), Verdict::Allow { .. }));
        assert!(matches!(take(&tat, rate, t0), Verdict::Allow { .. }));
        assert_eq!(
            take(&tat, rate, t0),
            Verdict::Deny {
                retry_after: 43_200
            }
        );
    }
}
