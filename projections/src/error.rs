use parley_eventlog::EventLogError;
use parley_events::EventsError;
use thiserror::Error;

/// Everything that can go wrong with the projections and replay.
#[derive(Debug, Error)]
pub enum ProjectionError {
    /// The CQL store could not be reached.
    #[error("cannot connect to the CQL store: {0}")]
    Connect(String),
    /// A statement failed.
    #[error("CQL statement failed: {statement}: {reason}")]
    Cql {
        /// The statement.
        statement: String,
        /// The driver's error.
        reason: String,
    },
    /// A row Parley could not have written.
    #[error("unexpected data in the store: {0}")]
    Corrupt(String),
    /// The event log failed.
    #[error(transparent)]
    EventLog(#[from] EventLogError),
    /// An event could not be encoded or decoded.
    #[error(transparent)]
    Events(#[from] EventsError),
    /// A rebuild stopped before it was done.
    #[error("rebuild of generation {generation} interrupted; it was not made live (run the rebuild again)")]
    Interrupted {
        /// The generation being built.
        generation: i32,
    },
    /// Kafka refused.
    #[error(transparent)]
    Kafka(#[from] rdkafka::error::KafkaError),
    /// The data subject was erased: nothing of theirs is sealed or opened any more.
    #[error("{0} was erased")]
    Erased(String),
    /// A replay point (`--at`, `?at=`) that is not one, or not in the conversation.
    #[error("{0}")]
    InvalidPoint(String),
    /// A compare-and-set kept losing to other writers.
    #[error("{0} kept changing under every attempt to update it")]
    Contention(String),
}

impl ProjectionError {
    /// A CQL error, with the statement that failed.
    pub fn cql(statement: &str, error: impl std::fmt::Display) -> Self {
        Self::Cql { statement: statement.to_owned(), reason: error.to_string() }
    }
}
