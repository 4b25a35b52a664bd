//! `parley audit`: every event of a conversation with its log position, schema version and
//! trace, then its dead letters.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Result;
use parley_eventlog::LogPosition;
use parley_eventlog::dead_letter::read_book;
use parley_events::dead_letters::LetterBook;
use parley_events::invariants::violations;
use parley_events::registry::SchemaRegistry;
use parley_events::turn::CANCELLED;
use parley_events::{ConversationEvent, ConversationId, EventCodec, LLMResponseGenerated};
use parley_projections::replay::{LogReader, Lookup, conversation_records};

use crate::cli::Common;
use crate::commands::connect_store;
use crate::commands::{print_violations, report_undecodable};

/// `parley audit`.
pub(crate) async fn audit(
    common: &Common,
    conversation_id: ConversationId,
    scan: bool,
    format: String,
) -> Result<ExitCode> {
    let kafka = &common.kafka;
    let registry = common.schema_registry_url.as_str();
    let store = connect_store(common).await?;
    let reader = LogReader::new(kafka, registry)?;
    let lookup = if scan { Lookup::Scan } else { Lookup::IndexOrScan };
    let (mut records, _, _) = conversation_records(&reader, &store, conversation_id, lookup).await?;
    // The conversation's dead letters: records some consumer could not read, and
    // what became of them; a redriven copy the index does not name (its original
    // is indexed) is read through its letter.
    let (book, unreadable_letters) = read_book(kafka, &EventCodec::new(registry)?).await?;
    for (id, error) in &unreadable_letters {
        tracing::warn!(%id, %error, "not a dead-letter record; passed by");
    }
    let letters = book.letters_of(conversation_id.to_string().as_bytes());
    let read: Vec<LogPosition> = records
        .iter()
        .map(|r| LogPosition { topic: kafka.topics().events, partition: r.partition, offset: r.offset })
        .collect();
    let mut copies = reader.records_at(&LetterBook::copies_not_read(&letters, &read)).await?;
    if let Some(keys) = store.keys() {
        keys.open_records(&mut copies).await?;
    }
    records.extend(copies);
    records.sort_by_key(|r| (r.sequence, r.offset));
    if records.is_empty() {
        eprintln!("no events of conversation {conversation_id} in the log");
        return Ok(ExitCode::FAILURE);
    }
    let registry_client = SchemaRegistry::new(registry)?;
    let mut versions = std::collections::HashMap::new();
    for record in &records {
        if let std::collections::hash_map::Entry::Vacant(slot) = versions.entry(record.schema_id) {
            let version = registry_client.versions_of(record.schema_id).await?.first().map(|(_, v)| *v);
            slot.insert(version);
        }
    }
    if format == "json" {
        for record in &records {
            let mut line = serde_json::to_value(record)?;
            line["schema_version"] = serde_json::json!(versions[&record.schema_id]);
            println!("{line}");
        }
    } else {
        println!(
            "{:<4} {:<22} {:>9} {:>10} {:<24} {:<36} {:<36} {:<32}",
            "SEQ", "TYPE", "PARTITION", "OFFSET", "SCHEMA", "OCCURRED AT", "CORRELATION", "TRACE"
        );
        for r in &records {
            let schema =
                format!("id {} v{}", r.schema_id, versions[&r.schema_id].map_or("?".into(), |v| v.to_string()));
            let at = humantime::format_rfc3339_millis(
                std::time::UNIX_EPOCH + Duration::from_millis(u64::try_from(r.occurred_at).unwrap_or(0)),
            );
            println!(
                "{:<4} {:<22} {:>9} {:>10} {:<24} {:<36} {:<36} {:<32}",
                r.sequence,
                r.event_type,
                r.partition,
                r.offset,
                schema,
                at.to_string(),
                r.correlation_id,
                r.trace_id.as_deref().unwrap_or("-")
            );
            if let Some(cause) = &r.causation_id {
                println!("     caused by {cause}, written by {}", r.producer);
            } else {
                println!("     written by {}", r.producer);
            }
            if let Some(letter) = &r.redriven_from {
                println!("     a redriven copy of dead letter {letter}");
            }
            match &r.event {
                ConversationEvent::CancelRequested(cancel) => {
                    println!("     asks to stop the answer to {} (asked by {})", cancel.query_event_id, cancel.user_id);
                }
                ConversationEvent::ResponseGenerated(answer) if answer.finish_reason == CANCELLED => {
                    println!("     stopped by a cancel after {} tokens", answer.completion_tokens);
                }
                ConversationEvent::ResponseGenerated(LLMResponseGenerated { cached_from: Some(from), .. }) => {
                    println!(
                        "     served from the semantic cache: repeats answer {} (to {}, similarity {:.3})",
                        from.answer_event_id, from.query_event_id, from.similarity
                    );
                }
                _ => {}
            }
            for hit in &r.retrieved {
                println!(
                    "     retrieved {} {} #{} (vector {}, score {:.3})",
                    hit.source_kind, hit.source_id, hit.position, hit.vector_id, hit.score
                );
            }
        }
    }
    for entry in &letters {
        if format == "json" {
            let line = serde_json::json!({"dead_letter": entry.id.to_string(), "consumer": entry.letter.consumer,
                "source": entry.letter.source().to_string(), "status": entry.status.as_str(),
                "redriven_to": entry.status.copy().map(ToString::to_string),
                "error": entry.letter.error});
            println!("{line}");
        } else {
            println!(
                "dead letter {} of {}: {} could not be read ({}); {}",
                entry.id,
                entry.letter.consumer,
                entry.letter.source(),
                entry.letter.error,
                entry.status
            );
        }
    }
    // A redriven copy repeats its original's event id when only some consumer could
    // not read the original: it is a re-delivery, not a second fact.
    let mut seen = std::collections::HashSet::new();
    let facts = records.iter().filter(|r| seen.insert(r.event_id) || r.redriven_from.is_none());
    let violations = violations(facts.map(|r| &r.event));
    if format == "json" {
        violations.iter().for_each(|v| println!("{}", serde_json::json!(v)));
    } else {
        print_violations(&violations);
    }
    report_undecodable(reader.undecodable() + unreadable_letters.len() as u64);
    if !violations.is_empty() {
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}
