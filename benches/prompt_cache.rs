//! How much of each prompt the model server evaluates afresh, per prompt layout. Six
//! conversations of one user (more than the server's 4 slots) take turns round robin, with
//! retrieval on (each question brings back other conversations' messages) and a context
//! budget small enough that the history outgrows it. After every turn the llama.cpp
//! server's own counters (`/metrics`: prompt tokens evaluated, prompt tokens taken from its
//! cache) say what that turn cost. Reported: the share of prompt tokens evaluated afresh
//! from each conversation's third turn on, and the model time p50/p99, for the `sliding`
//! layout (knowledge in the system message, history sliding a turn at a time), the
//! `stable` one with no history kept by inference (so no earlier question goes in again
//! with its knowledge: the layout before issue 25) and the `stable` one as it runs.
//!
//! Run: `infra/bench.sh prompt_cache` (PARLEY_PROMPT_TURNS turns per conversation, default 12;
//! PARLEY_PROMPT_RETRIEVAL=0 runs without retrieval; PARLEY_PROMPT_BUDGET the context token
//! budget, default 600).

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../tests/support/mod.rs"]
mod support;

use std::time::Duration;

const CONVERSATIONS: usize = 6;
const TOPICS: [&str; 6] = ["the sea", "mountains", "trains", "coffee", "chess", "rain"];

/// (prompt tokens evaluated, prompt tokens served from the cache) so far.
async fn server_counters(llm: &str) -> (f64, f64) {
    let metrics_url = format!("{}/metrics", llm.trim_end_matches("/v1"));
    let text = reqwest::get(metrics_url).await.unwrap().text().await.unwrap();
    let counter = |name: &str| {
        text.lines()
            .find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.trim().parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (counter("llamacpp:prompt_tokens_total"), counter("llamacpp:prompt_tokens_cached_total"))
}

struct LayoutResult {
    evaluated_share: Vec<f64>,
    model_ms: Vec<f64>,
    prompt_tokens: Vec<f64>,
}

async fn run(
    stack: &support::Stack,
    layout: &str,
    extra: &[&str],
    turns: usize,
    budget: &str,
    retrieval: bool,
) -> LayoutResult {
    let mut args = vec!["--prompt-layout", layout, "--context-token-budget", budget, "--llm-max-tokens", "48"];
    args.extend(extra);
    if !retrieval {
        args.push("--without-retrieval");
    }
    args.extend(support::NO_RATE_LIMITS);
    let pipeline = support::Pipeline::start(stack, &args).await;
    let mut client = pipeline.client().await;
    let mut conversations: Vec<Option<String>> = vec![None; CONVERSATIONS];
    let mut result = LayoutResult { evaluated_share: vec![], model_ms: vec![], prompt_tokens: vec![] };
    for turn in 0..turns {
        for (c, conversation) in conversations.iter_mut().enumerate() {
            let before = server_counters(&stack.llm).await;
            let question = format!("Tell me one more short fact about {} (fact {turn}).", TOPICS[c]);
            client.ask(&format!("c{c}-t{turn}"), conversation.as_deref(), &question).await;
            let frames = client.until_outcome().await;
            let answer = frames.last().unwrap();
            assert_eq!(answer["type"], "answer", "{frames:?}");
            *conversation = answer["conversation_id"].as_str().map(str::to_owned);
            // The server updates its counters as the slot finishes: give it a moment.
            tokio::time::sleep(Duration::from_millis(50)).await;
            let after = server_counters(&stack.llm).await;
            let (evaluated, cached) = (after.0 - before.0, after.1 - before.1);
            if turn >= 2 && evaluated + cached > 0.0 {
                result.evaluated_share.push(evaluated / (evaluated + cached));
                result.model_ms.push(answer["llm_latency_ms"].as_f64().unwrap());
                result.prompt_tokens.push(answer["prompt_tokens"].as_f64().unwrap());
            }
        }
    }
    pipeline.stop().await;
    result
}

#[tokio::main]
async fn main() {
    let stack = support::stack().expect("the local stack's PARLEY_* variables (infra/bench.sh sets them)");
    let turns: usize = std::env::var("PARLEY_PROMPT_TURNS").ok().and_then(|v| v.parse().ok()).unwrap_or(12);
    let retrieval = std::env::var("PARLEY_PROMPT_RETRIEVAL").as_deref() != Ok("0");
    let budget = std::env::var("PARLEY_PROMPT_BUDGET").unwrap_or_else(|_| "600".into());
    let with = if retrieval { "on" } else { "off" };
    println!(
        "{CONVERSATIONS} conversations × {turns} turns, round robin, retrieval {with}, context budget {budget} tokens; turns from the third on"
    );
    println!("| layout | turns | prompt tokens p50 | evaluated afresh (mean share) | model time p50 / p99 (ms) |");
    println!("|---|---|---|---|---|");
    // The stable layout with no history kept is the layout before inference kept each
    // question's knowledge: no earlier question is sent with it again.
    let configurations: [(&str, &str, &[&str]); 3] = [
        ("sliding", "sliding", &[]),
        ("stable, knowledge not kept", "stable", &["--history-keep-bytes", "0"]),
        ("stable", "stable", &[]),
    ];
    for (name, layout, extra) in configurations {
        let mut result = run(&stack, layout, extra, turns, &budget, retrieval).await;
        let mean = result.evaluated_share.iter().sum::<f64>() / result.evaluated_share.len().max(1) as f64;
        result.model_ms.sort_by(f64::total_cmp);
        result.prompt_tokens.sort_by(f64::total_cmp);
        println!(
            "| {name} | {} | {:.0} | {:.1} % | {:.0} / {:.0} |",
            result.model_ms.len(),
            support::percentile(&result.prompt_tokens, 50.0),
            100.0 * mean,
            support::percentile(&result.model_ms, 50.0),
            support::percentile(&result.model_ms, 99.0)
        );
    }
}
