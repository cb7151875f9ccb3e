//! The one retry policy: exponential backoff with full jitter, honouring (and clamping) a delay
//! the server asked for. All retry timing in Pictor is decided here; callers only say how many
//! retries they have made and what the server said.

use std::time::Duration;

use rand::Rng;

/// The longest delay a server may ask for and have honoured: a hint above it waits this long.
/// [`RetryPolicy::new`] clamps to it too, and the hint parsers below clamp to it as they parse,
/// so a hostile `retry-after: 1e20` can neither overflow a [`Duration`] nor park a job.
pub const MAX_SERVER_DELAY: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts in all, the first included.
    pub max_attempts: u32,
    /// Ceiling of the first retry's delay; it doubles per retry.
    pub base: Duration,
    /// Largest computed delay.
    pub cap: Duration,
    /// Largest server-requested delay honoured in-process.
    pub max_server_delay: Duration,
}

impl RetryPolicy {
    pub fn new(max_attempts: u32) -> Self {
        Self {
            max_attempts,
            base: Duration::from_millis(500),
            cap: Duration::from_secs(8),
            max_server_delay: MAX_SERVER_DELAY,
        }
    }

    /// Whether another attempt is allowed after `attempts_made` attempts.
    pub fn allows_another(&self, attempts_made: u32) -> bool {
        attempts_made < self.max_attempts
    }

    /// Delay before retry number `retry` (0 for the first retry). A server hint wins when given,
    /// clamped to `max_server_delay`; otherwise a full-jitter draw from
    /// `[0, min(cap, base * 2^retry)]`.
    pub fn delay(&self, retry: u32, server_hint: Option<Duration>) -> Duration {
        if let Some(hint) = server_hint {
            return hint.min(self.max_server_delay);
        }
        let ceiling = self
            .base
            .saturating_mul(2u32.saturating_pow(retry.min(16)))
            .min(self.cap);
        let millis = u64::try_from(ceiling.as_millis()).unwrap_or(u64::MAX);
        Duration::from_millis(rand::rng().random_range(0..=millis))
    }
}

/// Parses an HTTP `Retry-After`-style value given in seconds (fractions allowed), clamped to
/// [`MAX_SERVER_DELAY`].
pub fn parse_seconds(raw: &str) -> Option<Duration> {
    server_delay(raw.trim().parse().ok()?)
}

/// A delay a server asked for, in seconds, as a [`Duration`] no longer than
/// [`MAX_SERVER_DELAY`]. Negative, NaN and infinite values are no hint at all (`None`); a huge
/// one waits the maximum. `Duration::from_secs_f64` would panic on anything above `u64::MAX`
/// seconds, and a server's header is no reason for a worker to panic.
pub fn server_delay(seconds: f64) -> Option<Duration> {
    if !seconds.is_finite() || seconds < 0.0 {
        return None;
    }
    Some(
        Duration::try_from_secs_f64(seconds)
            .map_or(MAX_SERVER_DELAY, |delay| delay.min(MAX_SERVER_DELAY)),
    )
}

/// Parses a protobuf Duration string such as `"22s"` or `"1.5s"` (Gemini's `RetryInfo`).
pub fn parse_proto_duration(raw: &str) -> Option<Duration> {
    parse_seconds(raw.trim().strip_suffix('s')?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn computed_delays_stay_within_the_doubling_ceiling() {
        let policy = RetryPolicy::new(4);
        for retry in 0..8 {
            let ceiling = (policy.base * 2u32.pow(retry)).min(policy.cap);
            for _ in 0..50 {
                assert!(policy.delay(retry, None) <= ceiling);
            }
        }
    }

    #[test]
    fn server_hints_win_but_are_clamped() {
        let policy = RetryPolicy::new(4);
        assert_eq!(
            policy.delay(0, Some(Duration::from_secs(3))),
            Duration::from_secs(3)
        );
        assert_eq!(
            policy.delay(0, Some(Duration::from_secs(3600))),
            policy.max_server_delay
        );
    }

    #[test]
    fn attempts_are_bounded() {
        let policy = RetryPolicy::new(4);
        assert!(policy.allows_another(3));
        assert!(!policy.allows_another(4));
    }

    #[test]
    fn retry_hints_parse() {
        assert_eq!(parse_seconds("1.5"), Some(Duration::from_millis(1500)));
        assert_eq!(parse_seconds("soon"), None);
        assert_eq!(parse_proto_duration("22s"), Some(Duration::from_secs(22)));
        assert_eq!(parse_proto_duration("22"), None);
    }

    #[test]
    fn hostile_hints_are_clamped_or_ignored_and_never_panic() {
        assert_eq!(parse_seconds("1e20"), Some(MAX_SERVER_DELAY));
        assert_eq!(parse_seconds("1e300"), Some(MAX_SERVER_DELAY));
        assert_eq!(parse_seconds("3600"), Some(MAX_SERVER_DELAY));
        assert_eq!(parse_proto_duration("1e20s"), Some(MAX_SERVER_DELAY));
        assert_eq!(server_delay(1e300 / 1000.0), Some(MAX_SERVER_DELAY));
        assert_eq!(server_delay(f64::MAX), Some(MAX_SERVER_DELAY));
        for ignored in ["-1", "-0.5", "NaN", "nan", "inf", "-inf", "infinity"] {
            assert_eq!(parse_seconds(ignored), None, "{ignored}");
        }
        assert_eq!(server_delay(f64::NAN), None);
        assert_eq!(server_delay(f64::INFINITY), None);
        assert_eq!(server_delay(0.0), Some(Duration::ZERO));
        assert_eq!(server_delay(2.5), Some(Duration::from_millis(2500)));
    }
}
