//! Read models of the conversation log in a CQL store.
//!
//! - [`store`]: the CQL schema (one table set per generation), writes and reads;
//! - [`projector`]: the consumer that folds events into the live generation;
//! - [`reader`]: the query side over the live generation, with position waits;
//! - [`rebuild`]: a new generation from offset 0, then an atomic switch;
//! - [`replay`]: a conversation straight from the log (offset index or scan);
//! - [`diff`]: how the projection differs from what the log folds to;
//! - [`as_of`]: a point in a conversation's history (a sequence, a position, a time);
//! - [`budget`]: the token budget ledger (reservations and settlements, conditional batches);
//! - [`tiers`]: each user's tier, the lane of their new conversations;
//! - [`keys`]: each data subject's data key, wrapped (crypto-shredding);
//! - [`erasure`]: a person's rows purged from every table (the erasure worker's CQL half);
//! - [`error`]: this crate's error type.
#![warn(missing_docs)]

pub mod as_of;
pub mod budget;
pub mod diff;
pub mod erasure;
/// The projections' errors.
pub mod error;
pub mod keys;
pub mod projector;
pub mod reader;
pub mod rebuild;
pub mod replay;
pub mod store;
pub mod tiers;

pub use error::ProjectionError;
pub use store::{CqlSettings, Store};
