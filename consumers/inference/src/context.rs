//! Where earlier turns come from: the context projection (the query path), once it has
//! applied the turn before the one being answered; if it has not within a bounded wait
//! (or cannot be read), the log itself, so a turn is never silently missing.

use std::time::{Duration, Instant};

use parley_events::conversation::{ConversationState, Message};
use parley_events::{ConversationId, UserQueryReceived};
use parley_projections::reader::LiveReader;
use parley_projections::replay::LogReader;
use parley_projections::{ProjectionError, Store};
use tokio::sync::Mutex;
use tracing::warn;

/// The projection usually trails the answer the client saw by a millisecond or two, so the
/// first re-reads come quickly; the pause doubles up to a cap to keep CQL load bounded.
const FIRST_PAUSE: Duration = Duration::from_millis(2);
const MAX_PAUSE: Duration = Duration::from_millis(50);

/// Where a query's earlier turns come from: the projection, or else the log.
#[derive(Debug)]
pub struct ContextSource {
    reader: LiveReader,
    log: Mutex<LogReader>,
    wait: Duration,
}

impl ContextSource {
    /// Reads from `store`, falling back to `log` after waiting `wait` for the projection.
    pub async fn new(store: Store, log: LogReader, wait: Duration) -> Result<Self, ProjectionError> {
        Ok(Self { reader: LiveReader::new(store).await?, log: Mutex::new(log), wait })
    }

    /// The messages of the query's conversation before it. `partition` and `offset` are
    /// the query's own log coordinates (the log fallback reads that partition up to it).
    pub async fn history(
        &self,
        query: &UserQueryReceived,
        partition: i32,
        offset: i64,
    ) -> Result<Vec<Message>, ProjectionError> {
        let sequence = query.envelope.sequence;
        if sequence <= parley_events::turn::STARTED_SEQUENCE + 1 {
            return Ok(vec![]); // the first question has no history
        }
        let id = query.envelope.conversation_id;
        let deadline = Instant::now() + self.wait;
        let mut pause = FIRST_PAUSE;
        loop {
            match self.projected_history(id, sequence).await {
                Ok(Some(messages)) => return Ok(messages),
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
        Ok(state.map(|s| s.messages.into_iter().filter(|m| m.sequence < sequence).collect()).unwrap_or_default())
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
