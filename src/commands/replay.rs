//! `parley replay`: a conversation rebuilt from the log, never calling the model, and
//! diffed against the projection.

use std::process::ExitCode;

use anyhow::Result;
use parley_events::invariants::violations;
use parley_events::sealing::ERASED;
use parley_events::{ConversationEvent, ConversationId, LLMResponseGenerated};
use parley_projections::replay::{self as log_replay, LogReader};

use crate::cli::Common;
use crate::commands::connect_store;
use crate::commands::{print_violations, report_undecodable};

/// `parley replay`.
pub(crate) async fn replay(
    common: &Common,
    conversation_id: ConversationId,
    scan: bool,
    format: String,
) -> Result<ExitCode> {
    let kafka = &common.kafka;
    let registry = common.schema_registry_url.as_str();
    let store = connect_store(common).await?;
    let reader = LogReader::new(kafka, registry)?;
    let (state, records, differences, method, elapsed) =
        log_replay::replay(&reader, &store, conversation_id, scan).await?;
    let Some(state) = state else {
        eprintln!("no events of conversation {conversation_id} in the log");
        return Ok(ExitCode::FAILURE);
    };
    let violations = violations(records.iter().map(|r| &r.event));
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
                "method": format!("{method:?}"),
                "fetch_ms": elapsed.as_secs_f64() * 1000.0,
                "diff": differences,
                "violations": violations,
            })
        );
    } else {
        println!(
            "conversation {conversation_id} of {}: {} events read with {method:?} in {:.1} ms (the model was not called)",
            state.head.owner,
            records.len(),
            elapsed.as_secs_f64() * 1000.0
        );
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
        if differences.is_empty() {
            println!("diff against the projection: none");
        } else {
            println!("diff against the projection ({}):", differences.len());
            differences.iter().for_each(|d| println!("  {d}"));
        }
        print_violations(&violations);
    }
    report_undecodable(reader.undecodable());
    if !differences.is_empty() || !violations.is_empty() {
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}
