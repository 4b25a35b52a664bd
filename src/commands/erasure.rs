//! `parley erase`: an operator erases a person (what `DELETE /api/me` does for a signed-in
//! person), and waits for the erasure worker to complete it.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use parley_erasure::request::{BY_OPERATOR, Erasures};
use parley_events::{Producer, UserId};

use crate::cli::Common;

const CLI: Producer = Producer { name: "parley-cli", version: env!("CARGO_PKG_VERSION") };

/// `parley erase <user>`.
pub(crate) async fn erase(common: &Common, user: &UserId, reason: &str, wait: Duration) -> Result<ExitCode> {
    let kafka = &common.kafka;
    let producer = Erasures::producer(kafka, &common.schema_registry_url)?;
    let erasures = Erasures::new(kafka, producer, CLI);
    let requested = erasures.request(user, BY_OPERATOR, reason).await.context("appending the erasure request")?;
    println!("erasure of {user} requested: {} at {}", requested.event.envelope.event_id, requested.position);
    if wait.is_zero() {
        return Ok(ExitCode::SUCCESS);
    }
    match erasures.completion(&requested, wait).await.context("reading the erasures topic")? {
        Some(done) => {
            println!("completed: data key destroyed at {} (ms since the epoch)", done.key_erased_at);
            for place in &done.purged {
                println!("  {:<24} {:>8} purged", place.place, place.items);
            }
            Ok(ExitCode::SUCCESS)
        }
        None => {
            eprintln!(
                "not completed within {}: is an erasure worker running (`parley erasure`, or `parley all`)? \
                 The request stays in the log; the worker completes it when it runs.",
                humantime::format_duration(wait)
            );
            Ok(ExitCode::from(2))
        }
    }
}
