//! A user's knowledge base from the command line: `parley ingest` (files and folders in),
//! `parley documents list|delete`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use parley_eventlog::EventProducer;
use parley_eventlog::load::{self, LoadBoard};
use parley_events::{DocumentId, EventCodec, UserId};
use parley_ingest::Submission;
use parley_ingest::document::{deletion_event, media_type_of};
use parley_ingest::submit::submit_all;
use tokio_util::sync::CancellationToken;

use crate::cli::Common;
use crate::commands::serve::open_retrieval;
use crate::commands::{connect_store, master_key, progress_bar};

/// `parley documents list`.
pub(crate) async fn list(common: &Common, owner: UserId, limit: usize) -> Result<ExitCode> {
    let (_, vectors) = open_retrieval(&common.embedding, &common.milvus).await?;
    for document in vectors.documents(&owner, limit).await.context("listing documents")? {
        println!("{}  {}", document.document_id, document.title);
    }
    Ok(ExitCode::SUCCESS)
}

/// `parley documents delete`.
pub(crate) async fn delete(common: &Common, document_id: DocumentId, owner: UserId) -> Result<ExitCode> {
    let kafka = &common.kafka;
    let registry = common.schema_registry_url.as_str();
    let producer = EventProducer::new(kafka.client_config(), Arc::new(EventCodec::new(registry)?))?;
    let event = deletion_event(&owner, document_id, None);
    let position = producer
        .append(&kafka.topics().documents, &document_id.to_string(), &event, None)
        .await
        .context("appending DocumentDeleted")?;
    println!("deletion of {document_id} for {owner} accepted at {position} (event {})", event.envelope.event_id);
    Ok(ExitCode::SUCCESS)
}

/// `parley ingest`: reads every file, appends one DocumentSubmitted each (all in flight at
/// once), shows progress, and exits 1 if any file was refused or not acknowledged.
pub(crate) async fn ingest(
    common: &Common,
    paths: &[PathBuf],
    owner: &UserId,
    labels: &[(String, String)],
    shed_queue_age: Duration,
) -> Result<ExitCode> {
    let (kafka, registry) = (&common.kafka, common.schema_registry_url.as_str());
    // With a master key, what the log keeps is sealed under the owner's data key.
    let keys = match master_key(common)? {
        Some(_) => connect_store(common).await?.keys().cloned(),
        None => None,
    };
    let files = parley_ingest::files::collect(paths)?;
    let mut failures = 0;
    let mut documents = Vec::new();
    let mut names = Vec::new();
    for file in &files {
        let title = file.file_name().map_or_else(|| file.display().to_string(), |n| n.to_string_lossy().into_owned());
        let submission = std::fs::read(file).map_err(|e| e.to_string()).and_then(|bytes| {
            let text = String::from_utf8(bytes).map_err(|_| "not UTF-8 text".to_owned())?;
            let mut metadata: std::collections::HashMap<_, _> = labels.iter().cloned().collect();
            metadata.insert("path".into(), file.display().to_string());
            Submission { owner: owner.clone(), media_type: media_type_of(&title).to_owned(), title, text, metadata }
                .into_event(None)
                .map_err(|e| e.to_string())
        });
        match submission {
            Ok(document) => {
                documents.push(document);
                names.push(file.display().to_string());
            }
            Err(reason) => {
                failures += 1;
                eprintln!("skipped {}: {reason}", file.display());
            }
        }
    }
    let producer = EventProducer::new(kafka.client_config(), Arc::new(EventCodec::new(registry)?))?;
    let topic = kafka.topics().documents;
    let bytes: usize = documents.iter().map(|d| d.text.len()).sum();
    if let Some(keys) = &keys {
        for document in &mut documents {
            keys.seal_event(document).await.with_context(|| format!("sealing the documents of {owner}"))?;
        }
    }
    let started = Instant::now();
    let total = documents.len() as u64;
    let mut done = 0;
    // The gateways' shedding signal: while it is on, the next document waits.
    let board = Arc::new(std::sync::Mutex::new(LoadBoard::default()));
    let shutdown = CancellationToken::new();
    let follower = tokio::spawn(load::follow(load::follower(kafka)?, board.clone(), shutdown.clone()));
    let pace = || {
        let board = board.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let wait = board.overloaded(None, shed_queue_age, parley_events::event::now_millis())?;
        eprint!("\rParley is shedding load: the next document waits {wait} ms ");
        Some(Duration::from_millis(wait))
    };
    let outcomes = submit_all(&producer, &topic, &documents, pace, |index, outcome| {
        done += 1;
        if let Err(error) = outcome {
            eprintln!("\nfailed {}: {error}", names[index]);
        }
        progress_bar(done, total, "documents", started.elapsed());
    })
    .await;
    shutdown.cancel();
    let _ = follower.await;
    eprintln!();
    failures += outcomes.iter().filter(|o| o.is_err()).count();
    let elapsed = started.elapsed().as_secs_f64();
    println!(
        "{} documents ({bytes} bytes) submitted for {owner} in {elapsed:.2} s ({:.0} documents/s); chunking and embedding continue in the embedder",
        outcomes.len() - outcomes.iter().filter(|o| o.is_err()).count(),
        total as f64 / elapsed.max(1e-9)
    );
    if failures > 0 {
        eprintln!("{failures} file(s) not submitted");
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}
