//! The knowledge base end to end on the real stack: `parley ingest` and the HTTP endpoint
//! append documents, the embedder chunks and embeds them into Milvus, search stays inside
//! the caller's data, and inference puts retrieved chunks into the prompt and records them.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::{Duration, Instant};

use parley_events::ConversationEvent;
use parley_retrieval::{SearchFilter, VectorStore};
use rdkafka::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use serde_json::{Value, json};
use support::{Pipeline, log_events, stack};

/// The fact only the test's own document contains.
const FACT: &str = "The maintenance password of the Zephyr-9 reactor is blue-harmonica-42.";
const QUESTION: &str = "What is the maintenance password of the Zephyr-9 reactor?";

/// A small corpus: the fact buried in a document of filler, and two unrelated documents.
fn write_corpus(dir: &std::path::Path) {
    let filler = |topic: &str| {
        (1..=12)
            .map(|i| format!("Paragraph {i} about {topic}: routine notes that say nothing in particular about it."))
            .collect::<Vec<_>>()
    };
    let mut reactor = filler("the reactor hall");
    reactor.insert(7, FACT.to_owned());
    std::fs::write(dir.join("zephyr.md"), reactor.join("\n\n")).unwrap();
    std::fs::create_dir_all(dir.join("more")).unwrap();
    std::fs::write(dir.join("more/gardening.txt"), filler("tomatoes and basil").join("\n\n")).unwrap();
    std::fs::write(dir.join("more/sailing.txt"), filler("knots and tides").join("\n\n")).unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn ingested_knowledge_is_searched_per_owner_and_answers_record_what_they_used() {
    let Some(stack) = stack() else { return };
    let pipeline = Pipeline::start(&stack, &[]).await;
    let (alice, alice_token) = pipeline.session_user().await;
    let (_bob, bob_token) = pipeline.session_user().await;

    let corpus = tempfile::tempdir().unwrap();
    write_corpus(corpus.path());
    let ingest = pipeline.cli(&["ingest", corpus.path().to_str().unwrap(), "--owner", &alice, "--label", "team=ops"]);
    let stdout = String::from_utf8_lossy(&ingest.stdout);
    assert!(ingest.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&ingest.stderr));
    assert!(stdout.contains("3 documents"), "{stdout}");

    // Bob adds a document of his own over HTTP, about the same reactor.
    let bob_fact = "Bob's notes: the Zephyr-9 reactor password was changed to green-trombone-7.";
    let (status, submitted) =
        pipeline.post("/api/documents", &bob_token, &json!({"title": "bob.txt", "text": bob_fact})).await;
    assert_eq!(status, 202, "{submitted}");
    assert!(submitted["position"].as_str().unwrap().contains("documents/"), "{submitted}");
    let (status, refused) =
        pipeline.post("/api/documents", &bob_token, &json!({"title": "empty.txt", "text": " "})).await;
    assert_eq!((status, refused["error"].as_str()), (400, Some("invalid_document")), "{refused}");

    // Alice finds her chunk with the fact, and never Bob's document.
    let hits = pipeline.search_until(&alice_token, QUESTION, |h| h["text"].as_str().unwrap().contains(FACT)).await;
    let fact_hit = hits.iter().find(|h| h["text"].as_str().unwrap().contains(FACT)).unwrap().clone();
    assert_eq!((fact_hit["kind"].as_str(), fact_hit["label"].as_str()), (Some("document"), Some("zephyr.md")));
    assert_eq!(hits[0]["id"], fact_hit["id"], "the fact's chunk ranks first: {hits:?}");
    // Bob finds his own document, and none of Alice's chunks, although hers match as well.
    let bob_hits = pipeline.search_until(&bob_token, QUESTION, |h| h["label"] == "bob.txt").await;
    assert!(bob_hits.iter().all(|h| h["label"] == "bob.txt"), "{bob_hits:?}");
    let (_, alice_again) =
        pipeline.get(&format!("/api/search?q={}&k=50", support::urlencode(bob_fact)), &alice_token).await;
    assert!(alice_again["hits"].as_array().unwrap().iter().all(|h| h["label"] != "bob.txt"), "{alice_again}");
    // Metadata filters: only one document, only messages.
    let document_id = fact_hit["source_id"].as_str().unwrap();
    let path = format!("/api/search?q={}&document={document_id}", support::urlencode("tomatoes"));
    let (_, narrowed) = pipeline.get(&path, &alice_token).await;
    assert!(narrowed["hits"].as_array().unwrap().iter().all(|h| h["source_id"] == document_id), "{narrowed}");
    let (status, _) = pipeline.get("/api/search?q=x&kind=pdf", &alice_token).await;
    assert_eq!(status, 400);
    let (status, _) = pipeline.get("/api/search?q=x", "not-a-token").await;
    assert_eq!(status, 401);

    // Alice asks in the chat: the answer's event records the chunk that went into the prompt.
    let mut client = pipeline.connect(&pipeline.http, &alice_token).await;
    client.ask("k-1", None, QUESTION).await;
    let ack = client.until("ack").await.pop().unwrap();
    let conversation_id = ack["conversation_id"].as_str().unwrap().to_owned();
    let outcome = client.until_outcome().await.pop().unwrap();
    assert_eq!(outcome["type"], "answer", "{outcome}");
    let shown = outcome["retrieved"].as_array().unwrap();
    assert!(shown.iter().any(|r| r["vector_id"] == fact_hit["id"]), "the answer frame names its sources: {outcome}");
    let events =
        log_events(&pipeline.brokers, &pipeline.registry, &pipeline.events_topic(), Some(&conversation_id), 3).await;
    let answer = events
        .iter()
        .find_map(|(e, _)| match e {
            ConversationEvent::ResponseGenerated(answer) => Some(answer.clone()),
            _ => None,
        })
        .expect("an answer");
    assert_eq!(answer.user_id.as_ref().map(|u| u.as_str()), Some(alice.as_str()));
    let used = answer.retrieved.iter().find(|r| r.vector_id == fact_hit["id"].as_str().unwrap());
    let used = used.unwrap_or_else(|| panic!("the fact's chunk was not retrieved: {:?}", answer.retrieved));
    assert_eq!((used.source_kind.as_str(), used.source_id.as_str()), ("document", document_id));
    assert!(used.score > 0.3, "{used:?}");
    assert!(answer.retrieved.windows(2).all(|w| w[0].score >= w[1].score), "best first: {:?}", answer.retrieved);

    // The query API keeps it with the answer, so a reloaded chat page still shows it.
    let stored = pipeline.conversation_when(&alice_token, &conversation_id, 2).await;
    let stored_ids: Vec<&Value> =
        stored["messages"][1]["retrieved"].as_array().unwrap().iter().map(|r| &r["vector_id"]).collect();
    let shown_ids: Vec<&Value> = shown.iter().map(|r| &r["vector_id"]).collect();
    assert_eq!(stored_ids, shown_ids, "{stored}");

    // `parley audit` shows what the model saw.
    let audit = pipeline.cli(&["audit", &conversation_id]);
    let table = String::from_utf8_lossy(&audit.stdout);
    assert!(table.contains(&format!("retrieved document {document_id}")), "{table}");

    // `parley replay --prompts` rebuilds that prompt from events alone, the chunk cut again
    // from the document's event, and proves it is the one sent.
    let replayed = pipeline.cli(&["replay", &conversation_id, "--prompts", "--format", "json"]);
    assert!(replayed.status.success(), "{}", String::from_utf8_lossy(&replayed.stderr));
    let replayed: Value = serde_json::from_slice(&replayed.stdout).unwrap();
    let prompt = &replayed["prompts"][0];
    assert_eq!(prompt["verdict"], "proven", "{prompt}");
    let sent = prompt["messages"].as_array().unwrap();
    assert_eq!(sent.last().unwrap()["role"], "user");
    assert!(sent.last().unwrap()["content"].as_str().unwrap().contains(FACT), "the chunk is in the question: {prompt}");
    // Other chunking settings, another system prompt: named, never proven.
    let rechunked =
        pipeline.cli(&["replay", &conversation_id, "--prompts", "--chunk-chars", "60", "--chunk-overlap", "0"]);
    let printed = String::from_utf8_lossy(&rechunked.stdout);
    assert!(printed.contains("prompts: 0 of 1 proven"), "{printed}");
    let other_system = pipeline.cli(&["replay", &conversation_id, "--prompts", "--system-prompt", "Be terse."]);
    let printed = String::from_utf8_lossy(&other_system.stdout);
    assert!(printed.contains("the system prompt changed since") && printed.contains("0 of 1 proven"), "{printed}");

    // The next turn sends the first question again with the knowledge it was sent with, so
    // the model server can reuse the whole previous prompt; replay rebuilds that too.
    client.ask("k-2", Some(&conversation_id), "Thanks. Say it once more.").await;
    let second = client.until_outcome().await.pop().unwrap();
    assert_eq!(second["type"], "answer", "{second}");
    let events =
        log_events(&pipeline.brokers, &pipeline.registry, &pipeline.events_topic(), Some(&conversation_id), 5).await;
    let second_answer = events
        .iter()
        .filter_map(|(e, _)| match e {
            ConversationEvent::ResponseGenerated(answer) => Some(answer.clone()),
            _ => None,
        })
        .nth(1)
        .expect("a second answer");
    let proof = second_answer.prompt.expect("a prompt proof");
    assert_eq!(proof.knowledge_turns, [answer.query_event_id], "the first question went in with its knowledge");
    let replayed = pipeline.cli(&["replay", &conversation_id, "--prompts", "--format", "json"]);
    assert!(replayed.status.success(), "{}", String::from_utf8_lossy(&replayed.stderr));
    let replayed: Value = serde_json::from_slice(&replayed.stdout).unwrap();
    let prompt = &replayed["prompts"][1];
    assert_eq!(prompt["verdict"], "proven", "{prompt}");
    let earlier_question = prompt["messages"].as_array().unwrap().iter().find(|m| m["role"] == "user").unwrap();
    assert!(earlier_question["content"].as_str().unwrap().contains(FACT), "{prompt}");
    let first_prompt = &replayed["prompts"][0]["messages"];
    let prefix = first_prompt.as_array().unwrap();
    assert_eq!(&prompt["messages"].as_array().unwrap()[..prefix.len()], &prefix[..], "the first prompt is the prefix");

    // The conversation's messages are embedded too, as Alice's.
    pipeline
        .search_until(&alice_token, QUESTION, |h| h["kind"] == "message" && h["source_id"] == conversation_id.as_str())
        .await;
    pipeline.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn redelivered_events_overwrite_their_vectors_instead_of_adding() {
    let Some(stack) = stack() else { return };
    let pipeline = Pipeline::start(&stack, &[]).await;
    let (alice, alice_token) = pipeline.session_user().await;
    let corpus = tempfile::tempdir().unwrap();
    write_corpus(corpus.path());
    assert!(pipeline.cli(&["ingest", corpus.path().to_str().unwrap(), "--owner", &alice]).status.success());
    // Submitting the same files again is the same documents: same ids, same vectors.
    assert!(pipeline.cli(&["ingest", corpus.path().to_str().unwrap(), "--owner", &alice]).status.success());
    pipeline.search_until(&alice_token, "knots and tides", |h| h["label"] == "sailing.txt").await;

    let store = VectorStore::open(&pipeline.milvus(), 384, "all-MiniLM-L6-v2").await.unwrap();
    let owner = SearchFilter::owner(alice.parse().unwrap());
    let settled = wait_for_stable_count(&store, &owner).await;
    // Each document is about 1,100 characters: two chunks of at most 800.
    assert_eq!(settled, 6, "every document was chunked once");

    // A second embedder in a new consumer group re-reads every event from the start: the
    // redelivery of everything the first one stored.
    let group = format!("{}embedder-again", pipeline.prefix);
    let mut again = support::spawn(
        &[
            "--kafka-brokers",
            &pipeline.brokers,
            "--schema-registry-url",
            &pipeline.registry,
            "--topic-prefix",
            &pipeline.prefix,
            "--milvus-collection",
            &pipeline.collection,
            "embedder",
            "--embedder-group",
            &group,
        ]
        .map(str::to_owned),
        &pipeline.prefix,
        "embedder-again.log",
    );
    let documents_topic = format!("{}documents", pipeline.prefix);
    let deadline = Instant::now() + Duration::from_secs(120);
    // The group commits its offsets after Milvus acknowledged the upsert.
    while !caught_up(&pipeline.brokers, &group, &documents_topic) {
        assert!(Instant::now() < deadline, "the second embedder never re-stored the documents");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let _ = again.kill();
    let _ = again.wait();
    assert_eq!(store.count(&owner).await.unwrap(), settled, "a redelivery must not add vectors");
    pipeline.stop().await;
}

/// Whether consumer group `group` has committed offsets at the end of every partition of
/// `topic` (written without transactions, so the end offset is the last record's + 1).
fn caught_up(brokers: &str, group: &str, topic: &str) -> bool {
    let consumer: BaseConsumer =
        ClientConfig::new().set("bootstrap.servers", brokers).set("group.id", group).create().unwrap();
    let timeout = Duration::from_secs(10);
    let metadata = consumer.fetch_metadata(Some(topic), timeout).unwrap();
    let mut partitions = rdkafka::TopicPartitionList::new();
    for partition in metadata.topics()[0].partitions() {
        partitions.add_partition(topic, partition.id());
    }
    let committed = consumer.committed_offsets(partitions, timeout).unwrap();
    committed.elements().iter().all(|element| {
        let (_, end) = consumer.fetch_watermarks(topic, element.partition(), timeout).unwrap();
        match element.offset() {
            rdkafka::Offset::Offset(offset) => offset >= end,
            _ => end == 0,
        }
    })
}

/// The owner's vector count once it stops changing.
async fn wait_for_stable_count(store: &VectorStore, filter: &SearchFilter) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut last = u64::MAX;
    loop {
        let count = store.count(filter).await.unwrap();
        if count == last && count > 0 {
            return count;
        }
        assert!(Instant::now() < deadline, "vector count never settled");
        last = count;
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_deleted_document_is_no_longer_retrieved_and_only_its_owner_can_delete_it() {
    let Some(stack) = stack() else { return };
    let pipeline = Pipeline::start(&stack, &[]).await;
    let (alice, alice_token) = pipeline.session_user().await;
    let (_bob, bob_token) = pipeline.session_user().await;
    let (status, submitted) =
        pipeline.post("/api/documents", &alice_token, &json!({"title": "zephyr.md", "text": FACT})).await;
    assert_eq!(status, 202, "{submitted}");
    let document_id = submitted["document_id"].as_str().unwrap().to_owned();
    let is_the_fact = |h: &Value| h["source_id"] == document_id.as_str();
    pipeline.search_until(&alice_token, QUESTION, is_the_fact).await;
    // Once indexed, the document is listed for Alice, under its title, and never for Bob.
    let (status, listed) = pipeline.get("/api/documents", &alice_token).await;
    assert_eq!(status, 200, "{listed}");
    assert_eq!(
        listed["documents"],
        json!([{"document_id": document_id, "title": "zephyr.md", "event_id": submitted["event_id"]}])
    );
    let (_, bobs_documents) = pipeline.get("/api/documents", &bob_token).await;
    assert_eq!(bobs_documents["documents"], json!([]));
    let (status, refused) = pipeline.get("/api/documents?limit=0", &alice_token).await;
    assert_eq!((status, refused["error"].as_str()), (400, Some("invalid_parameter")), "{refused}");
    let listed = pipeline.cli(&["documents", "list", "--owner", &alice]);
    assert_eq!(String::from_utf8_lossy(&listed.stdout), format!("{document_id}  zephyr.md\n"), "{listed:?}");

    let path = format!("/api/documents/{document_id}");
    let (status, _) = pipeline.delete("/api/documents/not-a-uuid", &alice_token).await;
    assert_eq!(status, 400);
    let (status, _) = pipeline.delete(&path, "not-a-token").await;
    assert_eq!(status, 401);

    // Bob names Alice's document: accepted (it says nothing about whose it is), and once the
    // embedder has committed past his deletion, Alice still finds her document.
    let (status, bobs) = pipeline.delete(&path, &bob_token).await;
    assert_eq!(status, 202, "{bobs}");
    wait_until_embedder_passed(&pipeline, bobs["position"].as_str().unwrap()).await;
    pipeline.search_until(&alice_token, QUESTION, is_the_fact).await;

    let (status, alices) = pipeline.delete(&path, &alice_token).await;
    assert_eq!((status, alices["document_id"].as_str()), (202, Some(document_id.as_str())), "{alices}");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (_, found) =
            pipeline.get(&format!("/api/search?q={}&kind=document", support::urlencode(QUESTION)), &alice_token).await;
        if !found["hits"].as_array().unwrap().iter().any(is_the_fact) {
            break;
        }
        assert!(Instant::now() < deadline, "the deleted document is still found: {found}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(pipeline.get("/api/documents", &alice_token).await.1["documents"], json!([]));

    // An operator removes a document on a user's behalf from the command line.
    let (_, second) = pipeline
        .post("/api/documents", &alice_token, &json!({"title": "second.md", "text": "Tides turn twice a day."}))
        .await;
    let second_id = second["document_id"].as_str().unwrap().to_owned();
    pipeline.search_until(&alice_token, "tides", |h| h["source_id"] == second_id.as_str()).await;
    let deleted = pipeline.cli(&["documents", "delete", &second_id, "--owner", &alice]);
    assert!(deleted.status.success(), "{deleted:?}");
    assert!(String::from_utf8_lossy(&deleted.stdout).contains("documents/"), "{deleted:?}");
    let deadline = Instant::now() + Duration::from_secs(60);
    while pipeline.get("/api/documents", &alice_token).await.1["documents"] != json!([]) {
        assert!(Instant::now() < deadline, "the document deleted from the command line is still listed");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    pipeline.stop().await;
}

/// Waits until the embedder group's committed offset on the position's partition is past it.
async fn wait_until_embedder_passed(pipeline: &Pipeline, position: &str) {
    let parley_eventlog::LogPosition { topic, partition, offset } = position.parse().unwrap();
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &pipeline.brokers)
        .set("group.id", format!("{}embedder", pipeline.prefix))
        .create()
        .unwrap();
    let mut wanted = rdkafka::TopicPartitionList::new();
    wanted.add_partition(&topic, partition);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let committed = consumer.committed_offsets(wanted.clone(), Duration::from_secs(10)).unwrap();
        let next = committed.find_partition(&topic, partition).and_then(|p| p.offset().to_raw());
        if next.is_some_and(|next| next > offset) {
            return;
        }
        assert!(Instant::now() < deadline, "the embedder never committed past {position}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
