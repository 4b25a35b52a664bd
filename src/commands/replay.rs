//! `parley replay`: a conversation rebuilt from the log, never calling the model, and
//! diffed against the projection.

use std::process::ExitCode;

use anyhow::Result;
use parley_events::invariants::violations;
use parley_events::sealing::ERASED;
use parley_events::{ConversationEvent, ConversationId, LLMResponseGenerated};
use parley_inference::proof::Verdict;
use parley_projections::as_of::ReplayPoint;
use parley_projections::replay::{self as log_replay, LogReader, Replayed};

use crate::cli::Common;
use crate::commands::connect_store;
use crate::commands::prompts::{PromptSettings, RebuiltPrompt, rebuild_prompts};
use crate::commands::rerun::{self, RerunSettings};
use crate::commands::{print_violations, report_undecodable};

/// What `parley replay` is asked besides the conversation.
#[derive(Debug)]
pub(crate) struct ReplayOptions {
    /// Read every partition instead of the index.
    pub scan: bool,
    /// The state at a point instead of now.
    pub at: Option<ReplayPoint>,
    /// Rebuild and prove each answer's prompt.
    pub prompts: bool,
    /// Re-run one turn instead of showing the conversation.
    pub rerun: Option<RerunSettings>,
}

/// `parley replay`.
pub(crate) async fn replay(
    common: &Common,
    conversation_id: ConversationId,
    options: ReplayOptions,
    settings: PromptSettings,
    format: String,
) -> Result<ExitCode> {
    let ReplayOptions { scan, at, prompts, rerun } = options;
    let kafka = &common.kafka;
    let registry = common.schema_registry_url.as_str();
    let store = connect_store(common).await?;
    let reader = LogReader::new(kafka, registry)?;
    let Replayed { state, records, total_records, differences, method, elapsed } =
        log_replay::replay(&reader, &store, conversation_id, scan, at.as_ref()).await?;
    let Some(state) = state else {
        match &at {
            Some(point) if total_records > 0 => eprintln!("conversation {conversation_id} had not started at {point}"),
            _ => eprintln!("no events of conversation {conversation_id} in the log"),
        }
        return Ok(ExitCode::FAILURE);
    };
    let violations = violations(records.iter().map(|r| &r.event));
    if let Some(rerun) = &rerun {
        Box::pin(rerun::rerun(common, &store, &reader, &records, &settings, rerun, format == "json")).await?;
        return Ok(ExitCode::SUCCESS);
    }
    let rebuilt = if prompts { rebuild_prompts(common, &store, &reader, &records, &settings).await? } else { vec![] };
    let unproven = rebuilt.iter().filter(|p| !matches!(p.verdict, Verdict::Proven)).count();
    if format == "json" {
        println!(
            "{}",
            serde_json::json!({
                "conversation_id": conversation_id,
                "owner": state.head.owner,
                "last_sequence": state.head.last_sequence,
                "open_query_event_id": state.head.open_query.as_ref().map(|q| &q.event_id),
                "messages": state.messages,
                "gaps": state.gaps,
                "records": records.len(),
                "total_records": total_records,
                "at": at.as_ref().map(ToString::to_string),
                "method": format!("{method:?}"),
                "fetch_ms": elapsed.as_secs_f64() * 1000.0,
                "diff": differences,
                "violations": violations,
                "prompts": prompts.then_some(&rebuilt),
            })
        );
    } else {
        println!(
            "conversation {conversation_id} of {}: {} events read with {method:?} in {:.1} ms (the model was not called)",
            state.head.owner,
            records.len(),
            elapsed.as_secs_f64() * 1000.0
        );
        if let Some(point) = &at {
            println!(
                "  as of {point}: {} of its {total_records} events (sequence {} was the last)",
                records.len(),
                state.head.last_sequence
            );
        }
        for m in &state.messages {
            let usage = m.model.as_ref().map_or(String::new(), |model| {
                format!(
                    "[{model} · {}+{} tokens · {} ms] ",
                    m.prompt_tokens.unwrap_or(0),
                    m.completion_tokens.unwrap_or(0),
                    m.llm_latency_ms.unwrap_or(0)
                )
            });
            println!("  #{:<4} {:<10} {usage}{}", m.sequence, m.kind.as_str(), m.text.replace('\n', " "));
            // A cancel carries its query's sequence: shown under the question. An answer
            // from the semantic cache says which answer it repeats.
            for record in &records {
                match &record.event {
                    ConversationEvent::CancelRequested(cancel) if cancel.envelope.sequence == m.sequence => {
                        println!("  #{:<4} {:<10} asked by {}", m.sequence, "cancel", cancel.user_id);
                    }
                    ConversationEvent::ResponseGenerated(LLMResponseGenerated {
                        envelope,
                        cached_from: Some(from),
                        ..
                    }) if envelope.sequence == m.sequence => {
                        println!(
                            "  #{:<4} {:<10} from cache: {} (the answer to {}, similarity {:.3})",
                            m.sequence, "", from.answer_event_id, from.query_event_id, from.similarity
                        );
                    }
                    _ => {}
                }
            }
        }
        if prompts {
            print_prompts(&rebuilt, unproven);
        }
        for (expected, got) in &state.gaps {
            println!("  gap: expected sequence {expected}, log continues at {got}");
        }
        let erased_at = match store.keys() {
            Some(keys) => keys.erased_at(state.head.owner.as_str()).await?,
            None => None,
        };
        if let Some(at) = erased_at {
            println!("  owner erased at {at} (ms since the epoch): content reads {ERASED}, projection rows purged");
        }
        if at.is_some() {
            println!("diff against the projection: not made (the projection holds the present)");
        } else if differences.is_empty() {
            println!("diff against the projection: none");
        } else {
            println!("diff against the projection ({}):", differences.len());
            differences.iter().for_each(|d| println!("  {d}"));
        }
        print_violations(&violations);
    }
    report_undecodable(reader.undecodable());
    // A prompt that cannot be rebuilt is reported, not a failure; one that differs is.
    let differing = rebuilt.iter().any(|p| matches!(p.verdict, Verdict::Differs { .. }));
    if !differences.is_empty() || !violations.is_empty() || differing {
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}

/// Each answer's rebuilt prompt and its verdict, then how many were proven.
fn print_prompts(rebuilt: &[RebuiltPrompt], unproven: usize) {
    for prompt in rebuilt {
        println!("  prompt of the answer at #{}: {}", prompt.sequence, prompt.verdict);
        for message in &prompt.messages {
            println!("      [{}] {}", message.role, message.content.replace('\n', "\n        "));
        }
    }
    println!("prompts: {} of {} proven", rebuilt.len() - unproven, rebuilt.len());
}
