//! Taking over a conversation this gateway does not hold (a new one, one another instance
//! served, one from before a restart): the projection's row plus what this gateway's own
//! listener read past the projection ([`crate::recent`]). The only wait is for this
//! gateway's listener to have read the conversation's partition to its end, a raw read of
//! the log; a projection that lags (a cold start, a rebuild, a slow or stopped CQL node)
//! makes no turn fail. Only when the listener's window does not reach back to where the
//! projection stands (it started past it, or outgrew its cap) does an adoption wait, bounded,
//! for the projection, as every adoption once did.

use std::sync::Arc;
use std::time::Duration;

use parley_eventlog::partitioner::partition_for_key;
use parley_eventlog::{EventLogError, EventProducer, LogPosition};
use parley_events::{AvroEvent, UserQueryReceived};
use parley_events::{ConversationId, UserId};
use parley_projections::ProjectionError;
use parley_projections::reader::{Freshness, LiveReader};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::hub::{Hub, WrittenQuery};
use crate::metrics;
use crate::recent::{Known, Recent};

/// What adopting a conversation came to.
#[derive(Debug)]
pub enum Adopted {
    /// This instance holds it now.
    Held,
    /// Not the user's (or no such conversation): indistinguishable to the client.
    Unknown,
    /// The log or the store did not answer in time: nothing was decided; the client retries.
    Unavailable(AdoptionError),
}

/// Why a conversation could not be adopted now (each says what to do: retry).
#[derive(Debug, thiserror::Error)]
pub enum AdoptionError {
    /// The partition's end could not be read.
    #[error("the event log did not answer; retry")]
    LogUnavailable(#[source] EventLogError),
    /// This gateway's listener has not read the partition to its end in time.
    #[error("this gateway has not read the log up to {at} within {wait:?}; retry")]
    ListenerBehind {
        /// The position it must have read.
        at: LogPosition,
        /// How long it was waited for.
        wait: Duration,
    },
    /// The CQL store failed.
    #[error("the conversation store did not answer; retry")]
    StoreUnavailable(#[from] ProjectionError),
    /// The projection has not reached where the listener's window starts, in time.
    #[error(
        "the conversation store has not caught up with {at}, where this gateway's own reading of the log \
         starts, within {wait:?}; retry"
    )]
    StoreBehind {
        /// The position it must have applied.
        at: LogPosition,
        /// How long it was waited for.
        wait: Duration,
    },
    /// The projection moved past the window at every try.
    #[error("the conversation store kept moving under the adoption; retry")]
    StoreKeptMoving,
}

/// How often the listener's window is pruned of what the projection applied.
const PRUNE_EVERY: Duration = Duration::from_millis(500);

/// Tries of an adoption whose window was pruned past the projection row it read (the
/// projection moved on between the two reads): each try reads again.
const TRIES: usize = 3;

/// Adopts conversations into a hub.
#[derive(Debug, Clone)]
pub struct Adopter {
    /// The conversations this instance holds.
    pub hub: Arc<Hub>,
    /// What the listener read past the projection.
    pub recent: Arc<Recent>,
    /// The projection's live generation.
    pub reader: Arc<LiveReader>,
    /// Asks the log for partition ends.
    pub producer: EventProducer,
    /// The events topic and its partition count.
    pub topic: String,
    /// How many partitions it has.
    pub partitions: i32,
    /// How long an adoption waits for the listener (and, past its window, the projection).
    pub wait: Duration,
}

impl Adopter {
    /// Makes this instance hold `user`'s conversation (or the new one their first message
    /// starts, when `new_conversation`) as the log has it.
    pub async fn adopt(&self, user: &UserId, conversation_id: ConversationId, new_conversation: bool) -> Adopted {
        let partition = partition_for_key(conversation_id.to_string().as_bytes(), self.partitions);
        let outcome = self.try_adopt(user, conversation_id, partition, new_conversation).await;
        if let Err(error) = &outcome {
            let cause = std::error::Error::source(error).map(ToString::to_string);
            warn!(%conversation_id, %error, ?cause, "could not adopt the conversation");
        }
        outcome.unwrap_or_else(Adopted::Unavailable)
    }

    async fn try_adopt(
        &self,
        user: &UserId,
        conversation_id: ConversationId,
        partition: i32,
        new_conversation: bool,
    ) -> Result<Adopted, AdoptionError> {
        let end = self.producer.end_offset(&self.topic, partition).await.map_err(AdoptionError::LogUnavailable)?;
        if !self.recent.wait_until_read(partition, end, self.wait).await {
            let at = LogPosition { topic: self.topic.clone(), partition, offset: end - 1 };
            return Err(AdoptionError::ListenerBehind { at, wait: self.wait });
        }
        for _ in 0..TRIES {
            let (applied, projected) = self.projected(conversation_id, partition).await?;
            let recent = self.recent.lock();
            // The window was pruned past what the row shows: read the row again.
            if recent.from(partition).is_some_and(|from| from > applied) {
                debug!(%conversation_id, applied, "the projection moved on during an adoption; reading again");
                continue;
            }
            return Ok(match recent.merge(partition, conversation_id, projected) {
                Some(known) if &known.head.owner == user => {
                    self.hub.adopt(conversation_id, known.head, partition, known.queries);
                    Adopted::Held
                }
                Some(_) => Adopted::Unknown,
                None if new_conversation => {
                    self.hub.adopt_new(conversation_id, user, partition);
                    Adopted::Held
                }
                None => Adopted::Unknown,
            });
        }
        Err(AdoptionError::StoreKeptMoving)
    }

    /// The projection's view of a conversation, read once it reaches back to the listener's
    /// window, and the offset of `partition` it had applied everything before.
    async fn projected(
        &self,
        conversation_id: ConversationId,
        partition: i32,
    ) -> Result<(i64, Option<Known>), AdoptionError> {
        let store = self.reader.store();
        let mut generation = self.reader.generation().await?;
        let mut applied = store.applied(&generation, &self.topic, partition).await?;
        let from = self.recent.lock().from(partition).unwrap_or(0);
        if from > applied {
            let last = LogPosition { topic: self.topic.clone(), partition, offset: from - 1 };
            if self.reader.wait_for(&last, self.wait).await? != Freshness::Applied {
                return Err(AdoptionError::StoreBehind { at: last, wait: self.wait });
            }
            generation = self.reader.generation().await?;
            applied = store.applied(&generation, &self.topic, partition).await?;
        }
        let Some(row) = store.conversation(&generation, conversation_id).await? else {
            return Ok((applied, None));
        };
        let queries = store
            .locations(&generation, conversation_id)
            .await?
            .into_iter()
            .filter(|l| l.event_type == UserQueryReceived::short_name())
            .map(|l| (l.event_id, WrittenQuery { sequence: l.sequence, offset: l.offset }))
            .collect();
        Ok((applied, Some(Known { head: row.head(), queries })))
    }

    /// Prunes the listener's window of what the projection has applied, every
    /// 500 ms, until `shutdown`.
    pub async fn prune_applied(self, shutdown: CancellationToken) {
        let mut every = tokio::time::interval(PRUNE_EVERY);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                _ = every.tick() => {}
            }
            let progress = match self.reader.generation().await {
                Ok(generation) => self.reader.store().progress(&generation, &self.topic).await,
                Err(error) => Err(error),
            };
            match progress {
                Ok(progress) => {
                    let mut recent = self.recent.lock();
                    for (partition, applied) in progress {
                        recent.prune(partition, applied);
                    }
                    metrics::unprojected_events(recent.facts());
                }
                Err(error) => debug!(%error, "the projection's progress was not read; pruning later"),
            }
        }
    }
}
