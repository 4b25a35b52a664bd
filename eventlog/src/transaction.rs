//! The transactional producer of consume-transform-produce (driven by [`crate::driver`]):
//! records to append and the consumer's next offsets go out in one Kafka transaction. A
//! crash before the commit re-delivers the records; read_committed readers never see the
//! output of an aborted attempt.

use std::time::{Duration, Instant};

use futures::future::join_all;
use rdkafka::consumer::{Consumer, ConsumerContext, StreamConsumer};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::{Offset, TopicPartitionList};
use tracing::field::Empty;
use tracing::{Instrument, Span, info_span};

use crate::error::EventLogError;
use crate::producer::idempotent_config;
use crate::settings::KafkaSettings;
use crate::trace::{TRACEPARENT_HEADER, continue_trace, link_trace};

const KAFKA_TIMEOUT: Duration = Duration::from_secs(30);

/// One record to append in a batch's transaction.
#[derive(Debug, Clone)]
pub struct Outgoing {
    /// The topic.
    pub topic: String,
    /// The record's key (its partition follows from it).
    pub key: String,
    /// The encoded record.
    pub payload: Vec<u8>,
    /// The W3C trace context to carry in the `traceparent` header.
    pub traceparent: Option<String>,
}

impl Outgoing {
    /// A record to `topic` keyed `key`, outside any trace.
    pub fn new(topic: &str, key: &str, payload: Vec<u8>) -> Self {
        Self { topic: topic.to_owned(), key: key.to_owned(), payload, traceparent: None }
    }
}

/// The configured transactional id, else the group id with the instance id (stable across
/// restarts: the new incarnation aborts the old one's open transaction at once), else with
/// a random suffix: unique per running instance, as fencing through the group generation
/// (KIP-447) allows.
pub fn instance_transactional_id(group_id: &str, configured: Option<&str>, instance_id: Option<&str>) -> String {
    match (configured, instance_id) {
        (Some(configured), _) => configured.to_owned(),
        (None, Some(instance)) => format!("{group_id}-{instance}"),
        (None, None) => format!("{group_id}-{}", uuid::Uuid::new_v4().simple()),
    }
}

/// The producer side of a consume-transform-produce loop.
pub struct TransactionalProducer {
    producer: FutureProducer,
}

impl std::fmt::Debug for TransactionalProducer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TransactionalProducer").finish_non_exhaustive()
    }
}

impl TransactionalProducer {
    /// A producer with `transactional_id`, unique per running instance (zombies are fenced
    /// through the consumer group generation).
    pub fn new(kafka: &KafkaSettings, transactional_id: &str) -> Result<Self, EventLogError> {
        let producer: FutureProducer = idempotent_config(kafka.client_config())
            .set("transactional.id", transactional_id)
            // Transactional requests answered CONCURRENT_TRANSACTIONS (the previous commit's
            // markers are still being written) are retried after this backoff; 100 ms default.
            .set("retry.backoff.ms", "10")
            // A transaction's records are enqueued together and flushed by the commit, so
            // lingering for more would only delay them.
            .set("linger.ms", "0")
            .create()?;
        tokio::task::block_in_place(|| producer.init_transactions(KAFKA_TIMEOUT))?;
        Ok(Self { producer })
    }

    /// Appends `outgoing` and commits `next_offsets` (per partition, the next offset to
    /// read) in one transaction. On failure the transaction is aborted and the error
    /// returned: nothing of it is visible, and the caller may try the same again.
    pub async fn commit_offsets<C: ConsumerContext + 'static>(
        &self,
        consumer: &StreamConsumer<C>,
        next_offsets: &std::collections::BTreeMap<(String, i32), i64>,
        outgoing: Vec<Outgoing>,
    ) -> Result<(), EventLogError> {
        if next_offsets.is_empty() && outgoing.is_empty() {
            return Ok(());
        }
        let span = transaction_span(&outgoing, next_offsets.len());
        let result = self.transact(consumer, next_offsets, outgoing).instrument(span).await;
        if result.is_err() {
            tokio::task::block_in_place(|| self.producer.abort_transaction(KAFKA_TIMEOUT))?;
        }
        result
    }

    async fn transact<C: ConsumerContext + 'static>(
        &self,
        consumer: &StreamConsumer<C>,
        next_offsets: &std::collections::BTreeMap<(String, i32), i64>,
        outgoing: Vec<Outgoing>,
    ) -> Result<(), EventLogError> {
        let started = Instant::now();
        self.producer.begin_transaction()?;
        // All records in flight at once (one round trip, not one per record), in order per
        // partition as the idempotent producer keeps them.
        let deliveries = outgoing.iter().map(|record| {
            let headers = record.traceparent.as_deref().map_or_else(OwnedHeaders::new, |tp| {
                OwnedHeaders::new().insert(Header { key: TRACEPARENT_HEADER, value: Some(tp) })
            });
            let future_record =
                FutureRecord::to(&record.topic).key(&record.key).payload(&record.payload).headers(headers);
            self.producer.send(future_record, KAFKA_TIMEOUT)
        });
        for delivery in join_all(deliveries).await {
            delivery.map_err(|(error, _)| error)?;
        }
        let mut offsets = TopicPartitionList::new();
        for ((topic, partition), offset) in next_offsets {
            offsets.add_partition_offset(topic, *partition, Offset::Offset(*offset))?;
        }
        let group = consumer.group_metadata().ok_or(EventLogError::NoGroupMetadata)?;
        let span = Span::current();
        span.record("append_ms", millis(started.elapsed()));
        let offsets_started = Instant::now();
        tokio::task::block_in_place(|| self.producer.send_offsets_to_transaction(&offsets, &group, KAFKA_TIMEOUT))?;
        span.record("offsets_ms", millis(offsets_started.elapsed()));
        let commit_started = Instant::now();
        tokio::task::block_in_place(|| self.producer.commit_transaction(KAFKA_TIMEOUT))?;
        span.record("commit_ms", millis(commit_started.elapsed()));
        Ok(())
    }
}

/// The span of one transaction, with the time of each phase (appends, offsets, commit) as
/// fields. It continues the trace of the first record it appends (so a one-turn batch
/// shows up inside that turn's trace) and links the traces of the others.
fn transaction_span(outgoing: &[Outgoing], partitions: usize) -> Span {
    let span = info_span!(parent: None, "eventlog.transaction", records = outgoing.len(), partitions,
        append_ms = Empty, offsets_ms = Empty, commit_ms = Empty);
    let mut traceparents = outgoing.iter().filter_map(|record| record.traceparent.as_deref());
    continue_trace(&span, traceparents.next());
    for traceparent in traceparents {
        link_trace(&span, Some(traceparent));
    }
    span
}

fn millis(elapsed: Duration) -> f64 {
    elapsed.as_secs_f64() * 1000.0
}
