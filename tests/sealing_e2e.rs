//! Sealed content on the real stack: with the quick start's master key, every token delta,
//! question and answer in the log is sealed under the asker's data key (a raw reader sees
//! no text), the projection keeps the ciphertext (titles sealed again), while the asker's
//! socket, the query API and replay get the text.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::sync::Arc;
use std::time::Duration;

use parley_events::sealing::{MasterKey, delta_field, is_sealed};
use parley_events::{ConversationEvent, EventCodec, LLMTokenDelta};
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

#[tokio::test(flavor = "multi_thread")]
async fn questions_answers_and_titles_are_sealed_in_the_log_and_the_projection() {
    let Some(stack) = stack() else { return };
    if std::env::var("PARLEY_MASTER_KEY_FILE").is_err() {
        return;
    }
    let pipeline = Pipeline::start(&stack, &["--without-retrieval"]).await;
    let (user, token) = pipeline.session_user().await;
    let canary = format!("canary{}", &uuid::Uuid::new_v4().simple().to_string()[..10]);
    let mut client = pipeline.connect(&pipeline.http, &token).await;
    client.ask("q1", None, &format!("Say the word {canary} back to me.")).await;
    let frames = client.until_outcome().await;
    let answer = frames.last().unwrap();
    assert_eq!(answer["type"], "answer", "{frames:?}");
    let conversation = answer["conversation_id"].as_str().unwrap().to_owned();

    // The log: question and answer text sealed for the owner; nothing of the question in clear.
    let events: Vec<_> =
        support::log_events(&stack.brokers, &stack.registry, &pipeline.events_topic(), Some(&conversation), 3)
            .await
            .into_iter()
            .map(|(event, _)| event)
            .collect();
    let ConversationEvent::QueryReceived(query) = &events[1] else { panic!("{events:?}") };
    let ConversationEvent::ResponseGenerated(reply) = &events[2] else { panic!("{events:?}") };
    assert_eq!((query.sealed_for.as_str(), reply.sealed_for.as_str()), (user.as_str(), user.as_str()));
    assert!(is_sealed(&query.text) && is_sealed(&reply.text), "{query:?} {reply:?}");
    assert!(!format!("{events:?}").contains(&canary), "the canary is in the log in clear");
    // Opened with the owner's key, they are what the socket showed.
    let opened = pipeline.opened(events).await;
    let ConversationEvent::QueryReceived(query) = &opened[1] else { panic!() };
    let ConversationEvent::ResponseGenerated(reply) = &opened[2] else { panic!() };
    assert!(query.text.contains(&canary) && query.sealed_for.is_empty(), "{query:?}");
    assert_eq!(reply.text, answer["text"].as_str().unwrap());

    // The query API opens what the projection keeps sealed; the title too.
    let body = pipeline.conversation_when(&token, &conversation, 2).await;
    assert!(body["messages"][0]["text"].as_str().unwrap().contains(&canary), "{body}");
    assert!(body["title"].as_str().unwrap().contains(&canary), "{body}");
    let (_, list) = pipeline.get("/api/conversations", &token).await;
    assert!(list.to_string().contains(&canary), "the list's title opens: {list}");
    // The projection's rows themselves hold no clear text.
    let session = scylla::client::session_builder::SessionBuilder::new().known_node(&stack.cql).build().await.unwrap();
    let id = uuid::Uuid::parse_str(&conversation).unwrap();
    let mut stored = Vec::new();
    for cql in [
        format!("SELECT text FROM {}.messages_g1 WHERE conversation_id = ?", pipeline.keyspace),
        format!("SELECT title FROM {}.conversations_g1 WHERE conversation_id = ?", pipeline.keyspace),
    ] {
        let rows = session.query_unpaged(cql, (id,)).await.unwrap().into_rows_result().unwrap();
        stored.extend(rows.rows::<(Option<String>,)>().unwrap().map(|row| row.unwrap().0.unwrap_or_default()));
    }
    assert_eq!(stored.len(), 3, "{stored:?}");
    assert!(stored.iter().all(|value| is_sealed(value)), "{stored:?}");

    // Replay and audit open it and find no difference.
    let replay = pipeline.cli(&["replay", &conversation]);
    let printed = String::from_utf8_lossy(&replay.stdout);
    assert!(replay.status.success(), "{printed} {}", String::from_utf8_lossy(&replay.stderr));
    assert!(printed.contains(&canary), "{printed}");
    pipeline.stop().await;
}
