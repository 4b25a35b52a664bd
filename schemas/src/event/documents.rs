//! The knowledge path's records: documents submitted and deleted (the `documents` topic)
//! and what the embedder stored for them (the `embeddings` topic).

use serde::{Deserialize, Serialize};

use super::{AvroEvent, Envelope};
use crate::ids::{DocumentId, EventId, UserId};

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

impl AvroEvent for DocumentSubmitted {
    const FULL_NAME: &'static str = "io.parley.events.DocumentSubmitted";
}

impl AvroEvent for DocumentDeleted {
    const FULL_NAME: &'static str = "io.parley.events.DocumentDeleted";
}

impl AvroEvent for EmbeddingsIndexed {
    const FULL_NAME: &'static str = "io.parley.events.EmbeddingsIndexed";
}
