//! The one way Parley's services build a Kafka consumer: committed records only, no
//! automatic offset commits (each reader keeps its position where its effect is), and
//! end-of-partition events, which the readers ask for, not reported as errors.

use std::sync::Arc;
use std::time::Duration;

use rdkafka::Message;
use rdkafka::client::ClientContext;
use rdkafka::consumer::Consumer;
use rdkafka::consumer::{ConsumerContext, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::message::BorrowedMessage;
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use tokio_util::sync::CancellationToken;
use tracing::{error, warn};

use parley_events::position::LogPosition;

use crate::error::EventLogError;
use crate::settings::KafkaSettings;

/// A consumer built by [`reader`].
pub type LogConsumer = StreamConsumer<ReaderContext>;

/// Reports client errors as warnings, except the end-of-partition events a reader asked for.
#[derive(Debug, Default, Clone, Copy)]
pub struct ReaderContext;

impl ClientContext for ReaderContext {
    fn error(&self, error: KafkaError, reason: &str) {
        let end_of_partition = matches!(error, KafkaError::PartitionEOF(_))
            || error.rdkafka_error_code() == Some(RDKafkaErrorCode::PartitionEOF);
        if !end_of_partition {
            warn!(%error, reason, "kafka client error");
        }
    }
}

impl ConsumerContext for ReaderContext {}

/// Settings of a reader in group `group_id`: read_committed, no automatic commits, and
/// `enable.partition.eof` as asked. Callers add what is theirs (fetch waits, strategy).
pub fn reader_config(kafka: &KafkaSettings, group_id: &str, eof_events: bool) -> ClientConfig {
    let mut config = kafka.client_config();
    config
        .set("group.id", group_id)
        .set("enable.auto.commit", "false")
        .set("isolation.level", "read_committed")
        .set("enable.partition.eof", if eof_events { "true" } else { "false" });
    config
}

/// A reader built from [`reader_config`] (possibly extended).
pub fn reader(config: &ClientConfig) -> Result<LogConsumer, EventLogError> {
    Ok(config.create_with_context(ReaderContext)?)
}

/// How long a reader's metadata query may take (its partitions, when it assigns them).
const METADATA_WAIT: Duration = Duration::from_secs(30);

/// A reader of every partition of `topics` from their ends: a process that follows what
/// is written from now on (a group of its own named after `name`; it commits nothing).
pub fn tail(kafka: &KafkaSettings, name: &str, topics: &[&str]) -> Result<LogConsumer, EventLogError> {
    let group = format!("{name}-{}", uuid::Uuid::new_v4().simple());
    let consumer = reader(reader_config(kafka, &group, false).set("fetch.wait.max.ms", "10"))?;
    let mut assignment = TopicPartitionList::new();
    for topic in topics {
        for partition in partitions(&consumer, topic)? {
            assignment.add_partition_offset(topic, partition, Offset::End)?;
        }
    }
    consumer.assign(&assignment)?;
    Ok(consumer)
}

/// The partitions of `topic`, as the cluster's metadata has them (a blocking query: call it
/// while a reader is set up, not on a hot path).
/// Right after a topic is created its partitions may have no leader yet: the metadata
/// request is then refused for a moment, which is retried rather than fatal.
pub fn partitions<C: ConsumerContext>(consumer: &StreamConsumer<C>, topic: &str) -> Result<Vec<i32>, KafkaError> {
    let mut tries = 0;
    loop {
        match consumer.fetch_metadata(Some(topic), METADATA_WAIT) {
            Ok(metadata) => {
                return Ok(metadata.topics().iter().flat_map(|t| t.partitions()).map(|p| p.id()).collect());
            }
            Err(KafkaError::MetadataFetch(code)) if tries < LEADERLESS_TRIES && is_leaderless(code) => {
                tries += 1;
                std::thread::sleep(LEADERLESS_PAUSE);
            }
            Err(error) => return Err(error),
        }
    }
}

/// How often, and how far apart, a metadata request refused for want of a leader is retried.
const LEADERLESS_TRIES: u32 = 50;
const LEADERLESS_PAUSE: Duration = Duration::from_millis(200);

/// A refusal that a partition's leader election (of a new topic, after a broker restart) ends.
fn is_leaderless(code: RDKafkaErrorCode) -> bool {
    matches!(
        code,
        RDKafkaErrorCode::NotLeaderForPartition
            | RDKafkaErrorCode::LeaderNotAvailable
            | RDKafkaErrorCode::UnknownTopicOrPartition
    )
}

/// Where `consumer` will read `partition` of `topic` next: after an end-of-partition event,
/// past the transaction markers that follow the last record (a reader that waits for
/// "everything up to the partition's end" needs that, not the last record's offset + 1).
pub fn position_in<C: ConsumerContext>(
    consumer: &StreamConsumer<C>,
    topic: &str,
    partition: i32,
) -> Result<Option<i64>, KafkaError> {
    Ok(match consumer.position()?.find_partition(topic, partition).map(|p| p.offset()) {
        Some(Offset::Offset(offset)) => Some(offset),
        _ => None,
    })
}

/// Where a record sits in the log.
pub fn position_of(message: &impl Message) -> LogPosition {
    LogPosition { topic: message.topic().to_owned(), partition: message.partition(), offset: message.offset() }
}

/// What a follower read next: a record, or the end of a partition (only with end-of-partition
/// events on).
#[derive(Debug)]
pub enum Read<'a> {
    /// The next record.
    Record(BorrowedMessage<'a>),
    /// The reader is at the end of this partition (for now).
    End(i32),
}

/// The next record of a reader that follows a topic until `shutdown`, or None once
/// `shutdown` is cancelled. One policy for a dead client: it cancels `shutdown` (the process
/// stops, and its orchestrator restarts it) rather than follow nothing forever; other
/// errors are logged under `follower`'s name and reading goes on.
pub async fn next_record<'a>(
    consumer: &'a LogConsumer,
    shutdown: &CancellationToken,
    follower: &str,
) -> Option<BorrowedMessage<'a>> {
    loop {
        if let Read::Record(message) = next_read(consumer, shutdown, follower).await? {
            return Some(message);
        }
    }
}

/// [`next_record`] for a follower that also wants the ends of its partitions ([`Read::End`]).
pub async fn next_read<'a>(
    consumer: &'a LogConsumer,
    shutdown: &CancellationToken,
    follower: &str,
) -> Option<Read<'a>> {
    loop {
        let received = tokio::select! {
            () = shutdown.cancelled() => return None,
            received = consumer.recv() => received,
        };
        match received {
            Ok(message) => return Some(Read::Record(message)),
            Err(KafkaError::PartitionEOF(partition)) => return Some(Read::End(partition)),
            Err(failure) if is_fatal(&failure) => {
                error!(error = %failure, follower, "fatal kafka error; shutting the process down");
                shutdown.cancel();
                return None;
            }
            Err(failure) => warn!(error = %failure, follower, "kafka error"),
        }
    }
}

/// Runs a librdkafka query that blocks (watermarks, metadata) on tokio's blocking pool.
pub(crate) async fn blocking_query<T: Send + 'static>(
    query: impl FnOnce() -> Result<T, KafkaError> + Send + 'static,
) -> Result<T, EventLogError> {
    tokio::task::spawn_blocking(query)
        .await
        .map_err(|_| EventLogError::Kafka(KafkaError::Canceled))?
        .map_err(Into::into)
}

/// Whether a consumer error means the client is unusable (every reader stops on it
/// instead of logging and polling a dead client forever).
pub fn is_fatal(error: &KafkaError) -> bool {
    error.rdkafka_error_code() == Some(RDKafkaErrorCode::Fatal)
}

/// How long a read-back waits for the records it was told exist.
const READ_BACK_WAIT: Duration = Duration::from_secs(10);

/// Every record of `topic` as of the call: each partition from the oldest record it still
/// holds to its end (for small topics an operator reads whole, such as the dead letters).
pub async fn read_topic(
    kafka: &KafkaSettings,
    topic: &str,
) -> Result<Vec<rdkafka::message::OwnedMessage>, EventLogError> {
    let consumer =
        Arc::new(reader(&reader_config(kafka, &format!("parley-read-{}", uuid::Uuid::new_v4().simple()), false))?);
    let (query, name) = (consumer.clone(), topic.to_owned());
    let metadata = blocking_query(move || query.fetch_metadata(Some(&name), READ_BACK_WAIT)).await?;
    let partitions: Vec<i32> = metadata.topics().iter().flat_map(|t| t.partitions().iter().map(|p| p.id())).collect();
    let mut records = Vec::new();
    for partition in partitions {
        let (query, name) = (consumer.clone(), topic.to_owned());
        let (low, _) = blocking_query(move || query.fetch_watermarks(&name, partition, READ_BACK_WAIT)).await?;
        records.extend(read_back(kafka, topic, partition, low, false, usize::MAX).await?.unwrap_or_default());
    }
    Ok(records)
}

/// Every record of `topic` the log took since `since` (a write time, ms; None: everything
/// it still holds), each partition read to its end as of the call and handed to `each` in
/// offset order, one at a time: for scans too large to hold in memory (a person's audit
/// across the whole log). Returns how many records were read.
pub async fn scan_topic<E: From<EventLogError>>(
    kafka: &KafkaSettings,
    topic: &str,
    since: Option<i64>,
    mut each: impl AsyncFnMut(&BorrowedMessage<'_>) -> Result<(), E>,
) -> Result<u64, E> {
    let group = format!("parley-scan-{}", uuid::Uuid::new_v4().simple());
    let consumer = Arc::new(reader(reader_config(kafka, &group, true).set("fetch.wait.max.ms", "10"))?);
    let (query, name) = (consumer.clone(), topic.to_owned());
    let metadata = blocking_query(move || query.fetch_metadata(Some(&name), READ_BACK_WAIT)).await?;
    let partitions: Vec<i32> = metadata.topics().iter().flat_map(|t| t.partitions().iter().map(|p| p.id())).collect();
    let mut read = 0;
    for partition in partitions {
        let (query, name) = (consumer.clone(), topic.to_owned());
        let (low, high) = blocking_query(move || query.fetch_watermarks(&name, partition, READ_BACK_WAIT)).await?;
        let start = match since {
            None => low,
            Some(since) => {
                let (query, name) = (consumer.clone(), topic.to_owned());
                let mut times = TopicPartitionList::new();
                times.add_partition_offset(&name, partition, Offset::Offset(since)).map_err(EventLogError::from)?;
                let found = blocking_query(move || query.offsets_for_times(times, READ_BACK_WAIT)).await?;
                match found.find_partition(topic, partition).map(|p| p.offset()) {
                    Some(Offset::Offset(offset)) => offset.max(low),
                    _ => high, // nothing written since then
                }
            }
        };
        if start >= high {
            continue;
        }
        let mut assignment = TopicPartitionList::new();
        assignment.add_partition_offset(topic, partition, Offset::Offset(start)).map_err(EventLogError::from)?;
        consumer.assign(&assignment).map_err(EventLogError::from)?;
        loop {
            // As in a read-back: markers at the end are never delivered, the end event says so.
            match tokio::time::timeout(READ_BACK_WAIT, consumer.recv()).await {
                Ok(Ok(message)) => {
                    read += 1;
                    each(&message).await?;
                    if message.offset() + 1 >= high {
                        break;
                    }
                }
                Ok(Err(KafkaError::PartitionEOF(_))) | Err(_) => break,
                Ok(Err(error)) => return Err(EventLogError::from(error).into()),
            }
        }
    }
    Ok(read)
}

/// A bounded read-back of one partition (e.g. the token deltas a reconnecting client
/// missed): `from` is an offset, or a write time (ms) when `at_time` is set; at most `max`
/// records up to the partition's end as of the call. `None`: `from` is older than what
/// the partition still holds (retention removed it).
pub async fn read_back(
    kafka: &KafkaSettings,
    topic: &str,
    partition: i32,
    from: i64,
    at_time: bool,
    max: usize,
) -> Result<Option<Vec<rdkafka::message::OwnedMessage>>, EventLogError> {
    let group = format!("parley-read-back-{}", uuid::Uuid::new_v4().simple());
    let consumer = Arc::new(reader(reader_config(kafka, &group, true).set("fetch.wait.max.ms", "10"))?);
    let (query, name) = (consumer.clone(), topic.to_owned());
    let (low, high) = blocking_query(move || query.fetch_watermarks(&name, partition, READ_BACK_WAIT)).await?;
    let start = if at_time {
        let (query, name) = (consumer.clone(), topic.to_owned());
        let mut times = TopicPartitionList::new();
        times.add_partition_offset(&name, partition, Offset::Offset(from))?;
        let found = blocking_query(move || query.offsets_for_times(times, READ_BACK_WAIT)).await?;
        match found.find_partition(topic, partition).map(|p| p.offset()) {
            Some(Offset::Offset(offset)) => offset,
            _ => high, // nothing written since then
        }
    } else {
        from
    };
    if start < low {
        return Ok(None);
    }
    let mut records = Vec::new();
    if start >= high {
        return Ok(Some(records));
    }
    let mut assignment = TopicPartitionList::new();
    assignment.add_partition_offset(topic, partition, Offset::Offset(start))?;
    consumer.assign(&assignment)?;
    while records.len() < max && records.last().is_none_or(|r: &rdkafka::message::OwnedMessage| r.offset() + 1 < high) {
        // A transaction marker at the end is never delivered: the end-of-partition event
        // says the rest is markers (or, should none come, nothing more arrives).
        match tokio::time::timeout(READ_BACK_WAIT, consumer.recv()).await {
            Ok(Ok(message)) => records.push(message.detach()),
            Ok(Err(KafkaError::PartitionEOF(_))) | Err(_) => break,
            Ok(Err(error)) => return Err(error.into()),
        }
    }
    Ok(Some(records))
}
