//! Stopping an answer: its text so far becomes the answer and the turn closes.

use super::*;
use crate::resume::resumed_turn;

#[tokio::test(flavor = "multi_thread")]
async fn a_cancel_stops_the_answer_keeps_its_text_so_far_and_closes_the_turn() {
    let Some(stack) = stack() else { return };
    let mut args = vec!["--without-retrieval", "--llm-max-tokens", "512"];
    args.extend(support::NO_RATE_LIMITS);
    let pipeline = Pipeline::start(&stack, &args).await;
    let (_, token) = pipeline.session_user().await;
    let mut client = pipeline.connect(&pipeline.http, &token).await;
    client.ask("long", None, "Write a long story about a dragon and a knight, at least 400 words.").await;
    let ack = client.reply_to("long").await;
    let (conversation, query) = (ack["conversation_id"].as_str().unwrap(), ack["event_id"].as_str().unwrap());
    // Stop it once it streams.
    let mut streamed = String::new();
    loop {
        let frame = client.next_frame().await;
        assert_eq!(frame["type"], "token", "the answer ended before it could be stopped: {frame}");
        streamed.push_str(frame["delta"].as_str().unwrap());
        if frame["index"] == 2 {
            break;
        }
    }
    let cancelled_at = Instant::now();
    client.send(json!({"type": "cancel", "conversation_id": conversation, "query_event_id": query})).await;
    let mut frames = Vec::new();
    let answer = loop {
        let frame = client.next_frame().await;
        match frame["type"].as_str() {
            Some("token") => streamed.push_str(frame["delta"].as_str().unwrap()),
            Some("answer") => break frame,
            _ => frames.push(frame),
        }
    };
    eprintln!("cancel → answer frame: {:?}", cancelled_at.elapsed());
    let result = frames.iter().find(|f| f["type"] == "cancel_result").expect("a cancel_result frame");
    assert_eq!(result["status"], "requested", "{result}");
    assert_eq!(answer["finish_reason"], "cancelled", "{answer}");
    assert_eq!(answer["text"].as_str().unwrap(), streamed, "the answer is exactly what was streamed");
    let completion_tokens = answer["completion_tokens"].as_i64().unwrap();
    assert!((3..512).contains(&completion_tokens), "stopped early: {answer}");

    // The turn is closed: the next question is answered; the stopped one is complete now.
    client.ask("next", Some(conversation), "Say OK.").await;
    assert_eq!(client.reply_to("next").await["type"], "ack");
    let next = client.until_outcome().await.pop().unwrap();
    assert_eq!(next["type"], "answer");
    assert_ne!(next["finish_reason"], "cancelled", "only the stopped turn is cancelled");
    client.send(json!({"type": "cancel", "conversation_id": conversation, "query_event_id": query})).await;
    let again = client.until("cancel_result").await.pop().unwrap();
    assert_eq!(again["status"], "already_complete", "{again}");

    // Nothing else is revealed or harmed: an unknown query, someone else's conversation.
    let unknown_query = uuid::Uuid::new_v4().to_string();
    client.send(json!({"type": "cancel", "conversation_id": conversation, "query_event_id": unknown_query})).await;
    assert_eq!(client.until("error").await.pop().unwrap()["code"], "unknown_query");
    let mut stranger = pipeline.client().await;
    stranger.send(json!({"type": "cancel", "conversation_id": conversation, "query_event_id": query})).await;
    assert_eq!(stranger.until("error").await.pop().unwrap()["code"], "unknown_conversation");
    let (status, body) = pipeline.post(&format!("/api/conversations/{conversation}/cancel"), &token, &json!({})).await;
    assert_eq!((status, body["status"].as_str()), (200, Some("nothing_to_cancel")), "{body}");

    // The cancel is a fact on the log, between the query and its (cancelled) answer.
    let events = read_topic_of(&pipeline, 6).await;
    let kinds: Vec<&str> = events.iter().map(|(e, _)| e.type_name()).collect();
    assert_eq!(
        kinds,
        [
            "ConversationStarted",
            "UserQueryReceived",
            "TurnCancelRequested",
            "LLMResponseGenerated",
            "UserQueryReceived",
            "LLMResponseGenerated"
        ]
    );
    let ConversationEvent::CancelRequested(cancel) = &events[2].0 else { panic!("{events:?}") };
    assert_eq!((cancel.query_event_id.to_string().as_str(), cancel.envelope.sequence), (query, 2));
    let replay = pipeline.cli(&["replay", conversation, "--scan"]);
    let shown = String::from_utf8_lossy(&replay.stdout);
    assert!(replay.status.success() && shown.contains("cancel     asked by"), "{shown}");
    let audit = pipeline.cli(&["audit", conversation, "--scan"]);
    let audit = String::from_utf8_lossy(&audit.stdout);
    assert!(audit.contains("TurnCancelRequested") && audit.contains("stopped by a cancel after"), "{audit}");
    pipeline.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn with_cancel_after_disconnect_an_answer_nobody_follows_is_stopped() {
    let Some(stack) = stack() else { return };
    let mut args = vec!["--without-retrieval", "--llm-max-tokens", "512", "--cancel-after-disconnect", "300ms"];
    args.extend(support::NO_RATE_LIMITS);
    let pipeline = Pipeline::start(&stack, &args).await;
    let (_, token) = pipeline.session_user().await;
    let mut client = pipeline.connect(&pipeline.http, &token).await;
    client.ask("story", None, "Write a long story about a dragon and a knight, at least 400 words.").await;
    let ack = client.reply_to("story").await;
    while client.next_frame().await["index"] != 2 {}
    drop(client);
    // After the grace period, the answer was stopped where it was.
    pipeline.outcome_in_log(ack["event_id"].as_str().unwrap()).await;
    let mut back = pipeline.connect(&pipeline.http, &token).await;
    let resume = json!({"type": "resume", "conversation_id": ack["conversation_id"], "query_event_id": ack["event_id"],
                        "last_index": -1});
    back.send(resume).await;
    let (status, _, _, answer) = resumed_turn(&mut back).await;
    assert_eq!((status.as_str(), &answer["finish_reason"]), ("complete", &json!("cancelled")), "{answer}");
    pipeline.stop().await;
}
