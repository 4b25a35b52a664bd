//! `parley replay` and `parley audit` against the real stack: the state rebuilt from the
//! log (by offset index and by scan) matches the projection, and the audit lists every
//! event with its position, schema and trace.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::process::Output;

use serde_json::Value;
use support::{Pipeline, stack};

fn text(output: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr))
}

#[tokio::test(flavor = "multi_thread")]
async fn replay_rebuilds_from_the_log_and_audit_lists_every_event() {
    let Some(stack) = stack() else { return };
    let pipeline = Pipeline::start(&stack, &[]).await;
    let token = pipeline.session().await;
    let mut client = pipeline.connect(&pipeline.http, &token).await;
    client.ask("a-1", None, "Name a planet.").await;
    let frames = client.until_outcome().await;
    let conversation =
        frames.iter().find(|f| f["type"] == "ack").unwrap()["conversation_id"].as_str().unwrap().to_owned();
    client.ask("a-2", Some(&conversation), "Name a star.").await;
    client.until_outcome().await;
    pipeline.conversation_when(&token, &conversation, 4).await;

    let replayed = pipeline.cli(&["replay", &conversation]);
    let out = text(&replayed);
    assert!(replayed.status.success(), "{out}");
    assert!(out.contains("OffsetIndex") && out.contains("the model was not called"), "{out}");
    assert!(out.contains("Name a planet.") && out.contains("Name a star."), "{out}");
    assert!(out.contains("diff against the projection: none"), "{out}");

    let scanned = pipeline.cli(&["replay", &conversation, "--scan", "--format", "json"]);
    assert!(scanned.status.success(), "{}", text(&scanned));
    let json: Value = serde_json::from_slice(&scanned.stdout).unwrap();
    assert_eq!(json["method"], "PartitionScan");
    assert_eq!(json["messages"].as_array().unwrap().len(), 4);
    assert_eq!(json["last_sequence"], 5);
    assert!(json["diff"].as_array().unwrap().is_empty(), "{json}");

    let audit = pipeline.cli(&["audit", &conversation, "--format", "json"]);
    assert!(audit.status.success(), "{}", text(&audit));
    let lines: Vec<Value> =
        String::from_utf8_lossy(&audit.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let types: Vec<&str> = lines.iter().map(|l| l["event_type"].as_str().unwrap()).collect();
    assert_eq!(
        types,
        [
            "ConversationStarted",
            "UserQueryReceived",
            "LLMResponseGenerated",
            "UserQueryReceived",
            "LLMResponseGenerated"
        ]
    );
    for (i, line) in lines.iter().enumerate() {
        assert_eq!(line["sequence"], i as i64 + 1);
        assert!(line["offset"].as_i64().unwrap() >= 0 && line["partition"].as_i64().is_some(), "{line}");
        // Answers are written with LLMResponseGenerated v4 and questions with
        // UserQueryReceived v3 (sealed_for); the rest with v1.
        let version = match line["event_type"].as_str() {
            Some("LLMResponseGenerated") => 4,
            Some("UserQueryReceived") => 3,
            _ => 1,
        };
        assert_eq!(line["schema_version"], version, "{line}");
        assert!(line["schema_id"].as_u64().unwrap() > 0);
        assert_eq!(line["trace_id"].as_str().unwrap().len(), 32, "{line}");
    }
    assert_eq!(lines[1]["trace_id"], lines[2]["trace_id"], "a turn is one trace");
    assert_eq!(lines[2]["causation_id"], lines[1]["event_id"]);
    assert_eq!(lines[2]["correlation_id"], lines[1]["correlation_id"]);

    let table = pipeline.cli(&["audit", &conversation]);
    let out = text(&table);
    assert!(table.status.success() && out.starts_with("SEQ") && out.contains("LLMResponseGenerated"), "{out}");

    let unknown = pipeline.cli(&["replay", &uuid::Uuid::new_v4().to_string()]);
    assert_eq!(unknown.status.code(), Some(1));
    assert!(text(&unknown).contains("no events"), "{}", text(&unknown));
    pipeline.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_turn_written_twice_is_an_invariant_violation_for_replay_and_audit() {
    use parley_events::ConversationEvent;

    let Some(stack) = stack() else { return };
    let pipeline = Pipeline::start(&stack, &[]).await;
    let topic = pipeline.events_topic();
    let written = support::write_synthetic(&pipeline.brokers, &pipeline.registry, &topic, 1, 2).await;
    let (conversation, events) = &written[0];
    // The log of the duplicate-turn bug: turn 1's query and answer again, same event ids,
    // at sequences 6 and 7.
    let codec = std::sync::Arc::new(parley_events::EventCodec::new(&pipeline.registry).unwrap());
    let config = rdkafka::ClientConfig::new().set("bootstrap.servers", &pipeline.brokers).clone();
    let producer = parley_eventlog::EventProducer::new(config, codec).unwrap();
    let key = conversation.to_string();
    let (ConversationEvent::QueryReceived(query), ConversationEvent::ResponseGenerated(answer)) =
        (&events[1], &events[2])
    else {
        panic!("{events:?}")
    };
    let mut repeated_query = query.clone();
    repeated_query.envelope.sequence = 6;
    let mut repeated_answer = answer.clone();
    repeated_answer.envelope.sequence = 7;
    producer.append(&topic, &key, &repeated_query, None).await.unwrap();
    producer.append(&topic, &key, &repeated_answer, None).await.unwrap();

    // Scan: the index may not have the repeated records yet; the log has them either way.
    let replayed = pipeline.cli(&["replay", &key, "--scan"]);
    let out = text(&replayed);
    assert_eq!(replayed.status.code(), Some(1), "{out}");
    assert!(
        out.contains(&format!("event id {} appears 2 times, at sequences [2, 6]", query.envelope.event_id)),
        "{out}"
    );
    assert!(out.contains(&format!("query {} has 2 outcomes", query.envelope.event_id)), "{out}");
    let audit = pipeline.cli(&["audit", &key, "--scan"]);
    assert_eq!(audit.status.code(), Some(1), "{}", text(&audit));
    assert!(text(&audit).contains("invariant violated: event id"), "{}", text(&audit));
    pipeline.stop().await;
}
