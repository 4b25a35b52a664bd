//! `parley replay` and `parley audit` against the real stack: the state rebuilt from the
//! log (by offset index and by scan) matches the projection, the state at a sequence, a
//! position or a time (also through the query API), the audit lists every event with its
//! position, schema and trace, and a person's audit lists their conversations.

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
    let (user, token) = pipeline.session_user().await;
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
    // Every event is written with the newest version of its schema (registering is
    // idempotent: it names the ids the registry holds; their version numbers depend on what
    // a long-lived registry was given before, so the ids are compared).
    let latest: std::collections::HashMap<String, u32> =
        parley_events::registry::SchemaRegistry::new(&pipeline.registry)
            .unwrap()
            .register_all(&parley_events::SchemaCatalog::embedded())
            .await
            .unwrap()
            .into_iter()
            .collect();
    for (i, line) in lines.iter().enumerate() {
        assert_eq!(line["sequence"], i as i64 + 1);
        assert!(line["offset"].as_i64().unwrap() >= 0 && line["partition"].as_i64().is_some(), "{line}");
        let subject = format!("io.parley.events.{}", line["event_type"].as_str().unwrap());
        assert_eq!(line["schema_id"].as_u64(), latest.get(&subject).map(|id| u64::from(*id)), "{line}");
        assert!(line["schema_version"].as_u64().unwrap() >= 1, "{line}");
        assert_eq!(line["trace_id"].as_str().unwrap().len(), 32, "{line}");
    }
    assert_eq!(lines[1]["trace_id"], lines[2]["trace_id"], "a turn is one trace");
    assert_eq!(lines[2]["causation_id"], lines[1]["event_id"]);
    assert_eq!(lines[2]["correlation_id"], lines[1]["correlation_id"]);

    let table = pipeline.cli(&["audit", &conversation]);
    let out = text(&table);
    assert!(table.status.success() && out.starts_with("SEQ") && out.contains("LLMResponseGenerated"), "{out}");

    // Each answer's prompt, rebuilt from events and proven: the second carries the first turn.
    let proven = pipeline.cli(&["replay", &conversation, "--prompts", "--format", "json"]);
    assert!(proven.status.success(), "{}", text(&proven));
    let proven: Value = serde_json::from_slice(&proven.stdout).unwrap();
    let prompts = proven["prompts"].as_array().unwrap();
    assert_eq!(prompts.len(), 2, "{proven}");
    assert!(prompts.iter().all(|p| p["verdict"] == "proven"), "{prompts:?}");
    let roles = |p: &Value| {
        p["messages"].as_array().unwrap().iter().map(|m| m["role"].as_str().unwrap().to_owned()).collect::<Vec<_>>()
    };
    assert_eq!(roles(&prompts[0]), ["system", "user"], "{prompts:?}");
    assert_eq!(roles(&prompts[1]), ["system", "user", "assistant", "user"], "{prompts:?}");
    assert_eq!(prompts[1]["messages"][1]["content"], "Name a planet.");
    assert!(prompts[1]["messages"][3]["content"].as_str().unwrap().ends_with("Name a star."), "{prompts:?}");

    // What if: turn 2 again with another system prompt, written to the experiments topic,
    // never to the conversation.
    let rerun = pipeline.cli(&[
        "replay",
        &conversation,
        "--rerun",
        "2",
        "--system-prompt",
        "Answer in one word.",
        "--format",
        "json",
    ]);
    assert!(rerun.status.success(), "{}", text(&rerun));
    let rerun: Value = serde_json::from_slice(&rerun.stdout).unwrap();
    assert_eq!(rerun["rerun"]["error"], "", "{rerun}");
    assert_eq!(rerun["rerun"]["prompt_messages"], 4, "system, the first turn, the question: {rerun}");
    assert!(rerun["rerun"]["completion_tokens"].as_i64().unwrap() > 0, "{rerun}");
    assert_eq!(rerun["original"]["event_id"], lines[4]["event_id"]);
    let experiments = format!("{}experiments", pipeline.prefix);
    assert!(rerun["experiment"].as_str().unwrap().starts_with(&format!("{experiments}/")), "{rerun}");
    let (consumer, mut open) = support::reader_from_start(&pipeline.brokers, &experiments, true);
    let mut written = Vec::new();
    while open > 0 {
        match consumer.recv().await {
            Ok(message) => written.push(rdkafka::Message::payload(&message).unwrap().to_vec()),
            Err(rdkafka::error::KafkaError::PartitionEOF(_)) => open -= 1,
            Err(error) => panic!("{error}"),
        }
    }
    assert_eq!(written.len(), 1, "one experiment");
    let codec = parley_events::EventCodec::new(&pipeline.registry).unwrap();
    let run = codec.decode::<parley_events::ExperimentRun>(&written[0]).await.unwrap().event;
    assert_eq!(run.answer_event_id.to_string(), lines[4]["event_id"].as_str().unwrap());
    assert_eq!(run.sealed_for, user, "the new answer is sealed under the owner's key");
    let after = pipeline.cli(&["replay", &conversation, "--format", "json"]);
    let after: Value = serde_json::from_slice(&after.stdout).unwrap();
    assert_eq!(after["records"], 5, "the conversation is untouched: {after}");
    let shown = pipeline.cli(&["replay", &conversation, "--rerun", "1", "--max-tokens", "24"]);
    eprintln!("{}", text(&shown));
    assert!(shown.status.success() && text(&shown).contains("turn 1 re-run with"), "{}", text(&shown));
    assert!(text(&shown).contains("original") && text(&shown).contains("re-run"), "{}", text(&shown));
    let proven_text = pipeline.cli(&["replay", &conversation, "--prompts"]);
    eprintln!("{}", text(&proven_text));
    assert!(text(&proven_text).contains("prompts: 2 of 2 proven"), "{}", text(&proven_text));
    let missing = pipeline.cli(&["replay", &conversation, "--rerun", "9"]);
    assert!(!missing.status.success() && text(&missing).contains("there is no turn 9"), "{}", text(&missing));

    // A batch: every answer of a sample, with two models, served by inference in its batch
    // lane and summed up per model.
    let batch = pipeline.cli(&[
        "experiments",
        "run",
        "--sample",
        "5",
        "--turns",
        "all",
        "--model",
        "model-a",
        "--model",
        "model-b",
        "--batch",
        "b-e2e",
        "--wait",
        "5m",
        "--format",
        "json",
    ]);
    assert!(batch.status.success(), "{}", text(&batch));
    let batch: Value = serde_json::from_slice(&batch.stdout).unwrap();
    assert_eq!(batch["requested"], 4, "two answers, two models: {batch}");
    let summary = &batch["summary"];
    assert_eq!((summary["requested"].as_u64(), summary["done"].as_u64()), (Some(4), Some(4)), "{summary}");
    let rows = summary["rows"].as_array().unwrap();
    let sides: Vec<(&str, &str)> =
        rows.iter().map(|r| (r["side"].as_str().unwrap(), r["model"].as_str().unwrap())).collect();
    assert_eq!(&sides[1..], [("rerun", "model-a"), ("rerun", "model-b")], "{summary}");
    assert_eq!((sides[0].0, rows[0]["turns"].as_u64()), ("original", Some(2)), "each answer once: {summary}");
    for rerun in &rows[1..] {
        assert_eq!((rerun["answered"].as_u64(), rerun["failed"].as_u64()), (Some(2), Some(0)), "{rerun}");
        assert!(rerun["mean_completion_tokens"].as_f64().unwrap() > 0.0, "{rerun}");
        assert!(rerun["latency_p50_ms"].as_i64().unwrap() > 0, "{rerun}");
    }
    let later = pipeline.cli(&["experiments", "summary", "b-e2e"]);
    eprintln!("{}", text(&later));
    assert!(later.status.success(), "{}", text(&later));
    assert!(text(&later).contains("4 of 4 re-run(s) done") && text(&later).contains("model-b"), "{}", text(&later));
    let none = pipeline.cli(&["experiments", "summary", "no-such-batch"]);
    assert_eq!(none.status.code(), Some(1), "{}", text(&none));
    let (consumer, mut open) = support::reader_from_start(&pipeline.brokers, &experiments, true);
    let (mut requests, mut runs) = (0, 0);
    while open > 0 {
        match consumer.recv().await {
            Ok(message) => match codec.decode_experiment_event(rdkafka::Message::payload(&message).unwrap()).await {
                Ok(decoded) => match decoded.event {
                    parley_events::ExperimentEvent::Requested(request) => {
                        requests += 1;
                        assert_eq!(request.sealed_for, user, "the prompt is sealed under the owner's key");
                        assert!(!format!("{request:?}").contains("Name a planet"), "{request:?}");
                    }
                    parley_events::ExperimentEvent::Run(run) if run.batch_id == "b-e2e" => {
                        runs += 1;
                        assert_eq!(run.sealed_for, user);
                        assert!(run.request_event_id.is_some(), "{run:?}");
                        assert_eq!(run.envelope.producer_name, "parley-inference");
                    }
                    parley_events::ExperimentEvent::Run(_) => {}
                },
                Err(error) => panic!("{error}"),
            },
            Err(rdkafka::error::KafkaError::PartitionEOF(_)) => open -= 1,
            Err(error) => panic!("{error}"),
        }
    }
    assert_eq!((requests, runs), (4, 4), "one run per request, exactly once");
    let after = pipeline.cli(&["replay", &conversation, "--format", "json"]);
    let after: Value = serde_json::from_slice(&after.stdout).unwrap();
    assert_eq!(after["records"], 5, "the conversation is untouched: {after}");

    // As of a point: a sequence, a position of the events topic, a time.
    let at = |point: &str| {
        let output = pipeline.cli(&["replay", &conversation, "--at", point, "--format", "json"]);
        assert!(output.status.success(), "--at {point}: {}", text(&output));
        serde_json::from_slice::<Value>(&output.stdout).unwrap()
    };
    let after_first_turn = at("3");
    assert_eq!(
        (after_first_turn["last_sequence"].as_i64(), after_first_turn["total_records"].as_i64()),
        (Some(3), Some(5))
    );
    assert_eq!(after_first_turn["messages"].as_array().unwrap().len(), 2, "{after_first_turn}");
    assert!(after_first_turn["diff"].as_array().unwrap().is_empty());
    let second_question = &lines[3];
    let position =
        format!("{}/{}/{}", pipeline.events_topic(), second_question["partition"], second_question["offset"]);
    let asked = at(&position);
    assert_eq!(asked["last_sequence"], 4, "{asked}");
    assert_eq!(asked["open_query_event_id"], second_question["event_id"], "the question is open at its own position");
    let taken_at =
        std::time::UNIX_EPOCH + std::time::Duration::from_millis(lines[2]["log_timestamp"].as_u64().unwrap());
    let by_time = at(&humantime::format_rfc3339_millis(taken_at).to_string());
    assert!(by_time["last_sequence"].as_i64().unwrap() >= 3, "{by_time}");
    let before = pipeline.cli(&["replay", &conversation, "--at", "1970-01-01T00:00:00Z"]);
    assert_eq!(before.status.code(), Some(1));
    assert!(text(&before).contains("had not started at 1970-01-01T00:00:00.000Z"), "{}", text(&before));
    let elsewhere = format!("{}/{}/0", pipeline.events_topic(), (lines[0]["partition"].as_i64().unwrap() + 1) % 6);
    let refused = pipeline.cli(&["replay", &conversation, "--at", &elsewhere]);
    assert!(
        !refused.status.success() && text(&refused).contains("not in this conversation's partition"),
        "{}",
        text(&refused)
    );
    let bad = pipeline.cli(&["replay", &conversation, "--at", "yesterday"]);
    assert_eq!(bad.status.code(), Some(2), "clap refuses it: {}", text(&bad));
    assert!(text(&bad).contains("RFC 3339"), "{}", text(&bad));

    // The same through the query API, for the owner only.
    let (status, then) = pipeline.get(&format!("/api/conversations/{conversation}?at=3"), &token).await;
    assert_eq!(status, 200, "{then}");
    assert_eq!(then["messages"].as_array().unwrap().len(), 2, "{then}");
    assert_eq!(then["messages"][0]["text"], "Name a planet.", "opened with the owner's key");
    assert_eq!(then["at"], "sequence 3");
    let (status, _) = pipeline.get(&format!("/api/conversations/{conversation}?at=3"), &pipeline.session().await).await;
    assert_eq!(status, 404, "another person sees nothing of it at any point");
    let (status, body) = pipeline.get(&format!("/api/conversations/{conversation}?at=soon"), &token).await;
    assert_eq!((status, body["error"].as_str()), (400, Some("invalid_parameter")), "{body}");

    // The person's trail: their conversation summed up with positions, nobody else's.
    let mut other = pipeline.client().await;
    other.ask("b-1", None, "Name a moon.").await;
    other.until_outcome().await;
    let promoted = pipeline.cli(&["tier", &user, "premium"]);
    assert!(promoted.status.success(), "{}", text(&promoted));
    let budgeted = pipeline.cli(&["budget", &user, "--daily", "5000"]);
    assert!(budgeted.status.success(), "{}", text(&budgeted));
    let trail = pipeline.cli(&["audit", "--user", &user, "--format", "json"]);
    assert!(trail.status.success(), "{}", text(&trail));
    let items: Vec<Value> =
        String::from_utf8_lossy(&trail.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(items[0]["kind"], "account", "{items:?}");
    assert_eq!(items[0]["tier"], "premium");
    assert_eq!(items[0]["budgets"]["daily"], 5000, "{items:?}");
    let changes: Vec<&Value> = items.iter().filter(|i| i["kind"] == "account_changed").collect();
    assert_eq!(changes.len(), 2, "both changes on record: {items:?}");
    assert_eq!((changes[0]["tier"].as_str(), changes[1]["budgets"]["daily"].as_i64()), (Some("premium"), Some(5000)));
    let conversations: Vec<&Value> = items.iter().filter(|i| i["kind"] == "conversation").collect();
    assert_eq!(conversations.len(), 1, "only the person's own: {items:?}");
    let summary = conversations[0];
    assert_eq!(summary["conversation_id"], conversation.as_str());
    assert_eq!((summary["questions"].as_u64(), summary["answers"].as_u64()), (Some(2), Some(2)), "{summary}");
    assert_eq!(summary["started_in_window"], true);
    let first = format!("{}/{}/{}", pipeline.events_topic(), lines[0]["partition"], lines[0]["offset"]);
    assert_eq!(summary["first"]["position"], first.as_str());
    assert!(summary["completion_tokens"].as_i64().unwrap() > 0, "{summary}");
    let later = pipeline.cli(&["audit", "--user", &user, "--since", "2999-01-01T00:00:00Z"]);
    assert!(later.status.success() && text(&later).contains("conversations (0)"), "{}", text(&later));
    let both = pipeline.cli(&["audit", &conversation, "--user", &user]);
    assert_eq!(both.status.code(), Some(2), "a conversation or a person, not both: {}", text(&both));

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
