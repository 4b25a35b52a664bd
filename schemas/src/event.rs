//! Typed mirrors of the `.avsc` files. Field names and types match the schemas exactly;
//! a round-trip test per event keeps them in step.

use std::time::{SystemTime, UNIX_EPOCH};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::ids::{ConversationId, DocumentId, EventId, UserId};

/// A Rust type that is one Avro record of the catalog.
pub trait AvroEvent: Serialize + DeserializeOwned {
    /// Full Avro record name; also the registry subject (RecordNameStrategy).
    const FULL_NAME: &'static str;

    /// The record name without its namespace, as audit and the projection's index show it.
    fn short_name() -> &'static str {
        Self::FULL_NAME.rsplit('.').next().unwrap_or(Self::FULL_NAME)
    }
}

/// Who wrote an event: name and version of the service.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Producer {
    /// The service, e.g. `parley-gateway`.
    pub name: &'static str,
    /// Its version (the crate's).
    pub version: &'static str,
}

/// The common envelope of every conversation event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Envelope {
    /// Unique id of this event.
    pub event_id: EventId,
    /// For the `documents` topic, the document's id ([`DocumentId::stream`]).
    pub conversation_id: ConversationId,
    /// Per-conversation sequence number, dense from 1; projections apply events idempotently by
    /// it.
    pub sequence: i64,
    /// When the fact happened, UTC.
    pub occurred_at: i64,
    /// Event id of the event that caused this one, if any.
    pub causation_id: Option<EventId>,
    /// Shared by every event of one request flow (a turn).
    pub correlation_id: String,
    /// Service that wrote the event, e.g. parley-gateway.
    pub producer_name: String,
    /// Version of that service.
    pub producer_version: String,
    /// W3C trace context of the span that wrote the event (also in the Kafka header
    /// `traceparent`).
    pub traceparent: Option<String>,
}

impl Envelope {
    /// An envelope stamped now, for `event_id` at `sequence` of `conversation_id`.
    pub fn new(event_id: EventId, conversation_id: ConversationId, sequence: i64, producer: Producer) -> Self {
        Self {
            event_id,
            conversation_id,
            sequence,
            occurred_at: now_millis(),
            causation_id: None,
            correlation_id: event_id.to_string(),
            producer_name: producer.name.to_owned(),
            producer_version: producer.version.to_owned(),
            traceparent: None,
        }
    }

    /// Marks this event as caused by `cause`, in the same correlation (request flow).
    pub fn caused_by(mut self, cause: &Envelope) -> Self {
        self.causation_id = Some(cause.event_id);
        self.correlation_id = cause.correlation_id.clone();
        self
    }

    /// Puts this event in the correlation (request flow) `correlation_id`.
    pub fn with_correlation(mut self, correlation_id: impl Into<String>) -> Self {
        self.correlation_id = correlation_id.into();
        self
    }

    /// Records the W3C trace context of the span that writes the event.
    pub fn with_traceparent(mut self, traceparent: Option<String>) -> Self {
        self.traceparent = traceparent;
        self
    }
}

/// Milliseconds since the Unix epoch, the unit of every `timestamp-millis` field.
pub fn now_millis() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// A user opened a new conversation. Always sequence 1.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConversationStarted {
    /// What every conversation event carries: ids, sequence, time, producer, trace.
    pub envelope: Envelope,
    /// Owner; only this user may read or extend the conversation.
    pub user_id: UserId,
}

/// The gateway accepted a user's message. Turn k uses sequence 2k; its outcome uses 2k+1.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserQueryReceived {
    /// What every conversation event carries: ids, sequence, time, producer, trace.
    pub envelope: Envelope,
    /// Who asked (the conversation's owner).
    pub user_id: UserId,
    /// Client-chosen id; a repeat with the same id is the same query.
    pub client_message_id: String,
    /// The question.
    pub text: String,
    /// The asker wants the model's answer, not one from the semantic cache (v2; false in
    /// v1 events).
    pub no_cache: bool,
    /// Since v3: whose data key sealed `text` ([`crate::sealing`]); empty: plain text.
    #[serde(default)]
    pub sealed_for: String,
}

/// The model answered a query. Carries everything replay needs, so replay never calls the
/// model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LLMResponseGenerated {
    /// What every conversation event carries: ids, sequence, time, producer, trace.
    pub envelope: Envelope,
    /// Event id of the UserQueryReceived answered.
    pub query_event_id: EventId,
    /// The whole answer.
    pub text: String,
    /// The model that answered, as the model server named it.
    pub model: String,
    /// stop, length, ...
    pub finish_reason: String,
    /// Tokens of the prompt, as the model server counted them.
    pub prompt_tokens: i32,
    /// Tokens of the answer.
    pub completion_tokens: i32,
    /// Wall time of the successful LLM call (the model's share of the turn).
    pub llm_latency_ms: i64,
    /// From the call to the first token, when the answer was streamed.
    pub time_to_first_token_ms: Option<i64>,
    /// LLM calls made, 1 when the first succeeded.
    pub attempts: i32,
    /// Events whose content went into the prompt.
    pub context_event_ids: Vec<EventId>,
    /// `None` in events written before schema v2 (an empty string on the wire).
    #[serde(with = "crate::ids::empty_is_none")]
    pub user_id: Option<UserId>,
    /// Chunks and earlier messages retrieved from the vector store and put into the prompt,
    /// best first.
    pub retrieved: Vec<RetrievedContext>,
    /// Digest of the system prompt and the earlier turns in the prompt (v3; empty before).
    pub context_fingerprint: String,
    /// Set when the semantic cache served this answer instead of the model.
    pub cached_from: Option<CachedAnswer>,
    /// Since v4: whose data key sealed `text` and `prompt.digest` ([`crate::sealing`]);
    /// empty: plain text.
    #[serde(default)]
    pub sealed_for: String,
    /// Since v5: what proves the prompt the model was sent; None for an answer from the
    /// semantic cache and before v5.
    #[serde(default)]
    pub prompt: Option<Box<PromptProof>>,
}

/// What an answer records of the prompt it was generated from, so replay can rebuild the
/// prompt from events and prove it is the one sent (`parley_inference::proof`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PromptProof {
    /// SHA-256 of the messages sent (`parley_inference::proof::digest`); sealed with the
    /// text.
    pub digest: String,
    /// The builder that assembled them (`parley-prompt/<version>`).
    pub builder: String,
    /// `stable` or `sliding`.
    pub layout: String,
    /// The token budget it was built within.
    pub token_budget: i32,
    /// SHA-256 of the system prompt alone (in clear).
    pub system_prompt_digest: String,
    /// How many messages it had.
    pub messages: i32,
}

/// Where an answer served from the semantic cache came from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CachedAnswer {
    /// The model's answer this one repeats.
    pub answer_event_id: EventId,
    /// The question that answer answered.
    pub query_event_id: EventId,
    /// Cosine similarity of the two questions' embeddings.
    pub similarity: f32,
}

/// One vector-store hit that went into a prompt.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RetrievedContext {
    /// Id in the vector store.
    pub vector_id: String,
    /// document or message.
    pub source_kind: String,
    /// Document id or conversation id.
    pub source_id: String,
    /// The event whose text was retrieved.
    pub source_event_id: EventId,
    /// Chunk number or message sequence.
    pub position: i64,
    /// Similarity (inner product of unit vectors, 1 = identical).
    pub score: f32,
}

/// A document added to a user's knowledge base (the `documents` topic).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DocumentSubmitted {
    /// What every conversation event carries: ids, sequence, time, producer, trace.
    pub envelope: Envelope,
    /// uuid5 of owner, source name and content: the same file submitted twice is the same
    /// document.
    pub document_id: DocumentId,
    /// User id; only this user's searches and answers retrieve the document.
    pub owner: UserId,
    /// File name or caller-chosen title.
    pub title: String,
    /// text/plain or text/markdown.
    pub media_type: String,
    /// The whole document, UTF-8.
    pub text: String,
    /// Caller-supplied labels, copied onto every chunk's search metadata.
    pub metadata: std::collections::HashMap<String, String>,
    /// Since v2: whose data key sealed `title`, `text` and the values of `metadata`
    /// ([`crate::sealing`]); empty: plain text.
    #[serde(default)]
    pub sealed_for: String,
}

/// A document taken out of a user's knowledge base (the `documents` topic).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DocumentDeleted {
    /// What every conversation event carries: ids, sequence, time, producer, trace.
    pub envelope: Envelope,
    /// The document taken out.
    pub document_id: DocumentId,
    /// The user who asked; only vectors of this owner's document are removed, so naming another
    /// user's document removes nothing.
    pub owner: UserId,
}

/// What the `documents` topic carries, in the order it happened per document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DocumentEvent {
    /// A document added.
    Submitted(DocumentSubmitted),
    /// A document taken out.
    Deleted(DocumentDeleted),
}

/// Someone asked that a person's data be erased (the `erasures` topic). Holds no personal
/// data beyond the id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErasureRequested {
    /// What every event carries; `conversation_id` is [`UserId::erasure_stream`], sequence 1.
    pub envelope: Envelope,
    /// The person to erase.
    pub user_id: UserId,
    /// `self` (the person, through `DELETE /api/me`) or `operator` (`parley erase`).
    pub requested_by: String,
    /// A ticket or reference an operator gave; empty when the person asked.
    #[serde(default)]
    pub reason: String,
}

/// An erasure is done: the person's data key destroyed, their copies purged (the
/// `erasures` topic, after its request).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErasureCompleted {
    /// What every event carries; caused by the request, sequence 2.
    pub envelope: Envelope,
    /// The person erased.
    pub user_id: UserId,
    /// The [`ErasureRequested`] this completes.
    pub request_event_id: EventId,
    /// When the person's data key was destroyed (ms since the epoch; the first erasure's).
    pub key_erased_at: i64,
    /// Each place purged, with how many items this pass removed there.
    pub purged: Vec<PurgedPlace>,
}

/// One place an erasure purged, and how much.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PurgedPlace {
    /// e.g. `cql:messages`, `milvus:vectors`.
    pub place: String,
    /// Rows, partitions or vectors removed there by this pass.
    pub items: i64,
}

/// What the `erasures` topic carries, in order per person.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ErasureEvent {
    /// An erasure asked for.
    Requested(ErasureRequested),
    /// An erasure done.
    Completed(ErasureCompleted),
}

impl ErasureEvent {
    /// The person it is about.
    pub fn user_id(&self) -> &UserId {
        match self {
            Self::Requested(e) => &e.user_id,
            Self::Completed(e) => &e.user_id,
        }
    }
}

/// An operator changed a person's tier or budgets (the `accounts` topic, keyed by user id).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccountChanged {
    /// The person's account stream, sequence 1.
    pub envelope: Envelope,
    /// The person.
    pub user_id: UserId,
    /// Who changed it.
    pub changed_by: String,
    /// The new tier; None: unchanged.
    pub tier: Option<String>,
    /// The person's own budgets from now on; None: unchanged.
    pub budgets: Option<Budgets>,
}

/// A person's own token budgets, as an [`AccountChanged`] records them (0: no limit).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Budgets {
    /// Model tokens per UTC day.
    pub daily: i64,
    /// Model tokens per UTC month.
    pub monthly: i64,
    /// Model tokens per conversation.
    pub per_conversation: i64,
}

/// Vectors stored for one source (the `embeddings` topic).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EmbeddingsIndexed {
    /// What every conversation event carries: ids, sequence, time, producer, trace.
    pub envelope: Envelope,
    /// The user whose searches find these vectors.
    pub owner: UserId,
    /// document or message.
    pub source_kind: String,
    /// Document id or conversation id.
    pub source_id: String,
    /// Embedding model that produced the vectors.
    pub model: String,
    /// Length of each vector.
    pub dimension: i32,
    /// Vector store collection written.
    pub collection: String,
    /// The vectors stored for the source, one per chunk or message.
    pub vectors: Vec<IndexedVector>,
}

/// One vector of an [`EmbeddingsIndexed`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IndexedVector {
    /// Primary key in the collection; deterministic, so a re-delivery overwrites instead of
    /// adding.
    pub vector_id: String,
    /// The DocumentSubmitted, UserQueryReceived or LLMResponseGenerated event embedded.
    pub source_event_id: EventId,
    /// Chunk number within the document, or the message's sequence in its conversation.
    pub position: i64,
    /// Length of the embedded text in characters.
    pub chars: i32,
}

/// The model could not answer a query after bounded retries. Ends the turn like a response
/// does.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LLMResponseFailed {
    /// What every conversation event carries: ids, sequence, time, producer, trace.
    pub envelope: Envelope,
    /// Event id of the UserQueryReceived that got no answer.
    pub query_event_id: EventId,
    /// timeout, unavailable, rejected, circuit_open, invalid_response.
    pub error_kind: String,
    /// What went wrong, for people.
    pub error_message: String,
    /// Model calls made (0: refused before any, e.g. over budget).
    pub attempts: i32,
}

/// The user asked to stop the answer to a query (it annotates the query's turn: same
/// sequence number, advances nothing).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TurnCancelRequested {
    /// What every conversation event carries: ids, sequence, time, producer, trace.
    pub envelope: Envelope,
    /// Event id of the UserQueryReceived whose answer is to stop.
    pub query_event_id: EventId,
    /// Who asked (the conversation's owner).
    pub user_id: UserId,
}

/// A piece of an answer while it is generated. Lives on the short-retention tokens topic;
/// not conversation state, never needed for replay.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LLMTokenDelta {
    /// The conversation (also the record's key).
    pub conversation_id: ConversationId,
    /// The query whose answer this delta is part of.
    pub query_event_id: EventId,
    /// 0-based position of this delta within its attempt's answer.
    pub index: i32,
    /// The text the model produced since the previous delta.
    pub delta: String,
    /// W3C trace context of the answer's span.
    pub traceparent: Option<String>,
    /// Since v2: the model call the delta comes from (1: the first; a retry starts at index 0).
    pub attempt: i32,
    /// Since v3: whose data key sealed `delta` ([`crate::sealing`], field
    /// [`crate::sealing::delta_field`] of the query's event id); empty: plain text.
    pub sealed_for: String,
}

/// A record a consumer could not process, with the original bytes, so nothing is silently
/// dropped.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeadLetter {
    /// Topic of the record given up on.
    pub source_topic: String,
    /// Its partition.
    pub source_partition: i32,
    /// Its offset.
    pub source_offset: i64,
    /// Its key, as written.
    #[serde(with = "serde_bytes")]
    pub key: Option<Vec<u8>>,
    /// Its value, as written (the bytes that did not decode).
    #[serde(with = "serde_bytes")]
    pub payload: Option<Vec<u8>>,
    /// Consumer group that gave up.
    pub consumer: String,
    /// Why the consumer gave up on it.
    pub error: String,
    /// When (ms since the epoch).
    pub failed_at: i64,
    /// Since v2: the record's text headers (a redrive writes them back).
    #[serde(default)]
    pub headers: std::collections::HashMap<String, String>,
}

impl AvroEvent for ConversationStarted {
    const FULL_NAME: &'static str = "io.parley.events.ConversationStarted";
}
impl AvroEvent for UserQueryReceived {
    const FULL_NAME: &'static str = "io.parley.events.UserQueryReceived";
}
impl AvroEvent for LLMResponseGenerated {
    const FULL_NAME: &'static str = "io.parley.events.LLMResponseGenerated";
}
impl AvroEvent for LLMResponseFailed {
    const FULL_NAME: &'static str = "io.parley.events.LLMResponseFailed";
}
impl AvroEvent for TurnCancelRequested {
    const FULL_NAME: &'static str = "io.parley.events.TurnCancelRequested";
}
impl AvroEvent for LLMTokenDelta {
    const FULL_NAME: &'static str = "io.parley.events.LLMTokenDelta";
}
impl AvroEvent for DeadLetter {
    const FULL_NAME: &'static str = "io.parley.events.DeadLetter";
}
/// An operator's decision on a dead letter (see `dead_letters` for what it means).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeadLetterResolved {
    /// The letter's position in the dead-letter topic.
    pub letter_partition: i32,
    /// Offset of the letter in the dead-letter topic.
    pub letter_offset: i64,
    /// Consumer group of the letter.
    pub consumer: String,
    /// Topic of the record the letter holds.
    pub source_topic: String,
    /// Its partition.
    pub source_partition: i32,
    /// Its offset.
    pub source_offset: i64,
    /// Its key (the key held back until this decision).
    #[serde(with = "serde_bytes")]
    pub key: Option<Vec<u8>>,
    /// [`REDRIVEN`](crate::dead_letters::REDRIVEN) or [`DISCARDED`](crate::dead_letters::DISCARDED).
    pub action: String,
    /// Where the copy was written (source topic and partition, this offset); redriven only.
    pub redriven_offset: Option<i64>,
    /// Who decided (the operator's name).
    pub resolved_by: String,
    /// Why, in the operator's words.
    pub reason: Option<String>,
    /// When (ms since the epoch).
    pub resolved_at: i64,
}

impl AvroEvent for DeadLetterResolved {
    const FULL_NAME: &'static str = "io.parley.events.DeadLetterResolved";
}
impl AvroEvent for DocumentSubmitted {
    const FULL_NAME: &'static str = "io.parley.events.DocumentSubmitted";
}
impl AvroEvent for DocumentDeleted {
    const FULL_NAME: &'static str = "io.parley.events.DocumentDeleted";
}
impl AvroEvent for AccountChanged {
    const FULL_NAME: &'static str = "io.parley.events.AccountChanged";
}
impl AvroEvent for ErasureRequested {
    const FULL_NAME: &'static str = "io.parley.events.ErasureRequested";
}
impl AvroEvent for ErasureCompleted {
    const FULL_NAME: &'static str = "io.parley.events.ErasureCompleted";
}
impl AvroEvent for EmbeddingsIndexed {
    const FULL_NAME: &'static str = "io.parley.events.EmbeddingsIndexed";
}

/// A record of the `dead-letter` topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeadLetterRecord {
    /// A record a consumer gave up on.
    Letter(DeadLetter),
    /// An operator's decision on a letter.
    Resolved(DeadLetterResolved),
}

/// Every durable fact about a conversation (the `conversation-events` topic).
#[derive(Debug, Clone, PartialEq)]
pub enum ConversationEvent {
    /// Sequence 1 of a conversation.
    Started(ConversationStarted),
    /// A turn's question.
    QueryReceived(UserQueryReceived),
    /// A turn's answer.
    ResponseGenerated(LLMResponseGenerated),
    /// A turn without an answer.
    ResponseFailed(LLMResponseFailed),
    /// A request to stop a turn's answer.
    CancelRequested(TurnCancelRequested),
}

impl ConversationEvent {
    /// The event's envelope, whatever its type.
    pub fn envelope(&self) -> &Envelope {
        match self {
            Self::Started(e) => &e.envelope,
            Self::QueryReceived(e) => &e.envelope,
            Self::ResponseGenerated(e) => &e.envelope,
            Self::ResponseFailed(e) => &e.envelope,
            Self::CancelRequested(e) => &e.envelope,
        }
    }

    /// The Avro record name, e.g. `UserQueryReceived`.
    pub fn type_name(&self) -> &'static str {
        match self {
            Self::Started(_) => ConversationStarted::short_name(),
            Self::QueryReceived(_) => UserQueryReceived::short_name(),
            Self::ResponseGenerated(_) => LLMResponseGenerated::short_name(),
            Self::ResponseFailed(_) => LLMResponseFailed::short_name(),
            Self::CancelRequested(_) => TurnCancelRequested::short_name(),
        }
    }
}
