//! Stopping an answer: a `TurnCancelRequested` on the log for the conversation's open
//! turn (from a socket's `cancel` frame, the HTTP API, or a socket that went away).

use std::sync::Arc;

use parley_eventlog::trace::traceparent_of;
use parley_events::{ConversationId, Envelope, EventId, TurnCancelRequested, UserId};
use tracing::field::Empty;
use tracing::{Instrument, info, info_span, warn};

use crate::follow::hold;
use crate::hub::CancelTarget;
use crate::refusal::Refusal;
use crate::state::{AppState, SOURCE};

/// What a cancel did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CancelOutcome {
    /// A `TurnCancelRequested` for this query is in the log.
    Requested(EventId),
    /// The answer exists: nothing to stop.
    AlreadyComplete,
    /// No turn is open.
    NothingToCancel,
}

impl CancelOutcome {
    /// As the protocol and the HTTP API name it.
    pub(crate) fn status(self) -> &'static str {
        match self {
            Self::Requested(_) => "requested",
            Self::AlreadyComplete => "already_complete",
            Self::NothingToCancel => "nothing_to_cancel",
        }
    }
}

/// Asks to stop the answer to `query` (the open turn's: `None`) of a conversation of the
/// user's, held here or adopted from the log: writes a `TurnCancelRequested` for it.
pub(crate) async fn cancel(
    state: &AppState,
    user: &UserId,
    conversation_id: &str,
    query: Option<EventId>,
) -> Result<CancelOutcome, Refusal> {
    let id = hold(state, user, conversation_id).await?;
    cancel_held(state, user, id, query).await
}

/// [`cancel`] of a conversation this instance holds.
async fn cancel_held(
    state: &AppState,
    user: &UserId,
    id: ConversationId,
    query: Option<EventId>,
) -> Result<CancelOutcome, Refusal> {
    let (query_event_id, sequence) = match state.hub.cancel_target(user, id, query) {
        CancelTarget::Open { query_event_id, sequence } => (query_event_id, sequence),
        CancelTarget::Complete => return Ok(CancelOutcome::AlreadyComplete),
        CancelTarget::NothingOpen => return Ok(CancelOutcome::NothingToCancel),
        CancelTarget::UnknownQuery => {
            return Err(Refusal::UnknownQuery(query.map(|q| q.to_string()).unwrap_or_default()));
        }
        CancelTarget::UnknownConversation => return Err(Refusal::UnknownConversation(id.to_string())),
    };
    let span = info_span!(parent: None, "gateway.cancel", conversation_id = %id, %query_event_id, traceparent = Empty);
    let traceparent = traceparent_of(&span, None);
    span.record("traceparent", traceparent.as_str());
    // The query's sequence: a cancel annotates its turn and advances nothing.
    let event = TurnCancelRequested {
        envelope: Envelope::new(EventId::random(), id, sequence, SOURCE)
            .with_correlation(query_event_id.to_string())
            .with_traceparent(Some(traceparent.clone())),
        query_event_id,
        user_id: user.clone(),
    };
    let key = id.to_string();
    let written = state.producer.append(&state.topics.events, &key, &event, Some(&traceparent));
    match written.instrument(span).await {
        Ok(_) => Ok(CancelOutcome::Requested(query_event_id)),
        Err(source) => Err(Refusal::NotWritten { what: "cancel", source }),
    }
}

/// After `--cancel-after-disconnect`, stops the answers a closed socket followed that no
/// socket here follows any more.
pub(crate) async fn cancel_abandoned(state: Arc<AppState>, followed: Vec<(ConversationId, EventId, UserId)>) {
    tokio::time::sleep(state.cancel_after_disconnect).await;
    for (conversation, query, owner) in followed {
        if state.hub.abandoned(conversation, query) {
            match cancel_held(&state, &owner, conversation, Some(query)).await {
                Ok(_) => info!(%conversation, %query, "answer stopped: no socket followed it"),
                Err(refusal) => {
                    warn!(%conversation, %query, message = refusal.message(), "abandoned answer not stopped");
                }
            }
        }
    }
}
