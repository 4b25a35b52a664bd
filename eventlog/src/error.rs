use parley_events::EventsError;
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
    #[error("invalid log position {0:?}: expected <topic>/<partition>/<offset>")]
    InvalidPosition(String),
}
