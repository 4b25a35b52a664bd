use parley_events::EventsError;
use parley_events::dead_letters::SettleRefused;
use rdkafka::error::KafkaError;
use thiserror::Error;

/// Why a Kafka step failed. Each variant names its cause once: through `source()` or, when
/// it wraps one error only, transparently.
#[derive(Debug, Error)]
pub enum EventLogError {
    /// The Kafka client failed.
    #[error(transparent)]
    Kafka(#[from] KafkaError),
    /// Encoding or decoding an event failed.
    #[error(transparent)]
    Events(#[from] EventsError),
    /// The broker refused to create a topic.
    #[error("creating topic {topic}: {code}")]
    TopicCreation {
        /// The topic.
        topic: String,
        /// The broker's answer.
        code: rdkafka::types::RDKafkaErrorCode,
    },
    /// A consumer outside a group cannot commit offsets in a transaction.
    #[error("the consumer has no group metadata to commit offsets in a transaction")]
    NoGroupMetadata,
    /// A dead letter cannot be settled (unknown, or settled already).
    #[error(transparent)]
    Settle(#[from] SettleRefused),
    /// The driver's dead-letter follower ended while the driver ran.
    #[error("the dead-letter follower stopped")]
    FollowerStopped,
    /// A processor's work failed (fatal for the driver).
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
