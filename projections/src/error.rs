use parley_eventlog::EventLogError;
use parley_events::EventsError;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum ProjectionError {
    #[error("cannot connect to the CQL store: {0}")]
    Connect(String),
    #[error("CQL statement failed: {statement}: {reason}")]
    Cql { statement: String, reason: String },
    #[error("unexpected data in the store: {0}")]
    Corrupt(String),
    #[error(transparent)]
    EventLog(#[from] EventLogError),
    #[error(transparent)]
    Events(#[from] EventsError),
    #[error("rebuild of generation {generation} interrupted; it was not made live (run the rebuild again)")]
    Interrupted { generation: i32 },
    #[error("kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    #[error("{0} kept changing under every attempt to update it")]
    Contention(String),
}

impl ProjectionError {
    pub fn cql(statement: &str, error: impl std::fmt::Display) -> Self {
        Self::Cql { statement: statement.to_owned(), reason: error.to_string() }
    }
}
