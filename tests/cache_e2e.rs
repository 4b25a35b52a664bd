//! The semantic cache end to end on the real stack (default settings, retrieval on): a
//! paraphrase of a question answered before is answered from the cache (the earlier
//! answer's text, marked with where it came from, streamed like any answer, zero model
//! tokens), while `no_cache`, a near miss, another person and another context all go to
//! the model; metrics count the hit; replay shows it; a rebuild keeps the cache, and a
//! deleted document takes the answers that quoted it along.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use serde_json::{Value, json};
use support::{Client, Pipeline, stack};

const QUESTION: &str = "What is the capital of France? Answer in one word.";
const PARAPHRASE: &str = "what's the capital of france? answer in one word";

/// Asks `text` (in a new conversation unless `conversation` is given) and returns the
/// frames up to the outcome.
async fn ask(client: &mut Client, id: &str, conversation: Option<&str>, text: &str, no_cache: bool) -> Vec<Value> {
    let mut frame = json!({"type": "query", "client_message_id": id, "text": text, "no_cache": no_cache});
    if let Some(conversation) = conversation {
        frame["conversation_id"] = json!(conversation);
    }
    client.send(frame).await;
    client.until_outcome().await
}

fn answer(frames: &[Value]) -> &Value {
    let last = frames.last().unwrap();
    assert_eq!(last["type"], "answer", "{frames:?}");
    last
}

#[tokio::test(flavor = "multi_thread")]
async fn a_paraphrase_is_answered_from_the_cache_and_nothing_else_is() {
    let Some(stack) = stack() else { return };
    // Only a complete answer is cached: short questions, and room to finish.
    let pipeline = Pipeline::start(&stack, &["--llm-max-tokens", "512"]).await;
    let (alice_id, token) = pipeline.session_user().await;
    let mut alice = pipeline.connect(&pipeline.http, &token).await;

    let first = ask(&mut alice, "q1", None, QUESTION, false).await;
    let original = answer(&first).clone();
    assert!(original.get("cached_from").is_none(), "the model answered: {original}");
    assert_eq!(original["finish_reason"], "stop", "a complete answer, which the cache keeps: {original}");
    let conversation = original["conversation_id"].as_str().unwrap().to_owned();
    let query_event_id = original["query_event_id"].as_str().unwrap().to_owned();
    // The question is indexed (the embedder) and its answer is in the cache (the projector).
    pipeline.search_until(&token, QUESTION, |hit| hit["source_event_id"] == query_event_id.as_str()).await;
    cache_list_until(&pipeline, &alice_id, |text| text.contains(&query_event_id)).await;

    // A paraphrase, in another conversation: the same answer, from the cache.
    let frames = ask(&mut alice, "q2", None, PARAPHRASE, false).await;
    let cached = answer(&frames);
    assert_eq!(cached["cached_from"]["answer_event_id"], original["event_id"], "{cached}");
    assert_eq!(cached["cached_from"]["query_event_id"], original["query_event_id"]);
    assert!(cached["cached_from"]["similarity"].as_f64().unwrap() >= 0.8, "{cached}");
    assert_eq!(cached["text"], original["text"]);
    assert_eq!((cached["prompt_tokens"].as_i64(), cached["completion_tokens"].as_i64()), (Some(0), Some(0)));
    assert!(frames.iter().any(|f| f["type"] == "token" && f["delta"] == original["text"]), "streamed: {frames:?}");
    let cached_conversation = cached["conversation_id"].as_str().unwrap().to_owned();

    // Asked to skip the cache, the model answers.
    let fresh = ask(&mut alice, "q3", None, PARAPHRASE, true).await;
    assert!(answer(&fresh).get("cached_from").is_none(), "no_cache: {fresh:?}");
    // A near miss, another context (the same words again in the first conversation), and
    // another person all go to the model.
    for (id, conversation, text) in [
        ("q4", None, "What is the capital of Germany? Answer in one word."),
        ("q5", Some(conversation.as_str()), QUESTION),
    ] {
        let frames = ask(&mut alice, id, conversation, text, false).await;
        assert!(answer(&frames).get("cached_from").is_none(), "{text}: {frames:?}");
    }
    let (_, bob_token) = pipeline.session_user().await;
    let mut bob = pipeline.connect(&pipeline.http, &bob_token).await;
    let frames = ask(&mut bob, "b1", None, QUESTION, false).await;
    assert!(answer(&frames).get("cached_from").is_none(), "another person's cache: {frames:?}");

    // Counted, and shown by replay.
    let metrics = reqwest::get(format!("{}/metrics", pipeline.http)).await.unwrap().text().await.unwrap();
    let hits = metrics
        .lines()
        .find(|line| line.starts_with("parley_semantic_cache_lookups_total{result=\"hit\"}"))
        .and_then(|line| line.rsplit(' ').next()?.parse::<f64>().ok());
    assert_eq!(hits, Some(1.0), "{metrics}");
    let replay = pipeline.cli(&["replay", &cached_conversation]);
    let shown = String::from_utf8_lossy(&replay.stdout);
    assert!(replay.status.success(), "{shown}");
    assert!(shown.contains(&format!("from cache: {}", original["event_id"].as_str().unwrap())), "{shown}");
    let projected = pipeline.conversation_when(&token, &cached_conversation, 2).await;
    assert_eq!(projected["messages"][1]["cached_from"]["answer_event_id"], original["event_id"], "{projected}");
    pipeline.stop().await;
}

/// Waits until `parley cache list` for `user` satisfies `done`, and returns its output.
async fn cache_list_until(pipeline: &Pipeline, user: &str, done: impl Fn(&str) -> bool) -> String {
    support::wait_until("the cache listing", || async {
        let listed = pipeline.cli(&["cache", "list", user]);
        let text = String::from_utf8_lossy(&listed.stdout).into_owned();
        (listed.status.success() && done(&text)).then_some(text)
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn deleting_a_document_removes_the_cached_answers_that_quoted_it() {
    let Some(stack) = stack() else { return };
    // A keyspace of its own: the test rebuilds the projection.
    let keyspace = format!("parley_cache_{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
    let pipeline = Pipeline::start_in(&stack, &keyspace, &["--llm-max-tokens", "512"]).await;
    let (alice, token) = pipeline.session_user().await;
    let fact = "The maintenance code of the Quasar-7 turbine is amber-falcon-19.";
    let question = "What is the maintenance code of the Quasar-7 turbine? Answer in one sentence.";
    let (status, submitted) =
        pipeline.post("/api/documents", &token, &json!({"title": "quasar.md", "text": fact})).await;
    assert_eq!(status, 202, "{submitted}");
    let document_id = submitted["document_id"].as_str().unwrap().to_owned();
    pipeline.search_until(&token, question, |hit| hit["source_id"] == document_id.as_str()).await;

    let mut client = pipeline.connect(&pipeline.http, &token).await;
    let first = ask(&mut client, "q1", None, question, false).await;
    let original = answer(&first).clone();
    assert_eq!(original["finish_reason"], "stop", "a complete answer, which the cache keeps: {original}");
    assert!(
        original["retrieved"].as_array().unwrap().iter().any(|r| r["source_id"] == document_id.as_str()),
        "the answer quoted the document: {original}"
    );
    let query_event_id = original["query_event_id"].as_str().unwrap().to_owned();
    pipeline.search_until(&token, question, |hit| hit["source_event_id"] == query_event_id.as_str()).await;
    let listed = cache_list_until(&pipeline, &alice, |text| text.contains(&query_event_id)).await;
    assert!(listed.contains(&format!("documents: {document_id}/")), "{listed}");
    // The cache is a projection of the log: a rebuilt generation has the same rows.
    let rebuilt = pipeline.cli(&["projections", "rebuild", "context"]);
    assert!(rebuilt.status.success(), "{rebuilt:?}");
    let relisted = cache_list_until(&pipeline, &alice, |text| text.contains(&query_event_id)).await;
    assert_eq!(relisted.lines().count(), listed.lines().count(), "{listed}\n{relisted}");
    let cached = ask(
        &mut client,
        "q2",
        None,
        "what's the maintenance code of the quasar-7 turbine? answer in one sentence",
        false,
    )
    .await;
    assert_eq!(answer(&cached)["cached_from"]["answer_event_id"], original["event_id"], "{cached:?}");

    // The document goes: so do the cached answers that quoted it.
    let (status, _) = pipeline.delete(&format!("/api/documents/{document_id}"), &token).await;
    assert_eq!(status, 202);
    cache_list_until(&pipeline, &alice, |text| text.starts_with("0 cached answers")).await;
    let after = ask(
        &mut client,
        "q3",
        None,
        "What's the maintenance code of the Quasar-7 turbine? Answer in one sentence.",
        false,
    )
    .await;
    assert!(answer(&after).get("cached_from").is_none(), "{after:?}");

    // `parley cache clear` empties a user's cache; their conversations stay.
    // Only a complete answer is cached, and a small model now and then runs on to the
    // token limit: ask again (a new conversation each time) until one stops by itself.
    let mut plain = ask(&mut client, "q4", None, "Say OK.", false).await;
    for retry in ["q5", "q6", "q7"] {
        if answer(&plain)["finish_reason"] == "stop" {
            break;
        }
        plain = ask(&mut client, retry, None, "Say OK.", false).await;
    }
    assert_eq!(answer(&plain)["finish_reason"], "stop", "no complete answer in four tries: {plain:?}");
    let plain_query = answer(&plain)["query_event_id"].as_str().unwrap().to_owned();
    cache_list_until(&pipeline, &alice, |text| text.contains(&plain_query)).await;
    let cleared = pipeline.cli(&["cache", "clear", &alice]);
    assert!(cleared.status.success(), "{cleared:?}");
    cache_list_until(&pipeline, &alice, |text| text.starts_with("0 cached answers")).await;
    let conversation = answer(&plain)["conversation_id"].as_str().unwrap().to_owned();
    let (status, _) = pipeline.get(&format!("/api/conversations/{conversation}"), &token).await;
    assert_eq!(status, 200);
    pipeline.stop().await;
}
