//! The fault-injection suite (tests/faults/mod.rs), longer than the test suite runs it:
//! PARLEY_FAULT_CLIENTS users (default 8) chat while every fault is injected
//! PARLEY_FAULT_ROUNDS times (default 3). Prints the recovery time of each fault and the
//! counts (turns, lost, duplicated, ...); exits 1 unless nothing was lost or duplicated.
//!
//! Run: `infra/bench.sh faults`; `PARLEY_KAFKA_NODES=3 infra/bench.sh faults` runs it
//! against a three-node Kafka and kills one node.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../tests/faults/mod.rs"]
mod faults;
#[path = "../tests/support/mod.rs"]
mod support;

use std::time::Instant;

fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

#[tokio::main]
async fn main() {
    let Some(stack) = support::stack() else { return };
    let settings = faults::Settings::from_env(env_or("PARLEY_FAULT_CLIENTS", 8), env_or("PARLEY_FAULT_ROUNDS", 3));
    let started = Instant::now();
    let report = faults::run(&stack, &settings).await;
    println!(
        "fault suite: {} users, {} rounds, Kafka nodes {}, {:.0} s\n\n{report}",
        settings.clients,
        settings.rounds,
        settings.kafka_nodes,
        started.elapsed().as_secs_f64()
    );
    if !report.clean() {
        std::process::exit(1);
    }
}
