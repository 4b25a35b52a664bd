//! A resent question is recognised, never asked twice.

use super::*;

#[tokio::test(flavor = "multi_thread")]
async fn a_repeated_client_message_id_yields_one_query_and_one_answer() {
    let Some(stack) = stack() else { return };
    let pipeline = Pipeline::start(&stack, &[]).await;
    let mut client = pipeline.client().await;
    client.ask("dup-1", None, "Count to three.").await;
    let first = client.until_outcome().await;
    let ack = only(&first, "ack")[0].clone();
    client.ask("dup-1", None, "Count to three.").await;
    let again = client.until("answer").await;
    let repeated_ack = only(&again, "ack")[0];
    assert_eq!(repeated_ack["duplicate"], true);
    assert_eq!(repeated_ack["event_id"], ack["event_id"]);
    assert_eq!(again.last().unwrap()["text"], first.last().unwrap()["text"]);

    let events = read_topic_of(&pipeline, 3).await;
    let queries = events.iter().filter(|(e, _)| matches!(e, ConversationEvent::QueryReceived(_))).count();
    let answers = events.iter().filter(|(e, _)| matches!(e, ConversationEvent::ResponseGenerated(_))).count();
    assert_eq!((queries, answers), (1, 1), "{events:?}");
    pipeline.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_resent_earlier_turn_is_a_duplicate_on_any_gateway_and_after_a_restart() {
    let Some(stack) = stack() else { return };
    let mut pipeline = Pipeline::start(&stack, &[]).await;
    let token = pipeline.session().await;
    let mut client = pipeline.connect(&pipeline.http, &token).await;
    client.ask("turn-a", None, "Name a fruit.").await;
    let first = client.until_outcome().await;
    let (ack_a, answer_a) = (only(&first, "ack")[0].clone(), first.last().unwrap().clone());
    let conversation = ack_a["conversation_id"].as_str().unwrap().to_owned();
    client.ask("turn-b", Some(&conversation), "Name a vegetable.").await;
    let second = client.until_outcome().await;
    let answer_b = second.last().unwrap().clone();

    // The same message again, as a client retrying after a reconnect sends it: with and
    // without the conversation id, on the same gateway, on another one, and after a restart.
    let expect_duplicate = |frames: &[Value], ack: &Value, answer: &Value, context: &str| {
        let acks = only(frames, "ack");
        assert_eq!(acks.len(), 1, "{context}: {frames:?}");
        assert_eq!(acks[0]["duplicate"], true, "{context}: {frames:?}");
        for field in ["event_id", "sequence", "position", "conversation_id"] {
            assert_eq!(acks[0][field], ack[field], "{context}: {field}");
        }
        let outcome = frames.last().unwrap();
        assert_eq!((&outcome["event_id"], &outcome["text"]), (&answer["event_id"], &answer["text"]), "{context}");
    };
    client.ask("turn-a", Some(&conversation), "Name a fruit.").await;
    expect_duplicate(&client.until_outcome().await, &ack_a, &answer_a, "earlier turn, same gateway");
    client.ask("turn-a", None, "Name a fruit.").await;
    expect_duplicate(&client.until_outcome().await, &ack_a, &answer_a, "first message without its conversation");

    let other = pipeline.extra_gateway(&[]).await;
    let mut elsewhere = pipeline.connect(&other, &token).await;
    elsewhere.ask("turn-b", Some(&conversation), "Name a vegetable.").await;
    let ack_b = only(&second, "ack")[0].clone();
    expect_duplicate(&elsewhere.until_outcome().await, &ack_b, &answer_b, "latest turn, another gateway");
    elsewhere.ask("turn-a", None, "Name a fruit.").await;
    expect_duplicate(&elsewhere.until_outcome().await, &ack_a, &answer_a, "first turn, another gateway");

    pipeline.restart().await;
    // A just-started instance takes a subscription to the conversation, too.
    let mut watcher = pipeline.connect(&pipeline.http, &token).await;
    watcher.send(serde_json::json!({"type": "subscribe", "conversation_id": conversation})).await;
    let subscribed = watcher.next_frame().await;
    assert_eq!(
        (subscribed["type"].as_str(), subscribed["conversation_id"].as_str()),
        (Some("subscribed"), Some(conversation.as_str())),
        "{subscribed}"
    );
    let mut again = pipeline.connect(&pipeline.http, &token).await;
    again.ask("turn-a", Some(&conversation), "Name a fruit.").await;
    expect_duplicate(&again.until_outcome().await, &ack_a, &answer_a, "earlier turn after a restart");

    // The log holds each turn once, and a new question continues the sequence.
    again.ask("turn-c", Some(&conversation), "Name a tree.").await;
    let third = again.until_outcome().await;
    assert_eq!(only(&third, "ack")[0]["sequence"], 6, "{third:?}");
    let watched = watcher.until_outcome().await;
    assert_eq!(
        watched.last().unwrap()["event_id"],
        third.last().unwrap()["event_id"],
        "the subscriber gets the answer"
    );
    let events = read_topic_of(&pipeline, 7).await;
    let sequences: Vec<_> = events.iter().map(|(e, _)| e.envelope().sequence).collect();
    assert_eq!(sequences, [1, 2, 3, 4, 5, 6, 7]);
    let replay = pipeline.cli(&["replay", &conversation]);
    let replayed = String::from_utf8_lossy(&replay.stdout);
    assert!(replay.status.success(), "{replayed}\n{}", String::from_utf8_lossy(&replay.stderr));
    assert!(replayed.contains("invariants: hold"), "{replayed}");
    pipeline.stop().await;
}
