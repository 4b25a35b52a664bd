//! `parley replay <id> --rerun <turn>`: a what-if. The turn's prompt is rebuilt from events
//! (the same turns before it, the same retrieved chunks and messages), sent to the model
//! the operator chose (another model, system prompt or endpoint), and the result written
//! to the `experiments` topic, never to the conversation; then the two answers side by
//! side, with their usage and latency.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use parley_eventlog::EventProducer;
use parley_events::{ConversationEvent, Envelope, EventCodec, EventId, ExperimentRun, LLMResponseGenerated, Producer};
use parley_inference::balancer::EndpointSpec;
use parley_inference::experiment::record_outcome;
use parley_inference::llm::{ChatModel, LlmSettings};
use parley_inference::prompt::PromptLayout;
use parley_inference::proof::system_prompt_digest;
use parley_projections::Store;
use parley_projections::replay::{AuditRecord, LogReader};
use similar::{ChangeTag, TextDiff};

use crate::cli::Common;
use crate::commands::prompts::{PromptSettings, rerun_prompt};

/// Who writes experiments.
const SOURCE: Producer = Producer { name: "parley-replay", version: env!("CARGO_PKG_VERSION") };

/// What a re-run sends, and to whom.
#[derive(Debug, Clone)]
pub(crate) struct RerunSettings {
    /// The turn (1: the conversation's first question).
    pub turn: usize,
    /// The model asked for.
    pub model: String,
    /// The model server's base URL (up to and including /v1).
    pub endpoint: String,
    /// Most tokens of the answer.
    pub max_tokens: u32,
    /// How long the call may take.
    pub timeout: Duration,
    /// The layout and budget of a turn whose answer recorded none (before prompt proofs).
    pub layout: PromptLayout,
    /// See `layout`.
    pub token_budget: usize,
}

/// Re-runs one turn of the conversation whose `records` (opened) are given; prints the
/// comparison (or JSON). Ok(true) when the new answer differs from the old.
pub(crate) async fn rerun(
    common: &Common,
    store: &Store,
    reader: &LogReader,
    records: &[AuditRecord],
    prompts: &PromptSettings,
    settings: &RerunSettings,
    json: bool,
) -> Result<bool> {
    let questions: Vec<EventId> = records
        .iter()
        .filter_map(|r| match &r.event {
            ConversationEvent::QueryReceived(query) => Some(query.envelope.event_id),
            _ => None,
        })
        .collect();
    let Some(question) = settings.turn.checked_sub(1).and_then(|i| questions.get(i)) else {
        bail!("the conversation has {} turns; there is no turn {}", questions.len(), settings.turn);
    };
    let answer = records.iter().find_map(|r| match &r.event {
        ConversationEvent::ResponseGenerated(answer) if answer.query_event_id == *question => Some(answer),
        _ => None,
    });
    let Some(answer) = answer else { bail!("turn {} has no answer to re-run (it failed or is open)", settings.turn) };
    let owner = answer.user_id.clone().context("an answer written before answers named their owner")?;
    let prompt =
        rerun_prompt(common, store, reader, records, answer, prompts, (settings.layout, settings.token_budget))
            .await?
            .map_err(|why| anyhow::anyhow!("turn {}'s context cannot be rebuilt: {why}", settings.turn))?;

    let model = ChatModel::new(LlmSettings {
        endpoints: vec![EndpointSpec {
            base_url: settings.endpoint.clone(),
            model: Some(settings.model.clone()),
            api_key_env: None,
            slots: 1,
        }],
        api_key: std::env::var("PARLEY_LLM_API_KEY").unwrap_or_else(|_| "none".into()),
        model: settings.model.clone(),
        provider: "rerun".into(),
        max_tokens: settings.max_tokens,
        timeout: settings.timeout,
        max_attempts: 1,
        retry_backoff: Duration::from_millis(100),
        breaker_threshold: u32::MAX,
        breaker_cool_down: Duration::from_secs(1),
    })?;
    let (result, _) = model.complete(&prompt.messages, |_, _, _| {}).await;
    let envelope = Envelope::new(EventId::random(), answer.envelope.conversation_id, answer.envelope.sequence, SOURCE)
        .caused_by(&answer.envelope);
    let mut run = ExperimentRun {
        requested_by: "operator".into(),
        model: settings.model.clone(),
        endpoint: settings.endpoint.clone(),
        system_prompt_digest: system_prompt_digest(&prompts.system_prompt),
        prompt_messages: i32::try_from(prompt.messages.len()).unwrap_or(i32::MAX),
        ..ExperimentRun::unanswered(envelope, owner, answer.envelope.event_id, answer.query_event_id)
    };
    record_outcome(&mut run, result);
    let shown = run.clone();
    if let Some(keys) = store.keys() {
        keys.seal_event(&mut run).await?;
    }
    let codec = Arc::new(EventCodec::new(common.schema_registry_url.as_str())?);
    let producer = EventProducer::new(common.kafka.client_config(), codec)?;
    let topic = common.kafka.topics().experiments;
    let position = producer.append(&topic, &answer.envelope.conversation_id.to_string(), &run, None).await?;

    let changed = shown.error.is_empty() && shown.text != answer.text;
    if json {
        println!(
            "{}",
            serde_json::json!({
                "experiment": position.to_string(), "turn": settings.turn, "changed": changed,
                "original": {"event_id": answer.envelope.event_id, "model": answer.model, "text": answer.text,
                    "prompt_tokens": answer.prompt_tokens, "completion_tokens": answer.completion_tokens,
                    "llm_latency_ms": answer.llm_latency_ms},
                "rerun": {"model": shown.model, "endpoint": shown.endpoint, "text": shown.text,
                    "finish_reason": shown.finish_reason, "prompt_tokens": shown.prompt_tokens,
                    "completion_tokens": shown.completion_tokens, "llm_latency_ms": shown.llm_latency_ms,
                    "error": shown.error, "prompt_messages": shown.prompt_messages},
            })
        );
    } else {
        print_comparison(settings.turn, answer, &shown, &position.to_string(), changed);
    }
    Ok(changed)
}

fn print_comparison(turn: usize, answer: &LLMResponseGenerated, run: &ExperimentRun, position: &str, changed: bool) {
    println!(
        "turn {turn} re-run with {} at {} ({} prompt messages); written to {position}",
        run.model, run.endpoint, run.prompt_messages
    );
    println!("{:<12} {:<28} {:>14} {:>12}", "", "MODEL", "TOKENS (in+out)", "LATENCY");
    println!(
        "{:<12} {:<28} {:>14} {:>9} ms",
        "original",
        answer.model,
        format!("{}+{}", answer.prompt_tokens, answer.completion_tokens),
        answer.llm_latency_ms
    );
    if !run.error.is_empty() {
        println!("{:<12} {:<28} failed: {}", "re-run", run.model, run.error);
        return;
    }
    println!(
        "{:<12} {:<28} {:>14} {:>9} ms",
        "re-run",
        run.model,
        format!("{}+{}", run.prompt_tokens, run.completion_tokens),
        run.llm_latency_ms
    );
    if !changed {
        println!("the answer is the same, word for word:\n  {}", answer.text.replace('\n', "\n  "));
        return;
    }
    println!("the answer changed ([-removed-] {{+added+}}):");
    println!("  {}", word_diff(&answer.text, &run.text).replace('\n', "\n  "));
}

/// `new` against `old` word by word, each run of changes as one `[-removed-]` and one
/// `{+added+}` (the blanks between changed words belong to the run).
fn word_diff(old: &str, new: &str) -> String {
    let diff = TextDiff::from_words(old, new);
    let (mut out, mut removed, mut added) = (String::new(), String::new(), String::new());
    let flush = |out: &mut String, removed: &mut String, added: &mut String| {
        let (gone, came) = (removed.trim(), added.trim());
        if !gone.is_empty() {
            out.push_str(&format!("[-{gone}-]"));
        }
        if !came.is_empty() {
            out.push_str(&format!("{{+{came}+}}"));
        }
        if !gone.is_empty() || !came.is_empty() {
            out.push(' ');
        }
        removed.clear();
        added.clear();
    };
    for change in diff.iter_all_changes() {
        let text = change.value();
        match change.tag() {
            ChangeTag::Equal if text.trim().is_empty() && !(removed.is_empty() && added.is_empty()) => {
                removed.push_str(text);
                added.push_str(text);
            }
            ChangeTag::Equal => {
                flush(&mut out, &mut removed, &mut added);
                out.push_str(text);
            }
            ChangeTag::Delete => removed.push_str(text),
            ChangeTag::Insert => added.push_str(text),
        }
    }
    flush(&mut out, &mut removed, &mut added);
    out.trim_end().to_owned()
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_run_of_changed_words_reads_as_one_removal_and_one_addition() {
        assert_eq!(
            super::word_diff("One of the planets is Venus.", "One planet is Mars."),
            "One [-of the planets-]{+planet+} is [-Venus.-]{+Mars.+}"
        );
        assert_eq!(super::word_diff("same words", "same words"), "same words");
    }
}
