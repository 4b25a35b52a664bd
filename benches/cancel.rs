//! Stopping an answer: from the `cancel` frame to the last token frame, to the cancelled
//! answer frame, and to the model server's slot being free again (llama.cpp's `/slots`),
//! with the real model. The raw limit, measured in the same run: a client streaming from
//! llama.cpp directly that closes its connection, to the slot being free.
//!
//! Run: `infra/bench.sh cancel` (PARLEY_BENCH_TURNS rounds, default 10).

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../tests/support/mod.rs"]
mod support;

use std::time::{Duration, Instant};

use futures::StreamExt;
use serde_json::{Value, json};

const LONG: &str = "Write a long story about a dragon and a knight, at least 400 words.";
/// Token frames to wait for before stopping.
const STREAMED: i64 = 5;

/// Waits until no slot of the model server at `root` is processing; returns when.
async fn slots_idle(http: &reqwest::Client, root: &str) -> Instant {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let slots: Value = http.get(format!("{root}/slots")).send().await.unwrap().json().await.unwrap();
        if slots.as_array().unwrap().iter().all(|slot| slot["is_processing"] == false) {
            return Instant::now();
        }
        assert!(Instant::now() < deadline, "the model server stayed busy: {slots}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn ms(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1000.0
}

fn report(name: &str, mut samples: Vec<f64>) {
    samples.sort_by(f64::total_cmp);
    let (p50, p99) = (support::percentile(&samples, 50.0), support::percentile(&samples, 99.0));
    println!("| {name} | {p50:.0} | {p99:.0} |");
}

#[tokio::main]
async fn main() {
    let stack = support::stack().expect("the local stack's PARLEY_* variables (infra/bench.sh sets them)");
    let rounds: usize = std::env::var("PARLEY_BENCH_TURNS").ok().and_then(|v| v.parse().ok()).unwrap_or(10);
    let root = stack.llm.trim_end_matches('/').trim_end_matches("/v1").to_owned();
    let http = reqwest::Client::new();
    let mut args = vec!["--without-retrieval", "--llm-max-tokens", "512"];
    args.extend(support::NO_RATE_LIMITS);
    let pipeline = support::Pipeline::start(&stack, &args).await;

    let (mut last_token, mut answer, mut slot_free) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..rounds {
        slots_idle(&http, &root).await;
        let mut client = pipeline.client().await;
        let id = format!("long{round}");
        client.ask(&id, None, LONG).await;
        let ack = client.reply_to(&id).await;
        while client.next_frame().await["index"].as_i64() != Some(STREAMED - 1) {}
        let cancelled = Instant::now();
        let cancel =
            json!({"type": "cancel", "conversation_id": ack["conversation_id"], "query_event_id": ack["event_id"]});
        client.send(cancel).await;
        let mut last = cancelled;
        loop {
            let frame = client.next_frame().await;
            match frame["type"].as_str() {
                Some("token") => last = Instant::now(),
                Some("answer") => {
                    assert_eq!(frame["finish_reason"], "cancelled", "{frame}");
                    answer.push(ms(cancelled.elapsed()));
                    break;
                }
                _ => {}
            }
        }
        last_token.push(ms(last - cancelled));
        slot_free.push(ms(slots_idle(&http, &root).await - cancelled));
    }
    pipeline.stop().await;

    // The raw limit: the same request straight to llama.cpp, the connection closed after
    // as many streamed tokens.
    let mut direct = Vec::new();
    for _ in 0..rounds {
        slots_idle(&http, &root).await;
        let body = json!({"model": "m", "stream": true, "max_tokens": 512,
                          "messages": [{"role": "user", "content": LONG}]});
        let response = http.post(format!("{root}/v1/chat/completions")).json(&body).send().await.unwrap();
        let mut stream = response.bytes_stream();
        let mut events = 0;
        while let Some(chunk) = stream.next().await {
            events += String::from_utf8_lossy(&chunk.unwrap()).matches("data: ").count();
            if events >= usize::try_from(STREAMED + 1).unwrap() {
                break;
            }
        }
        let closed = Instant::now();
        drop(stream);
        direct.push(ms(slots_idle(&http, &root).await - closed));
    }

    println!("stopping an answer: {rounds} rounds, real model (llama.cpp), stopped after {STREAMED} token frames");
    println!("| from the cancel frame (or closing the connection) to | p50 (ms) | p99 (ms) |");
    println!("|---|---|---|");
    report("the last token frame", last_token);
    report("the cancelled answer frame", answer);
    report("the model server's slot free", slot_free);
    report("raw limit: a direct client closes its stream → slot free", direct);
}
