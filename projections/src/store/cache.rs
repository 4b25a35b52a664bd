//! The semantic cache's entries: one row per answer the model gave in full, by its asker
//! and question, so a lookup reads only the candidates the vector search named. Part of the
//! projection's generation, so a rebuild rebuilds the cache with everything else.

use parley_events::{ConversationId, EventId, LLMResponseGenerated, RetrievedContext, UserId};
use uuid::Uuid;

use super::{Generation, Store};
use crate::error::ProjectionError;

/// How long a row is kept at most (the table's default TTL): inference serves entries
/// younger than its own `--cache-ttl`, which cannot exceed this.
pub const CACHE_RETENTION_SECONDS: u32 = 7 * 24 * 3600;

/// An answer the semantic cache may serve again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CachedAnswerRow {
    /// The question it answered.
    pub query_event_id: EventId,
    /// The answer.
    pub answer_event_id: EventId,
    /// The conversation both are in.
    pub conversation_id: ConversationId,
    /// The answer's text.
    pub text: String,
    /// The model that gave it.
    pub model: String,
    /// The context it was given after ([`LLMResponseGenerated::context_fingerprint`]).
    pub context_fingerprint: String,
    /// The documents its prompt quoted, each `<document id>/<version>` (the version is the
    /// DocumentSubmitted event id, so a replaced document is another entry), sorted.
    pub documents: Vec<String>,
    /// How long the model took (what a hit saves).
    pub llm_latency_ms: i64,
    /// When it was answered (ms since the epoch).
    pub occurred_at: i64,
}

impl CachedAnswerRow {
    /// The entry an answer makes, if the cache may serve it again: a complete answer
    /// (`stop`) with text, that the model generated (not itself served from the cache) in
    /// a known context. Failed, cancelled and truncated (`length`) answers never are.
    pub fn of(answer: &LLMResponseGenerated) -> Option<Self> {
        let cacheable = answer.finish_reason == "stop"
            && answer.cached_from.is_none()
            && !answer.text.trim().is_empty()
            && !answer.context_fingerprint.is_empty();
        cacheable.then(|| {
            let documents = Self::documents_of(&answer.retrieved);
            Self {
                query_event_id: answer.query_event_id,
                answer_event_id: answer.envelope.event_id,
                conversation_id: answer.envelope.conversation_id,
                text: answer.text.clone(),
                model: answer.model.clone(),
                context_fingerprint: answer.context_fingerprint.clone(),
                documents,
                llm_latency_ms: answer.llm_latency_ms,
                occurred_at: answer.envelope.occurred_at,
            }
        })
    }
}

impl CachedAnswerRow {
    /// The documents a prompt quoted, as `<document id>/<version>` (the version is the
    /// DocumentSubmitted event id), sorted: what an answer and a new question must share.
    pub fn documents_of(retrieved: &[RetrievedContext]) -> Vec<String> {
        let mut documents: Vec<String> = retrieved
            .iter()
            .filter(|r| r.source_kind == "document")
            .map(|r| format!("{}/{}", r.source_id, r.source_event_id))
            .collect();
        documents.sort();
        documents.dedup();
        documents
    }
}

type Columns = (String, String, Uuid, String, String, String, Option<Vec<String>>, i64, i64);

/// The columns read and written, after `user_id`.
pub(super) const COLUMNS: &str = "query_event_id, answer_event_id, conversation_id, text, model, \
                                  context_fingerprint, documents, llm_latency_ms, occurred_at";

impl Store {
    /// Writes `user`'s entry (idempotent: a replayed answer writes the same row).
    pub async fn insert_cached_answer(
        &self,
        g: &Generation,
        user: &UserId,
        row: &CachedAnswerRow,
    ) -> Result<(), ProjectionError> {
        let values = (
            user.as_str(),
            row.query_event_id.to_string(),
            row.answer_event_id.to_string(),
            row.conversation_id.uuid(),
            &row.text,
            &row.model,
            &row.context_fingerprint,
            &row.documents,
            row.llm_latency_ms,
            row.occurred_at,
        );
        self.exec(&g.insert_cached_answer, values).await
    }

    /// `user`'s entries for these questions (those that have one).
    pub async fn cached_answers(
        &self,
        g: &Generation,
        user: &UserId,
        query_event_ids: &[EventId],
    ) -> Result<Vec<CachedAnswerRow>, ProjectionError> {
        let ids: Vec<String> = query_event_ids.iter().map(ToString::to_string).collect();
        let rows: Vec<Columns> = self.select(&g.select_cached_answers, (user.as_str(), ids)).await?;
        rows.into_iter().map(row).collect()
    }

    /// Every entry of `user`, oldest question id first.
    pub async fn cached_answers_of(
        &self,
        g: &Generation,
        user: &UserId,
    ) -> Result<Vec<CachedAnswerRow>, ProjectionError> {
        let rows: Vec<Columns> = self.select(&g.select_user_cached_answers, (user.as_str(),)).await?;
        rows.into_iter().map(row).collect()
    }

    /// Removes every entry of `user` (their cache is empty afterwards; conversations stay).
    pub async fn clear_cached_answers(&self, g: &Generation, user: &UserId) -> Result<(), ProjectionError> {
        self.exec(&g.delete_cached_answers, (user.as_str(),)).await
    }

    /// Removes `user`'s entries whose prompt quoted any of `document_ids` (any version);
    /// returns how many. Idempotent: a repeated purge finds nothing more.
    pub async fn purge_cached_answers_using(
        &self,
        g: &Generation,
        user: &UserId,
        document_ids: &[String],
    ) -> Result<usize, ProjectionError> {
        let mut purged = 0;
        for entry in self.cached_answers_of(g, user).await? {
            let used = entry.documents.iter().any(|quoted| {
                document_ids.iter().any(|id| quoted.split_once('/').is_some_and(|(document, _)| document == id))
            });
            if used {
                self.exec(&g.delete_cached_answer, (user.as_str(), entry.query_event_id.to_string())).await?;
                purged += 1;
            }
        }
        Ok(purged)
    }
}

/// A row as read.
fn row(
    (query, answer, conversation, text, model, fingerprint, documents, latency, occurred_at): Columns,
) -> Result<CachedAnswerRow, ProjectionError> {
    let id = |value: &str| value.parse().map_err(|e| ProjectionError::Corrupt(format!("answer_cache: {e}")));
    Ok(CachedAnswerRow {
        query_event_id: id(&query)?,
        answer_event_id: id(&answer)?,
        conversation_id: ConversationId::from(conversation),
        text,
        model,
        context_fingerprint: fingerprint,
        documents: documents.unwrap_or_default(),
        llm_latency_ms: latency,
        occurred_at,
    })
}
