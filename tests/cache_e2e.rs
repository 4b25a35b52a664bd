//! The semantic cache end to end on the real stack (default settings, retrieval on): a
//! paraphrase of a question answered before is answered from the cache (the earlier
//! answer's text, marked with where it came from, streamed like any answer, zero model
//! tokens), while `no_cache`, a near miss, another person and another context all go to
//! the model; metrics count the hit; replay shows it.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use serde_json::{Value, json};
use support::{Client, Pipeline, stack};

const QUESTION: &str = "What is the capital of France?";
const PARAPHRASE: &str = "what's the capital of france";

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
    let pipeline = Pipeline::start(&stack, &[]).await;
    let (_, token) = pipeline.session_user().await;
    let mut alice = pipeline.connect(&pipeline.http, &token).await;

    let first = ask(&mut alice, "q1", None, QUESTION, false).await;
    let original = answer(&first).clone();
    assert!(original.get("cached_from").is_none(), "the model answered: {original}");
    let conversation = original["conversation_id"].as_str().unwrap().to_owned();
    let query_event_id = original["query_event_id"].as_str().unwrap().to_owned();
    // The question is indexed (the embedder) and its answer is in the projection.
    pipeline.search_until(&token, QUESTION, |hit| hit["source_event_id"] == query_event_id.as_str()).await;
    support::wait_until("the answer in the projection", || async {
        let (_, state) = pipeline.get(&format!("/api/conversations/{conversation}"), &token).await;
        (state["messages"].as_array().map_or(0, Vec::len) >= 2).then_some(())
    })
    .await;

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
    for (id, conversation, text) in
        [("q4", None, "What is the capital of Germany?"), ("q5", Some(conversation.as_str()), QUESTION)]
    {
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
    pipeline.stop().await;
}
