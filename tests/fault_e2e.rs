//! The fault-injection suite at a size CI affords (tests/faults/mod.rs): four users chat
//! while a gateway, inference, the embedder, the projector, the llama.cpp server and the
//! Kafka broker are each killed with SIGKILL and restarted. Nothing acknowledged is lost,
//! nothing is written, answered or shown twice, the projection and Milvus match the log,
//! and every fault is recovered from. `infra/bench.sh faults` runs it longer;
//! PARLEY_KAFKA_NODES=3 runs it against a three-node Kafka and kills one node.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod faults;
mod support;

#[tokio::test(flavor = "multi_thread")]
async fn killing_any_part_under_load_loses_and_duplicates_nothing() {
    let Some(stack) = support::stack() else { return };
    let settings = faults::Settings::from_env(4, 1);
    let report = faults::run(&stack, &settings).await;
    eprintln!("{report}");
    assert!(report.turns > settings.clients * faults::Fault::ALL.len(), "too few turns to mean anything:\n{report}");
    assert!(report.clean(), "{report}");
}
