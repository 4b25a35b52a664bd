use thiserror::Error;

/// Everything that can go wrong embedding or searching.
#[derive(Debug, Error)]
pub enum RetrievalError {
    /// The embedding model's files could not be loaded.
    #[error("loading the embedding model from {dir}: {reason}")]
    ModelLoad {
        /// Where the model was looked for.
        dir: String,
        /// What failed.
        reason: String,
    },
    /// The model could not embed the text.
    #[error("embedding failed: {0}")]
    Embedding(String),
    /// The embedding service refused or did not answer.
    #[error("embedding service: {0}")]
    EmbeddingService(String),
    /// Milvus refused or did not answer.
    #[error("milvus: {0}")]
    Milvus(String),
    /// A row the vector store returned that Parley could not have written (a bad id).
    #[error("the vector store holds {0}")]
    Corrupt(String),
    /// The collection was built with another model.
    #[error(
        "collection {collection} stores {collection_dimension}-dimensional vectors but the embedding model \
         {model} produces {backend_dimension}; use another --milvus-collection or the model the collection was built with"
    )]
    DimensionMismatch {
        /// The collection.
        collection: String,
        /// The length of its vectors.
        collection_dimension: usize,
        /// The length of the model's.
        backend_dimension: usize,
        /// The model.
        model: String,
    },
}

impl From<milvus::v2::error::Error> for RetrievalError {
    fn from(error: milvus::v2::error::Error) -> Self {
        Self::Milvus(error.to_string())
    }
}
