//! Document ingestion, the throughput-first command path of the knowledge base.
//!
//! - [`document`]: a submission checked and turned into a DocumentSubmitted event (pure);
//! - [`files`]: the documents of files and folders given on the command line;
//! - [`submit`]: appending many documents with a pipelined idempotent producer.

#![warn(missing_docs)]

pub mod document;
pub mod files;
pub mod submit;

pub use document::{MAX_DOCUMENT_BYTES, Submission, SubmissionError};
