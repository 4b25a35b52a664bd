//! The Avro decoding Parley's consumers run on every record, fuzzed without a registry:
//! real encoded events (every conversation event, a token delta, a document) mutated by
//! flipped, inserted and dropped bytes, truncations and repeated spans (10,000 cases).
//! Each must decode to a value or fail with an error: no panic, no unbounded allocation
//! (the codec caps Avro allocations; building one sets the cap), no hang.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use apache_avro::reader::datum::GenericDatumReader;
use apache_avro::writer::datum::GenericDatumWriter;
use apache_avro::{Schema, from_value, to_value};
use parley_events::event::AvroEvent;
use parley_events::*;
use proptest::collection::vec;
use proptest::prelude::*;
use serde::Serialize;
use serde::de::DeserializeOwned;

const P: Producer = Producer { name: "fuzz", version: "0" };

/// One encoded sample and how to decode bytes as its type.
struct Sample {
    schema: Schema,
    bytes: Vec<u8>,
    decode: fn(&Schema, &[u8]) -> Result<(), String>,
}

/// As the registry codec decodes (schema_registry_converter: a datum reader for the
/// writer's schema), then into the typed event.
fn decode_as<T: AvroEvent>(schema: &Schema, mut bytes: &[u8]) -> Result<(), String> {
    let reader = GenericDatumReader::builder(schema).build().map_err(|e| e.to_string())?;
    let value = reader.read_value(&mut bytes).map_err(|e| e.to_string())?;
    let resolved = value.resolve(schema).map_err(|e| e.to_string())?;
    from_value::<T>(&resolved).map(drop).map_err(|e| e.to_string())
}

fn sample<T: AvroEvent + Serialize + DeserializeOwned>(catalog: &SchemaCatalog, event: &T) -> Sample {
    let schema = catalog.latest(T::FULL_NAME).unwrap().schema.clone();
    let writer = GenericDatumWriter::builder(&schema).build().unwrap();
    let bytes = writer.write_value_to_vec(to_value(event).unwrap()).unwrap();
    assert!(decode_as::<T>(&schema, &bytes).is_ok(), "{} round trips", T::FULL_NAME);
    Sample { schema, bytes, decode: decode_as::<T> }
}

fn samples() -> Vec<Sample> {
    // Sets the codec's allocation cap, as every service does at start.
    EventCodec::new("http://127.0.0.1:9").unwrap();
    let catalog = SchemaCatalog::embedded();
    let conversation = ConversationId::random();
    let envelope = |sequence| Envelope::new(EventId::random(), conversation, sequence, P);
    vec![
        sample(&catalog, &ConversationStarted { envelope: envelope(1), user_id: "alice".parse().unwrap() }),
        sample(
            &catalog,
            &UserQueryReceived {
                sealed_for: String::new(),
                envelope: envelope(2),
                user_id: "alice".parse().unwrap(),
                client_message_id: "m-1".into(),
                text: "What is the capital of France?".into(),
                no_cache: false,
            },
        ),
        sample(
            &catalog,
            &LLMResponseGenerated {
                sealed_for: String::new(),
                envelope: envelope(3),
                query_event_id: EventId::random(),
                text: "Paris.".into(),
                model: "m".into(),
                finish_reason: "stop".into(),
                prompt_tokens: 40,
                completion_tokens: 3,
                llm_latency_ms: 120,
                time_to_first_token_ms: Some(30),
                attempts: 1,
                context_event_ids: vec![EventId::random()],
                user_id: Some("alice".parse().unwrap()),
                retrieved: vec![RetrievedContext {
                    vector_id: "v".into(),
                    source_kind: "document".into(),
                    source_id: "d".into(),
                    source_event_id: EventId::random(),
                    position: 2,
                    score: 0.8,
                }],
                context_fingerprint: String::new(),
                cached_from: None,
                prompt: Some(Box::new(PromptProof {
                    digest: "ab".repeat(32),
                    builder: "parley-prompt/1".into(),
                    layout: "sliding".into(),
                    token_budget: 900,
                    system_prompt_digest: "cd".repeat(32),
                    messages: 2,
                    knowledge_turns: vec![],
                })),
            },
        ),
        sample(
            &catalog,
            &LLMResponseFailed {
                envelope: envelope(3),
                query_event_id: EventId::random(),
                error_kind: "timeout".into(),
                error_message: "slow".into(),
                attempts: 3,
            },
        ),
        sample(
            &catalog,
            &TurnCancelRequested {
                envelope: envelope(2),
                query_event_id: EventId::random(),
                user_id: "alice".parse().unwrap(),
            },
        ),
        sample(
            &catalog,
            &LLMTokenDelta {
                conversation_id: conversation,
                query_event_id: EventId::random(),
                index: 7,
                delta: " Paris".into(),
                traceparent: None,
                attempt: 2,
                sealed_for: String::new(),
            },
        ),
        sample(
            &catalog,
            &ErasureCompleted {
                envelope: envelope(2),
                user_id: "alice".parse().unwrap(),
                request_event_id: EventId::random(),
                key_erased_at: 1_700_000_000_000,
                purged: vec![PurgedPlace { place: "cql:messages".into(), items: 12 }],
            },
        ),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(fuzzing::cases()))]

    #[test]
    fn mutated_events_decode_or_fail_with_an_error(
        which in 0..6_usize,
        edits in vec((any::<usize>(), any::<u8>(), 0..4_u8), 1..8),
    ) {
        thread_local!(static SAMPLES: Vec<Sample> = samples());
        SAMPLES.with(|samples| {
            let sample = &samples[which % samples.len()];
            let mut bytes = sample.bytes.clone();
            fuzzing::mutate(&mut bytes, &edits);
            // The outcome may be a (different) event or an error; it must be one of them.
            let _ = (sample.decode)(&sample.schema, &bytes);
        });
    }

    #[test]
    fn any_bytes_are_a_wire_format_header_or_a_typed_refusal(bytes in vec(any::<u8>(), 0..12)) {
        match codec::wire_schema_id(&bytes) {
            Ok(id) => prop_assert_eq!(&bytes[..5], &[&[0_u8][..], &id.to_be_bytes()[..]].concat()[..]),
            Err(error) => prop_assert!(matches!(error, EventsError::NotWireFormat(_)), "{error}"),
        }
    }
}
