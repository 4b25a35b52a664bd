//! `parley`: one binary, a subcommand per service.

use std::future::Future;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use parley_eventlog::KafkaSettings;
use parley_eventlog::topics::ensure_topics;
use parley_events::SchemaCatalog;
use parley_events::registry::{SchemaRegistry, Verdict};
use parley_gateway::{Gateway, GatewayArgs};
use parley_inference::service::InferenceArgs;
use parley_projections::{CqlSettings, Store};
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

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

    /// Log format: text for people, json for log pipelines.
    #[arg(long, global = true, env = "PARLEY_LOG_FORMAT", default_value = "text", value_parser = ["text", "json"])]
    log_format: String,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve the chat page, the HTTP API and the WebSocket.
    Gateway(GatewayArgs),
    /// Answer queries with the LLM.
    Inference(InferenceArgs),
    /// Project conversation events into the CQL store (the context projection).
    Projection,
    /// Create topics, register schemas and run every service in one process (quick start).
    All {
        #[command(flatten)]
        gateway: GatewayArgs,
        #[command(flatten)]
        inference: InferenceArgs,
    },
    /// Create Parley's topics (existing ones are left alone).
    Topics {
        /// Replication factor of new topics.
        #[arg(long, env = "PARLEY_TOPIC_REPLICATION", default_value_t = 1,
              value_parser = clap::value_parser!(i32).range(1..=16))]
        replication: i32,
    },
    /// Register or check the Avro schemas.
    #[command(subcommand)]
    Schemas(SchemasCommand),
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
    init_tracing(&cli.common.log_format);
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(code) => code,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> Result<ExitCode> {
    let Common { kafka, cql, schema_registry_url: registry, .. } = cli.common;
    let shutdown = shutdown_on_signal();
    match cli.command {
        Command::Gateway(args) => {
            let store = Store::connect(&cql).await.context("connecting to the CQL store")?;
            let gateway = Gateway::bind(&kafka, &registry, &args, store, shutdown).await?;
            print_chat_url(&gateway);
            gateway.serve().await?;
        }
        Command::Inference(args) => parley_inference::service::run(&kafka, &registry, args, shutdown).await?,
        Command::Projection => {
            let store = Store::connect(&cql).await?;
            parley_projections::projector::run(&kafka, &registry, store, shutdown).await?;
        }
        Command::All { gateway, inference } => {
            ensure_topics(&kafka, 1).await.context("creating topics")?;
            SchemaRegistry::new(&registry)?
                .register_all(&SchemaCatalog::embedded())
                .await
                .context("registering schemas")?;
            let store = Store::connect(&cql).await.context("connecting to the CQL store")?;
            let gateway = Gateway::bind(&kafka, &registry, &gateway, store.clone(), shutdown.clone()).await?;
            let inference = spawn_linked(&shutdown, {
                let (kafka, registry, shutdown) = (kafka.clone(), registry.clone(), shutdown.clone());
                async move { parley_inference::service::run(&kafka, &registry, inference, shutdown).await }
            });
            let projection = spawn_linked(&shutdown, {
                let (kafka, registry, shutdown) = (kafka.clone(), registry.clone(), shutdown.clone());
                async move { parley_projections::projector::run(&kafka, &registry, store, shutdown).await }
            });
            print_chat_url(&gateway);
            let served = gateway.serve().await;
            inference.await.context("inference task")??;
            projection.await.context("projection task")??;
            served?;
        }
        Command::Topics { replication } => {
            ensure_topics(&kafka, replication).await?;
            println!("topics ready: {:?}", kafka.topics());
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

fn init_tracing(format: &str) {
    let filter = EnvFilter::try_from_env("PARLEY_LOG").unwrap_or_else(|_| EnvFilter::new("info,rdkafka=warn"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    if format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
}
