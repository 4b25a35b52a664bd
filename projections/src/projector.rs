//! The context projection: folds `conversation-events` (read_committed) into one
//! generation of the CQL store. Used live (`parley projection`, follows the log forever)
//! and by rebuild (a new generation from offset 0 until caught up).
//!
//! Idempotency and progress: every write is an upsert keyed by (conversation, sequence),
//! and a conversation's `last_sequence` guards its derived fields, so applying an event
//! twice changes nothing. Progress (next offset per partition) lives in the same store,
//! written after the batch's state: a crash in between re-applies part of a batch
//! (harmless), never skips one. Kafka group offsets are not used for positioning.

use std::collections::HashMap;
use std::sync::LazyLock;
use std::time::Duration;

use futures::StreamExt;
use parley_eventlog::KafkaSettings;
use parley_eventlog::consumer::{LogConsumer, is_fatal, partitions, position_in, position_of, reader, reader_config};
use parley_eventlog::dead_letter::redriven_from;
use parley_eventlog::metrics::{NO_LABELS, gauge, histogram};
use parley_eventlog::registry_wait::retry_while_registry_down;
use parley_eventlog::trace::continue_trace;
use parley_events::conversation::{Message as ConversationMessage, MessageKind, message_of};
use parley_events::event::now_millis;
use parley_events::sealing::{ERASED, is_sealed};
use parley_events::turn::{Applied, ConversationHead};
use parley_events::{ConversationEvent, ConversationId, EventCodec, UserId};
use prometheus::{Gauge, Histogram};
use rdkafka::consumer::Consumer;
use rdkafka::error::KafkaError;
use rdkafka::message::OwnedMessage;
use rdkafka::{Message, Offset, TopicPartitionList};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, info, info_span, warn};

use crate::error::ProjectionError;
use crate::keys::TITLE;
use crate::store::{CONTEXT, CachedAnswerRow, EventLocation, Generation, Store};

/// Longest title kept for a conversation (its first question, shortened).
const TITLE_CHARS: usize = 80;
/// Records applied per batch at most.
const MAX_BATCH: usize = 500;
/// Conversations written concurrently within a batch.
const WRITE_CONCURRENCY: usize = 32;
/// Heads kept in memory; past this the cache starts over (heads reload from the store).
const MAX_CACHED_HEADS: usize = 100_000;

/// What the projector knows of a conversation between events.
#[derive(Debug, Clone)]
struct Known {
    head: ConversationHead,
    started_at: i64,
}

/// Folds events into one generation.
#[derive(Debug)]
pub struct Projector {
    store: Store,
    generation: Generation,
    topic: String,
    known: HashMap<ConversationId, Known>,
    /// Whether every conversation the generation holds is in `known` (a rebuild into a new,
    /// empty generation, until the cache first starts over): then one not there is new,
    /// and is not looked up in the store.
    knows_every_head: bool,
}

/// A decoded record with its log coordinates.
#[derive(Debug, Clone)]
pub struct LoggedEvent {
    /// The event.
    pub event: ConversationEvent,
    /// Its partition.
    pub partition: i32,
    /// Its offset.
    pub offset: i64,
    /// A copy an operator redrove from a dead letter (`parley-redriven-from`).
    pub redriven: bool,
}

impl Projector {
    /// A projector writing into `generation_number` from `topic`.
    pub async fn new(store: Store, generation_number: i32, topic: &str) -> Result<Self, ProjectionError> {
        let generation = store.generation(generation_number).await?;
        Ok(Self { store, generation, topic: topic.to_owned(), known: HashMap::new(), knows_every_head: false })
    }

    /// A projector filling a new, empty generation (a rebuild): it knows every head it
    /// wrote, so it reads none back while its cache holds them all.
    pub async fn for_new_generation(
        store: Store,
        generation_number: i32,
        topic: &str,
    ) -> Result<Self, ProjectionError> {
        Ok(Self { knows_every_head: true, ..Self::new(store, generation_number, topic).await? })
    }

    /// The generation it writes.
    pub fn generation(&self) -> i32 {
        self.generation.number
    }

    /// A consumer assigned every partition of the topic at this generation's progress.
    pub async fn consumer(&self, kafka: &KafkaSettings, eof_events: bool) -> Result<LogConsumer, ProjectionError> {
        let group = format!("parley-projection-context-g{}", self.generation.number);
        let consumer = reader(reader_config(kafka, &group, eof_events).set("fetch.wait.max.ms", "50"))?;
        let progress: HashMap<i32, i64> =
            self.store.progress(&self.generation, &self.topic).await?.into_iter().collect();
        let mut assignment = TopicPartitionList::new();
        for partition in partitions(&consumer, &self.topic)? {
            let offset = progress.get(&partition).map_or(Offset::Beginning, |o| Offset::Offset(*o));
            assignment.add_partition_offset(&self.topic, partition, offset)?;
        }
        consumer.assign(&assignment)?;
        Ok(consumer)
    }

    /// Applies a batch (in log order) and then records progress.
    pub async fn apply_batch(&mut self, batch: Vec<LoggedEvent>) -> Result<(), ProjectionError> {
        if self.known.len() > MAX_CACHED_HEADS {
            self.known.clear();
            self.knows_every_head = false;
        }
        let mut next_offsets: HashMap<i32, i64> = HashMap::new();
        let written: Vec<i64> = batch.iter().map(|logged| logged.event.envelope().occurred_at).collect();
        let mut by_conversation: Vec<(ConversationId, Vec<LoggedEvent>)> = Vec::new();
        let mut index: HashMap<ConversationId, usize> = HashMap::new();
        for logged in batch {
            let next = next_offsets.entry(logged.partition).or_insert(0);
            *next = (*next).max(logged.offset + 1);
            let id = logged.event.envelope().conversation_id;
            let slot = *index.entry(id).or_insert_with(|| {
                by_conversation.push((id, Vec::new()));
                by_conversation.len() - 1
            });
            by_conversation[slot].1.push(logged);
        }
        let work = by_conversation.into_iter().map(|(id, events)| {
            let known = self.known.remove(&id);
            let look_up = known.is_none() && !self.knows_every_head;
            let (store, generation, topic) = (&self.store, &self.generation, self.topic.as_str());
            async move {
                let known = apply_conversation(store, generation, topic, id, known, look_up, &events).await?;
                Ok::<_, ProjectionError>((id, known))
            }
        });
        let results: Vec<_> = futures::stream::iter(work).buffer_unordered(WRITE_CONCURRENCY).collect().await;
        for result in results {
            if let (id, Some(known)) = result? {
                self.known.insert(id, known);
            }
        }
        for (partition, next) in next_offsets {
            self.store.store_progress(&self.generation, &self.topic, partition, next).await?;
        }
        let now = now_millis();
        for occurred_at in &written {
            PROJECTION_DELAY.observe(seconds_since(*occurred_at, now));
        }
        if let Some(newest) = written.iter().max() {
            PROJECTION_LAG.set(seconds_since(*newest, now));
        }
        Ok(())
    }

    /// Records that the consumer read `partition` to its end: progress moves to the
    /// consumer's position, which is past the transaction markers that follow the last
    /// record (a reader waiting for "everything up to the partition's end" needs that).
    pub async fn reached_end(&self, consumer: &LogConsumer, partition: i32) -> Result<(), ProjectionError> {
        if let Some(end) = position_in(consumer, &self.topic, partition)? {
            self.store.store_progress(&self.generation, &self.topic, partition, end).await?;
        }
        Ok(())
    }
}

/// How long after an event happened the projection had it (a reader after an answer waits
/// about this long for the store to show it).
static PROJECTION_DELAY: LazyLock<Histogram> = LazyLock::new(|| {
    const BUCKETS: &[f64] = &[0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0];
    let family = histogram(
        "parley_projection_delay_seconds",
        "Time from an event to the projection having applied it",
        &[],
        BUCKETS,
    );
    family.with_label_values(NO_LABELS)
});

/// The delay of the newest event the projection applied, as of its last batch.
static PROJECTION_LAG: LazyLock<Gauge> = LazyLock::new(|| {
    gauge(
        "parley_projection_lag_seconds",
        "Time from the newest event of the last batch applied to its application",
        &[],
    )
    .with_label_values(NO_LABELS)
});

fn seconds_since(millis: i64, now: i64) -> f64 {
    (now - millis).max(0) as f64 / 1000.0
}

/// What a batch's events of one conversation write, gathered so each table gets one write
/// (one unlogged batch of the conversation's partition) instead of one per event.
#[derive(Debug, Default)]
struct Writes {
    locations: Vec<EventLocation>,
    messages: Vec<ConversationMessage>,
    cached_answers: Vec<CachedAnswerRow>,
    /// When the conversation started, if it started in this batch: its row is written
    /// whole, once, after its messages.
    started_at: Option<i64>,
    /// Its title, if its first question is in this batch.
    title: Option<String>,
    /// When the last event that moved the head happened; None: the head did not move.
    head_moved_at: Option<i64>,
}

/// Applies one conversation's events of a batch, in order: its rows first, then its head,
/// so a crash in between leaves a head that re-applies the rest (never one past rows that
/// were not written).
async fn apply_conversation(
    store: &Store,
    generation: &Generation,
    topic: &str,
    id: ConversationId,
    mut known: Option<Known>,
    look_up: bool,
    events: &[LoggedEvent],
) -> Result<Option<Known>, ProjectionError> {
    if look_up {
        known =
            store.conversation(generation, id).await?.map(|row| Known { head: row.head(), started_at: row.started_at });
    }
    let mut writes = Writes::default();
    for logged in events {
        let envelope = logged.event.envelope();
        let span = info_span!(parent: None, "projection.apply", conversation_id = %id, sequence = envelope.sequence,
                              kind = logged.event.type_name(), offset = logged.offset);
        continue_trace(&span, envelope.traceparent.as_deref());
        apply_event(store, topic, id, &mut known, logged, &mut writes).instrument(span).await?;
    }
    let write = info_span!("projection.write", conversation_id = %id, locations = writes.locations.len(),
                           messages = writes.messages.len());
    async {
        let owner = known.as_ref().map(|k| k.head.owner.clone());
        let cached = writes.cached_answers.iter().filter_map(|entry| {
            let owner = owner.as_ref()?;
            Some(store.insert_cached_answer(generation, owner, entry))
        });
        let (locations, messages, cached) = futures::join!(
            Box::pin(store.insert_locations(generation, id, &writes.locations)),
            Box::pin(store.insert_messages(generation, id, &writes.messages)),
            futures::future::try_join_all(cached.map(Box::pin)),
        );
        locations?;
        messages?;
        cached?;
        let Some(k) = &known else { return Ok(()) };
        let title = writes.title.as_deref();
        match (writes.started_at, writes.head_moved_at) {
            (Some(started_at), moved_at) => {
                let updated_at = moved_at.unwrap_or(started_at);
                store.insert_conversation(generation, id, &k.head, started_at, updated_at, title.unwrap_or("")).await?;
            }
            (None, Some(updated_at)) => {
                if let Some(title) = title {
                    store.set_title(generation, id, &k.head.owner, k.started_at, title).await?;
                }
                store.advance_conversation(generation, id, &k.head, updated_at).await?;
            }
            (None, None) => {}
        }
        Ok::<_, ProjectionError>(())
    }
    .instrument(write)
    .await?;
    Ok(known)
}

/// Applies one event to what the conversation's batch writes: its location (unless it is a
/// redriven copy of an event applied already: the index keeps the original, and audit finds
/// the copy through its letter), and its effect on the conversation unless the conversation
/// has it already.
async fn apply_event(
    store: &Store,
    topic: &str,
    id: ConversationId,
    known: &mut Option<Known>,
    logged: &LoggedEvent,
    writes: &mut Writes,
) -> Result<(), ProjectionError> {
    let envelope = logged.event.envelope();
    let location = EventLocation {
        sequence: envelope.sequence,
        event_id: envelope.event_id,
        event_type: logged.event.type_name().to_owned(),
        topic: topic.to_owned(),
        partition: logged.partition,
        offset: logged.offset,
    };
    let copy_of_applied = logged.redriven && known.as_ref().is_some_and(|k| envelope.sequence <= k.head.last_sequence);
    if !copy_of_applied {
        writes.locations.push(location);
    }
    match (known, &logged.event) {
        (known @ None, ConversationEvent::Started(started)) => {
            writes.started_at = Some(envelope.occurred_at);
            *known = Some(Known {
                head: ConversationHead::started(started.user_id.clone()),
                started_at: envelope.occurred_at,
            });
        }
        (None, event) => {
            warn!(%id, sequence = envelope.sequence, kind = event.type_name(), "event before the conversation's start; not projected");
        }
        (Some(k), event) => {
            let applied = k.head.apply_over_gaps(event);
            if applied == Applied::AlreadyApplied {
                return Ok(());
            }
            if let Applied::Gap { expected, got } = applied {
                warn!(%id, expected, got, "sequence gap: an event of this conversation is missing from the log");
            }
            if let Some(message) = message_of(event) {
                if message.kind == MessageKind::UserQuery
                    && message.sequence == parley_events::turn::STARTED_SEQUENCE + 1
                {
                    writes.title = Some(title_of(store, &k.head.owner, id, &message).await?);
                }
                writes.messages.push(message);
            }
            if let ConversationEvent::ResponseGenerated(answer) = event
                && let Some(entry) = CachedAnswerRow::of(answer)
            {
                writes.cached_answers.push(entry);
            }
            writes.head_moved_at = Some(envelope.occurred_at);
        }
    }
    Ok(())
}

/// A conversation's title: the start of its first question, sealed again (bound to the
/// conversation) when the question was sealed. Without the keys to open it, no title: the
/// projection never holds a person's text in clear that the log held sealed.
async fn title_of(
    store: &Store,
    owner: &UserId,
    id: ConversationId,
    question: &ConversationMessage,
) -> Result<String, ProjectionError> {
    if !is_sealed(&question.text) {
        return Ok(question.text.chars().take(TITLE_CHARS).collect());
    }
    let Some(keys) = store.keys() else { return Ok(String::new()) };
    let mut text = question.text.clone();
    keys.open_text(owner, &question.event_id, "text", &mut text).await?;
    if text == ERASED {
        return Ok(text);
    }
    let title: String = text.chars().take(TITLE_CHARS).collect();
    match keys.seal_text(owner, &id, TITLE, &title).await {
        Err(ProjectionError::Erased(_)) => Ok(ERASED.to_owned()),
        sealed => sealed,
    }
}

/// Decodes a fetched record; None for records that are not conversation events (they are
/// logged: the inference consumer dead-letters them).
pub async fn decode(
    codec: &EventCodec,
    message: &OwnedMessage,
    shutdown: &CancellationToken,
) -> Option<Option<LoggedEvent>> {
    let payload = message.payload().unwrap_or_default();
    match retry_while_registry_down(shutdown, || codec.decode_conversation_event(payload)).await? {
        Ok(decoded) => Some(Some(LoggedEvent {
            event: decoded.event,
            partition: message.partition(),
            offset: message.offset(),
            redriven: redriven_from(message).is_some(),
        })),
        Err(error) => {
            warn!(position = %position_of(message), %error, "undecodable record not projected");
            Some(None)
        }
    }
}

/// Follows the log into the live generation until `shutdown`; switches to a new live
/// generation when a rebuild promotes one.
pub async fn run(
    kafka: &KafkaSettings,
    registry_url: &str,
    store: Store,
    shutdown: CancellationToken,
) -> Result<(), ProjectionError> {
    let codec = EventCodec::new(registry_url)?;
    let topic = kafka.topics().events;
    'generations: loop {
        let (live, _, _) = store.generations(CONTEXT).await?;
        let mut projector = Projector::new(store.clone(), live, &topic).await?;
        let consumer = projector.consumer(kafka, true).await?;
        info!(generation = live, %topic, "context projection following the log");
        let mut generation_check = tokio::time::interval(Duration::from_secs(1));
        loop {
            let first = tokio::select! {
                () = shutdown.cancelled() => return Ok(()),
                _ = generation_check.tick() => {
                    if store.generations(CONTEXT).await?.0 != live {
                        info!(from = live, "live generation changed; switching");
                        continue 'generations;
                    }
                    continue;
                }
                received = consumer.recv() => match received {
                    Ok(message) => message.detach(),
                    Err(KafkaError::PartitionEOF(partition)) => {
                        projector.reached_end(&consumer, partition).await?;
                        continue;
                    }
                    Err(error) if is_fatal(&error) => return Err(error.into()),
                    Err(error) => { warn!(%error, "projection consumer error"); continue; }
                },
            };
            let mut batch = Vec::new();
            let mut at_end = Vec::new();
            let mut pending = Some(first);
            while let Some(message) = pending.take() {
                match decode(&codec, &message, &shutdown).await {
                    None => return Ok(()),
                    Some(logged) => batch.extend(logged),
                }
                if batch.len() < MAX_BATCH {
                    pending = match tokio::time::timeout(Duration::ZERO, consumer.recv()).await {
                        Ok(Ok(next)) => Some(next.detach()),
                        Ok(Err(KafkaError::PartitionEOF(partition))) => {
                            at_end.push(partition);
                            None
                        }
                        Ok(Err(error)) => tolerate(error),
                        Err(_) => None,
                    };
                }
            }
            projector.apply_batch(batch).await?;
            for partition in at_end {
                projector.reached_end(&consumer, partition).await?;
            }
        }
    }
}

fn tolerate(error: KafkaError) -> Option<OwnedMessage> {
    warn!(%error, "projection consumer error");
    None
}
