use parley_events::EventsError;
use parley_events::dead_letters::SettleRefused;
use rdkafka::error::KafkaError;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum EventLogError {
    #[error("kafka: {0}")]
    Kafka(#[from] KafkaError),
    #[error(transparent)]
    Events(#[from] EventsError),
    #[error("creating topic {topic}: {code}")]
    TopicCreation { topic: String, code: rdkafka::types::RDKafkaErrorCode },
    #[error("the consumer has no group metadata to commit offsets in a transaction")]
    NoGroupMetadata,
    #[error(transparent)]
    Settle(#[from] SettleRefused),
    #[error("the dead-letter follower stopped")]
    FollowerStopped,
    #[error("processing a record failed")]
    Processor(#[source] Box<dyn std::error::Error + Send + Sync>),
}

impl EventLogError {
    /// Whether the client that failed is unusable (a fatal librdkafka error, or a fenced
    /// or otherwise dead transactional producer): retrying with it cannot succeed.
    pub fn is_fatal(&self) -> bool {
        match self {
            Self::Kafka(KafkaError::Transaction(error)) => error.is_fatal(),
            Self::Kafka(error) => error.rdkafka_error_code() == Some(rdkafka::types::RDKafkaErrorCode::Fatal),
            _ => false,
        }
    }
}
