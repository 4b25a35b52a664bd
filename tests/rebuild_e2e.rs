//! `parley projections rebuild context`: a new generation from offset 0 equal to the live
//! one, an atomic switch that readers and the live projector follow, and drop-previous.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::Duration;

use support::{Pipeline, stack};

#[tokio::test(flavor = "multi_thread")]
async fn a_rebuild_equals_the_live_generation_and_takes_over_atomically() {
    let Some(stack) = stack() else { return };
    let keyspace = format!("parley_rebuild_{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
    let pipeline = Pipeline::start_in(&stack, &keyspace, &[]).await;
    let token = pipeline.session().await;
    let mut client = pipeline.connect(&pipeline.http, &token).await;
    let mut conversations = Vec::new();
    for i in 0..2 {
        client.ask(&format!("rb-{i}"), None, &format!("Rebuild question {i}?")).await;
        let frames = client.until_outcome().await;
        conversations
            .push(frames.iter().find(|f| f["type"] == "ack").unwrap()["conversation_id"].as_str().unwrap().to_owned());
    }
    let mut before = Vec::new();
    for id in &conversations {
        before.push(pipeline.conversation_when(&token, id, 2).await);
    }

    let rebuilt = pipeline.cli(&["projections", "rebuild", "context"]);
    let stdout = String::from_utf8_lossy(&rebuilt.stdout);
    let stderr = String::from_utf8_lossy(&rebuilt.stderr);
    assert!(rebuilt.status.success(), "{stdout}{stderr}");
    assert!(stdout.contains("generation 2 is live"), "{stdout}");
    assert!(stderr.contains("records/s"), "a progress line with the rate: {stderr}");
    let status = pipeline.cli(&["projections", "status", "context"]);
    assert!(String::from_utf8_lossy(&status.stdout).contains("live 2, previous Some(1), building None"));

    // Readers switch within a second and see the same conversations.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    for (id, old) in conversations.iter().zip(&before) {
        let (_, now) = pipeline.get(&format!("/api/conversations/{id}"), &token).await;
        assert_eq!(&now, old);
    }

    // The live projector follows the switch: a new turn lands in generation 2.
    client.ask("rb-after", Some(&conversations[0]), "After the rebuild?").await;
    client.until_outcome().await;
    pipeline.conversation_when(&token, &conversations[0], 4).await;

    let dropped = pipeline.cli(&["projections", "drop-previous", "context"]);
    assert!(String::from_utf8_lossy(&dropped.stdout).contains("dropped generation 1"));
    let status = pipeline.cli(&["projections", "status", "context"]);
    assert!(String::from_utf8_lossy(&status.stdout).contains("live 2, previous None"));
    let (status, _) = pipeline.get(&format!("/api/conversations/{}", conversations[1]), &token).await;
    assert_eq!(status, 200, "the live generation still serves");

    let cql = pipeline.cql.clone();
    pipeline.stop().await;
    support::drop_keyspace(&cql, &keyspace).await;
}

/// One undecodable record in the events topic (in the middle of a conversation) and one in
/// the dead-letter topic: every command an operator runs on the log passes them by with a
/// warning naming the position, says how many at the end, and does its job.
#[tokio::test(flavor = "multi_thread")]
async fn every_reader_of_the_log_passes_an_undecodable_record_by() {
    use rdkafka::producer::{FutureProducer, FutureRecord};

    let Some(stack) = stack() else { return };
    let keyspace = format!("parley_garbage_{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
    let pipeline = Pipeline::start_in(&stack, &keyspace, &["--without-retrieval"]).await;
    let (user, token) = pipeline.session_user().await;
    let mut client = pipeline.connect(&pipeline.http, &token).await;
    client.ask("g-1", None, "Say one.").await;
    let frames = client.until_outcome().await;
    assert_eq!(frames.last().unwrap()["type"], "answer", "{frames:?}");
    let conversation = frames[0]["conversation_id"].as_str().unwrap().to_owned();
    pipeline.conversation_when(&token, &conversation, 2).await;

    let producer: FutureProducer =
        rdkafka::ClientConfig::new().set("bootstrap.servers", &pipeline.brokers).create().unwrap();
    let garbage = b"\xde\xad\xbe\xef not avro".to_vec();
    let dead_letters = format!("{}dead-letter", pipeline.prefix);
    for (topic, key) in [(pipeline.events_topic(), conversation.as_str()), (dead_letters, "junk")] {
        let record = FutureRecord::to(&topic).key(key).payload(&garbage);
        producer.send(record, Duration::from_secs(10)).await.unwrap();
    }

    // (command, undecodable records it meets: audit reads the dead-letter topic too)
    let commands: [(&[&str], u32); 6] = [
        (&["usage", &user], 1),
        (&["audit", &conversation], 1),
        (&["audit", &conversation, "--scan"], 2),
        (&["replay", &conversation, "--scan"], 1),
        (&["dead-letters", "list"], 1),
        (&["projections", "rebuild", "context"], 1),
    ];
    for (args, undecodable) in commands {
        let output = pipeline.cli(args);
        let (stdout, stderr) = (String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
        assert!(output.status.success(), "{args:?}: {stdout}{stderr}");
        let count = format!("{undecodable} undecodable record(s) passed by");
        assert!(stderr.trim_end().ends_with("warning above") && stderr.contains(&count), "{args:?}: {stderr}");
        assert!(stderr.contains("WARN"), "{args:?}: a warning names each: {stderr}");
        assert!(!stderr.contains('\u{1b}'), "{args:?}: no colour into a pipe: {stderr}");
    }
    let usage = pipeline.cli(&["usage", &user, "--format", "json"]);
    let report: serde_json::Value = serde_json::from_slice(&usage.stdout).unwrap();
    assert!(report["today"]["spent"].as_u64().unwrap() > 0, "the answer's tokens are counted: {report}");

    let cql = pipeline.cql.clone();
    pipeline.stop().await;
    support::drop_keyspace(&cql, &keyspace).await;
}
