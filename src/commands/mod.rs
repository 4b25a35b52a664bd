//! One module per group of `parley` subcommands; each command is a function of the
//! connection settings ([`crate::cli::Common`]) and its own options.

use std::time::Duration;

use parley_events::invariants::Violation;

pub(crate) mod audit;
pub(crate) mod budget;
pub(crate) mod cache;
pub(crate) mod dead_letters;
pub(crate) mod documents;
pub(crate) mod projections;
pub(crate) mod replay;
pub(crate) mod schemas;
pub(crate) mod serve;

/// One line of progress on stderr, redrawn in place: bar, count, percentage, rate.
pub(crate) fn progress_bar(done: u64, total: u64, unit: &str, elapsed: Duration) {
    let rate = done as f64 / elapsed.as_secs_f64().max(1e-9);
    let percent = if total == 0 { 100.0 } else { 100.0 * done as f64 / total as f64 };
    let filled = (percent / 5.0).round().clamp(0.0, 20.0) as usize;
    eprint!(
        "\r[{}{}] {done}/{total} {unit} {percent:5.1}% · {rate:8.0} {unit}/s",
        "#".repeat(filled),
        " ".repeat(20 - filled)
    );
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
