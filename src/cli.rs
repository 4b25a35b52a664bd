//! The `parley` command line: the connection settings every command shares ([`Common`],
//! global: they go before or after the subcommand) and one variant per subcommand.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Result;
use clap::{Args, Parser, Subcommand};
use parley_embedder::EmbedderArgs;
use parley_embedder::service::{DEFAULT_CHUNK_CHARS, DEFAULT_CHUNK_OVERLAP};
use parley_eventlog::KafkaSettings;
use parley_eventlog::settings::parse_duration;
use parley_events::dead_letters::LetterId;
use parley_events::lanes::Lane;
use parley_events::{ConversationId, DocumentId, UserId};
use parley_gateway::GatewayArgs;
use parley_inference::service::InferenceArgs;
use parley_inference::service::{DEFAULT_LLM_BASE_URL, DEFAULT_LLM_MODEL, DEFAULT_SYSTEM_PROMPT};
use parley_projections::CqlSettings;
use parley_projections::as_of::ReplayPoint;
use parley_projections::budget::BudgetSettings;
use parley_retrieval::{EmbeddingSettings, MilvusSettings};

#[derive(Debug, Parser)]
#[command(name = "parley", version, about = "Kafka-native, event-sourced LLM chat pipeline")]
pub(crate) struct Cli {
    #[command(flatten)]
    pub(crate) common: Common,
    #[command(subcommand)]
    pub(crate) command: Command,
}

#[derive(Debug, Args)]
pub(crate) struct Common {
    #[command(flatten)]
    pub(crate) kafka: KafkaSettings,

    #[command(flatten)]
    pub(crate) cql: CqlSettings,

    /// Confluent-compatible schema registry API root.
    #[arg(
        long,
        global = true,
        env = "PARLEY_SCHEMA_REGISTRY_URL",
        default_value = "http://127.0.0.1:18081/apis/ccompat/v7"
    )]
    pub(crate) schema_registry_url: String,

    #[command(flatten)]
    pub(crate) embedding: EmbeddingSettings,

    #[command(flatten)]
    pub(crate) milvus: MilvusSettings,

    #[command(flatten)]
    pub(crate) budgets: BudgetSettings,

    /// Run the gateway and inference without the vector store: no search, no retrieval.
    #[arg(long, global = true, env = "PARLEY_WITHOUT_RETRIEVAL")]
    pub(crate) without_retrieval: bool,

    /// Log format: text for people, json for log pipelines.
    #[arg(long, global = true, env = "PARLEY_LOG_FORMAT", default_value = "text", value_parser = ["text", "json"])]
    pub(crate) log_format: String,

    /// OTLP/HTTP collector to export spans to (Jaeger: its OTLP port, 4318); none: no export.
    #[arg(long, global = true, env = "PARLEY_OTLP_ENDPOINT", value_parser = crate::telemetry::parse_endpoint)]
    pub(crate) otlp_endpoint: Option<String>,

    /// File holding the master key that wraps each person's data key (base64 of 32 random
    /// bytes, readable by its owner only). It may instead come from the environment variable
    /// PARLEY_MASTER_KEY, never from an argument. Neither: nothing is sealed (docs/security.md,
    /// "Sealed content").
    #[arg(long, global = true, env = "PARLEY_MASTER_KEY_FILE")]
    pub(crate) master_key_file: Option<PathBuf>,

    /// Address to serve Prometheus metrics on (`/metrics`) for inference, the projection and
    /// the embedder; a gateway (and `parley all`) also serves them on its own port.
    #[arg(long, global = true, env = "PARLEY_METRICS_LISTEN")]
    pub(crate) metrics_listen: Option<SocketAddr>,
}

#[derive(Debug, Subcommand)]
pub(crate) enum Command {
    /// Serve the chat page, the HTTP API and the WebSocket.
    Gateway(GatewayArgs),
    /// Answer queries with the LLM.
    Inference(InferenceArgs),
    /// Project conversation events into the CQL store (the context projection).
    Projection,
    /// Embed messages and document chunks into the vector store.
    Embedder(EmbedderArgs),
    /// Carry out erasures (the erasure worker): destroy each erased person's data key, purge
    /// their rows and vectors, record the completion.
    Erasure,
    /// Erase a person (GDPR article 17): append an erasure request, then wait for the
    /// erasure worker's completion and print what was purged where (docs/security.md).
    Erase {
        /// The person's user id.
        user: UserId,
        /// A ticket or reference for the record (never personal data).
        #[arg(long, default_value = "")]
        reason: String,
        /// How long to wait for the completion (0: append the request and return).
        #[arg(long, default_value = "120s", value_parser = parse_duration)]
        wait: Duration,
    },
    /// Submit documents (files, or folders walked for text files) to a user's knowledge base.
    Ingest {
        /// Files or folders.
        #[arg(required = true)]
        paths: Vec<PathBuf>,
        /// User id that owns the documents (only their searches and answers see them).
        #[arg(long, env = "PARLEY_INGEST_OWNER")]
        owner: UserId,
        /// A label copied onto every document, as key=value; repeatable.
        #[arg(long = "label", value_parser = parse_label)]
        labels: Vec<(String, String)>,
        /// Pause between documents while an inference queue is older than this, as the
        /// gateways refuse documents then (0: never pause).
        #[arg(long, env = "PARLEY_SHED_QUEUE_AGE", default_value = "10s", value_parser = parse_duration)]
        shed_queue_age: Duration,
    },
    /// Create topics, register schemas and run every service in one process (quick start).
    All {
        // Boxed: the one large variant (clippy's large_enum_variant).
        #[command(flatten)]
        gateway: Box<GatewayArgs>,
        #[command(flatten)]
        inference: InferenceArgs,
        #[command(flatten)]
        embedder: EmbedderArgs,
        /// Leave the context projection out (it runs as `parley projection` elsewhere, or
        /// not at all: chat goes on without it; history and the query API wait for it).
        #[arg(long, env = "PARLEY_ALL_WITHOUT_PROJECTION")]
        without_projection: bool,
    },
    /// Rebuild a conversation's state from the log (never calling the model) and diff it
    /// against the projection; exits 1 when they differ.
    Replay {
        conversation_id: ConversationId,
        /// Read every partition instead of the projection's offset index.
        #[arg(long)]
        scan: bool,
        /// The state as it was at a point: a sequence (`7`), a position of the events topic
        /// (`parley.conversation-events/3/1042`) or an RFC 3339 time in UTC
        /// (`2026-12-05T07:30:00Z`, by when the log took each record). No diff then: the
        /// projection holds the present.
        #[arg(long)]
        at: Option<ReplayPoint>,
        /// Each answer's prompt rebuilt from events alone and checked against the digest
        /// the answer recorded: the messages the model was sent, or why they cannot be
        /// rebuilt exactly.
        #[arg(long)]
        prompts: bool,
        #[command(flatten)]
        prompt: PromptArgs,
        #[command(flatten)]
        rerun: RerunArgs,
        #[arg(long, default_value = "text", value_parser = ["text", "json"])]
        format: String,
    },
    /// Every event of a conversation in order, with its log position, schema and trace.
    ///
    /// With `--user` instead of a conversation: everything of one person in the log (their
    /// conversations, budget refusals, documents, dead letters and erasures) with positions,
    /// and their budgets and tier now, for a support or compliance request.
    Audit {
        #[arg(required_unless_present = "user")]
        conversation_id: Option<ConversationId>,
        /// Audit a person instead of a conversation.
        #[arg(long, conflicts_with = "conversation_id")]
        user: Option<UserId>,
        /// With `--user`: only what the log took since this RFC 3339 time in UTC.
        #[arg(long, requires = "user", value_parser = parse_utc_millis)]
        since: Option<i64>,
        /// Read every partition instead of the projection's offset index.
        #[arg(long)]
        scan: bool,
        /// `table` for people, `json` for one JSON object per line.
        #[arg(long, default_value = "table", value_parser = ["table", "json"])]
        format: String,
    },
    /// One trace from Jaeger as a tree of spans (a turn's trace id: `parley audit`).
    Trace {
        #[arg(value_parser = crate::trace_view::parse_trace_id)]
        trace_id: String,
        /// Jaeger's query API.
        #[arg(long, env = "PARLEY_JAEGER_QUERY_URL", default_value = "http://127.0.0.1:16686")]
        jaeger_url: String,
    },
    /// Manage projections: rebuild one into a new generation, drop the replaced one.
    #[command(subcommand)]
    Projections(ProjectionsCommand),
    /// Records consumers gave up on (the dead-letter topic): list them, show one whole,
    /// redrive one (its record back to its topic) or discard it. Until then, the consumer
    /// holds back the later records of the letter's key (its conversation).
    #[command(subcommand, name = "dead-letters")]
    DeadLetters(DeadLettersCommand),
    /// List or remove a user's documents (what the HTTP API does for a signed-in user, for
    /// operators acting on a user's behalf).
    #[command(subcommand)]
    Documents(DocumentsCommand),
    /// A user's semantic cache (answers inference may serve again): list it, or clear it
    /// whole or of the answers that quoted one document.
    #[command(subcommand)]
    Cache(CacheCommand),
    /// A user's model token spend this day and month and by conversation (from the log),
    /// against the budgets enforced for them, and the turns inference refused for want of budget.
    Usage {
        user: UserId,
        /// `text` for people (docs/operations.md, "Token budgets"), `json` for one JSON object.
        #[arg(long, default_value = "text", value_parser = ["text", "json"])]
        format: String,
    },
    /// Set a user's own token budgets, enforced whatever the defaults are (0: no limit for
    /// them); budgets not named keep their value. Takes effect within 2 seconds.
    #[command(name = "budget")]
    Budget {
        user: UserId,
        /// Model tokens (prompt + completion) the user may spend per UTC day.
        #[arg(long)]
        daily: Option<u64>,
        /// Model tokens the user may spend per UTC month.
        #[arg(long)]
        monthly: Option<u64>,
        /// Model tokens each of the user's conversations may spend.
        #[arg(long)]
        conversation: Option<u64>,
    },
    /// Show a user's tier, or set it: the lane their new conversations are served in
    /// (premium before standard before batch; see --lanes).
    Tier { user: UserId, tier: Option<Lane> },
    /// Create Parley's topics (existing ones are left alone).
    Topics {
        /// Replication factor of new topics [default: the number of brokers, at most 3;
        /// min.insync.replicas 2 at 3 copies or more, else 1].
        #[arg(long, env = "PARLEY_TOPIC_REPLICATION", value_parser = clap::value_parser!(i32).range(1..=16))]
        replication: Option<i32>,
    },
    /// Register or check the Avro schemas.
    #[command(subcommand)]
    Schemas(SchemasCommand),
    /// What-if re-runs in bulk: a sample of conversations re-run with other models through
    /// inference's batch lane (after chat), summed up per model.
    #[command(subcommand)]
    Experiments(ExperimentsCommand),
}

#[derive(Debug, Subcommand)]
pub(crate) enum ExperimentsCommand {
    /// Rebuild the prompts of sampled conversations' answers from events and append one
    /// re-run request per answer and model to the experiments topic; inference serves them
    /// in its batch lane. Then wait for the runs and print the summary.
    Run {
        /// Re-run these conversations (repeatable) instead of a sample.
        #[arg(long = "conversation")]
        conversations: Vec<ConversationId>,
        /// How many conversations to sample among those the log took records of since
        /// `--since` (the same seed and log pick the same sample).
        #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..=100_000))]
        sample: u32,
        /// Sample among conversations with records since this RFC 3339 time in UTC
        /// [default: the whole log].
        #[arg(long, value_parser = parse_utc_millis)]
        since: Option<i64>,
        /// Picks another sample.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Which answers of each conversation: its last, or all.
        #[arg(long, default_value = "last", value_parser = ["last", "all"])]
        turns: String,
        /// A model to ask inference's model servers for (repeatable: a comparison)
        /// [default: what chat asks each model server for].
        #[arg(long = "model")]
        models: Vec<String>,
        #[command(flatten)]
        prompt: PromptArgs,
        /// The batch's name [default: a new one].
        #[arg(long)]
        batch: Option<String>,
        /// How long to wait for the runs (0: append the requests and return).
        #[arg(long, default_value = "10m", value_parser = parse_duration)]
        wait: Duration,
        #[arg(long, default_value = "text", value_parser = ["text", "json"])]
        format: String,
    },
    /// A batch summed up per model: the originals, then each model's re-runs (answers
    /// changed, failed, pending, tokens, latency).
    Summary {
        batch: String,
        /// Wait this long for runs still pending.
        #[arg(long, default_value = "0s", value_parser = parse_duration)]
        wait: Duration,
        #[arg(long, default_value = "text", value_parser = ["text", "json"])]
        format: String,
    },
}

/// How a turn's prompt is rebuilt from events: the system prompt and the embedder's
/// chunking (a retrieved chunk is cut again from its document).
#[derive(Debug, Clone, Args)]
pub(crate) struct PromptArgs {
    /// The system prompt: the one inference used (`--prompts`: as it reads it), or the
    /// one to send (re-runs).
    #[arg(long, env = "PARLEY_SYSTEM_PROMPT", default_value = DEFAULT_SYSTEM_PROMPT)]
    pub system_prompt: String,
    /// The embedder's chunk size, to cut retrieved chunks again.
    #[arg(long, env = "PARLEY_CHUNK_CHARS", default_value_t = DEFAULT_CHUNK_CHARS)]
    pub chunk_chars: u32,
    /// The embedder's chunk overlap.
    #[arg(long, env = "PARLEY_CHUNK_OVERLAP", default_value_t = DEFAULT_CHUNK_OVERLAP)]
    pub chunk_overlap: u32,
}

#[derive(Debug, Subcommand)]
pub(crate) enum ProjectionsCommand {
    /// Rebuild a projection from offset 0 into a new generation while the live one keeps
    /// serving, then switch readers to it. The replaced generation is kept.
    Rebuild {
        #[arg(value_parser = ["context"])]
        projection: String,
    },
    /// Drop the generation the last rebuild replaced.
    DropPrevious {
        #[arg(value_parser = ["context"])]
        projection: String,
    },
    /// Show the live, previous and in-progress generations.
    Status {
        #[arg(value_parser = ["context"])]
        projection: String,
    },
}

#[derive(Debug, Subcommand)]
pub(crate) enum DeadLettersCommand {
    /// Every dead letter, oldest first per partition: its id (partition/offset in the
    /// dead-letter topic), when, which consumer group gave up, where the record came from,
    /// its key and the error.
    List {
        /// Only the letters of this consumer group.
        #[arg(long)]
        consumer: Option<String>,
        /// Only the letters in this state (`open`: those holding conversations back).
        #[arg(long, value_parser = ["open", "redriven", "discarded"])]
        status: Option<String>,
        #[arg(long, default_value = "text", value_parser = ["text", "json"])]
        format: String,
    },
    /// One dead letter whole: every field, what became of it, and the original payload in hex.
    Show {
        /// partition/offset in the dead-letter topic, as `list` shows it.
        id: LetterId,
    },
    /// Writes the letter's record back to its source topic (same partition, key and bytes,
    /// with a `parley-redriven-from` header) and marks the letter redriven, in one
    /// transaction. The consumer runs the copy before the key's held records.
    Redrive {
        id: LetterId,
        /// Why (kept with the decision).
        #[arg(long)]
        reason: Option<String>,
        /// Who decides [default: $USER].
        #[arg(long, env = "USER", default_value = "operator")]
        by: String,
    },
    /// Gives up on the letter's record for good: the consumer lets the key's held records go on.
    Discard {
        id: LetterId,
        #[arg(long)]
        reason: Option<String>,
        #[arg(long, env = "USER", default_value = "operator")]
        by: String,
    },
}

#[derive(Debug, Subcommand)]
pub(crate) enum CacheCommand {
    /// The user's cached answers: question, answer, age, documents quoted.
    List { user: UserId },
    /// Remove the user's cached answers (their conversations stay); with --document only
    /// those whose prompt quoted that document.
    Clear {
        user: UserId,
        #[arg(long)]
        document: Option<DocumentId>,
    },
}

#[derive(Debug, Subcommand)]
pub(crate) enum DocumentsCommand {
    /// The user's searchable documents: id, title.
    List {
        #[arg(long)]
        owner: UserId,
        #[arg(long, default_value_t = 1000)]
        limit: usize,
    },
    /// Append a DocumentDeleted: the embedder then removes the owner's vectors of it.
    Delete {
        document_id: DocumentId,
        #[arg(long)]
        owner: UserId,
    },
}

#[derive(Debug, Subcommand)]
pub(crate) enum SchemasCommand {
    /// Register every schema version under BACKWARD_TRANSITIVE.
    Register,
    /// Ask the registry whether the .avsc files are compatible with what is registered;
    /// exits 1 if any is not.
    Check {
        /// Directory of .avsc files (default: the schemas compiled into this binary).
        #[arg(long)]
        dir: Option<PathBuf>,
    },
}

pub(crate) fn parse_label(value: &str) -> Result<(String, String), String> {
    match value.split_once('=') {
        Some((key, label)) if !key.is_empty() => Ok((key.to_owned(), label.to_owned())),
        _ => Err(format!("{value:?}: expected key=value")),
    }
}

/// The service name spans are exported under.
pub(crate) fn service_name(command: &Command) -> &'static str {
    match command {
        Command::Gateway(_) => "parley-gateway",
        Command::Inference(_) => "parley-inference",
        Command::Projection => "parley-projection",
        Command::Embedder(_) => "parley-embedder",
        Command::Erasure => "parley-erasure",
        Command::All { .. } => "parley",
        _ => CLI_SERVICE,
    }
}

/// The service name of every command that is not a long-running service.
pub(crate) const CLI_SERVICE: &str = "parley-cli";

/// An RFC 3339 time in UTC (`2026-12-05T07:30:00Z`) as ms since the epoch.
fn parse_utc_millis(text: &str) -> Result<i64, String> {
    let time = humantime::parse_rfc3339(text.trim())
        .map_err(|e| format!("{text:?} is not an RFC 3339 time in UTC (2026-12-05T07:30:00Z): {e}"))?;
    let millis = time.duration_since(std::time::UNIX_EPOCH).map_err(|e| e.to_string())?.as_millis();
    i64::try_from(millis).map_err(|e| e.to_string())
}

/// `parley replay --rerun`: a what-if re-run of one turn (written to the experiments topic,
/// never to the conversation).
#[derive(Debug, Clone, Args)]
pub(crate) struct RerunArgs {
    /// Re-run this turn (1: the first question) with the same context.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    pub rerun: Option<u32>,
    /// With `--rerun`: the model to ask.
    #[arg(long, env = "PARLEY_LLM_MODEL", default_value = DEFAULT_LLM_MODEL)]
    pub model: String,
    /// With `--rerun`: the model server, up to and including /v1.
    #[arg(long, env = "PARLEY_LLM_BASE_URL", default_value = DEFAULT_LLM_BASE_URL)]
    pub endpoint: String,
    /// With `--rerun`: most tokens of the answer.
    #[arg(long, env = "PARLEY_LLM_MAX_TOKENS", default_value_t = 256)]
    pub max_tokens: u32,
    /// With `--rerun`: how long the call may take.
    #[arg(long, env = "PARLEY_LLM_TIMEOUT", default_value = "60s", value_parser = parse_duration)]
    pub llm_timeout: Duration,
}
