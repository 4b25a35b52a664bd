//! The knowledge base, measured in one run against the local stack (infra/bench.sh knowledge):
//!
//! 1. embeddings/s of the in-process all-MiniLM-L6-v2 at batch sizes 1, 8 and 32 (the
//!    questions' path: one thread); questions
//!    asked at once, embedded one by one against batched by the process's question worker;
//!    a question's embedding latency idle and while indexing runs in the background;
//! 2. ingestion end to end: `parley ingest` of PARLEY_BENCH_DOCUMENTS documents (default 200)
//!    until every chunk is searchable in Milvus, as documents/s and chunks/s, against the raw
//!    limit: embedding the same chunks directly at batch 32;
//! 3. search: PARLEY_BENCH_VECTORS real embeddings (default 20,000) of 4 owners in a collection
//!    with the default index; p50/p99 of an owner-filtered top-10 search, recall@10 against exact
//!    brute-force search over the same owner's vectors, and the brute force's own latency.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../tests/support/mod.rs"]
mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use parley_embedder::chunking::chunk_text;
use parley_retrieval::minilm::MiniLm;
use parley_retrieval::{Embedders, EmbeddingBackend, SearchFilter, SourceKind, VectorRecord, VectorStore};

const WORDS: &[&str] = &[
    "kafka",
    "reactor",
    "garden",
    "harbour",
    "ledger",
    "violin",
    "glacier",
    "compiler",
    "orchard",
    "satellite",
    "bakery",
    "tunnel",
    "falcon",
    "archive",
    "lantern",
    "meadow",
    "circuit",
    "canyon",
    "pepper",
    "quartz",
    "ferry",
    "museum",
    "signal",
    "cactus",
    "anchor",
    "helmet",
    "river",
    "pixel",
    "saddle",
    "thunder",
    "walnut",
    "engine",
];
const VERBS: &[&str] =
    &["repairs", "describes", "moves", "paints", "measures", "guards", "feeds", "builds", "tests", "sells"];

/// A deterministic, varied English-like sentence for seed `i`.
fn sentence(i: usize) -> String {
    let w = |k: usize| WORDS[(i.wrapping_mul(2_654_435_761).wrapping_add(k * 40_503) >> 7) % WORDS.len()];
    let v = VERBS[(i / 7 + i % 13) % VERBS.len()];
    format!("The {} near the {} {} the {} every {} morning, says note {i}.", w(1), w(2), v, w(3), w(4))
}

fn document(i: usize) -> String {
    (0..24)
        .map(|j| sentence(i * 100 + j))
        .collect::<Vec<_>>()
        .chunks(3)
        .map(|p| p.join(" "))
        .collect::<Vec<_>>()
        .join("\n\n")
}

/// Questions as a process embeds them (`Embedders`): 32 asked at once, each embedded alone
/// against batched by the question worker; and one question's latency alone against while
/// the embedder's bulk work runs in the background.
async fn questions_through_the_queue(model: &MiniLm) {
    let questions: Vec<String> = (1000..1032).map(sentence).collect();
    let started = Instant::now();
    for question in &questions {
        model.embed(std::slice::from_ref(question)).await.unwrap();
    }
    let alone = questions.len() as f64 / started.elapsed().as_secs_f64();
    let embedders = Embedders::new(Arc::new(model.clone()));
    let started = Instant::now();
    let asked: Vec<_> = questions
        .iter()
        .map(|question| {
            let (door, question) = (embedders.questions.clone(), question.clone());
            tokio::spawn(async move { door.embed(&[question]).await.unwrap() })
        })
        .collect();
    for question in asked {
        question.await.unwrap();
    }
    let batched = questions.len() as f64 / started.elapsed().as_secs_f64();
    println!(
        "  {} questions at once: {alone:.1}/s embedded one by one, {batched:.1}/s batched by the question worker ({:.2}×)",
        questions.len(),
        batched / alone
    );
    let latency = async || {
        let mut samples = Vec::new();
        for question in questions.iter().take(20) {
            let started = Instant::now();
            embedders.questions.embed(std::slice::from_ref(question)).await.unwrap();
            samples.push(started.elapsed().as_secs_f64() * 1000.0);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        samples.sort_by(f64::total_cmp);
        (support::percentile(&samples, 50.0), support::percentile(&samples, 99.0))
    };
    let idle = latency().await;
    let indexing = {
        let bulk = embedders.bulk.clone();
        let chunks: Vec<String> = (0..4096).map(sentence).collect();
        tokio::spawn(async move {
            for group in chunks.chunks(32) {
                bulk.embed(group).await.unwrap();
            }
        })
    };
    let busy = latency().await;
    indexing.abort();
    println!(
        "  one question's embedding p50 / p99: {:.1} / {:.1} ms idle, {:.1} / {:.1} ms while indexing runs in the background",
        idle.0, idle.1, busy.0, busy.1
    );
}

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let Some(stack) = support::stack() else { return };
    let model_dir = std::env::var("PARLEY_EMBEDDING_MODEL_DIR").expect("PARLEY_EMBEDDING_MODEL_DIR");
    let model = MiniLm::load(std::path::Path::new(&model_dir)).unwrap();

    // 1. Embedding throughput by batch size (message-sized texts).
    println!(
        "embedding throughput (all-MiniLM-L6-v2, candle, CPU, {} cores):",
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );
    let texts: Vec<String> = (0..256).map(sentence).collect();
    model.embed(&texts[..8]).await.unwrap(); // warm-up
    for batch in [1, 8, 32] {
        let started = Instant::now();
        for group in texts.chunks(batch) {
            model.embed(group).await.unwrap();
        }
        println!("  batch {batch:>2}: {:7.1} embeddings/s", texts.len() as f64 / started.elapsed().as_secs_f64());
    }

    questions_through_the_queue(&model).await;

    // 2. Ingestion end to end, against embedding the same chunks directly.
    let documents = env_usize("PARLEY_BENCH_DOCUMENTS", 200);
    let corpus = tempfile::tempdir().unwrap();
    let mut chunks = Vec::new();
    for i in 0..documents {
        let text = document(i);
        chunks.extend(chunk_text(&text, 800, 120).into_iter().map(|c| c.text));
        std::fs::write(corpus.path().join(format!("doc-{i:05}.txt")), text).unwrap();
    }
    // The embedder's own path (every core, lowest priority): on an idle machine the fastest.
    let started = Instant::now();
    for group in chunks.chunks(32) {
        model.embed_in_background(group).await.unwrap();
    }
    let raw_chunks_per_s = chunks.len() as f64 / started.elapsed().as_secs_f64();

    let pipeline = support::Pipeline::start(&stack, &["--retrieval-top-k", "0"]).await;
    let owner = "bench-owner";
    let store = VectorStore::open(&pipeline.milvus(), 384, "all-MiniLM-L6-v2").await.unwrap();
    let started = Instant::now();
    let ingest = pipeline.cli(&["ingest", corpus.path().to_str().unwrap(), "--owner", owner]);
    assert!(ingest.status.success(), "{}", String::from_utf8_lossy(&ingest.stderr));
    let acknowledged = started.elapsed();
    let filter = SearchFilter::owner(owner.parse().unwrap());
    while store.count(&filter).await.unwrap() < chunks.len() as u64 {
        assert!(started.elapsed() < Duration::from_secs(1800), "ingestion did not finish");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let chunks_per_s = chunks.len() as f64 / elapsed;
    println!(
        "ingestion end to end ({documents} documents, {} chunks, `parley ingest` → searchable in Milvus):",
        chunks.len()
    );
    println!(
        "  all acknowledged by Kafka after {:.2} s ({:.0} documents/s)",
        acknowledged.as_secs_f64(),
        documents as f64 / acknowledged.as_secs_f64()
    );
    println!(
        "  all searchable after {elapsed:.1} s: {:.1} documents/s, {chunks_per_s:.1} chunks/s",
        documents as f64 / elapsed
    );
    println!(
        "  raw limit (same chunks embedded directly, batch 32): {raw_chunks_per_s:.1} chunks/s; ratio {:.2}",
        chunks_per_s / raw_chunks_per_s
    );
    pipeline.stop().await;

    // 3. Search latency and recall on real embeddings.
    let total = env_usize("PARLEY_BENCH_VECTORS", 20_000);
    let owners = 4;
    let settings = support::milvus_settings(&format!("bench_search_{}", uuid::Uuid::new_v4().simple()));
    let search_store = VectorStore::open(&settings, 384, "all-MiniLM-L6-v2").await.unwrap();
    let started = Instant::now();
    let mut vectors: Vec<(usize, Vec<f32>)> = Vec::with_capacity(total);
    let seeds: Vec<usize> = (0..total).map(|i| 1_000_000 + i).collect();
    for group in seeds.chunks(256) {
        let texts: Vec<String> = group.iter().map(|&i| sentence(i)).collect();
        let embedded = model.embed(&texts).await.unwrap();
        let records: Vec<VectorRecord> = group
            .iter()
            .zip(&embedded)
            .map(|(&i, v)| VectorRecord {
                id: format!("v{i}"),
                owner: format!("owner-{}", i % owners).parse().unwrap(),
                kind: SourceKind::Document,
                source_id: uuid::Uuid::from_u128((i / 10) as u128).into(),
                source_event_id: uuid::Uuid::from_u128(i as u128).into(),
                position: (i % 10) as i64,
                label: "bench".into(),
                text: sentence(i),
                embedding: v.clone(),
            })
            .collect();
        search_store.upsert(&records).await.unwrap();
        vectors.extend(group.iter().copied().zip(embedded));
    }
    // What the embedder does after enough vectors or when idle: seal them into indexed segments.
    search_store.flush().await.unwrap();
    println!(
        "search ({total} vectors of {owners} owners, the default index {:?} (M {}, efConstruction {}, ef {}), top-10 with owner filter):",
        settings.milvus_index, settings.milvus_hnsw_m, settings.milvus_hnsw_ef_construction, settings.milvus_search_ef
    );
    println!("  loaded and flushed in {:.1} s (embedding included)", started.elapsed().as_secs_f64());

    let queries = 200;
    let (mut milvus_ms, mut exact_ms, mut recall_sum) = (Vec::new(), Vec::new(), 0.0);
    for q in 0..queries {
        let query = model.embed(&[sentence(5_000_000 + q)]).await.unwrap().pop().unwrap();
        let owner = q % owners;
        let filter = SearchFilter::owner(format!("owner-{owner}").parse().unwrap());
        let started = Instant::now();
        let hits = search_store.search_vectors(query.clone(), &filter, 10).await.unwrap();
        milvus_ms.push(started.elapsed().as_secs_f64() * 1000.0);
        let started = Instant::now();
        let owned = vectors.iter().filter(|(i, _)| i % owners == owner);
        let exact = support::exact_top_k(owned.map(|(i, v)| (*i, v.as_slice())), &query, 10);
        exact_ms.push(started.elapsed().as_secs_f64() * 1000.0);
        assert!(
            hits.iter().all(|h| h.id.trim_start_matches('v').parse::<usize>().unwrap() % owners == owner),
            "owner filter"
        );
        let found = exact.iter().filter(|i| hits.iter().any(|h| h.id == format!("v{i}"))).count();
        recall_sum += found as f64 / 10.0;
    }
    milvus_ms.sort_by(f64::total_cmp);
    exact_ms.sort_by(f64::total_cmp);
    let (p50, p99) = (support::percentile(&milvus_ms, 50.0), support::percentile(&milvus_ms, 99.0));
    let (exact_p50, exact_p99) = (support::percentile(&exact_ms, 50.0), support::percentile(&exact_ms, 99.0));
    println!(
        "  Milvus search: p50 {p50:.2} ms, p99 {p99:.2} ms; recall@10 {:.3} over {queries} queries",
        recall_sum / queries as f64
    );
    println!(
        "  exact brute force in process ({} vectors per owner): p50 {exact_p50:.2} ms, p99 {exact_p99:.2} ms; ratio p50 {:.1}",
        total / owners,
        p50 / exact_p50
    );
    VectorStore::drop_collection(&settings).await.unwrap();
}
