//! The embedder's batch loop. A batch of records (conversation events and documents) is
//! decoded into deletions and vector records; the deletions are applied, the records
//! embedded `batch_size` texts at a time and upserted into Milvus. Only after Milvus
//! acknowledged are the EmbeddingsIndexed events and the batch's offsets committed, in one
//! Kafka transaction: a crash in between re-delivers the batch, the deletions are applied
//! again (harmless) and the deterministic vector ids make the second upsert overwrite the
//! first, so no vector is ever stored twice and none is lost.

use std::sync::Arc;
use std::time::Duration;

use clap::Args;
use parley_eventlog::dead_letter::dead_letter_for;
use parley_eventlog::registry_wait::retry_while_registry_down;
use parley_eventlog::settings::parse_duration;
use parley_eventlog::trace::{header_traceparent, link_trace, traceparent_of};
use parley_eventlog::transaction::{
    Outgoing, Poll, TransactionalProducer, Uncommitted, instance_transactional_id, next_batch, transactional_consumer,
};
use parley_eventlog::{EventLogError, KafkaSettings, Topics};
use parley_events::{DocumentEvent, EventCodec, EventsError};
use parley_retrieval::{EmbeddingBackend, RetrievalError, VectorStore};
use rdkafka::Message;
use rdkafka::error::KafkaError;
use rdkafka::message::OwnedMessage;
use thiserror::Error;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, info, info_span, warn};

use crate::sources::{
    Change, Owners, Skipped, document_deletion, document_records, indexed_events, message_record, plan,
};

/// Options of `parley embedder`.
#[derive(Debug, Clone, Args)]
pub struct EmbedderArgs {
    /// Texts embedded per model call; also the most records taken per batch.
    #[arg(long, env = "PARLEY_EMBEDDER_BATCH_SIZE", default_value_t = 32,
          value_parser = clap::value_parser!(u16).range(1..=4096))]
    pub embedder_batch_size: u16,

    /// Longest wait for a batch to fill once its first record arrived.
    #[arg(long, env = "PARLEY_EMBEDDER_MAX_WAIT", default_value = "200ms", value_parser = parse_duration)]
    pub embedder_max_wait: Duration,

    /// Largest document chunk in characters (all-MiniLM-L6-v2 reads 256 tokens, ~1000 characters of English).
    #[arg(long, env = "PARLEY_CHUNK_CHARS", default_value_t = 800,
          value_parser = clap::value_parser!(u32).range(50..=100_000))]
    pub chunk_chars: u32,

    /// Characters shared by consecutive chunks.
    #[arg(long, env = "PARLEY_CHUNK_OVERLAP", default_value_t = 120,
          value_parser = clap::value_parser!(u32).range(0..=50_000))]
    pub chunk_overlap: u32,

    /// Flush the collection (seal its rows into indexed segments) once this many vectors
    /// were stored since the last flush, and whenever the embedder is idle with unflushed
    /// vectors. 0 leaves sealing to the server (a Milvus cluster seals on its own; Milvus
    /// Lite searches unsealed rows by brute force).
    #[arg(long, env = "PARLEY_MILVUS_FLUSH_THRESHOLD", default_value_t = 2048)]
    pub milvus_flush_threshold: u32,

    #[arg(long, env = "PARLEY_EMBEDDER_GROUP", default_value = "parley-embedder")]
    pub embedder_group: String,

    /// Kafka transactional id, unique per running instance (default: group id + random suffix).
    #[arg(long, env = "PARLEY_EMBEDDER_TRANSACTIONAL_ID")]
    pub embedder_transactional_id: Option<String>,
}

#[derive(Debug, Error)]
pub enum EmbedderError {
    #[error(transparent)]
    EventLog(#[from] EventLogError),
    #[error(transparent)]
    Events(#[from] EventsError),
    #[error("kafka: {0}")]
    Kafka(#[from] KafkaError),
    #[error(transparent)]
    Retrieval(#[from] RetrievalError),
    #[error("shut down before the batch was stored")]
    ShutDown,
}

/// How long the consumer may sit idle before offsets of output-less batches are committed.
const IDLE_FLUSH: Duration = Duration::from_secs(1);
/// Longest pause between attempts while Milvus or the embedding service is down.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// Runs the embedder until `shutdown` is cancelled.
pub async fn run(
    kafka: &KafkaSettings,
    registry_url: &str,
    backend: Arc<dyn EmbeddingBackend>,
    store: VectorStore,
    args: EmbedderArgs,
    shutdown: CancellationToken,
) -> Result<(), EmbedderError> {
    let topics = kafka.topics();
    let consumer = transactional_consumer(kafka, &args.embedder_group, &[&topics.events, &topics.documents])?;
    let transactional_id = instance_transactional_id(&args.embedder_group, args.embedder_transactional_id.as_deref());
    let transactions = TransactionalProducer::new(kafka, &transactional_id)?;
    info!(group = %args.embedder_group, %transactional_id, model = backend.model(), collection = store.collection(),
          "embedder started");
    let mut worker = Worker {
        codec: EventCodec::new(registry_url)?,
        backend,
        store,
        topics,
        group_id: args.embedder_group.clone(),
        batch_size: usize::from(args.embedder_batch_size),
        chunk_chars: usize::try_from(args.chunk_chars).unwrap_or(usize::MAX),
        chunk_overlap: usize::try_from(args.chunk_overlap).unwrap_or(0),
        owners: Owners::default(),
        flush_threshold: usize::try_from(args.milvus_flush_threshold).unwrap_or(usize::MAX),
        unflushed: 0,
    };
    let mut uncommitted = Uncommitted::default();
    loop {
        let batch =
            match next_batch(&consumer, worker.batch_size, args.embedder_max_wait, IDLE_FLUSH, &shutdown).await? {
                Poll::Shutdown => break,
                Poll::Idle => {
                    transactions.commit(&consumer, &mut uncommitted, vec![]).await?;
                    worker.flush_if(|unflushed| unflushed > 0).await;
                    continue;
                }
                Poll::Batch(batch) => batch,
            };
        let outgoing = match worker.process(&batch, &shutdown).await {
            Err(EmbedderError::ShutDown) => break, // not committed: re-delivered
            outgoing => outgoing?,
        };
        uncommitted.add(&batch);
        if !outgoing.is_empty() {
            transactions.commit(&consumer, &mut uncommitted, outgoing).await?;
        }
    }
    transactions.commit(&consumer, &mut uncommitted, vec![]).await?;
    info!("embedder stopping");
    Ok(())
}

struct Worker {
    codec: EventCodec,
    backend: Arc<dyn EmbeddingBackend>,
    store: VectorStore,
    topics: Topics,
    group_id: String,
    batch_size: usize,
    chunk_chars: usize,
    chunk_overlap: usize,
    owners: Owners,
    flush_threshold: usize,
    unflushed: usize,
}

impl Worker {
    /// Flushes the collection when `due(unflushed vectors)` holds (never with threshold 0).
    /// A failed flush only delays sealing: the vectors are stored and searchable already.
    async fn flush_if(&mut self, due: impl Fn(usize) -> bool) {
        if self.flush_threshold == 0 || !due(self.unflushed) {
            return;
        }
        match self.store.flush().await {
            Ok(()) => self.unflushed = 0,
            Err(error) => warn!(%error, "flush failed; retried later"),
        }
    }

    /// Embeds and stores a batch: the records to append for it (EmbeddingsIndexed, dead letters).
    async fn process(
        &mut self,
        batch: &[OwnedMessage],
        shutdown: &CancellationToken,
    ) -> Result<Vec<Outgoing>, EmbedderError> {
        let mut outgoing = Vec::new();
        let mut changes = Vec::new();
        for message in batch {
            match self.change_of(message, shutdown).await? {
                Ok(change) => changes.push(change),
                Err(error) => {
                    warn!(topic = message.topic(), partition = message.partition(), offset = message.offset(),
                          %error, "undecodable record sent to the dead-letter topic");
                    let letter = dead_letter_for(message, &self.group_id, &error.to_string());
                    outgoing.push(Outgoing {
                        topic: self.topics.dead_letter.clone(),
                        key: String::from_utf8_lossy(message.key().unwrap_or_default()).into_owned(),
                        payload: self.codec.encode(&letter).await?,
                        traceparent: None,
                    });
                }
            }
        }
        let (deletions, mut records) = plan(changes);
        if deletions.is_empty() && records.is_empty() {
            return Ok(outgoing);
        }
        // One batch serves many turns' traces: linked to each, parented by none.
        let span = info_span!(parent: None, "embedder.batch", records = batch.len(), vectors = records.len(),
                              deletions = deletions.len());
        for message in batch {
            link_trace(&span, header_traceparent(message));
        }
        let traceparent = traceparent_of(&span, None);
        async {
            for deletion in &deletions {
                until_done(shutdown, "milvus delete", || self.store.delete(deletion)).await?;
                info!(filter = %deletion.expression(), "document vectors deleted");
            }
            if records.is_empty() {
                return Ok(outgoing);
            }
            for group in records.chunks_mut(self.batch_size) {
                let texts: Vec<String> = group.iter().map(|r| r.text.clone()).collect();
                let vectors = until_done(shutdown, "embedding", || self.backend.embed(&texts)).await?;
                for (record, vector) in group.iter_mut().zip(vectors) {
                    record.embedding = vector;
                }
            }
            until_done(shutdown, "milvus upsert", || self.store.upsert(&records)).await?;
            info!(vectors = records.len(), "stored");
            self.unflushed += records.len();
            let threshold = self.flush_threshold;
            self.flush_if(|unflushed| unflushed >= threshold).await;
            for mut event in indexed_events(&records, self.backend.model(), self.store.collection()) {
                event.envelope.traceparent = Some(traceparent.clone());
                outgoing.push(Outgoing {
                    topic: self.topics.embeddings.clone(),
                    key: event.source_id.clone(),
                    payload: self.codec.encode(&event).await?,
                    traceparent: Some(traceparent.clone()),
                });
            }
            Ok(outgoing)
        }
        .instrument(span)
        .await
    }

    /// What one Kafka record asks of the vector store, or why it cannot be decoded (a
    /// poison record). Registry outages are waited out, never treated as poison.
    async fn change_of(
        &mut self,
        message: &OwnedMessage,
        shutdown: &CancellationToken,
    ) -> Result<Result<Change, EventsError>, EmbedderError> {
        let payload = message.payload().unwrap_or_default();
        if message.topic() == self.topics.documents {
            let decoded = retry_while_registry_down(shutdown, || self.codec.decode_document_event(payload)).await;
            let Some(decoded) = decoded else { return Err(EmbedderError::ShutDown) };
            return Ok(decoded.map(|d| match d.event {
                DocumentEvent::Submitted(document) => {
                    Change::Upsert(document_records(&document, self.chunk_chars, self.chunk_overlap))
                }
                DocumentEvent::Deleted(deleted) => document_deletion(&deleted),
            }));
        }
        let decoded = retry_while_registry_down(shutdown, || self.codec.decode_conversation_event(payload)).await;
        let Some(decoded) = decoded else { return Err(EmbedderError::ShutDown) };
        Ok(decoded.map(|d| match message_record(&d.event, &mut self.owners) {
            Ok(record) => Change::Upsert(record.into_iter().collect()),
            Err(Skipped::UnknownOwner { event_id }) => {
                warn!(%event_id, "answer of a conversation whose owner is unknown is not embedded");
                Change::Upsert(vec![])
            }
        }))
    }
}

/// Retries `attempt` with doubling pauses (up to [`MAX_BACKOFF`]) until it succeeds or
/// shutdown is requested: a downstream outage pauses the embedder, it never skips records.
async fn until_done<T, F, Fut>(shutdown: &CancellationToken, what: &str, mut attempt: F) -> Result<T, EmbedderError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, RetrievalError>>,
{
    let mut pause = Duration::from_millis(100);
    loop {
        match attempt().await {
            Ok(value) => return Ok(value),
            Err(error) => {
                warn!(%error, retry_in_ms = pause.as_millis(), "{what} failed; retrying");
                tokio::select! {
                    () = shutdown.cancelled() => return Err(EmbedderError::ShutDown),
                    () = tokio::time::sleep(pause) => {}
                }
                pause = (pause * 2).min(MAX_BACKOFF);
            }
        }
    }
}
