//! The semantic cache under a replayed chat load, with the real model and the quick start's
//! defaults (retrieval on), beside the same load with `--semantic-cache false` in the same
//! run: the share of model calls saved, hits and false hits as a person would meet them,
//! how fast a hit is against the model's time, and what a miss costs.
//!
//! The load comes from tests/cache_eval/single_turn.jsonl: each user asks the questions of
//! three families, each in a conversation of its own; once those are answered and indexed,
//! the user comes back with a paraphrase of each and a near miss of each (another entity,
//! number, scope or a negation), in new conversations, in an interleaved order. A third of
//! the turns are thus repeats: the share saved scales with how often people repeat
//! themselves; the hit rate among repeats is what carries over.
//!
//! Run: `infra/bench.sh semantic_cache` (PARLEY_BENCH_USERS users, default 8, four at a time).

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../tests/support/mod.rs"]
mod support;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use futures::future::join_all;
use futures::{StreamExt, stream};
use serde::Deserialize;
use serde_json::{Value, json};

/// People chatting at once: the model server's slots (`--concurrency`, 4).
const AT_ONCE: usize = 4;

#[derive(Deserialize)]
struct Family {
    question: String,
    #[serde(flatten)]
    variants: BTreeMap<String, Vec<String>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    First,
    Paraphrase,
    NearMiss,
}

/// One turn as the client saw it.
struct Turn {
    kind: Kind,
    text: String,
    /// Question → answer frame.
    answer: Duration,
    /// The answer frame.
    frame: Value,
}

impl Turn {
    fn cached(&self) -> bool {
        self.frame.get("cached_from").is_some()
    }

    /// The model's time (0 for a cached answer).
    fn model_ms(&self) -> f64 {
        self.frame["llm_latency_ms"].as_f64().unwrap_or(0.0)
    }
}

/// The questions of `user`: three families' questions, then a paraphrase and a near miss
/// of each (chosen by position, so every run asks the same).
fn load(families: &[Family], user: usize) -> (Vec<String>, Vec<(Kind, String)>) {
    let mine: Vec<&Family> = (0..3).map(|i| &families[(user * 3 + i) % families.len()]).collect();
    let firsts = mine.iter().map(|f| f.question.clone()).collect();
    let mut later = Vec::new();
    for (i, family) in mine.iter().enumerate() {
        let same = &family.variants["same"];
        later.push((Kind::Paraphrase, same[(user + i) % same.len()].clone()));
        let misses: Vec<&String> = family.variants.iter().filter(|(k, _)| *k != "same").flat_map(|(_, v)| v).collect();
        later.push((Kind::NearMiss, misses[(user + i) % misses.len()].clone()));
    }
    // Interleaved: a near miss of one family between the paraphrases of others.
    let turns = later.len();
    later.rotate_left(user % turns);
    (firsts, later)
}

/// Asks `text` in a new conversation and waits for its outcome.
async fn ask(client: &mut support::Client, id: &str, kind: Kind, text: &str) -> Turn {
    let sent = Instant::now();
    client.send(json!({"type": "query", "client_message_id": id, "text": text})).await;
    let frames = client.until_outcome().await;
    let frame = frames.last().unwrap().clone();
    assert_eq!(frame["type"], "answer", "{frames:?}");
    Turn { kind, text: text.to_owned(), answer: sent.elapsed(), frame }
}

/// Every user's turns: first questions, then (once those are indexed) the repeats.
async fn run(pipeline: &support::Pipeline, families: &[Family], users: usize) -> (Vec<Turn>, Duration) {
    let started = Instant::now();
    let sessions: Vec<(String, String)> = join_all((0..users).map(|_| pipeline.session_user())).await;
    // As many people at once as the model has slots: each waits for answers, not for a slot.
    let firsts: Vec<Vec<Turn>> = stream::iter(sessions.iter().enumerate().map(|(user, (_, token))| async move {
        let mut client = pipeline.connect(&pipeline.http, token).await;
        let mut turns = Vec::new();
        for (i, text) in load(families, user).0.iter().enumerate() {
            turns.push(ask(&mut client, &format!("f{i}"), Kind::First, text).await);
        }
        turns
    }))
    .buffered(AT_ONCE)
    .collect()
    .await;
    // A person comes back later: by then the first questions are indexed and projected.
    for ((_, token), turns) in sessions.iter().zip(&firsts) {
        for turn in turns {
            let query = turn.frame["query_event_id"].as_str().unwrap();
            pipeline.conversation_when(token, turn.frame["conversation_id"].as_str().unwrap(), 2).await;
            let path = format!("/api/search?q={}&k=50&kind=message", support::urlencode(&turn.text));
            support::wait_until("the question's vector", || async {
                let (_, found) = pipeline.get(&path, token).await;
                found["hits"].as_array()?.iter().any(|h| h["source_event_id"] == query).then_some(())
            })
            .await;
        }
    }
    let later: Vec<Vec<Turn>> = stream::iter(sessions.iter().enumerate().map(|(user, (_, token))| async move {
        let mut client = pipeline.connect(&pipeline.http, token).await;
        let mut turns = Vec::new();
        for (i, (kind, text)) in load(families, user).1.iter().enumerate() {
            turns.push(ask(&mut client, &format!("l{i}"), *kind, text).await);
        }
        turns
    }))
    .buffered(AT_ONCE)
    .collect()
    .await;
    (firsts.into_iter().chain(later).flatten().collect(), started.elapsed())
}

fn ms(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1000.0
}

/// "p50 / p99" of `samples` in ms.
fn spread(mut samples: Vec<f64>) -> String {
    if samples.is_empty() {
        return "–".into();
    }
    samples.sort_by(f64::total_cmp);
    format!("{:.0} / {:.0}", support::percentile(&samples, 50.0), support::percentile(&samples, 99.0))
}

fn count(turns: &[Turn], kind: Kind, cached: bool) -> (usize, usize) {
    let of_kind: Vec<&Turn> = turns.iter().filter(|t| t.kind == kind).collect();
    (of_kind.iter().filter(|t| t.cached() == cached).count(), of_kind.len())
}

#[tokio::main]
async fn main() {
    let stack = support::stack().expect("the local stack's PARLEY_* variables (infra/bench.sh sets them)");
    let users: usize = std::env::var("PARLEY_BENCH_USERS").ok().and_then(|v| v.parse().ok()).unwrap_or(8);
    let path = format!("{}/tests/cache_eval/single_turn.jsonl", env!("CARGO_MANIFEST_DIR"));
    let families: Vec<Family> =
        std::fs::read_to_string(path).unwrap().lines().map(|line| serde_json::from_str(line).unwrap()).collect();

    let mut results = Vec::new();
    let mut lookups = String::new();
    for (name, cache) in [("cache on (defaults)", "true"), ("cache off", "false")] {
        let args = [&["--semantic-cache", cache][..], &support::NO_RATE_LIMITS].concat();
        let pipeline = support::Pipeline::start(&stack, &args).await;
        let (turns, took) = run(&pipeline, &families, users).await;
        if cache == "true" {
            // Why the misses missed: the lookups by result, as the metrics count them.
            let metrics = reqwest::get(format!("{}/metrics", pipeline.http)).await.unwrap().text().await.unwrap();
            lookups = metrics
                .lines()
                .filter(|line| line.starts_with("parley_semantic_cache_lookups_total{"))
                .map(|line| line.trim_start_matches("parley_semantic_cache_lookups_total"))
                .collect::<Vec<_>>()
                .join(", ");
        }
        pipeline.stop().await;
        results.push((name, turns, took));
    }

    println!("| {users} users, {} turns each | {} | {} |", 9, results[0].0, results[1].0);
    println!("|---|---|---|");
    let row = |what: &str, value: &dyn Fn(&[Turn], Duration) -> String| {
        println!("| {what} | {} | {} |", value(&results[0].1, results[0].2), value(&results[1].1, results[1].2));
    };
    row("turns", &|turns, _| turns.len().to_string());
    row("model calls", &|turns, _| turns.iter().filter(|t| !t.cached()).count().to_string());
    row("model calls saved", &|turns, _| {
        let saved = turns.iter().filter(|t| t.cached()).count();
        format!("{saved} ({:.1} %)", 100.0 * saved as f64 / turns.len() as f64)
    });
    row("paraphrases served from the cache", &|turns, _| {
        let (hits, of) = count(turns, Kind::Paraphrase, true);
        format!("{hits} of {of}")
    });
    row("near misses served from the cache (false hits)", &|turns, _| {
        let (hits, of) = count(turns, Kind::NearMiss, true);
        format!("{hits} of {of}")
    });
    row("answer from the cache, question → answer p50 / p99 ms", &|turns, _| {
        spread(turns.iter().filter(|t| t.cached()).map(|t| ms(t.answer)).collect())
    });
    row("answer from the model, question → answer p50 / p99 ms", &|turns, _| {
        spread(turns.iter().filter(|t| !t.cached()).map(|t| ms(t.answer)).collect())
    });
    row("model time of those answers p50 / p99 ms", &|turns, _| {
        spread(turns.iter().filter(|t| !t.cached()).map(Turn::model_ms).collect())
    });
    row("a miss: answer − model time p50 / p99 ms", &|turns, _| {
        spread(turns.iter().filter(|t| !t.cached()).map(|t| ms(t.answer) - t.model_ms()).collect())
    });
    row("first answers complete (cacheable: finish_reason stop)", &|turns, _| {
        let firsts: Vec<&Turn> = turns.iter().filter(|t| t.kind == Kind::First).collect();
        let complete = firsts.iter().filter(|t| t.frame["finish_reason"] == "stop").count();
        format!("{complete} of {}", firsts.len())
    });
    row("the whole load, s", &|_, took| format!("{:.1}", took.as_secs_f64()));
    println!("\nlookups with the cache on, by result: {lookups}");
}
