//! Consume-transform-produce, exactly once from the log's point of view: a consumer takes
//! a batch, works out the records to append for it, then appends them and commits the
//! batch's offsets in one Kafka transaction. A crash before the commit re-delivers the
//! batch; read_committed readers never see the output of an aborted attempt.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use futures::future::join_all;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, OwnedHeaders, OwnedMessage};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{Message, Offset, TopicPartitionList};
use tokio_util::sync::CancellationToken;
use tracing::field::Empty;
use tracing::{Instrument, Span, info_span, warn};

use crate::error::EventLogError;
use crate::producer::idempotent_config;
use crate::settings::KafkaSettings;
use crate::trace::{TRACEPARENT_HEADER, continue_trace, link_trace};

const KAFKA_TIMEOUT: Duration = Duration::from_secs(30);

/// One record to append in a batch's transaction.
#[derive(Debug, Clone)]
pub struct Outgoing {
    pub topic: String,
    pub key: String,
    pub payload: Vec<u8>,
    pub traceparent: Option<String>,
}

/// Records processed but not yet committed: per partition, the offset to commit next and
/// the first offset to rewind to if the transaction that should commit them aborts.
#[derive(Debug, Default)]
pub struct Uncommitted {
    next: HashMap<(String, i32), i64>,
    first: HashMap<(String, i32), i64>,
}

impl Uncommitted {
    pub fn add(&mut self, batch: &[OwnedMessage]) {
        for message in batch {
            let partition = (message.topic().to_owned(), message.partition());
            let next = self.next.entry(partition.clone()).or_insert(0);
            *next = (*next).max(message.offset() + 1);
            let first = self.first.entry(partition).or_insert(i64::MAX);
            *first = (*first).min(message.offset());
        }
    }

    pub fn is_empty(&self) -> bool {
        self.next.is_empty()
    }
}

/// The consumer of a consume-transform-produce loop: group `group_id`, offsets committed
/// only through the transaction, committed records only.
pub fn transactional_consumer(
    kafka: &KafkaSettings,
    group_id: &str,
    topics: &[&str],
) -> Result<StreamConsumer, EventLogError> {
    let consumer: StreamConsumer = kafka
        .client_config()
        .set("group.id", group_id)
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .set("isolation.level", "read_committed")
        .create()?;
    consumer.subscribe(topics)?;
    Ok(consumer)
}

/// The configured transactional id, or the group id with a random suffix: unique per
/// running instance, as fencing through the group generation (KIP-447) allows.
pub fn instance_transactional_id(group_id: &str, configured: Option<&str>) -> String {
    configured.map_or_else(|| format!("{group_id}-{}", uuid::Uuid::new_v4().simple()), str::to_owned)
}

/// What [`next_batch`] found.
#[derive(Debug)]
pub enum Poll {
    /// Shutdown was requested; nothing was taken.
    Shutdown,
    /// Nothing arrived within the idle interval: a good moment to flush.
    Idle,
    Batch(Vec<OwnedMessage>),
}

/// Waits up to `idle` for a first record, then gathers more until the batch holds
/// `max_records` or `max_wait` has passed since the first (zero: only what is already fetched).
pub async fn next_batch(
    consumer: &StreamConsumer,
    max_records: usize,
    max_wait: Duration,
    idle: Duration,
    shutdown: &CancellationToken,
) -> Result<Poll, EventLogError> {
    let first = tokio::select! {
        () = shutdown.cancelled() => return Ok(Poll::Shutdown),
        received = tokio::time::timeout(idle, consumer.recv()) => match received {
            Err(_idle) => return Ok(Poll::Idle),
            Ok(received) => match tolerate(received)? {
                Some(message) => message.detach(),
                None => return Ok(Poll::Batch(vec![])),
            },
        },
    };
    let deadline = tokio::time::Instant::now() + max_wait;
    let mut batch = vec![first];
    while batch.len() < max_records {
        match tokio::time::timeout_at(deadline, consumer.recv()).await {
            Ok(received) => batch.extend(tolerate(received)?.map(|m| m.detach())),
            Err(_) => break,
        }
    }
    Ok(Poll::Batch(batch))
}

/// A consumer error is logged and skipped unless it is fatal (the client is unusable).
fn tolerate<T>(received: Result<T, KafkaError>) -> Result<Option<T>, EventLogError> {
    match received {
        Ok(message) => Ok(Some(message)),
        Err(error) if error.rdkafka_error_code() == Some(RDKafkaErrorCode::Fatal) => Err(error.into()),
        Err(error) => {
            warn!(%error, "consumer error; continuing");
            Ok(None)
        }
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

    /// Appends `outgoing` and commits every uncommitted offset in one transaction. On
    /// failure the transaction is aborted and the consumer rewound to the first uncommitted
    /// record, so that work is done again.
    pub async fn commit(
        &self,
        consumer: &StreamConsumer,
        uncommitted: &mut Uncommitted,
        outgoing: Vec<Outgoing>,
    ) -> Result<(), EventLogError> {
        if uncommitted.is_empty() && outgoing.is_empty() {
            return Ok(());
        }
        let done = std::mem::take(uncommitted);
        let span = transaction_span(&outgoing, done.next.len());
        if let Err(error) = self.transact(consumer, &done.next, outgoing).instrument(span).await {
            warn!(%error, "transaction failed; aborting and re-processing");
            tokio::task::block_in_place(|| self.producer.abort_transaction(KAFKA_TIMEOUT))?;
            for ((topic, partition), offset) in done.first {
                consumer.seek(&topic, partition, Offset::Offset(offset), KAFKA_TIMEOUT)?;
            }
        }
        Ok(())
    }

    async fn transact(
        &self,
        consumer: &StreamConsumer,
        next_offsets: &HashMap<(String, i32), i64>,
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
