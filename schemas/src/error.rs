use thiserror::Error;

/// Everything that can go wrong with Parley's event contract.
#[derive(Debug, Error)]
pub enum EventsError {
    #[error("schema file {file}: {reason}")]
    SchemaFile { file: String, reason: String },
    #[error("no schema for event type {0} in the catalog")]
    UnknownEventType(String),
    #[error("message is not in the Confluent wire format (magic byte 0 + 4-byte schema id): {0}")]
    NotWireFormat(String),
    #[error("schema registry: {0}")]
    Registry(String),
    #[error("could not decode event (schema id {schema_id:?}): {reason}")]
    Undecodable { schema_id: Option<u32>, reason: String },
    #[error("could not encode {event_type}: {reason}")]
    Unencodable { event_type: String, reason: String },
    #[error("invalid log position {0:?}: expected <topic>/<partition>/<offset>")]
    InvalidPosition(String),
}
