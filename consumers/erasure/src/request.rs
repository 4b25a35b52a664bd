//! Asking for an erasure, and waiting for it to be done: what `parley erase` and the
//! gateway's `DELETE /api/me` share.

use std::sync::Arc;
use std::time::Duration;

use parley_eventlog::consumer::{reader, reader_config};
use parley_eventlog::{EventProducer, KafkaSettings, LogPosition};
use parley_events::{
    Envelope, ErasureCompleted, ErasureEvent, ErasureRequested, EventCodec, EventId, Producer, UserId,
};
use rdkafka::consumer::Consumer;
use rdkafka::{Message, Offset, TopicPartitionList};
use tracing::{info, warn};

use crate::ErasureError;

/// `requested_by` of a person who asked for their own erasure.
pub const BY_SELF: &str = "self";
/// `requested_by` of an operator's erasure.
pub const BY_OPERATOR: &str = "operator";

/// The erasures topic, for asking and waiting.
#[derive(Debug, Clone)]
pub struct Erasures {
    kafka: KafkaSettings,
    topic: String,
    producer: EventProducer,
    writer: Producer,
}

/// A request as it landed in the log.
#[derive(Debug, Clone)]
pub struct Requested {
    /// The request.
    pub event: ErasureRequested,
    /// Where it landed: its completion comes after it.
    pub position: LogPosition,
}

impl Erasures {
    /// Requests written by `writer` (the gateway, the command line) through `producer`.
    pub fn new(kafka: &KafkaSettings, producer: EventProducer, writer: Producer) -> Self {
        Self { kafka: kafka.clone(), topic: kafka.topics().erasures, producer, writer }
    }

    /// An idempotent producer for [`new`](Self::new), encoding with a codec of `registry`.
    pub fn producer(kafka: &KafkaSettings, registry: &str) -> Result<EventProducer, ErasureError> {
        Ok(EventProducer::new(kafka.client_config(), Arc::new(EventCodec::new(registry)?))?)
    }

    /// Appends a request to erase `user` (asking twice is harmless: the second finds
    /// nothing left and completes too).
    pub async fn request(&self, user: &UserId, requested_by: &str, reason: &str) -> Result<Requested, ErasureError> {
        let event = ErasureRequested {
            envelope: Envelope::new(EventId::random(), user.erasure_stream(), 1, self.writer),
            user_id: user.clone(),
            requested_by: requested_by.to_owned(),
            reason: reason.to_owned(),
        };
        let position = self.producer.append(&self.topic, user.as_str(), &event, None).await?;
        info!(%user, request = %event.envelope.event_id, %position, requested_by, "erasure requested");
        Ok(Requested { event, position })
    }

    /// The completion of `request`, once the worker appended it; None when `wait` passed
    /// first (the erasure goes on: its completion comes later).
    pub async fn completion(
        &self,
        request: &Requested,
        wait: Duration,
    ) -> Result<Option<ErasureCompleted>, ErasureError> {
        let group = format!("parley-erasure-wait-{}", EventId::random());
        let consumer = reader(reader_config(&self.kafka, &group, false).set("fetch.wait.max.ms", "50"))?;
        let mut assignment = TopicPartitionList::new();
        let at = &request.position;
        assignment.add_partition_offset(&at.topic, at.partition, Offset::Offset(at.offset))?;
        consumer.assign(&assignment)?;
        let codec = self.producer.codec();
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let Ok(received) = tokio::time::timeout_at(deadline, consumer.recv()).await else { return Ok(None) };
            let message = match received {
                Ok(message) => message,
                Err(error) => {
                    warn!(%error, "reading the erasures topic");
                    continue;
                }
            };
            let Some(payload) = message.payload() else { continue };
            if let Ok(decoded) = codec.decode_erasure_event(payload).await
                && let ErasureEvent::Completed(done) = decoded.event
                && done.request_event_id == request.event.envelope.event_id
            {
                return Ok(Some(done));
            }
        }
    }
}
