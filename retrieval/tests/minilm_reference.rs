//! The in-process all-MiniLM-L6-v2 must agree with the reference implementation: vectors in
//! tests/data/minilm_reference.json were computed once with sentence-transformers (see its
//! `computed_with`). Needs PARLEY_EMBEDDING_MODEL_DIR (set by infra/lib.sh).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;

use parley_retrieval::EmbeddingBackend;
use parley_retrieval::minilm::MiniLm;

fn model_dir() -> Option<PathBuf> {
    match std::env::var("PARLEY_EMBEDDING_MODEL_DIR") {
        Ok(dir) => Some(dir.into()),
        Err(_) if std::env::var("PARLEY_REQUIRE_STACK").is_ok_and(|v| v == "1") => {
            panic!("PARLEY_REQUIRE_STACK=1 but PARLEY_EMBEDDING_MODEL_DIR is not set")
        }
        Err(_) => {
            eprintln!("skipped: PARLEY_EMBEDDING_MODEL_DIR not set (infra/install.sh installs the model)");
            None
        }
    }
}

#[derive(serde::Deserialize)]
struct Reference {
    vectors: Vec<ReferenceVector>,
}

#[derive(serde::Deserialize)]
struct ReferenceVector {
    text: String,
    embedding: Vec<f32>,
}

fn cosine(a: &[f32], b: &[f32]) -> f32 {
    let dot: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let norm = |v: &[f32]| v.iter().map(|x| x * x).sum::<f32>().sqrt();
    dot / (norm(a) * norm(b))
}

#[tokio::test(flavor = "multi_thread")]
async fn embeddings_match_the_sentence_transformers_reference() {
    let Some(dir) = model_dir() else { return };
    let model = MiniLm::load(&dir).unwrap();
    assert_eq!(model.dimension(), 384);
    let reference: Reference =
        serde_json::from_str(include_str!("data/minilm_reference.json")).expect("reference vectors");
    let texts: Vec<String> = reference.vectors.iter().map(|v| v.text.clone()).collect();
    // Batched together, so padding of the shorter sentence is exercised too.
    let vectors = model.embed(&texts).await.unwrap();
    for (reference, vector) in reference.vectors.iter().zip(&vectors) {
        let similarity = cosine(&reference.embedding, vector);
        assert!(similarity > 0.999, "{:?}: cosine {similarity}", reference.text);
        let norm = vector.iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-4, "unit length, got {norm}");
    }
    assert!(cosine(&vectors[0], &vectors[1]) < 0.5, "different sentences stay apart");
    // Indexing runs on threads of lower priority, with the same model.
    let (background, nice) = {
        let vectors = model.embed_in_background(&texts).await.unwrap();
        (vectors, background_thread_nice())
    };
    assert_eq!(background, vectors, "the same vectors in the background");
    assert_eq!(nice, Some(10), "the background threads are niced");
}

/// The nice value of this process's `embed-bg-0` thread (a name the kernel keeps whole: 15 bytes at most) (field 19 of its stat).
fn background_thread_nice() -> Option<i64> {
    std::fs::read_dir("/proc/self/task").ok()?.flatten().find_map(|task| {
        let name = std::fs::read_to_string(task.path().join("comm")).ok()?;
        if name.trim() != "embed-bg-0" {
            return None;
        }
        let stat = std::fs::read_to_string(task.path().join("stat")).ok()?;
        stat.rsplit(')').next()?.split_whitespace().nth(16)?.parse().ok()
    })
}

#[test]
fn a_missing_model_folder_is_a_clear_error() {
    let err = MiniLm::load(std::path::Path::new("/nonexistent/minilm")).unwrap_err();
    assert!(err.to_string().contains("/nonexistent/minilm") && err.to_string().contains("config.json"), "{err}");
}
