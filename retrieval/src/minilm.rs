//! all-MiniLM-L6-v2 in-process with candle: BERT forward pass, mean pooling over the
//! attention mask, L2 normalisation (what sentence-transformers does for this model).

use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::bert::{BertModel, Config};
use futures::FutureExt;
use futures::future::BoxFuture;
use tokenizers::{PaddingParams, Tokenizer, TruncationParams};

use crate::backend::EmbeddingBackend;
use crate::error::RetrievalError;

/// The model's own limit (sentence_bert_config.json: max_seq_length); longer text is cut.
const MAX_TOKENS: usize = 256;
const MODEL_NAME: &str = "all-MiniLM-L6-v2";

/// all-MiniLM-L6-v2 run in-process on the CPU (candle).
#[derive(Clone)]
pub struct MiniLm {
    inner: Arc<Inner>,
}

struct Inner {
    model: BertModel,
    tokenizer: Tokenizer,
    dimension: usize,
    /// One thread for what someone waits on. candle's matrix products run on the rayon
    /// pool they are called in; split over threads they join after every product, and on
    /// cores busy with the model server each join waits for a preempted thread: questions
    /// took 41 ms at p50 that way beside llama.cpp, against 17 ms on one thread of their own.
    foreground: rayon::ThreadPool,
    /// Threads at the lowest CPU priority for indexing (the whole forward pass runs there).
    background: rayon::ThreadPool,
}

/// The nice value of the background threads: against a thread of normal priority the
/// kernel gives one about 10 % of a core (weight 110 against 1024), so a question's
/// embedding still comes first while indexing keeps moving under a sustained crowd. At 19
/// (1.5 %) a restarted embedder behind the model server's two busy threads had not indexed
/// a new message 180 s later.
const BACKGROUND_NICE: i32 = 10;

impl std::fmt::Debug for MiniLm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MiniLm").field("dimension", &self.inner.dimension).finish_non_exhaustive()
    }
}

impl MiniLm {
    /// Loads config.json, tokenizer.json and model.safetensors from `dir` (no network).
    pub fn load(dir: &Path) -> Result<Self, RetrievalError> {
        let fail = |reason: String| RetrievalError::ModelLoad { dir: dir.display().to_string(), reason };
        let read = |name: &str| std::fs::read(dir.join(name)).map_err(|e| fail(format!("{name}: {e}")));
        let config: Config = serde_json::from_slice(&read("config.json")?).map_err(|e| fail(e.to_string()))?;
        let dimension: usize = serde_json::from_slice::<serde_json::Value>(&read("config.json")?)
            .ok()
            .and_then(|c| c.get("hidden_size")?.as_u64())
            .and_then(|d| usize::try_from(d).ok())
            .ok_or_else(|| fail("config.json has no hidden_size".into()))?;
        let mut tokenizer = Tokenizer::from_bytes(read("tokenizer.json")?).map_err(|e| fail(e.to_string()))?;
        tokenizer.with_padding(Some(PaddingParams::default()));
        tokenizer
            .with_truncation(Some(TruncationParams { max_length: MAX_TOKENS, ..Default::default() }))
            .map_err(|e| fail(e.to_string()))?;
        let weights = VarBuilder::from_buffered_safetensors(read("model.safetensors")?, DType::F32, &Device::Cpu)
            .map_err(|e| fail(e.to_string()))?;
        let model = BertModel::load(weights, &config).map_err(|e| fail(e.to_string()))?;
        let pool = |threads: usize, name: &'static str, nice: i32| {
            rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .thread_name(move |index| format!("{name}-{index}"))
                .start_handler(move |_| {
                    // On Linux a priority belongs to a thread: this one only (none: the caller's).
                    if nice != 0
                        && let Err(error) = rustix::process::setpriority_process(None, nice)
                    {
                        tracing::warn!(%error, "background embedding runs at normal priority");
                    }
                })
                .build()
                .map_err(|e| fail(e.to_string()))
        };
        let foreground = pool(1, "embed-fg", 0)?;
        let background = pool(candle_core::utils::get_num_threads(), "embed-bg", BACKGROUND_NICE)?;
        Ok(Self { inner: Arc::new(Inner { model, tokenizer, dimension, foreground, background }) })
    }

    /// Embeds `texts` on the calling thread (CPU-bound; call from a blocking context).
    pub fn embed_blocking(&self, texts: &[String]) -> Result<Vec<Vec<f32>>, RetrievalError> {
        if texts.is_empty() {
            return Ok(vec![]);
        }
        let fail = |e: candle_core::Error| RetrievalError::Embedding(e.to_string());
        let encodings = self
            .inner
            .tokenizer
            .encode_batch(texts.to_vec(), true)
            .map_err(|e| RetrievalError::Embedding(e.to_string()))?;
        let stack = |field: fn(&tokenizers::Encoding) -> &[u32]| -> Result<Tensor, RetrievalError> {
            let rows = encodings.iter().map(|e| Tensor::new(field(e), &Device::Cpu)).collect::<Result<Vec<_>, _>>();
            Tensor::stack(&rows.map_err(fail)?, 0).map_err(fail)
        };
        let ids = stack(tokenizers::Encoding::get_ids)?;
        let mask = stack(tokenizers::Encoding::get_attention_mask)?;
        let token_types = ids.zeros_like().map_err(fail)?;
        let hidden = self.inner.model.forward(&ids, &token_types, Some(&mask)).map_err(fail)?;
        // Mean over the real tokens only: padding must not pull short texts towards zero.
        let mask = mask.to_dtype(DType::F32).and_then(|m| m.unsqueeze(2)).map_err(fail)?;
        let summed = hidden.broadcast_mul(&mask).and_then(|h| h.sum(1)).map_err(fail)?;
        let mean = summed.broadcast_div(&mask.sum(1).map_err(fail)?).map_err(fail)?;
        let norm = mean.sqr().and_then(|s| s.sum_keepdim(1)).and_then(|s| s.sqrt()).map_err(fail)?;
        mean.broadcast_div(&norm).and_then(|v| v.to_vec2::<f32>()).map_err(fail)
    }

    /// Embeds `texts` on a thread of `pool`, which the whole forward pass then runs in.
    fn embed_in<'a>(
        &self,
        pool: &rayon::ThreadPool,
        texts: &'a [String],
    ) -> BoxFuture<'a, Result<Vec<Vec<f32>>, RetrievalError>> {
        let (model, texts) = (self.clone(), texts.to_vec());
        let (sender, vectors) = tokio::sync::oneshot::channel();
        pool.spawn(move || {
            let _ = sender.send(model.embed_blocking(&texts));
        });
        async move { vectors.await.map_err(|e| RetrievalError::Embedding(e.to_string()))? }.boxed()
    }
}

impl EmbeddingBackend for MiniLm {
    fn model(&self) -> &str {
        MODEL_NAME
    }

    fn dimension(&self) -> usize {
        self.inner.dimension
    }

    fn embed<'a>(&'a self, texts: &'a [String]) -> BoxFuture<'a, Result<Vec<Vec<f32>>, RetrievalError>> {
        self.embed_in(&self.inner.foreground, texts)
    }

    fn embed_in_background<'a>(&'a self, texts: &'a [String]) -> BoxFuture<'a, Result<Vec<Vec<f32>>, RetrievalError>> {
        self.embed_in(&self.inner.background, texts)
    }
}
