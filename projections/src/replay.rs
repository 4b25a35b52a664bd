//! Replay and audit: a conversation's events straight from the log. With the projection's
//! offset index, exactly the conversation's records are fetched; without it (or with
//! `--scan`) every partition is read from the start and filtered by key. The state is
//! rebuilt with the same fold the projection uses, and compared with what it stores.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use parley_eventlog::consumer::{LogConsumer, partitions, position_of, reader, reader_config};
use parley_eventlog::dead_letter::redriven_from;
use parley_eventlog::trace::{header_traceparent, trace_id};
use parley_eventlog::{KafkaSettings, LogPosition};
use parley_events::conversation::ConversationState;
use parley_events::{ConversationEvent, ConversationId, Decoded, EventCodec, EventId, RetrievedContext};
use rdkafka::consumer::Consumer;
use rdkafka::message::OwnedMessage;
use rdkafka::{Message as _, Offset, TopicPartitionList};
use serde::Serialize;
use tracing::warn;
use uuid::Uuid;

use crate::as_of::ReplayPoint;
use crate::error::ProjectionError;
use crate::store::{EventLocation, Store};

const FETCH_TIMEOUT: Duration = Duration::from_secs(10);

/// One event as the log holds it.
#[derive(Debug, Clone, Serialize)]
pub struct AuditRecord {
    /// Its sequence in the conversation.
    pub sequence: i64,
    /// Its Avro record name.
    pub event_type: &'static str,
    /// Its id.
    pub event_id: EventId,
    /// Its partition.
    pub partition: i32,
    /// Its offset.
    pub offset: i64,
    /// The registry id of the schema it was written with.
    pub schema_id: u32,
    /// When it happened (the envelope's time).
    pub occurred_at: i64,
    /// When the log took it (the record's timestamp).
    pub log_timestamp: Option<i64>,
    /// Its turn.
    pub correlation_id: String,
    /// The event that caused it.
    pub causation_id: Option<EventId>,
    /// Its trace id (from the header, else the envelope).
    pub trace_id: Option<String>,
    /// `name/version` of its writer.
    pub producer: String,
    /// The dead letter a redriven copy comes from (`<dead-letter topic>/<partition>/<offset>`).
    pub redriven_from: Option<String>,
    /// What an answer's prompt carried from the vector store (empty for other events).
    pub retrieved: Vec<RetrievedContext>,
    /// The event itself.
    #[serde(skip)]
    pub event: ConversationEvent,
}

/// How the records were found, and how long it took.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    /// Through the projection's index of positions.
    OffsetIndex,
    /// Scanning the conversation's partition.
    PartitionScan,
}

/// Reads one conversation's records from the log. A record that does not decode is passed
/// by with a log line naming its position, and counted ([`LogReader::undecodable`]).
pub struct LogReader {
    consumer: LogConsumer,
    codec: EventCodec,
    topic: String,
    undecodable: AtomicU64,
}

impl std::fmt::Debug for LogReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogReader").field("topic", &self.topic).finish_non_exhaustive()
    }
}

impl LogReader {
    /// A reader of the events topic (a consumer of its own, assigned, no group).
    pub fn new(kafka: &KafkaSettings, registry_url: &str) -> Result<Self, ProjectionError> {
        let group = format!("parley-replay-{}", Uuid::new_v4().simple());
        // A re-assigned partition's first fetch queues behind the previous long poll: keep
        // that poll short (librdkafka waits 500 ms by default).
        let consumer = reader(reader_config(kafka, &group, true).set("fetch.wait.max.ms", "10"))?;
        Ok(Self {
            consumer,
            codec: EventCodec::new(registry_url)?,
            topic: kafka.topics().events,
            undecodable: AtomicU64::new(0),
        })
    }

    /// How many records this reader passed by because they did not decode.
    pub fn undecodable(&self) -> u64 {
        self.undecodable.load(Ordering::Relaxed)
    }

    /// Decodes a record; None (logged with its position, counted) for one that is not a
    /// conversation event. Only a registry that does not answer is an error.
    async fn decode(&self, message: &OwnedMessage) -> Result<Option<Decoded<ConversationEvent>>, ProjectionError> {
        match self.codec.decode_conversation_event(message.payload().unwrap_or_default()).await {
            Ok(decoded) => Ok(Some(decoded)),
            Err(error) if !error.is_retryable() => {
                warn!(position = %position_of(message), %error, "undecodable record passed by");
                self.undecodable.fetch_add(1, Ordering::Relaxed);
                Ok(None)
            }
            Err(error) => Err(error.into()),
        }
    }

    /// The conversation's records via the index (when it has entries) or a scan.
    pub async fn read(
        &self,
        conversation_id: ConversationId,
        index: &[EventLocation],
        force_scan: bool,
    ) -> Result<(Vec<AuditRecord>, Method, Duration), ProjectionError> {
        let started = Instant::now();
        let (messages, method) = if index.is_empty() || force_scan {
            (self.scan(conversation_id).await?, Method::PartitionScan)
        } else {
            let positions: Vec<LogPosition> = index.iter().map(EventLocation::position).collect();
            (self.fetch(&positions).await?, Method::OffsetIndex)
        };
        let mut records = Vec::with_capacity(messages.len());
        for message in messages {
            records.extend(self.audit_record(&message).await?);
        }
        records.sort_by_key(|r| (r.sequence, r.offset));
        Ok((records, method, started.elapsed()))
    }

    /// The records at `positions` that decode (a redriven copy a dead letter names, say).
    pub async fn records_at(&self, positions: &[LogPosition]) -> Result<Vec<AuditRecord>, ProjectionError> {
        let mut records = Vec::new();
        if !positions.is_empty() {
            for message in self.fetch(positions).await? {
                records.extend(self.audit_record(&message).await?);
            }
        }
        Ok(records)
    }

    /// The conversation's records in one partition before `until_offset` (the records of a
    /// conversation all live in its partition).
    pub async fn read_partition_until(
        &self,
        conversation_id: ConversationId,
        partition: i32,
        until_offset: i64,
    ) -> Result<Vec<AuditRecord>, ProjectionError> {
        let mut assignment = TopicPartitionList::new();
        assignment.add_partition_offset(&self.topic, partition, Offset::Beginning)?;
        self.consumer.assign(&assignment)?;
        let key = conversation_id.to_string();
        let mut records = Vec::new();
        loop {
            match tokio::time::timeout(FETCH_TIMEOUT, self.consumer.recv()).await {
                Ok(Ok(message)) if message.offset() >= until_offset => break,
                Ok(Ok(message)) => {
                    if message.key() == Some(key.as_bytes()) {
                        records.extend(self.audit_record(&message.detach()).await?);
                    }
                }
                Ok(Err(rdkafka::error::KafkaError::PartitionEOF(_))) | Err(_) => break,
                Ok(Err(error)) => return Err(error.into()),
            }
        }
        Ok(records)
    }

    /// Reads the indexed records: per partition, one pass from the conversation's first
    /// indexed offset to its last, keeping exactly the indexed ones. (Re-assigning the
    /// consumer for every record costs a fetch round trip each: far slower.)
    async fn fetch(&self, positions: &[LogPosition]) -> Result<Vec<OwnedMessage>, ProjectionError> {
        let mut by_partition: std::collections::BTreeMap<(&str, i32), Vec<i64>> = std::collections::BTreeMap::new();
        for position in positions {
            by_partition.entry((position.topic.as_str(), position.partition)).or_default().push(position.offset);
        }
        let mut messages = Vec::with_capacity(positions.len());
        for ((topic, partition), mut wanted) in by_partition {
            wanted.sort_unstable();
            wanted.dedup();
            let (first, last) = (wanted[0], wanted[wanted.len() - 1]);
            let mut assignment = TopicPartitionList::new();
            assignment.add_partition_offset(topic, partition, Offset::Offset(first))?;
            self.consumer.assign(&assignment)?;
            let missing = |offset: i64| {
                ProjectionError::Corrupt(format!(
                    "the index names {topic}/{partition}/{offset} but the log has no committed record there"
                ))
            };
            let mut next = 0;
            while next < wanted.len() {
                let message = match tokio::time::timeout(FETCH_TIMEOUT, self.consumer.recv()).await {
                    Ok(Ok(message)) => message,
                    Ok(Err(rdkafka::error::KafkaError::PartitionEOF(_))) => return Err(missing(wanted[next])),
                    Ok(Err(error)) => return Err(error.into()),
                    Err(_) => return Err(missing(wanted[next])),
                };
                if message.offset() > wanted[next] {
                    return Err(missing(wanted[next])); // the indexed record is not (or no longer) there
                }
                if message.offset() == wanted[next] {
                    messages.push(message.detach());
                    next += 1;
                }
                if message.offset() >= last {
                    break;
                }
            }
        }
        Ok(messages)
    }

    /// The conversation's records, read from the start of every partition.
    async fn scan(&self, conversation_id: ConversationId) -> Result<Vec<OwnedMessage>, ProjectionError> {
        let key = conversation_id.to_string();
        let partitions = partitions(&self.consumer, &self.topic)?;
        let mut assignment = TopicPartitionList::new();
        for partition in &partitions {
            assignment.add_partition_offset(&self.topic, *partition, Offset::Beginning)?;
        }
        self.consumer.assign(&assignment)?;
        let mut at_end = std::collections::HashSet::new();
        let mut messages = Vec::new();
        while at_end.len() < partitions.len() {
            match tokio::time::timeout(FETCH_TIMEOUT, self.consumer.recv()).await {
                Ok(Ok(message)) => {
                    if message.key() == Some(key.as_bytes()) {
                        messages.push(message.detach());
                    }
                }
                Ok(Err(rdkafka::error::KafkaError::PartitionEOF(partition))) => {
                    at_end.insert(partition);
                }
                Ok(Err(error)) => return Err(error.into()),
                Err(_) => break, // nothing more arrives: every partition is read
            }
        }
        Ok(messages)
    }

    /// The record as audit shows it; None for one that does not decode (the consumers
    /// dead-letter it: `parley dead-letters`, and audit lists the conversation's letters).
    async fn audit_record(&self, message: &OwnedMessage) -> Result<Option<AuditRecord>, ProjectionError> {
        let Some(decoded) = self.decode(message).await? else { return Ok(None) };
        let envelope = decoded.event.envelope().clone();
        let header_trace = header_traceparent(message).and_then(trace_id).map(str::to_owned);
        let retrieved = match &decoded.event {
            ConversationEvent::ResponseGenerated(answer) => answer.retrieved.clone(),
            _ => vec![],
        };
        Ok(Some(AuditRecord {
            retrieved,
            redriven_from: redriven_from(message).map(str::to_owned),
            sequence: envelope.sequence,
            event_type: decoded.event.type_name(),
            event_id: envelope.event_id,
            partition: message.partition(),
            offset: message.offset(),
            schema_id: decoded.schema_id,
            occurred_at: envelope.occurred_at,
            log_timestamp: message.timestamp().to_millis(),
            correlation_id: envelope.correlation_id,
            causation_id: envelope.causation_id,
            trace_id: header_trace.or_else(|| envelope.traceparent.as_deref().and_then(trace_id).map(str::to_owned)),
            producer: format!("{}/{}", envelope.producer_name, envelope.producer_version),
            event: decoded.event,
        }))
    }
}

/// A conversation replayed from the log.
#[derive(Debug)]
pub struct Replayed {
    /// Its state (at the point asked for); None when the log has none of its history.
    pub state: Option<ConversationState>,
    /// The records folded, opened with the owner's key where it still exists.
    pub records: Vec<AuditRecord>,
    /// How many records the conversation has in all (more than `records` for a point).
    pub total_records: usize,
    /// Its differences from the projection; empty for a point, which the projection no
    /// longer holds.
    pub differences: Vec<String>,
    /// How the records were found.
    pub method: Method,
    /// How long reading them took.
    pub elapsed: Duration,
}

/// How a conversation's records are found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lookup {
    /// Through the live projection's offset index, else a scan of its partition.
    IndexOrScan,
    /// A scan of its partition, whatever the index holds.
    Scan,
    /// Only through the index: a conversation the projection does not know reads as none
    /// (the query API: nobody else's partition is read).
    IndexOnly,
}

/// A conversation's records in sequence order, opened with the owner's key where it still
/// exists, with how they were found and how long that took.
pub async fn conversation_records(
    reader: &LogReader,
    store: &Store,
    conversation_id: ConversationId,
    lookup: Lookup,
) -> Result<(Vec<AuditRecord>, Method, Duration), ProjectionError> {
    let index = match lookup {
        Lookup::Scan => vec![],
        Lookup::IndexOrScan | Lookup::IndexOnly => {
            let (live, _, _) = store.generations(crate::store::CONTEXT).await?;
            store.locations(&store.generation(live).await?, conversation_id).await?
        }
    };
    if index.is_empty() && lookup == Lookup::IndexOnly {
        return Ok((vec![], Method::OffsetIndex, Duration::ZERO));
    }
    let (mut records, method, elapsed) = reader.read(conversation_id, &index, lookup == Lookup::Scan).await?;
    if let Some(keys) = store.keys() {
        keys.open_records(&mut records).await?;
    }
    Ok((records, method, elapsed))
}

/// Replays a conversation: its state rebuilt from the log and its differences from the
/// live projection; with `at`, its state at that point (and no diff, so the projection is
/// not read).
pub async fn replay(
    reader: &LogReader,
    store: &Store,
    conversation_id: ConversationId,
    force_scan: bool,
    at: Option<&ReplayPoint>,
) -> Result<Replayed, ProjectionError> {
    let lookup = if force_scan { Lookup::Scan } else { Lookup::IndexOrScan };
    let (mut records, method, elapsed) = conversation_records(reader, store, conversation_id, lookup).await?;
    let total_records = records.len();
    if let Some(point) = at {
        let kept: std::collections::HashSet<i64> =
            point.history(&records, &reader.topic)?.into_iter().map(|r| r.offset).collect();
        records.retain(|r| kept.contains(&r.offset));
    }
    let state = ConversationState::fold(records.iter().map(|r| &r.event));
    let differences = match at {
        Some(_) => vec![],
        None => crate::diff::differences_from_projection(store, conversation_id, state.as_ref()).await?,
    };
    Ok(Replayed { state, records, total_records, differences, method, elapsed })
}

/// A conversation's state at `at`, through the offset index only (None: the projection
/// does not know it, or it had not started then).
pub async fn state_at(
    reader: &LogReader,
    store: &Store,
    conversation_id: ConversationId,
    at: &ReplayPoint,
) -> Result<Option<ConversationState>, ProjectionError> {
    let (records, _, _) = conversation_records(reader, store, conversation_id, Lookup::IndexOnly).await?;
    if records.is_empty() {
        return Ok(None);
    }
    let history = at.history(&records, &reader.topic)?;
    Ok(ConversationState::fold(history.into_iter().map(|r| &r.event)))
}
