//! One module per group of `parley` subcommands; each command is a function of the
//! connection settings ([`crate::cli::Common`]) and its own options.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use parley_eventlog::KafkaSettings;
use parley_eventlog::consumer::{position_of, scan_topic};
use parley_eventlog::secret::secret_from;
use parley_events::invariants::Violation;
use parley_events::sealing::MasterKey;
use parley_events::trail::Place;
use parley_events::{Decoded, EventsError};
use parley_projections::Store;
use parley_projections::keys::KeyStore;
use rdkafka::Message;
use rdkafka::message::BorrowedMessage;
use zeroize::Zeroizing;

use crate::cli::Common;

pub(crate) mod audit;
pub(crate) mod budget;
pub(crate) mod cache;
pub(crate) mod dead_letters;
pub(crate) mod documents;
pub(crate) mod erasure;
pub(crate) mod experiments;
pub(crate) mod projections;
pub(crate) mod prompts;
pub(crate) mod replay;
pub(crate) mod rerun;
pub(crate) mod schemas;
pub(crate) mod serve;
pub(crate) mod trail;

/// Where and when the log took `message`.
fn place_of(message: &BorrowedMessage<'_>) -> Place {
    Place::new(&position_of(message), message.timestamp().to_millis().unwrap_or(0))
}

/// Every record of `topic` since `since`, decoded and handed to `apply` with its place; a
/// record that does not decode is named in a warning and counted. Fails only on a registry
/// that does not answer.
pub(crate) async fn scan_decoded<T>(
    kafka: &KafkaSettings,
    topic: &str,
    since: Option<i64>,
    undecodable: &mut u64,
    decode: impl AsyncFn(&[u8]) -> Result<Decoded<T>, EventsError>,
    mut apply: impl FnMut(T, Place),
) -> Result<u64> {
    scan_topic(kafka, topic, since, async |message| {
        match decode(message.payload().unwrap_or_default()).await {
            Ok(decoded) => apply(decoded.event, place_of(message)),
            Err(error) if error.is_retryable() => return Err(error).context("the schema registry did not answer"),
            Err(error) => {
                tracing::warn!(position = %position_of(message), %error, "undecodable record passed by");
                *undecodable += 1;
            }
        }
        anyhow::Ok(())
    })
    .await
}

/// One line of progress on stderr, redrawn in place: bar, count, percentage, rate and the
/// time left at that rate.
pub(crate) fn progress_bar(done: u64, total: u64, unit: &str, elapsed: Duration) {
    let rate = done as f64 / elapsed.as_secs_f64().max(1e-9);
    let percent = if total == 0 { 100.0 } else { 100.0 * done as f64 / total as f64 };
    let filled = (percent / 5.0).round().clamp(0.0, 20.0) as usize;
    let left = if rate > 0.0 { total.saturating_sub(done) as f64 / rate } else { 0.0 };
    eprint!(
        "\r[{}{}] {done}/{total} {unit} {percent:5.1}% · {rate:8.0} {unit}/s · ETA {}",
        "#".repeat(filled),
        " ".repeat(20 - filled),
        eta(left)
    );
}

/// Seconds left as `1h02m`, `4m05s` or `12s`.
fn eta(seconds: f64) -> String {
    let seconds = seconds.round().max(0.0) as u64;
    match seconds {
        0..60 => format!("{seconds}s"),
        60..3600 => format!("{}m{:02}s", seconds / 60, seconds % 60),
        _ => format!("{}h{:02}m", seconds / 3600, seconds % 3600 / 60),
    }
}

/// Invariant violations as replay and audit print them (to stderr too, so a pipe sees them).
pub(crate) fn print_violations(violations: &[Violation]) {
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

/// The last line of a command that read the log: how many records it passed by because
/// they did not decode (each was named in a log line above).
pub(crate) fn report_undecodable(count: u64) {
    if count > 0 {
        eprintln!("{count} undecodable record(s) passed by; each is named with its position in a warning above");
    }
}

/// The master key the operator configured (a file or `PARLEY_MASTER_KEY`), if any.
pub(crate) fn master_key(common: &Common) -> Result<Option<MasterKey>> {
    let file = common.master_key_file.as_deref();
    let Some(text) = secret_from("PARLEY_MASTER_KEY", file).context("reading the master key")? else {
        return Ok(None);
    };
    let text = Zeroizing::new(text);
    let id = file.map_or_else(|| "local:PARLEY_MASTER_KEY".to_owned(), |f| format!("local:{}", f.display()));
    Ok(Some(MasterKey::from_base64(&text, &id).context("the master key")?))
}

/// The CQL store, its readers opening sealed rows with people's data keys when a master
/// key is configured.
pub(crate) async fn connect_store(common: &Common) -> Result<Store> {
    let store = Store::connect(&common.cql).await.context("connecting to the CQL store")?;
    let keys = match master_key(common)? {
        Some(master) => Some(KeyStore::open(&store, Arc::new(master)).await?),
        None => None,
    };
    Ok(store.with_keys(keys))
}

#[cfg(test)]
mod tests {
    #[test]
    fn time_left_reads_in_the_largest_units_that_matter() {
        assert_eq!(super::eta(12.4), "12s");
        assert_eq!(super::eta(245.0), "4m05s");
        assert_eq!(super::eta(3720.0), "1h02m");
    }
}
