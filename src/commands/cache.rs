//! `parley cache`: a user's semantic cache, listed or cleared (docs/knowledge.md).

use std::process::ExitCode;

use anyhow::Result;
use parley_events::event::now_millis;
use parley_events::{DocumentId, UserId};
use parley_projections::reader::LiveReader;

use crate::cli::Common;
use crate::commands::connect_store;

async fn reader(common: &Common) -> Result<LiveReader> {
    let store = connect_store(common).await?;
    Ok(LiveReader::new(store).await?)
}

/// `parley cache list`.
pub(crate) async fn list(common: &Common, user: UserId) -> Result<ExitCode> {
    let reader = reader(common).await?;
    let generation = reader.generation().await?;
    let entries = reader.store().cached_answers_of(&generation, &user).await?;
    let now = now_millis();
    println!("{} cached answers of {user}", entries.len());
    for entry in entries {
        let age = (now - entry.occurred_at).max(0) / 1000;
        println!(
            "  question {} → answer {} in {} · {age} s old · {} ms of {} · documents: {}",
            entry.query_event_id,
            entry.answer_event_id,
            entry.conversation_id,
            entry.llm_latency_ms,
            entry.model,
            if entry.documents.is_empty() { "none".to_owned() } else { entry.documents.join(", ") }
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// `parley cache clear`.
pub(crate) async fn clear(common: &Common, user: UserId, document: Option<DocumentId>) -> Result<ExitCode> {
    let reader = reader(common).await?;
    let generation = reader.generation().await?;
    let store = reader.store();
    match document {
        Some(document) => {
            let purged = store.purge_cached_answers_using(&generation, &user, &[document.to_string()]).await?;
            println!("removed {purged} cached answers of {user} that quoted document {document}");
        }
        None => {
            store.clear_cached_answers(&generation, &user).await?;
            println!("removed every cached answer of {user}");
        }
    }
    Ok(ExitCode::SUCCESS)
}
