//! Nothing waits for a neighbour: a short question's first token, alone and asked 0.3 s
//! after another user's long request, with the real model (llama.cpp, 4 slots). Before
//! continuous inference the short one waited for the long one's whole answer. Run without
//! retrieval and with it (the quick start's default), each on a pipeline of its own.
//!
//! Run: `infra/bench.sh short_after_long` (PARLEY_BENCH_TURNS rounds, default 10).

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../tests/support/mod.rs"]
mod support;

use std::time::{Duration, Instant};

const SHORT: &str = "What is 2+2?";
const LONG: &str = "Write a long story about a dragon and a knight, with many details.";

/// Sends `text` on a new conversation and returns (first token, answer) in ms.
async fn ask(client: &mut support::Client, id: &str, text: &str) -> (f64, f64) {
    let sent = Instant::now();
    client.ask(id, None, text).await;
    let mut first = None;
    loop {
        let frame = client.next_frame().await;
        match frame["type"].as_str() {
            Some("token") => first = first.or(Some(sent.elapsed().as_secs_f64() * 1000.0)),
            Some("answer") => {
                let answer = sent.elapsed().as_secs_f64() * 1000.0;
                return (first.unwrap_or(answer), answer);
            }
            Some("failed" | "error") => panic!("{frame}"),
            _ => {}
        }
    }
}

fn median(mut samples: Vec<f64>) -> f64 {
    samples.sort_by(f64::total_cmp);
    support::percentile(&samples, 50.0)
}

#[tokio::main]
async fn main() {
    let stack = support::stack().expect("the local stack's PARLEY_* variables (infra/bench.sh sets them)");
    let rounds: usize = std::env::var("PARLEY_BENCH_TURNS").ok().and_then(|v| v.parse().ok()).unwrap_or(10);
    for (name, args) in [("no retrieval", vec!["--without-retrieval"]), ("retrieval on (defaults)", vec![])] {
        println!("Parley, {name}: {rounds} rounds, median ms:");
        let pipeline = support::Pipeline::start(&stack, &args).await;
        measure(&pipeline, rounds).await;
        pipeline.stop().await;
        println!();
    }
}

/// The short question alone and 0.3 s after a long one, `rounds` times each.
async fn measure(pipeline: &support::Pipeline, rounds: usize) {
    let mut short = pipeline.client().await;
    let mut long = pipeline.client().await;
    ask(&mut short, "warm", SHORT).await;
    let (mut alone_first, mut alone_answer, mut after_first, mut after_answer, mut long_answer) =
        (vec![], vec![], vec![], vec![], vec![]);
    for round in 0..rounds {
        let (first, answer) = ask(&mut short, &format!("alone-{round}"), SHORT).await;
        alone_first.push(first);
        alone_answer.push(answer);
        let long_id = format!("long-{round}");
        let long_turn = ask(&mut long, &long_id, LONG);
        let short_turn = async {
            tokio::time::sleep(Duration::from_millis(300)).await;
            ask(&mut short, &format!("after-{round}"), SHORT).await
        };
        let ((_, long_done), (first, answer)) = tokio::join!(long_turn, short_turn);
        after_first.push(first);
        after_answer.push(answer);
        long_answer.push(long_done);
    }
    let (alone, after) = (median(alone_first), median(after_first));
    println!("| short question | first token | answer |");
    println!("|---|---|---|");
    println!("| alone | {alone:.0} | {:.0} |", median(alone_answer));
    println!("| 0.3 s after a long request | {after:.0} | {:.0} |", median(after_answer));
    println!("(the long answers took {:.0} ms)", median(long_answer));
    println!(
        "first token after / alone: {:.2}×; target ≤ 1.2× alone + 20 ms = {:.0} ms: {}",
        after / alone,
        1.2 * alone + 20.0,
        if after <= 1.2 * alone + 20.0 { "met" } else { "missed" }
    );
}
