//! A socket following a conversation it did not ask in: `subscribe` (held here or adopted
//! from the log) and `resume` (an answer picked up again after a reconnect: the deltas read
//! back from the tokens topic, then the live ones, each once and in order).

use std::sync::PoisonError;

use parley_eventlog::LogPosition;
use parley_eventlog::consumer::read_back;
use parley_eventlog::partitioner::partition_for_key;
use parley_events::{ConversationId, EventId, LLMTokenDelta, UserId};
use rdkafka::Message as _;
use tracing::{Instrument, info_span};

use crate::adoption::Adopted;
use crate::answers::delta_text;
use crate::hub::{ConnectionId, DuplicateOutcome, Outbox};
use crate::protocol::ServerFrame;
use crate::refusal::Refusal;
use crate::state::{AppState, Socket};
use crate::turns::resolve_outcome;

/// Subscribes the socket to a conversation of the user's, held here or adopted from the
/// log (any instance serves any conversation, also right after it started).
pub(crate) async fn subscribe(
    state: &AppState,
    user: &UserId,
    connection: ConnectionId,
    outbox: &Outbox,
    conversation_id: &str,
) -> ServerFrame {
    let id = match hold(state, user, conversation_id).await {
        Ok(id) => id,
        Err(refusal) => return refusal.into_frame(),
    };
    if state.hub.subscribe(user, id, connection, outbox) {
        ServerFrame::Subscribed { conversation_id: id.to_string() }
    } else {
        Refusal::UnknownConversation(conversation_id.to_owned()).into_frame()
    }
}

/// Makes this instance hold a conversation of `user`'s, adopting it from the log if need
/// be (any instance serves any conversation, also right after it started).
/// The client's id is parsed here, at the edge: one that is not a conversation id is an
/// unknown conversation.
pub(crate) async fn hold(state: &AppState, user: &UserId, conversation_id: &str) -> Result<ConversationId, Refusal> {
    let unknown = || Refusal::UnknownConversation(conversation_id.to_owned());
    let id = conversation_id.parse::<ConversationId>().map_err(|_| unknown())?;
    if state.hub.holds(&id) {
        return Ok(id);
    }
    match state.adopter.adopt(user, id, false).instrument(info_span!("gateway.adopt", conversation_id = %id)).await {
        Adopted::Held => Ok(id),
        Adopted::Unknown => Err(unknown()),
        Adopted::Unavailable(cause) => Err(Refusal::NotAdopted(cause)),
    }
}

/// Picks an answer up on this socket after a reconnect: subscribes it to the conversation,
/// then sends the deltas after `last_index`, read back from the tokens topic (from after
/// `position`, else from when the question was asked), while live ones keep coming (the
/// socket's [`TokenOrder`] sends each once, in order), and the answer after them.
pub(crate) async fn resume(
    state: &AppState,
    user: &UserId,
    socket: &Socket<'_>,
    conversation_id: &str,
    query_event_id: &str,
    last_index: i32,
    position: Option<String>,
) -> Result<Vec<ServerFrame>, Refusal> {
    let subscribed = subscribe(state, user, socket.connection, socket.outbox, conversation_id).await;
    if !matches!(subscribed, ServerFrame::Subscribed { .. }) {
        return Ok(vec![subscribed]);
    }
    let unknown_query = || Refusal::UnknownQuery(query_event_id.to_owned());
    let (Ok(conversation), Ok(query)) = (conversation_id.parse::<ConversationId>(), query_event_id.parse::<EventId>())
    else {
        return Err(unknown_query());
    };
    let (outcome, asked_at) = state.hub.resume_target(user, conversation, query).ok_or_else(unknown_query)?;
    socket.order.lock().unwrap_or_else(PoisonError::into_inner).resume(query_event_id, last_index);
    let resumed = |status: &str, replay: Vec<ServerFrame>| ServerFrame::Resumed {
        conversation_id: conversation_id.to_owned(),
        query_event_id: query_event_id.to_owned(),
        status: status.to_owned(),
        replay,
    };
    if outcome != DuplicateOutcome::Pending {
        let outcome = resolve_outcome(state, outcome).await;
        return Ok(std::iter::once(resumed("complete", Vec::new())).chain(outcome).collect());
    }
    let partition = partition_for_key(conversation_id.as_bytes(), state.event_partitions);
    let after = position
        .and_then(|p| p.parse::<LogPosition>().ok())
        .filter(|p| p.topic == state.topics.tokens && p.partition == partition);
    // From the client's own last delta (inclusive): its attempt says whether a delta at
    // index 0 read after it is a retried call starting over or one the client has.
    let from = match &after {
        Some(after) => (after.offset, false),
        None => {
            let question = read_back(&state.kafka, &asked_at.topic, asked_at.partition, asked_at.offset, false, 1);
            let written_at = question
                .await
                .map_err(Refusal::NotReadBack)?
                .and_then(|records| records.first()?.timestamp().to_millis());
            (written_at.ok_or(Refusal::QuestionGone)?, true)
        }
    };
    let tokens = &state.topics.tokens;
    let read =
        read_back(&state.kafka, tokens, partition, from.0, from.1, usize::MAX).await.map_err(Refusal::NotReadBack)?;
    let Some(records) = read else {
        return Ok(vec![resumed("tokens_expired", Vec::new())]);
    };
    let mut replay = Vec::new();
    for record in records {
        let Ok(decoded) = state.codec.decode::<LLMTokenDelta>(record.payload().unwrap_or_default()).await else {
            continue;
        };
        let delta = decoded.event;
        if delta.query_event_id != query {
            continue;
        }
        let Some(text) = delta_text(state.keys.as_ref(), &delta).await else { continue };
        if after.as_ref().is_some_and(|after| after.offset == record.offset()) {
            socket.order.lock().unwrap_or_else(PoisonError::into_inner).client_attempt(query_event_id, delta.attempt);
            continue;
        }
        // The socket's order drops what the client has (and deltas of an attempt replaced since).
        let at = LogPosition { topic: tokens.clone(), partition, offset: record.offset() };
        replay.push(ServerFrame::Token {
            conversation_id: delta.conversation_id.to_string(),
            query_event_id: delta.query_event_id.to_string(),
            index: delta.index,
            delta: text,
            attempt: delta.attempt,
            position: Some(at.to_string()),
        });
    }
    Ok(vec![resumed("streaming", replay)])
}
