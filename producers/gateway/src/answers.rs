//! Pushes answers to the sockets of this instance. Every gateway instance reads the events
//! and tokens topics itself (all partitions, from the end, no consumer group offsets), and
//! keeps only what its own sockets wait for: any instance can hold any conversation.

use std::sync::Arc;

use parley_eventlog::consumer::{LogConsumer, next_record, tail};
use parley_eventlog::registry_wait::retry_while_registry_down;
use parley_eventlog::trace::continue_trace;
use parley_eventlog::{EventLogError, KafkaSettings, LogPosition, Topics};
use parley_events::{ConversationEvent, EventCodec, LLMTokenDelta, UserQueryReceived};
use rdkafka::Message;
use rdkafka::consumer::Consumer;
use tokio_util::sync::CancellationToken;
use tracing::{Span, debug, info_span, warn};
use uuid::Uuid;

use crate::hub::{Hub, Outbox};
use crate::protocol::ServerFrame;

/// A consumer positioned at the end of the events and tokens topics, and the number of
/// partitions of the events topic.
pub fn listener(kafka: &KafkaSettings, topics: &Topics) -> Result<(LogConsumer, i32), EventLogError> {
    let consumer = tail(kafka, "parley-gateway", &[&topics.events, &topics.tokens])?;
    let event_partitions = consumer.assignment()?.elements_for_topic(&topics.events).len();
    Ok((consumer, i32::try_from(event_partitions).unwrap_or(i32::MAX)))
}

/// Routes questions asked elsewhere, token deltas and outcomes to subscribed sockets
/// until `shutdown`.
pub async fn run(
    consumer: LogConsumer,
    topics: Topics,
    codec: Arc<EventCodec>,
    hub: Arc<Hub>,
    shutdown: CancellationToken,
) {
    // A dead client stops the gateway rather than serve sockets that would never get an answer.
    while let Some(message) = next_record(&consumer, &shutdown, "answer listener").await {
        // Cheap filter first: most records belong to conversations held elsewhere.
        let Some(conversation_id) =
            message.key().and_then(|k| std::str::from_utf8(k).ok()).and_then(|k| k.parse::<Uuid>().ok())
        else {
            continue;
        };
        if !hub.holds(&conversation_id) {
            continue;
        }
        let payload = message.payload().unwrap_or_default();
        let coordinates = (message.topic().to_owned(), message.partition(), message.offset());
        if message.topic() == topics.tokens {
            match codec.decode::<LLMTokenDelta>(payload).await {
                Ok(decoded) => {
                    let token = decoded.event;
                    // Pairs with the inference's `inference.first_token`: the first delta's hop.
                    let span = if token.index == 0 {
                        let span = info_span!("gateway.first_token");
                        continue_trace(&span, token.traceparent.as_deref());
                        span
                    } else {
                        Span::none()
                    };
                    let _pushing = span.enter();
                    let subscribers = hub.token_subscribers(&conversation_id, &token.query_event_id);
                    let frame = ServerFrame::Token {
                        conversation_id: token.conversation_id,
                        query_event_id: token.query_event_id,
                        index: token.index,
                        delta: token.delta,
                        attempt: token.attempt,
                        position: Some(
                            LogPosition {
                                topic: coordinates.0.clone(),
                                partition: coordinates.1,
                                offset: coordinates.2,
                            }
                            .to_string(),
                        ),
                    };
                    send_all(subscribers, &frame);
                }
                Err(error) => warn!(?coordinates, %error, "undecodable token delta skipped"),
            }
            continue;
        }
        match retry_while_registry_down(&shutdown, || codec.decode_conversation_event(payload)).await {
            Some(Ok(decoded)) => {
                let frame = match &decoded.event {
                    ConversationEvent::QueryReceived(query) => Some(question_frame(query)),
                    event => outcome_frame(event),
                };
                let subscribers = hub.apply(&decoded.event, message.partition(), message.offset(), frame.clone());
                if let Some(frame) = frame {
                    send_all(subscribers, &frame);
                }
            }
            // The inference consumer dead-letters poison records; the gateway only reads.
            Some(Err(error)) => {
                warn!(?coordinates, %error, "undecodable conversation event skipped by the gateway")
            }
            None => return, // shut down while waiting
        }
    }
}

/// What the other sockets of a conversation show of a question.
pub fn question_frame(query: &UserQueryReceived) -> ServerFrame {
    ServerFrame::Question {
        conversation_id: query.envelope.conversation_id.clone(),
        event_id: query.envelope.event_id.clone(),
        sequence: query.envelope.sequence,
        client_message_id: query.client_message_id.clone(),
        text: query.text.clone(),
    }
}

/// The frame a socket gets for an event, if the event ends a turn.
pub fn outcome_frame(event: &ConversationEvent) -> Option<ServerFrame> {
    match event {
        ConversationEvent::ResponseGenerated(e) => Some(ServerFrame::Answer {
            conversation_id: e.envelope.conversation_id.clone(),
            query_event_id: e.query_event_id.clone(),
            event_id: e.envelope.event_id.clone(),
            sequence: e.envelope.sequence,
            text: e.text.clone(),
            model: e.model.clone(),
            finish_reason: e.finish_reason.clone(),
            prompt_tokens: e.prompt_tokens,
            completion_tokens: e.completion_tokens,
            llm_latency_ms: e.llm_latency_ms,
            time_to_first_token_ms: e.time_to_first_token_ms,
            retrieved: e.retrieved.clone(),
        }),
        ConversationEvent::ResponseFailed(e) => Some(ServerFrame::Failed {
            conversation_id: e.envelope.conversation_id.clone(),
            query_event_id: e.query_event_id.clone(),
            event_id: e.envelope.event_id.clone(),
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
