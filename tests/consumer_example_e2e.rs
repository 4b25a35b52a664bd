//! The example consumer (examples/usage_meter.rs) against the real stack: a new consumer
//! group reads the existing log from its first event, meters what the model used, and
//! after committing its offsets a second run has nothing left to count.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use clap::Parser;
use serde_json::Value;
use support::{Pipeline, stack};

// The example itself, compiled into this test (its unit test runs here too); `main` is
// the example's entry point, unused by the test.
#[path = "../examples/usage_meter.rs"]
#[allow(dead_code)]
mod usage_meter;

async fn run_meter(pipeline: &Pipeline, group: &str) -> Vec<Value> {
    let args = usage_meter::Args::parse_from([
        "usage_meter",
        "--kafka-brokers",
        &pipeline.brokers,
        "--topic-prefix",
        &pipeline.prefix,
        "--schema-registry-url",
        &pipeline.registry,
        "--group",
        group,
        "--exit-when-idle",
        "5s",
    ]);
    usage_meter::meter(&args).await.unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_new_consumer_meters_the_existing_log_once() {
    let Some(stack) = stack() else { return };
    let pipeline = Pipeline::start(&stack, &[]).await;
    let (user, token) = pipeline.session_user().await;
    let mut client = pipeline.connect(&pipeline.http, &token).await;
    let mut answers = Vec::new();
    for (id, question) in [("u-1", "Name a colour."), ("u-2", "Name a fruit.")] {
        let conversation = answers.first().map(|a: &Value| a["conversation_id"].as_str().unwrap().to_owned());
        client.ask(id, conversation.as_deref(), question).await;
        let answer = client.until_outcome().await.pop().unwrap();
        assert_eq!(answer["type"], "answer", "{answer}");
        answers.push(answer);
    }

    let group = format!("{}usage-meter", pipeline.prefix);
    let totals = run_meter(&pipeline, &group).await;
    let mine: Vec<&Value> = totals.iter().filter(|t| t["user"] == user.as_str()).collect();
    assert_eq!(mine.len(), 1, "one model, one line: {totals:?}");
    let usage = &mine[0]["usage"];
    assert_eq!(mine[0]["model"], answers[0]["model"]);
    assert_eq!(usage["answers"], 2);
    let sum = |field: &str| answers.iter().map(|a| a[field].as_i64().unwrap()).sum::<i64>();
    assert_eq!(usage["completion_tokens"].as_i64(), Some(sum("completion_tokens")));
    assert_eq!(usage["prompt_tokens"].as_i64(), Some(sum("prompt_tokens")));

    // Its offsets were committed after the records were applied: nothing is counted twice.
    assert!(run_meter(&pipeline, &group).await.is_empty());
    pipeline.stop().await;
}
