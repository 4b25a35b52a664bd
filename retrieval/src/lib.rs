//! Retrieval for Parley: turning text into vectors and finding the nearest ones.
//!
//! - [`backend`]: the [`EmbeddingBackend`] trait; [`embedding`]: the options choosing one of the two backends
//!   ([`minilm`], in-process by default; [`openai`], any `/v1/embeddings` endpoint);
//! - [`filter`]: search filters as Milvus boolean expressions (pure, escaped);
//! - [`store`]: the Milvus collection the embedder writes and searches read (vectors and BM25 keywords);
//! - [`fusion`]: hybrid ranking, the two searches' lists fused by reciprocal rank (pure);
//! - [`queue`]: one embedding worker per process, questions batched and served before bulk work;
//! - [`retriever`]: embedding a query and searching, for the search API and inference.
#![warn(missing_docs)]

pub mod backend;
pub mod embedding;
/// The retrieval errors.
pub mod error;
pub mod filter;
pub mod fusion;
pub mod minilm;
pub mod openai;
pub mod queue;
pub mod retriever;
pub mod store;

pub use backend::EmbeddingBackend;
pub use embedding::EmbeddingSettings;
pub use error::RetrievalError;
pub use filter::{SearchFilter, SourceKind};
pub use fusion::SearchMode;
pub use queue::Embedders;
pub use retriever::Retriever;
pub use store::{Hit, MilvusSettings, StoredDocument, VectorRecord, VectorStore};
