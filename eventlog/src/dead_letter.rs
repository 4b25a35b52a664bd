use parley_events::event::{DeadLetter, now_millis};
use parley_events::{EventCodec, EventsError};
use rdkafka::Message;

use crate::consumer::read_topic;
use crate::error::EventLogError;
use crate::settings::KafkaSettings;

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

/// Every record of the dead-letter topic as of now, decoded, with its id: `partition/offset`
/// in the topic (a record that is not a dead letter comes with its decoding error).
pub async fn read_letters(
    kafka: &KafkaSettings,
    codec: &EventCodec,
) -> Result<Vec<(String, Result<DeadLetter, EventsError>)>, EventLogError> {
    let mut letters = Vec::new();
    for record in read_topic(kafka, &kafka.topics().dead_letter).await? {
        let id = format!("{}/{}", record.partition(), record.offset());
        let letter = codec.decode::<DeadLetter>(record.payload().unwrap_or_default()).await.map(|d| d.event);
        letters.push((id, letter));
    }
    Ok(letters)
}
