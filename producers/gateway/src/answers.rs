//! Pushes answers to the sockets of this instance. Every gateway instance reads the events
//! and tokens topics itself (all partitions, no consumer group offsets), and keeps only what
//! its own sockets wait for: any instance can hold any conversation. It reads the events
//! topic from where the projection stands, and keeps what the projection has not applied
//! yet in [`Recent`], so adopting a conversation never waits for the read model.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use parley_eventlog::consumer::{
    LogConsumer, Read, next_read, partitions, position_in, position_of, reader, reader_config,
};
use parley_eventlog::registry_wait::retry_while_registry_down;
use parley_eventlog::trace::continue_trace;
use parley_eventlog::{EventLogError, KafkaSettings, LogPosition, Topics};
use parley_events::ConversationId;
use parley_events::sealing::delta_field;
use parley_events::{ConversationEvent, EventCodec, LLMTokenDelta, UserQueryReceived};
use parley_projections::keys::KeyStore;
use rdkafka::consumer::Consumer;
use rdkafka::{Message, Offset, TopicPartitionList};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, Span, debug, info, info_span, warn};
use uuid::Uuid;

use crate::hub::{Hub, Outbox};
use crate::protocol::ServerFrame;
use crate::recent::{Fact, Recent};

/// How long a metadata or watermark query may take while the listener starts.
const START_QUERY_WAIT: Duration = Duration::from_secs(30);

/// A consumer of the tokens topic from its end and of the events topic from where the
/// projection stands (`applied`: per partition, the next offset it will apply), at most
/// `recent`'s cap of records back from the end; returns it and the number of partitions of
/// the events topic. `recent` starts each partition's window where reading starts.
pub fn listener(
    kafka: &KafkaSettings,
    topics: &Topics,
    applied: &[(i32, i64)],
    recent: &Recent,
    cap: usize,
) -> Result<(LogConsumer, i32), EventLogError> {
    let group = format!("parley-gateway-{}", Uuid::new_v4().simple());
    let consumer = reader(
        reader_config(kafka, &group, true)
            .set("fetch.wait.max.ms", "10")
            // A start that retention deleted meanwhile reads from the oldest record kept.
            .set("auto.offset.reset", "earliest"),
    )?;
    let mut assignment = TopicPartitionList::new();
    for partition in partitions(&consumer, &topics.tokens)? {
        assignment.add_partition_offset(&topics.tokens, partition, Offset::End)?;
    }
    let event_partitions = partitions(&consumer, &topics.events)?;
    let mut window = recent.lock();
    let mut behind = 0;
    for &partition in &event_partitions {
        let (low, high) = consumer.fetch_watermarks(&topics.events, partition, START_QUERY_WAIT)?;
        let projected = applied.iter().find(|(p, _)| *p == partition).map_or(0, |(_, next)| *next);
        let start = projected.max(low).max(high - i64::try_from(cap).unwrap_or(i64::MAX));
        behind += high - start;
        window.start(partition, start);
        assignment.add_partition_offset(&topics.events, partition, Offset::Offset(start))?;
    }
    drop(window);
    consumer.assign(&assignment)?;
    info!(records = behind, "the gateway reads the events the projection has not applied yet");
    Ok((consumer, i32::try_from(event_partitions.len()).unwrap_or(i32::MAX)))
}

/// Routes questions asked elsewhere, token deltas and outcomes to subscribed sockets
/// until `shutdown`.
pub async fn run(
    consumer: LogConsumer,
    topics: Topics,
    codec: Arc<EventCodec>,
    hub: Arc<Hub>,
    recent: Arc<Recent>,
    keys: Option<KeyStore>,
    shutdown: CancellationToken,
) {
    while let Some(read) = next_read(&consumer, &shutdown, "answer listener").await {
        let message = match read {
            Read::Record(message) => message,
            Read::End(partition) => {
                reached_end(&consumer, &topics.events, partition, &recent);
                continue;
            }
        };
        let conversation_id =
            message.key().and_then(|k| std::str::from_utf8(k).ok()).and_then(|k| k.parse::<ConversationId>().ok());
        let payload = message.payload().unwrap_or_default();
        let position = position_of(&message);
        if message.topic() == topics.tokens {
            // Cheap filter first: most deltas belong to conversations held elsewhere.
            if let Some(conversation_id) = conversation_id.filter(|id| hub.holds(id)) {
                push_token(&codec, &hub, keys.as_ref(), conversation_id, payload, position).await;
            }
            continue;
        }
        // Every event is decoded: what the projection has not applied yet is kept for adoptions.
        let mut pushing = Span::none();
        let decoded = match retry_while_registry_down(&shutdown, || codec.decode_conversation_event(payload)).await {
            Some(Ok(mut decoded)) => {
                // An outcome for a socket here: opened, applied and sent within the turn's
                // trace (its start, less the transaction's end, is the answer's way back).
                if conversation_id.is_some_and(|id| hub.holds(&id))
                    && !matches!(decoded.event, ConversationEvent::QueryReceived(_))
                {
                    pushing = info_span!("gateway.outcome", %position);
                    continue_trace(&pushing, decoded.event.envelope().traceparent.as_deref());
                }
                // Frames carry what people wrote, opened: only for the conversations held
                // here (the recent window keeps no text, and a key read per person of
                // every conversation would hold up the listener).
                if let Some(keys) = &keys
                    && conversation_id.is_some_and(|id| hub.holds(&id))
                    && !keys.open_event_waiting(&mut decoded.event, &shutdown).instrument(pushing.clone()).await
                {
                    return;
                }
                Some(decoded.event)
            }
            // The inference consumer dead-letters poison records; the gateway only reads.
            Some(Err(error)) => {
                warn!(%position, %error, "undecodable conversation event skipped by the gateway");
                None
            }
            None => return, // shut down while waiting
        };
        let _pushing = pushing.enter();
        let fact = decoded.as_ref().and_then(Fact::of);
        let subscribers = {
            let mut window = recent.lock();
            window.record(position.partition, position.offset, conversation_id, fact);
            decoded.as_ref().filter(|_| conversation_id.is_some_and(|id| hub.holds(&id))).map(|event| {
                let frame = match event {
                    ConversationEvent::QueryReceived(query) => Some(question_frame(query)),
                    event => outcome_frame(event),
                };
                (hub.apply(event, position.partition, position.offset, frame.clone()), frame)
            })
        };
        recent.advanced();
        if let Some((subscribers, Some(frame))) = subscribers {
            send_all(subscribers, &frame);
        }
    }
}

/// The listener read `partition` of the events topic to its end: its position, past the
/// transaction markers that may follow the last record, is what it has read.
fn reached_end(consumer: &LogConsumer, events: &str, partition: i32, recent: &Recent) {
    if let Ok(Some(position)) = position_in(consumer, events, partition) {
        recent.lock().reached(partition, position);
        recent.advanced();
    }
}

/// Sends a token delta to the sockets that follow its answer.
async fn push_token(
    codec: &EventCodec,
    hub: &Hub,
    keys: Option<&KeyStore>,
    conversation_id: ConversationId,
    payload: &[u8],
    position: LogPosition,
) {
    match codec.decode::<LLMTokenDelta>(payload).await {
        Ok(decoded) => {
            let token = decoded.event;
            let Some(text) = delta_text(keys, &token).await else { return };
            // Pairs with the inference's `inference.first_token`: the first delta's hop.
            let span = if token.index == 0 {
                let span = info_span!("gateway.first_token");
                continue_trace(&span, token.traceparent.as_deref());
                span
            } else {
                Span::none()
            };
            let _pushing = span.enter();
            let subscribers = hub.token_subscribers(&conversation_id, token.query_event_id);
            let frame = ServerFrame::Token {
                conversation_id: token.conversation_id.to_string(),
                query_event_id: token.query_event_id.to_string(),
                index: token.index,
                delta: text,
                attempt: token.attempt,
                position: Some(position.to_string()),
            };
            send_all(subscribers, &frame);
        }
        Err(error) => warn!(%position, %error, "undecodable token delta skipped"),
    }
}

/// A delta's text: as written, or opened with its owner's data key. None when it does not
/// open (its owner was erased, or this gateway has no master key): a delta is a preview,
/// and the answer itself follows.
pub(crate) async fn delta_text(keys: Option<&KeyStore>, delta: &LLMTokenDelta) -> Option<String> {
    if delta.sealed_for.is_empty() {
        return Some(delta.delta.clone());
    }
    let Some(keys) = keys else {
        // Inference seals but this gateway was given no master key: say so once, not per delta.
        static WARNED: AtomicBool = AtomicBool::new(false);
        if !WARNED.swap(true, Ordering::Relaxed) {
            warn!("token deltas arrive sealed but this gateway has no master key: answers arrive without streaming");
        }
        return None;
    };
    let field = delta_field(delta.attempt, delta.index);
    match keys.open_sealed(&delta.sealed_for, &delta.query_event_id, &field, &delta.delta).await {
        Ok(text) => text,
        Err(error) => {
            warn!(%error, "a sealed token delta could not be opened; skipped");
            None
        }
    }
}

/// What the other sockets of a conversation show of a question.
pub fn question_frame(query: &UserQueryReceived) -> ServerFrame {
    ServerFrame::Question {
        conversation_id: query.envelope.conversation_id.to_string(),
        event_id: query.envelope.event_id.to_string(),
        sequence: query.envelope.sequence,
        client_message_id: query.client_message_id.clone(),
        text: query.text.clone(),
    }
}

/// The frame a socket gets for an event, if the event ends a turn.
pub fn outcome_frame(event: &ConversationEvent) -> Option<ServerFrame> {
    match event {
        ConversationEvent::ResponseGenerated(e) => Some(ServerFrame::Answer {
            conversation_id: e.envelope.conversation_id.to_string(),
            query_event_id: e.query_event_id.to_string(),
            event_id: e.envelope.event_id.to_string(),
            sequence: e.envelope.sequence,
            text: e.text.clone(),
            model: e.model.clone(),
            finish_reason: e.finish_reason.clone(),
            prompt_tokens: e.prompt_tokens,
            completion_tokens: e.completion_tokens,
            llm_latency_ms: e.llm_latency_ms,
            time_to_first_token_ms: e.time_to_first_token_ms,
            retrieved: e.retrieved.clone(),
            cached_from: e.cached_from.clone(),
        }),
        ConversationEvent::ResponseFailed(e) => Some(ServerFrame::Failed {
            conversation_id: e.envelope.conversation_id.to_string(),
            query_event_id: e.query_event_id.to_string(),
            event_id: e.envelope.event_id.to_string(),
            error_kind: e.error_kind.clone(),
            message: e.error_message.clone(),
        }),
        ConversationEvent::Started(_) | ConversationEvent::QueryReceived(_) | ConversationEvent::CancelRequested(_) => {
            None
        }
    }
}

fn send_all(outboxes: Vec<Outbox>, frame: &ServerFrame) {
    for outbox in outboxes {
        if outbox.try_send(frame.clone()).is_err() {
            debug!("socket outbox full or closed; frame not queued");
        }
    }
}
