//! The semantic cache's decision on the labelled set in tests/cache_eval, with the shipped
//! embedding model (in-process MiniLM) and the default settings: how often a paraphrase or
//! near repeat is served from the cache (hits, higher is better) and how often a near miss
//! that needs another answer would be (false hits, must be ≤ 1 %), per category, beside
//! what the similarity threshold alone would do. The table it prints is in
//! docs/benchmarks.md.
//!
//! single_turn.jsonl: a question, its paraphrases (`same`) and near misses by category
//! (`negation`, `entity`, `number`, `scope`); each variant is a pair with the question.
//! multi_turn.jsonl: earlier turns, other earlier turns, a question that depends on them
//! and its paraphrases. Each paraphrase after the same turns should hit; the question
//! and each paraphrase after the other turns must not.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "support/mod.rs"]
mod support;

use std::collections::{BTreeMap, HashMap};

use parley_inference::cache::equivalence::equivalent;
use parley_inference::cache::{DEFAULT_MIN_SIMILARITY, context_fingerprint};
use parley_retrieval::minilm::MiniLm;
use serde::Deserialize;

#[derive(Deserialize)]
struct Family {
    question: String,
    #[serde(flatten)]
    variants: BTreeMap<String, Vec<String>>,
}

#[derive(Deserialize)]
struct Conversation {
    turns: Vec<(String, String)>,
    other_turns: Vec<(String, String)>,
    question: String,
    same: Vec<String>,
}

/// One labelled case: the cached question after its turns, the asked one after its.
struct Case<'a> {
    category: String,
    should_hit: bool,
    cached: (&'a [(String, String)], &'a str),
    asked: (&'a [(String, String)], &'a str),
}

fn lines<T: for<'de> Deserialize<'de>>(name: &str) -> Vec<T> {
    let path = format!("{}/tests/cache_eval/{name}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{path}: {e}"))
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("{path}: {e}: {line}")))
        .collect()
}

fn cases<'a>(families: &'a [Family], conversations: &'a [Conversation]) -> Vec<Case<'a>> {
    let mut cases = Vec::new();
    for family in families {
        for (category, variants) in &family.variants {
            for variant in variants {
                cases.push(Case {
                    category: if category == "same" { "paraphrase".into() } else { category.clone() },
                    should_hit: category == "same",
                    cached: (&[], &family.question),
                    asked: (&[], variant),
                });
            }
        }
    }
    for c in conversations {
        let cached = (c.turns.as_slice(), c.question.as_str());
        cases.push(Case {
            category: "multi-turn: other turns".into(),
            should_hit: false,
            cached,
            asked: (&c.other_turns, &c.question),
        });
        for same in &c.same {
            let after = |turns| Case { category: String::new(), should_hit: false, cached, asked: (turns, same) };
            cases.push(Case { category: "multi-turn: paraphrase".into(), should_hit: true, ..after(&c.turns) });
            cases.push(Case { category: "multi-turn: other turns".into(), ..after(&c.other_turns) });
        }
    }
    cases
}

fn fingerprint(turns: &[(String, String)]) -> String {
    let roles = turns.iter().flat_map(|(q, a)| [("user", q.as_str()), ("assistant", a.as_str())]);
    context_fingerprint("SmolLM2-135M-Instruct", "You are a helpful assistant.", roles)
}

/// Counts of one category: (cases, cache hits, threshold-alone hits at the default, at 0.9).
#[derive(Default)]
struct Tally {
    cases: usize,
    hits: usize,
    alone: usize,
    alone_90: usize,
}

fn percent(part: usize, whole: usize) -> f64 {
    100.0 * part as f64 / whole.max(1) as f64
}

#[test]
fn the_cache_serves_paraphrases_and_never_near_misses() {
    if support::stack().is_none() {
        return;
    }
    let model_dir = std::env::var("PARLEY_EMBEDDING_MODEL_DIR").unwrap();
    let model = MiniLm::load(std::path::Path::new(&model_dir)).unwrap();
    let families: Vec<Family> = lines("single_turn.jsonl");
    let conversations: Vec<Conversation> = lines("multi_turn.jsonl");
    let cases = cases(&families, &conversations);
    let mut texts: Vec<String> = cases.iter().flat_map(|c| [c.cached.1.to_owned(), c.asked.1.to_owned()]).collect();
    texts.sort();
    texts.dedup();
    let vectors: HashMap<&str, Vec<f32>> = texts
        .chunks(32)
        .flat_map(|batch| batch.iter().map(String::as_str).zip(model.embed_blocking(batch).unwrap()))
        .collect();
    let cosine = |a: &str, b: &str| vectors[a].iter().zip(&vectors[b]).map(|(x, y)| x * y).sum::<f32>();

    let mut tallies: BTreeMap<(bool, String), Tally> = BTreeMap::new();
    let mut wrong = Vec::new();
    for case in &cases {
        let similarity = cosine(case.cached.1, case.asked.1);
        let same_context = fingerprint(case.cached.0) == fingerprint(case.asked.0);
        let hit = same_context && equivalent(case.asked.1, case.cached.1, similarity, DEFAULT_MIN_SIMILARITY).is_ok();
        let tally = tallies.entry((case.should_hit, case.category.clone())).or_default();
        tally.cases += 1;
        tally.hits += usize::from(hit);
        tally.alone += usize::from(similarity >= DEFAULT_MIN_SIMILARITY);
        tally.alone_90 += usize::from(similarity >= 0.9);
        if hit != case.should_hit {
            wrong.push(format!("{:.3} {:?} | {:?} ({})", similarity, case.cached.1, case.asked.1, case.category));
        }
    }
    println!(
        "| kind | category | cases | cache hits | threshold {DEFAULT_MIN_SIMILARITY} alone | threshold 0.9 alone |"
    );
    println!("|---|---|---|---|---|---|");
    let mut totals = [(0, 0), (0, 0)];
    for ((should_hit, category), tally) in tallies.iter().rev() {
        let kind = if *should_hit { "should hit" } else { "must miss" };
        println!(
            "| {kind} | {category} | {} | {:.1} % | {:.1} % | {:.1} % |",
            tally.cases,
            percent(tally.hits, tally.cases),
            percent(tally.alone, tally.cases),
            percent(tally.alone_90, tally.cases)
        );
        let total = &mut totals[usize::from(*should_hit)];
        total.0 += tally.cases;
        total.1 += tally.hits;
    }
    let [(misses, false_hits), (paraphrases, hits)] = totals;
    println!(
        "\nfalse hits {false_hits} of {misses} ({:.2} %), hits {hits} of {paraphrases} ({:.1} %)",
        percent(false_hits, misses),
        percent(hits, paraphrases)
    );
    println!("decided otherwise than labelled:\n{}", wrong.join("\n"));
    let single_turn = cases.iter().filter(|c| c.cached.0.is_empty()).count();
    assert!(single_turn >= 300 && cases.len() - single_turn >= 100, "the set is as large as it says");
    assert!(percent(false_hits, misses) <= 1.0, "false hits {false_hits} of {misses}");
    assert!(percent(hits, paraphrases) >= 60.0, "hits {hits} of {paraphrases}");
}
