//! A fixed-latency, OpenAI-compatible chat completions stub for load tests (the way LLM
//! gateways are load-tested with a mock model): every answer is `tokens` words, the first
//! after `first_token`, the rest `per_token` apart, streamed as server-sent events (with a
//! usage chunk) or returned whole. It has no capacity limit of its own, so a benchmark
//! against it measures the pipeline, not the model. Lives only under benches/.

use std::time::Duration;

use axum::Json;
use axum::body::Body;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

/// How the stub answers.
#[derive(Debug, Clone, Copy)]
pub(crate) struct StubModel {
    pub first_token: Duration,
    pub per_token: Duration,
    pub tokens: usize,
}

impl StubModel {
    /// The model's own time for one whole answer.
    pub(crate) fn answer_time(&self) -> Duration {
        self.first_token + self.per_token * u32::try_from(self.tokens.saturating_sub(1)).unwrap_or(0)
    }

    /// Serves the stub on a free 127.0.0.1 port; returns its base URL (…/v1).
    pub(crate) async fn serve(self) -> String {
        let app = axum::Router::new()
            .route("/v1/chat/completions", axum::routing::post(complete))
            .route("/v1/models", axum::routing::get(|| async { Json(json!({"data": [{"id": "stub"}]})) }))
            .with_state(self);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/v1", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        url
    }
}

fn chunk(content: Option<&str>, finish: Option<&str>, usage: Option<Value>) -> String {
    let choices = if usage.is_some() {
        json!([])
    } else {
        json!([{"index": 0, "delta": {"content": content}, "finish_reason": finish}])
    };
    let body = json!({"id": "stub", "object": "chat.completion.chunk", "created": 0, "model": "stub",
                      "choices": choices, "usage": usage});
    format!("data: {body}\n\n")
}

async fn complete(State(stub): State<StubModel>, Json(request): Json<Value>) -> Response {
    let usage = json!({"prompt_tokens": 10, "completion_tokens": stub.tokens, "total_tokens": 10 + stub.tokens});
    if request["stream"] != true {
        tokio::time::sleep(stub.answer_time()).await;
        let text = vec!["word"; stub.tokens].join(" ");
        return Json(json!({"id": "stub", "object": "chat.completion", "created": 0, "model": "stub",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
            "usage": usage}))
        .into_response();
    }
    let events = futures::stream::unfold(0usize, move |sent| {
        let usage = usage.clone();
        async move {
            let piece = match sent {
                n if n < stub.tokens => {
                    tokio::time::sleep(if n == 0 { stub.first_token } else { stub.per_token }).await;
                    chunk(Some(if n == 0 { "word" } else { " word" }), None, None)
                }
                n if n == stub.tokens => chunk(Some(""), Some("stop"), None),
                n if n == stub.tokens + 1 => chunk(None, None, Some(usage.clone())),
                n if n == stub.tokens + 2 => "data: [DONE]\n\n".to_owned(),
                _ => return None,
            };
            Some((Ok::<_, std::io::Error>(piece), sent + 1))
        }
    });
    Response::builder().header("content-type", "text/event-stream").body(Body::from_stream(events)).unwrap()
}
