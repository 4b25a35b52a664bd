//! Retrieval quality on the labelled evaluation set in tests/retrieval_eval (2,040 chunks,
//! 220 questions; generate.py says how it was made), against the real Milvus Lite and the
//! in-process MiniLM of the local stack: recall@5 and nDCG@10 of vector search, BM25
//! keyword search and hybrid search (the default), overall and per kind of question.
//! Hybrid must beat both on the whole set. The table it prints is in docs/benchmarks.md.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "support/mod.rs"]
mod support;

use std::collections::BTreeMap;

use parley_events::{ConversationId, EventId, UserId};
use parley_retrieval::minilm::MiniLm;
use parley_retrieval::{EmbeddingBackend, Hit, SearchFilter, SourceKind, VectorRecord, VectorStore};
use serde::Deserialize;

#[derive(Deserialize)]
struct Chunk {
    id: String,
    text: String,
}

#[derive(Deserialize)]
struct Question {
    kind: String,
    question: String,
    relevant: Vec<String>,
}

fn lines<T: for<'de> Deserialize<'de>>(name: &str) -> Vec<T> {
    let path = format!("{}/tests/retrieval_eval/{name}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{path}: {e}"))
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("{path}: {e}: {line}")))
        .collect()
}

/// Share of the relevant chunks among the first `k` hits.
fn recall_at(hits: &[String], relevant: &[String], k: usize) -> f64 {
    let found = relevant.iter().filter(|r| hits.iter().take(k).any(|h| h == *r)).count();
    found as f64 / relevant.len() as f64
}

/// Normalised discounted cumulative gain of the first `k` hits, binary relevance: 1 when
/// every relevant chunk leads the list, less the lower they are, 0 when none is in it.
fn ndcg_at(hits: &[String], relevant: &[String], k: usize) -> f64 {
    let gain = |rank: usize| 1.0 / (rank as f64 + 2.0).log2();
    let dcg: f64 = hits.iter().take(k).enumerate().filter(|(_, h)| relevant.contains(h)).map(|(i, _)| gain(i)).sum();
    let ideal: f64 = (0..relevant.len().min(k)).map(gain).sum();
    dcg / ideal
}

#[test]
fn the_metrics_count_what_they_say() {
    let ids = |v: &[&str]| v.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
    assert_eq!(recall_at(&ids(&["x", "a", "y"]), &ids(&["a"]), 5), 1.0);
    assert_eq!(recall_at(&ids(&["x", "y", "z", "w", "v", "a"]), &ids(&["a"]), 5), 0.0);
    assert_eq!(ndcg_at(&ids(&["a", "x"]), &ids(&["a"]), 10), 1.0);
    assert!((ndcg_at(&ids(&["x", "a"]), &ids(&["a"]), 10) - 1.0 / 3f64.log2()).abs() < 1e-12);
    assert_eq!(ndcg_at(&ids(&["x"]), &ids(&["a"]), 10), 0.0);
}

#[derive(Default)]
struct Score {
    questions: usize,
    recall_at_5: f64,
    ndcg_at_10: f64,
}

impl Score {
    fn add(&mut self, hits: &[Hit], relevant: &[String]) {
        let ids: Vec<String> = hits.iter().map(|h| h.id.clone()).collect();
        self.questions += 1;
        self.recall_at_5 += recall_at(&ids, relevant, 5);
        self.ndcg_at_10 += ndcg_at(&ids, relevant, 10);
    }

    fn recall(&self) -> f64 {
        self.recall_at_5 / self.questions as f64
    }

    fn ndcg(&self) -> f64 {
        self.ndcg_at_10 / self.questions as f64
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn hybrid_search_beats_vectors_and_keywords_alone_on_the_evaluation_set() {
    if support::stack().is_none() {
        return;
    }
    let model_dir = std::env::var("PARLEY_EMBEDDING_MODEL_DIR").unwrap();
    let model = MiniLm::load(std::path::Path::new(&model_dir)).unwrap();
    let settings = support::milvus_settings("test_retrieval_quality");
    VectorStore::drop_collection(&settings).await.unwrap();
    let store = VectorStore::open(&settings, model.dimension(), model.model()).await.unwrap();
    let chunks: Vec<Chunk> = lines("chunks.jsonl");
    let questions: Vec<Question> = lines("questions.jsonl");
    assert!(chunks.len() >= 2_000 && questions.len() >= 200, "the set is smaller than the issue asks");

    let owner: UserId = "evaluator".parse().unwrap();
    let source: ConversationId = uuid::Uuid::new_v5(&uuid::Uuid::NAMESPACE_OID, b"retrieval-eval").into();
    for batch in chunks.chunks(64) {
        let texts: Vec<String> = batch.iter().map(|c| c.text.clone()).collect();
        let vectors = model.embed(&texts).await.unwrap();
        let records: Vec<VectorRecord> = batch
            .iter()
            .zip(vectors)
            .map(|(chunk, embedding)| VectorRecord {
                id: chunk.id.clone(),
                owner: owner.clone(),
                kind: SourceKind::Document,
                source_id: source,
                source_event_id: EventId::random(),
                position: 0,
                label: "evaluation set".into(),
                text: chunk.text.clone(),
                embedding,
            })
            .collect();
        store.upsert(&records).await.unwrap();
    }
    store.flush().await.unwrap();
    let filter = SearchFilter::owner(owner);
    assert_eq!(store.count(&filter).await.unwrap(), chunks.len() as u64);

    let texts: Vec<String> = questions.iter().map(|q| q.question.clone()).collect();
    let mut vectors = Vec::new();
    for batch in texts.chunks(64) {
        vectors.extend(model.embed(batch).await.unwrap());
    }
    // (mode, kind of question) → score; kind "all" is the whole set.
    let mut scores: BTreeMap<(&str, String), Score> = BTreeMap::new();
    for (question, vector) in questions.iter().zip(vectors) {
        let by_vector = store.search_vectors(vector.clone(), &filter, 10).await.unwrap();
        let by_keyword = store.search_keywords(&question.question, None, &filter, 10).await.unwrap();
        let hybrid = store.search(&question.question, Some(vector), &filter, 10).await.unwrap();
        for (mode, hits) in [("vector", &by_vector), ("keyword (BM25)", &by_keyword), ("hybrid (RRF)", &hybrid)] {
            for kind in ["all".to_owned(), question.kind.clone()] {
                scores.entry((mode, kind)).or_default().add(hits, &question.relevant);
            }
        }
    }
    VectorStore::drop_collection(&settings).await.unwrap();

    println!("| search | questions | recall@5 | nDCG@10 |\n|---|---|---|---|");
    for ((mode, kind), score) in &scores {
        println!("| {mode}, {kind} | {} | {:.3} | {:.3} |", score.questions, score.recall(), score.ndcg());
    }
    let all = |mode: &'static str| &scores[&(mode, "all".to_owned())];
    let (hybrid, vector, keyword) = (all("hybrid (RRF)"), all("vector"), all("keyword (BM25)"));
    assert!(
        hybrid.recall() > vector.recall() && hybrid.recall() > keyword.recall(),
        "recall@5: hybrid {:.3}, vector {:.3}, keyword {:.3}",
        hybrid.recall(),
        vector.recall(),
        keyword.recall()
    );
    assert!(
        hybrid.ndcg() > vector.ndcg() && hybrid.ndcg() > keyword.ndcg(),
        "nDCG@10: hybrid {:.3}, vector {:.3}, keyword {:.3}",
        hybrid.ndcg(),
        vector.ndcg(),
        keyword.ndcg()
    );
}
