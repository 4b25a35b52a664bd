//! Kafka plumbing shared by Parley's services.
//!
//! - [`settings`]: broker and topic options (clap, each with an env fallback);
//! - [`topics`]: the topics Parley owns, with explicit partitions and configs;
//! - [`position`]: log positions handed to clients as consistency tokens;
//! - [`producer`]: the idempotent producer that appends events keyed by conversation;
//! - [`dead_letter`]: the record a consumer writes when it must give up on a message;
//! - [`registry_wait`]: retrying decodes through schema-registry outages;
//! - [`transaction`]: consume-transform-produce loops that commit output and offsets together.

pub mod dead_letter;
pub mod error;
pub mod position;
pub mod producer;
pub mod registry_wait;
pub mod settings;
pub mod topics;
pub mod trace;
pub mod transaction;

pub use error::EventLogError;
pub use position::LogPosition;
pub use producer::EventProducer;
pub use settings::{KafkaSettings, Topics};
