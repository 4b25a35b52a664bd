//! Records consumers gave up on and the decisions on them (the `dead-letter` topic).

use serde::{Deserialize, Serialize};

use super::AvroEvent;

/// A record a consumer could not process, with the original bytes, so nothing is silently
/// dropped.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeadLetter {
    /// Topic of the record given up on.
    pub source_topic: String,
    /// Its partition.
    pub source_partition: i32,
    /// Its offset.
    pub source_offset: i64,
    /// Its key, as written.
    #[serde(with = "serde_bytes")]
    pub key: Option<Vec<u8>>,
    /// Its value, as written (the bytes that did not decode).
    #[serde(with = "serde_bytes")]
    pub payload: Option<Vec<u8>>,
    /// Consumer group that gave up.
    pub consumer: String,
    /// Why the consumer gave up on it.
    pub error: String,
    /// When (ms since the epoch).
    pub failed_at: i64,
    /// Since v2: the record's text headers (a redrive writes them back).
    #[serde(default)]
    pub headers: std::collections::HashMap<String, String>,
}

impl AvroEvent for DeadLetter {
    const FULL_NAME: &'static str = "io.parley.events.DeadLetter";
}

/// An operator's decision on a dead letter (see `dead_letters` for what it means).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeadLetterResolved {
    /// The letter's position in the dead-letter topic.
    pub letter_partition: i32,
    /// Offset of the letter in the dead-letter topic.
    pub letter_offset: i64,
    /// Consumer group of the letter.
    pub consumer: String,
    /// Topic of the record the letter holds.
    pub source_topic: String,
    /// Its partition.
    pub source_partition: i32,
    /// Its offset.
    pub source_offset: i64,
    /// Its key (the key held back until this decision).
    #[serde(with = "serde_bytes")]
    pub key: Option<Vec<u8>>,
    /// [`REDRIVEN`](crate::dead_letters::REDRIVEN) or [`DISCARDED`](crate::dead_letters::DISCARDED).
    pub action: String,
    /// Where the copy was written (source topic and partition, this offset); redriven only.
    pub redriven_offset: Option<i64>,
    /// Who decided (the operator's name).
    pub resolved_by: String,
    /// Why, in the operator's words.
    pub reason: Option<String>,
    /// When (ms since the epoch).
    pub resolved_at: i64,
}

impl AvroEvent for DeadLetterResolved {
    const FULL_NAME: &'static str = "io.parley.events.DeadLetterResolved";
}

/// A record of the `dead-letter` topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeadLetterRecord {
    /// A record a consumer gave up on.
    Letter(DeadLetter),
    /// An operator's decision on a letter.
    Resolved(DeadLetterResolved),
}
