//! Continuous inference under a crash: a short question answered while a long one in the
//! same partition is still generating, then `kill -9` of the pipeline and a restart. The
//! short question's outcome was committed before the crash (its offset was not: the long
//! question before it had no outcome yet); the restarted consumer must not send it to the
//! model again, must answer the long one, and every query keeps exactly one outcome. LLM
//! calls are counted by a proxy in front of the real llama.cpp server.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::State;
use axum::response::Response;
use parley_eventlog::partitioner::partition_for_key;
use parley_eventlog::topics::CONVERSATION_PARTITIONS;
use parley_events::ConversationEvent;
use parley_events::lanes::{DEFAULT_LANES, Lane, LaneLayout};
use parley_gateway::hub::new_conversation_id;
use serde_json::Value;
use support::{Pipeline, stack};

/// Chat completion calls per last user message, forwarded to the real model; the end of
/// the first answer to `slow` (its finish reason and `[DONE]`) is held back, so it is
/// surely unfinished at the crash, however short the model made it.
#[derive(Clone, Default)]
struct CallCounter {
    calls: Arc<Mutex<HashMap<String, usize>>>,
    upstream: String,
    slow: String,
}

async fn forward(State(counter): State<CallCounter>, body: axum::body::Bytes) -> Response {
    let request: Value = serde_json::from_slice(&body).unwrap_or_default();
    let question = request["messages"]
        .as_array()
        .and_then(|m| m.iter().rev().find(|m| m["role"] == "user"))
        .and_then(|m| m["content"].as_str())
        .unwrap_or_default()
        .to_owned();
    let calls = {
        let mut counts = counter.calls.lock().unwrap();
        let count = counts.entry(question.clone()).or_default();
        *count += 1;
        *count
    };
    let hold = if question == counter.slow && calls == 1 { Duration::from_secs(60) } else { Duration::ZERO };
    let upstream = reqwest::Client::new()
        .post(format!("{}/chat/completions", counter.upstream))
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap();
    let status = upstream.status().as_u16();
    let chunks = futures::stream::unfold(upstream, move |mut response| async move {
        let chunk = response.chunk().await.ok().flatten()?;
        let ends = |marker: &[u8]| chunk.windows(marker.len()).any(|w| w == marker);
        if ends(b"[DONE]") || ends(b"\"finish_reason\":\"") {
            tokio::time::sleep(hold).await;
        }
        Some((Ok::<_, std::io::Error>(chunk), response))
    });
    Response::builder()
        .status(status)
        .header("content-type", "text/event-stream")
        .body(Body::from_stream(chunks))
        .unwrap()
}

async fn start_proxy(upstream: &str, slow: &str) -> (String, CallCounter) {
    let counter = CallCounter { upstream: upstream.to_owned(), slow: slow.to_owned(), ..CallCounter::default() };
    let app =
        axum::Router::new().route("/v1/chat/completions", axum::routing::post(forward)).with_state(counter.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/v1", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (url, counter)
}

/// A client message id whose new conversation of `user` lands on `partition`.
fn message_id_on(user: &str, partition: i32, prefix: &str) -> String {
    let lanes: LaneLayout = DEFAULT_LANES.parse().unwrap();
    (0..)
        .map(|i| format!("{prefix}-{i}"))
        .find(|id| {
            let conversation =
                new_conversation_id(&user.parse().unwrap(), id, Lane::Standard, &lanes, CONVERSATION_PARTITIONS)
                    .to_string();
            partition_for_key(conversation.as_bytes(), CONVERSATION_PARTITIONS) == partition
        })
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn after_a_crash_only_unanswered_queries_go_to_the_model_again() {
    let Some(stack) = stack() else { return };
    let long_question = "List 100 animals, one per line, numbered.";
    let short_question = "Say OK.";
    let (proxy, counter) = start_proxy(&stack.llm, long_question).await;
    let mut pipeline = Pipeline::start(&stack, &["--llm-base-url", &proxy, "--instance-id", "crash-test"]).await;
    let (user, token) = pipeline.session_user().await;
    let long_id = message_id_on(&user, 1, "long");
    let short_id = message_id_on(&user, 1, "short");

    let mut long = pipeline.connect(&pipeline.http, &token).await;
    long.ask(&long_id, None, long_question).await;
    let first = long.until("token").await;
    assert!(first.iter().any(|f| f["type"] == "ack"), "{first:?}");
    let mut short = pipeline.connect(&pipeline.http, &token).await;
    short.ask(&short_id, None, short_question).await;
    let short_frames = short.until_outcome().await;
    assert_eq!(short_frames.last().unwrap()["type"], "answer", "{short_frames:?}");
    // The long answer is still being generated: nothing waited for it, and its query holds
    // the partition's committed offset back.
    let killed_at = Instant::now();
    pipeline.restart().await;

    let events = support::log_events(&pipeline.brokers, &pipeline.registry, &pipeline.events_topic(), None, 6).await;
    let recovered = killed_at.elapsed();
    let outcomes: Vec<parley_events::EventId> = events
        .iter()
        .filter_map(|(e, _)| match e {
            ConversationEvent::ResponseGenerated(o) => Some(o.query_event_id),
            ConversationEvent::ResponseFailed(o) => Some(o.query_event_id),
            _ => None,
        })
        .collect();
    assert_eq!(outcomes.len(), 2, "{events:?}");
    assert_ne!(outcomes[0], outcomes[1], "one outcome per query: {events:?}");
    // Nothing more arrives: a late duplicate outcome would show up here.
    let topic = pipeline.events_topic();
    let seventh = support::log_events(&pipeline.brokers, &pipeline.registry, &topic, None, 7);
    assert!(tokio::time::timeout(Duration::from_secs(5), seventh).await.is_err(), "a seventh event: {events:?}");
    let calls = counter.calls.lock().unwrap().clone();
    assert_eq!(calls.get(short_question), Some(&1), "the answered query was sent to the model again: {calls:?}");
    assert_eq!(calls.get(long_question), Some(&2), "interrupted by the crash, then answered: {calls:?}");
    eprintln!("kill -9 → both outcomes in the log after {recovered:?}; LLM calls {calls:?}");
    pipeline.stop().await;
}
