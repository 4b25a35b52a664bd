//! The options of `parley inference`.

use std::time::Duration;

use clap::Args;
use parley_eventlog::secret::{SecretError, secret_from};
use parley_eventlog::settings::parse_duration;

use crate::balancer::EndpointSpec;
use crate::llm::LlmSettings;
use crate::prompt::PromptLayout;

/// The model server when the operator names none (the quick start's llama.cpp).
pub const DEFAULT_LLM_BASE_URL: &str = "http://127.0.0.1:18080/v1";
/// The model asked for when the operator names none.
pub const DEFAULT_LLM_MODEL: &str = "SmolLM2-135M-Instruct";
/// The context token budget when the operator sets none.
pub const DEFAULT_CONTEXT_TOKEN_BUDGET: usize = 1536;
/// The system prompt when the operator sets none (replay rebuilds prompts with it too).
pub const DEFAULT_SYSTEM_PROMPT: &str = "You are Parley, a helpful assistant. Answer briefly.";

/// Options of `parley inference`.
#[derive(Debug, Clone, Args)]
pub struct InferenceArgs {
    /// Base URL of the OpenAI-compatible API, up to and including /v1 (the pool's only
    /// endpoint when no --llm-endpoint is given).
    #[arg(long, env = "PARLEY_LLM_BASE_URL", default_value = DEFAULT_LLM_BASE_URL)]
    pub llm_base_url: String,

    /// An endpoint of the LLM pool, `URL[;model=NAME][;slots=N][;api_key_env=VAR]`;
    /// repeat for several (the environment variable separates them with spaces). Calls go
    /// to the least loaded endpoint whose breaker is closed; a failed one is retried on
    /// another.
    #[arg(long = "llm-endpoint", env = "PARLEY_LLM_ENDPOINTS", value_delimiter = ' ')]
    pub llm_endpoints: Vec<EndpointSpec>,

    /// Model name sent to the API and recorded when the API does not name one.
    #[arg(long, env = "PARLEY_LLM_MODEL", default_value = DEFAULT_LLM_MODEL)]
    pub llm_model: String,

    /// Who serves the model, as `gen_ai.provider.name` on spans and metrics (e.g. openai,
    /// azure.ai.openai, llama.cpp).
    #[arg(long, env = "PARLEY_LLM_PROVIDER", default_value = "llama.cpp")]
    pub llm_provider: String,

    /// File holding the API key of endpoints that name no `api_key_env` (readable by its
    /// owner only). The key may instead come from the environment variable
    /// PARLEY_LLM_API_KEY, never from an argument (every local user can read a process's
    /// arguments). Neither: "none".
    #[arg(long, env = "PARLEY_LLM_API_KEY_FILE")]
    pub llm_api_key_file: Option<std::path::PathBuf>,

    /// Upper bound on one LLM call, streaming included.
    #[arg(long, env = "PARLEY_LLM_TIMEOUT", default_value = "60s", value_parser = parse_duration)]
    pub llm_timeout: Duration,

    /// Most tokens of one answer.
    #[arg(long, env = "PARLEY_LLM_MAX_TOKENS", default_value_t = 256,
          value_parser = clap::value_parser!(u32).range(1..=32768))]
    pub llm_max_tokens: u32,

    /// LLM calls per query before LLMResponseFailed is written.
    #[arg(long, env = "PARLEY_LLM_MAX_ATTEMPTS", default_value_t = 3,
          value_parser = clap::value_parser!(u32).range(1..=10))]
    pub llm_max_attempts: u32,

    /// First retry delay; doubles per attempt, with jitter.
    #[arg(long, env = "PARLEY_LLM_RETRY_BACKOFF", default_value = "500ms", value_parser = parse_duration)]
    pub llm_retry_backoff: Duration,

    /// Consecutive failed calls that open the circuit breaker.
    #[arg(long, env = "PARLEY_LLM_BREAKER_THRESHOLD", default_value_t = 5,
          value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub llm_breaker_threshold: u32,

    /// How long an open breaker refuses calls before letting one probe through.
    #[arg(long, env = "PARLEY_LLM_BREAKER_COOL_DOWN", default_value = "30s", value_parser = parse_duration)]
    pub llm_breaker_cool_down: Duration,

    /// Estimated tokens of earlier turns, question and system prompt sent to the model.
    #[arg(long, env = "PARLEY_CONTEXT_TOKEN_BUDGET", default_value_t = DEFAULT_CONTEXT_TOKEN_BUDGET as u32,
          value_parser = clap::value_parser!(u32).range(16..=1_000_000))]
    pub context_token_budget: u32,

    /// How long to wait for the projection to hold the previous turn before reading the
    /// history from the log instead.
    #[arg(long, env = "PARLEY_CONTEXT_WAIT", default_value = "2s", value_parser = parse_duration)]
    pub context_wait: Duration,

    /// Bytes of message text kept in memory as the histories of the conversations this
    /// instance reads, so a turn reads no history from the projection (0: none kept, every
    /// turn reads it). The least recently used go first; a conversation longer than an
    /// eighth of this is read each turn.
    #[arg(long, env = "PARLEY_HISTORY_KEEP_BYTES", default_value_t = 64 << 20)]
    pub history_keep_bytes: usize,

    /// Chunks and earlier messages retrieved from the vector store per question (0: none).
    #[arg(long, env = "PARLEY_RETRIEVAL_TOP_K", default_value_t = 4,
          value_parser = clap::value_parser!(u16).range(0..=50))]
    pub retrieval_top_k: u16,

    /// Hits less similar than this (cosine) are left out of the prompt, whichever search
    /// found them (keyword hits carry their cosine too; only `--search-mode keyword`, which
    /// does not embed the question, has none to compare).
    #[arg(long, env = "PARLEY_RETRIEVAL_MIN_SCORE", default_value_t = 0.3)]
    pub retrieval_min_score: f32,

    /// The semantic cache: before calling the model, serve the asker's earlier answer to
    /// the same question in the same context (docs/knowledge.md). Needs retrieval (the
    /// question's embedding). `false` turns it off; a query's `no_cache` skips it.
    #[arg(long, env = "PARLEY_SEMANTIC_CACHE", default_value_t = true, action = clap::ArgAction::Set)]
    pub semantic_cache: bool,

    /// The lowest cosine similarity of two questions the cache considers (the word checks
    /// decide the rest).
    #[arg(long, env = "PARLEY_CACHE_MIN_SIMILARITY", default_value_t = crate::cache::DEFAULT_MIN_SIMILARITY,
          value_parser = parse_similarity)]
    pub cache_min_similarity: f32,

    /// Cached answers older than this are not served (at most 168h, how long the
    /// projection keeps them).
    #[arg(long, env = "PARLEY_CACHE_TTL", default_value = "24h", value_parser = parse_cache_ttl)]
    pub cache_ttl: Duration,

    /// The system prompt every conversation starts with.
    #[arg(long, env = "PARLEY_SYSTEM_PROMPT", default_value = DEFAULT_SYSTEM_PROMPT)]
    pub system_prompt: String,

    /// Prompt layout: `stable` keeps a conversation's prompt prefix from turn to turn (the
    /// model server's prompt cache reuses it); `sliding` is the older layout, for comparison.
    #[arg(long, env = "PARLEY_PROMPT_LAYOUT", value_enum, default_value = "stable")]
    pub prompt_layout: PromptLayout,

    /// Each lane's share of free slots when several lanes have turns waiting, relative to
    /// the lane below it (premium : standard : batch = R² : R : 1). Batch work never takes
    /// the last free slot, so a chat turn does not wait for a batch answer to finish.
    #[arg(long, env = "PARLEY_LANE_RATIO", default_value_t = 4,
          value_parser = clap::value_parser!(u32).range(1..=100))]
    pub lane_ratio: u32,

    /// Slots kept free for premium turns: standard turns never take the last N (batch
    /// turns never the last N + 1), so a premium turn does not wait for an answer to
    /// finish; 0 lets standard use every slot while no premium turn waits.
    #[arg(long, env = "PARLEY_PREMIUM_SLOTS", default_value_t = 0,
          value_parser = clap::value_parser!(u16).range(0..=255))]
    pub premium_slots: u16,

    /// Queries answered at once (each starts as soon as it is fetched and a slot is free);
    /// match it to the model servers' slots.
    #[arg(long, env = "PARLEY_INFERENCE_CONCURRENCY", default_value_t = 4,
          value_parser = clap::value_parser!(u16).range(1..=256))]
    pub concurrency: u16,

    /// The consumer group of the inference instances.
    #[arg(long, env = "PARLEY_INFERENCE_GROUP", default_value = "parley-inference")]
    pub group_id: String,

    /// Kafka transactional id, unique per running instance (default: group id + random suffix;
    /// zombie instances are fenced through the consumer group generation).
    #[arg(long, env = "PARLEY_INFERENCE_TRANSACTIONAL_ID")]
    pub transactional_id: Option<String>,
}

fn parse_similarity(value: &str) -> Result<f32, String> {
    match value.parse::<f32>() {
        Ok(similarity) if (0.0..=1.0).contains(&similarity) => Ok(similarity),
        _ => Err(format!("{value:?}: expected a cosine similarity between 0 and 1")),
    }
}

fn parse_cache_ttl(value: &str) -> Result<Duration, String> {
    let ttl = parse_duration(value)?;
    let kept = Duration::from_secs(u64::from(parley_projections::store::CACHE_RETENTION_SECONDS));
    if ttl > kept {
        return Err(format!(
            "{value:?}: at most {}h (how long the projection keeps cached answers)",
            kept.as_secs() / 3600
        ));
    }
    Ok(ttl)
}

impl InferenceArgs {
    pub(super) fn llm_settings(&self) -> Result<LlmSettings, SecretError> {
        let single = || EndpointSpec {
            base_url: self.llm_base_url.clone(),
            model: None,
            api_key_env: None,
            slots: u32::from(self.concurrency),
        };
        let api_key = secret_from("PARLEY_LLM_API_KEY", self.llm_api_key_file.as_deref())?;
        Ok(LlmSettings {
            endpoints: if self.llm_endpoints.is_empty() { vec![single()] } else { self.llm_endpoints.clone() },
            api_key: api_key.unwrap_or_else(|| "none".to_owned()),
            model: self.llm_model.clone(),
            provider: self.llm_provider.clone(),
            max_tokens: self.llm_max_tokens,
            timeout: self.llm_timeout,
            max_attempts: self.llm_max_attempts,
            retry_backoff: self.llm_retry_backoff,
            breaker_threshold: self.llm_breaker_threshold,
            breaker_cool_down: self.llm_breaker_cool_down,
        })
    }
}
