//! The vector store against the real Milvus Lite of the local stack (PARLEY_MILVUS_URL).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use clap::Parser;
use parley_events::{ConversationId, EventId, UserId};
use parley_retrieval::store::MilvusSettings;
use parley_retrieval::{RetrievalError, SearchFilter, SourceKind, VectorRecord, VectorStore};

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    milvus: MilvusSettings,
}

fn settings(collection: &str) -> Option<MilvusSettings> {
    if std::env::var("PARLEY_MILVUS_URL").is_err() {
        assert!(
            !std::env::var("PARLEY_REQUIRE_STACK").is_ok_and(|v| v == "1"),
            "PARLEY_REQUIRE_STACK=1 but PARLEY_MILVUS_URL is not set"
        );
        eprintln!("skipped: PARLEY_MILVUS_URL not set (start the stack with infra/stack.sh start)");
        return None;
    }
    Some(Cli::parse_from(["test", "--milvus-collection", collection]).milvus)
}

fn record(id: &str, owner: &str, kind: SourceKind, source: &str, embedding: Vec<f32>) -> VectorRecord {
    let source = stream(source);
    VectorRecord {
        id: id.into(),
        owner: user(owner),
        kind,
        source_id: source,
        source_event_id: EventId::random(),
        position: 1,
        label: "notes.md".into(),
        text: format!("text of {id}"),
        embedding,
    }
}

/// The stream id the test calls `name` (doc-a, conv-a…): the same name, the same id.
fn stream(name: &str) -> ConversationId {
    uuid::Uuid::new_v5(&uuid::Uuid::NAMESPACE_OID, name.as_bytes()).into()
}

fn user(name: &str) -> UserId {
    name.parse().unwrap()
}

fn unit(x: f32, y: f32) -> Vec<f32> {
    let n = (x * x + y * y).sqrt();
    vec![x / n, y / n, 0.0, 0.0]
}

#[tokio::test(flavor = "multi_thread")]
async fn upserts_are_idempotent_and_searches_stay_inside_the_owner() {
    let Some(settings) = settings("test_store_isolation") else { return };
    VectorStore::drop_collection(&settings).await.unwrap();
    let store = VectorStore::open(&settings, 4, "test").await.unwrap();
    let records = vec![
        record("a1", "alice", SourceKind::Document, "doc-a", unit(1.0, 0.0)),
        record("a2", "alice", SourceKind::Message, "conv-a", unit(0.0, 1.0)),
        // Bob's vector is the closest one to the query, and must never reach Alice.
        record("b1", "bob", SourceKind::Document, "doc-b", unit(1.0, 0.01)),
    ];
    store.upsert(&records).await.unwrap();
    store.upsert(&records).await.unwrap(); // a re-delivery
    assert_eq!(store.count(&SearchFilter::owner(user("alice"))).await.unwrap(), 2);
    assert_eq!(store.count(&SearchFilter::owner(user("bob"))).await.unwrap(), 1);

    let hits = store.search_vectors(unit(1.0, 0.01), &SearchFilter::owner(user("alice")), 10).await.unwrap();
    assert_eq!(hits.iter().map(|h| h.id.as_str()).collect::<Vec<_>>(), ["a1", "a2"], "{hits:?}");
    assert!(hits[0].score > 0.99 && hits[0].score > hits[1].score, "{hits:?}");
    assert_eq!(
        (hits[0].kind, hits[0].source_id.as_str(), hits[0].text.as_str()),
        (SourceKind::Document, stream("doc-a").to_string().as_str(), "text of a1")
    );

    let messages_only = SearchFilter { kind: Some(SourceKind::Message), ..SearchFilter::owner(user("alice")) };
    let hits = store.search_vectors(unit(1.0, 0.0), &messages_only, 10).await.unwrap();
    assert_eq!(hits.iter().map(|h| h.id.as_str()).collect::<Vec<_>>(), ["a2"]);
    let other_sources =
        SearchFilter { exclude_source_ids: vec![stream("doc-a").to_string()], ..SearchFilter::owner(user("alice")) };
    let hits = store.search_vectors(unit(1.0, 0.0), &other_sources, 10).await.unwrap();
    assert_eq!(hits.iter().map(|h| h.id.as_str()).collect::<Vec<_>>(), ["a2"]);
    let one_document =
        SearchFilter { source_ids: vec![stream("doc-a").to_string()], ..SearchFilter::owner(user("alice")) };
    assert_eq!(store.search_vectors(unit(0.0, 1.0), &one_document, 10).await.unwrap().len(), 1);
    assert!(store.search_vectors(unit(1.0, 0.0), &SearchFilter::owner(user("carol")), 10).await.unwrap().is_empty());

    // A deletion names its owner: Alice's filter for Bob's document removes nothing.
    let documents = |owner: &str, id: &str| SearchFilter {
        kind: Some(SourceKind::Document),
        source_ids: vec![stream(id).to_string()],
        ..SearchFilter::owner(user(owner))
    };
    store.delete(&documents("alice", "doc-b")).await.unwrap();
    assert_eq!(store.count(&SearchFilter::owner(user("bob"))).await.unwrap(), 1);
    store.delete(&documents("alice", "doc-a")).await.unwrap();
    assert_eq!(store.count(&SearchFilter::owner(user("alice"))).await.unwrap(), 1, "only the document's vector goes");
    let hits = store.search_vectors(unit(1.0, 0.0), &SearchFilter::owner(user("alice")), 10).await.unwrap();
    assert_eq!(hits.iter().map(|h| h.id.as_str()).collect::<Vec<_>>(), ["a2"]);

    VectorStore::drop_collection(&settings).await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_collection_of_another_dimension_is_refused_at_open() {
    let Some(settings) = settings("test_store_dimension") else { return };
    VectorStore::drop_collection(&settings).await.unwrap();
    VectorStore::open(&settings, 4, "four-d").await.unwrap();
    let err = VectorStore::open(&settings, 384, "all-MiniLM-L6-v2").await.unwrap_err();
    assert!(
        matches!(err, RetrievalError::DimensionMismatch { collection_dimension: 4, backend_dimension: 384, .. }),
        "{err:?}"
    );
    assert!(err.to_string().contains("all-MiniLM-L6-v2"), "{err}");
    VectorStore::drop_collection(&settings).await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn keywords_find_an_exact_identifier_the_vectors_rank_last_and_hybrid_keeps_both() {
    let Some(settings) = settings("test_store_keywords") else { return };
    VectorStore::drop_collection(&settings).await.unwrap();
    let store = VectorStore::open(&settings, 4, "test").await.unwrap();
    let with_text = |id: &str, owner: &str, text: &str, embedding: Vec<f32>| VectorRecord {
        text: text.into(),
        ..record(id, owner, SourceKind::Document, "doc-k", embedding)
    };
    store
        .upsert(&[
            with_text("n1", "alice", "Checkout failed with error E4021 on host chk-07.", unit(0.0, 1.0)),
            with_text("n2", "alice", "Checkout failed with error E7310 on host chk-12.", unit(1.0, 0.0)),
            with_text("n3", "alice", "The garden needs water on Sundays.", unit(0.7, 0.7)),
            // Bob's note holds the same code, and must never reach Alice.
            with_text("b1", "bob", "error E4021 again", unit(1.0, 0.0)),
        ])
        .await
        .unwrap();
    store.flush().await.unwrap();
    let alice = SearchFilter::owner(user("alice"));

    let hits = store.search_keywords("What fixed E4021?", None, &alice, 10).await.unwrap();
    assert_eq!(hits.first().map(|h| h.id.as_str()), Some("n1"), "{hits:?}");
    assert!(hits.iter().all(|h| h.id != "b1" && h.keyword_score.is_some_and(|s| s > 0.0) && h.similarity.is_none()));
    assert!(
        store.search_keywords("the of and", None, &alice, 10).await.unwrap().is_empty(),
        "stop words match nothing"
    );

    // The question's vector points at n2 and ranks n1 last; its words find n1 alone.
    // Hybrid (the default) puts n1 first (found by both lists), then the vectors' order,
    // each hit with its own side's scores.
    assert_eq!(store.search_mode(), parley_retrieval::SearchMode::Hybrid);
    let hits = store.search("What fixed E4021?", Some(unit(1.0, 0.0)), &alice, 3).await.unwrap();
    let ids: Vec<&str> = hits.iter().map(|h| h.id.as_str()).collect();
    assert_eq!(ids, ["n1", "n2", "n3"], "{hits:?}");
    // The default index (HNSW_SQ) stores 8-bit scalars, so a cosine is exact to about 0.01.
    assert!(
        hits[0].similarity.is_some_and(|s| s.abs() < 0.02) && hits[0].keyword_score.is_some(),
        "n1's cosine, computed: {hits:?}"
    );
    assert!(hits[1].similarity.is_some_and(|s| s > 0.99) && hits[1].keyword_score.is_none(), "{hits:?}");

    VectorStore::drop_collection(&settings).await.unwrap();
}
