//! Typed mirrors of the `.avsc` files. Field names and types match the schemas exactly;
//! a round-trip test per event keeps them in step. This module holds the envelope and the
//! conversation's own events; the other topics' records are in its submodules (and
//! `crate::experiment`), re-exported here.

use std::time::{SystemTime, UNIX_EPOCH};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::ids::{ConversationId, EventId, UserId};

mod dead_letter;
mod documents;
mod people;

pub use dead_letter::{DeadLetter, DeadLetterRecord, DeadLetterResolved};
pub use documents::{DocumentDeleted, DocumentEvent, DocumentSubmitted, EmbeddingsIndexed, IndexedVector};
pub use people::{AccountChanged, Budgets, ErasureCompleted, ErasureEvent, ErasureRequested, PurgedPlace};

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
    /// For the `documents` topic, the document's id ([`crate::ids::DocumentId::stream`]).
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
    /// Since v6: the earlier questions sent again with their knowledge block, in order.
    #[serde(default)]
    pub knowledge_turns: Vec<EventId>,
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
