//! Retry policy and circuit breaker for LLM calls: plain state, time passed in.

use std::time::{Duration, Instant};

/// Exponential backoff with "equal jitter": half the delay is fixed, half random, so
/// retries from many consumers spread out instead of arriving together.
pub fn backoff_delay(attempt: u32, base: Duration, max: Duration, jitter: f64) -> Duration {
    let exponent = attempt.saturating_sub(1).min(20);
    let full = base.saturating_mul(1 << exponent).min(max);
    full / 2 + full.mul_f64(jitter.clamp(0.0, 1.0) / 2.0)
}

/// Stops calling an endpoint that keeps failing, for a cool-down, then lets one call
/// through to probe it (half-open); a success closes it again.
#[derive(Debug, Clone)]
pub struct CircuitBreaker {
    failure_threshold: u32,
    cool_down: Duration,
    consecutive_failures: u32,
    open_until: Option<Instant>,
}

impl CircuitBreaker {
    /// A breaker that opens after `failure_threshold` failures in a row, for `cool_down`.
    pub fn new(failure_threshold: u32, cool_down: Duration) -> Self {
        Self { failure_threshold: failure_threshold.max(1), cool_down, consecutive_failures: 0, open_until: None }
    }

    /// Whether a call may go out now.
    pub fn allows(&self, now: Instant) -> bool {
        self.open_until.is_none_or(|until| now >= until)
    }

    /// A call succeeded: closes the breaker.
    pub fn record_success(&mut self) {
        self.consecutive_failures = 0;
        self.open_until = None;
    }

    /// A call failed at `now`.
    pub fn record_failure(&mut self, now: Instant) {
        self.consecutive_failures += 1;
        if self.consecutive_failures >= self.failure_threshold {
            self.open_until = Some(now + self.cool_down);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_cap_with_bounded_jitter() {
        let base = Duration::from_millis(100);
        let max = Duration::from_secs(1);
        assert_eq!(backoff_delay(1, base, max, 0.0), Duration::from_millis(50));
        assert_eq!(backoff_delay(1, base, max, 1.0), Duration::from_millis(100));
        assert_eq!(backoff_delay(3, base, max, 1.0), Duration::from_millis(400));
        assert_eq!(backoff_delay(30, base, max, 1.0), max);
        assert_eq!(backoff_delay(30, base, max, 0.0), max / 2);
    }

    #[test]
    fn breaker_opens_after_threshold_and_half_opens_after_cool_down() {
        let start = Instant::now();
        let mut breaker = CircuitBreaker::new(2, Duration::from_secs(10));
        breaker.record_failure(start);
        assert!(breaker.allows(start), "one failure is below the threshold");
        breaker.record_failure(start);
        assert!(!breaker.allows(start + Duration::from_secs(1)));
        assert!(breaker.allows(start + Duration::from_secs(10)), "half-open after the cool-down");
        breaker.record_failure(start + Duration::from_secs(10));
        assert!(!breaker.allows(start + Duration::from_secs(11)), "a failed probe re-opens it");
        breaker.record_success();
        assert!(breaker.allows(start + Duration::from_secs(11)));
    }
}
