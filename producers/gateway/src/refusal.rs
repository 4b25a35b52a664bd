//! Why a socket command (subscribe, resume, cancel) was refused, with its cause; mapped to
//! the protocol's error code and the HTTP API's status in one place.

use axum::http::StatusCode;
use parley_eventlog::EventLogError;

use crate::adoption::AdoptionError;
use crate::api::ApiError;
use crate::protocol::{ErrorCode, ServerFrame};

/// A refused command. The message a client sees is the error with its causes.
#[derive(Debug, thiserror::Error)]
pub(crate) enum Refusal {
    #[error("no conversation {0} for this user")]
    UnknownConversation(String),
    #[error("no query {0} in this conversation")]
    UnknownQuery(String),
    /// The conversation could not be adopted from the log (the error says why).
    #[error(transparent)]
    NotAdopted(AdoptionError),
    #[error("the event log did not take the {what}; retry")]
    NotWritten {
        what: &'static str,
        #[source]
        source: EventLogError,
    },
    #[error("the tokens could not be read back; retry")]
    NotReadBack(#[source] EventLogError),
    #[error("the question is not in the log any more")]
    QuestionGone,
}

impl Refusal {
    /// The protocol's code for it.
    pub(crate) fn code(&self) -> ErrorCode {
        match self {
            Self::UnknownConversation(_) => ErrorCode::UnknownConversation,
            Self::UnknownQuery(_) => ErrorCode::UnknownQuery,
            Self::NotAdopted(_) | Self::NotWritten { .. } | Self::NotReadBack(_) | Self::QuestionGone => {
                ErrorCode::Unavailable
            }
        }
    }

    /// What the client reads: the refusal and its causes, outermost first.
    pub(crate) fn message(&self) -> String {
        let mut message = self.to_string();
        let mut cause = std::error::Error::source(self);
        while let Some(error) = cause {
            message.push_str(": ");
            message.push_str(&error.to_string());
            cause = error.source();
        }
        message
    }

    /// The error frame a socket gets.
    pub(crate) fn into_frame(self) -> ServerFrame {
        ServerFrame::error(self.code(), self.message(), None)
    }

    /// The HTTP API's answer: 404 for what is not the caller's, else 503.
    pub(crate) fn into_api_error(self) -> ApiError {
        match self.code() {
            ErrorCode::UnknownConversation | ErrorCode::UnknownQuery => {
                ApiError::new(StatusCode::NOT_FOUND, "not_found", self.message())
            }
            _ => ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", self.message()),
        }
    }
}

#[cfg(test)]
mod tests {
    use rdkafka::error::KafkaError;

    use super::*;

    #[test]
    fn a_refusal_names_its_code_and_each_cause_once() {
        let refusal = Refusal::NotWritten { what: "cancel", source: EventLogError::Kafka(KafkaError::Canceled) };
        assert_eq!(refusal.code(), ErrorCode::Unavailable);
        let message = refusal.message();
        assert!(message.starts_with("the event log did not take the cancel; retry: "), "{message}");
        assert_eq!(message.matches(&KafkaError::Canceled.to_string()).count(), 1, "{message}");
        assert_eq!(Refusal::UnknownQuery("q".into()).code(), ErrorCode::UnknownQuery);
        assert_eq!(Refusal::UnknownConversation("c".into()).into_api_error().status(), StatusCode::NOT_FOUND);
    }
}
