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
    pub name: &'static str,
    pub version: &'static str,
}

/// The common envelope of every conversation event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Envelope {
    pub event_id: EventId,
    /// For the `documents` topic, the document's id ([`DocumentId::stream`]).
    pub conversation_id: ConversationId,
    pub sequence: i64,
    pub occurred_at: i64,
    pub causation_id: Option<EventId>,
    pub correlation_id: String,
    pub producer_name: String,
    pub producer_version: String,
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

    pub fn with_correlation(mut self, correlation_id: impl Into<String>) -> Self {
        self.correlation_id = correlation_id.into();
        self
    }

    pub fn with_traceparent(mut self, traceparent: Option<String>) -> Self {
        self.traceparent = traceparent;
        self
    }
}

/// Milliseconds since the Unix epoch, the unit of every `timestamp-millis` field.
pub fn now_millis() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConversationStarted {
    pub envelope: Envelope,
    pub user_id: UserId,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserQueryReceived {
    pub envelope: Envelope,
    pub user_id: UserId,
    pub client_message_id: String,
    pub text: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LLMResponseGenerated {
    pub envelope: Envelope,
    pub query_event_id: EventId,
    pub text: String,
    pub model: String,
    pub finish_reason: String,
    pub prompt_tokens: i32,
    pub completion_tokens: i32,
    pub llm_latency_ms: i64,
    pub time_to_first_token_ms: Option<i64>,
    pub attempts: i32,
    pub context_event_ids: Vec<EventId>,
    /// `None` in events written before schema v2 (an empty string on the wire).
    #[serde(with = "crate::ids::empty_is_none")]
    pub user_id: Option<UserId>,
    pub retrieved: Vec<RetrievedContext>,
}

/// One vector-store hit that went into a prompt.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RetrievedContext {
    pub vector_id: String,
    pub source_kind: String,
    pub source_id: String,
    pub source_event_id: EventId,
    pub position: i64,
    pub score: f32,
}

/// A document added to a user's knowledge base (the `documents` topic).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DocumentSubmitted {
    pub envelope: Envelope,
    pub document_id: DocumentId,
    pub owner: UserId,
    pub title: String,
    pub media_type: String,
    pub text: String,
    pub metadata: std::collections::HashMap<String, String>,
}

/// A document taken out of a user's knowledge base (the `documents` topic).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DocumentDeleted {
    pub envelope: Envelope,
    pub document_id: DocumentId,
    pub owner: UserId,
}

/// What the `documents` topic carries, in the order it happened per document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DocumentEvent {
    Submitted(DocumentSubmitted),
    Deleted(DocumentDeleted),
}

/// Vectors stored for one source (the `embeddings` topic).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EmbeddingsIndexed {
    pub envelope: Envelope,
    pub owner: UserId,
    pub source_kind: String,
    pub source_id: String,
    pub model: String,
    pub dimension: i32,
    pub collection: String,
    pub vectors: Vec<IndexedVector>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IndexedVector {
    pub vector_id: String,
    pub source_event_id: EventId,
    pub position: i64,
    pub chars: i32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LLMResponseFailed {
    pub envelope: Envelope,
    pub query_event_id: EventId,
    pub error_kind: String,
    pub error_message: String,
    pub attempts: i32,
}

/// The user asked to stop the answer to a query (it annotates the query's turn: same
/// sequence number, advances nothing).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TurnCancelRequested {
    pub envelope: Envelope,
    pub query_event_id: EventId,
    pub user_id: UserId,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LLMTokenDelta {
    pub conversation_id: ConversationId,
    pub query_event_id: EventId,
    pub index: i32,
    pub delta: String,
    pub traceparent: Option<String>,
    /// Since v2: the model call the delta comes from (1: the first; a retry starts at index 0).
    pub attempt: i32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeadLetter {
    pub source_topic: String,
    pub source_partition: i32,
    pub source_offset: i64,
    #[serde(with = "serde_bytes")]
    pub key: Option<Vec<u8>>,
    #[serde(with = "serde_bytes")]
    pub payload: Option<Vec<u8>>,
    pub consumer: String,
    pub error: String,
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
    pub letter_partition: i32,
    pub letter_offset: i64,
    pub consumer: String,
    pub source_topic: String,
    pub source_partition: i32,
    pub source_offset: i64,
    #[serde(with = "serde_bytes")]
    pub key: Option<Vec<u8>>,
    /// [`REDRIVEN`](crate::dead_letters::REDRIVEN) or [`DISCARDED`](crate::dead_letters::DISCARDED).
    pub action: String,
    pub redriven_offset: Option<i64>,
    pub resolved_by: String,
    pub reason: Option<String>,
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
impl AvroEvent for EmbeddingsIndexed {
    const FULL_NAME: &'static str = "io.parley.events.EmbeddingsIndexed";
}

/// A record of the `dead-letter` topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeadLetterRecord {
    Letter(DeadLetter),
    Resolved(DeadLetterResolved),
}

/// Every durable fact about a conversation (the `conversation-events` topic).
#[derive(Debug, Clone, PartialEq)]
pub enum ConversationEvent {
    Started(ConversationStarted),
    QueryReceived(UserQueryReceived),
    ResponseGenerated(LLMResponseGenerated),
    ResponseFailed(LLMResponseFailed),
    CancelRequested(TurnCancelRequested),
}

impl ConversationEvent {
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
