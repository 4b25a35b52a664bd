//! Feeds the rate limiter ([`crate::rate`]) from the log: every instance reads every
//! query and outcome of the events topic, starting one window (a minute) back, so a
//! restarted instance knows what the last minute spent.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use parley_eventlog::consumer::{LogConsumer, next_record, partitions, reader, reader_config};
use parley_eventlog::registry_wait::retry_while_registry_down;
use parley_eventlog::{EventLogError, KafkaSettings, Topics};
use parley_events::event::now_millis as now_ms;
use parley_events::{ConversationEvent, DocumentSubmitted, EventCodec};
use rdkafka::consumer::Consumer;
use rdkafka::{Message, Offset, TopicPartitionList};
use tokio_util::sync::CancellationToken;
use tracing::warn;
use uuid::Uuid;

use crate::rate::RateLimiter;

/// How far back a starting instance reads: the buckets refill fully in a minute.
const WINDOW: Duration = Duration::from_secs(60);

/// A consumer of every partition of the events and documents topics, from one window ago.
pub fn follower(kafka: &KafkaSettings, topics: &Topics) -> Result<LogConsumer, EventLogError> {
    let group = format!("parley-gateway-rate-{}", Uuid::new_v4().simple());
    let consumer = reader(reader_config(kafka, &group, false).set("fetch.wait.max.ms", "10"))?;
    let since = now_ms() - i64::try_from(WINDOW.as_millis()).unwrap_or(0);
    let mut times = TopicPartitionList::new();
    for topic in [&topics.events, &topics.documents] {
        for partition in partitions(&consumer, topic)? {
            times.add_partition_offset(topic, partition, Offset::Offset(since))?;
        }
    }
    // Partitions with nothing that recent answer "end": nothing to read there.
    let positions = consumer.offsets_for_times(times, Duration::from_secs(30))?;
    consumer.assign(&positions)?;
    Ok(consumer)
}

/// Charges every query, outcome and submitted document it reads to the limiter until
/// `shutdown`.
pub async fn run(
    consumer: LogConsumer,
    documents_topic: String,
    codec: Arc<EventCodec>,
    limiter: Arc<Mutex<RateLimiter>>,
    shutdown: CancellationToken,
) {
    let mut rest = tokio::time::interval(WINDOW);
    loop {
        let message = tokio::select! {
            _ = rest.tick() => {
                limiter.lock().unwrap_or_else(PoisonError::into_inner).forget_rested(now_ms());
                continue;
            }
            message = next_record(&consumer, &shutdown, "rate feed") => message,
        };
        let Some(message) = message else { return };
        let payload = message.payload().unwrap_or_default();
        if message.topic() == documents_topic {
            // Deletions share the topic: only submissions are charged.
            if let Ok(decoded) = codec.decode::<DocumentSubmitted>(payload).await {
                let document = decoded.event;
                let mut limiter = limiter.lock().unwrap_or_else(PoisonError::into_inner);
                limiter.observe_document(&document.owner, document.envelope.event_id, document.envelope.occurred_at);
            }
            continue;
        }
        let event = match retry_while_registry_down(&shutdown, || codec.decode_conversation_event(payload)).await {
            Some(Ok(decoded)) => decoded.event,
            Some(Err(error)) => {
                warn!(%error, "rate feed: undecodable conversation event skipped");
                continue;
            }
            None => return,
        };
        // Charged when it happened: a starting instance replays the last minute as it was.
        let at = event.envelope().occurred_at;
        let mut limiter = limiter.lock().unwrap_or_else(PoisonError::into_inner);
        match &event {
            ConversationEvent::QueryReceived(query) => {
                limiter.observe_query(&query.user_id, query.envelope.event_id, at)
            }
            ConversationEvent::ResponseGenerated(answer) if let Some(user) = &answer.user_id => {
                let tokens = i64::from(answer.prompt_tokens) + i64::from(answer.completion_tokens);
                limiter.observe_usage(user, u64::try_from(tokens).unwrap_or(0), at);
            }
            _ => {}
        }
    }
}
