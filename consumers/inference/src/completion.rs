//! What one model call comes to: a [`Completion`], or an [`LlmError`] of a kind the
//! failure event and the metrics record.

use std::time::Duration;

use thiserror::Error;

/// A finished answer, with what the response event records about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Completion {
    /// The answer.
    pub text: String,
    /// The model that answered, as the server named it.
    pub model: String,
    /// Why it stopped (`stop`, `length`…).
    pub finish_reason: String,
    /// Tokens of the prompt.
    pub prompt_tokens: i32,
    /// Tokens of the answer.
    pub completion_tokens: i32,
    /// How long the successful call took.
    pub latency: Duration,
    /// From the call to the first token, when streamed.
    pub time_to_first_token: Option<Duration>,
    /// The base URL of the server that answered.
    pub endpoint: String,
}

/// A duration in whole milliseconds as events record it, rounded to the nearest (truncating
/// would add half a millisecond, on average, to every overhead measured against it).
pub fn millis(duration: Duration) -> i64 {
    i64::try_from(duration.as_micros().saturating_add(500) / 1000).unwrap_or(i64::MAX)
}

/// Why a model call failed; the kind is the outcome's `error_kind`.
#[derive(Debug, Clone, Error, PartialEq, Eq)]
pub enum LlmError {
    /// No answer within the timeout.
    #[error("the LLM did not answer within {0:?}")]
    Timeout(Duration),
    /// The server could not be reached or failed (5xx, connection refused).
    #[error("the LLM endpoint is unavailable: {0}")]
    Unavailable(String),
    /// The server refused the request (4xx).
    #[error("the LLM rejected the request: {0}")]
    Rejected(String),
    /// The answer was not what the API promises.
    #[error("the LLM sent an invalid response: {0}")]
    InvalidResponse(String),
    /// Every endpoint's breaker is open: not called.
    #[error("circuit breaker open after repeated LLM failures")]
    CircuitOpen,
}

impl LlmError {
    /// Every `error_kind` a failed call is recorded with.
    pub const KINDS: [&str; 5] = ["timeout", "unavailable", "rejected", "invalid_response", "circuit_open"];

    /// The `error_kind` recorded in LLMResponseFailed.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Timeout(_) => "timeout",
            Self::Unavailable(_) => "unavailable",
            Self::Rejected(_) => "rejected",
            Self::InvalidResponse(_) => "invalid_response",
            Self::CircuitOpen => "circuit_open",
        }
    }

    /// A rejected request fails the same way again; everything else may be transient.
    pub fn is_retryable(&self) -> bool {
        !matches!(self, Self::Rejected(_))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_error_kind_is_listed_for_the_metrics() {
        // A kind missing from KINDS would have no series from 0 (rate() misses its first failure).
        let every = [
            LlmError::Timeout(Duration::from_secs(1)),
            LlmError::Unavailable(String::new()),
            LlmError::Rejected(String::new()),
            LlmError::InvalidResponse(String::new()),
            LlmError::CircuitOpen,
        ];
        let kinds: Vec<&str> = every.iter().map(LlmError::kind).collect();
        assert_eq!(kinds, LlmError::KINDS);
    }

    #[test]
    fn durations_are_recorded_to_the_nearest_millisecond() {
        assert_eq!(millis(Duration::from_micros(1_499)), 1);
        assert_eq!(millis(Duration::from_micros(1_500)), 2);
        assert_eq!(millis(Duration::from_micros(400)), 0);
        assert_eq!(millis(Duration::MAX), i64::MAX);
    }
}
