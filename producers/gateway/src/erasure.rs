//! `DELETE /api/me`: a signed-in person erases everything of theirs. The request is an
//! event on the erasures topic; the erasure worker carries it out. The call waits up to
//! [`ERASURE_WAIT`] for the completion (200 with what was purged where), else answers 202
//! with the request's id: the erasure goes on, and `parley audit` shows its completion.

use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use parley_erasure::request::BY_SELF;
use serde_json::json;
use tracing::{Instrument, info, info_span, warn};

use crate::api::{ApiError, user_of};
use crate::state::AppState;

/// How long `DELETE /api/me` waits for the erasure to complete before answering 202.
pub const ERASURE_WAIT: Duration = Duration::from_secs(30);

/// `DELETE /api/me`.
pub(crate) async fn erase_me(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
) -> Result<(StatusCode, Json<serde_json::Value>), ApiError> {
    let user = user_of(&state, &headers).await?;
    let span = info_span!(parent: None, "gateway.erase_me", user = %user);
    async {
        let unavailable = |error: parley_erasure::ErasureError| {
            warn!(%error, "erasure request not appended");
            ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "log_unavailable", "the event log did not accept it; retry")
        };
        let requested = state.erasures.request(&user, BY_SELF, "").await.map_err(unavailable)?;
        let request_event_id = requested.event.envelope.event_id;
        let completion = state.erasures.completion(&requested, ERASURE_WAIT).await.unwrap_or_else(|error| {
            warn!(%error, "the erasure's completion could not be read; answering 202");
            None
        });
        Ok(match completion {
            Some(done) => {
                info!(purged = ?done.purged, "erasure completed");
                let purged: serde_json::Map<String, serde_json::Value> =
                    done.purged.iter().map(|p| (p.place.clone(), json!(p.items))).collect();
                let body = json!({
                    "status": "completed",
                    "request_event_id": request_event_id,
                    "key_erased_at": done.key_erased_at,
                    "purged": purged,
                });
                (StatusCode::OK, Json(body))
            }
            None => {
                let position = requested.position.to_string();
                let body = json!({ "status": "requested", "request_event_id": request_event_id, "position": position });
                (StatusCode::ACCEPTED, Json(body))
            }
        })
    }
    .instrument(span)
    .await
}
