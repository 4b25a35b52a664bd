//! Codec tests against the real schema registry (PARLEY_SCHEMA_REGISTRY_URL; the test
//! command starts the local stack and sets it). Without it they are skipped unless
//! PARLEY_REQUIRE_STACK=1, in which case a missing stack fails them.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use parley_events::event::AvroEvent;
use parley_events::*;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

fn registry_url() -> Option<String> {
    match std::env::var("PARLEY_SCHEMA_REGISTRY_URL") {
        Ok(url) => Some(url),
        Err(_) if std::env::var("PARLEY_REQUIRE_STACK").is_ok_and(|v| v == "1") => {
            panic!("PARLEY_REQUIRE_STACK=1 but PARLEY_SCHEMA_REGISTRY_URL is not set")
        }
        Err(_) => {
            eprintln!("skipped: PARLEY_SCHEMA_REGISTRY_URL not set (start the stack with infra/stack.sh start)");
            None
        }
    }
}

const P: Producer = Producer { name: "codec-test", version: "0" };

fn envelope(sequence: i64) -> Envelope {
    Envelope::new(EventId::random(), ConversationId::random(), sequence, P)
        .with_traceparent(Some("00-0123456789abcdef0123456789abcdef-0123456789abcdef-01".into()))
}

#[tokio::test(flavor = "multi_thread")]
async fn every_conversation_event_round_trips_through_the_registry() {
    let Some(url) = registry_url() else { return };
    let codec = EventCodec::new(&url).unwrap();
    let events = vec![
        ConversationEvent::Started(ConversationStarted { envelope: envelope(1), user_id: "u-1".parse().unwrap() }),
        ConversationEvent::QueryReceived(UserQueryReceived {
            sealed_for: String::new(),
            envelope: envelope(2),
            user_id: "u-1".parse().unwrap(),
            client_message_id: "m-1".into(),
            text: "Grüße, what is Kafka? 🚀".into(),
            no_cache: false,
        }),
        ConversationEvent::ResponseGenerated(LLMResponseGenerated {
            sealed_for: String::new(),
            envelope: envelope(3).caused_by(&envelope(2)),
            query_event_id: EventId::random(),
            text: "A log.".into(),
            model: "m".into(),
            finish_reason: "stop".into(),
            prompt_tokens: 12,
            completion_tokens: 3,
            llm_latency_ms: 40,
            time_to_first_token_ms: Some(9),
            attempts: 1,
            context_event_ids: vec![EventId::random(), EventId::random()],
            user_id: Some("u-1".parse().unwrap()),
            retrieved: vec![RetrievedContext {
                vector_id: "v".into(),
                source_kind: "document".into(),
                source_id: Uuid::new_v4().to_string(),
                source_event_id: EventId::random(),
                position: 2,
                score: 0.75,
            }],
            context_fingerprint: String::new(),
            cached_from: None,
            prompt: Some(Box::new(PromptProof {
                digest: "ab".repeat(32),
                builder: "parley-prompt/1".into(),
                layout: "stable".into(),
                token_budget: 1536,
                system_prompt_digest: "cd".repeat(32),
                messages: 4,
                knowledge_turns: vec![EventId::random()],
            })),
        }),
        ConversationEvent::ResponseFailed(LLMResponseFailed {
            envelope: envelope(3),
            query_event_id: EventId::random(),
            error_kind: "timeout".into(),
            error_message: "slow".into(),
            attempts: 3,
        }),
        ConversationEvent::CancelRequested(TurnCancelRequested {
            envelope: envelope(2),
            query_event_id: EventId::random(),
            user_id: "alice".parse().unwrap(),
        }),
    ];
    for event in events {
        let bytes = match &event {
            ConversationEvent::Started(e) => codec.encode(e).await,
            ConversationEvent::QueryReceived(e) => codec.encode(e).await,
            ConversationEvent::ResponseGenerated(e) => codec.encode(e).await,
            ConversationEvent::ResponseFailed(e) => codec.encode(e).await,
            ConversationEvent::CancelRequested(e) => codec.encode(e).await,
        }
        .unwrap();
        assert_eq!(bytes[0], 0, "Confluent magic byte");
        let decoded = codec.decode_conversation_event(&bytes).await.unwrap();
        assert_eq!(decoded.schema_id, codec::wire_schema_id(&bytes).unwrap());
        assert_eq!(decoded.event, event);
    }

    let delta = LLMTokenDelta {
        conversation_id: ConversationId::random(),
        query_event_id: EventId::random(),
        index: 4,
        delta: "lo".into(),
        traceparent: None,
        attempt: 2,
        sealed_for: String::new(),
    };
    assert_eq!(codec.decode::<LLMTokenDelta>(&codec.encode(&delta).await.unwrap()).await.unwrap().event, delta);

    let letter = DeadLetter {
        source_topic: "t".into(),
        source_partition: 2,
        source_offset: 99,
        key: Some(b"k".to_vec()),
        payload: Some(vec![0xde, 0xad, 0xbe, 0xef]),
        consumer: "g".into(),
        error: "bad".into(),
        failed_at: now_millis(),
        headers: [("traceparent".to_owned(), "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".to_owned())]
            .into(),
    };
    assert_eq!(codec.decode::<DeadLetter>(&codec.encode(&letter).await.unwrap()).await.unwrap().event, letter);
    let resolved = DeadLetterResolved {
        letter_partition: 0,
        letter_offset: 7,
        consumer: "g".into(),
        source_topic: "t".into(),
        source_partition: 2,
        source_offset: 99,
        key: Some(b"k".to_vec()),
        action: dead_letters::REDRIVEN.into(),
        redriven_offset: Some(140),
        resolved_by: "ops".into(),
        reason: Some("schema registered".into()),
        resolved_at: now_millis(),
    };
    for record in [DeadLetterRecord::Letter(letter.clone()), DeadLetterRecord::Resolved(resolved)] {
        let bytes = match &record {
            DeadLetterRecord::Letter(letter) => codec.encode(letter).await.unwrap(),
            DeadLetterRecord::Resolved(resolved) => codec.encode(resolved).await.unwrap(),
        };
        assert_eq!(codec.decode_dead_letter_record(&bytes).await.unwrap().event, record);
    }

    let document = DocumentSubmitted {
        sealed_for: String::new(),
        envelope: envelope(1),
        document_id: DocumentId::random(),
        owner: "u-1".parse().unwrap(),
        title: "notes.md".into(),
        media_type: "text/markdown".into(),
        text: "# Notes\n\nKafka is a log.".into(),
        metadata: [("team".to_owned(), "infra".to_owned())].into(),
    };
    assert_eq!(
        codec.decode::<DocumentSubmitted>(&codec.encode(&document).await.unwrap()).await.unwrap().event,
        document
    );
    // The documents topic carries submissions and deletions, told apart by record name.
    let deleted =
        DocumentDeleted { envelope: envelope(2), document_id: document.document_id, owner: "u-1".parse().unwrap() };
    let decoded = codec.decode_document_event(&codec.encode(&deleted).await.unwrap()).await.unwrap().event;
    assert_eq!(decoded, DocumentEvent::Deleted(deleted));
    let decoded = codec.decode_document_event(&codec.encode(&document).await.unwrap()).await.unwrap().event;
    assert_eq!(decoded, DocumentEvent::Submitted(document.clone()));
    let not_a_document = codec.decode_document_event(&codec.encode(&letter).await.unwrap()).await.unwrap_err();
    assert!(not_a_document.to_string().contains("not a document event"), "{not_a_document}");

    let indexed = EmbeddingsIndexed {
        envelope: envelope(0),
        owner: "u-1".parse().unwrap(),
        source_kind: "document".into(),
        source_id: document.document_id.to_string(),
        model: "all-MiniLM-L6-v2".into(),
        dimension: 384,
        collection: "parley_knowledge".into(),
        vectors: vec![IndexedVector {
            vector_id: "x".into(),
            source_event_id: document.envelope.event_id,
            position: 0,
            chars: 27,
        }],
    };
    assert_eq!(codec.decode::<EmbeddingsIndexed>(&codec.encode(&indexed).await.unwrap()).await.unwrap().event, indexed);

    // The erasures topic carries requests and completions, told apart by record name.
    let alice: UserId = "alice".parse().unwrap();
    let requested = ErasureRequested {
        envelope: Envelope::new(EventId::random(), alice.erasure_stream(), 1, P),
        user_id: alice.clone(),
        requested_by: "operator".into(),
        reason: "ticket-42".into(),
    };
    let completed = ErasureCompleted {
        envelope: Envelope::new(EventId::random(), alice.erasure_stream(), 2, P).caused_by(&requested.envelope),
        user_id: alice.clone(),
        request_event_id: requested.envelope.event_id,
        key_erased_at: 1_700_000_000_000,
        purged: vec![PurgedPlace { place: "cql:messages".into(), items: 3 }],
    };
    for event in [ErasureEvent::Requested(requested.clone()), ErasureEvent::Completed(completed.clone())] {
        let bytes = match &event {
            ErasureEvent::Requested(e) => codec.encode(e).await.unwrap(),
            ErasureEvent::Completed(e) => codec.encode(e).await.unwrap(),
        };
        assert_eq!(codec.decode_erasure_event(&bytes).await.unwrap().event, event);
    }
    assert_eq!(requested.envelope.conversation_id, "alice".parse::<UserId>().unwrap().erasure_stream(), "stable");
    let not_an_erasure = codec.decode_erasure_event(&codec.encode(&letter).await.unwrap()).await.unwrap_err();
    assert!(not_an_erasure.to_string().contains("not an erasure event"), "{not_an_erasure}");

    let wrong_type = codec.decode::<LLMTokenDelta>(&codec.encode(&letter).await.unwrap()).await.unwrap_err();
    assert!(wrong_type.to_string().contains("expected io.parley.events.LLMTokenDelta"), "{wrong_type}");
}

#[tokio::test(flavor = "multi_thread")]
async fn unknown_schema_ids_and_garbage_give_typed_errors() {
    let Some(url) = registry_url() else { return };
    let codec = EventCodec::new(&url).unwrap();

    let unknown_id = [0, 0x7f, 0xff, 0xff, 0x01, 2, 4];
    let err = codec.decode_conversation_event(&unknown_id).await.unwrap_err();
    assert!(matches!(err, EventsError::Undecodable { schema_id: Some(0x7fff_ff01), .. }), "{err:?}");
    assert!(!err.is_retryable(), "an unknown id is the message's fault, not the registry's");

    for garbage in [&b""[..], b"\xde\xad\xbe\xef\x00\x01", b"{\"json\":true}", b"\x00\x00"] {
        let err = codec.decode_conversation_event(garbage).await.unwrap_err();
        assert!(matches!(err, EventsError::NotWireFormat(_)), "{garbage:?}: {err:?}");
    }

    // A real schema id followed by a body that is not that schema's Avro.
    let good =
        codec.encode(&ConversationStarted { envelope: envelope(1), user_id: "u".parse().unwrap() }).await.unwrap();
    let mut truncated = good[..5].to_vec();
    truncated.extend_from_slice(&[0xff; 3]);
    let err = codec.decode_conversation_event(&truncated).await.unwrap_err();
    assert!(matches!(err, EventsError::Undecodable { .. }), "{err:?}");
    // Huge length prefixes must not allocate without bound.
    let mut hostile = good[..5].to_vec();
    hostile.extend_from_slice(&[0xfe, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01]);
    assert!(codec.decode_conversation_event(&hostile).await.is_err());
}

#[tokio::test(flavor = "multi_thread")]
async fn unreachable_registry_is_a_retryable_error() {
    let codec = EventCodec::new("http://127.0.0.1:9/apis/ccompat/v7").unwrap();
    let err = codec.decode_conversation_event(&[0, 0, 0, 0, 1, 0]).await.unwrap_err();
    assert!(err.is_retryable(), "{err:?}");
}

// --- Schema evolution: a probe event at two versions, under its own subject. ---

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct ProbeV1 {
    envelope: Envelope,
    text: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct ProbeV2 {
    envelope: Envelope,
    text: String,
    locale: String,
}

impl AvroEvent for ProbeV1 {
    const FULL_NAME: &'static str = "io.parley.events.EvolutionProbe";
}
impl AvroEvent for ProbeV2 {
    const FULL_NAME: &'static str = "io.parley.events.EvolutionProbe";
}

const PROBE_V1: &str = r#"{"type":"record","name":"EvolutionProbe","namespace":"io.parley.events","fields":[
  {"name":"envelope","type":"io.parley.events.Envelope"},{"name":"text","type":"string"}]}"#;
const PROBE_V2: &str = r#"{"type":"record","name":"EvolutionProbe","namespace":"io.parley.events","fields":[
  {"name":"envelope","type":"io.parley.events.Envelope"},{"name":"text","type":"string"},
  {"name":"locale","type":"string","default":"en"}]}"#;

fn catalog(versions: &[(&str, &str)]) -> SchemaCatalog {
    let envelope = include_str!("../avro/envelope.v1.avsc");
    let mut files = vec![("envelope.v1.avsc".to_owned(), envelope.to_owned())];
    files.extend(versions.iter().map(|(f, c)| ((*f).to_owned(), (*c).to_owned())));
    SchemaCatalog::from_files(files).unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn old_writers_and_new_readers_interoperate_both_ways() {
    let Some(url) = registry_url() else { return };
    let old = EventCodec::with_catalog(&url, catalog(&[("probe.v1.avsc", PROBE_V1)])).unwrap();
    let new =
        EventCodec::with_catalog(&url, catalog(&[("probe.v1.avsc", PROBE_V1), ("probe.v2.avsc", PROBE_V2)])).unwrap();

    let v1 = ProbeV1 { envelope: envelope(1), text: "hi".into() };
    let from_old = old.encode(&v1).await.unwrap();
    let read_by_new: ProbeV2 = new.decode(&from_old).await.unwrap().event;
    assert_eq!(
        read_by_new,
        ProbeV2 { envelope: v1.envelope.clone(), text: "hi".into(), locale: "en".into() },
        "default fills the new field"
    );

    let v2 = ProbeV2 { envelope: envelope(2), text: "salut".into(), locale: "fr".into() };
    let from_new = new.encode(&v2).await.unwrap();
    assert_ne!(codec::wire_schema_id(&from_old).unwrap(), codec::wire_schema_id(&from_new).unwrap());
    let read_by_old: ProbeV1 = old.decode(&from_new).await.unwrap().event;
    assert_eq!(
        read_by_old,
        ProbeV1 { envelope: v2.envelope, text: "salut".into() },
        "old readers ignore the new field"
    );
}
