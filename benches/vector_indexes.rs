//! Vector indexes chosen by measurement (infra/bench.sh vector_indexes): for each size in
//! PARLEY_BENCH_INDEX_SIZES (default 100,000 and 1,000,000), a Milvus Lite of its own
//! loads that many 384-dimension vectors of 64 owners into Parley's collection, then each
//! index type in turn is built over them and measured: build time, memory of the loaded
//! collection, index bytes on disk, and 100 owner-filtered top-10 searches' p50/p99 and
//! recall@10 against exact search over the same owner's vectors in this process (the
//! limit: what a perfect index returns, and how long a plain scan takes).
//!
//! The vectors keep real structure: PARLEY_BENCH_INDEX_BASE (default 5,000) doc-comment
//! paragraphs of the crates pinned in Cargo.lock, read from the local cargo registry, are
//! embedded with the shipped all-MiniLM-L6-v2; the first pass stores those embeddings, and
//! every further vector lies between a real embedding and one of its 8 nearest real
//! neighbours (a random point of the first half of the segment, plus noise of σ 0.01 per
//! dimension, normalized), so the collection has the clusters and gaps of real text rather
//! than uniform noise. The 100 questions are held-out paragraphs, embedded the same way.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../tests/support/mod.rs"]
mod support;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use parley_retrieval::minilm::MiniLm;
use parley_retrieval::store::IndexKind;
use parley_retrieval::{EmbeddingBackend, MilvusSettings, SearchFilter, SourceKind, VectorRecord, VectorStore};
use rand::{Rng, SeedableRng};

const DIMENSION: usize = 384;
const OWNERS: usize = 64;
const QUERIES: usize = 100;
const NEIGHBOURS: usize = 8;
const INDEXES: [(IndexKind, &str); 5] = [
    (IndexKind::Flat, "FLAT (exact)"),
    (IndexKind::Hnsw, "HNSW M16 efC200, ef 64"),
    (IndexKind::HnswSq, "HNSW_SQ SQ8 M16 efC200, ef 64"),
    (IndexKind::IvfFlat, "IVF_FLAT nlist 128, nprobe 16"),
    (IndexKind::IvfSq8, "IVF_SQ8 nlist 128, nprobe 16"),
];

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// FNV-1a: a stable order for the paragraphs, independent of the file walk.
fn fnv1a(text: &str) -> u64 {
    text.bytes().fold(0xcbf2_9ce4_8422_2325, |hash, byte| (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3))
}

/// Doc-comment paragraphs (`///` lines joined, 60 to 200 characters) of the crates pinned
/// in Cargo.lock, deduplicated and in a stable pseudo-random order.
fn paragraphs(wanted: usize) -> Vec<String> {
    let lock = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.lock")).unwrap();
    let mut pinned = BTreeSet::new();
    let mut name = None;
    for line in lock.lines() {
        if let Some(value) = line.strip_prefix("name = ") {
            name = Some(value.trim_matches('"').to_owned());
        } else if let (Some(value), Some(n)) = (line.strip_prefix("version = "), name.take()) {
            pinned.insert(format!("{n}-{}", value.trim_matches('"')));
        }
    }
    let cargo_home = std::env::var("CARGO_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(std::env::var("HOME").unwrap()).join(".cargo"));
    let mut found = BTreeSet::new();
    for registry in std::fs::read_dir(cargo_home.join("registry/src")).unwrap().flatten() {
        for krate in &pinned {
            collect_paragraphs(&registry.path().join(krate), &mut found);
        }
    }
    let mut ordered: Vec<String> = found.into_iter().collect();
    ordered.sort_by_key(|p| fnv1a(p));
    assert!(ordered.len() >= wanted, "only {} doc paragraphs in the registry, {wanted} wanted", ordered.len());
    ordered.truncate(wanted);
    ordered
}

fn collect_paragraphs(dir: &Path, found: &mut BTreeSet<String>) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for path in entries.flatten().map(|e| e.path()) {
        if path.is_dir() {
            collect_paragraphs(&path, found);
        } else if path.extension().is_some_and(|e| e == "rs") {
            let Ok(source) = std::fs::read_to_string(&path) else { continue };
            let mut paragraph = String::new();
            for line in source.lines().map(str::trim).chain([""]) {
                match line.strip_prefix("/// ") {
                    Some(text) if !text.starts_with(['#', '`', '|', '-', '*']) && !text.is_empty() => {
                        if !paragraph.is_empty() {
                            paragraph.push(' ');
                        }
                        paragraph.push_str(text);
                    }
                    _ => {
                        if (60..=200).contains(&paragraph.len()) {
                            found.insert(std::mem::take(&mut paragraph));
                        }
                        paragraph.clear();
                    }
                }
            }
        }
    }
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

fn normalized(mut v: Vec<f32>) -> Vec<f32> {
    let norm = dot(&v, &v).sqrt();
    v.iter_mut().for_each(|x| *x /= norm);
    v
}

/// The `NEIGHBOURS` nearest other base vectors of each base vector.
fn nearest_neighbours(base: &[Vec<f32>]) -> Vec<Vec<usize>> {
    base.iter()
        .enumerate()
        .map(|(i, v)| {
            let mut scored: Vec<(f32, usize)> =
                base.iter().enumerate().filter(|(j, _)| *j != i).map(|(j, w)| (dot(v, w), j)).collect();
            scored.select_nth_unstable_by(NEIGHBOURS, |a, b| b.0.total_cmp(&a.0));
            scored[..NEIGHBOURS].iter().map(|(_, j)| *j).collect()
        })
        .collect()
}

/// Vector `j` of the collection: a base embedding on the first pass, then a point between
/// a base embedding and one of its neighbours, with noise.
fn synthetic(j: usize, base: &[Vec<f32>], neighbours: &[Vec<usize>]) -> Vec<f32> {
    let i = j % base.len();
    if j < base.len() {
        return base[i].clone();
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(j as u64);
    let n = neighbours[i][rng.random_range(0..NEIGHBOURS)];
    let t: f32 = rng.random_range(0.0..0.5);
    normalized(
        base[i]
            .iter()
            .zip(&base[n])
            .map(|(a, b)| {
                // Box–Muller: a normal sample from two uniform ones.
                let (u1, u2): (f32, f32) = (rng.random_range(f32::EPSILON..1.0), rng.random());
                let noise = (-2.0 * u1.ln()).sqrt() * (std::f32::consts::TAU * u2).cos();
                (1.0 - t) * a + t * b + 0.01 * noise
            })
            .collect(),
    )
}

fn owner_of(j: usize) -> usize {
    (j.wrapping_mul(2_654_435_761) >> 8) % OWNERS
}

/// A Milvus Lite server of the benchmark's own, on a data directory that outlives restarts.
struct MilvusLite {
    binary: PathBuf,
    data: PathBuf,
    port: u16,
    child: Child,
}

impl MilvusLite {
    async fn start(binary: &Path, data: &Path) -> Self {
        let port = support::free_port();
        let child = Command::new(binary)
            .args(["server", "--data-dir"])
            .arg(data)
            .args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let server = Self { binary: binary.to_owned(), data: data.to_owned(), port, child };
        let deadline = Instant::now() + Duration::from_secs(120);
        while tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_err() {
            assert!(Instant::now() < deadline, "Milvus Lite did not listen on {port}");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        server
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Resident memory of the server process, in bytes.
    fn rss(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        let kib = status.lines().find_map(|l| l.strip_prefix("VmRSS:")).unwrap();
        kib.trim().trim_end_matches("kB").trim().parse::<u64>().unwrap() * 1024
    }

    async fn stop(mut self) {
        self.stop_now().await;
    }

    async fn stop_now(&mut self) {
        // SIGTERM lets it close its files; it has flushed everything already.
        let _ = Command::new("kill").arg(self.child.id().to_string()).status();
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.child.try_wait().unwrap().is_none() {
            if Instant::now() > deadline {
                let _ = self.child.kill();
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn restart(mut self) -> Self {
        let (binary, data) = (self.binary.clone(), self.data.clone());
        self.stop_now().await;
        Self::start(&binary, &data).await
    }
}

impl Drop for MilvusLite {
    /// A panicking benchmark leaves no server behind.
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Bytes of the files of `collection`'s vector index on disk (Milvus Lite keeps one index
/// file per sealed segment and field).
fn vector_index_bytes(data: &Path, collection: &str) -> u64 {
    fn walk(dir: &Path, total: &mut u64) {
        for path in std::fs::read_dir(dir).into_iter().flatten().flatten().map(|e| e.path()) {
            if path.is_dir() {
                walk(&path, total);
            } else if path.to_string_lossy().contains(".embedding.") {
                *total += path.metadata().map_or(0, |m| m.len());
            }
        }
    }
    let mut total = 0;
    walk(&data.join("collections").join(collection), &mut total);
    total
}

fn settings(url: &str, collection: &str, index: IndexKind) -> MilvusSettings {
    let mut settings = support::milvus_settings(collection);
    settings.milvus_url = url.to_owned();
    settings.milvus_index = index;
    settings
}

struct Row {
    size: usize,
    index: &'static str,
    build_s: f64,
    memory_mb: f64,
    disk_bytes_per_vector: f64,
    p50: f64,
    p99: f64,
    recall: f64,
    exact_p50: f64,
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let Ok(binary) = std::env::var("PARLEY_MILVUS_LITE") else {
        eprintln!(
            "skipped: PARLEY_MILVUS_LITE (the milvus-lite executable) is not set; run infra/bench.sh vector_indexes"
        );
        return;
    };
    let model_dir = std::env::var("PARLEY_EMBEDDING_MODEL_DIR").expect("PARLEY_EMBEDDING_MODEL_DIR");
    let model = MiniLm::load(Path::new(&model_dir)).unwrap();
    let sizes: Vec<usize> = std::env::var("PARLEY_BENCH_INDEX_SIZES")
        .unwrap_or_else(|_| "100000,1000000".into())
        .split(',')
        .map(|s| s.trim().parse().expect("PARLEY_BENCH_INDEX_SIZES: comma-separated counts"))
        .collect();
    let base_count = env_usize("PARLEY_BENCH_INDEX_BASE", 5_000);

    let started = Instant::now();
    let mut texts = paragraphs(base_count + QUERIES);
    let mut question_texts = texts.split_off(base_count);
    // Batches of similar lengths pad less (the selection itself is already by hash).
    texts.sort_by_key(String::len);
    question_texts.sort_by_key(String::len);
    let mut base = Vec::with_capacity(base_count);
    for group in texts.chunks(32) {
        base.extend(model.embed(group).await.unwrap());
    }
    let mut questions = Vec::with_capacity(QUERIES);
    for group in question_texts.chunks(32) {
        questions.extend(model.embed(group).await.unwrap());
    }
    println!(
        "{base_count} doc paragraphs and {QUERIES} held-out questions embedded in {:.0} s",
        started.elapsed().as_secs_f64()
    );
    let started = Instant::now();
    let neighbours = nearest_neighbours(&base);
    println!("their {NEIGHBOURS} nearest neighbours found in {:.0} s", started.elapsed().as_secs_f64());

    let scratch = tempfile::tempdir().unwrap();
    let empty = MilvusLite::start(Path::new(&binary), &scratch.path().join("empty")).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let idle_rss = empty.rss();
    empty.stop().await;
    println!("an idle Milvus Lite holds {:.0} MB", idle_rss as f64 / 1e6);

    let mut rows = Vec::new();
    for &size in &sizes {
        let data = scratch.path().join(format!("milvus-{size}"));
        let mut server = MilvusLite::start(Path::new(&binary), &data).await;
        let collection = "bench_indexes";
        let store =
            VectorStore::open(&settings(&server.url(), collection, IndexKind::Flat), DIMENSION, "all-MiniLM-L6-v2")
                .await
                .unwrap();
        let started = Instant::now();
        let mut vectors: Vec<Vec<f32>> = Vec::with_capacity(size);
        let batch = 1_000;
        for first in (0..size).step_by(batch) {
            let records: Vec<VectorRecord> = (first..(first + batch).min(size))
                .map(|j| {
                    let embedding = synthetic(j, &base, &neighbours);
                    vectors.push(embedding.clone());
                    VectorRecord {
                        id: format!("v{j}"),
                        owner: format!("owner-{}", owner_of(j)).parse().unwrap(),
                        kind: SourceKind::Document,
                        source_id: uuid::Uuid::from_u128((j / 10) as u128).into(),
                        source_event_id: uuid::Uuid::from_u128(j as u128).into(),
                        position: (j % 10) as i64,
                        label: "bench".into(),
                        text: texts[j % base_count].clone(),
                        embedding,
                    }
                })
                .collect();
            store.upsert(&records).await.unwrap();
            if (first + batch) % 100_000 == 0 {
                eprintln!("  {} vectors inserted after {:.0} s", first + batch, started.elapsed().as_secs_f64());
            }
        }
        store.flush().await.unwrap();
        println!("{size} vectors of {OWNERS} owners inserted and flushed in {:.0} s", started.elapsed().as_secs_f64());
        drop(store);

        for (index, name) in INDEXES {
            let index_settings = settings(&server.url(), collection, index);
            let store = VectorStore::open(&index_settings, DIMENSION, "all-MiniLM-L6-v2").await.unwrap();
            let started = Instant::now();
            store.rebuild_vector_index(&index_settings, Duration::from_secs(4 * 3600)).await.unwrap();
            let build_s = started.elapsed().as_secs_f64();
            drop(store);
            let disk = vector_index_bytes(&data, collection);
            // A fresh process: the memory is what loading this index takes, nothing left over.
            server = server.restart().await;
            let index_settings = settings(&server.url(), collection, index);
            let store = VectorStore::open(&index_settings, DIMENSION, "all-MiniLM-L6-v2").await.unwrap();
            let (mut milvus_ms, mut exact_ms, mut recall_sum) = (Vec::new(), Vec::new(), 0.0);
            for (q, question) in questions.iter().enumerate() {
                let owner = q % OWNERS;
                let filter = SearchFilter::owner(format!("owner-{owner}").parse().unwrap());
                let started = Instant::now();
                let hits = store.search_vectors(question.clone(), &filter, 10).await.unwrap();
                milvus_ms.push(started.elapsed().as_secs_f64() * 1000.0);
                let started = Instant::now();
                let owned = vectors.iter().enumerate().filter(|(j, _)| owner_of(*j) == owner);
                let exact = support::exact_top_k(owned.map(|(j, v)| (j, v.as_slice())), question, 10);
                exact_ms.push(started.elapsed().as_secs_f64() * 1000.0);
                let ids: Vec<usize> = hits.iter().map(|h| h.id.trim_start_matches('v').parse().unwrap()).collect();
                assert!(ids.iter().all(|&j| owner_of(j) == owner), "a hit of another owner");
                recall_sum += exact.iter().filter(|j| ids.contains(j)).count() as f64 / 10.0;
            }
            let memory = server.rss().saturating_sub(idle_rss);
            drop(store);
            milvus_ms.sort_by(f64::total_cmp);
            exact_ms.sort_by(f64::total_cmp);
            let row = Row {
                size,
                index: name,
                build_s,
                memory_mb: memory as f64 / 1e6,
                disk_bytes_per_vector: disk as f64 / size as f64,
                p50: support::percentile(&milvus_ms, 50.0),
                p99: support::percentile(&milvus_ms, 99.0),
                recall: recall_sum / QUERIES as f64,
                exact_p50: support::percentile(&exact_ms, 50.0),
            };
            println!(
                "  {:>9} {:<32} build+load {:6.1} s, memory {:6.0} MB, index on disk {:6.0} B/vector, \
                 search p50 {:7.2} ms p99 {:7.2} ms, recall@10 {:.3} (exact scan in process p50 {:.2} ms)",
                row.size,
                row.index,
                row.build_s,
                row.memory_mb,
                row.disk_bytes_per_vector,
                row.p50,
                row.p99,
                row.recall,
                row.exact_p50
            );
            if index == IndexKind::Flat {
                assert!(row.recall >= 0.99, "exact search in Milvus disagrees with exact search here: {}", row.recall);
            }
            rows.push(row);
        }
        server.stop().await;
    }

    println!("\n| vectors | index | recall@10 | p50 ms | p99 ms | build+load s | memory MB | index B/vector |");
    println!("|---:|---|---:|---:|---:|---:|---:|---:|");
    for r in &rows {
        println!(
            "| {} | {} | {:.3} | {:.1} | {:.1} | {:.1} | {:.0} | {:.0} |",
            r.size, r.index, r.recall, r.p50, r.p99, r.build_s, r.memory_mb, r.disk_bytes_per_vector
        );
    }
    if let (Some(&small), Some(&large)) = (sizes.first(), sizes.last())
        && small != large
    {
        println!("\ngrowth from {small} to {large} vectors ({:.0}×):", large as f64 / small as f64);
        for (_, name) in INDEXES {
            let at = |size: usize| rows.iter().find(|r| r.size == size && r.index == name).unwrap();
            let (a, b) = (at(small), at(large));
            println!(
                "  {name:<32} p50 ×{:.1}, build ×{:.1}, memory ×{:.1}, recall {:.3} → {:.3}",
                b.p50 / a.p50,
                b.build_s / a.build_s,
                b.memory_mb / a.memory_mb.max(1.0),
                a.recall,
                b.recall
            );
        }
    }
}
