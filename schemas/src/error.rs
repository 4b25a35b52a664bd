use thiserror::Error;

/// Everything that can go wrong with Parley's event contract.
#[derive(Debug, Error)]
pub enum EventsError {
    /// A schema file of the catalog is badly named or not a valid schema.
    #[error("schema file {file}: {reason}")]
    SchemaFile {
        /// The file.
        file: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The catalog has no schema of that name.
    #[error("no schema for event type {0} in the catalog")]
    UnknownEventType(String),
    /// The bytes do not start with the Confluent header.
    #[error("message is not in the Confluent wire format (magic byte 0 + 4-byte schema id): {0}")]
    NotWireFormat(String),
    /// The registry did not answer or refused: trying again later may succeed.
    #[error("schema registry: {0}")]
    Registry(String),
    /// The bytes are not a valid event (a poison record: dead-letter it).
    #[error("could not decode event (schema id {schema_id:?}): {reason}")]
    Undecodable {
        /// The writer's schema id, when the header had one.
        schema_id: Option<u32>,
        /// Why (a bad id, a truncated body, a type that does not resolve…).
        reason: String,
    },
    /// The event does not fit its schema.
    #[error("could not encode {event_type}: {reason}")]
    Unencodable {
        /// The event's full name.
        event_type: String,
        /// Why.
        reason: String,
    },
    /// Text that is not `<topic>/<partition>/<offset>`.
    #[error("invalid log position {0:?}: expected <topic>/<partition>/<offset>")]
    InvalidPosition(String),
}
