//! `parley`: one binary, a subcommand per service.

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use parley_embedder::EmbedderArgs;
use parley_eventlog::dead_letter::{Decision, read_book, settle};
use parley_eventlog::load::{self, LoadBoard};
use parley_eventlog::settings::parse_duration;
use parley_eventlog::topics::ensure_topics;
use parley_eventlog::{EventProducer, KafkaSettings};
use parley_events::budget::{self, BudgetLimits};
use parley_events::dead_letters::LetterId;
use parley_events::invariants::{Violation, violations};
use parley_events::lanes::Lane;
use parley_events::registry::{SchemaRegistry, Verdict};
use parley_events::turn::CANCELLED;
use parley_events::{ConversationEvent, EventCodec, SchemaCatalog};
use parley_gateway::{Credentials, Gateway, GatewayArgs};
use parley_inference::service::InferenceArgs;
use parley_ingest::Submission;
use parley_ingest::document::{deletion_event, media_type_of};
use parley_ingest::submit::submit_all;
use parley_projections::budget::{BudgetLedger, BudgetSettings};
use parley_projections::rebuild::{drop_previous, rebuild_context};
use parley_projections::replay::{LogReader, replay};
use parley_projections::tiers::TierBook;
use parley_projections::{CqlSettings, Store};
use parley_retrieval::{EmbeddingBackend, EmbeddingSettings, MilvusSettings, Retriever, VectorStore};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::telemetry::Telemetry;

mod telemetry;
mod trace_view;

#[derive(Debug, Parser)]
#[command(name = "parley", version, about = "Kafka-native, event-sourced LLM chat pipeline")]
struct Cli {
    #[command(flatten)]
    common: Common,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Args)]
struct Common {
    #[command(flatten)]
    kafka: KafkaSettings,

    #[command(flatten)]
    cql: CqlSettings,

    /// Confluent-compatible schema registry API root.
    #[arg(
        long,
        global = true,
        env = "PARLEY_SCHEMA_REGISTRY_URL",
        default_value = "http://127.0.0.1:18081/apis/ccompat/v7"
    )]
    schema_registry_url: String,

    #[command(flatten)]
    embedding: EmbeddingSettings,

    #[command(flatten)]
    milvus: MilvusSettings,

    #[command(flatten)]
    budgets: BudgetSettings,

    /// Run the gateway and inference without the vector store: no search, no retrieval.
    #[arg(long, global = true, env = "PARLEY_WITHOUT_RETRIEVAL")]
    without_retrieval: bool,

    /// Log format: text for people, json for log pipelines.
    #[arg(long, global = true, env = "PARLEY_LOG_FORMAT", default_value = "text", value_parser = ["text", "json"])]
    log_format: String,

    /// OTLP/HTTP collector to export spans to (Jaeger: its OTLP port, 4318); none: no export.
    #[arg(long, global = true, env = "PARLEY_OTLP_ENDPOINT", value_parser = telemetry::parse_endpoint)]
    otlp_endpoint: Option<String>,

    /// Address to serve Prometheus metrics on (`/metrics`) for inference, the projection and
    /// the embedder; a gateway (and `parley all`) also serves them on its own port.
    #[arg(long, global = true, env = "PARLEY_METRICS_LISTEN")]
    metrics_listen: Option<SocketAddr>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve the chat page, the HTTP API and the WebSocket.
    Gateway(GatewayArgs),
    /// Answer queries with the LLM.
    Inference(InferenceArgs),
    /// Project conversation events into the CQL store (the context projection).
    Projection,
    /// Embed messages and document chunks into the vector store.
    Embedder(EmbedderArgs),
    /// Submit documents (files, or folders walked for text files) to a user's knowledge base.
    Ingest {
        /// Files or folders.
        #[arg(required = true)]
        paths: Vec<PathBuf>,
        /// User id that owns the documents (only their searches and answers see them).
        #[arg(long, env = "PARLEY_INGEST_OWNER")]
        owner: String,
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
        conversation_id: Uuid,
        /// Read every partition instead of the projection's offset index.
        #[arg(long)]
        scan: bool,
        #[arg(long, default_value = "text", value_parser = ["text", "json"])]
        format: String,
    },
    /// Every event of a conversation in order, with its log position, schema and trace.
    Audit {
        conversation_id: Uuid,
        /// Read every partition instead of the projection's offset index.
        #[arg(long)]
        scan: bool,
        /// `table` for people, `json` for one JSON object per line.
        #[arg(long, default_value = "table", value_parser = ["table", "json"])]
        format: String,
    },
    /// One trace from Jaeger as a tree of spans (a turn's trace id: `parley audit`).
    Trace {
        #[arg(value_parser = trace_view::parse_trace_id)]
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
    /// A user's model token spend this day and month and by conversation (from the log),
    /// against the budgets enforced for them, and the turns inference refused for want of budget.
    Usage {
        user: String,
        /// `text` for people (docs/operations.md, "Token budgets"), `json` for one JSON object.
        #[arg(long, default_value = "text", value_parser = ["text", "json"])]
        format: String,
    },
    /// Set a user's own token budgets, enforced whatever the defaults are (0: no limit for
    /// them); budgets not named keep their value. Takes effect within 2 seconds.
    #[command(name = "budget")]
    Budget {
        user: String,
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
    Tier { user: String, tier: Option<Lane> },
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
}

#[derive(Debug, Subcommand)]
enum ProjectionsCommand {
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
enum DeadLettersCommand {
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
enum DocumentsCommand {
    /// The user's searchable documents: id, title.
    List {
        #[arg(long)]
        owner: String,
        #[arg(long, default_value_t = 1000)]
        limit: usize,
    },
    /// Append a DocumentDeleted: the embedder then removes the owner's vectors of it.
    Delete {
        document_id: Uuid,
        #[arg(long)]
        owner: String,
    },
}

#[derive(Debug, Subcommand)]
enum SchemasCommand {
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

fn main() -> ExitCode {
    let cli = Cli::parse();
    let service = service_name(&cli.command);
    let command = service == CLI_SERVICE;
    let telemetry = match Telemetry::init(&cli.common.log_format, cli.common.otlp_endpoint.as_deref(), service, command)
    {
        Ok(telemetry) => telemetry,
        Err(error) => {
            eprintln!("error: cannot set up logging and tracing: {error:#}");
            return ExitCode::FAILURE;
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let code = match runtime.block_on(run(cli)) {
        Ok(code) => code,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    };
    telemetry.shutdown();
    code
}

/// `parley dead-letters`: the dead-letter topic read whole and folded; redrive and discard
/// append a decision to it.
async fn dead_letters(kafka: &KafkaSettings, registry: &str, command: DeadLettersCommand) -> Result<ExitCode> {
    let codec = EventCodec::new(registry)?;
    let (book, unreadable) = read_book(kafka, &codec).await?;
    for (id, error) in &unreadable {
        tracing::warn!(%id, %error, "not a dead-letter record; passed by");
    }
    let code = dead_letter_command(kafka, &codec, &book, command).await;
    report_undecodable(unreadable.len() as u64);
    code
}

/// One `parley dead-letters` command on the folded topic.
async fn dead_letter_command(
    kafka: &KafkaSettings,
    codec: &EventCodec,
    book: &parley_events::dead_letters::LetterBook,
    command: DeadLettersCommand,
) -> Result<ExitCode> {
    let topic = kafka.topics().dead_letter;
    let at = |millis: i64| {
        humantime::format_rfc3339_millis(
            std::time::UNIX_EPOCH + Duration::from_millis(u64::try_from(millis).unwrap_or(0)),
        )
    };
    let text = |bytes: &Option<Vec<u8>>| bytes.as_deref().map(String::from_utf8_lossy).unwrap_or_default().into_owned();
    let (id, decision, reason, by) = match command {
        DeadLettersCommand::List { consumer, status, format } => {
            let listed = book.entries().iter().filter(|e| {
                consumer.as_ref().is_none_or(|c| *c == e.letter.consumer)
                    && status.as_ref().is_none_or(|s| s == e.status.as_str())
            });
            for entry in listed {
                let (id, letter) = (entry.id, &entry.letter);
                let source = letter.source();
                if format == "json" {
                    let line = serde_json::json!({"id": id.to_string(), "failed_at": at(letter.failed_at).to_string(),
                        "consumer": letter.consumer, "source": source.to_string(), "key": text(&letter.key),
                        "error": letter.error, "payload_bytes": letter.payload.as_ref().map_or(0, Vec::len),
                        "status": entry.status.as_str(),
                        "redriven_to": entry.status.copy().map(ToString::to_string),
                        "resolved_by": entry.resolution.as_ref().map(|r| r.resolved_by.clone())});
                    println!("{line}");
                } else {
                    println!(
                        "{:<10} {} {:<32} {:<44} key={:<38} {:<10} {}",
                        id.to_string(),
                        at(letter.failed_at),
                        letter.consumer,
                        source.to_string(),
                        text(&letter.key),
                        entry.status.as_str(),
                        letter.error.chars().take(120).collect::<String>()
                    );
                }
            }
            return Ok(ExitCode::SUCCESS);
        }
        DeadLettersCommand::Show { id } => {
            let Some(entry) = book.get(id) else {
                eprintln!(
                    "no dead letter {id} in {topic} (ids are partition/offset, as `parley dead-letters list` shows)"
                );
                return Ok(ExitCode::FAILURE);
            };
            let letter = &entry.letter;
            let payload = letter.payload.as_deref().unwrap_or_default();
            println!("id          {id} ({topic})");
            println!("failed at   {}", at(letter.failed_at));
            println!("consumer    {}", letter.consumer);
            println!("source      {}", letter.source());
            println!("key         {}", text(&letter.key));
            println!("error       {}", letter.error);
            for (name, value) in letter.headers.iter().collect::<std::collections::BTreeMap<_, _>>() {
                println!("header      {name}: {value}");
            }
            println!("status      {}", entry.status);
            if let Some(resolution) = &entry.resolution {
                let reason = resolution.reason.as_deref().map_or(String::new(), |r| format!(": {r}"));
                println!("resolved    {} by {}{reason}", at(resolution.resolved_at), resolution.resolved_by);
            }
            println!("payload     {} bytes", payload.len());
            for (row, chunk) in payload.chunks(16).enumerate() {
                let hex: Vec<String> = chunk.iter().map(|b| format!("{b:02x}")).collect();
                let ascii: String =
                    chunk.iter().map(|b| if b.is_ascii_graphic() || *b == b' ' { *b as char } else { '.' }).collect();
                println!("  {:06x}  {:<47}  {ascii}", row * 16, hex.join(" "));
            }
            return Ok(ExitCode::SUCCESS);
        }
        DeadLettersCommand::Redrive { id, reason, by } => (id, Decision::Redrive, reason, by),
        DeadLettersCommand::Discard { id, reason, by } => (id, Decision::Discard, reason, by),
    };
    match settle(kafka, codec, book, id, decision, &by, reason).await {
        Ok(resolution) => {
            match resolution.copy() {
                Some(copy) => println!(
                    "dead letter {id} redriven: its record is at {copy}; {} runs it before the records of its key it held",
                    resolution.consumer
                ),
                None => println!(
                    "dead letter {id} discarded; {} lets the records of its key it held go on",
                    resolution.consumer
                ),
            }
            Ok(ExitCode::SUCCESS)
        }
        Err(parley_eventlog::EventLogError::DeadLetter(refused)) => {
            eprintln!("{refused}");
            Ok(ExitCode::FAILURE)
        }
        Err(error) => Err(error.into()),
    }
}

/// Serves the process's Prometheus metrics at `http://{addr}/metrics` until `shutdown`.
async fn serve_metrics(addr: SocketAddr, shutdown: CancellationToken) -> Result<()> {
    use parley_eventlog::metrics::{CONTENT_TYPE, render};
    let listener = tokio::net::TcpListener::bind(addr).await.with_context(|| format!("metrics on {addr}"))?;
    let routes = axum::Router::new().route(
        "/metrics",
        axum::routing::get(|| async { ([(axum::http::header::CONTENT_TYPE, CONTENT_TYPE)], render()) }),
    );
    tracing::info!(%addr, "serving metrics at /metrics");
    tokio::spawn(async move {
        let served = axum::serve(listener, routes).with_graceful_shutdown(async move { shutdown.cancelled().await });
        if let Err(error) = served.await {
            tracing::warn!(%error, "the metrics server stopped");
        }
    });
    Ok(())
}

/// The service name spans are exported under.
fn service_name(command: &Command) -> &'static str {
    match command {
        Command::Gateway(_) => "parley-gateway",
        Command::Inference(_) => "parley-inference",
        Command::Projection => "parley-projection",
        Command::Embedder(_) => "parley-embedder",
        Command::All { .. } => "parley",
        _ => CLI_SERVICE,
    }
}

/// The service name of every command that is not a long-running service.
const CLI_SERVICE: &str = "parley-cli";

async fn run(cli: Cli) -> Result<ExitCode> {
    let Common {
        kafka,
        cql,
        schema_registry_url: registry,
        embedding,
        milvus,
        without_retrieval,
        budgets,
        metrics_listen,
        ..
    } = cli.common;
    let shutdown = shutdown_on_signal();
    if let Some(addr) = metrics_listen {
        serve_metrics(addr, shutdown.clone()).await?;
    }
    let retrieval = async || -> Result<Option<(Arc<dyn EmbeddingBackend>, VectorStore)>> {
        if without_retrieval { Ok(None) } else { Ok(Some(open_retrieval(&embedding, &milvus).await?)) }
    };
    match cli.command {
        Command::Gateway(args) => {
            let credentials = Credentials::load(&args, &shutdown).await?;
            let store = Store::connect(&cql).await.context("connecting to the CQL store")?;
            let retriever = retrieval().await?.map(|(backend, vectors)| Retriever::new(backend, vectors));
            let gateway =
                Gateway::bind(&kafka, &registry, &args, credentials, budgets, store, retriever, shutdown).await?;
            print_chat_url(&gateway);
            gateway.serve().await?;
        }
        Command::Inference(args) => {
            let store = Store::connect(&cql).await.context("connecting to the CQL store")?;
            let retriever = retrieval().await?.map(|(backend, vectors)| Retriever::new(backend, vectors));
            parley_inference::service::run(&kafka, &registry, store, retriever, args, budgets, shutdown).await?;
        }
        Command::Projection => {
            let store = Store::connect(&cql).await?;
            parley_projections::projector::run(&kafka, &registry, store, shutdown).await?;
        }
        Command::Embedder(args) => {
            let (backend, vectors) = open_retrieval(&embedding, &milvus).await?;
            parley_embedder::run(&kafka, &registry, backend, vectors, args, shutdown).await?;
        }
        Command::Ingest { paths, owner, labels, shed_queue_age } => {
            return ingest(&kafka, &registry, &paths, &owner, &labels, shed_queue_age).await;
        }
        Command::Tier { user, tier } => {
            let store = Store::connect(&cql).await.context("connecting to the CQL store")?;
            let tiers = TierBook::open(&store).await?;
            if let Some(tier) = tier {
                tiers.set(&user, tier).await?;
            }
            let tier = tiers.tier_of(&user).await?;
            println!("{user}: {tier} (new conversations; lanes: {})", kafka.lanes);
        }
        Command::Usage { user, format } => {
            let now = parley_events::event::now_millis();
            let reader = LogReader::new(&kafka, &registry)?;
            let events = reader.events_since(budget::month_start_ms(now)).await.context("reading the log")?;
            let usage = budget::usage(&events, &user, now);
            let store = Store::connect(&cql).await.context("connecting to the CQL store")?;
            let ledger = BudgetLedger::open(&store).await?;
            let limits = ledger.limits_of(&user, &budgets).await?;
            let source = if ledger.has_own_limits(&user).await? { "own" } else { "default" };
            print_usage(&user, &usage, limits, source, events.len(), &format)?;
            report_undecodable(reader.undecodable());
        }
        Command::Budget { user, daily, monthly, conversation } => {
            let store = Store::connect(&cql).await.context("connecting to the CQL store")?;
            let ledger = BudgetLedger::open(&store).await?;
            let current = ledger.limits_of(&user, &budgets).await?;
            let limits = BudgetLimits {
                daily: daily.unwrap_or(current.daily),
                monthly: monthly.unwrap_or(current.monthly),
                per_conversation: conversation.unwrap_or(current.per_conversation),
            };
            ledger.set_limits(&user, limits).await?;
            println!(
                "budgets of {user}, their own from now on: {limits}; the gateways and inference enforce them within {} s",
                parley_projections::budget::OWN_LIMITS_TTL.as_secs()
            );
        }
        Command::Documents(DocumentsCommand::List { owner, limit }) => {
            let (_, vectors) = open_retrieval(&embedding, &milvus).await?;
            for document in vectors.documents(&owner, limit).await.context("listing documents")? {
                println!("{}  {}", document.document_id, document.title);
            }
        }
        Command::Documents(DocumentsCommand::Delete { document_id, owner }) => {
            let producer = EventProducer::new(kafka.client_config(), Arc::new(EventCodec::new(&registry)?))?;
            let event = deletion_event(&owner, document_id, None);
            let position = producer
                .append(&kafka.topics().documents, &event.document_id, &event, None)
                .await
                .context("appending DocumentDeleted")?;
            println!(
                "deletion of {document_id} for {owner} accepted at {position} (event {})",
                event.envelope.event_id
            );
        }
        Command::All { gateway, inference, embedder, without_projection } => {
            let credentials = Credentials::load(&gateway, &shutdown).await?;
            ensure_topics(&kafka, None).await.context("creating topics")?;
            SchemaRegistry::new(&registry)?
                .register_all(&SchemaCatalog::embedded())
                .await
                .context("registering schemas")?;
            let store = Store::connect(&cql).await.context("connecting to the CQL store")?;
            let retrieval = retrieval().await?;
            let retriever = retrieval.clone().map(|(backend, vectors)| Retriever::new(backend, vectors));
            let gateway = Gateway::bind(
                &kafka,
                &registry,
                &gateway,
                credentials,
                budgets,
                store.clone(),
                retriever.clone(),
                shutdown.clone(),
            )
            .await?;
            let inference = spawn_linked(&shutdown, {
                let (kafka, registry, shutdown, store) =
                    (kafka.clone(), registry.clone(), shutdown.clone(), store.clone());
                async move {
                    parley_inference::service::run(&kafka, &registry, store, retriever, inference, budgets, shutdown)
                        .await
                }
            });
            let embedder = retrieval.map(|(backend, vectors)| {
                let (kafka, registry, shutdown_) = (kafka.clone(), registry.clone(), shutdown.clone());
                spawn_linked(&shutdown, async move {
                    parley_embedder::run(&kafka, &registry, backend, vectors, embedder, shutdown_).await
                })
            });
            let projection = (!without_projection).then(|| {
                let (kafka, registry, shutdown_) = (kafka.clone(), registry.clone(), shutdown.clone());
                spawn_linked(&shutdown, async move {
                    parley_projections::projector::run(&kafka, &registry, store, shutdown_).await
                })
            });
            print_chat_url(&gateway);
            let served = gateway.serve().await;
            inference.await.context("inference task")??;
            if let Some(projection) = projection {
                projection.await.context("projection task")??;
            }
            if let Some(embedder) = embedder {
                embedder.await.context("embedder task")??;
            }
            served?;
        }
        Command::Replay { conversation_id, scan, format } => {
            let store = Store::connect(&cql).await.context("connecting to the CQL store")?;
            let reader = LogReader::new(&kafka, &registry)?;
            let (state, records, differences, method, elapsed) = replay(&reader, &store, conversation_id, scan).await?;
            let Some(state) = state else {
                eprintln!("no events of conversation {conversation_id} in the log");
                return Ok(ExitCode::FAILURE);
            };
            let violations = violations(records.iter().map(|r| &r.event));
            if format == "json" {
                println!(
                    "{}",
                    serde_json::json!({
                        "conversation_id": conversation_id,
                        "owner": state.head.owner,
                        "last_sequence": state.head.last_sequence,
                        "open_query_event_id": state.head.open_query.as_ref().map(|q| &q.event_id),
                        "messages": state.messages,
                        "gaps": state.gaps,
                        "records": records.len(),
                        "method": format!("{method:?}"),
                        "fetch_ms": elapsed.as_secs_f64() * 1000.0,
                        "diff": differences,
                        "violations": violations,
                    })
                );
            } else {
                println!(
                    "conversation {conversation_id} of {}: {} events read with {method:?} in {:.1} ms (the model was not called)",
                    state.head.owner,
                    records.len(),
                    elapsed.as_secs_f64() * 1000.0
                );
                for m in &state.messages {
                    let usage = m.model.as_ref().map_or(String::new(), |model| {
                        format!(
                            "[{model} · {}+{} tokens · {} ms] ",
                            m.prompt_tokens.unwrap_or(0),
                            m.completion_tokens.unwrap_or(0),
                            m.llm_latency_ms.unwrap_or(0)
                        )
                    });
                    println!("  #{:<4} {:<10} {usage}{}", m.sequence, m.kind.as_str(), m.text.replace('\n', " "));
                    // A cancel carries its query's sequence: shown under the question.
                    for record in &records {
                        if let ConversationEvent::CancelRequested(cancel) = &record.event
                            && cancel.envelope.sequence == m.sequence
                        {
                            println!("  #{:<4} {:<10} asked by {}", m.sequence, "cancel", cancel.user_id);
                        }
                    }
                }
                for (expected, got) in &state.gaps {
                    println!("  gap: expected sequence {expected}, log continues at {got}");
                }
                if differences.is_empty() {
                    println!("diff against the projection: none");
                } else {
                    println!("diff against the projection ({}):", differences.len());
                    differences.iter().for_each(|d| println!("  {d}"));
                }
                print_violations(&violations);
            }
            report_undecodable(reader.undecodable());
            if !differences.is_empty() || !violations.is_empty() {
                return Ok(ExitCode::FAILURE);
            }
        }
        Command::Audit { conversation_id, scan, format } => {
            let store = Store::connect(&cql).await.context("connecting to the CQL store")?;
            let reader = LogReader::new(&kafka, &registry)?;
            let (live, _, _) = store.generations(parley_projections::store::CONTEXT).await?;
            let index = store.locations(&store.generation(live).await?, conversation_id).await?;
            let (mut records, _, _) = reader.read(conversation_id, &index, scan).await?;
            // The conversation's dead letters: records some consumer could not read, and
            // what became of them; a redriven copy the index does not name (its original
            // is indexed) is read through its letter.
            let (book, unreadable_letters) = read_book(&kafka, &EventCodec::new(&registry)?).await?;
            for (id, error) in &unreadable_letters {
                tracing::warn!(%id, %error, "not a dead-letter record; passed by");
            }
            let key = conversation_id.to_string();
            let letters: Vec<_> =
                book.entries().iter().filter(|e| e.letter.key.as_deref() == Some(key.as_bytes())).collect();
            let copies: Vec<_> = letters
                .iter()
                .filter_map(|e| e.status.copy().cloned())
                .filter(|copy| !records.iter().any(|r| (r.partition, r.offset) == (copy.partition, copy.offset)))
                .collect();
            records.extend(reader.records_at(&copies).await?);
            records.sort_by_key(|r| (r.sequence, r.offset));
            if records.is_empty() {
                eprintln!("no events of conversation {conversation_id} in the log");
                return Ok(ExitCode::FAILURE);
            }
            let registry_client = SchemaRegistry::new(&registry)?;
            let mut versions = std::collections::HashMap::new();
            for record in &records {
                if let std::collections::hash_map::Entry::Vacant(slot) = versions.entry(record.schema_id) {
                    let version = registry_client.versions_of(record.schema_id).await?.first().map(|(_, v)| *v);
                    slot.insert(version);
                }
            }
            if format == "json" {
                for record in &records {
                    let mut line = serde_json::to_value(record)?;
                    line["schema_version"] = serde_json::json!(versions[&record.schema_id]);
                    println!("{line}");
                }
            } else {
                println!(
                    "{:<4} {:<22} {:>9} {:>10} {:<24} {:<36} {:<36} {:<32}",
                    "SEQ", "TYPE", "PARTITION", "OFFSET", "SCHEMA", "OCCURRED AT", "CORRELATION", "TRACE"
                );
                for r in &records {
                    let schema =
                        format!("id {} v{}", r.schema_id, versions[&r.schema_id].map_or("?".into(), |v| v.to_string()));
                    let at = humantime::format_rfc3339_millis(
                        std::time::UNIX_EPOCH + Duration::from_millis(u64::try_from(r.occurred_at).unwrap_or(0)),
                    );
                    println!(
                        "{:<4} {:<22} {:>9} {:>10} {:<24} {:<36} {:<36} {:<32}",
                        r.sequence,
                        r.event_type,
                        r.partition,
                        r.offset,
                        schema,
                        at.to_string(),
                        r.correlation_id,
                        r.trace_id.as_deref().unwrap_or("-")
                    );
                    if let Some(cause) = &r.causation_id {
                        println!("     caused by {cause}, written by {}", r.producer);
                    } else {
                        println!("     written by {}", r.producer);
                    }
                    if let Some(letter) = &r.redriven_from {
                        println!("     a redriven copy of dead letter {letter}");
                    }
                    match &r.event {
                        ConversationEvent::CancelRequested(cancel) => {
                            println!(
                                "     asks to stop the answer to {} (asked by {})",
                                cancel.query_event_id, cancel.user_id
                            );
                        }
                        ConversationEvent::ResponseGenerated(answer) if answer.finish_reason == CANCELLED => {
                            println!("     stopped by a cancel after {} tokens", answer.completion_tokens);
                        }
                        _ => {}
                    }
                    for hit in &r.retrieved {
                        println!(
                            "     retrieved {} {} #{} (vector {}, score {:.3})",
                            hit.source_kind, hit.source_id, hit.position, hit.vector_id, hit.score
                        );
                    }
                }
            }
            for entry in &letters {
                if format == "json" {
                    let line = serde_json::json!({"dead_letter": entry.id.to_string(), "consumer": entry.letter.consumer,
                        "source": entry.letter.source().to_string(), "status": entry.status.as_str(),
                        "redriven_to": entry.status.copy().map(ToString::to_string),
                        "error": entry.letter.error});
                    println!("{line}");
                } else {
                    println!(
                        "dead letter {} of {}: {} could not be read ({}); {}",
                        entry.id,
                        entry.letter.consumer,
                        entry.letter.source(),
                        entry.letter.error,
                        entry.status
                    );
                }
            }
            // A redriven copy repeats its original's event id when only some consumer could
            // not read the original: it is a re-delivery, not a second fact.
            let mut seen = std::collections::HashSet::new();
            let facts = records.iter().filter(|r| seen.insert(r.event_id.as_str()) || r.redriven_from.is_none());
            let violations = violations(facts.map(|r| &r.event));
            if format == "json" {
                violations.iter().for_each(|v| println!("{}", serde_json::json!(v)));
            } else {
                print_violations(&violations);
            }
            report_undecodable(reader.undecodable() + unreadable_letters.len() as u64);
            if !violations.is_empty() {
                return Ok(ExitCode::FAILURE);
            }
        }
        Command::Trace { trace_id, jaeger_url } => {
            print!("{}", trace_view::render(&trace_view::fetch(&jaeger_url, &trace_id).await?));
        }
        Command::DeadLetters(command) => return dead_letters(&kafka, &registry, command).await,
        Command::Projections(command) => {
            let store = Store::connect(&cql).await.context("connecting to the CQL store")?;
            match command {
                ProjectionsCommand::Rebuild { .. } => {
                    let mut show =
                        |done: u64, total: u64, elapsed: Duration| progress_bar(done, total, "records", elapsed);
                    let report = rebuild_context(&kafka, &registry, &store, &shutdown, &mut show).await?;
                    eprintln!();
                    println!(
                        "generation {} is live ({} records in {:.1} s, {:.0} records/s); generation {} is kept until `parley projections drop-previous context`",
                        report.generation,
                        report.records,
                        report.elapsed.as_secs_f64(),
                        report.records_per_second(),
                        report.previous
                    );
                    report_undecodable(report.undecodable);
                }
                ProjectionsCommand::DropPrevious { .. } => match drop_previous(&store).await? {
                    Some(generation) => println!("dropped generation {generation}"),
                    None => println!("no previous generation to drop"),
                },
                ProjectionsCommand::Status { .. } => {
                    let (live, previous, building) = store.generations(parley_projections::store::CONTEXT).await?;
                    println!("context: live {live}, previous {previous:?}, building {building:?}");
                }
            }
        }
        Command::Topics { replication } => {
            let durability = ensure_topics(&kafka, replication).await?;
            println!("topics ready: {:?}, {durability:?}", kafka.topics());
        }
        Command::Schemas(SchemasCommand::Register) => {
            for (subject, id) in SchemaRegistry::new(&registry)?.register_all(&SchemaCatalog::embedded()).await? {
                println!("{subject}: schema id {id}");
            }
        }
        Command::Schemas(SchemasCommand::Check { dir }) => {
            let catalog = match dir {
                Some(dir) => SchemaCatalog::from_dir(&dir)?,
                None => SchemaCatalog::embedded(),
            };
            let reports = SchemaRegistry::new(&registry)?.check(&catalog).await?;
            let mut incompatible = 0;
            for report in &reports {
                let verdict = match report.verdict {
                    Verdict::Compatible => "compatible",
                    Verdict::NewSubject => "new subject",
                    Verdict::Incompatible => {
                        incompatible += 1;
                        "INCOMPATIBLE"
                    }
                };
                println!("{:<45} {:<35} {verdict}", report.subject, report.file);
            }
            if incompatible > 0 {
                eprintln!(
                    "{incompatible} schema(s) are not {} compatible with the registry",
                    parley_events::registry::COMPATIBILITY_LEVEL
                );
                return Ok(ExitCode::FAILURE);
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Loads the embedding backend and opens the vector store with the backend's dimension.
async fn open_retrieval(
    embedding: &EmbeddingSettings,
    milvus: &MilvusSettings,
) -> Result<(Arc<dyn EmbeddingBackend>, VectorStore)> {
    let backend = embedding.backend().await.context("loading the embedding backend")?;
    let vectors = VectorStore::open(milvus, backend.dimension(), backend.model())
        .await
        .with_context(|| format!("opening Milvus collection {} at {}", milvus.milvus_collection, milvus.milvus_url))?;
    Ok((backend, vectors))
}

/// `parley ingest`: reads every file, appends one DocumentSubmitted each (all in flight at
/// once), shows progress, and exits 1 if any file was refused or not acknowledged.
async fn ingest(
    kafka: &KafkaSettings,
    registry: &str,
    paths: &[PathBuf],
    owner: &str,
    labels: &[(String, String)],
    shed_queue_age: Duration,
) -> Result<ExitCode> {
    let files = parley_ingest::files::collect(paths)?;
    let mut failures = 0;
    let mut documents = Vec::new();
    let mut names = Vec::new();
    for file in &files {
        let title = file.file_name().map_or_else(|| file.display().to_string(), |n| n.to_string_lossy().into_owned());
        let submission = std::fs::read(file).map_err(|e| e.to_string()).and_then(|bytes| {
            let text = String::from_utf8(bytes).map_err(|_| "not UTF-8 text".to_owned())?;
            let mut metadata: std::collections::HashMap<_, _> = labels.iter().cloned().collect();
            metadata.insert("path".into(), file.display().to_string());
            Submission { owner: owner.to_owned(), media_type: media_type_of(&title).to_owned(), title, text, metadata }
                .into_event(None)
                .map_err(|e| e.to_string())
        });
        match submission {
            Ok(document) => {
                documents.push(document);
                names.push(file.display().to_string());
            }
            Err(reason) => {
                failures += 1;
                eprintln!("skipped {}: {reason}", file.display());
            }
        }
    }
    let producer = EventProducer::new(kafka.client_config(), Arc::new(EventCodec::new(registry)?))?;
    let topic = kafka.topics().documents;
    let bytes: usize = documents.iter().map(|d| d.text.len()).sum();
    let started = Instant::now();
    let total = documents.len() as u64;
    let mut done = 0;
    // The gateways' shedding signal: while it is on, the next document waits.
    let board = Arc::new(std::sync::Mutex::new(LoadBoard::default()));
    let shutdown = CancellationToken::new();
    let follower = tokio::spawn(load::follow(load::follower(kafka)?, board.clone(), shutdown.clone()));
    let pace = || {
        let board = board.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let wait = board.overloaded(None, shed_queue_age, parley_events::event::now_millis())?;
        eprint!("\rParley is shedding load: the next document waits {wait} ms ");
        Some(Duration::from_millis(wait))
    };
    let outcomes = submit_all(&producer, &topic, &documents, pace, |index, outcome| {
        done += 1;
        if let Err(error) = outcome {
            eprintln!("\nfailed {}: {error}", names[index]);
        }
        progress_bar(done, total, "documents", started.elapsed());
    })
    .await;
    shutdown.cancel();
    let _ = follower.await;
    eprintln!();
    failures += outcomes.iter().filter(|o| o.is_err()).count();
    let elapsed = started.elapsed().as_secs_f64();
    println!(
        "{} documents ({bytes} bytes) submitted for {owner} in {elapsed:.2} s ({:.0} documents/s); chunking and embedding continue in the embedder",
        outcomes.len() - outcomes.iter().filter(|o| o.is_err()).count(),
        total as f64 / elapsed.max(1e-9)
    );
    if failures > 0 {
        eprintln!("{failures} file(s) not submitted");
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}

fn parse_label(value: &str) -> Result<(String, String), String> {
    match value.split_once('=') {
        Some((key, label)) if !key.is_empty() => Ok((key.to_owned(), label.to_owned())),
        _ => Err(format!("{value:?}: expected key=value")),
    }
}

/// One line of progress on stderr, redrawn in place: bar, count, percentage, rate.
fn progress_bar(done: u64, total: u64, unit: &str, elapsed: Duration) {
    let rate = done as f64 / elapsed.as_secs_f64().max(1e-9);
    let percent = if total == 0 { 100.0 } else { 100.0 * done as f64 / total as f64 };
    let filled = (percent / 5.0).round().clamp(0.0, 20.0) as usize;
    eprint!(
        "\r[{}{}] {done}/{total} {unit} {percent:5.1}% · {rate:8.0} {unit}/s",
        "#".repeat(filled),
        " ".repeat(20 - filled)
    );
}

/// Runs one service of `parley all` as a task; when it ends, for whatever reason, the
/// whole process stops rather than limp on without it.
fn spawn_linked<E: Send + 'static>(
    shutdown: &CancellationToken,
    service: impl Future<Output = Result<(), E>> + Send + 'static,
) -> tokio::task::JoinHandle<Result<(), E>> {
    let shutdown = shutdown.clone();
    tokio::spawn(async move {
        let result = service.await;
        shutdown.cancel();
        result
    })
}

fn print_chat_url(gateway: &Gateway) {
    if let Some(addr) = gateway.local_addr() {
        println!("Parley chat: http://{addr}/");
    }
}

fn shutdown_on_signal() -> CancellationToken {
    let token = CancellationToken::new();
    let cancel = token.clone();
    tokio::spawn(async move {
        let terminate = async {
            if let Ok(mut signal) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                signal.recv().await;
            }
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            () = terminate => {}
        }
        cancel.cancel();
    });
    token
}

/// `parley usage`: each period's spend against the budget enforced for the user (`source`:
/// their own, or the defaults this command was given), as text or one JSON object.
fn print_usage(
    user: &str,
    usage: &budget::Usage,
    limits: BudgetLimits,
    source: &str,
    events_read: usize,
    format: &str,
) -> Result<()> {
    let row = |spent: u64, limit: u64| {
        serde_json::json!({"spent": spent, "budget": (limit > 0).then_some(limit),
            "left": BudgetLimits::left(spent, limit), "budget_source": source})
    };
    if format == "json" {
        let conversations: Vec<_> = usage
            .by_conversation
            .iter()
            .map(|(id, spent)| {
                let mut line = row(*spent, limits.per_conversation);
                line["conversation_id"] = serde_json::json!(id);
                line
            })
            .collect();
        let refused: Vec<_> = usage
            .refused
            .iter()
            .map(|(query, why)| serde_json::json!({"query_event_id": query, "reason": why}))
            .collect();
        let report = serde_json::json!({"user": user, "events_read": events_read,
            "today": row(usage.today, limits.daily), "this_month": row(usage.this_month, limits.monthly),
            "conversations": conversations, "refused_by_inference": refused});
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    println!("{user}: model tokens spent this month, from the log ({events_read} events read); budgets: {source}");
    println!("  {:<50} {:>10} {:>10} {:>10}", "period", "spent", "budget", "left");
    let line = |what: &str, spent: u64, limit: u64| {
        let (budget, left) = match BudgetLimits::left(spent, limit) {
            Some(left) => (limit.to_string(), left.to_string()),
            None => ("no limit".to_owned(), "-".to_owned()),
        };
        println!("  {what:<50} {spent:>10} {budget:>10} {left:>10}");
    };
    line("today (UTC)", usage.today, limits.daily);
    line("this month (UTC)", usage.this_month, limits.monthly);
    for (conversation, spent) in &usage.by_conversation {
        line(&format!("conversation {conversation}"), *spent, limits.per_conversation);
    }
    for (query, why) in &usage.refused {
        println!("  refused by inference: query {query}: {why}");
    }
    Ok(())
}

/// The last line of a command that read the log: how many records it passed by because
/// they did not decode (each was named in a log line above).
fn report_undecodable(count: u64) {
    if count > 0 {
        eprintln!("{count} undecodable record(s) passed by; each is named with its position in a warning above");
    }
}

/// Invariant violations as replay and audit print them (to stderr too, so a pipe sees them).
fn print_violations(violations: &[Violation]) {
    if violations.is_empty() {
        println!("invariants: hold (each event id once, one outcome per query)");
        return;
    }
    println!("invariants violated ({}):", violations.len());
    for violation in violations {
        println!("  {violation}");
        eprintln!("invariant violated: {violation}");
    }
}
