//! Kafka plumbing shared by Parley's services.
//!
//! - [`settings`]: broker and topic options (clap, each with an env fallback);
//! - [`topics`]: the topics Parley owns, with explicit partitions and configs;
//! - [`partitioner`]: the partition a key lands on, computed like the producers do;
//! - [`producer`]: the idempotent producer that appends events keyed by conversation;
//! - [`consumer`]: the one consumer builder (committed records, no auto commit, quiet EOF);
//! - [`dead_letter`]: the record a consumer writes when it must give up on a message;
//! - [`registry_wait`]: retrying decodes through schema-registry outages;
//! - [`driver`]: the one consume-transform-produce driver (continuous, one per key, commit rule),
//!   and [`driver::EventHandler`], a whole consumer made of one function;
//! - [`shutdown`]: the token SIGINT and SIGTERM cancel;
//! - [`lanes`]: how a driver ranks its partitions' work (priority lanes, weights, a kept slot);
//! - [`transaction`]: the transactional producer that commits output and offsets together.

#![warn(missing_docs)]

pub mod consumer;
pub mod dead_letter;
pub mod driver;
/// What goes wrong in Kafka plumbing.
pub mod error;
pub mod lanes;
/// Inference instances' queue ages, published for gateways to shed load by.
pub mod load;
pub mod metrics;
pub mod partitioner;
/// The idempotent producer that appends events keyed by conversation.
pub mod producer;
pub mod registry_wait;
/// Secrets from the environment or an owner-only file.
pub mod secret;
/// Broker and topic options.
pub mod settings;
pub mod shutdown;
pub mod topics;
pub mod trace;
pub mod transaction;

pub use error::EventLogError;
/// Log positions (handed to clients as consistency tokens) are part of the contract.
pub use parley_events::position::LogPosition;
pub use producer::EventProducer;
pub use settings::{KafkaSettings, Topics};
