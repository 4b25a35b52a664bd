//! A new consumer, start to finish: token usage per answer, for billing.
//!
//! It runs on `parley_eventlog::driver`, the loop inference and the embedder share: it
//! subscribes to `conversation-events` in its own consumer group (a new group starts from
//! the first event), decodes every record through the schema registry (old and new event
//! versions alike, riding out registry outages), and for each answer appends one usage
//! record to `<prefix>usage` in the same Kafka transaction as the offsets that read it:
//! exactly once, offsets after the effect. A record that does not decode is dead-lettered
//! and its conversation's later events wait until an operator settles the letter. Its own
//! code is `usage_records`; `driver::EventHandler` makes a consumer of it.
//! docs/consumers.md walks through it. Run it beside the stack (`infra/up.sh`) and stop
//! it with Ctrl-C:
//!
//! ```text
//! cargo run --example usage_meter -- --group usage-meter
//! ```

use std::sync::Arc;

use anyhow::Result;
use clap::Parser;
use parley_eventlog::KafkaSettings;
use parley_eventlog::driver::{self, DriverSettings, EventHandler};
use parley_eventlog::topics::{CONVERSATION_PARTITIONS, TopicSpec, create_topics};
use parley_eventlog::transaction::Outgoing;
use parley_events::{ConversationEvent, EventCodec, EventId, UserId};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

#[derive(Debug, Parser)]
pub(crate) struct Args {
    #[command(flatten)]
    pub kafka: KafkaSettings,
    #[arg(long, env = "PARLEY_SCHEMA_REGISTRY_URL", default_value = "http://127.0.0.1:18081/apis/ccompat/v7")]
    pub schema_registry_url: String,
    /// The consumer group (its committed offsets say where a restart goes on).
    #[arg(long, default_value = "usage-meter")]
    pub group: String,
}

/// What one answer used: the record the meter appends, keyed by user.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Usage {
    pub answer_id: EventId,
    /// `None` for an answer written before schema v2 (it names its user through its query).
    pub user: Option<UserId>,
    pub model: String,
    pub prompt_tokens: i32,
    pub completion_tokens: i32,
}

/// The meter itself, pure (tested without Kafka): a usage record per answer, nothing for
/// any other event.
fn usage_records(output: &str, event: &ConversationEvent) -> serde_json::Result<Vec<Outgoing>> {
    let ConversationEvent::ResponseGenerated(answer) = event else { return Ok(vec![]) };
    let usage = Usage {
        answer_id: answer.envelope.event_id,
        user: answer.user_id.clone(),
        model: answer.model.clone(),
        prompt_tokens: answer.prompt_tokens,
        completion_tokens: answer.completion_tokens,
    };
    Ok(vec![Outgoing::new(output, usage.user.as_ref().map_or("", UserId::as_str), serde_json::to_vec(&usage)?)])
}

/// Meters until `shutdown`.
pub(crate) async fn run(args: &Args, shutdown: CancellationToken) -> Result<()> {
    let output = format!("{}usage", args.kafka.topic_prefix);
    create_topics(&args.kafka, &[TopicSpec::new(&output, CONVERSATION_PARTITIONS)], None).await?;
    let codec = Arc::new(EventCodec::new(&args.schema_registry_url)?);
    let meter = EventHandler::new(codec.clone(), shutdown.clone(), move |event| usage_records(&output, event));
    let settings = DriverSettings::new(&args.kafka, &args.group, vec![args.kafka.topics().events]);
    Ok(driver::run(&args.kafka, settings, Arc::new(meter), codec, shutdown).await?)
}

#[tokio::main]
async fn main() -> Result<()> {
    run(&Args::parse(), parley_eventlog::shutdown::on_signal()).await
}

#[cfg(test)]
mod tests {
    use parley_events::ConversationId;
    use parley_events::event::{ConversationStarted, Envelope, LLMResponseGenerated, Producer};

    use super::*;

    const TEST: Producer = Producer { name: "test", version: "0" };

    #[test]
    fn an_answer_is_metered_and_nothing_else_is() {
        let (id, conversation) = (EventId::random(), ConversationId::random());
        let answer = ConversationEvent::ResponseGenerated(LLMResponseGenerated {
            sealed_for: String::new(),
            envelope: Envelope::new(id, conversation, 3, TEST),
            query_event_id: EventId::random(),
            text: "Blue.".into(),
            model: "m".into(),
            finish_reason: "stop".into(),
            prompt_tokens: 10,
            completion_tokens: 2,
            llm_latency_ms: 0,
            time_to_first_token_ms: None,
            attempts: 1,
            context_event_ids: vec![],
            user_id: Some("alice".parse().unwrap()),
            retrieved: vec![],
            context_fingerprint: String::new(),
            cached_from: None,
            prompt: None,
        });
        let usage = Usage {
            answer_id: id,
            user: Some("alice".parse().unwrap()),
            model: "m".into(),
            prompt_tokens: 10,
            completion_tokens: 2,
        };
        let records = usage_records("usage", &answer).unwrap();
        assert_eq!(records.len(), 1);
        assert_eq!((records[0].topic.as_str(), records[0].key.as_str()), ("usage", "alice"));
        assert_eq!(serde_json::from_slice::<Usage>(&records[0].payload).unwrap(), usage);
        let started = ConversationEvent::Started(ConversationStarted {
            envelope: Envelope::new(EventId::random(), conversation, 1, TEST),
            user_id: "alice".parse().unwrap(),
        });
        assert!(usage_records("usage", &started).unwrap().is_empty());
    }
}
