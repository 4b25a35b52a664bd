use parley_events::event::{DeadLetter, now_millis};
use rdkafka::Message;

/// The dead-letter record for a message a consumer cannot process: its coordinates, its
/// original key and payload bytes untouched, who gave up and why.
pub fn dead_letter_for(message: &impl Message, consumer: &str, error: &str) -> DeadLetter {
    DeadLetter {
        source_topic: message.topic().to_owned(),
        source_partition: message.partition(),
        source_offset: message.offset(),
        key: message.key().map(<[u8]>::to_vec),
        payload: message.payload().map(<[u8]>::to_vec),
        consumer: consumer.to_owned(),
        error: error.to_owned(),
        failed_at: now_millis(),
    }
}
