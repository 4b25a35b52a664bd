//! The gateway's metrics: turns admitted and refused (by reason), error frames by code,
//! open sockets, conversations held in memory. Served with every other metric of the process at `/metrics`.

use std::sync::LazyLock;

pub use parley_eventlog::metrics::{CONTENT_TYPE, render};
use parley_eventlog::metrics::{NO_LABELS, counter, int_gauge};
use prometheus::{IntCounterVec, IntGaugeVec};

use crate::protocol::{ErrorCode, ServerFrame};

static TURNS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counter(
        "parley_turns_total",
        "Questions sent over a socket: admitted (written to the log), duplicate (a resend), or refused with the error code",
        &["outcome", "reason"],
    )
});

static ERROR_FRAMES: LazyLock<IntCounterVec> =
    LazyLock::new(|| counter("parley_error_frames_total", "Error frames sent to clients, by code", &["code"]));

static OPEN_SOCKETS: LazyLock<IntGaugeVec> =
    LazyLock::new(|| int_gauge("parley_open_sockets", "WebSockets open on this gateway", &[]));

static HELD_CONVERSATIONS: LazyLock<IntGaugeVec> = LazyLock::new(|| {
    int_gauge(
        "parley_gateway_conversations",
        "Conversations this gateway holds in memory (idle ones are forgotten)",
        &[],
    )
});

static UNPROJECTED_FACTS: LazyLock<IntGaugeVec> = LazyLock::new(|| {
    int_gauge(
        "parley_gateway_unprojected_events",
        "Conversation events this gateway read that the projection had not applied when it last looked (what it decides new or duplicate turns from, instead of waiting)",
        &[],
    )
});

/// Creates every turn and error-frame series at 0, so the first of each is an increase
/// (Prometheus's `rate` sees nothing of a series that starts at 1).
pub fn init() {
    for outcome in ["admitted", "duplicate"] {
        TURNS.with_label_values(&[outcome, ""]);
    }
    for code in ErrorCode::ALL {
        TURNS.with_label_values(&["refused", code.as_str()]);
        ERROR_FRAMES.with_label_values(&[code.as_str()]);
    }
    OPEN_SOCKETS.with_label_values(NO_LABELS);
    HELD_CONVERSATIONS.with_label_values(NO_LABELS);
    UNPROJECTED_FACTS.with_label_values(NO_LABELS);
}

/// Counts what the gateway answered to a client frame (`query`: the frame was a question).
pub fn answered(query: bool, frames: &[ServerFrame]) {
    for frame in frames {
        match frame {
            ServerFrame::Ack { duplicate, .. } if query => {
                let outcome = if *duplicate { "duplicate" } else { "admitted" };
                TURNS.with_label_values(&[outcome, ""]).inc();
            }
            ServerFrame::Error { code, .. } => {
                ERROR_FRAMES.with_label_values(&[code.as_str()]).inc();
                if query {
                    TURNS.with_label_values(&["refused", code.as_str()]).inc();
                }
            }
            _ => {}
        }
    }
}

/// How many conversations the gateway holds after forgetting the idle ones.
pub fn held_conversations(count: usize) {
    HELD_CONVERSATIONS.with_label_values(NO_LABELS).set(i64::try_from(count).unwrap_or(i64::MAX));
}

/// How many events the gateway keeps past the projection ([`crate::recent`]).
pub fn unprojected_events(count: usize) {
    UNPROJECTED_FACTS.with_label_values(NO_LABELS).set(i64::try_from(count).unwrap_or(i64::MAX));
}

/// A socket opened (+1) or closed (-1).
pub fn socket(change: i64) {
    OPEN_SOCKETS.with_label_values(NO_LABELS).add(change);
}

impl ErrorCode {
    /// Every code.
    pub const ALL: [ErrorCode; 11] = [
        Self::MalformedFrame,
        Self::FrameTooLarge,
        Self::InvalidField,
        Self::UnknownConversation,
        Self::TurnInProgress,
        Self::UnknownQuery,
        Self::Unavailable,
        Self::RateLimited,
        Self::BudgetExceeded,
        Self::Overloaded,
        Self::Erased,
    ];

    /// The code as the protocol spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::MalformedFrame => "malformed_frame",
            Self::FrameTooLarge => "frame_too_large",
            Self::InvalidField => "invalid_field",
            Self::UnknownConversation => "unknown_conversation",
            Self::TurnInProgress => "turn_in_progress",
            Self::UnknownQuery => "unknown_query",
            Self::Unavailable => "unavailable",
            Self::RateLimited => "rate_limited",
            Self::BudgetExceeded => "budget_exceeded",
            Self::Overloaded => "overloaded",
            Self::Erased => "erased",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_code_is_spelled_as_the_protocol_serializes_it() {
        for code in ErrorCode::ALL {
            assert_eq!(serde_json::to_value(code).unwrap(), code.as_str());
        }
    }
}
