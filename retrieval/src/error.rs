use thiserror::Error;

#[derive(Debug, Error)]
pub enum RetrievalError {
    #[error("loading the embedding model from {dir}: {reason}")]
    ModelLoad { dir: String, reason: String },
    #[error("embedding failed: {0}")]
    Embedding(String),
    #[error("embedding service: {0}")]
    EmbeddingService(String),
    #[error("milvus: {0}")]
    Milvus(String),
    /// A row the vector store returned that Parley could not have written (a bad id).
    #[error("the vector store holds {0}")]
    Corrupt(String),
    #[error(
        "collection {collection} stores {collection_dimension}-dimensional vectors but the embedding model \
         {model} produces {backend_dimension}; use another --milvus-collection or the model the collection was built with"
    )]
    DimensionMismatch { collection: String, collection_dimension: usize, backend_dimension: usize, model: String },
}

impl From<milvus::v2::error::Error> for RetrievalError {
    fn from(error: milvus::v2::error::Error) -> Self {
        Self::Milvus(error.to_string())
    }
}
