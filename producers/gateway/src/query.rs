//! The query path (HTTP, JSON), served from the projection:
//!
//! - `GET /api/conversations?limit=N&before=CURSOR`: the caller's conversations, newest first;
//! - `GET /api/conversations/{id}?after=POSITION`: one conversation with its messages. With
//!   `after` (the `position` of an ack), the answer waits until the projection has applied
//!   it, up to `--read-wait`, else 503 `projection_behind`. With `at` (a sequence, a
//!   position of the events topic or an RFC 3339 time in UTC), the conversation as it was
//!   then, folded from its records in the log: the one read that leaves the projection.
//!
//! Both take the user's token as `Authorization: Bearer <token>`.

use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use parley_eventlog::LogPosition;
use parley_events::UserId;
use parley_events::conversation::Message;
use parley_events::{CachedAnswer, RetrievedContext};
use parley_events::{ConversationId, EventId};
use parley_projections::ProjectionError;
use parley_projections::as_of::ReplayPoint;
use parley_projections::reader::Freshness;
use parley_projections::replay;
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::api::{ApiError, user_of};
use crate::cancel::{self, CancelOutcome};
use crate::state::AppState;

/// Most conversations one page of `GET /api/conversations` lists.
pub const MAX_PAGE: i32 = 100;

/// A message as the query API shows it.
#[derive(Debug, Serialize)]
pub struct MessageView {
    sequence: i64,
    event_id: EventId,
    kind: &'static str,
    text: String,
    occurred_at: i64,
    query_event_id: Option<EventId>,
    model: Option<String>,
    prompt_tokens: Option<i32>,
    completion_tokens: Option<i32>,
    llm_latency_ms: Option<i64>,
    error_kind: Option<String>,
    /// For answers: the chunks and earlier messages the prompt carried.
    retrieved: Vec<RetrievedContext>,
    /// For answers from the semantic cache: the answer repeated.
    #[serde(skip_serializing_if = "Option::is_none")]
    cached_from: Option<CachedAnswer>,
}

impl From<Message> for MessageView {
    fn from(m: Message) -> Self {
        Self {
            sequence: m.sequence,
            event_id: m.event_id,
            kind: m.kind.as_str(),
            text: m.text,
            occurred_at: m.occurred_at,
            query_event_id: m.query_event_id,
            model: m.model,
            prompt_tokens: m.prompt_tokens,
            completion_tokens: m.completion_tokens,
            llm_latency_ms: m.llm_latency_ms,
            error_kind: m.error_kind,
            retrieved: m.retrieved,
            cached_from: m.cached_from,
        }
    }
}

#[derive(Debug, Deserialize)]
pub(crate) struct ConversationParams {
    after: Option<String>,
    at: Option<String>,
}

pub(crate) async fn conversation(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    Query(params): Query<ConversationParams>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let user = user_of(&state, &headers).await?;
    let not_found = || ApiError::new(StatusCode::NOT_FOUND, "not_found", format!("no conversation {id} for this user"));
    let id: ConversationId = id.parse().map_err(|_| not_found())?;
    if let Some(at) = params.at {
        if params.after.is_some() {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_parameter",
                "at and after do not go together: at reads the log, after waits for the projection",
            ));
        }
        return conversation_at(&state, &user, id, &at).await;
    }
    if let Some(after) = params.after {
        let position: LogPosition = after.parse().map_err(|_| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_parameter",
                format!("after={after:?} is not a position topic/partition/offset"),
            )
        })?;
        if let Freshness::Behind { applied_up_to } = state.reader.wait_for(&position, state.read_wait).await? {
            return Err(ApiError::with_body(
                StatusCode::SERVICE_UNAVAILABLE,
                json!({
                    "error": "projection_behind",
                    "message": format!("the projection has not applied {position} within {:?}; retry", state.read_wait),
                    "requested": position.to_string(),
                    "applied_up_to": applied_up_to,
                }),
            ));
        }
    }
    let generation = state.reader.generation().await?;
    let store = state.reader.store();
    let mut row = store.conversation(&generation, id).await?.filter(|row| row.user_id == user).ok_or_else(not_found)?;
    let mut messages = store.messages(&generation, id).await?;
    if let Some(keys) = store.keys() {
        keys.open_messages(&user, &mut messages).await?;
        keys.open_title(&user, id, &mut row.title).await?;
    }
    let messages: Vec<MessageView> = messages.into_iter().map(MessageView::from).collect();
    Ok(Json(json!({
        "conversation_id": id,
        "title": row.title,
        "started_at": row.started_at,
        "updated_at": row.updated_at,
        "last_sequence": row.last_sequence,
        "open_query_event_id": row.open_query_event_id,
        "messages": messages,
    })))
}

/// `GET /api/conversations/{id}?at=POINT`: the owner's conversation as it was at the point.
async fn conversation_at(
    state: &AppState,
    user: &UserId,
    id: ConversationId,
    at: &str,
) -> Result<Json<serde_json::Value>, ApiError> {
    let invalid =
        |error: ProjectionError| ApiError::new(StatusCode::BAD_REQUEST, "invalid_parameter", format!("at: {error}"));
    let point: ReplayPoint = at.parse().map_err(invalid)?;
    let not_found = || ApiError::new(StatusCode::NOT_FOUND, "not_found", format!("no conversation {id} for this user"));
    // The owner is checked on the projection first: nobody else's records are read.
    let store = state.reader.store();
    let generation = state.reader.generation().await?;
    store.conversation(&generation, id).await?.filter(|row| row.user_id == *user).ok_or_else(not_found)?;
    let log = state.log.lock().await;
    let conversation = match replay::state_at(&log, store, id, &point).await {
        Err(error @ ProjectionError::InvalidPoint(_)) => return Err(invalid(error)),
        other => other?,
    };
    drop(log);
    let conversation = conversation.filter(|c| c.head.owner == *user).ok_or_else(|| {
        ApiError::new(StatusCode::NOT_FOUND, "not_found", format!("conversation {id} had not started at {point}"))
    })?;
    let messages: Vec<MessageView> = conversation.messages.into_iter().map(MessageView::from).collect();
    Ok(Json(json!({
        "conversation_id": id,
        "at": point.to_string(),
        "started_at": conversation.started_at,
        "updated_at": conversation.updated_at,
        "last_sequence": conversation.head.last_sequence,
        "open_query_event_id": conversation.head.open_query.as_ref().map(|q| q.event_id),
        "messages": messages,
    })))
}

#[derive(Debug, Deserialize)]
pub(crate) struct ListParams {
    limit: Option<i32>,
    before: Option<String>,
}

pub(crate) async fn conversations(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Query(params): Query<ListParams>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let user = user_of(&state, &headers).await?;
    let limit = params.limit.unwrap_or(20);
    if !(1..=MAX_PAGE).contains(&limit) {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_parameter",
            format!("limit must be 1 to {MAX_PAGE}"),
        ));
    }
    let before = params.before.as_deref().map(parse_cursor).transpose()?;
    let generation = state.reader.generation().await?;
    let store = state.reader.store();
    let mut page = store.conversations_of(&generation, &user, before, limit).await?;
    if let Some(keys) = store.keys() {
        for (_, id, title) in &mut page {
            keys.open_title(&user, *id, title).await?;
        }
    }
    let next = (page.len() == usize::try_from(limit).unwrap_or(usize::MAX))
        .then(|| page.last().map(|(at, id, _)| format!("{at}:{id}")))
        .flatten();
    let items: Vec<_> = page
        .into_iter()
        .map(|(at, id, title)| json!({"conversation_id": id, "started_at": at, "title": title}))
        .collect();
    Ok(Json(json!({ "conversations": items, "next": next })))
}

/// `POST /api/conversations/{id}/cancel`: stops the answer of the open turn. 202 with
/// `status: requested` and its `query_event_id`; 200 `nothing_to_cancel` when no turn is
/// open; 404 for a conversation that is not the user's.
pub(crate) async fn cancel(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<(StatusCode, Json<serde_json::Value>), ApiError> {
    let user = user_of(&state, &headers).await?;
    match cancel::cancel(&state, &user, &id, None).await {
        Ok(done @ CancelOutcome::Requested(query)) => {
            Ok((StatusCode::ACCEPTED, Json(json!({"status": done.status(), "query_event_id": query.to_string()}))))
        }
        Ok(done) => Ok((StatusCode::OK, Json(json!({"status": done.status()})))),
        Err(refusal) => Err(refusal.into_api_error()),
    }
}

/// A page cursor `<started_at>:<conversation id>`.
fn parse_cursor(cursor: &str) -> Result<(i64, ConversationId), ApiError> {
    cursor.split_once(':').and_then(|(at, id)| Some((at.parse().ok()?, id.parse().ok()?))).ok_or_else(|| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_parameter",
            format!("before={cursor:?} is not a cursor from `next`"),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(parley_events::fuzzing::cases()))]

        /// `before=` and `after=` of the HTTP API, generated: a cursor or a position parses
        /// back to what was written, and anything else is refused, never a panic.
        #[test]
        fn http_parameters_parse_back_or_are_refused(
            at in proptest::prelude::any::<i64>(),
            id in proptest::prelude::any::<u128>(),
            noise in proptest::prelude::any::<String>(),
            partition in 0..i32::MAX,
            offset in 0..i64::MAX,
        ) {
            let id = ConversationId::from(uuid::Uuid::from_u128(id));
            proptest::prop_assert_eq!(parse_cursor(&format!("{at}:{id}")).unwrap(), (at, id));
            if let Err(refused) = parse_cursor(&noise) {
                proptest::prop_assert_eq!(refused.status(), StatusCode::BAD_REQUEST);
            }
            let position = LogPosition { topic: "t.conversation-events".into(), partition, offset };
            proptest::prop_assert_eq!(position.to_string().parse::<LogPosition>().ok(), Some(position));
            let _ = noise.parse::<LogPosition>();
        }
    }

    #[test]
    fn cursors_parse_or_fail_clearly() {
        let id = ConversationId::random();
        assert_eq!(parse_cursor(&format!("123:{id}")).unwrap(), (123, id));
        for bad in ["", "123", "x:y", &format!("abc:{id}")] {
            assert_eq!(parse_cursor(bad).unwrap_err().status(), StatusCode::BAD_REQUEST, "{bad}");
        }
    }
}
