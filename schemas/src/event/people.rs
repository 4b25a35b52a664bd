//! Records about a person rather than a conversation: erasures (the `erasures` topic) and
//! tier and budget changes (the `accounts` topic). Neither holds personal data beyond the id.

use serde::{Deserialize, Serialize};

use super::{AvroEvent, Envelope};
use crate::ids::{EventId, UserId};

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

impl AvroEvent for AccountChanged {
    const FULL_NAME: &'static str = "io.parley.events.AccountChanged";
}

impl AvroEvent for ErasureRequested {
    const FULL_NAME: &'static str = "io.parley.events.ErasureRequested";
}

impl AvroEvent for ErasureCompleted {
    const FULL_NAME: &'static str = "io.parley.events.ErasureCompleted";
}
