//! The embedder: a consumer of conversation events and submitted documents that embeds
//! messages and document chunks in batches and upserts them into Milvus.
//!
//! - [`chunking`]: splitting documents into overlapping chunks (pure);
//! - [`sources`]: what to embed for each event, with deterministic vector ids (pure);
//! - [`service`]: the batch loop: decode, embed, upsert, then commit EmbeddingsIndexed and
//!   offsets in one Kafka transaction.

#![warn(missing_docs)]

pub mod chunking;
pub mod service;
pub mod sources;

pub use service::{CqlStores, EmbedderArgs, EmbedderError, run};
