//! Confluent wire format (magic byte 0, 4-byte big-endian schema id, Avro binary body)
//! through a schema registry. Writers register and use the schema compiled into this build;
//! readers fetch the writer's schema by the id in each message and resolve it to the
//! schema this build knows, so old and new producers and consumers interoperate.

use std::collections::HashMap;
use std::time::Duration;

use apache_avro::types::Value;
use schema_registry_converter::async_impl::avro::{AvroDecoder, AvroEncoder};
use schema_registry_converter::async_impl::schema_registry::SrSettings;
use schema_registry_converter::error::SRCError;
use schema_registry_converter::schema_registry_common::SubjectNameStrategy;

use crate::catalog::SchemaCatalog;
use crate::error::EventsError;
use crate::event::*;
use crate::experiment::{ExperimentEvent, ExperimentRequested, ExperimentRun};

/// Largest allocation a single Avro value may ask for while decoding, so that garbage
/// length prefixes in hostile bytes cannot exhaust memory.
const MAX_AVRO_ALLOCATION: usize = 16 * 1024 * 1024;

/// A decoded record and the registry id of the schema it was written with.
#[derive(Debug, Clone, PartialEq)]
pub struct Decoded<T> {
    /// The registry id of the writer's schema.
    pub schema_id: u32,
    /// The event, resolved to this build's type.
    pub event: T,
}

/// Encodes and decodes Parley events against a schema registry.
#[derive(Debug)]
pub struct EventCodec {
    catalog: SchemaCatalog,
    strategies: HashMap<String, SubjectNameStrategy>,
    encoder: AvroEncoder,
    decoder: AvroDecoder,
}

impl EventCodec {
    /// A codec for the compiled-in schemas against the registry at `registry_url`
    /// (Confluent API root, e.g. `http://127.0.0.1:18081/apis/ccompat/v7`).
    pub fn new(registry_url: &str) -> Result<Self, EventsError> {
        Self::with_catalog(registry_url, SchemaCatalog::embedded())
    }

    /// A codec for `catalog` (tests use older catalogs to write as old producers did).
    pub fn with_catalog(registry_url: &str, catalog: SchemaCatalog) -> Result<Self, EventsError> {
        apache_avro::util::max_allocation_bytes(MAX_AVRO_ALLOCATION);
        let settings = || {
            SrSettings::new_builder(registry_url.trim_end_matches('/').to_owned())
                .set_timeout(Duration::from_secs(10))
                .no_proxy()
                .build()
                .map_err(registry_error)
        };
        let strategies = catalog
            .latest_entries()
            .map(|entry| (entry.full_name.clone(), SubjectNameStrategy::RecordNameStrategyWithSchema(entry.supplied())))
            .collect();
        Ok(Self { encoder: AvroEncoder::new(settings()?), decoder: AvroDecoder::new(settings()?), catalog, strategies })
    }

    /// The schemas this codec writes with.
    pub fn catalog(&self) -> &SchemaCatalog {
        &self.catalog
    }

    /// Encodes `event` with this build's schema for it (registering it on first use).
    pub async fn encode<T: AvroEvent>(&self, event: &T) -> Result<Vec<u8>, EventsError> {
        let unencodable = |reason: String| EventsError::Unencodable { event_type: T::FULL_NAME.to_owned(), reason };
        let entry = self.catalog.latest(T::FULL_NAME)?;
        let value = apache_avro::to_value(event)
            .and_then(|v| v.resolve(&entry.schema))
            .map_err(|e| unencodable(e.to_string()))?;
        let strategy =
            self.strategies.get(T::FULL_NAME).ok_or_else(|| EventsError::UnknownEventType(T::FULL_NAME.into()))?;
        self.encoder.encode_value(value, strategy).await.map_err(|e| {
            if e.retriable {
                self.encoder.remove_errors_from_cache();
                registry_error(e)
            } else {
                unencodable(e.to_string())
            }
        })
    }

    /// Decodes one record of the `conversation-events` topic.
    pub async fn decode_conversation_event(&self, bytes: &[u8]) -> Result<Decoded<ConversationEvent>, EventsError> {
        let (schema_id, name, value) = self.decode_value(bytes).await?;
        let event = match name.as_str() {
            ConversationStarted::FULL_NAME => ConversationEvent::Started(self.typed(schema_id, &name, value)?),
            UserQueryReceived::FULL_NAME => ConversationEvent::QueryReceived(self.typed(schema_id, &name, value)?),
            LLMResponseGenerated::FULL_NAME => {
                ConversationEvent::ResponseGenerated(self.typed(schema_id, &name, value)?)
            }
            LLMResponseFailed::FULL_NAME => ConversationEvent::ResponseFailed(self.typed(schema_id, &name, value)?),
            TurnCancelRequested::FULL_NAME => ConversationEvent::CancelRequested(self.typed(schema_id, &name, value)?),
            other => {
                return Err(EventsError::Undecodable {
                    schema_id: Some(schema_id),
                    reason: format!("{other} is not a conversation event"),
                });
            }
        };
        Ok(Decoded { schema_id, event })
    }

    /// Decodes a record of the `experiments` topic.
    pub async fn decode_experiment_event(&self, bytes: &[u8]) -> Result<Decoded<ExperimentEvent>, EventsError> {
        let (schema_id, name, value) = self.decode_value(bytes).await?;
        let event = match name.as_str() {
            ExperimentRequested::FULL_NAME => ExperimentEvent::Requested(self.typed(schema_id, &name, value)?),
            ExperimentRun::FULL_NAME => ExperimentEvent::Run(self.typed(schema_id, &name, value)?),
            other => {
                return Err(EventsError::Undecodable {
                    schema_id: Some(schema_id),
                    reason: format!("{other} is not an experiment event"),
                });
            }
        };
        Ok(Decoded { schema_id, event })
    }

    /// Decodes a record of the `documents` topic.
    pub async fn decode_document_event(&self, bytes: &[u8]) -> Result<Decoded<DocumentEvent>, EventsError> {
        let (schema_id, name, value) = self.decode_value(bytes).await?;
        let event = match name.as_str() {
            DocumentSubmitted::FULL_NAME => DocumentEvent::Submitted(self.typed(schema_id, &name, value)?),
            DocumentDeleted::FULL_NAME => DocumentEvent::Deleted(self.typed(schema_id, &name, value)?),
            other => {
                return Err(EventsError::Undecodable {
                    schema_id: Some(schema_id),
                    reason: format!("{other} is not a document event"),
                });
            }
        };
        Ok(Decoded { schema_id, event })
    }

    /// Decodes a record of the `erasures` topic.
    pub async fn decode_erasure_event(&self, bytes: &[u8]) -> Result<Decoded<ErasureEvent>, EventsError> {
        let (schema_id, name, value) = self.decode_value(bytes).await?;
        let event = match name.as_str() {
            ErasureRequested::FULL_NAME => ErasureEvent::Requested(self.typed(schema_id, &name, value)?),
            ErasureCompleted::FULL_NAME => ErasureEvent::Completed(self.typed(schema_id, &name, value)?),
            other => {
                return Err(EventsError::Undecodable {
                    schema_id: Some(schema_id),
                    reason: format!("{other} is not an erasure event"),
                });
            }
        };
        Ok(Decoded { schema_id, event })
    }

    /// Decodes a record of the `dead-letter` topic: a letter or a decision on one.
    pub async fn decode_dead_letter_record(&self, bytes: &[u8]) -> Result<Decoded<DeadLetterRecord>, EventsError> {
        let (schema_id, name, value) = self.decode_value(bytes).await?;
        let event = match name.as_str() {
            DeadLetter::FULL_NAME => DeadLetterRecord::Letter(self.typed(schema_id, &name, value)?),
            DeadLetterResolved::FULL_NAME => DeadLetterRecord::Resolved(self.typed(schema_id, &name, value)?),
            other => {
                return Err(EventsError::Undecodable {
                    schema_id: Some(schema_id),
                    reason: format!("{other} is not a dead-letter record"),
                });
            }
        };
        Ok(Decoded { schema_id, event })
    }

    /// Decodes a record that must be of type `T` (topics that carry one type).
    pub async fn decode<T: AvroEvent>(&self, bytes: &[u8]) -> Result<Decoded<T>, EventsError> {
        let (schema_id, name, value) = self.decode_value(bytes).await?;
        if name != T::FULL_NAME {
            return Err(EventsError::Undecodable {
                schema_id: Some(schema_id),
                reason: format!("expected {}, got {name}", T::FULL_NAME),
            });
        }
        Ok(Decoded { schema_id, event: self.typed(schema_id, &name, value)? })
    }

    async fn decode_value(&self, bytes: &[u8]) -> Result<(u32, String, Value), EventsError> {
        let schema_id = wire_schema_id(bytes)?;
        let decoded = self.decoder.decode(Some(bytes)).await.map_err(|e| {
            if e.retriable {
                self.decoder.remove_errors_from_cache();
                registry_error(e)
            } else {
                EventsError::Undecodable { schema_id: Some(schema_id), reason: e.to_string() }
            }
        })?;
        let name = decoded.name.map(|n| n.fullname(None)).ok_or_else(|| EventsError::Undecodable {
            schema_id: Some(schema_id),
            reason: "writer schema is not a named record".into(),
        })?;
        Ok((schema_id, name, decoded.value))
    }

    /// Resolves a value written with any compatible schema version to this build's version.
    fn typed<T: AvroEvent>(&self, schema_id: u32, name: &str, value: Value) -> Result<T, EventsError> {
        let undecodable = |reason: String| EventsError::Undecodable { schema_id: Some(schema_id), reason };
        let reader = &self.catalog.latest(name)?.schema;
        let resolved = value.resolve(reader).map_err(|e| undecodable(format!("cannot resolve to {name}: {e}")))?;
        apache_avro::from_value(&resolved).map_err(|e| undecodable(e.to_string()))
    }
}

/// The schema id of a Confluent wire-format message, or why it is not one.
pub fn wire_schema_id(bytes: &[u8]) -> Result<u32, EventsError> {
    match bytes {
        [0, a, b, c, d, ..] => Ok(u32::from_be_bytes([*a, *b, *c, *d])),
        [] => Err(EventsError::NotWireFormat("empty payload".into())),
        [magic, ..] if *magic != 0 => Err(EventsError::NotWireFormat(format!("magic byte {magic}, expected 0"))),
        short => Err(EventsError::NotWireFormat(format!("{} bytes, need at least 5", short.len()))),
    }
}

fn registry_error(e: SRCError) -> EventsError {
    EventsError::Registry(e.to_string())
}

impl EventsError {
    /// Whether trying again later may succeed (the registry was unreachable), as opposed to
    /// the bytes themselves being bad (a poison message for the dead-letter topic).
    pub fn is_retryable(&self) -> bool {
        matches!(self, Self::Registry(_))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_format_header_is_validated() {
        assert_eq!(wire_schema_id(&[0, 0, 0, 1, 2, 9]).unwrap(), 258);
        assert!(matches!(wire_schema_id(&[]), Err(EventsError::NotWireFormat(_))));
        assert!(matches!(wire_schema_id(&[7, 0, 0, 0, 1]), Err(EventsError::NotWireFormat(_))));
        assert!(matches!(wire_schema_id(&[0, 1]), Err(EventsError::NotWireFormat(_))));
    }
}
