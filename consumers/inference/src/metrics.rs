//! Inference's metrics: each model call as the OpenTelemetry GenAI semantic conventions
//! name it (`gen_ai.client.operation.duration`, `gen_ai.client.token.usage`, time to the
//! first chunk; in Prometheus, dots become underscores and seconds a `_seconds` suffix),
//! the latency a person sees (question → first token, question → outcome), failures by
//! kind, each endpoint's breaker, and the semantic cache's lookups and the model time its
//! hits saved, and where questions' histories came from.

use std::sync::LazyLock;
use std::time::Duration;

use parley_eventlog::metrics::{HUMAN_SECONDS, counter, histogram, int_gauge, register};
use prometheus::{Counter, HistogramVec, IntCounterVec, IntGaugeVec, Opts};

use crate::completion::{Completion, LlmError};

/// The semantic conventions' advised buckets for `gen_ai.client.operation.duration`.
const OPERATION_SECONDS: &[f64] =
    &[0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92];

/// The semantic conventions' advised buckets for `gen_ai.client.token.usage`.
const TOKENS: &[f64] = &[1.0, 4.0, 16.0, 64.0, 256.0, 1024.0, 4096.0, 16384.0, 65536.0, 262_144.0, 1_048_576.0];

/// Buckets for the time to a streamed answer's first chunk.
const FIRST_CHUNK_SECONDS: &[f64] =
    &[0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0];

const CALL_LABELS: [&str; 5] =
    ["gen_ai_operation_name", "gen_ai_provider_name", "gen_ai_request_model", "gen_ai_response_model", "error_type"];

static OPERATION_DURATION: LazyLock<HistogramVec> = LazyLock::new(|| {
    histogram(
        "gen_ai_client_operation_duration_seconds",
        "GenAI operation duration (one call to the model server)",
        &CALL_LABELS,
        OPERATION_SECONDS,
    )
});

static TOKEN_USAGE: LazyLock<HistogramVec> = LazyLock::new(|| {
    histogram(
        "gen_ai_client_token_usage",
        "Number of input and output tokens used per call",
        &[
            "gen_ai_operation_name",
            "gen_ai_provider_name",
            "gen_ai_request_model",
            "gen_ai_response_model",
            "gen_ai_token_type",
        ],
        TOKENS,
    )
});

static TIME_TO_FIRST_CHUNK: LazyLock<HistogramVec> = LazyLock::new(|| {
    histogram(
        "gen_ai_client_operation_time_to_first_chunk_seconds",
        "Time from the request to the first chunk of a streamed response",
        &["gen_ai_operation_name", "gen_ai_provider_name", "gen_ai_request_model", "gen_ai_response_model"],
        FIRST_CHUNK_SECONDS,
    )
});

static FIRST_TOKEN: LazyLock<HistogramVec> = LazyLock::new(|| {
    histogram(
        "parley_first_token_seconds",
        "Time from a question being written to the log to its answer's first token",
        &["lane"],
        HUMAN_SECONDS,
    )
});

static ANSWER: LazyLock<HistogramVec> = LazyLock::new(|| {
    histogram(
        "parley_answer_seconds",
        "Time from a question being written to the log to its outcome (answer, failure or cancel)",
        &["lane", "outcome"],
        HUMAN_SECONDS,
    )
});

static FAILURES: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counter("parley_llm_failures_total", "Questions answered with LLMResponseFailed, by error kind", &["kind"])
});

static BREAKER_OPEN: LazyLock<IntGaugeVec> = LazyLock::new(|| {
    int_gauge(
        "parley_llm_breaker_open",
        "Whether an LLM endpoint's circuit breaker is open (1) or closed (0)",
        &["endpoint"],
    )
});

static CACHE_LOOKUPS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counter(
        "parley_semantic_cache_lookups_total",
        "Questions looked up in the semantic cache: hit, or why not (no_candidate, other_context, negation…)",
        &["result"],
    )
});

static CACHE_SAVED: LazyLock<Counter> = LazyLock::new(|| {
    let opts = Opts::new(
        "parley_semantic_cache_model_seconds_saved_total",
        "Model time the cached answers served took when the model generated them",
    );
    #[allow(clippy::expect_used)] // a constant, valid name
    register(Counter::with_opts(opts).expect("a valid metric"))
});

/// A semantic cache lookup's result (`hit` or a miss's reason); a hit saved `saved_ms`.
pub fn cache_lookup(result: &str, saved_ms: i64) {
    CACHE_LOOKUPS.with_label_values(&[result]).inc();
    if saved_ms > 0 {
        CACHE_SAVED.inc_by(seconds(saved_ms));
    }
}

static HISTORY_READS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counter(
        "parley_inference_history_total",
        "Where a question's earlier turns came from: kept (no read), projection, log, or none (a first question)",
        &["source"],
    )
});

static HISTORY_KEPT: LazyLock<IntGaugeVec> = LazyLock::new(|| {
    int_gauge(
        "parley_inference_history_kept",
        "Histories inference keeps in memory: conversations, and bytes of their messages",
        &["unit"],
    )
});

/// A question's history came from `source` (`kept`, `projection`, `log` or `none`); `kept` is what
/// the keeper holds now (conversations, bytes).
pub fn history(source: &str, (conversations, bytes): (usize, usize)) {
    HISTORY_READS.with_label_values(&[source]).inc();
    HISTORY_KEPT.with_label_values(&["conversations"]).set(i64::try_from(conversations).unwrap_or(i64::MAX));
    HISTORY_KEPT.with_label_values(&["bytes"]).set(i64::try_from(bytes).unwrap_or(i64::MAX));
}

/// Creates the failure series of every kind at 0 (Prometheus's `rate` sees nothing of a
/// series that starts at 1).
pub fn init() {
    for kind in LlmError::KINDS.into_iter().chain([parley_events::budget::BUDGET_EXCEEDED]) {
        FAILURES.with_label_values(&[kind]);
    }
    CACHE_LOOKUPS.with_label_values(&["hit"]);
    LazyLock::force(&CACHE_SAVED);
    for source in ["kept", "projection", "log", "none"] {
        HISTORY_READS.with_label_values(&[source]);
    }
}

/// One call to a model server (an attempt of a turn).
pub fn model_call(provider: &str, request_model: &str, result: &Result<Completion, LlmError>, took: Duration) {
    let response_model = result.as_ref().map_or("", |completion| completion.model.as_str());
    let error_type = result.as_ref().err().map_or("", LlmError::kind);
    OPERATION_DURATION
        .with_label_values(&["chat", provider, request_model, response_model, error_type])
        .observe(took.as_secs_f64());
    let Ok(completion) = result else { return };
    for (token_type, count) in [("input", completion.prompt_tokens), ("output", completion.completion_tokens)] {
        TOKEN_USAGE
            .with_label_values(&["chat", provider, request_model, response_model, token_type])
            .observe(f64::from(count));
    }
    if let Some(first) = completion.time_to_first_token {
        TIME_TO_FIRST_CHUNK
            .with_label_values(&["chat", provider, request_model, response_model])
            .observe(first.as_secs_f64());
    }
}

/// A question's first token, `waited_ms` after it was written.
pub fn first_token(lane: &str, waited_ms: i64) {
    FIRST_TOKEN.with_label_values(&[lane]).observe(seconds(waited_ms));
}

/// A question's outcome (`answer`, `cancelled` or a failure kind), `waited_ms` after it was written.
pub fn outcome(lane: &str, outcome: &str, waited_ms: i64) {
    ANSWER.with_label_values(&[lane, outcome]).observe(seconds(waited_ms));
}

/// A question answered with LLMResponseFailed of `kind`.
pub fn failure(kind: &str) {
    FAILURES.with_label_values(&[kind]).inc();
}

/// Whether `endpoint`'s breaker is open now.
pub fn breaker(endpoint: &str, open: bool) {
    BREAKER_OPEN.with_label_values(&[endpoint]).set(i64::from(open));
}

fn seconds(ms: i64) -> f64 {
    ms.max(0) as f64 / 1000.0
}
