//! The contract's plumbing: `parley topics` and `parley schemas register|check`.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use parley_eventlog::topics::ensure_topics;
use parley_events::SchemaCatalog;
use parley_events::registry::{SchemaRegistry, Verdict};

use crate::cli::Common;

/// `parley topics`.
pub(crate) async fn topics(common: &Common, replication: Option<i32>) -> Result<ExitCode> {
    let kafka = &common.kafka;
    let durability = ensure_topics(kafka, replication).await?;
    println!("topics ready: {:?}, {durability:?}", kafka.topics());
    Ok(ExitCode::SUCCESS)
}

/// `parley schemas register`.
pub(crate) async fn register(common: &Common) -> Result<ExitCode> {
    let registry = common.schema_registry_url.as_str();
    for (subject, id) in SchemaRegistry::new(registry)?.register_all(&SchemaCatalog::embedded()).await? {
        println!("{subject}: schema id {id}");
    }
    Ok(ExitCode::SUCCESS)
}

/// `parley schemas check`.
pub(crate) async fn check(common: &Common, dir: Option<PathBuf>) -> Result<ExitCode> {
    let registry = common.schema_registry_url.as_str();
    let catalog = match dir {
        Some(dir) => SchemaCatalog::from_dir(&dir)?,
        None => SchemaCatalog::embedded(),
    };
    let reports = SchemaRegistry::new(registry)?.check(&catalog).await?;
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
    Ok(ExitCode::SUCCESS)
}
