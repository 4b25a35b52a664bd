//! Following an answer on other sockets and resuming it after a reconnect, on any gateway.

use super::*;

/// Frames of one turn as a following socket sees them: the question (when it was asked
/// elsewhere), then the deltas and the outcome.
async fn follow_turn(client: &mut support::Client) -> (Option<Value>, String, Value) {
    let (mut question, mut streamed) = (None, String::new());
    loop {
        let frame = client.next_frame().await;
        match frame["type"].as_str() {
            Some("question") => question = Some(frame),
            Some("token") => {
                if frame["index"] == 0 {
                    streamed.clear();
                }
                streamed.push_str(frame["delta"].as_str().unwrap());
            }
            Some("answer" | "failed") => return (question, streamed, frame),
            _ => {}
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn every_tab_of_a_user_sees_the_question_the_stream_and_the_answer_on_any_gateway() {
    let Some(stack) = stack() else { return };
    let mut args = vec!["--without-retrieval"];
    args.extend(support::NO_RATE_LIMITS);
    let mut pipeline = Pipeline::start(&stack, &args).await;
    let (_, token) = pipeline.session_user().await;
    let mut asking = pipeline.connect(&pipeline.http, &token).await;
    asking.ask("first", None, "Say hello.").await;
    let conversation = asking.reply_to("first").await["conversation_id"].as_str().unwrap().to_owned();
    asking.until_outcome().await;

    // Another tab on the same gateway, and a phone on a gateway started after the question.
    let second_gateway = pipeline.extra_gateway(&args).await;
    let mut tab = pipeline.connect(&pipeline.http, &token).await;
    let mut phone = pipeline.connect(&second_gateway, &token).await;
    for follower in [&mut tab, &mut phone] {
        follower.send(json!({"type": "subscribe", "conversation_id": conversation})).await;
        assert_eq!(follower.until("subscribed").await.pop().unwrap()["conversation_id"], conversation.as_str());
    }
    asking.ask("second", Some(&conversation), "Name three colors.").await;
    let ack = asking.reply_to("second").await;
    let (_, asked_stream, answer) = follow_turn(&mut asking).await;
    assert_eq!(answer["type"], "answer", "{answer}");
    assert_eq!(asked_stream, answer["text"].as_str().unwrap());
    for follower in [&mut tab, &mut phone] {
        let (question, streamed, outcome) = follow_turn(follower).await;
        let question = question.expect("the question asked in the other tab");
        assert_eq!(question["event_id"], ack["event_id"]);
        assert_eq!(question["text"], "Name three colors.");
        assert_eq!(outcome["event_id"], answer["event_id"], "the same answer everywhere");
        assert_eq!(streamed, answer["text"].as_str().unwrap(), "the whole stream, in every tab");
    }
    pipeline.stop().await;
}

/// The frames of a resumed answer up to its outcome: (status, token indices, text, outcome).
pub(crate) async fn resumed_turn(client: &mut support::Client) -> (String, Vec<i64>, String, Value) {
    let status = client.until("resumed").await.pop().unwrap()["status"].as_str().unwrap().to_owned();
    let (mut indices, mut text) = (Vec::new(), String::new());
    loop {
        let frame = client.next_frame().await;
        match frame["type"].as_str() {
            Some("token") => {
                indices.push(frame["index"].as_i64().unwrap());
                text.push_str(frame["delta"].as_str().unwrap());
            }
            Some("answer" | "failed") => return (status, indices, text, frame),
            _ => {}
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_resume_after_the_deltas_aged_out_says_so_and_still_gets_the_answer() {
    use rdkafka::admin::{AdminClient, AdminOptions};
    use rdkafka::client::DefaultClientContext;

    let Some(stack) = stack() else { return };
    let mut args = vec!["--without-retrieval", "--llm-max-tokens", "512"];
    args.extend(support::NO_RATE_LIMITS);
    let pipeline = Pipeline::start(&stack, &args).await;
    let (_, token) = pipeline.session_user().await;
    let mut first = pipeline.connect(&pipeline.http, &token).await;
    first.ask("story", None, "Write a long story about a dragon and a knight, at least 400 words.").await;
    let ack = first.reply_to("story").await;
    let (conversation, query) = (ack["conversation_id"].clone(), ack["event_id"].clone());
    // The client has the deltas up to index 2; the answer goes on past index 6.
    let mut position = String::new();
    loop {
        let frame = first.next_frame().await;
        assert_eq!(frame["type"], "token", "{frame}");
        if frame["index"] == 2 {
            position = frame["position"].as_str().unwrap().to_owned();
        }
        if frame["index"] == 6 {
            break;
        }
    }
    drop(first);

    // Retention takes the deltas the client missed (as the tokens topic's hour would).
    let LogPosition { topic, partition, .. } = position.parse().unwrap();
    let admin: AdminClient<DefaultClientContext> =
        ClientConfig::new().set("bootstrap.servers", &pipeline.brokers).create().unwrap();
    let mut up_to_the_end = rdkafka::TopicPartitionList::new();
    up_to_the_end.add_partition_offset(&topic, partition, rdkafka::Offset::End).unwrap();
    admin.delete_records(&up_to_the_end, &AdminOptions::new()).await.unwrap();

    let mut back = pipeline.connect(&pipeline.http, &token).await;
    back.send(json!({"type": "resume", "conversation_id": conversation, "query_event_id": query,
                     "last_index": 2, "position": position}))
        .await;
    let (status, indices, _, answer) = resumed_turn(&mut back).await;
    assert_eq!(status, "tokens_expired", "the answer was still being generated");
    assert_eq!(answer["type"], "answer", "{answer}");
    assert_eq!(answer["query_event_id"], query);
    assert!(indices.windows(2).all(|w| w[0] < w[1]) && indices.iter().all(|i| *i > 2), "live deltas only: {indices:?}");
    pipeline.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_reconnected_client_resumes_the_answer_with_no_gap_and_no_repeat_on_any_gateway() {
    let Some(stack) = stack() else { return };
    let mut args = vec!["--without-retrieval", "--llm-max-tokens", "512"];
    args.extend(support::NO_RATE_LIMITS);
    let mut pipeline = Pipeline::start(&stack, &args).await;
    let (_, token) = pipeline.session_user().await;
    let mut first = pipeline.connect(&pipeline.http, &token).await;
    first.ask("story", None, "Write a long story about a dragon and a knight, at least 400 words.").await;
    let ack = first.reply_to("story").await;
    let (conversation, query) = (ack["conversation_id"].clone(), ack["event_id"].clone());
    let mut had = String::new();
    let last_position = loop {
        let frame = first.next_frame().await;
        assert_eq!(frame["type"], "token", "{frame}");
        had.push_str(frame["delta"].as_str().unwrap());
        if frame["index"] == 4 {
            break frame["position"].clone();
        }
    };
    drop(first); // the network drops mid-answer

    // Back on a gateway started since (it never held the conversation), from the last
    // delta the client has.
    let second_gateway =
        pipeline.extra_gateway(&[&["--without-retrieval"][..], &support::NO_RATE_LIMITS].concat()).await;
    let mut phone = pipeline.connect(&second_gateway, &token).await;
    let resume = json!({"type": "resume", "conversation_id": conversation, "query_event_id": query,
                        "last_index": 4, "position": last_position});
    phone.send(resume).await;
    // A reloaded page that has nothing of the answer yet.
    let mut reloaded = pipeline.connect(&pipeline.http, &token).await;
    reloaded
        .send(json!({"type": "resume", "conversation_id": conversation, "query_event_id": query, "last_index": -1}))
        .await;

    let (status, indices, rest, answer) = resumed_turn(&mut phone).await;
    assert_eq!(status, "streaming", "the answer was still being generated");
    assert_eq!(answer["type"], "answer", "{answer}");
    assert_ne!(answer["finish_reason"], "cancelled", "disconnecting does not cancel");
    let expected: Vec<i64> = (5..5 + i64::try_from(indices.len()).unwrap()).collect();
    assert_eq!(indices, expected, "no gap, no repeat");
    assert_eq!(format!("{had}{rest}"), answer["text"].as_str().unwrap());
    let (status, indices, all, again) = resumed_turn(&mut reloaded).await;
    assert_eq!(status, "streaming");
    assert_eq!(indices, (0..i64::try_from(indices.len()).unwrap()).collect::<Vec<_>>());
    assert_eq!((all.as_str(), &again["event_id"]), (answer["text"].as_str().unwrap(), &answer["event_id"]));

    // Once the answer exists, a resume gets it whole; unknown queries and strangers get errors.
    phone
        .send(json!({"type": "resume", "conversation_id": conversation, "query_event_id": query, "last_index": 2}))
        .await;
    let (status, indices, _, done) = resumed_turn(&mut phone).await;
    assert_eq!((status.as_str(), indices.len(), &done["event_id"]), ("complete", 0, &answer["event_id"]));
    let unknown = uuid::Uuid::new_v4().to_string();
    phone
        .send(json!({"type": "resume", "conversation_id": conversation, "query_event_id": unknown, "last_index": -1}))
        .await;
    assert_eq!(phone.until("error").await.pop().unwrap()["code"], "unknown_query");
    let mut stranger = pipeline.client().await;
    stranger
        .send(json!({"type": "resume", "conversation_id": conversation, "query_event_id": query, "last_index": -1}))
        .await;
    assert_eq!(stranger.until("error").await.pop().unwrap()["code"], "unknown_conversation");
    pipeline.stop().await;
}
