//! Priority lanes: a flooded lower lane waits in Kafka while a higher one is served.

use super::*;

/// The partition of a log position `topic/partition/offset`.
fn partition_of(ack: &Value) -> i32 {
    ack["position"].as_str().unwrap().rsplit('/').nth(1).unwrap().parse().unwrap()
}

/// Waits for each flooded turn's outcome (each must be an answer) and counts those that
/// came before `instant`.
async fn answered_before(flood: Vec<tokio::task::JoinHandle<(Value, Instant)>>, instant: Instant) -> usize {
    let mut before = 0;
    for task in flood {
        let (outcome, at) = task.await.unwrap();
        assert_eq!(outcome["type"], "answer", "{outcome}");
        before += usize::from(at < instant);
    }
    before
}

#[tokio::test(flavor = "multi_thread")]
async fn a_flooded_lower_lane_waits_in_kafka_while_a_higher_lane_is_served() {
    let Some(stack) = stack() else { return };
    // Two model slots, default lanes (premium: partition 0, batch: 5), no shedding. Answers
    // are capped: batch turns are served one at a time (never the last slot), and eight
    // uncapped ones took longer than a client waits for a frame on a loaded CI machine.
    let mut args = vec!["--concurrency", "2", "--shed-queue-age", "0", "--without-retrieval", "--llm-max-tokens", "64"];
    args.extend(support::NO_RATE_LIMITS);
    let pipeline = Pipeline::start(&stack, &args).await;
    const FLOOD: usize = 8;
    let long = "List 20 animals, one per line.";
    // Each flooded turn on a socket of its own, its outcome timed as it arrives.
    let outcome_at = |mut client: support::Client| {
        tokio::spawn(async move { (client.until_outcome().await.pop().unwrap(), Instant::now()) })
    };

    // A batch job floods the batch lane; a chat turn of the standard lane comes after it.
    let mut batch = Vec::new();
    for n in 0..FLOOD {
        let mut client = pipeline.client().await;
        let id = format!("batch{n}");
        client.send(json!({"type": "query", "client_message_id": id, "text": long, "lane": "batch"})).await;
        let ack = client.reply_to(&id).await;
        assert_eq!(partition_of(&ack), 5, "a batch conversation lives in the batch lane: {ack}");
        batch.push(outcome_at(client));
    }
    let mut chat = pipeline.client().await;
    chat.ask("chat", None, "Say OK.").await;
    let ack = chat.reply_to("chat").await;
    assert!((1..=4).contains(&partition_of(&ack)), "a standard conversation: {ack}");
    assert_eq!(chat.until_outcome().await.last().unwrap()["type"], "answer");
    // Batch work never holds the last slot: the chat turn did not wait for the flood, and
    // the batch lane went on (every turn of it is answered).
    let before = answered_before(batch, Instant::now()).await;
    assert!(before <= FLOOD / 2, "{before} of {FLOOD} batch turns were answered before the chat turn");

    // Standard chat floods; a premium user's turn comes after it and is served first.
    let (user, token) = pipeline.session_user().await;
    let set = pipeline.cli(&["tier", &user, "premium"]);
    assert!(set.status.success(), "{}", String::from_utf8_lossy(&set.stderr));
    let mut standard = Vec::new();
    for n in 0..FLOOD {
        let mut client = pipeline.client().await;
        let id = format!("standard{n}");
        client.ask(&id, None, long).await;
        assert_eq!(client.reply_to(&id).await["type"], "ack");
        standard.push(outcome_at(client));
    }
    let mut premium = pipeline.connect(&pipeline.http, &token).await;
    premium.ask("premium", None, "Say OK.").await;
    assert_eq!(partition_of(&premium.reply_to("premium").await), 0, "a premium user's conversation");
    assert_eq!(premium.until_outcome().await.last().unwrap()["type"], "answer");
    let before = answered_before(standard, Instant::now()).await;
    assert!(before <= FLOOD / 2, "{before} of {FLOOD} standard turns were answered before the premium turn");
    pipeline.stop().await;
}
