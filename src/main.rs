//! `parley`: one binary, a subcommand per service and per operator task. This file wires
//! what every command shares (logging, tracing, the runtime, the shutdown signal, the
//! metrics server) and hands each command to its module under `commands`.

use std::process::ExitCode;

use anyhow::Result;
use clap::Parser;

use crate::cli::{CLI_SERVICE, CacheCommand, Cli, Command, DocumentsCommand, SchemasCommand, service_name};
use crate::commands::prompts::PromptSettings;
use crate::commands::rerun::RerunSettings;
use crate::commands::{
    audit, budget, cache, dead_letters, documents, erasure, experiments, projections, replay, schemas, serve, trail,
};
use crate::telemetry::Telemetry;
use parley_inference::prompt::PromptLayout;
use parley_inference::service::DEFAULT_CONTEXT_TOKEN_BUDGET;

mod cli;
mod commands;
mod telemetry;
mod trace_view;

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

async fn run(cli: Cli) -> Result<ExitCode> {
    let Cli { common, command } = cli;
    let shutdown = parley_eventlog::shutdown::on_signal();
    if let Some(addr) = common.metrics_listen {
        serve::serve_metrics(addr, shutdown.clone()).await?;
    }
    let (kafka, registry) = (&common.kafka, common.schema_registry_url.as_str());
    match command {
        Command::Gateway(args) => Box::pin(serve::gateway(&common, args, shutdown)).await,
        Command::Inference(args) => Box::pin(serve::inference(&common, args, shutdown)).await,
        Command::Projection => Box::pin(serve::projection(&common, shutdown)).await,
        Command::Embedder(args) => serve::embedder(&common, args, shutdown).await,
        Command::Erasure => serve::erasure(&common, shutdown).await,
        Command::Erase { user, reason, wait } => erasure::erase(&common, &user, &reason, wait).await,
        Command::All { gateway, inference, embedder, without_projection } => {
            Box::pin(serve::all(&common, gateway, inference, embedder, without_projection, shutdown)).await
        }
        Command::Ingest { paths, owner, labels, shed_queue_age } => {
            documents::ingest(&common, &paths, &owner, &labels, shed_queue_age).await
        }
        Command::Documents(DocumentsCommand::List { owner, limit }) => documents::list(&common, owner, limit).await,
        Command::Documents(DocumentsCommand::Delete { document_id, owner }) => {
            documents::delete(&common, document_id, owner).await
        }
        Command::Cache(CacheCommand::List { user }) => cache::list(&common, user).await,
        Command::Cache(CacheCommand::Clear { user, document }) => cache::clear(&common, user, document).await,
        Command::Tier { user, tier } => budget::tier(&common, user, tier).await,
        Command::Usage { user, format } => budget::usage(&common, user, format).await,
        Command::Budget { user, daily, monthly, conversation } => {
            budget::budget(&common, user, daily, monthly, conversation).await
        }
        Command::Replay { conversation_id, scan, at, prompts, prompt, rerun, format } => {
            let settings = PromptSettings::from(prompt);
            let rerun = rerun.rerun.map(|turn| RerunSettings {
                turn: usize::try_from(turn).unwrap_or(usize::MAX),
                model: rerun.model,
                endpoint: rerun.endpoint,
                max_tokens: rerun.max_tokens,
                timeout: rerun.llm_timeout,
                layout: PromptLayout::Stable,
                token_budget: DEFAULT_CONTEXT_TOKEN_BUDGET,
            });
            let options = replay::ReplayOptions { scan, at, prompts, rerun };
            Box::pin(replay::replay(&common, conversation_id, options, settings, format)).await
        }
        Command::Audit { user: Some(user), since, format, .. } => trail::audit_user(&common, user, since, format).await,
        Command::Audit { conversation_id: Some(conversation_id), scan, format, .. } => {
            audit::audit(&common, conversation_id, scan, format).await
        }
        Command::Audit { .. } => unreachable!("clap requires a conversation or --user"),
        Command::Trace { trace_id, jaeger_url } => {
            print!("{}", trace_view::render(&trace_view::fetch(&jaeger_url, &trace_id).await?));
            Ok(ExitCode::SUCCESS)
        }
        Command::DeadLetters(command) => dead_letters::dead_letters(kafka, registry, command).await,
        Command::Projections(command) => projections::projections(&common, command, shutdown).await,
        Command::Topics { replication } => schemas::topics(&common, replication).await,
        Command::Schemas(SchemasCommand::Register) => schemas::register(&common).await,
        Command::Schemas(SchemasCommand::Check { dir }) => schemas::check(&common, dir).await,
        Command::Experiments(command) => Box::pin(experiments::experiments(&common, command)).await,
    }
}
