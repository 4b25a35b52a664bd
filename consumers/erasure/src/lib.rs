//! The right to erasure over an immutable log. A request is an event
//! ([`ErasureRequested`](parley_events::ErasureRequested), on the `erasures` topic, no
//! personal data in it); one worker ([`worker::run`]) destroys the person's data key, so
//! everything sealed under it in the log, the projection, the dead letters and any backup
//! opens nowhere, purges their copies (CQL rows, cached answers, budget and tier rows,
//! vectors and chunks in Milvus) and appends an
//! [`ErasureCompleted`](parley_events::ErasureCompleted) with what it purged where, in the
//! transaction that commits its offset. Each step is idempotent, so a worker restarted half
//! way through an erasure finishes it.
//!
//! - [`request`]: asking for an erasure and waiting for its completion (`parley erase`,
//!   `DELETE /api/me`);
//! - [`worker`]: the consumer that carries erasures out;
//! - [`watch`]: every other process's part: forget a person's key held in memory as soon as
//!   they are erased.
#![warn(missing_docs)]

pub mod request;
pub mod watch;
pub mod worker;

use parley_eventlog::EventLogError;
use parley_events::EventsError;
use parley_projections::ProjectionError;
use parley_retrieval::RetrievalError;
use thiserror::Error;

/// What can stop an erasure service.
#[derive(Debug, Error)]
pub enum ErasureError {
    /// The event log failed.
    #[error(transparent)]
    EventLog(#[from] EventLogError),
    /// Kafka refused.
    #[error(transparent)]
    Kafka(#[from] rdkafka::error::KafkaError),
    /// An event could not be encoded or decoded.
    #[error(transparent)]
    Events(#[from] EventsError),
    /// The CQL store or the key store failed.
    #[error(transparent)]
    Projection(#[from] ProjectionError),
    /// The vector store failed.
    #[error(transparent)]
    Retrieval(#[from] RetrievalError),
}
