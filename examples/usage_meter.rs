//! A new consumer, start to finish: token usage per user and model, for billing.
//!
//! It subscribes to `conversation-events` in its own consumer group, decodes every record
//! through the schema registry (old and new versions of an event alike), folds the events
//! into its own view and stores each record's offset only after the record is applied.
//! docs/consumers.md walks through it. Run it beside the stack (`infra/up.sh`):
//!
//! ```text
//! cargo run --example usage_meter -- --group usage-meter --exit-when-idle 5s
//! ```

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Parser;
use parley_eventlog::KafkaSettings;
use parley_eventlog::settings::parse_duration;
use parley_events::{ConversationEvent, EventCodec};
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::types::RDKafkaErrorCode;
use serde::Serialize;

#[derive(Debug, Parser)]
pub struct Args {
    #[command(flatten)]
    kafka: KafkaSettings,
    #[arg(long, env = "PARLEY_SCHEMA_REGISTRY_URL", default_value = "http://127.0.0.1:18081/apis/ccompat/v7")]
    schema_registry_url: String,
    /// The consumer group: a new group starts from the first event in the log.
    #[arg(long, default_value = "usage-meter")]
    group: String,
    /// Print the totals and exit after this long without a new record (none: run forever).
    #[arg(long, value_parser = parse_duration)]
    exit_when_idle: Option<Duration>,
}

/// One user's use of one model.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize)]
struct Usage {
    answers: u64,
    prompt_tokens: i64,
    completion_tokens: i64,
}

/// The consumer's own view: pure, so it is tested without Kafka.
#[derive(Debug, Default)]
struct UsageMeter {
    /// Conversation → (owner, last applied sequence). Events of a conversation arrive in
    /// order (one partition), so a sequence not above the last one is a redelivery.
    conversations: HashMap<String, (String, i64)>,
    /// (user, model) → usage.
    totals: BTreeMap<(String, String), Usage>,
}

impl UsageMeter {
    fn apply(&mut self, event: &ConversationEvent) {
        let envelope = event.envelope();
        let entry = self.conversations.entry(envelope.conversation_id.clone()).or_default();
        if envelope.sequence <= entry.1 {
            return; // at-least-once delivery: seen already
        }
        entry.1 = envelope.sequence;
        match event {
            ConversationEvent::Started(started) => entry.0.clone_from(&started.user_id),
            ConversationEvent::ResponseGenerated(answer) => {
                // v1 answers carry no user id; the conversation's owner is the user.
                let user = if answer.user_id.is_empty() { entry.0.clone() } else { answer.user_id.clone() };
                let usage = self.totals.entry((user, answer.model.clone())).or_default();
                usage.answers += 1;
                usage.prompt_tokens += i64::from(answer.prompt_tokens);
                usage.completion_tokens += i64::from(answer.completion_tokens);
            }
            _ => {}
        }
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    for line in meter(&Args::parse()).await? {
        println!("{line}");
    }
    Ok(())
}

/// Consumes until idle (or forever) and returns the totals, one JSON object per user and model.
pub async fn meter(args: &Args) -> Result<Vec<serde_json::Value>> {
    let codec = EventCodec::new(&args.schema_registry_url)?;
    let topic = args.kafka.topics().events;
    let consumer: StreamConsumer = args
        .kafka
        .client_config()
        .set("group.id", &args.group)
        .set("auto.offset.reset", "earliest")
        // Only committed transactions: never an answer whose transaction was aborted.
        .set("isolation.level", "read_committed")
        // Offsets are stored by hand after a record is applied, committed in the background.
        .set("enable.auto.offset.store", "false")
        .create()
        .context("creating the consumer")?;
    consumer.subscribe(&[&topic])?;
    let mut meter = UsageMeter::default();
    loop {
        let next = consumer.recv();
        let message = match args.exit_when_idle {
            Some(idle) => match tokio::time::timeout(idle, next).await {
                Ok(message) => message?,
                Err(_) => break,
            },
            None => next.await?,
        };
        match codec.decode_conversation_event(message.payload().unwrap_or_default()).await {
            Ok(decoded) => meter.apply(&decoded.event),
            // Not ours to repair: the producing service dead-letters; say where it is.
            Err(error) => {
                eprintln!("skipping undecodable record {}/{}: {error}", message.partition(), message.offset());
            }
        }
        consumer.store_offset_from_message(&message)?;
    }
    match consumer.commit_consumer_state(CommitMode::Sync) {
        // The background commit had stored everything already.
        Ok(()) | Err(KafkaError::ConsumerCommit(RDKafkaErrorCode::NoOffset)) => {}
        Err(error) => return Err(error.into()),
    }
    Ok(meter
        .totals
        .iter()
        .map(|((user, model), usage)| serde_json::json!({ "user": user, "model": model, "usage": usage }))
        .collect())
}

#[cfg(test)]
mod tests {
    use parley_events::event::{ConversationStarted, Envelope, LLMResponseGenerated, Producer};

    use super::*;

    const TEST: Producer = Producer { name: "test", version: "0" };

    fn answer(conversation: &str, sequence: i64, user: &str, completion_tokens: i32) -> ConversationEvent {
        ConversationEvent::ResponseGenerated(LLMResponseGenerated {
            envelope: Envelope::new(uuid::Uuid::new_v4(), conversation, sequence, TEST),
            query_event_id: String::new(),
            text: String::new(),
            model: "m".into(),
            finish_reason: "stop".into(),
            prompt_tokens: 10,
            completion_tokens,
            llm_latency_ms: 0,
            time_to_first_token_ms: None,
            attempts: 1,
            context_event_ids: vec![],
            user_id: user.into(),
            retrieved: vec![],
        })
    }

    #[test]
    fn answers_are_counted_once_per_owner_even_when_redelivered() {
        let started = ConversationEvent::Started(ConversationStarted {
            envelope: Envelope::new(uuid::Uuid::new_v4(), "c1", 1, TEST),
            user_id: "alice".into(),
        });
        let mut meter = UsageMeter::default();
        for event in [&started, &answer("c1", 3, "", 5), &answer("c1", 3, "", 5), &answer("c1", 5, "alice", 7)] {
            meter.apply(event);
        }
        let usage = &meter.totals[&("alice".to_owned(), "m".to_owned())];
        assert_eq!(*usage, Usage { answers: 2, prompt_tokens: 20, completion_tokens: 12 });
    }
}
