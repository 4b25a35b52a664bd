//! What the embedder stores for each event, as plain functions: messages become one
//! vector each (id = the event id), documents one per chunk (id = uuid5 of document id and
//! chunk number). Ids are deterministic, so a re-delivered event overwrites its vectors.

use std::collections::{BTreeMap, HashMap};

use parley_events::{
    ConversationEvent, ConversationId, DocumentDeleted, DocumentId, DocumentSubmitted, EmbeddingsIndexed, Envelope,
    EventId, IndexedVector, Producer as EventSource, UserId,
};
use parley_retrieval::{SearchFilter, SourceKind, VectorRecord};
use uuid::Uuid;

use crate::chunking::chunk_text;

/// The producer named in the envelope of every event the embedder writes.
pub const SOURCE: EventSource = EventSource { name: "parley-embedder", version: env!("CARGO_PKG_VERSION") };

/// Conversation owners seen so far, for answers written before LLMResponseGenerated v2
/// carried the owner. Bounded: cleared wholesale when full (answers follow their query
/// closely in the same partition, so a miss is rare and only affects such old events).
#[derive(Debug, Default)]
pub struct Owners {
    by_conversation: HashMap<ConversationId, UserId>,
}

const MAX_OWNERS: usize = 100_000;

impl Owners {
    fn remember(&mut self, conversation_id: ConversationId, owner: &UserId) {
        if self.by_conversation.len() >= MAX_OWNERS {
            self.by_conversation.clear();
        }
        self.by_conversation.insert(conversation_id, owner.clone());
    }

    fn of(&self, conversation_id: ConversationId) -> Option<&UserId> {
        self.by_conversation.get(&conversation_id)
    }
}

/// Why an event yields no vector although it carries text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Skipped {
    /// An answer whose conversation owner is unknown: storing it unowned would leak it.
    UnknownOwner {
        /// The answer's event id.
        event_id: EventId,
    },
}

/// The vector (without embedding) for a conversation event, if it is a message.
pub fn message_record(event: &ConversationEvent, owners: &mut Owners) -> Result<Option<VectorRecord>, Skipped> {
    let (envelope, owner, label, text) = match event {
        ConversationEvent::Started(started) => {
            owners.remember(started.envelope.conversation_id, &started.user_id);
            return Ok(None);
        }
        ConversationEvent::QueryReceived(query) => {
            owners.remember(query.envelope.conversation_id, &query.user_id);
            (&query.envelope, query.user_id.clone(), "user", &query.text)
        }
        ConversationEvent::ResponseGenerated(answer) => {
            let owner = answer.user_id.clone().or_else(|| owners.of(answer.envelope.conversation_id).cloned());
            let Some(owner) = owner else {
                return Err(Skipped::UnknownOwner { event_id: answer.envelope.event_id });
            };
            (&answer.envelope, owner, "assistant", &answer.text)
        }
        ConversationEvent::ResponseFailed(_) | ConversationEvent::CancelRequested(_) => return Ok(None),
    };
    if text.trim().is_empty() {
        return Ok(None);
    }
    Ok(Some(VectorRecord {
        id: envelope.event_id.to_string(),
        owner,
        kind: SourceKind::Message,
        source_id: envelope.conversation_id,
        source_event_id: envelope.event_id,
        position: envelope.sequence,
        label: label.to_owned(),
        text: text.clone(),
        embedding: vec![],
    }))
}

/// The vectors (without embeddings) for a document's chunks.
pub fn document_records(document: &DocumentSubmitted, max_chars: usize, overlap: usize) -> Vec<VectorRecord> {
    chunk_text(&document.text, max_chars, overlap)
        .into_iter()
        .map(|chunk| VectorRecord {
            id: chunk_vector_id(document.document_id, chunk.position),
            owner: document.owner.clone(),
            kind: SourceKind::Document,
            source_id: document.document_id.stream(),
            source_event_id: document.envelope.event_id,
            position: chunk.position,
            label: document.title.clone(),
            text: chunk.text,
            embedding: vec![],
        })
        .collect()
}

/// What one record asks of the vector store.
#[derive(Debug, Clone, PartialEq)]
pub enum Change {
    /// Store these vectors (replacing any of the same id).
    Upsert(Vec<VectorRecord>),
    /// Remove what the filter admits: a document's vectors, of its owner only.
    Delete(SearchFilter),
}

/// The change a DocumentDeleted asks for: that owner's vectors of that document.
pub fn document_deletion(deleted: &DocumentDeleted) -> Change {
    Change::Delete(SearchFilter {
        kind: Some(SourceKind::Document),
        source_ids: vec![deleted.document_id.to_string()],
        ..SearchFilter::owner(deleted.owner.clone())
    })
}

/// A batch's changes, in log order, as what to delete and then what to upsert. A deletion
/// drops the vectors of the same owner's document queued before it in the batch (they would
/// be removed anyway); a later resubmission stays queued and is upserted after the
/// deletions. The same vector queued twice is stored once, as its last version.
pub fn plan(changes: Vec<Change>) -> (Vec<SearchFilter>, Vec<VectorRecord>) {
    let (mut deletions, mut upserts): (Vec<SearchFilter>, Vec<VectorRecord>) = (vec![], vec![]);
    for change in changes {
        match change {
            Change::Upsert(records) => upserts.extend(records),
            Change::Delete(filter) => {
                upserts.retain(|r| !(r.owner == filter.owner && filter.source_ids.contains(&r.source_id.to_string())));
                deletions.push(filter);
            }
        }
    }
    let mut seen = std::collections::HashSet::new();
    upserts.reverse();
    upserts.retain(|r| seen.insert(r.id.clone()));
    upserts.reverse();
    (deletions, upserts)
}

/// The vector id of chunk `position` of a document.
pub fn chunk_vector_id(document_id: DocumentId, position: i64) -> String {
    Uuid::new_v5(&document_id.uuid(), format!("chunk-{position}").as_bytes()).to_string()
}

/// One EmbeddingsIndexed per source among `records`, in source order. Event ids are
/// derived from the vector ids, so a re-delivered batch writes the same events.
pub fn indexed_events(records: &[VectorRecord], model: &str, collection: &str) -> Vec<EmbeddingsIndexed> {
    let mut by_source: BTreeMap<(SourceKind, ConversationId), Vec<&VectorRecord>> = BTreeMap::new();
    for record in records {
        by_source.entry((record.kind, record.source_id)).or_default().push(record);
    }
    by_source
        .into_iter()
        .map(|((kind, source_id), vectors)| {
            let ids = vectors.iter().map(|v| v.id.as_str()).collect::<Vec<_>>().join(",");
            let event_id = Uuid::new_v5(&Uuid::NAMESPACE_OID, format!("indexed:{ids}").as_bytes()).into();
            let mut envelope = Envelope::new(event_id, source_id, 0, SOURCE);
            envelope.causation_id = vectors.last().map(|v| v.source_event_id);
            // A group is never empty: it was made from a record.
            let first = vectors[0];
            EmbeddingsIndexed {
                envelope,
                owner: first.owner.clone(),
                source_kind: kind.as_str().to_owned(),
                source_id: source_id.to_string(),
                model: model.to_owned(),
                dimension: i32::try_from(first.embedding.len()).unwrap_or(i32::MAX),
                collection: collection.to_owned(),
                vectors: vectors
                    .iter()
                    .map(|v| IndexedVector {
                        vector_id: v.id.clone(),
                        source_event_id: v.source_event_id,
                        position: v.position,
                        chars: i32::try_from(v.text.chars().count()).unwrap_or(i32::MAX),
                    })
                    .collect(),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use parley_events::{ConversationStarted, LLMResponseGenerated, UserQueryReceived};

    use super::*;

    const P: EventSource = EventSource { name: "t", version: "0" };

    fn envelope(conversation: ConversationId, sequence: i64) -> Envelope {
        Envelope::new(EventId::random(), conversation, sequence, P)
    }

    fn answer(conversation: ConversationId, user_id: Option<&str>) -> ConversationEvent {
        ConversationEvent::ResponseGenerated(LLMResponseGenerated {
            sealed_for: String::new(),
            envelope: envelope(conversation, 3),
            query_event_id: EventId::random(),
            text: "Kafka is a log.".into(),
            model: "m".into(),
            finish_reason: "stop".into(),
            prompt_tokens: 1,
            completion_tokens: 1,
            llm_latency_ms: 1,
            time_to_first_token_ms: None,
            attempts: 1,
            context_event_ids: vec![],
            user_id: user_id.map(|u| u.parse().unwrap()),
            retrieved: vec![],
            context_fingerprint: String::new(),
            cached_from: None,
            prompt: None,
        })
    }

    #[test]
    fn messages_are_one_vector_each_keyed_by_event_id() {
        let conversation = ConversationId::random();
        let mut owners = Owners::default();
        let started = ConversationEvent::Started(ConversationStarted {
            envelope: envelope(conversation, 1),
            user_id: "alice".parse().unwrap(),
        });
        assert_eq!(message_record(&started, &mut owners), Ok(None));
        let query = ConversationEvent::QueryReceived(UserQueryReceived {
            sealed_for: String::new(),
            envelope: envelope(conversation, 2),
            user_id: "alice".parse().unwrap(),
            client_message_id: "m".into(),
            text: "What is Kafka?".into(),
            no_cache: false,
        });
        let record = message_record(&query, &mut owners).unwrap().unwrap();
        assert_eq!(record.id, query.envelope().event_id.to_string());
        assert_eq!((record.owner.as_str(), record.label.as_str(), record.position), ("alice", "user", 2));
        assert_eq!(record.source_id, conversation);
    }

    #[test]
    fn an_answer_without_owner_takes_its_conversation_owner_or_is_skipped() {
        let conversation = ConversationId::random();
        let mut owners = Owners::default();
        let orphan = answer(conversation, None);
        assert!(matches!(message_record(&orphan, &mut owners), Err(Skipped::UnknownOwner { .. })));
        let started = ConversationEvent::Started(ConversationStarted {
            envelope: envelope(conversation, 1),
            user_id: "bob".parse().unwrap(),
        });
        message_record(&started, &mut owners).unwrap();
        assert_eq!(message_record(&orphan, &mut owners).unwrap().unwrap().owner, "bob");
        assert_eq!(message_record(&answer(conversation, Some("carol")), &mut owners).unwrap().unwrap().owner, "carol");
    }

    #[test]
    fn document_chunks_get_stable_ids_and_one_indexed_event() {
        let document = submitted("alice");
        let mut records = document_records(&document, 16, 0);
        assert_eq!(records.len(), 3);
        assert_eq!(records, document_records(&document, 16, 0), "deterministic");
        assert_eq!(records[1].id, chunk_vector_id(document.document_id, 1));
        assert_ne!(records[0].id, records[1].id);
        records.iter_mut().for_each(|r| r.embedding = vec![0.0; 384]);
        let events = indexed_events(&records, "all-MiniLM-L6-v2", "c");
        assert_eq!(events.len(), 1);
        assert_eq!(events[0].vectors.len(), 3);
        assert_eq!((events[0].dimension, events[0].source_kind.as_str()), (384, "document"));
        assert_eq!(events[0].envelope.event_id, indexed_events(&records, "all-MiniLM-L6-v2", "c")[0].envelope.event_id);
    }

    fn submitted(owner: &str) -> DocumentSubmitted {
        DocumentSubmitted {
            sealed_for: String::new(),
            envelope: envelope(ConversationId::random(), 1),
            document_id: DocumentId::random(),
            owner: owner.parse().unwrap(),
            title: "notes.md".into(),
            media_type: "text/markdown".into(),
            text: "One fact.\n\nAnother fact.\n\nA third fact.".into(),
            metadata: HashMap::new(),
        }
    }

    fn deleted(document: &DocumentSubmitted, owner: &str) -> Change {
        document_deletion(&DocumentDeleted {
            envelope: envelope(ConversationId::random(), 2),
            document_id: document.document_id,
            owner: owner.parse().unwrap(),
        })
    }

    #[test]
    fn a_deletion_drops_what_its_owner_queued_before_it_and_runs_before_later_upserts() {
        let document = submitted("alice");
        let upsert = || Change::Upsert(document_records(&document, 16, 0));

        let (deletions, upserts) = plan(vec![upsert(), deleted(&document, "alice")]);
        assert_eq!(deletions.len(), 1);
        assert!(upserts.is_empty(), "submitted then deleted in one batch: nothing stored");
        let expression = deletions[0].expression();
        assert!(
            expression.contains("\"alice\"") && expression.contains(&document.document_id.to_string()),
            "{expression}"
        );

        let (deletions, upserts) = plan(vec![upsert(), deleted(&document, "alice"), upsert()]);
        assert_eq!((deletions.len(), upserts.len()), (1, 3), "deleted then submitted again: stored after the deletion");

        let (deletions, upserts) = plan(vec![upsert(), deleted(&document, "bob")]);
        assert_eq!((deletions.len(), upserts.len()), (1, 3), "another user's deletion leaves Alice's vectors queued");
        assert!(deletions[0].expression().contains("\"bob\""));
    }

    #[test]
    fn the_same_vector_queued_twice_is_stored_once() {
        let document = submitted("alice");
        let (_, upserts) = plan(vec![
            Change::Upsert(document_records(&document, 16, 0)),
            Change::Upsert(document_records(&document, 16, 0)),
        ]);
        assert_eq!(upserts.len(), 3);
    }
}
