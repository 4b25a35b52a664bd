//! `parley projections rebuild|drop-previous|status`.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Result;
use parley_projections::rebuild::{drop_previous, rebuild_context};
use tokio_util::sync::CancellationToken;

use crate::cli::{Common, ProjectionsCommand};
use crate::commands::{connect_store, progress_bar, report_undecodable};

/// `parley projections`.
pub(crate) async fn projections(
    common: &Common,
    command: ProjectionsCommand,
    shutdown: CancellationToken,
) -> Result<ExitCode> {
    let kafka = &common.kafka;
    let registry = common.schema_registry_url.as_str();
    let store = connect_store(common).await?;
    match command {
        ProjectionsCommand::Rebuild { .. } => {
            let mut show = |done: u64, total: u64, elapsed: Duration| progress_bar(done, total, "records", elapsed);
            let report = rebuild_context(kafka, registry, &store, &shutdown, &mut show).await?;
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
    Ok(ExitCode::SUCCESS)
}
