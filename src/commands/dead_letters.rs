//! `parley dead-letters list|show|redrive|discard`: the dead-letter topic read whole and
//! folded; redrive and discard append a decision to it.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Result;
use parley_eventlog::KafkaSettings;
use parley_eventlog::dead_letter::{Decision, read_book, settle};
use parley_events::EventCodec;

use crate::cli::DeadLettersCommand;
use crate::commands::report_undecodable;

/// `parley dead-letters`: the dead-letter topic read whole and folded; redrive and discard
/// append a decision to it.
pub(crate) async fn dead_letters(
    kafka: &KafkaSettings,
    registry: &str,
    command: DeadLettersCommand,
) -> Result<ExitCode> {
    let codec = EventCodec::new(registry)?;
    let (book, unreadable) = read_book(kafka, &codec).await?;
    for (id, error) in &unreadable {
        tracing::warn!(%id, %error, "not a dead-letter record; passed by");
    }
    let code = dead_letter_command(kafka, &codec, &book, command).await;
    report_undecodable(unreadable.len() as u64);
    code
}

/// One `parley dead-letters` command on the folded topic.
pub(crate) async fn dead_letter_command(
    kafka: &KafkaSettings,
    codec: &EventCodec,
    book: &parley_events::dead_letters::LetterBook,
    command: DeadLettersCommand,
) -> Result<ExitCode> {
    let topic = kafka.topics().dead_letter;
    let at = |millis: i64| {
        humantime::format_rfc3339_millis(
            std::time::UNIX_EPOCH + Duration::from_millis(u64::try_from(millis).unwrap_or(0)),
        )
    };
    let text = |bytes: &Option<Vec<u8>>| bytes.as_deref().map(String::from_utf8_lossy).unwrap_or_default().into_owned();
    let (id, decision, reason, by) = match command {
        DeadLettersCommand::List { consumer, status, format } => {
            let listed = book.entries().iter().filter(|e| {
                consumer.as_ref().is_none_or(|c| *c == e.letter.consumer)
                    && status.as_ref().is_none_or(|s| s == e.status.as_str())
            });
            for entry in listed {
                let (id, letter) = (entry.id, &entry.letter);
                let source = letter.source();
                if format == "json" {
                    let line = serde_json::json!({"id": id.to_string(), "failed_at": at(letter.failed_at).to_string(),
                        "consumer": letter.consumer, "source": source.to_string(), "key": text(&letter.key),
                        "error": letter.error, "payload_bytes": letter.payload.as_ref().map_or(0, Vec::len),
                        "status": entry.status.as_str(),
                        "redriven_to": entry.status.copy().map(ToString::to_string),
                        "resolved_by": entry.resolution.as_ref().map(|r| r.resolved_by.clone())});
                    println!("{line}");
                } else {
                    println!(
                        "{:<10} {} {:<32} {:<44} key={:<38} {:<10} {}",
                        id.to_string(),
                        at(letter.failed_at),
                        letter.consumer,
                        source.to_string(),
                        text(&letter.key),
                        entry.status.as_str(),
                        letter.error.chars().take(120).collect::<String>()
                    );
                }
            }
            return Ok(ExitCode::SUCCESS);
        }
        DeadLettersCommand::Show { id } => {
            let Some(entry) = book.get(id) else {
                eprintln!(
                    "no dead letter {id} in {topic} (ids are partition/offset, as `parley dead-letters list` shows)"
                );
                return Ok(ExitCode::FAILURE);
            };
            let letter = &entry.letter;
            let payload = letter.payload.as_deref().unwrap_or_default();
            println!("id          {id} ({topic})");
            println!("failed at   {}", at(letter.failed_at));
            println!("consumer    {}", letter.consumer);
            println!("source      {}", letter.source());
            println!("key         {}", text(&letter.key));
            println!("error       {}", letter.error);
            for (name, value) in letter.headers.iter().collect::<std::collections::BTreeMap<_, _>>() {
                println!("header      {name}: {value}");
            }
            println!("status      {}", entry.status);
            if let Some(resolution) = &entry.resolution {
                let reason = resolution.reason.as_deref().map_or(String::new(), |r| format!(": {r}"));
                println!("resolved    {} by {}{reason}", at(resolution.resolved_at), resolution.resolved_by);
            }
            println!("payload     {} bytes", payload.len());
            for (row, chunk) in payload.chunks(16).enumerate() {
                let hex: Vec<String> = chunk.iter().map(|b| format!("{b:02x}")).collect();
                let ascii: String =
                    chunk.iter().map(|b| if b.is_ascii_graphic() || *b == b' ' { *b as char } else { '.' }).collect();
                println!("  {:06x}  {:<47}  {ascii}", row * 16, hex.join(" "));
            }
            return Ok(ExitCode::SUCCESS);
        }
        DeadLettersCommand::Redrive { id, reason, by } => (id, Decision::Redrive, reason, by),
        DeadLettersCommand::Discard { id, reason, by } => (id, Decision::Discard, reason, by),
    };
    match settle(kafka, codec, book, id, decision, &by, reason).await {
        Ok(resolution) => {
            match resolution.copy() {
                Some(copy) => println!(
                    "dead letter {id} redriven: its record is at {copy}; {} runs it before the records of its key it held",
                    resolution.consumer
                ),
                None => println!(
                    "dead letter {id} discarded; {} lets the records of its key it held go on",
                    resolution.consumer
                ),
            }
            Ok(ExitCode::SUCCESS)
        }
        Err(parley_eventlog::EventLogError::Settle(refused)) => {
            eprintln!("{refused}");
            Ok(ExitCode::FAILURE)
        }
        Err(error) => Err(error.into()),
    }
}
