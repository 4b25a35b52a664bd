//! Where earlier turns come from: the histories inference keeps of what it reads
//! ([`crate::history`]), with no read at all; for a conversation not kept, the context
//! projection (the query path), once it has applied the turn before the one being
//! answered; if it has not within a bounded wait (or cannot be read), the log itself, so a
//! turn is never silently missing. What was read is kept from then on.

use std::time::{Duration, Instant};

use parley_events::conversation::{ConversationState, Message};
use parley_events::{ConversationEvent, ConversationId, UserId, UserQueryReceived};
use parley_projections::reader::LiveReader;
use parley_projections::replay::LogReader;
use parley_projections::{ProjectionError, Store};
use tokio::sync::Mutex;
use tracing::warn;

use crate::history::Histories;
use crate::metrics;
use crate::prompt::PastKnowledge;

/// The projection usually trails the answer the client saw by a millisecond or two, so the
/// first re-reads come quickly; the pause doubles up to a cap to keep CQL load bounded.
const FIRST_PAUSE: Duration = Duration::from_millis(2);
const MAX_PAUSE: Duration = Duration::from_millis(50);

/// Where a query's earlier turns come from: kept, the projection, or else the log.
#[derive(Debug)]
pub struct ContextSource {
    kept: std::sync::Mutex<Histories>,
    reader: LiveReader,
    log: Mutex<LogReader>,
    wait: Duration,
}

impl ContextSource {
    /// Keeps up to `keep_bytes` of histories; reads the others from `store`, falling back to
    /// `log` after waiting `wait` for the projection.
    pub async fn new(store: Store, log: LogReader, wait: Duration, keep_bytes: usize) -> Result<Self, ProjectionError> {
        Ok(Self {
            kept: std::sync::Mutex::new(Histories::new(keep_bytes)),
            reader: LiveReader::new(store).await?,
            log: Mutex::new(log),
            wait,
        })
    }

    fn kept(&self) -> std::sync::MutexGuard<'_, Histories> {
        self.kept.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Applies an event read from the log (in log order) to the histories kept.
    pub fn observe(&self, event: &ConversationEvent) {
        self.kept().observe(event);
    }

    /// Forgets every history `owner` holds (their data was erased).
    pub fn forget_owner(&self, owner: &UserId) {
        self.kept().forget_owner(owner);
    }

    /// Forgets every history kept.
    pub fn forget_all(&self) {
        self.kept().forget_all();
    }

    /// The messages of the query's conversation before it, with the knowledge blocks
    /// their questions were sent with as far as they are kept. `partition` and `offset` are
    /// the query's own log coordinates (the log fallback reads that partition up to it).
    pub async fn history(
        &self,
        query: &UserQueryReceived,
        partition: i32,
        offset: i64,
    ) -> Result<(Vec<Message>, PastKnowledge), ProjectionError> {
        let (sequence, id) = (query.envelope.sequence, query.envelope.conversation_id);
        {
            let mut kept = self.kept();
            if let Some(found) = kept.before(id, sequence) {
                metrics::history("kept", kept.size());
                return Ok(found);
            }
        }
        let (messages, source) = self.read_history(query, partition, offset).await?;
        let mut kept = self.kept();
        kept.seed(id, sequence, &messages, &ConversationEvent::QueryReceived(query.clone()));
        metrics::history(source, kept.size());
        Ok((messages, PastKnowledge::new()))
    }

    /// Keeps the knowledge block `query` was sent with, for the next prompts.
    pub fn remember_knowledge(&self, query: &UserQueryReceived, block: String) {
        self.kept().remember_knowledge(query.envelope.conversation_id, query.envelope.event_id, block);
    }

    /// [`Self::history`] read from the projection (or else the log), and where from.
    async fn read_history(
        &self,
        query: &UserQueryReceived,
        partition: i32,
        offset: i64,
    ) -> Result<(Vec<Message>, &'static str), ProjectionError> {
        let sequence = query.envelope.sequence;
        if sequence <= parley_events::turn::STARTED_SEQUENCE + 1 {
            return Ok((vec![], "none")); // the first question has no history
        }
        let id = query.envelope.conversation_id;
        let deadline = Instant::now() + self.wait;
        let mut pause = FIRST_PAUSE;
        loop {
            match self.projected_history(id, sequence).await {
                Ok(Some(messages)) => return Ok((messages, "projection")),
                Ok(None) if Instant::now() < deadline => {
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(MAX_PAUSE);
                }
                Ok(None) => {
                    warn!(%id, sequence, wait = ?self.wait, "projection behind; reading the history from the log");
                    break;
                }
                Err(error) => {
                    warn!(%id, %error, "projection unavailable; reading the history from the log");
                    break;
                }
            }
        }
        let mut records = self.log.lock().await.read_partition_until(id, partition, offset).await?;
        if let Some(keys) = self.reader.store().keys() {
            keys.open_records(&mut records).await?;
        }
        let state = ConversationState::fold(records.iter().map(|r| &r.event));
        let messages = state.map(|s| s.messages.into_iter().filter(|m| m.sequence < sequence).collect());
        Ok((messages.unwrap_or_default(), "log"))
    }

    /// The history if the projection has applied every turn before `sequence`.
    async fn projected_history(
        &self,
        id: ConversationId,
        sequence: i64,
    ) -> Result<Option<Vec<Message>>, ProjectionError> {
        let generation = self.reader.generation().await?;
        let store = self.reader.store();
        match store.conversation(&generation, id).await? {
            Some(row) if row.last_sequence >= sequence - 1 => {
                let mut messages: Vec<Message> =
                    store.messages(&generation, id).await?.into_iter().filter(|m| m.sequence < sequence).collect();
                if let Some(keys) = store.keys() {
                    keys.open_messages(&row.user_id, &mut messages).await?;
                }
                Ok(Some(messages))
            }
            _ => Ok(None),
        }
    }
}
