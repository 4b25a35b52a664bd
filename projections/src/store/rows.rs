//! The rows of the context projection: what the projector writes and readers get back.

use parley_eventlog::LogPosition;
use parley_events::conversation::{Message, MessageKind};
use parley_events::turn::{ConversationHead, OpenQuery};
use parley_events::{CachedAnswer, ConversationId, EventId, InvalidId, RetrievedContext, UserId};
use uuid::Uuid;

use super::{Generation, Store};
use crate::error::ProjectionError;

/// A conversation's row of the projection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConversationRow {
    /// The conversation.
    pub conversation_id: ConversationId,
    /// Its owner.
    pub user_id: UserId,
    /// When it started (ms since the epoch).
    pub started_at: i64,
    /// When its last event happened.
    pub updated_at: i64,
    /// The last sequence applied.
    pub last_sequence: i64,
    /// The query waiting for its outcome.
    pub open_query_event_id: Option<EventId>,
    /// Its first question, cut.
    pub title: String,
}

impl ConversationRow {
    /// The writer's view of the conversation (owner, last sequence, open turn).
    pub fn head(&self) -> ConversationHead {
        ConversationHead {
            owner: self.user_id.clone(),
            last_sequence: self.last_sequence,
            open_query: self.open_query_event_id.map(|event_id| OpenQuery {
                event_id,
                sequence: self.last_sequence,
                client_message_id: String::new(),
            }),
        }
    }
}

/// Where one event of a conversation sits in the log (the replay/audit index).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventLocation {
    /// The event's sequence.
    pub sequence: i64,
    /// Its id.
    pub event_id: EventId,
    /// Its Avro record name.
    pub event_type: String,
    /// Its topic.
    pub topic: String,
    /// Its partition.
    pub partition: i32,
    /// Its offset.
    pub offset: i64,
}

impl EventLocation {
    /// The record's position in the log.
    pub fn position(&self) -> LogPosition {
        LogPosition { topic: self.topic.clone(), partition: self.partition, offset: self.offset }
    }
}

/// user_id, started_at, updated_at, last_sequence, open_query_event_id, title
type ConversationColumns = (String, i64, i64, i64, Option<String>, Option<String>);

type MessageColumns = (
    i64,
    String,
    String,
    String,
    i64,
    Option<String>,
    Option<String>,
    Option<i32>,
    Option<i32>,
    Option<i64>,
    Option<String>,
    Option<Vec<RetrievedColumns>>,
    Option<CachedColumns>,
);

/// Where a cached answer came from: answer_event_id, query_event_id, similarity.
type CachedColumns = (String, String, f32);

/// One retrieved context of an answer: vector_id, source_kind, source_id, source_event_id,
/// position, score.
type RetrievedColumns = (String, String, String, String, i64, f32);

impl Store {
    /// Writes a conversation's row as of `head` (with its title, if its first question is
    /// known), and its entry in its owner's list.
    pub async fn insert_conversation(
        &self,
        g: &Generation,
        id: ConversationId,
        head: &ConversationHead,
        started_at: i64,
        updated_at: i64,
        title: &str,
    ) -> Result<(), ProjectionError> {
        let (id, user) = (id.uuid(), head.owner.as_str());
        let open = head.open_query.as_ref().map(|q| q.event_id.to_string());
        let row = (id, user, started_at, updated_at, head.last_sequence, open, title);
        let (conversation, by_user) = futures::join!(
            Box::pin(self.exec(&g.insert_conversation, row)),
            Box::pin(self.exec(&g.insert_by_user, (user, started_at, id, title)))
        );
        conversation.and(by_user)
    }

    /// Sets the title (the first question) in both rows.
    pub async fn set_title(
        &self,
        g: &Generation,
        id: ConversationId,
        user: &UserId,
        started_at: i64,
        title: &str,
    ) -> Result<(), ProjectionError> {
        let (id, user) = (id.uuid(), user.as_str());
        let (conversation, by_user) = futures::join!(
            Box::pin(self.exec(&g.update_title, (title, id))),
            Box::pin(self.exec(&g.insert_by_user, (user, started_at, id, title)))
        );
        conversation.and(by_user)
    }

    /// Writes the head after an event.
    pub async fn advance_conversation(
        &self,
        g: &Generation,
        id: ConversationId,
        head: &ConversationHead,
        updated_at: i64,
    ) -> Result<(), ProjectionError> {
        let open = head.open_query.as_ref().map(|q| q.event_id.to_string());
        self.exec(&g.update_conversation, (updated_at, head.last_sequence, open, id.uuid())).await
    }

    /// Writes a conversation's messages: unlogged batches of one partition (the
    /// conversation's), each under the store's batch size limit, so a batch of the log
    /// costs a round trip per conversation rather than one per message.
    pub async fn insert_messages(
        &self,
        g: &Generation,
        id: ConversationId,
        messages: &[Message],
    ) -> Result<(), ProjectionError> {
        let row = |m: &Message| {
            (
                id.uuid(),
                m.sequence,
                m.event_id.to_string(),
                m.kind.as_str(),
                m.text.clone(),
                m.occurred_at,
                m.query_event_id.map(|id| id.to_string()),
                m.model.clone(),
                m.prompt_tokens,
                m.completion_tokens,
                m.llm_latency_ms,
                m.error_kind.clone(),
                m.retrieved.iter().map(retrieved_columns).collect::<Vec<_>>(),
                m.cached_from
                    .as_ref()
                    .map(|c| (c.answer_event_id.to_string(), c.query_event_id.to_string(), c.similarity)),
            )
        };
        for part in batch_parts(messages, |m| m.text.len() + 64 * m.retrieved.len()) {
            self.exec_batch(&g.insert_message, part.iter().map(row).collect()).await?;
        }
        Ok(())
    }

    /// Writes where a conversation's events are in the log (batched as messages are).
    pub async fn insert_locations(
        &self,
        g: &Generation,
        id: ConversationId,
        locations: &[EventLocation],
    ) -> Result<(), ProjectionError> {
        let row = |l: &EventLocation| {
            (
                id.uuid(),
                l.sequence,
                l.event_id.to_string(),
                l.event_type.clone(),
                l.topic.clone(),
                l.partition,
                l.offset,
            )
        };
        for part in batch_parts(locations, |l| l.topic.len() + l.event_type.len()) {
            self.exec_batch(&g.insert_location, part.iter().map(row).collect()).await?;
        }
        Ok(())
    }

    /// Records the next offset of `partition` to apply.
    pub async fn store_progress(
        &self,
        g: &Generation,
        topic: &str,
        partition: i32,
        next_offset: i64,
    ) -> Result<(), ProjectionError> {
        self.exec(&g.upsert_progress, (topic, partition, next_offset)).await
    }

    /// The conversation's row, if it has one.
    pub async fn conversation(
        &self,
        g: &Generation,
        id: ConversationId,
    ) -> Result<Option<ConversationRow>, ProjectionError> {
        let rows: Vec<ConversationColumns> = self.select(&g.select_conversation, (id.uuid(),)).await?;
        rows.into_iter()
            .next()
            .map(|(user_id, started_at, updated_at, last_sequence, open_query_event_id, title)| {
                Ok(ConversationRow {
                    conversation_id: id,
                    user_id: stored_id(&user_id)?,
                    started_at,
                    updated_at,
                    last_sequence,
                    open_query_event_id: open_query_event_id.as_deref().map(stored_id).transpose()?,
                    title: title.unwrap_or_default(),
                })
            })
            .transpose()
    }

    /// The conversation's messages in sequence order.
    pub async fn messages(&self, g: &Generation, id: ConversationId) -> Result<Vec<Message>, ProjectionError> {
        let rows: Vec<MessageColumns> = self.select(&g.select_messages, (id.uuid(),)).await?;
        rows.into_iter()
            .map(
                |(
                    sequence,
                    event_id,
                    kind,
                    text,
                    occurred_at,
                    query_event_id,
                    model,
                    prompt_tokens,
                    completion_tokens,
                    llm_latency_ms,
                    error_kind,
                    retrieved,
                    cached_from,
                )| {
                    let kind = MessageKind::parse(&kind)
                        .ok_or_else(|| ProjectionError::Corrupt(format!("message kind {kind:?}")))?;
                    Ok(Message {
                        sequence,
                        event_id: stored_id(&event_id)?,
                        kind,
                        text,
                        occurred_at,
                        query_event_id: query_event_id.as_deref().map(stored_id).transpose()?,
                        model,
                        prompt_tokens,
                        completion_tokens,
                        llm_latency_ms,
                        error_kind,
                        retrieved: retrieved
                            .unwrap_or_default()
                            .into_iter()
                            .map(retrieved_context)
                            .collect::<Result<_, _>>()?,
                        cached_from: cached_from
                            .map(|(answer, query, similarity)| {
                                Ok::<_, ProjectionError>(CachedAnswer {
                                    answer_event_id: stored_id(&answer)?,
                                    query_event_id: stored_id(&query)?,
                                    similarity,
                                })
                            })
                            .transpose()?,
                    })
                },
            )
            .collect()
    }

    /// A user's conversations, newest first, `limit` at a time; `before` is the
    /// (started_at, conversation_id) of the last one of the previous page.
    pub async fn conversations_of(
        &self,
        g: &Generation,
        user: &UserId,
        before: Option<(i64, ConversationId)>,
        limit: i32,
    ) -> Result<Vec<(i64, ConversationId, String)>, ProjectionError> {
        let user = user.as_str();
        let rows: Vec<(i64, Uuid, Option<String>)> = match before {
            None => self.select(&g.select_by_user, (user, limit)).await?,
            Some((at, id)) => self.select(&g.select_by_user_before, (user, at, id.uuid(), limit)).await?,
        };
        Ok(rows.into_iter().map(|(at, id, title)| (at, id.into(), title.unwrap_or_default())).collect())
    }

    /// Where the conversation's events are in the log.
    pub async fn locations(&self, g: &Generation, id: ConversationId) -> Result<Vec<EventLocation>, ProjectionError> {
        let rows: Vec<(i64, String, String, String, i32, i64)> = self.select(&g.select_locations, (id.uuid(),)).await?;
        rows.into_iter()
            .map(|(sequence, event_id, event_type, topic, partition, offset)| {
                Ok(EventLocation { sequence, event_id: stored_id(&event_id)?, event_type, topic, partition, offset })
            })
            .collect()
    }

    /// Per partition of `topic`, the next offset this generation will apply.
    pub async fn progress(&self, g: &Generation, topic: &str) -> Result<Vec<(i32, i64)>, ProjectionError> {
        self.select(&g.select_progress, (topic,)).await
    }

    /// The next offset of `partition` of `topic` this generation will apply (0: none yet).
    pub async fn applied(&self, g: &Generation, topic: &str, partition: i32) -> Result<i64, ProjectionError> {
        let progress = self.progress(g, topic).await?;
        Ok(progress.into_iter().find(|(p, _)| *p == partition).map_or(0, |(_, next)| next))
    }
}

fn retrieved_columns(r: &RetrievedContext) -> RetrievedColumns {
    (
        r.vector_id.clone(),
        r.source_kind.clone(),
        r.source_id.clone(),
        r.source_event_id.to_string(),
        r.position,
        r.score,
    )
}

fn retrieved_context(
    (vector_id, source_kind, source_id, source_event_id, position, score): RetrievedColumns,
) -> Result<RetrievedContext, ProjectionError> {
    let source_event_id = stored_id(&source_event_id)?;
    Ok(RetrievedContext { vector_id, source_kind, source_id, source_event_id, position, score })
}

/// An id read back from a row: the projection wrote only valid ids, so a bad one is a
/// corrupt row (never silently skipped).
fn stored_id<T: std::str::FromStr<Err = InvalidId>>(value: &str) -> Result<T, ProjectionError> {
    value.parse().map_err(|e: InvalidId| ProjectionError::Corrupt(e.to_string()))
}

/// Rows per unlogged batch at most.
const BATCH_ROWS: usize = 100;
/// Bytes per batch at most: under Cassandra's default `batch_size_fail_threshold` (50 KiB).
const BATCH_BYTES: usize = 32 * 1024;
/// What a row costs a batch besides its variable part (ids, numbers, overhead).
const ROW_BYTES: usize = 160;

/// `rows` cut into runs that fit one batch, `size` being a row's variable bytes. A row
/// larger than a batch goes alone.
fn batch_parts<T>(rows: &[T], size: impl Fn(&T) -> usize) -> Vec<&[T]> {
    let mut parts = Vec::new();
    let (mut start, mut bytes) = (0, 0);
    for (i, row) in rows.iter().enumerate() {
        let row_bytes = ROW_BYTES + size(row);
        if i > start && (i - start == BATCH_ROWS || bytes + row_bytes > BATCH_BYTES) {
            parts.push(&rows[start..i]);
            (start, bytes) = (i, 0);
        }
        bytes += row_bytes;
    }
    if start < rows.len() {
        parts.push(&rows[start..]);
    }
    parts
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_are_cut_into_batches_under_the_row_and_byte_limits() {
        let small = vec![0usize; 250];
        let parts = batch_parts(&small, |_| 10);
        assert_eq!(parts.iter().map(|p| p.len()).collect::<Vec<_>>(), [100, 100, 50]);
        let large = vec![20_000usize, 20_000, 100, 60_000, 5];
        let parts = batch_parts(&large, |size| *size);
        assert_eq!(parts.iter().map(|p| p.len()).collect::<Vec<_>>(), [1, 2, 1, 1], "{parts:?}");
        assert!(batch_parts(&Vec::<usize>::new(), |_| 0).is_empty());
    }
}
