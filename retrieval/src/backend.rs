//! One trait for every embedding backend: texts in, unit vectors of a fixed dimension out.

use futures::future::BoxFuture;

use crate::error::RetrievalError;

/// Turns texts into vectors of a fixed dimension.
pub trait EmbeddingBackend: Send + Sync + std::fmt::Debug {
    /// Model name, recorded in EmbeddingsIndexed.
    fn model(&self) -> &str;
    /// Length of every vector this backend returns; the collection's dimension.
    fn dimension(&self) -> usize;
    /// One vector per text, in order. Vectors are unit length, so inner product is cosine.
    fn embed<'a>(&'a self, texts: &'a [String]) -> BoxFuture<'a, Result<Vec<Vec<f32>>, RetrievalError>>;
    /// Like [`EmbeddingBackend::embed`], for work nobody waits on (indexing): a backend
    /// that computes on this machine's CPU does it at the lowest priority, so it takes
    /// only what the model server and the questions leave.
    fn embed_in_background<'a>(&'a self, texts: &'a [String]) -> BoxFuture<'a, Result<Vec<Vec<f32>>, RetrievalError>> {
        self.embed(texts)
    }
}
