//! A question becomes a turn: admission against the conversation's head (new, duplicate
//! or refused), then load shedding, rate limits and the budget reservation, then the write
//! to the log and the ack; a duplicate gets its original ack and outcome again.

use std::sync::PoisonError;
use std::time::{Duration, UNIX_EPOCH};

use parley_eventlog::LogPosition;
use parley_eventlog::partitioner::partition_for_key;
use parley_eventlog::trace::traceparent_of;
use parley_events::event::now_millis as now_ms;
use parley_events::lanes::Lane;
use parley_events::turn::STARTED_SEQUENCE;
use parley_events::{ConversationId, ConversationStarted, Envelope, EventId, UserId, UserQueryReceived};
use parley_projections::ProjectionError;
use parley_projections::budget::Reserved;
use parley_projections::reader::Freshness;
use tracing::field::Empty;
use tracing::{Instrument, info_span, warn};

use crate::adoption::Adopted;
use crate::answers;
use crate::hub::{Admission, ConnectionId, DuplicateOutcome, Outbox, Refusal, new_conversation_id};
use crate::protocol::{ErrorCode, ServerFrame};
use crate::state::{AppState, SOURCE};

pub(crate) async fn accept_query(
    state: &AppState,
    user: &UserId,
    connection: ConnectionId,
    outbox: &Outbox,
    query: crate::protocol::ValidQuery,
) -> Vec<ServerFrame> {
    let client_message_id = Some(query.client_message_id.clone());
    let error = |code, message: String| vec![ServerFrame::error(code, message, client_message_id.clone())];
    let requested_new = query.conversation_id.is_none();
    let conversation_id = match query.conversation_id {
        Some(id) => id,
        None => match lane_of_new_conversation(state, user, query.lane).await {
            Ok(lane) => new_conversation_id(user, &query.client_message_id, lane, &state.lanes, state.event_partitions),
            Err(e) => return error(ErrorCode::Unavailable, format!("the user's tier could not be read: {e}")),
        },
    };
    let admit = || state.hub.admit(user, conversation_id, &query.client_message_id, connection, outbox);
    let mut admission = admit();
    if admission == Err(Refusal::NotHeld) {
        let adopting = info_span!("gateway.adopt", %conversation_id);
        match state.adopter.adopt(user, conversation_id, requested_new).instrument(adopting).await {
            Adopted::Held => admission = admit(),
            Adopted::Unknown => admission = Err(Refusal::UnknownConversation),
            Adopted::Unavailable(cause) => {
                let refusal = crate::refusal::Refusal::NotAdopted(cause);
                return error(refusal.code(), refusal.message());
            }
        }
    }
    let (conversation_id, query_id, sequence, new_conversation) = match admission {
        Ok(Admission::Accepted { conversation_id, query_id, sequence, new_conversation }) => {
            (conversation_id, query_id, sequence, new_conversation)
        }
        Ok(Admission::Duplicate { ack, outcome }) => return duplicate_frames(state, ack, outcome).await,
        Err(Refusal::UnknownConversation | Refusal::NotHeld) => {
            return error(ErrorCode::UnknownConversation, "no such conversation for this user".into());
        }
        Err(Refusal::TurnInProgress) => {
            return error(ErrorCode::TurnInProgress, "the previous question has no answer yet".into());
        }
    };
    // Shedding, rate limits and budgets apply to new turns only: a resent one (a
    // duplicate) was admitted before.
    if let Err(refused) = admission_control(state, user, conversation_id, query_id, &query.text).await {
        state.hub.release(conversation_id, sequence);
        return vec![ServerFrame::Error {
            code: refused.code,
            message: refused.message,
            client_message_id,
            retry_after_ms: refused.retry_after_ms,
            resets_at: refused.resets_at,
        }];
    }
    // A root span: each turn is its own trace, not part of the socket's lifetime.
    let span = info_span!(parent: None, "gateway.query", %conversation_id, %query_id, sequence, traceparent = Empty);
    let traceparent = traceparent_of(&span, None);
    span.record("traceparent", traceparent.as_str());
    let event = UserQueryReceived {
        sealed_for: String::new(),
        envelope: Envelope::new(query_id, conversation_id, sequence, SOURCE)
            .with_traceparent(Some(traceparent.clone())),
        user_id: user.clone(),
        client_message_id: query.client_message_id.clone(),
        text: query.text.clone(),
        no_cache: query.no_cache,
    };
    // What the log keeps is sealed under the asker's data key; `event` stays plain for
    // the asker's other tabs.
    let mut sealed = event.clone();
    if let Some(keys) = &state.keys
        && let Err(e) = keys.seal_event(&mut sealed).await
    {
        undo_admission(state, user, conversation_id, sequence, query_id).await;
        return match e {
            ProjectionError::Erased(_) => error(
                ErrorCode::Erased,
                "this identity's data was erased: it takes no new content (ask for a new identity)".into(),
            ),
            e => error(ErrorCode::Unavailable, format!("the key store did not answer; nothing was written: {e}")),
        };
    }
    let written = async {
        if new_conversation {
            let started = ConversationStarted {
                envelope: Envelope::new(EventId::random(), conversation_id, STARTED_SEQUENCE, SOURCE)
                    .with_correlation(query_id.to_string())
                    .with_traceparent(Some(traceparent.clone())),
                user_id: user.clone(),
            };
            state
                .producer
                .append(&state.topics.events, &conversation_id.to_string(), &started, Some(&traceparent))
                .await?;
        }
        state.producer.append(&state.topics.events, &conversation_id.to_string(), &sealed, Some(&traceparent)).await
    }
    .instrument(span)
    .await;
    match written {
        Ok(position) => {
            let ack = ServerFrame::Ack {
                client_message_id: query.client_message_id.clone(),
                conversation_id: conversation_id.to_string(),
                event_id: query_id.to_string(),
                sequence,
                position: position.to_string(),
                duplicate: false,
            };
            let other_tabs = state.hub.record_written(conversation_id, query_id, sequence, &position, connection);
            let question = answers::question_frame(&event);
            for outbox in other_tabs {
                let _ = outbox.try_send(question.clone());
            }
            vec![ack]
        }
        Err(e) => {
            warn!(error = %e, %conversation_id, "query not written");
            undo_admission(state, user, conversation_id, sequence, query_id).await;
            error(ErrorCode::Unavailable, format!("the event log did not take the query; nothing was written: {e}"))
        }
    }
}

/// Why admission control refused a new turn (nothing of it was charged or written).
struct Refused {
    code: ErrorCode,
    message: String,
    retry_after_ms: Option<u64>,
    resets_at: Option<String>,
}

/// The lane a new conversation of `user`'s is served in: their tier, or the lower lane the
/// client asked for (never a higher one).
/// Gives back what admitting a turn took (its sequence, its rate-limit slot, its budget
/// reservation) when the turn is not written.
async fn undo_admission(
    state: &AppState,
    user: &UserId,
    conversation_id: ConversationId,
    sequence: i64,
    query_id: EventId,
) {
    state.hub.release(conversation_id, sequence);
    state.rate.lock().unwrap_or_else(PoisonError::into_inner).refund(user, query_id, now_ms());
    let (ledger, budgets) = &state.budget;
    if let Err(error) = ledger.settle_if_limited(budgets, user, query_id, 0).await {
        warn!(%error, %query_id, "the reservation of an unwritten query was not released");
    }
}

async fn lane_of_new_conversation(
    state: &AppState,
    user: &UserId,
    asked: Option<Lane>,
) -> Result<Lane, ProjectionError> {
    if state.lanes.is_single_lane() {
        return Ok(Lane::Standard);
    }
    let tier = state.tiers.tier_of(user).await?;
    Ok(asked.map_or(tier, |asked| asked.max(tier)))
}

/// Load shedding, then rate limits, then the token budget reservation: the first that
/// refuses decides, and what the earlier ones charged is given back. Shedding comes first
/// so a shed turn costs the user nothing.
async fn admission_control(
    state: &AppState,
    user: &UserId,
    conversation_id: ConversationId,
    query_id: EventId,
    text: &str,
) -> Result<(), Refused> {
    let partition = partition_for_key(conversation_id.to_string().as_bytes(), state.event_partitions);
    if let Some(retry_after_ms) = state.overloaded(Some(state.lanes.lane_of(partition))) {
        let seconds = retry_after_ms.div_ceil(1000);
        return Err(Refused {
            code: ErrorCode::Overloaded,
            message: format!("Parley has more questions than it can answer right now; try again in {seconds} s"),
            retry_after_ms: Some(retry_after_ms),
            resets_at: None,
        });
    }
    let rate = || state.rate.lock().unwrap_or_else(PoisonError::into_inner);
    if let Err(limited) = rate().admit(user, query_id, now_ms()) {
        let seconds = limited.retry_after_ms.div_ceil(1000);
        return Err(Refused {
            code: ErrorCode::RateLimited,
            message: format!("{}; try again in {seconds} s", limited.limit.describe()),
            retry_after_ms: Some(limited.retry_after_ms),
            resets_at: None,
        });
    }
    let (ledger, budgets) = &state.budget;
    let chars = text.chars().count();
    let refused = match ledger.reserve(budgets, user, conversation_id, query_id, chars, now_ms()).await {
        Ok(Reserved::Yes) => return Ok(()),
        Ok(Reserved::No(exceeded)) => {
            let resets_at = exceeded.resets_at_ms.map(format_time);
            let when = resets_at.as_ref().map_or(String::new(), |at| format!("; it starts again at {at}"));
            let message = format!("{}{when}", exceeded.describe());
            Refused { code: ErrorCode::BudgetExceeded, message, retry_after_ms: None, resets_at }
        }
        Err(e) => {
            let message = format!("the token budget could not be checked: {e}");
            Refused { code: ErrorCode::Unavailable, message, retry_after_ms: None, resets_at: None }
        }
    };
    rate().refund(user, query_id, now_ms());
    Err(refused)
}

/// The frames a duplicate query gets: its original ack, marked duplicate, then its outcome
/// if it has one (an earlier turn's is read from the log once the projection, which
/// indexes it, has caught up).
async fn duplicate_frames(state: &AppState, ack: Box<ServerFrame>, outcome: DuplicateOutcome) -> Vec<ServerFrame> {
    std::iter::once(*ack).chain(resolve_outcome(state, outcome).await).collect()
}

/// The outcome frame of a turn, when it has one: known here, or read from the log.
pub(crate) async fn resolve_outcome(state: &AppState, outcome: DuplicateOutcome) -> Option<ServerFrame> {
    match outcome {
        DuplicateOutcome::Known(frame) => Some(*frame),
        DuplicateOutcome::Pending => None,
        DuplicateOutcome::InProjection { conversation_id, query_id, outcome_sequence, after } => {
            match earlier_outcome(state, conversation_id, query_id, outcome_sequence, &after).await {
                Ok(frame) => frame,
                // The ack alone is still right; the client reads the answer from the history.
                Err(error) => {
                    warn!(%error, "outcome of an earlier query not read");
                    None
                }
            }
        }
    }
}

/// The outcome event of an earlier turn, read from the log where the projection's index
/// says it is, as the frame it was first pushed as.
async fn earlier_outcome(
    state: &AppState,
    conversation_id: ConversationId,
    query_id: EventId,
    outcome_sequence: i64,
    after: &LogPosition,
) -> Result<Option<ServerFrame>, ProjectionError> {
    // Read past the projection by this gateway: the outcome's position is known at once.
    let recent = state.adopter.recent.lock().outcome_offset(after.partition, conversation_id, outcome_sequence);
    let positions: Vec<LogPosition> = if let Some(offset) = recent {
        vec![LogPosition { topic: after.topic.clone(), partition: after.partition, offset }]
    } else {
        if state.reader.wait_for(after, state.read_wait).await? != Freshness::Applied {
            return Ok(None);
        }
        let generation = state.reader.generation().await?;
        state
            .reader
            .store()
            .locations(&generation, conversation_id)
            .await?
            .into_iter()
            .filter(|l| l.sequence == outcome_sequence)
            .map(|l| l.position())
            .collect()
    };
    let mut records = state.log.lock().await.records_at(&positions).await?;
    if let Some(keys) = &state.keys {
        keys.open_records(&mut records).await?;
    }
    let query_event_id = query_id.to_string();
    Ok(records
        .iter()
        .filter_map(|r| answers::outcome_frame(&r.event))
        .find(|frame| matches!(frame, ServerFrame::Answer { query_event_id: q, .. } | ServerFrame::Failed { query_event_id: q, .. } if *q == query_event_id)))
}

/// An instant (ms since the epoch) as RFC 3339 UTC, to the second.
fn format_time(millis: i64) -> String {
    let at = UNIX_EPOCH + Duration::from_millis(u64::try_from(millis).unwrap_or(0));
    humantime::format_rfc3339_seconds(at).to_string()
}
