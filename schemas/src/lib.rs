//! Parley's event contract.
//!
//! The `.avsc` files in `schemas/avro/` are the source of truth; this crate compiles them in
//! ([`catalog`]), mirrors them as typed Rust events ([`event`]), encodes and decodes them in
//! the Confluent wire format through a schema registry ([`codec`]) and checks schema
//! evolution against the registry ([`registry`]). [`conversation`], [`turn`],
//! [`invariants`], [`budget`], [`lanes`], [`dead_letters`] and [`trail`] (one person's
//! trail for `parley audit --user`), [`experiment`] (a batch of what-if re-runs folded per model) are the domain rules over those events, as plain
//! functions;
//! [`fuzzing`] is what the property tests share to fuzz the parsers; [`sealing`] seals a
//! person's content under their data key (crypto-shredding), [`personal`] says which
//! fields of which event hold it.
#![warn(missing_docs)]

pub mod budget;
pub mod catalog;
pub mod codec;
pub mod conversation;
pub mod dead_letters;
/// The contract's errors.
pub mod error;
pub mod event;
pub mod experiment;
pub mod fuzzing;
pub mod ids;
pub mod invariants;
pub mod lanes;
pub mod personal;
/// Where a record sits in the log.
pub mod position;
pub mod registry;
pub mod sealing;
#[cfg(test)]
mod test_events;
pub mod trail;
pub mod turn;

pub use catalog::{SchemaCatalog, SchemaEntry};
pub use codec::{Decoded, EventCodec};
pub use error::EventsError;
pub use event::*;
pub use experiment::{ExperimentEvent, ExperimentMessage, ExperimentRequested, ExperimentRun};
pub use ids::{ConversationId, DocumentId, EventId, InvalidId, UserId};
