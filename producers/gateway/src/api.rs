//! What every HTTP handler shares: the caller's user from `Authorization: Bearer <token>`
//! (`user_of`) and the error answer with its JSON body ([`ApiError`]).

use axum::Json;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use parley_events::UserId;
use parley_projections::ProjectionError;
use serde_json::json;
use tracing::warn;

use crate::state::AppState;

/// An error answer: status and a JSON body `{error, message, ...}`.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    body: serde_json::Value,
    /// Seconds until the same request may pass (429), when known.
    retry_after: Option<u64>,
}

impl ApiError {
    pub(crate) fn new(status: StatusCode, code: &str, message: impl Into<String>) -> Self {
        Self { status, body: json!({ "error": code, "message": message.into() }), retry_after: None }
    }

    /// An error answer with a body of more fields than `error` and `message`.
    pub(crate) fn with_body(status: StatusCode, body: serde_json::Value) -> Self {
        Self { status, body, retry_after: None }
    }

    /// The HTTP status it answers with.
    #[cfg(test)]
    pub(crate) fn status(&self) -> StatusCode {
        self.status
    }

    /// 429 with `Retry-After`.
    pub(crate) fn too_many(code: &str, message: impl Into<String>, retry_after_ms: u64) -> Self {
        let retry_after = retry_after_ms.div_ceil(1000);
        let body = json!({ "error": code, "message": message.into(), "retry_after_ms": retry_after_ms });
        Self { status: StatusCode::TOO_MANY_REQUESTS, body, retry_after: Some(retry_after) }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let retry_after = match self.retry_after {
            Some(seconds) => Some(seconds.to_string()),
            None => (self.status == StatusCode::SERVICE_UNAVAILABLE).then(|| "1".to_owned()),
        };
        let mut response = (self.status, Json(self.body)).into_response();
        if let Some(value) = retry_after.and_then(|v| header::HeaderValue::from_str(&v).ok()) {
            response.headers_mut().insert(header::RETRY_AFTER, value);
        }
        response
    }
}

impl From<ProjectionError> for ApiError {
    fn from(error: ProjectionError) -> Self {
        warn!(%error, "query path: store error");
        Self::new(StatusCode::SERVICE_UNAVAILABLE, "store_unavailable", "the conversation store did not answer; retry")
    }
}

/// The caller's user, from `Authorization: Bearer <token>`; else 401 saying why.
pub(crate) async fn user_of(state: &AppState, headers: &HeaderMap) -> Result<UserId, ApiError> {
    let unauthorized = |message: String| ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", message);
    let token = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .ok_or_else(|| unauthorized("invalid token: none given (send Authorization: Bearer <token>)".into()))?;
    match state.identity.verify(token).await {
        Ok(verified) => Ok(verified.user_id),
        Err(refusal) => Err(unauthorized(format!("invalid token: {refusal}"))),
    }
}
