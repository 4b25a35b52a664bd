//! Follow-up questions carry the conversation's earlier turns to the model: from the
//! projection normally, from the log when the projection has not caught up. Checked on
//! model-independent facts: the response event's context_event_ids, and the prompt token
//! count the real model reports.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::process::Command;

use parley_events::{ConversationEvent, LLMResponseGenerated};
use support::{Client, Stack, stack};
use uuid::Uuid;

/// Asks two questions in one conversation; returns the conversation id.
async fn two_turns(client: &mut Client) -> String {
    client.ask("c-1", None, "My name is Ada. Please remember it.").await;
    let frames = client.until_outcome().await;
    assert_eq!(frames.last().unwrap()["type"], "answer", "{frames:?}");
    let conversation =
        frames.iter().find(|f| f["type"] == "ack").unwrap()["conversation_id"].as_str().unwrap().to_owned();
    client.ask("c-2", Some(&conversation), "What is my name?").await;
    let frames = client.until_outcome().await;
    assert_eq!(frames.last().unwrap()["type"], "answer", "{frames:?}");
    conversation
}

/// The conversation's events from the log, in sequence order.
async fn events_of(
    brokers: &str,
    registry: &str,
    topic: &str,
    conversation: &str,
    count: usize,
) -> Vec<ConversationEvent> {
    support::log_events(brokers, registry, topic, Some(conversation), count)
        .await
        .into_iter()
        .map(|(event, _)| event)
        .collect()
}

fn assert_second_answer_saw_the_first_turn(events: &[ConversationEvent]) {
    let answer = |i: usize| -> &LLMResponseGenerated {
        let ConversationEvent::ResponseGenerated(e) = &events[i] else { panic!("{:?}", events[i]) };
        e
    };
    let (first, second) = (answer(2), answer(4));
    assert!(first.context_event_ids.is_empty(), "{first:?}");
    let turn_one = vec![events[1].envelope().event_id, events[2].envelope().event_id];
    assert_eq!(second.context_event_ids, turn_one, "the follow-up's prompt carried turn one");
    assert!(
        second.prompt_tokens > first.prompt_tokens + 5,
        "the model saw a longer prompt: {} vs {}",
        second.prompt_tokens,
        first.prompt_tokens
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn follow_ups_carry_earlier_turns_from_the_projection() {
    let Some(stack) = stack() else { return };
    let pipeline = support::Pipeline::start(&stack, &[]).await;
    let mut client = pipeline.client().await;
    let conversation = two_turns(&mut client).await;
    let events = events_of(&pipeline.brokers, &pipeline.registry, &pipeline.events_topic(), &conversation, 5).await;
    assert_second_answer_saw_the_first_turn(&events);
    pipeline.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn without_a_projection_the_history_comes_from_the_log() {
    let Some(stack) = stack() else { return };
    let Stack { brokers, registry, llm, cql, .. } = &stack;
    let prefix = format!("test-{}.", Uuid::new_v4().simple());
    let keyspace = format!("parley_ctx_{}", &Uuid::new_v4().simple().to_string()[..12]);
    let common: Vec<String> = [
        "--kafka-brokers",
        brokers,
        "--schema-registry-url",
        registry,
        "--topic-prefix",
        &prefix,
        "--cql-nodes",
        cql,
        "--cql-keyspace",
        &keyspace,
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect();
    let topics = Command::new(env!("CARGO_BIN_EXE_parley")).args(&common).arg("topics").output().unwrap();
    assert!(topics.status.success());
    let port = support::free_port();
    let with = |extra: &[&str]| -> Vec<String> {
        common.iter().cloned().chain(extra.iter().map(|s| (*s).to_owned())).collect()
    };
    let mut gateway =
        support::spawn(&with(&["gateway", "--listen", &format!("127.0.0.1:{port}")]), &prefix, "gateway.log");
    let mut inference = support::spawn(
        &with(&[
            "inference",
            "--llm-base-url",
            llm,
            "--group-id",
            &format!("{prefix}inference"),
            "--context-wait",
            "200ms",
        ]),
        &prefix,
        "inference.log",
    );
    let http = format!("http://127.0.0.1:{port}");
    support::wait_healthy(&http).await;
    let token: serde_json::Value =
        reqwest::Client::new().post(format!("{http}/api/session")).send().await.unwrap().json().await.unwrap();
    let url = format!("ws://127.0.0.1:{port}/ws?token={}", token["token"].as_str().unwrap());
    let mut client = Client::open(&url, true).await;

    let conversation = two_turns(&mut client).await;
    let topic = format!("{prefix}conversation-events");
    let events = events_of(brokers, registry, &topic, &conversation, 5).await;
    assert_second_answer_saw_the_first_turn(&events);

    for child in [&mut gateway, &mut inference] {
        child.kill().unwrap();
        child.wait().unwrap();
    }
    support::drop_keyspace(cql, &keyspace).await;
}
