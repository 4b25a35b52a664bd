//! Text in, best stored chunks and messages out: the embedding backend and the vector
//! store together, as the search API and inference use them.

use std::sync::Arc;

use crate::backend::EmbeddingBackend;
use crate::error::RetrievalError;
use crate::filter::SearchFilter;
use crate::store::{Hit, VectorStore};

/// Embeds a question and searches the store with it.
#[derive(Debug, Clone)]
pub struct Retriever {
    backend: Arc<dyn EmbeddingBackend>,
    store: VectorStore,
}

impl Retriever {
    /// A retriever embedding with `backend`, searching `store`.
    pub fn new(backend: Arc<dyn EmbeddingBackend>, store: VectorStore) -> Self {
        Self { backend, store }
    }

    /// The `limit` stored texts that best answer `text` among those `filter` admits, best
    /// first, by the store's search mode (the question is embedded unless keywords alone
    /// are searched).
    pub async fn search(&self, text: &str, filter: &SearchFilter, limit: usize) -> Result<Vec<Hit>, RetrievalError> {
        let vector = self.embed_question(text).await?;
        self.store.search(text, vector, filter, limit).await
    }

    /// `text`'s embedding as a question, when the store's search mode uses vectors (None
    /// in keyword mode).
    pub async fn embed_question(&self, text: &str) -> Result<Option<Vec<f32>>, RetrievalError> {
        if !self.store.search_mode().uses_vectors() {
            return Ok(None);
        }
        let vector = self
            .backend
            .embed(&[text.to_owned()])
            .await?
            .pop()
            .ok_or_else(|| RetrievalError::Embedding("the backend returned no vector".into()))?;
        Ok(Some(vector))
    }

    /// The vector store it searches.
    pub fn store(&self) -> &VectorStore {
        &self.store
    }
}
