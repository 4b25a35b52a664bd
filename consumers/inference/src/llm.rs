//! The LLM: a pool of OpenAI-compatible chat completions endpoints, streamed, behind a
//! timeout, bounded retries with backoff and jitter, and a balancer (least outstanding
//! requests, a circuit breaker per endpoint, a failed attempt retried on another
//! endpoint, a health probe that brings a broken endpoint back).

use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use async_openai::Client;
use async_openai::config::OpenAIConfig;
use async_openai::error::OpenAIError;
use async_openai::types::chat::{
    ChatCompletionRequestAssistantMessage, ChatCompletionRequestMessage, ChatCompletionRequestSystemMessage,
    ChatCompletionRequestUserMessage, ChatCompletionStreamOptions, CreateChatCompletionRequest, FinishReason,
};
use futures::StreamExt;
use thiserror::Error;
use tracing::{Instrument, info, info_span};

use crate::balancer::{Balancer, EndpointSpec};
use crate::completion::{Completion, LlmError};
use crate::metrics;
use crate::prompt::{ChatMessage, Role};
use crate::retry::backoff_delay;

/// How to reach and call the model.
#[derive(Debug, Clone)]
pub struct LlmSettings {
    /// The model servers of the pool.
    pub endpoints: Vec<EndpointSpec>,
    /// Key and model name of endpoints that do not name their own.
    pub api_key: String,
    /// The model asked for.
    pub model: String,
    /// Who serves the model, as `gen_ai.provider.name` names it on spans and metrics.
    pub provider: String,
    /// Most tokens of one answer.
    pub max_tokens: u32,
    /// How long one call may take.
    pub timeout: Duration,
    /// Calls per answer, retries included.
    pub max_attempts: u32,
    /// The first pause between attempts (doubled each time).
    pub retry_backoff: Duration,
    /// Failures in a row that open an endpoint's breaker.
    pub breaker_threshold: u32,
    /// How long an open breaker keeps its endpoint out.
    pub breaker_cool_down: Duration,
}

/// One endpoint of the pool.
#[derive(Debug)]
struct Endpoint {
    base_url: String,
    model: String,
    api_key: String,
    client: Client<OpenAIConfig>,
}

/// The pool of OpenAI-compatible model servers that answer.
#[derive(Debug)]
pub struct ChatModel {
    endpoints: Vec<Endpoint>,
    settings: LlmSettings,
    balancer: Mutex<Balancer>,
    probe: reqwest::Client,
}

/// A configuration the pool cannot be built from.
#[derive(Debug, Clone, Error, PartialEq, Eq)]
#[error("LLM endpoint {endpoint}: environment variable {variable} (its api_key_env) is not set")]
pub struct MissingKey {
    /// The endpoint that names the variable.
    pub endpoint: String,
    /// The environment variable.
    pub variable: String,
}

impl ChatModel {
    /// A pool of the endpoints of `settings`.
    pub fn new(settings: LlmSettings) -> Result<Self, MissingKey> {
        let mut endpoints = Vec::with_capacity(settings.endpoints.len());
        for spec in &settings.endpoints {
            let key = match &spec.api_key_env {
                None => settings.api_key.clone(),
                Some(variable) => std::env::var(variable)
                    .map_err(|_| MissingKey { endpoint: spec.base_url.clone(), variable: variable.clone() })?,
            };
            let config = OpenAIConfig::new().with_api_base(&spec.base_url).with_api_key(&key);
            endpoints.push(Endpoint {
                api_key: key,
                base_url: spec.base_url.clone(),
                model: spec.model.clone().unwrap_or_else(|| settings.model.clone()),
                client: Client::with_config(config),
            });
        }
        let balancer = Balancer::new(
            settings.endpoints.iter().map(|e| e.slots),
            settings.breaker_threshold,
            settings.breaker_cool_down,
        );
        Ok(Self { endpoints, settings, balancer: Mutex::new(balancer), probe: reqwest::Client::new() })
    }

    fn balancer(&self) -> std::sync::MutexGuard<'_, Balancer> {
        self.balancer.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Answers `messages`, retrying transient failures (on another endpoint when there is
    /// one). `on_delta(attempt, index, text)` sees every piece of text as it arrives; a
    /// retry starts again at index 0. Returns the outcome and the number of calls made.
    pub async fn complete(
        &self,
        messages: &[ChatMessage],
        on_delta: impl FnMut(u32, i32, &str),
    ) -> (Result<Completion, LlmError>, u32) {
        self.complete_as(None, messages, on_delta).await
    }

    /// [`Self::complete`], asking the servers for `model` instead of their own (None: theirs).
    pub async fn complete_as(
        &self,
        model: Option<&str>,
        messages: &[ChatMessage],
        mut on_delta: impl FnMut(u32, i32, &str),
    ) -> (Result<Completion, LlmError>, u32) {
        let max_attempts = self.settings.max_attempts.max(1);
        let mut failed_on = Vec::new();
        let mut attempt = 0;
        loop {
            attempt += 1;
            let Some(index) = self.balancer().pick(Instant::now(), &failed_on) else {
                return (Err(LlmError::CircuitOpen), attempt - 1);
            };
            let endpoint = &self.endpoints[index];
            let span = info_span!("inference.llm_attempt", attempt, endpoint = %endpoint.base_url);
            let started = Instant::now();
            let model = model.unwrap_or(&endpoint.model);
            let result = self
                .stream_once(endpoint, model, messages, |i, text| on_delta(attempt, i, text))
                .instrument(span)
                .await;
            metrics::model_call(&self.settings.provider, model, &result, started.elapsed());
            let healthy = matches!(result, Ok(_) | Err(LlmError::Rejected(_)));
            self.balancer().finish(index, healthy, Instant::now());
            self.show_breakers();
            match result {
                Err(error) if error.is_retryable() && attempt < max_attempts => {
                    failed_on.push(index);
                    // Another endpoint is tried at once; the same one after a backoff.
                    let elsewhere = self.endpoints.len() > failed_on.len();
                    let delay = if elsewhere {
                        Duration::ZERO
                    } else {
                        backoff_delay(attempt, self.settings.retry_backoff, self.settings.timeout, rand::random())
                    };
                    tracing::warn!(%error, attempt, endpoint = %endpoint.base_url, ?delay, "LLM call failed; retrying");
                    tokio::time::sleep(delay).await;
                    if !elsewhere {
                        failed_on.clear();
                    }
                }
                outcome => return (outcome, attempt),
            }
        }
    }

    /// Asks every endpoint whose breaker is open for its model list; one that answers takes
    /// calls again. Run every few seconds.
    pub async fn probe_open_endpoints(&self) {
        let open = self.balancer().open(Instant::now());
        for index in open {
            let endpoint = &self.endpoints[index];
            let answered = self
                .probe
                .get(format!("{}/models", endpoint.base_url))
                .bearer_auth(&endpoint.api_key)
                .timeout(Duration::from_secs(2))
                .send()
                .await;
            if answered.is_ok_and(|response| response.status().is_success()) {
                info!(endpoint = %endpoint.base_url, "LLM endpoint answers again; back in the pool");
                self.balancer().healed(index);
            }
        }
        self.show_breakers();
    }

    /// Publishes whether each endpoint's breaker is open.
    fn show_breakers(&self) {
        let open = self.balancer().open(Instant::now());
        for (index, endpoint) in self.endpoints.iter().enumerate() {
            metrics::breaker(&endpoint.base_url, open.contains(&index));
        }
    }

    async fn stream_once(
        &self,
        endpoint: &Endpoint,
        model: &str,
        messages: &[ChatMessage],
        on_delta: impl FnMut(i32, &str),
    ) -> Result<Completion, LlmError> {
        let timeout = self.settings.timeout;
        tokio::time::timeout(timeout, self.stream_unbounded(endpoint, model, messages, on_delta))
            .await
            .unwrap_or(Err(LlmError::Timeout(timeout)))
    }

    async fn stream_unbounded(
        &self,
        endpoint: &Endpoint,
        model: &str,
        messages: &[ChatMessage],
        mut on_delta: impl FnMut(i32, &str),
    ) -> Result<Completion, LlmError> {
        let started = Instant::now();
        let request = CreateChatCompletionRequest {
            model: model.to_owned(),
            messages: messages.iter().map(to_request_message).collect(),
            max_completion_tokens: Some(self.settings.max_tokens),
            stream_options: Some(ChatCompletionStreamOptions { include_usage: Some(true), include_obfuscation: None }),
            ..Default::default()
        };
        let mut stream = endpoint.client.chat().create_stream(request).await.map_err(classify)?;
        let mut completion = Completion {
            text: String::new(),
            model: model.to_owned(),
            finish_reason: "unknown".into(),
            prompt_tokens: 0,
            completion_tokens: 0,
            latency: Duration::ZERO,
            time_to_first_token: None,
            endpoint: endpoint.base_url.clone(),
        };
        let mut deltas = 0;
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(classify)?;
            if !chunk.model.is_empty() && chunk.model != "-" {
                chunk.model.clone_into(&mut completion.model);
            }
            if let Some(usage) = chunk.usage {
                completion.prompt_tokens = i32::try_from(usage.prompt_tokens).unwrap_or(i32::MAX);
                completion.completion_tokens = i32::try_from(usage.completion_tokens).unwrap_or(i32::MAX);
            }
            for choice in chunk.choices {
                if let Some(text) = choice.delta.content.filter(|t| !t.is_empty()) {
                    completion.time_to_first_token.get_or_insert_with(|| started.elapsed());
                    on_delta(deltas, &text);
                    deltas += 1;
                    completion.text.push_str(&text);
                }
                if let Some(reason) = choice.finish_reason {
                    completion.finish_reason = finish_reason_name(reason).into();
                }
            }
        }
        if completion.completion_tokens == 0 {
            completion.completion_tokens = deltas; // endpoints without usage: one delta ≈ one token
        }
        completion.latency = started.elapsed();
        Ok(completion)
    }
}

fn to_request_message(message: &ChatMessage) -> ChatCompletionRequestMessage {
    let content = message.content.clone();
    match message.role {
        Role::System => ChatCompletionRequestSystemMessage::from(content).into(),
        Role::User => ChatCompletionRequestUserMessage::from(content).into(),
        Role::Assistant => ChatCompletionRequestAssistantMessage::from(content).into(),
    }
}

fn finish_reason_name(reason: FinishReason) -> &'static str {
    match reason {
        FinishReason::Stop => "stop",
        FinishReason::Length => "length",
        FinishReason::ToolCalls => "tool_calls",
        FinishReason::ContentFilter => "content_filter",
        FinishReason::FunctionCall => "function_call",
    }
}

fn classify(error: OpenAIError) -> LlmError {
    match error {
        OpenAIError::Reqwest(e) if e.is_timeout() => LlmError::Timeout(Duration::ZERO),
        OpenAIError::Reqwest(e) if e.status().is_some_and(|s| s.is_client_error() && s.as_u16() != 429) => {
            LlmError::Rejected(e.to_string())
        }
        OpenAIError::Reqwest(e) => LlmError::Unavailable(e.to_string()),
        OpenAIError::ApiError(e) => LlmError::Rejected(e.to_string()),
        OpenAIError::JSONDeserialize(e, body) => {
            api_error_in(&body).unwrap_or(LlmError::InvalidResponse(e.to_string()))
        }
        other => LlmError::Unavailable(other.to_string()),
    }
}

/// An error object the client could not parse as OpenAI's (llama.cpp sends a numeric
/// `code`): a 4xx other than 429 is a rejection (not retried), anything else unavailability.
fn api_error_in(body: &str) -> Option<LlmError> {
    let error = serde_json::from_str::<serde_json::Value>(body).ok()?.get("error")?.clone();
    let message = error.get("message")?.as_str()?.to_owned();
    let code = error.get("code").and_then(|c| c.as_u64().or_else(|| c.as_str()?.parse().ok()));
    Some(match code {
        Some(code) if (400..500).contains(&code) && code != 429 => LlmError::Rejected(message),
        _ => LlmError::Unavailable(message),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_bodies_the_client_cannot_parse_are_still_classified() {
        let overflow = r#"{"error":{"code":400,"message":"request (2056 tokens) exceeds the available context size (2048 tokens), try increasing it","type":"exceed_context_size_error"}}"#;
        let error = api_error_in(overflow).unwrap();
        assert!(!error.is_retryable(), "the same prompt overflows again");
        assert!(error.to_string().contains("exceeds the available context size"), "{error}");
        assert!(api_error_in(r#"{"error":{"code":"503","message":"loading model"}}"#).unwrap().is_retryable());
        assert!(api_error_in(r#"{"error":{"code":429,"message":"slow down"}}"#).unwrap().is_retryable());
        assert!(api_error_in("not json").is_none());
    }
}
