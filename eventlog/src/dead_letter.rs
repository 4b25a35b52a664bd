//! The dead-letter topic: the letter a consumer writes when it must give up on a record,
//! the operator's decisions on letters (redrive, discard) and the follower through which a
//! driver learns of both (`parley_events::dead_letters` has what they mean).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use parley_events::dead_letters::{LetterBook, LetterId, SettleRefused};
use parley_events::event::{DeadLetter, DeadLetterRecord, DeadLetterResolved, now_millis};
use parley_events::{EventCodec, EventsError};
use rdkafka::consumer::Consumer;
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, Headers, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::{Message, Offset, TopicPartitionList};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::consumer::{blocking_query, is_fatal, read_topic, reader, reader_config};
use crate::error::EventLogError;
use crate::producer::idempotent_config;
use crate::registry_wait::retry_while_registry_down;
use crate::settings::KafkaSettings;
use crate::trace::header_text;

/// The header a redriven copy carries: `<dead-letter topic>/<partition>/<offset>` of its letter.
pub const REDRIVEN_FROM_HEADER: &str = "parley-redriven-from";
/// The header naming the consumer group a copy is redriven for: the other groups read the
/// original already and pass the copy by.
pub const REDRIVEN_FOR_HEADER: &str = "parley-redriven-for";

/// The letter a redriven copy comes from (`<dead-letter topic>/<partition>/<offset>`).
pub fn redriven_from<M: Message>(message: &M) -> Option<&str> {
    header_text(message, REDRIVEN_FROM_HEADER)
}

/// The consumer group a redriven copy is for.
pub fn redriven_for<M: Message>(message: &M) -> Option<&str> {
    header_text(message, REDRIVEN_FOR_HEADER)
}

const KAFKA_TIMEOUT: Duration = Duration::from_secs(30);

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
        headers: message
            .headers()
            .map(|headers| {
                headers
                    .iter()
                    .filter_map(|h| Some((h.key.to_owned(), std::str::from_utf8(h.value?).ok()?.to_owned())))
                    .collect()
            })
            .unwrap_or_default(),
    }
}

/// The dead-letter topic as of now, folded; records that are not dead-letter records come
/// back apart, with their decoding error.
pub async fn read_book(
    kafka: &KafkaSettings,
    codec: &EventCodec,
) -> Result<(LetterBook, Vec<(LetterId, EventsError)>), EventLogError> {
    let mut book = LetterBook::default();
    let mut unreadable = Vec::new();
    for record in read_topic(kafka, &kafka.topics().dead_letter).await? {
        let id = LetterId { partition: record.partition(), offset: record.offset() };
        match codec.decode_dead_letter_record(record.payload().unwrap_or_default()).await {
            Ok(decoded) => book.apply(id, decoded.event),
            Err(error) => unreadable.push((id, error)),
        }
    }
    Ok((book, unreadable))
}

/// What an operator decides about a letter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Write the record back to its source topic (same partition, key and bytes).
    Redrive,
    /// Give up on it: its consumer lets the key's later records go on.
    Discard,
}

/// Settles letter `id` of `book`: for a redrive, the copy goes to its source topic's
/// partition with the headers [`REDRIVEN_FROM_HEADER`] and [`REDRIVEN_FOR_HEADER`], and the
/// resolution (saying where the copy is) to the dead-letter topic, in one transaction; for a
/// discard, the resolution only.
pub async fn settle(
    kafka: &KafkaSettings,
    codec: &EventCodec,
    book: &LetterBook,
    id: LetterId,
    decision: Decision,
    resolved_by: &str,
    reason: Option<String>,
) -> Result<DeadLetterResolved, EventLogError> {
    // Checked before anything is written (the letter is known and still open).
    book.resolution(id, None, resolved_by, reason.clone(), now_millis())?;
    let letter = &book.get(id).ok_or(SettleRefused::Unknown(id))?.letter;
    let dead_letter_topic = kafka.topics().dead_letter;
    let producer: FutureProducer = idempotent_config(kafka.client_config())
        .set("transactional.id", format!("parley-dead-letters-{}", uuid::Uuid::new_v4().simple()))
        .create()?;
    tokio::task::block_in_place(|| producer.init_transactions(KAFKA_TIMEOUT))?;
    producer.begin_transaction()?;
    let written = async {
        let redriven_offset = match decision {
            Decision::Discard => None,
            Decision::Redrive => {
                let from = format!("{dead_letter_topic}/{id}");
                // The original's headers (its trace, say), then where the copy comes from.
                let original = letter.headers.iter().filter(|(name, _)| !name.starts_with("parley-redriven-"));
                let headers = original
                    .fold(OwnedHeaders::new(), |headers, (key, value)| {
                        headers.insert(Header { key, value: Some(value.as_str()) })
                    })
                    .insert(Header { key: REDRIVEN_FROM_HEADER, value: Some(&from) })
                    .insert(Header { key: REDRIVEN_FOR_HEADER, value: Some(&letter.consumer) });
                let mut copy = FutureRecord::<[u8], [u8]>::to(&letter.source_topic)
                    .partition(letter.source_partition)
                    .headers(headers);
                if let Some(key) = &letter.key {
                    copy = copy.key(key.as_slice());
                }
                if let Some(payload) = &letter.payload {
                    copy = copy.payload(payload.as_slice());
                }
                let delivery = producer.send(copy, KAFKA_TIMEOUT).await.map_err(|(error, _)| error)?;
                Some(delivery.offset)
            }
        };
        let resolution = book.resolution(id, redriven_offset, resolved_by, reason, now_millis())?;
        let payload = codec.encode(&resolution).await?;
        let mut record = FutureRecord::<[u8], [u8]>::to(&dead_letter_topic).payload(payload.as_slice());
        if let Some(key) = &letter.key {
            record = record.key(key.as_slice());
        }
        producer.send(record, KAFKA_TIMEOUT).await.map_err(|(error, _)| error)?;
        tokio::task::block_in_place(|| producer.commit_transaction(KAFKA_TIMEOUT))?;
        Ok::<_, EventLogError>(resolution)
    }
    .await;
    if written.is_err() {
        let _ = tokio::task::block_in_place(|| producer.abort_transaction(KAFKA_TIMEOUT));
    }
    let resolution = written?;
    info!(letter = %id, action = %resolution.action, copy = ?resolution.copy(), "dead letter settled");
    Ok(resolution)
}

/// One consumer group's letters and their resolutions as they are written, from the start
/// of the dead-letter topic (a driver's view of what it holds back).
#[derive(Debug)]
pub struct LetterFollower {
    records: mpsc::UnboundedReceiver<(LetterId, DeadLetterRecord)>,
    syncs: mpsc::UnboundedSender<oneshot::Sender<()>>,
}

impl LetterFollower {
    /// Starts following the letters of `group` until `shutdown`.
    pub async fn start(
        kafka: &KafkaSettings,
        codec: Arc<EventCodec>,
        group: &str,
        shutdown: CancellationToken,
    ) -> Result<Self, EventLogError> {
        let name = format!("parley-letters-{}", uuid::Uuid::new_v4().simple());
        let consumer = Arc::new(reader(reader_config(kafka, &name, true).set("fetch.wait.max.ms", "100"))?);
        let topic = kafka.topics().dead_letter;
        let (query, name) = (consumer.clone(), topic.clone());
        let metadata = blocking_query(move || query.fetch_metadata(Some(&name), KAFKA_TIMEOUT)).await?;
        let mut assignment = TopicPartitionList::new();
        let partitions: Vec<i32> = metadata.topics().iter().flat_map(|t| t.partitions()).map(|p| p.id()).collect();
        for partition in &partitions {
            assignment.add_partition_offset(&topic, *partition, Offset::Beginning)?;
        }
        consumer.assign(&assignment)?;
        let (records, receiver) = mpsc::unbounded_channel();
        let (syncs, sync_requests) = mpsc::unbounded_channel();
        let follow =
            Follow { consumer, codec, group: group.to_owned(), topic, partitions, positions: HashMap::new(), records };
        tokio::spawn(follow.run(sync_requests, shutdown));
        Ok(Self { records: receiver, syncs })
    }

    /// Waits until every record of the topic committed before the call has been handed out
    /// (the follower stopped: an error).
    pub async fn sync(&self) -> Result<(), EventLogError> {
        let (done, synced) = oneshot::channel();
        self.syncs.send(done).map_err(|_| EventLogError::Kafka(KafkaError::Canceled))?;
        synced.await.map_err(|_| EventLogError::Kafka(KafkaError::Canceled))
    }

    /// The next letter or resolution of the group (None: the follower stopped).
    pub async fn next(&mut self) -> Option<(LetterId, DeadLetterRecord)> {
        self.records.recv().await
    }

    /// A letter or resolution handed out already, if any.
    pub fn try_next(&mut self) -> Option<(LetterId, DeadLetterRecord)> {
        self.records.try_recv().ok()
    }
}

/// Per partition of the dead-letter topic, an offset to read up to.
type Ends = Vec<(i32, i64)>;

struct Follow {
    consumer: Arc<crate::consumer::LogConsumer>,
    codec: Arc<EventCodec>,
    group: String,
    topic: String,
    partitions: Vec<i32>,
    /// Per partition, where reading is (past transaction markers once at the end).
    positions: HashMap<i32, i64>,
    records: mpsc::UnboundedSender<(LetterId, DeadLetterRecord)>,
}

impl Follow {
    async fn run(
        mut self,
        mut sync_requests: mpsc::UnboundedReceiver<oneshot::Sender<()>>,
        shutdown: CancellationToken,
    ) {
        // Syncs asked for: the (partition, end) each waits for, and whom to tell.
        let mut waiting: Vec<(Ends, oneshot::Sender<()>)> = Vec::new();
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                Some(reply) = sync_requests.recv() => {
                    // A broker that is away (restarting) is waited for: the driver waits anyway.
                    let mut pause = Duration::from_millis(100);
                    loop {
                        match self.ends().await {
                            Ok(ends) => break waiting.push((ends, reply)),
                            Err(error) => warn!(%error, ?pause, "reading the dead-letter topic's end failed; retrying"),
                        }
                        tokio::select! {
                            () = shutdown.cancelled() => return,
                            () = tokio::time::sleep(pause) => pause = (pause * 2).min(Duration::from_secs(5)),
                        }
                    }
                }
                received = self.consumer.recv() => match received {
                    Ok(message) => {
                        let (partition, offset) = (message.partition(), message.offset());
                        self.positions.insert(partition, offset + 1);
                        let id = LetterId { partition, offset };
                        let payload = message.payload().unwrap_or_default().to_vec();
                        let decoded =
                            retry_while_registry_down(&shutdown, || self.codec.decode_dead_letter_record(&payload)).await;
                        match decoded {
                            None => return,
                            Some(Ok(decoded)) if group_of(&decoded.event) == self.group => {
                                if self.records.send((id, decoded.event)).is_err() {
                                    return; // the driver stopped
                                }
                            }
                            Some(Ok(_)) => {}
                            Some(Err(error)) => warn!(letter = %id, %error, "not a dead-letter record; skipped"),
                        }
                    }
                    Err(KafkaError::PartitionEOF(partition)) => {
                        if let Ok(list) = self.consumer.position()
                            && let Some(Offset::Offset(position)) =
                                list.find_partition(&self.topic, partition).map(|e| e.offset())
                        {
                            self.positions.insert(partition, position);
                        }
                    }
                    Err(error) if is_fatal(&error) => {
                        warn!(%error, "the dead-letter follower's consumer failed; its driver stops");
                        return;
                    }
                    Err(error) => warn!(%error, "dead-letter follower: kafka error"),
                },
            }
            let reached =
                |ends: &[(i32, i64)]| ends.iter().all(|(p, end)| self.positions.get(p).is_some_and(|at| at >= end));
            let (answered, still): (Vec<_>, Vec<_>) = waiting.drain(..).partition(|(ends, _)| reached(ends));
            waiting = still;
            for (_, reply) in answered {
                let _ = reply.send(());
            }
        }
    }

    /// Each partition's last stable offset now (the reader is read_committed), with
    /// partitions that hold nothing counted as read.
    async fn ends(&mut self) -> Result<Ends, EventLogError> {
        let mut ends = Vec::new();
        for partition in self.partitions.clone() {
            let (query, topic) = (self.consumer.clone(), self.topic.clone());
            let (low, high) = blocking_query(move || query.fetch_watermarks(&topic, partition, KAFKA_TIMEOUT)).await?;
            if high <= low {
                self.positions.entry(partition).or_insert(high);
            }
            ends.push((partition, high));
        }
        Ok(ends)
    }
}

fn group_of(record: &DeadLetterRecord) -> &str {
    match record {
        DeadLetterRecord::Letter(letter) => &letter.consumer,
        DeadLetterRecord::Resolved(resolution) => &resolution.consumer,
    }
}
