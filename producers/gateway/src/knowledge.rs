//! The knowledge base over HTTP (JSON, `Authorization: Bearer <token>`):
//!
//! - `POST /api/documents` `{title, text, media_type?, metadata?}`: appends a
//!   DocumentSubmitted for the caller and answers 202 at once with the document id and log
//!   position; chunking and embedding happen asynchronously in the embedder.
//! - `GET /api/documents?limit=N`: the caller's searchable documents, by title.
//! - `DELETE /api/documents/{id}`: appends a DocumentDeleted for the caller (202); the
//!   embedder removes the caller's vectors of that document, so no search or answer
//!   retrieves it any more.
//! - `GET /api/search?q=TEXT&k=N&kind=document|message&document=ID&conversation=ID`: the
//!   caller's top-k chunks and messages nearest to `q`, best first. The owner filter is
//!   always the caller; the other parameters narrow it further.

use std::collections::HashMap;
use std::sync::{Arc, PoisonError};

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use parley_eventlog::LogPosition;
use parley_eventlog::trace::traceparent_of;
use parley_events::AvroEvent;
use parley_events::event::now_millis;
use parley_events::{DocumentId, EventId, UserId};
use parley_ingest::Submission;
use parley_ingest::document::{deletion_event, media_type_of};
use parley_projections::ProjectionError;
use parley_retrieval::{Hit, RetrievalError, Retriever, SearchFilter, SourceKind};
use serde::{Deserialize, Serialize};
use serde_json::json;
use tracing::field::Empty;
use tracing::{Instrument, info, info_span, warn};

use crate::api::{ApiError, user_of};
use crate::state::AppState;

/// Most results one search returns.
pub const MAX_K: usize = 50;
/// Most documents one listing returns.
const MAX_LISTED: usize = 1_000;
/// Longest search text, in characters.
const MAX_QUERY_CHARS: usize = 2_000;

/// The body of `POST /api/documents`.
#[derive(Debug, Deserialize)]
pub struct DocumentBody {
    title: String,
    text: String,
    media_type: Option<String>,
    #[serde(default)]
    metadata: HashMap<String, String>,
}

pub(crate) async fn submit_document(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Json(body): Json<DocumentBody>,
) -> Result<(StatusCode, Json<serde_json::Value>), ApiError> {
    let user = user_of(&state, &headers).await?;
    // Bulk work: refused while any lane's queue is past the threshold.
    if let Some(retry_after_ms) = state.overloaded(None) {
        let message = "Parley is answering more than it can right now; the document can wait";
        return Err(ApiError::too_many("overloaded", message, retry_after_ms));
    }
    let span = info_span!(parent: None, "gateway.document", user = %user, traceparent = Empty);
    let traceparent = traceparent_of(&span, None);
    span.record("traceparent", traceparent.as_str());
    async {
        let media_type = body.media_type.unwrap_or_else(|| media_type_of(&body.title).to_owned());
        let submission =
            Submission { owner: user, title: body.title, media_type, text: body.text, metadata: body.metadata };
        let event = submission
            .into_event(Some(traceparent.clone()))
            .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "invalid_document", e.to_string()))?;
        let rate = || state.rate.lock().unwrap_or_else(PoisonError::into_inner);
        let (owner, event_id) = (&event.owner, event.envelope.event_id);
        if let Err(limited) = rate().admit_document(owner, event_id, now_millis()) {
            let seconds = limited.retry_after_ms.div_ceil(1000);
            let message = format!("{}; try again in {seconds} s", limited.limit.describe());
            return Err(ApiError::too_many("rate_limited", message, limited.retry_after_ms));
        }
        let mut sealed = event.clone();
        if let Some(keys) = &state.keys
            && let Err(error) = keys.seal_event(&mut sealed).await
        {
            rate().refund_document(owner, event_id, now_millis());
            return Err(match error {
                ProjectionError::Erased(_) => ApiError::new(
                    StatusCode::GONE,
                    "erased",
                    "this identity's data was erased: it takes no new content (ask for a new identity)",
                ),
                error => ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "unavailable",
                    format!("the key store did not answer; nothing was written: {error}"),
                ),
            });
        }
        let position = match append_document_event(&state, event.document_id, &sealed, &traceparent).await {
            Ok(position) => position,
            Err(refused) => {
                rate().refund_document(owner, event_id, now_millis());
                return Err(refused);
            }
        };
        info!(document_id = %event.document_id, %position, "document submitted");
        Ok(accepted(event.document_id, event.envelope.event_id, &position))
    }
    .instrument(span)
    .await
}

/// `DELETE /api/documents/{id}`: appends a DocumentDeleted for the caller and answers 202;
/// the embedder then removes the caller's vectors of that document. Naming a document of
/// another user (or none) removes nothing, and the answer does not tell which it was.
pub(crate) async fn delete_document(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<(StatusCode, Json<serde_json::Value>), ApiError> {
    let user = user_of(&state, &headers).await?;
    let document_id = id
        .parse::<DocumentId>()
        .map_err(|_| ApiError::new(StatusCode::BAD_REQUEST, "invalid_document_id", "a document id is a UUID"))?;
    let span = info_span!(parent: None, "gateway.document_delete", user = %user, %document_id, traceparent = Empty);
    let traceparent = traceparent_of(&span, None);
    span.record("traceparent", traceparent.as_str());
    async {
        let event = deletion_event(&user, document_id, Some(traceparent.clone()));
        let position = append_document_event(&state, event.document_id, &event, &traceparent).await?;
        info!(%position, "document deletion accepted");
        Ok(accepted(event.document_id, event.envelope.event_id, &position))
    }
    .instrument(span)
    .await
}

/// Appends a document event keyed by its document id, so a deletion follows the submission
/// it undoes in the same partition.
async fn append_document_event<T: AvroEvent>(
    state: &AppState,
    document_id: DocumentId,
    event: &T,
    traceparent: &str,
) -> Result<LogPosition, ApiError> {
    let key = document_id.to_string();
    state.producer.append(&state.topics.documents, &key, event, Some(traceparent)).await.map_err(|error| {
        warn!(%error, "document event not appended");
        ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "log_unavailable", "the event log did not accept it; retry")
    })
}

fn accepted(
    document_id: DocumentId,
    event_id: EventId,
    position: &LogPosition,
) -> (StatusCode, Json<serde_json::Value>) {
    let body = json!({ "document_id": document_id, "event_id": event_id, "position": position.to_string() });
    (StatusCode::ACCEPTED, Json(body))
}

/// The parameters of `GET /api/search`.
#[derive(Debug, Deserialize)]
pub struct SearchParams {
    q: String,
    k: Option<usize>,
    kind: Option<String>,
    document: Option<String>,
    conversation: Option<String>,
}

#[derive(Debug, Serialize)]
pub(crate) struct SearchAnswer {
    hits: Vec<Hit>,
}

pub(crate) async fn search(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Query(params): Query<SearchParams>,
) -> Result<Json<SearchAnswer>, ApiError> {
    let user = user_of(&state, &headers).await?;
    let filter = search_filter(user, &params)?;
    let k = params.k.unwrap_or(10);
    let hits = retriever_of(&state)?
        .search(&params.q, &filter, k)
        .instrument(info_span!("gateway.search", k))
        .await
        .map_err(store_unavailable)?;
    Ok(Json(SearchAnswer { hits }))
}

/// The parameters of `GET /api/documents`.
#[derive(Debug, Deserialize)]
pub struct ListParams {
    limit: Option<usize>,
}

/// `GET /api/documents?limit=N`: the caller's searchable documents by title (id, title, the
/// submission's event id), at most `limit` (100 by default, up to 1,000).
pub(crate) async fn list_documents(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Query(params): Query<ListParams>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let user = user_of(&state, &headers).await?;
    let limit = params.limit.unwrap_or(100);
    if !(1..=MAX_LISTED).contains(&limit) {
        let message = format!("limit must be 1 to {MAX_LISTED}");
        return Err(ApiError::new(StatusCode::BAD_REQUEST, "invalid_parameter", message));
    }
    let documents = retriever_of(&state)?
        .store()
        .documents(&user, limit)
        .instrument(info_span!("gateway.documents", limit))
        .await
        .map_err(store_unavailable)?;
    Ok(Json(json!({ "documents": documents })))
}

fn retriever_of(state: &AppState) -> Result<&Retriever, ApiError> {
    state.retriever.as_ref().ok_or_else(|| {
        ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "search_unavailable", "this gateway runs without a vector store")
    })
}

fn store_unavailable(error: RetrievalError) -> ApiError {
    warn!(%error, "vector store call failed");
    ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "search_unavailable", "the vector store did not answer; retry")
}

/// The filter of a search request: always the caller's own data, narrowed by the parameters.
fn search_filter(user: UserId, params: &SearchParams) -> Result<SearchFilter, ApiError> {
    let bad = |message: String| ApiError::new(StatusCode::BAD_REQUEST, "invalid_search", message);
    let chars = params.q.chars().count();
    if params.q.trim().is_empty() || chars > MAX_QUERY_CHARS {
        return Err(bad(format!("q must be 1 to {MAX_QUERY_CHARS} characters")));
    }
    if params.k.is_some_and(|k| k == 0 || k > MAX_K) {
        return Err(bad(format!("k must be 1 to {MAX_K}")));
    }
    let mut kind = match params.kind.as_deref() {
        None => None,
        Some(value) => {
            Some(SourceKind::parse(value).ok_or_else(|| bad(format!("kind {value:?}: use document or message")))?)
        }
    };
    let mut source_ids = Vec::new();
    for (id, implied) in [(&params.document, SourceKind::Document), (&params.conversation, SourceKind::Message)] {
        if let Some(id) = id {
            if kind.is_some_and(|k| k != implied) {
                return Err(bad("document= and conversation= each imply their kind".into()));
            }
            kind = Some(implied);
            source_ids.push(id.clone());
        }
    }
    Ok(SearchFilter { owner: user, kind, source_ids, exclude_source_ids: vec![] })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn alice() -> UserId {
        "alice".parse().unwrap()
    }

    fn params(q: &str) -> SearchParams {
        SearchParams { q: q.into(), k: None, kind: None, document: None, conversation: None }
    }

    #[test]
    fn the_owner_is_always_the_caller() {
        let filter = search_filter(alice(), &params("kafka")).unwrap();
        assert_eq!(filter, SearchFilter::owner(alice()));
    }

    #[test]
    fn document_and_conversation_narrow_the_kind() {
        let p = SearchParams { document: Some("d1".into()), ..params("kafka") };
        let filter = search_filter(alice(), &p).unwrap();
        assert_eq!((filter.kind, filter.source_ids), (Some(SourceKind::Document), vec!["d1".to_owned()]));
        let clash = SearchParams { kind: Some("message".into()), document: Some("d1".into()), ..params("kafka") };
        assert!(search_filter(alice(), &clash).is_err());
    }

    #[test]
    fn bad_parameters_are_refused() {
        assert!(search_filter(alice(), &params(" ")).is_err());
        assert!(search_filter(alice(), &SearchParams { k: Some(0), ..params("x") }).is_err());
        assert!(search_filter(alice(), &SearchParams { k: Some(MAX_K + 1), ..params("x") }).is_err());
        assert!(search_filter(alice(), &SearchParams { kind: Some("pdf".into()), ..params("x") }).is_err());
    }
}
