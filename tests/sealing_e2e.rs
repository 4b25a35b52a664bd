//! Sealed content on the real stack, as far as it goes: with the quick start's master key,
//! every token delta on the tokens topic is sealed under the asker's data key (a raw
//! reader of the topic sees no answer text), while the asker's socket gets the text, and
//! the sealed deltas, opened with the asker's key, are the answer.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::sync::Arc;
use std::time::Duration;

use parley_events::sealing::{MasterKey, delta_field, is_sealed};
use parley_events::{EventCodec, LLMTokenDelta};
use parley_projections::keys::{KeyStore, SubjectKey};
use parley_projections::{CqlSettings, Store};
use rdkafka::Message;
use support::{Pipeline, stack};

#[tokio::test(flavor = "multi_thread")]
async fn token_deltas_are_sealed_for_their_asker() {
    let Some(stack) = stack() else { return };
    let Ok(key_file) = std::env::var("PARLEY_MASTER_KEY_FILE") else { return };
    let master = MasterKey::from_base64(&std::fs::read_to_string(&key_file).unwrap(), "local:test").unwrap();
    let pipeline = Pipeline::start(&stack, &["--without-retrieval"]).await;
    let (user, token) = pipeline.session_user().await;
    let mut client = pipeline.connect(&pipeline.http, &token).await;
    client.ask("q1", None, "Name three colours of the rainbow.").await;
    let frames = client.until_outcome().await;
    let answer = frames.last().unwrap();
    assert_eq!(answer["type"], "answer", "{frames:?}");
    let streamed: String =
        frames.iter().filter(|f| f["type"] == "token").map(|f| f["delta"].as_str().unwrap()).collect();
    assert_eq!(streamed, answer["text"].as_str().unwrap(), "the socket got the text");
    let conversation = answer["conversation_id"].as_str().unwrap();

    // What the tokens topic holds: ciphertext only, for this asker.
    let tokens = format!("{}conversation-tokens", pipeline.prefix);
    let (consumer, _) = support::reader_from_start(&stack.brokers, &tokens, false);
    let codec = EventCodec::new(&stack.registry).unwrap();
    let mut deltas: Vec<(Vec<u8>, LLMTokenDelta)> = Vec::new();
    while deltas.len() < frames.iter().filter(|f| f["type"] == "token").count() {
        let message = tokio::time::timeout(Duration::from_secs(30), consumer.recv()).await.unwrap().unwrap();
        if message.key() == Some(conversation.as_bytes()) {
            let payload = message.payload().unwrap().to_vec();
            let delta = codec.decode::<LLMTokenDelta>(&payload).await.unwrap().event;
            deltas.push((payload, delta));
        }
    }
    let answer_text = answer["text"].as_str().unwrap();
    for (_, delta) in &deltas {
        assert_eq!(delta.sealed_for, user, "sealed for the asker");
        assert!(is_sealed(&delta.delta), "{delta:?}");
    }
    let settings = CqlSettings {
        nodes: stack.cql.clone(),
        keyspace: pipeline.keyspace.clone(),
        replication: "{'class': 'SimpleStrategy', 'replication_factor': 1}".into(),
    };
    let keys = KeyStore::open(&Store::connect(&settings).await.unwrap(), Arc::new(master)).await.unwrap();
    let SubjectKey::Live(key) = keys.key(&user).await.unwrap() else { panic!("the asker has a key") };
    let mut opened = String::new();
    for (payload, d) in &deltas {
        let text = key.open(&d.query_event_id, &delta_field(d.attempt, d.index), &d.delta).unwrap();
        let clear = text.trim();
        assert!(
            clear.len() < 4 || !payload.windows(clear.len()).any(|w| w == clear.as_bytes()),
            "{clear:?} is in the record in clear"
        );
        opened.push_str(&text);
    }
    assert_eq!(opened, answer_text, "the sealed deltas are the answer");
    pipeline.stop().await;
}
