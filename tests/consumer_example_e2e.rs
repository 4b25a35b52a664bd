//! The example consumer (examples/usage_meter.rs) against the real stack: a new consumer
//! group reads the existing log from its first event and meters each answer exactly once,
//! also across a restart (its offsets were committed with its output).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::{Duration, Instant};

use clap::Parser;
use serde_json::Value;
use support::{Pipeline, stack};
use tokio_util::sync::CancellationToken;

// The example itself, compiled into this test (its unit test runs here too); `main` is
// the example's entry point, unused by the test.
#[path = "../examples/usage_meter.rs"]
#[allow(dead_code)]
mod usage_meter;

fn meter_args(pipeline: &Pipeline, group: &str) -> usage_meter::Args {
    usage_meter::Args::parse_from([
        "usage_meter",
        "--kafka-brokers",
        &pipeline.brokers,
        "--topic-prefix",
        &pipeline.prefix,
        "--schema-registry-url",
        &pipeline.registry,
        "--group",
        group,
    ])
}

/// Starts the meter in the background; cancel the token to stop it.
fn start_meter(pipeline: &Pipeline, group: &str) -> (CancellationToken, tokio::task::JoinHandle<anyhow::Result<()>>) {
    let args = meter_args(pipeline, group);
    let shutdown = CancellationToken::new();
    let stop = shutdown.clone();
    (shutdown, tokio::spawn(async move { usage_meter::run(&args, stop).await }))
}

/// The usage records of `user` once there are `count` of them (committed ones only).
async fn usage_of(pipeline: &Pipeline, user: &str, count: usize) -> Vec<usage_meter::Usage> {
    let kafka = meter_args(pipeline, "reader").kafka;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let records = parley_eventlog::consumer::read_topic(&kafka, &format!("{}usage", pipeline.prefix)).await;
        let usage: Vec<usage_meter::Usage> = records
            .unwrap_or_default()
            .iter()
            .filter_map(|record| serde_json::from_slice(rdkafka::Message::payload(record)?).ok())
            .filter(|usage: &usage_meter::Usage| usage.user.as_ref().is_some_and(|u| u.as_str() == user))
            .collect();
        if usage.len() >= count || Instant::now() > deadline {
            return usage;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn stop(meter: (CancellationToken, tokio::task::JoinHandle<anyhow::Result<()>>)) {
    meter.0.cancel();
    meter.1.await.unwrap().unwrap();
}

#[test]
fn docs_show_the_example_as_it_is() {
    let example = include_str!("../examples/usage_meter.rs");
    let code = &example[..example.find("#[cfg(test)]").unwrap()];
    let docs = include_str!("../docs/consumers.md");
    assert!(
        docs.contains(code.trim_end()),
        "docs/consumers.md must show examples/usage_meter.rs (tests aside) verbatim"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_new_consumer_meters_each_answer_once_across_a_restart() {
    let Some(stack) = stack() else { return };
    let pipeline = Pipeline::start(&stack, &[]).await;
    let (user, token) = pipeline.session_user().await;
    let mut client = pipeline.connect(&pipeline.http, &token).await;
    let mut answers: Vec<Value> = Vec::new();
    let mut ask = async |answers: &mut Vec<Value>, id: &str, question: &str| {
        let conversation = answers.first().map(|a| a["conversation_id"].as_str().unwrap().to_owned());
        client.ask(id, conversation.as_deref(), question).await;
        let answer = client.until_outcome().await.pop().unwrap();
        assert_eq!(answer["type"], "answer", "{answer}");
        answers.push(answer);
    };
    ask(&mut answers, "u-1", "Name a colour.").await;
    ask(&mut answers, "u-2", "Name a fruit.").await;

    // A new group reads the answers already in the log.
    let group = format!("{}usage-meter", pipeline.prefix);
    let meter = start_meter(&pipeline, &group);
    let first = usage_of(&pipeline, &user, 2).await;
    assert_eq!(first.len(), 2, "{first:?}");
    stop(meter).await;

    // Restarted, it goes on after what it metered: the third answer, and nothing twice.
    ask(&mut answers, "u-3", "Name a tree.").await;
    let meter = start_meter(&pipeline, &group);
    let usage = usage_of(&pipeline, &user, 3).await;
    stop(meter).await;
    assert_eq!(usage.len(), 3, "{usage:?}");
    let ids: Vec<String> = usage.iter().map(|u| u.answer_id.to_string()).collect();
    let answered: Vec<&str> = answers.iter().map(|a| a["event_id"].as_str().unwrap()).collect();
    assert_eq!(ids, answered, "each answer once, in order");
    for (usage, answer) in usage.iter().zip(&answers) {
        assert_eq!(usage.model, answer["model"].as_str().unwrap());
        assert_eq!(i64::from(usage.completion_tokens), answer["completion_tokens"].as_i64().unwrap());
        assert_eq!(i64::from(usage.prompt_tokens), answer["prompt_tokens"].as_i64().unwrap());
    }
    pipeline.stop().await;
}
