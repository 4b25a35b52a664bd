//! The embedder: a [`Processor`] of the event log's driver, over units of up to
//! `--embedder-batch-size` records. A unit of records (conversation events and documents)
//! is turned into deletions and vector records; the deletions are applied, the records
//! embedded `batch_size` texts at a time and upserted into Milvus. Only after Milvus
//! acknowledged are the EmbeddingsIndexed events and the batch's offsets committed, in one
//! Kafka transaction: a crash in between re-delivers the batch, the deletions are applied
//! again (harmless) and the deterministic vector ids make the second upsert overwrite the
//! first, so no vector is ever stored twice and none is lost.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use clap::Args;
use parley_eventlog::driver::{Decoded, DriverSettings, Processor, QueueAge};
use parley_eventlog::lanes::Lanes;
use parley_eventlog::registry_wait::retry_while_registry_down;
use parley_eventlog::settings::parse_duration;
use parley_eventlog::trace::{header_traceparent, link_trace, traceparent_of};
use parley_eventlog::transaction::{Outgoing, instance_transactional_id};
use parley_eventlog::{EventLogError, KafkaSettings, Topics};
use parley_events::sealing::ERASED;
use parley_events::{ConversationEvent, DocumentEvent, EventCodec, EventsError};
use parley_projections::keys::KeyStore;
use parley_projections::reader::LiveReader;
use parley_retrieval::{EmbeddingBackend, RetrievalError, VectorStore};
use rdkafka::Message;
use rdkafka::message::OwnedMessage;
use thiserror::Error;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, info, info_span, warn};

use crate::sources::{
    Change, Owners, Skipped, document_deletion, document_records, indexed_events, message_record, plan,
};

/// The largest chunk when the operator sets none (replay cuts retrieved chunks again with it).
pub const DEFAULT_CHUNK_CHARS: u32 = 800;
/// The characters consecutive chunks share when the operator sets none.
pub const DEFAULT_CHUNK_OVERLAP: u32 = 120;

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
    #[arg(long, env = "PARLEY_CHUNK_CHARS", default_value_t = DEFAULT_CHUNK_CHARS,
          value_parser = clap::value_parser!(u32).range(50..=100_000))]
    pub chunk_chars: u32,

    /// Characters shared by consecutive chunks.
    #[arg(long, env = "PARLEY_CHUNK_OVERLAP", default_value_t = DEFAULT_CHUNK_OVERLAP,
          value_parser = clap::value_parser!(u32).range(0..=50_000))]
    pub chunk_overlap: u32,

    /// Flush the collection (seal its rows into indexed segments) once this many vectors
    /// were stored since the last flush, and whenever the embedder is idle with unflushed
    /// vectors. 0 leaves sealing to the server (a Milvus cluster seals on its own; Milvus
    /// Lite searches unsealed rows by brute force).
    #[arg(long, env = "PARLEY_MILVUS_FLUSH_THRESHOLD", default_value_t = 2048)]
    pub milvus_flush_threshold: u32,

    /// The consumer group every embedder instance shares.
    #[arg(long, env = "PARLEY_EMBEDDER_GROUP", default_value = "parley-embedder")]
    pub embedder_group: String,

    /// Kafka transactional id, unique per running instance (default: group id + random suffix).
    #[arg(long, env = "PARLEY_EMBEDDER_TRANSACTIONAL_ID")]
    pub embedder_transactional_id: Option<String>,
}

/// Why the embedder stopped.
#[derive(Debug, Error)]
pub enum EmbedderError {
    /// Kafka failed.
    #[error(transparent)]
    EventLog(#[from] EventLogError),
    /// An event could not be encoded or decoded.
    #[error(transparent)]
    Events(#[from] EventsError),
    /// Embedding or the vector store failed for good.
    #[error(transparent)]
    Retrieval(#[from] RetrievalError),
    /// The shutdown came while a batch waited for Milvus or the embedding service.
    #[error("shut down before the batch was stored")]
    ShutDown,
}

/// Longest pause between attempts while Milvus or the embedding service is down.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// What the embedder reads and writes in the CQL store (none in tests of the embedder alone).
#[derive(Debug, Clone)]
pub struct CqlStores {
    /// The semantic cache's rows: a deleted document's cached answers go with its vectors.
    pub cache: Arc<LiveReader>,
    /// People's data keys, to open sealed content before it is embedded (none: no master
    /// key is configured).
    pub keys: Option<KeyStore>,
}

/// Runs the embedder until `shutdown` is cancelled.
pub async fn run(
    kafka: &KafkaSettings,
    registry_url: &str,
    backend: Arc<dyn EmbeddingBackend>,
    store: VectorStore,
    cql: Option<CqlStores>,
    args: EmbedderArgs,
    shutdown: CancellationToken,
) -> Result<(), EmbedderError> {
    let topics = kafka.topics();
    let codec = Arc::new(EventCodec::new(registry_url)?);
    // Messages of conversations going on before documents (bulk), 4:1 when both wait.
    let lanes = Lanes::new(vec!["messages", "documents"], 4, {
        let documents = topics.documents.clone();
        move |topic, _| usize::from(topic == documents)
    });
    let settings = DriverSettings {
        group_id: args.embedder_group.clone(),
        transactional_id: instance_transactional_id(
            &args.embedder_group,
            args.embedder_transactional_id.as_deref(),
            kafka.instance_id.as_deref(),
        ),
        topics: vec![topics.events.clone(), topics.documents.clone()],
        dead_letter_topic: topics.dead_letter.clone(),
        batch_size: usize::from(args.embedder_batch_size),
        batch_wait: args.embedder_max_wait,
        // One unit at a time: a document's deletion and its resubmission stay in order.
        concurrency: 1,
        queue: QueueAge::new(&lanes),
        lanes,
        one_per_key: false,
    };
    info!(group = %args.embedder_group, model = backend.model(), collection = store.collection(), "embedder started");
    let worker = Arc::new(Worker {
        codec: codec.clone(),
        backend,
        store,
        cache: cql.as_ref().map(|cql| cql.cache.clone()),
        keys: cql.and_then(|cql| cql.keys),
        topics,
        batch_size: usize::from(args.embedder_batch_size),
        chunk_chars: usize::try_from(args.chunk_chars).unwrap_or(usize::MAX),
        chunk_overlap: usize::try_from(args.chunk_overlap).unwrap_or(0),
        owners: Mutex::new(Owners::default()),
        flush_threshold: usize::try_from(args.milvus_flush_threshold).unwrap_or(usize::MAX),
        unflushed: tokio::sync::Mutex::new(0),
        shutdown: shutdown.clone(),
    });
    parley_eventlog::driver::run(kafka, settings, worker, codec, shutdown).await?;
    info!("embedder stopped");
    Ok(())
}

/// A record the embedder reads: a conversation event or a document event.
#[derive(Debug)]
enum Source {
    Conversation(ConversationEvent),
    Document(DocumentEvent),
}

impl Source {
    /// Content whose owner was erased (it opened as [`ERASED`]): never embedded, so a
    /// re-delivery or a re-embedding of the log puts nothing of theirs back in the store.
    fn is_erased(&self) -> bool {
        match self {
            Self::Document(DocumentEvent::Submitted(document)) => document.text == ERASED,
            Self::Conversation(ConversationEvent::QueryReceived(query)) => query.text == ERASED,
            Self::Conversation(ConversationEvent::ResponseGenerated(reply)) => reply.text == ERASED,
            Self::Document(DocumentEvent::Deleted(_)) | Self::Conversation(_) => false,
        }
    }
}

struct Worker {
    codec: Arc<EventCodec>,
    backend: Arc<dyn EmbeddingBackend>,
    store: VectorStore,
    /// The semantic cache's rows: a deleted document's cached answers go with its vectors
    /// (none: no CQL store was given, as in tests of the embedder alone).
    cache: Option<Arc<LiveReader>>,
    keys: Option<KeyStore>,
    topics: Topics,
    batch_size: usize,
    chunk_chars: usize,
    chunk_overlap: usize,
    owners: Mutex<Owners>,
    flush_threshold: usize,
    /// Vectors stored since the last flush.
    unflushed: tokio::sync::Mutex<usize>,
    shutdown: CancellationToken,
}

impl Processor for Worker {
    type Item = Source;
    type Error = EmbedderError;

    async fn decode(&self, record: &OwnedMessage) -> Option<Decoded<Source>> {
        let payload = record.payload().unwrap_or_default();
        if record.topic() == self.topics.documents {
            let decoded = retry_while_registry_down(&self.shutdown, || self.codec.decode_document_event(payload));
            let mut decoded = decoded.await?;
            if let (Some(keys), Ok(DocumentEvent::Submitted(document))) =
                (&self.keys, decoded.as_mut().map(|d| &mut d.event))
                && !keys.open_event_waiting(document, &self.shutdown).await
            {
                return None;
            }
            return Some(decoded.map(|d| Source::Document(d.event)));
        }
        let decoded = retry_while_registry_down(&self.shutdown, || self.codec.decode_conversation_event(payload));
        let mut decoded = decoded.await?;
        if let (Some(keys), Ok(decoded)) = (&self.keys, &mut decoded)
            && !keys.open_event_waiting(&mut decoded.event, &self.shutdown).await
        {
            return None;
        }
        Some(decoded.map(|d| Source::Conversation(d.event)))
    }

    fn wants(&self, source: &Source) -> bool {
        // Every message and document is embedded (or learnt from: owners), but an erased one.
        !source.is_erased()
    }

    async fn process(self: Arc<Self>, unit: Vec<(OwnedMessage, Source)>) -> Result<Vec<Outgoing>, EmbedderError> {
        let changes = unit.iter().map(|(_, source)| self.change_of(source)).collect();
        let messages: Vec<&OwnedMessage> = unit.iter().map(|(message, _)| message).collect();
        self.store_changes(&messages, changes).await
    }

    async fn idle(&self) {
        self.flush_if(|unflushed| unflushed > 0).await;
    }
}

impl Worker {
    /// Flushes the collection when `due(unflushed vectors)` holds (never with threshold 0).
    /// A failed flush only delays sealing: the vectors are stored and searchable already.
    async fn flush_if(&self, due: impl Fn(usize) -> bool) {
        let mut unflushed = self.unflushed.lock().await;
        if self.flush_threshold == 0 || !due(*unflushed) {
            return;
        }
        match self.store.flush().await {
            Ok(()) => *unflushed = 0,
            Err(error) => warn!(%error, "flush failed; retried later"),
        }
    }

    /// Applies a unit's changes: deletions, then embeddings upserted; the records to
    /// append for it (EmbeddingsIndexed).
    async fn store_changes(
        &self,
        batch: &[&OwnedMessage],
        changes: Vec<Change>,
    ) -> Result<Vec<Outgoing>, EmbedderError> {
        let mut outgoing = Vec::new();
        let shutdown = &self.shutdown;
        let (deletions, mut records) = plan(changes);
        if deletions.is_empty() && records.is_empty() {
            return Ok(outgoing);
        }
        // One batch serves many turns' traces: linked to each, parented by none.
        let span = info_span!(parent: None, "embedder.batch", records = batch.len(), vectors = records.len(),
                              deletions = deletions.len());
        for message in batch {
            link_trace(&span, header_traceparent(*message));
        }
        let traceparent = traceparent_of(&span, None);
        async {
            for deletion in &deletions {
                until_done(shutdown, "milvus delete", || self.store.delete(deletion)).await?;
                info!(filter = %deletion.expression(), "document vectors deleted");
                if let Some(cache) = &self.cache {
                    let purge = || async {
                        let generation = cache.generation().await?;
                        cache
                            .store()
                            .purge_cached_answers_using(&generation, &deletion.owner, &deletion.source_ids)
                            .await
                    };
                    let purged = until_done(shutdown, "cached answers purge", purge).await?;
                    info!(purged, "cached answers that quoted the document removed");
                }
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
            *self.unflushed.lock().await += records.len();
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

    /// What one record asks of the vector store.
    fn change_of(&self, source: &Source) -> Change {
        match source {
            Source::Document(DocumentEvent::Submitted(document)) => {
                Change::Upsert(document_records(document, self.chunk_chars, self.chunk_overlap))
            }
            Source::Document(DocumentEvent::Deleted(deleted)) => document_deletion(deleted),
            Source::Conversation(event) => {
                let mut owners = self.owners.lock().unwrap_or_else(PoisonError::into_inner);
                match message_record(event, &mut owners) {
                    Ok(record) => Change::Upsert(record.into_iter().collect()),
                    Err(Skipped::UnknownOwner { event_id }) => {
                        warn!(%event_id, "answer of a conversation whose owner is unknown is not embedded");
                        Change::Upsert(vec![])
                    }
                }
            }
        }
    }
}

/// Retries `attempt` with doubling pauses (up to [`MAX_BACKOFF`]) until it succeeds or
/// shutdown is requested: a downstream outage pauses the embedder, it never skips records.
async fn until_done<T, E, F, Fut>(shutdown: &CancellationToken, what: &str, mut attempt: F) -> Result<T, EmbedderError>
where
    E: std::fmt::Display,
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
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
