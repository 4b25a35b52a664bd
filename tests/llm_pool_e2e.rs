//! The LLM pool against real llama.cpp servers: the test starts its own server as the
//! first endpoint (the stack's is the second), kills it in the middle of a generation and
//! still gets the answer from the other; the killed endpoint is taken out, and comes back
//! once it answers again.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::{Pipeline, free_port, stack, start_model_server, wait_until_serving};

fn answered_by(frames: &[Value]) -> String {
    let answer = frames.last().unwrap();
    assert_eq!(answer["type"], "answer", "{frames:?}");
    answer["model"].as_str().unwrap().to_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_killed_endpoint_fails_over_and_comes_back_when_healthy() {
    let Some(stack) = stack() else { return };
    let port = free_port();
    let own = format!("http://127.0.0.1:{port}/v1");
    let mut server = start_model_server(port, "pool-own");
    wait_until_serving(&own).await;
    let pool = [format!("{own};model=pool-own;slots=2"), format!("{};slots=4", stack.llm)];
    let pipeline = Pipeline::start(
        &stack,
        &[
            "--llm-endpoint",
            &pool[0],
            "--llm-endpoint",
            &pool[1],
            "--llm-breaker-threshold",
            "1",
            "--llm-breaker-cool-down",
            "10m",
            // It asks again and again until the restarted endpoint answers.
            support::NO_RATE_LIMITS[0],
            support::NO_RATE_LIMITS[1],
        ],
    )
    .await;
    let (_, token) = pipeline.session_user().await;
    let mut client = pipeline.connect(&pipeline.http, &token).await;

    // An idle pool sends the call to the first endpoint; it dies while generating.
    client.ask("long", None, "List 100 animals, one per line, numbered.").await;
    let before = client.until("token").await;
    let conversation = before[0]["conversation_id"].as_str().unwrap().to_owned();
    let query = before[0]["event_id"].clone();
    server.kill().unwrap();
    server.wait().unwrap();
    // Another tab of the user's picks the answer up from the first delta it had, while the
    // call is retried on the other endpoint.
    let mut tab = pipeline.connect(&pipeline.http, &token).await;
    let had = before.last().unwrap();
    assert_eq!((had["index"].as_i64(), had["attempt"].as_i64()), (Some(0), Some(1)), "{had}");
    tab.send(json!({"type": "resume", "conversation_id": conversation, "query_event_id": query,
                    "last_index": 0, "position": had["position"]}))
        .await;
    let frames = client.until_outcome().await;
    assert!(answered_by(&frames) != "pool-own", "answered by the other endpoint: {frames:?}");
    let restarts = frames.iter().filter(|f| f["type"] == "token" && f["index"] == 0).count();
    assert_eq!(restarts, 1, "the answer starts over at index 0 on the other endpoint: {frames:?}");
    assert!(frames.iter().any(|f| f["type"] == "token" && f["attempt"] == 2), "{frames:?}");
    // The resumed tab shows the retried answer from its start, whole, as the answer has it.
    let mut shown = before[1..].iter().filter_map(|f| f["delta"].as_str()).collect::<String>();
    let answer = loop {
        let frame = tab.next_frame().await;
        match frame["type"].as_str() {
            Some("token") => {
                if frame["index"] == 0 {
                    shown.clear(); // the answer starts over
                }
                shown.push_str(frame["delta"].as_str().unwrap());
            }
            Some("answer" | "failed") => break frame,
            _ => {}
        }
    };
    assert_eq!(answer["type"], "answer", "{answer}");
    assert_eq!(shown, answer["text"].as_str().unwrap(), "the resumed tab's text is the answer");

    // Its breaker is open: the next question goes straight to the other endpoint.
    client.ask("next", Some(&conversation), "Say hello.").await;
    assert!(answered_by(&client.until_outcome().await) != "pool-own");

    // Back up: the health probe returns it to the pool (long before the 10 minute
    // cool-down), and as the less loaded first endpoint it answers again.
    let mut server = start_model_server(port, "pool-own");
    wait_until_serving(&own).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    for turn in 0.. {
        client.ask(&format!("back-{turn}"), Some(&conversation), "Say yes.").await;
        if answered_by(&client.until_outcome().await) == "pool-own" {
            break;
        }
        assert!(Instant::now() < deadline, "the restarted endpoint never took a call again");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    server.kill().unwrap();
    server.wait().unwrap();
    pipeline.stop().await;
}
