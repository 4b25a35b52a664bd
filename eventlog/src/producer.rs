use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use parley_events::EventCodec;
use parley_events::event::AvroEvent;
use rdkafka::ClientConfig;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};

use crate::LogPosition;
use crate::consumer::blocking_query;
use crate::error::EventLogError;
use crate::partitioner::PARTITIONER;
use crate::trace::TRACEPARENT_HEADER;

/// Appends events to the log with an idempotent producer (no duplicates or reordering from
/// its own retries), waiting for the broker's acknowledgement by all in-sync replicas.
#[derive(Clone)]
pub struct EventProducer {
    producer: FutureProducer,
    codec: Arc<EventCodec>,
}

impl std::fmt::Debug for EventProducer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventProducer").finish_non_exhaustive()
    }
}

/// Producer settings for durable, ordered appends with small-batch latency (a `linger.ms`
/// already in `base` is kept: a latency-first stream sets 0).
pub fn idempotent_config(mut base: ClientConfig) -> ClientConfig {
    if base.get("linger.ms").is_none() {
        base.set("linger.ms", "2");
    }
    base.set(PARTITIONER.0, PARTITIONER.1)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("compression.type", "lz4")
        .set("message.timeout.ms", "30000")
        // Documents are up to 1 MB of text; the topics cap records at 2 MiB.
        .set("message.max.bytes", "2097152");
    base
}

impl EventProducer {
    /// An idempotent producer over `config` that encodes with `codec`.
    pub fn new(config: ClientConfig, codec: Arc<EventCodec>) -> Result<Self, EventLogError> {
        Ok(Self { producer: idempotent_config(config).create()?, codec })
    }

    /// The codec it encodes with.
    pub fn codec(&self) -> &Arc<EventCodec> {
        &self.codec
    }

    /// Encodes and appends `event` under `key`, returning where it landed once acknowledged.
    pub async fn append<T: AvroEvent>(
        &self,
        topic: &str,
        key: &str,
        event: &T,
        traceparent: Option<&str>,
    ) -> Result<LogPosition, EventLogError> {
        self.enqueue(topic, key, event, traceparent).await?.await
    }

    /// Encodes `event` and puts it on the producer's queue without waiting for the broker.
    /// Records enqueued one after another keep that order in their partition. The returned
    /// future resolves when the broker acknowledges.
    pub async fn enqueue<T: AvroEvent>(
        &self,
        topic: &str,
        key: &str,
        event: &T,
        traceparent: Option<&str>,
    ) -> Result<impl Future<Output = Result<LogPosition, EventLogError>> + use<T>, EventLogError> {
        let payload = self.codec.encode(event).await?;
        let headers = traceparent.map_or_else(OwnedHeaders::new, |tp| {
            OwnedHeaders::new().insert(Header { key: TRACEPARENT_HEADER, value: Some(tp) })
        });
        let record = FutureRecord::to(topic).key(key).payload(&payload).headers(headers);
        let delivery = self.producer.send_result(record).map_err(|(error, _)| EventLogError::Kafka(error))?;
        let topic = topic.to_owned();
        Ok(async move {
            match delivery.await {
                Ok(Ok(delivery)) => Ok(LogPosition { topic, partition: delivery.partition, offset: delivery.offset }),
                Ok(Err((error, _))) => Err(EventLogError::Kafka(error)),
                Err(_canceled) => Err(EventLogError::Kafka(rdkafka::error::KafkaError::Canceled)),
            }
        })
    }

    /// The offset the next record appended to `topic`/`partition` will get (its high
    /// watermark): everything before it is in the log.
    pub async fn end_offset(&self, topic: &str, partition: i32) -> Result<i64, EventLogError> {
        let (producer, topic) = (self.producer.clone(), topic.to_owned());
        let watermarks =
            blocking_query(move || producer.client().fetch_watermarks(&topic, partition, Duration::from_secs(5)));
        Ok(watermarks.await?.1)
    }

    /// Waits until everything sent has been acknowledged (used on shutdown).
    pub fn flush(&self, timeout: Duration) -> Result<(), EventLogError> {
        Ok(self.producer.flush(timeout)?)
    }
}
