//! End to end: WebSocket → gateway → Kafka → inference → real LLM → Kafka → WebSocket.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::{Duration, Instant};

use futures::{SinkExt, StreamExt};
use parley_eventlog::LogPosition;
use parley_events::{ConversationEvent, EventCodec};
use rdkafka::ClientConfig;
use rdkafka::Message;
use rdkafka::consumer::{Consumer, StreamConsumer};
use serde_json::{Value, json};
use support::{Pipeline, stack};
use tokio_tungstenite::tungstenite::Message as WsMessage;

fn only<'a>(frames: &'a [Value], kind: &str) -> Vec<&'a Value> {
    frames.iter().filter(|f| f["type"] == kind).collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_question_gets_the_models_answer_pushed_back() {
    let Some(stack) = stack() else { return };
    let pipeline = Pipeline::start(&stack, &[]).await;
    let mut client = pipeline.client().await;

    client.ask("m-1", None, "Name a primary color.").await;
    let frames = client.until_outcome().await;
    let ack = only(&frames, "ack")[0];
    assert!(ack["position"].as_str().unwrap().starts_with(&pipeline.events_topic()), "{ack}");
    assert_eq!(ack["sequence"], 2, "ConversationStarted is 1, the first query 2");
    let answer = frames.last().unwrap();
    assert_eq!(answer["type"], "answer", "{frames:?}");
    assert_eq!(answer["query_event_id"], ack["event_id"]);
    assert_eq!(answer["conversation_id"], ack["conversation_id"]);
    assert_eq!(answer["sequence"], 3);
    assert!(!answer["text"].as_str().unwrap().trim().is_empty(), "{answer}");
    assert!(answer["completion_tokens"].as_i64().unwrap() > 0, "{answer}");
    let first_token = answer["time_to_first_token_ms"].as_i64().unwrap();
    assert!((0..=answer["llm_latency_ms"].as_i64().unwrap()).contains(&first_token), "{answer}");

    // Deltas stream before the answer and spell (a prefix of) it; none comes after it.
    let tokens = only(&frames, "token");
    assert!(!tokens.is_empty(), "tokens stream before the answer");
    let streamed: String = tokens.iter().map(|t| t["delta"].as_str().unwrap()).collect();
    assert!(answer["text"].as_str().unwrap().starts_with(&streamed), "{streamed:?} vs {answer}");

    // A follow-up in the same conversation continues its sequence.
    let conversation = ack["conversation_id"].as_str().unwrap().to_owned();
    client.ask("m-2", Some(&conversation), "And another one?").await;
    let frames = client.until_outcome().await;
    assert_eq!(only(&frames, "ack")[0]["sequence"], 4);
    assert_eq!(frames.last().unwrap()["sequence"], 5);
    pipeline.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_conversations_each_get_their_own_answer() {
    let Some(stack) = stack() else { return };
    let pipeline = Pipeline::start(&stack, &[]).await;
    let mut alice = pipeline.client().await;
    let mut bob = pipeline.client().await;
    alice.ask("a-1", None, "What is two plus two?").await;
    bob.ask("b-1", None, "What color is the sky?").await;
    let (alice_frames, bob_frames) = tokio::join!(alice.until_outcome(), bob.until_outcome());
    for frames in [&alice_frames, &bob_frames] {
        let ack = only(frames, "ack")[0];
        let answer = frames.last().unwrap();
        assert_eq!(answer["type"], "answer", "{frames:?}");
        assert_eq!(answer["query_event_id"], ack["event_id"]);
        for frame in frames.iter().filter(|f| f.get("conversation_id").is_some()) {
            assert_eq!(frame["conversation_id"], ack["conversation_id"], "no frame of another conversation: {frame}");
        }
    }
    assert_ne!(only(&alice_frames, "ack")[0]["conversation_id"], only(&bob_frames, "ack")[0]["conversation_id"]);

    // Bob cannot write into Alice's conversation.
    let alices = only(&alice_frames, "ack")[0]["conversation_id"].as_str().unwrap().to_owned();
    bob.ask("b-2", Some(&alices), "hijack").await;
    let error = bob.next_frame().await;
    assert_eq!(
        (error["type"].as_str(), error["code"].as_str()),
        (Some("error"), Some("unknown_conversation")),
        "{error}"
    );
    pipeline.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_frames_get_error_frames_and_the_gateway_keeps_serving() {
    let Some(stack) = stack() else { return };
    let pipeline = Pipeline::start(&stack, &[]).await;
    let mut client = pipeline.client().await;
    let mut bystander = pipeline.client().await;

    client.send_raw("{this is not json".into()).await;
    assert_eq!(client.next_frame().await["code"], "malformed_frame");
    client.send_raw(format!(r#"{{"type":"query","client_message_id":"big","text":"{}"}}"#, "x".repeat(100_000))).await;
    let error = client.next_frame().await;
    assert_eq!(error["code"], "frame_too_large", "{error}");
    client.ask("", None, "hi").await;
    let error = client.next_frame().await;
    assert_eq!(error["code"], "invalid_field", "{error}");
    assert!(error["message"].as_str().unwrap().contains("client_message_id"));

    // An invalid client message id is echoed as a short prefix, not whole.
    client.ask(&"x".repeat(60_000), None, "hi").await;
    let error = client.next_frame().await;
    assert_eq!(error["code"], "invalid_field", "{error}");
    assert_eq!(error["client_message_id"].as_str().map(str::len), Some(64));

    // A frame past the transport's 1 MiB: the socket is closed with 1009, as documented,
    // and nothing else is harmed.
    let mut oversized = pipeline.client().await;
    let huge = format!(r#"{{"type":"query","client_message_id":"huge","text":"{}"}}"#, "x".repeat(1_500_000));
    let _ = oversized.socket.send(WsMessage::Text(huge.into())).await;
    let closed = loop {
        match tokio::time::timeout(Duration::from_secs(10), oversized.socket.next()).await {
            Ok(Some(Ok(WsMessage::Close(frame)))) => break frame,
            Ok(Some(Ok(_))) => {}
            other => panic!("expected a close frame, got {other:?}"),
        }
    };
    let closed = closed.expect("a close frame with a code");
    assert_eq!(u16::from(closed.code), 1009, "{closed:?}");
    assert!(closed.reason.contains("frame too large"), "{closed:?}");

    // The same socket and another one still work.
    client.ask("ok-1", None, "Say hello.").await;
    bystander.ask("ok-2", None, "Say goodbye.").await;
    let (mine, theirs) = tokio::join!(client.until_outcome(), bystander.until_outcome());
    assert_eq!(mine.last().unwrap()["type"], "answer");
    assert_eq!(theirs.last().unwrap()["type"], "answer");

    // While a turn is open, a second question is refused, not queued silently.
    let conversation = only(&mine, "ack")[0]["conversation_id"].as_str().unwrap().to_owned();
    client.ask("ok-3", Some(&conversation), "One?").await;
    client.ask("ok-4", Some(&conversation), "Two?").await;
    let frames = client.until_outcome().await;
    let refused: Vec<_> = frames.iter().filter(|f| f["code"] == "turn_in_progress").collect();
    assert_eq!(refused.len(), 1, "{frames:?}");
    assert_eq!(refused[0]["client_message_id"], "ok-4");
    pipeline.stop().await;
}

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
async fn an_idle_conversation_is_forgotten_by_the_gateway_and_continued_later() {
    let Some(stack) = stack() else { return };
    let pipeline =
        Pipeline::start(&stack, &["--without-retrieval", "--llm-max-tokens", "32", "--hub-idle", "1s"]).await;
    let token = pipeline.session().await;
    let mut client = pipeline.connect(&pipeline.http, &token).await;
    client.ask("idle-1", None, "Say one.").await;
    let first = client.until_outcome().await;
    let conversation = only(&first, "ack")[0]["conversation_id"].as_str().unwrap().to_owned();
    pipeline.conversation_when(&token, &conversation, 2).await;
    drop(client);

    // Nobody follows it and its turn is closed: the gateway forgets it.
    let held = || async {
        let text = reqwest::get(format!("{}/metrics", pipeline.http)).await.unwrap().text().await.unwrap();
        text.lines().find_map(|l| l.strip_prefix("parley_gateway_conversations ").map(str::to_owned))
    };
    support::wait_until("the idle conversation forgotten", || async { (held().await? == "0").then_some(()) }).await;

    // The user comes back: a resent first question is still a duplicate, the next is turn 2.
    let mut client = pipeline.connect(&pipeline.http, &token).await;
    client.ask("idle-1", Some(&conversation), "Say one.").await;
    let resent = client.reply_to("idle-1").await;
    assert_eq!((resent["duplicate"].clone(), resent["sequence"].clone()), (json!(true), json!(2)), "{resent}");
    client.ask("idle-2", Some(&conversation), "Say two.").await;
    let second = client.reply_to("idle-2").await;
    assert_eq!(second["sequence"], 4, "{second}");
    loop {
        let frame = client.next_frame().await;
        assert_ne!(frame["type"], "failed", "{frame}");
        if frame["type"] == "answer" && frame["query_event_id"] == second["event_id"] {
            break;
        }
    }
    pipeline.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn events_on_the_topic_decode_through_the_registry_in_order() {
    let Some(stack) = stack() else { return };
    let pipeline = Pipeline::start(&stack, &[]).await;
    let mut client = pipeline.client().await;
    client.ask("e-1", None, "Hello there.").await;
    let frames = client.until_outcome().await;
    let ack = only(&frames, "ack")[0];

    let events = read_topic_of(&pipeline, 3).await;
    let types: Vec<_> = events.iter().map(|(e, _)| e.type_name()).collect();
    assert_eq!(types, ["ConversationStarted", "UserQueryReceived", "LLMResponseGenerated"]);
    let sequences: Vec<_> = events.iter().map(|(e, _)| e.envelope().sequence).collect();
    assert_eq!(sequences, [1, 2, 3]);
    for (event, traceparent) in &events {
        assert_eq!(event.envelope().conversation_id, ack["conversation_id"].as_str().unwrap());
        assert_eq!(event.envelope().traceparent.as_deref(), traceparent.as_deref(), "header and envelope agree");
    }
    let (ConversationEvent::QueryReceived(query), ConversationEvent::ResponseGenerated(response)) =
        (&events[1].0, &events[2].0)
    else {
        panic!("{events:?}")
    };
    assert_eq!(query.envelope.event_id, ack["event_id"].as_str().unwrap());
    assert_eq!(response.envelope.causation_id.as_deref(), Some(query.envelope.event_id.as_str()));
    assert_eq!(response.envelope.correlation_id, query.envelope.correlation_id);
    let trace = |tp: &Option<String>| tp.as_deref().and_then(parley_eventlog::trace::trace_id).map(str::to_owned);
    assert_eq!(trace(&response.envelope.traceparent), trace(&query.envelope.traceparent), "one trace per turn");
    assert!(response.llm_latency_ms > 0 && response.attempts == 1, "{response:?}");
    pipeline.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_query_while_the_llm_is_down_fails_clearly_and_service_goes_on() {
    let Some(stack) = stack() else { return };
    let dead_llm = format!("http://127.0.0.1:{}/v1", support::free_port());
    let args = ["--llm-base-url", &dead_llm, "--llm-max-attempts", "2", "--llm-retry-backoff", "50ms"];
    let pipeline = Pipeline::start(&stack, &args).await;
    let mut client = pipeline.client().await;
    client.ask("down-1", None, "Anyone there?").await;
    let frames = client.until_outcome().await;
    let failed = frames.last().unwrap();
    assert_eq!(failed["type"], "failed", "{frames:?}");
    assert_eq!(failed["error_kind"], "unavailable", "{failed}");
    // The turn is closed: the conversation takes the next question.
    let conversation = failed["conversation_id"].as_str().unwrap().to_owned();
    client.ask("down-2", Some(&conversation), "Still there?").await;
    let frames = client.until_outcome().await;
    assert_eq!(only(&frames, "ack")[0]["sequence"], 4);
    assert_eq!(frames.last().unwrap()["type"], "failed");

    let events = read_topic_of(&pipeline, 5).await;
    let ConversationEvent::ResponseFailed(recorded) = &events[2].0 else { panic!("{events:?}") };
    assert_eq!(recorded.attempts, 2);
    pipeline.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn every_gateway_instance_pushes_the_answers_of_its_own_sockets() {
    let Some(stack) = stack() else { return };
    let mut pipeline = Pipeline::start(&stack, &[]).await;
    let second = pipeline.extra_gateway(&[]).await;
    let mut on_first = pipeline.client().await;
    let mut on_second = pipeline.client_at(&second).await;
    on_first.ask("g1", None, "Say one.").await;
    on_second.ask("g2", None, "Say two.").await;
    let (first, second) = tokio::join!(on_first.until_outcome(), on_second.until_outcome());
    for frames in [first, second] {
        assert_eq!(frames.last().unwrap()["type"], "answer", "{frames:?}");
        assert_eq!(frames.last().unwrap()["query_event_id"], only(&frames, "ack")[0]["event_id"]);
    }
    pipeline.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn poison_records_go_to_the_dead_letter_topic_with_their_bytes() {
    use parley_events::DeadLetter;
    use rdkafka::producer::{FutureProducer, FutureRecord};

    let Some(stack) = stack() else { return };
    let pipeline = Pipeline::start(&stack, &[]).await;
    let producer: FutureProducer = ClientConfig::new().set("bootstrap.servers", &pipeline.brokers).create().unwrap();
    let garbage = b"\xde\xad\xbe\xef not avro".to_vec();
    let unknown_schema = vec![0, 0x7f, 0, 0, 1, 2, 3];
    let topic = pipeline.events_topic();
    for payload in [&garbage, &unknown_schema] {
        let record = FutureRecord::to(&topic).key("poison").payload(payload);
        producer.send(record, Duration::from_secs(10)).await.unwrap();
    }

    // Inference and the embedder each read the topic, so each letters both records.
    let letters = read_all::<DeadLetter>(&pipeline, &format!("{}dead-letter", pipeline.prefix), 4).await;
    for consumer in ["inference", "embedder"] {
        let payloads: Vec<_> = letters
            .iter()
            .filter(|l| l.consumer == format!("{}{consumer}", pipeline.prefix))
            .map(|l| l.payload.clone().unwrap())
            .collect();
        assert!(payloads.contains(&garbage) && payloads.contains(&unknown_schema), "{consumer}: {letters:?}");
    }
    for letter in &letters {
        assert_eq!(letter.key.as_deref(), Some(&b"poison"[..]));
        assert_eq!(letter.source_topic, pipeline.events_topic());
        assert!(!letter.error.is_empty());
    }

    // An operator lists them (one group's) and looks at one whole, bytes included.
    let inference = format!("{}inference", pipeline.prefix);
    let listed = pipeline.cli(&["dead-letters", "list", "--consumer", &inference, "--format", "json"]);
    assert!(listed.status.success(), "{}", String::from_utf8_lossy(&listed.stderr));
    let listed: Vec<Value> =
        String::from_utf8_lossy(&listed.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(listed.len(), 2, "{listed:?}");
    assert!(listed.iter().all(|l| l["consumer"] == inference.as_str() && l["key"] == "poison"), "{listed:?}");
    let garbage_letter = listed.iter().find(|l| l["payload_bytes"] == garbage.len()).unwrap();
    let shown = pipeline.cli(&["dead-letters", "show", garbage_letter["id"].as_str().unwrap()]);
    let shown = String::from_utf8_lossy(&shown.stdout).into_owned();
    assert!(shown.contains("de ad be ef 20 6e 6f 74") && shown.contains(&inference), "{shown}");
    assert!(!pipeline.cli(&["dead-letters", "show", "9/999"]).status.success(), "an unknown id is an error");

    // The pipeline is unharmed.
    let mut client = pipeline.client().await;
    client.ask("after-poison", None, "Still alive?").await;
    assert_eq!(client.until_outcome().await.last().unwrap()["type"], "answer");
    pipeline.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_poisoned_event_holds_its_conversation_back_until_an_operator_settles_it() {
    use rdkafka::producer::{FutureProducer, FutureRecord};

    let Some(stack) = stack() else { return };
    // With the embedder (retrieval on): it reads the conversation too, and letters for itself.
    let pipeline = Pipeline::start(&stack, &["--llm-max-tokens", "32"]).await;
    let mut alice = pipeline.client().await;
    alice.ask("p-1", None, "Say one.").await;
    let first = alice.until_outcome().await;
    assert_eq!(first.last().unwrap()["type"], "answer", "{first:?}");
    let conversation = only(&first, "ack")[0]["conversation_id"].as_str().unwrap().to_owned();

    // A broken producer writes garbage into the middle of the conversation (its partition:
    // the partitioner Parley's producers use).
    let (partitioner, scheme) = parley_eventlog::partitioner::PARTITIONER;
    let producer: FutureProducer =
        ClientConfig::new().set("bootstrap.servers", &pipeline.brokers).set(partitioner, scheme).create().unwrap();
    let garbage = b"\x00\x7f\xff\xff\xff garbage".to_vec();
    let topic = pipeline.events_topic();
    const TRACEPARENT: &str = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    let headers = rdkafka::message::OwnedHeaders::new()
        .insert(rdkafka::message::Header { key: "traceparent", value: Some(TRACEPARENT) });
    let record = FutureRecord::to(&topic).key(&conversation).payload(&garbage).headers(headers);
    producer.send(record, Duration::from_secs(10)).await.unwrap();

    let inference = format!("{}inference", pipeline.prefix);
    let embedder = format!("{}embedder", pipeline.prefix);
    let letters_of = |group: &str| {
        let listed = pipeline.cli(&["dead-letters", "list", "--consumer", group, "--format", "json"]);
        assert!(listed.status.success(), "{}", String::from_utf8_lossy(&listed.stderr));
        String::from_utf8_lossy(&listed.stdout)
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect::<Vec<Value>>()
    };
    let letter = support::wait_until("inference's letter", || {
        std::future::ready(letters_of(&inference).into_iter().find(|l| l["key"] == conversation.as_str()))
    })
    .await;
    assert_eq!(letter["status"], "open", "{letter}");

    // The conversation's next question is taken but waits; another conversation flows on.
    alice.ask("p-2", Some(&conversation), "Say two.").await;
    assert_eq!(alice.reply_to("p-2").await["type"], "ack");
    let mut bob = pipeline.client().await;
    bob.ask("b-1", None, "Say three.").await;
    assert_eq!(bob.until_outcome().await.last().unwrap()["type"], "answer", "another conversation is answered");
    let quiet = tokio::time::timeout(Duration::from_secs(3), alice.until_outcome()).await;
    assert!(quiet.is_err(), "the held conversation was answered: {quiet:?}");

    // A redrive of a record that is still garbage: the copy (for inference only) is
    // lettered again, and the conversation stays held.
    let redriven = pipeline.cli(&["dead-letters", "redrive", letter["id"].as_str().unwrap(), "--reason", "retry"]);
    assert!(redriven.status.success(), "{}", String::from_utf8_lossy(&redriven.stderr));
    let again = support::wait_until("the copy's letter", || {
        let letters: Vec<Value> =
            letters_of(&inference).into_iter().filter(|l| l["key"] == conversation.as_str()).collect();
        std::future::ready((letters.len() == 2).then_some(letters))
    })
    .await;
    assert_eq!(again[0]["status"], "redriven");
    assert_eq!(again[0]["redriven_to"], again[1]["source"], "the second letter is the copy's");
    // The copy carries the original's headers (its trace) and where it comes from.
    let copy_at: LogPosition = again[0]["redriven_to"].as_str().unwrap().parse().unwrap();
    let copied = read_at(&pipeline, &copy_at.topic, copy_at.partition, copy_at.offset).await;
    let header = |name: &str| {
        use rdkafka::message::Headers;
        let headers = copied.headers().unwrap();
        headers.iter().find(|h| h.key == name).map(|h| String::from_utf8_lossy(h.value.unwrap()).into_owned())
    };
    assert_eq!(header("traceparent").as_deref(), Some(TRACEPARENT));
    assert_eq!(
        header("parley-redriven-from"),
        Some(format!("{}dead-letter/{}", pipeline.prefix, letter["id"].as_str().unwrap()))
    );
    assert_eq!(copied.payload(), Some(&garbage[..]));
    assert_eq!(again[1]["status"], "open");
    let refused = pipeline.cli(&["dead-letters", "redrive", letter["id"].as_str().unwrap()]);
    assert!(!refused.status.success(), "a letter is settled once");
    assert!(String::from_utf8_lossy(&refused.stderr).contains("redriven already"));

    // Audit shows the conversation's letters: the original redriven, the copy's open; the
    // embedder lettered the original for itself and passed the copy (not its own) by.
    let audit = pipeline.cli(&["audit", &conversation]);
    let audit = String::from_utf8_lossy(&audit.stdout).into_owned();
    let (original, copy) = (again[0]["id"].as_str().unwrap(), again[1]["id"].as_str().unwrap());
    assert!(audit.contains(&format!("dead letter {original} of {inference}")), "{audit}");
    assert!(audit.contains(&format!("redriven to {}", again[0]["redriven_to"].as_str().unwrap())), "{audit}");
    assert!(audit.contains(&format!("dead letter {copy} of {inference}")), "{audit}");
    let embedders: Vec<Value> =
        letters_of(&embedder).into_iter().filter(|l| l["key"] == conversation.as_str()).collect();
    assert_eq!(embedders.len(), 1, "{embedders:?}");
    let open = pipeline.cli(&["dead-letters", "list", "--status", "open", "--format", "json"]);
    let open: Vec<Value> =
        String::from_utf8_lossy(&open.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let open_ids: Vec<&str> = open.iter().map(|l| l["id"].as_str().unwrap()).collect();
    assert!(open_ids.contains(&copy) && !open_ids.contains(&original), "{open_ids:?}");
    assert!(tokio::time::timeout(Duration::from_secs(2), alice.until_outcome()).await.is_err());

    // Discarded: the held question is answered.
    let discarded = pipeline.cli(&["dead-letters", "discard", copy, "--reason", "garbage"]);
    assert!(discarded.status.success(), "{}", String::from_utf8_lossy(&discarded.stderr));
    let second = alice.until_outcome().await;
    assert_eq!(second.last().unwrap()["type"], "answer", "{second:?}");
    let shown = pipeline.cli(&["dead-letters", "show", copy]);
    let shown = String::from_utf8_lossy(&shown.stdout).into_owned();
    assert!(shown.contains("status      discarded") && shown.contains(": garbage"), "{shown}");

    // A record that decodes, lettered by some other group (one that could not read it) and
    // redriven for it: audit shows the copy next to its original, and inference, which
    // answered the question already, passes the copy by.
    let audited = |conversation: &str| {
        let audit = pipeline.cli(&["audit", conversation, "--format", "json"]);
        assert!(audit.status.success(), "{}", String::from_utf8_lossy(&audit.stdout));
        String::from_utf8_lossy(&audit.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect::<Vec<Value>>()
    };
    let events = audited(&conversation);
    let question = events.iter().find(|e| e["event_type"] == "UserQueryReceived" && e["sequence"] == 4).unwrap();
    let (partition, offset) = (question["partition"].as_i64().unwrap(), question["offset"].as_i64().unwrap());
    let original = read_at(&pipeline, &topic, i32::try_from(partition).unwrap(), offset).await;
    let other_group = format!("{}auditor", pipeline.prefix);
    let letter = parley_events::DeadLetter {
        source_topic: topic.clone(),
        source_partition: i32::try_from(partition).unwrap(),
        source_offset: offset,
        key: original.key().map(<[u8]>::to_vec),
        payload: original.payload().map(<[u8]>::to_vec),
        consumer: other_group.clone(),
        error: "a schema this group did not know yet".into(),
        failed_at: parley_events::event::now_millis(),
        headers: Default::default(),
    };
    let codec = EventCodec::new(&pipeline.registry).unwrap();
    let (dead_letter_topic, payload) =
        (format!("{}dead-letter", pipeline.prefix), codec.encode(&letter).await.unwrap());
    let record = FutureRecord::to(&dead_letter_topic).key(&conversation).payload(&payload);
    let lettered = producer.send(record, Duration::from_secs(10)).await.unwrap();
    let redriven = pipeline.cli(&["dead-letters", "redrive", &format!("{}/{}", lettered.partition, lettered.offset)]);
    assert!(redriven.status.success(), "{}", String::from_utf8_lossy(&redriven.stderr));
    let events = support::wait_until("the copy in audit", || {
        let events = audited(&conversation);
        std::future::ready(events.iter().any(|e| !e["redriven_from"].is_null()).then_some(events))
    })
    .await;
    let copies: Vec<&Value> = events.iter().filter(|e| e["event_id"] == question["event_id"]).collect();
    assert_eq!(copies.len(), 2, "the original and its copy: {copies:?}");
    let copy = copies.iter().find(|e| !e["redriven_from"].is_null()).unwrap();
    assert_eq!(
        copy["redriven_from"],
        format!("{}dead-letter/{}/{}", pipeline.prefix, lettered.partition, lettered.offset).as_str()
    );
    assert_eq!(copy["partition"], question["partition"], "a copy goes to its original's partition");
    tokio::time::sleep(Duration::from_secs(3)).await;
    let answers = |events: &[Value]| events.iter().filter(|e| e["event_type"] == "LLMResponseGenerated").count();
    assert_eq!(answers(&audited(&conversation)), 2, "inference answered a copy that was not redriven for it");
    pipeline.stop().await;
}

/// A foreign producer writes a question whose event id is not a UUID: every consumer reads
/// it as poison (the codec refuses it: one policy for a bad id), so inference letters it once
/// and writes no outcome; its outcome id, derived from the query's, could not be deterministic.
#[tokio::test(flavor = "multi_thread")]
async fn a_query_with_a_malformed_event_id_is_dead_lettered_not_answered() {
    use parley_events::{Envelope, Producer, UserQueryReceived};
    use rdkafka::producer::{FutureProducer, FutureRecord};

    let Some(stack) = stack() else { return };
    let pipeline = Pipeline::start(&stack, &["--without-retrieval"]).await;
    let conversation = uuid::Uuid::new_v4().to_string();
    let event_id = uuid::Uuid::new_v4();
    let envelope = Envelope::new(event_id, &conversation, 2, Producer { name: "foreign", version: "1" });
    let query = UserQueryReceived {
        envelope,
        user_id: "mallory".into(),
        client_message_id: "m1".into(),
        text: "Say OK.".into(),
    };
    let codec = EventCodec::new(&pipeline.registry).unwrap();
    // Parley's encoder refuses such an id; a foreign one writes any string of the same length.
    let mut payload = codec.encode(&query).await.unwrap();
    let (id, malformed) = (event_id.to_string().into_bytes(), b"question-7-is-not-a-uuid-at-all-xxxx");
    let at = payload.windows(id.len()).position(|w| w == id.as_slice()).unwrap();
    payload[at..at + id.len()].copy_from_slice(malformed);
    let producer: FutureProducer = ClientConfig::new().set("bootstrap.servers", &pipeline.brokers).create().unwrap();
    let topic = pipeline.events_topic();
    let record = FutureRecord::to(&topic).key(&conversation).payload(&payload);
    producer.send(record, Duration::from_secs(10)).await.unwrap();

    let inference = format!("{}inference", pipeline.prefix);
    let letters = support::wait_until("inference's letter", || {
        let listed = pipeline.cli(&["dead-letters", "list", "--format", "json", "--consumer", &inference]);
        let letters: Vec<Value> =
            String::from_utf8_lossy(&listed.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        std::future::ready((!letters.is_empty()).then_some(letters))
    })
    .await;
    assert_eq!(letters.len(), 1, "{letters:?}");
    assert!(letters[0]["error"].as_str().unwrap().to_lowercase().contains("uuid"), "{letters:?}");
    assert_eq!(letters[0]["key"], conversation.as_str());
    // Inference is past it (another conversation is answered) and wrote no outcome of it.
    let mut client = pipeline.client().await;
    client.ask("after", None, "Say hello.").await;
    assert_eq!(client.until_outcome().await.last().unwrap()["type"], "answer");
    let events = support::log_to_end(&pipeline.brokers, &pipeline.registry, &topic).await;
    let outcomes = events.iter().filter(|e| match e {
        ConversationEvent::ResponseGenerated(a) => a.envelope.conversation_id == conversation,
        ConversationEvent::ResponseFailed(f) => f.envelope.conversation_id == conversation,
        _ => false,
    });
    assert_eq!(outcomes.count(), 0);
    pipeline.stop().await;
}

/// The record at `partition`/`offset` of `topic`.
async fn read_at(pipeline: &Pipeline, topic: &str, partition: i32, offset: i64) -> rdkafka::message::OwnedMessage {
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", &pipeline.brokers)
        .set("group.id", format!("{}read-at", pipeline.prefix))
        .create()
        .unwrap();
    let mut assignment = rdkafka::TopicPartitionList::new();
    assignment.add_partition_offset(topic, partition, rdkafka::Offset::Offset(offset)).unwrap();
    consumer.assign(&assignment).unwrap();
    tokio::time::timeout(Duration::from_secs(30), consumer.recv()).await.unwrap().unwrap().detach()
}

/// Reads `count` records of type `T` from the start of `topic`.
async fn read_all<T: parley_events::event::AvroEvent>(pipeline: &Pipeline, topic: &str, count: usize) -> Vec<T> {
    let codec = EventCodec::new(&pipeline.registry).unwrap();
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", &pipeline.brokers)
        .set("group.id", format!("{}reader-{topic}", pipeline.prefix))
        .set("isolation.level", "read_committed")
        .set("auto.offset.reset", "earliest")
        .create()
        .unwrap();
    consumer.subscribe(&[topic]).unwrap();
    let mut records = Vec::new();
    while records.len() < count {
        let message = tokio::time::timeout(Duration::from_secs(60), consumer.recv())
            .await
            .expect("records on the topic")
            .unwrap();
        records.push(codec.decode::<T>(message.payload().unwrap()).await.unwrap().event);
    }
    records
}

async fn read_topic_of(pipeline: &Pipeline, count: usize) -> Vec<(ConversationEvent, Option<String>)> {
    support::log_events(&pipeline.brokers, &pipeline.registry, &pipeline.events_topic(), None, count).await
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

#[tokio::test(flavor = "multi_thread")]
async fn an_answer_occurs_when_it_was_generated_not_when_it_was_asked() {
    let Some(stack) = stack() else { return };
    let pipeline = Pipeline::start(&stack, &[]).await;
    let mut client = pipeline.client().await;
    client.ask("slow-1", None, "Write three sentences about the sea.").await;
    client.until_outcome().await;
    let events = read_topic_of(&pipeline, 3).await;
    let (ConversationEvent::QueryReceived(query), ConversationEvent::ResponseGenerated(answer)) =
        (&events[1].0, &events[2].0)
    else {
        panic!("{events:?}")
    };
    let between = answer.envelope.occurred_at - query.envelope.occurred_at;
    assert!(
        between >= answer.llm_latency_ms,
        "answer {between} ms after its question, but the model took {} ms",
        answer.llm_latency_ms
    );
    pipeline.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_rate_limit_holds_across_gateways_and_restarts_and_spares_duplicates() {
    let Some(stack) = stack() else { return };
    let limit = ["--user-turns-per-minute", "3"];
    let mut pipeline = Pipeline::start(&stack, &limit).await;
    let second = pipeline.extra_gateway(&limit).await;
    let (user, token) = pipeline.session_user().await;
    let mut on_first = pipeline.connect(&pipeline.http, &token).await;
    let mut on_second = pipeline.connect(&second, &token).await;
    // Each turn starts a conversation of its own (no turn_in_progress); the pause lets the
    // other instance read the query from the log, as it would between a person's turns.
    let mut frames = Vec::new();
    for turn in 0..5 {
        let socket = if turn % 2 == 0 { &mut on_first } else { &mut on_second };
        let id = format!("r{turn}");
        socket.ask(&id, None, "Say OK.").await;
        frames.push(socket.reply_to(&id).await);
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let kinds: Vec<&str> = frames.iter().map(|f| f["type"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["ack", "ack", "ack", "error", "error"], "{frames:?}");
    for refused in &frames[3..] {
        assert_eq!(refused["code"], "rate_limited", "{refused}");
        let wait = refused["retry_after_ms"].as_u64().unwrap();
        assert!(wait > 0 && wait <= 20_000, "one turn refills in 20 s: {refused}");
        assert!(refused["message"].as_str().unwrap().contains("too many questions"), "{refused}");
    }
    // A resend of an admitted turn is its duplicate, not a new turn.
    on_second.ask("r0", None, "Say OK.").await;
    let resent = on_second.reply_to("r0").await;
    assert_eq!(resent["duplicate"], true, "{resent}");
    assert_eq!(resent["event_id"], frames[0]["event_id"]);
    // Another user has a bucket of their own.
    let mut other = pipeline.client_at(&second).await;
    other.ask("o0", None, "Say OK.").await;
    assert_eq!(other.reply_to("o0").await["type"], "ack");
    // A restarted instance reads the last minute back from the log.
    pipeline.restart().await;
    let mut after_restart = pipeline.connect(&pipeline.http, &token).await;
    after_restart.ask("r5", None, "Say OK.").await;
    let refused = after_restart.reply_to("r5").await;
    assert_eq!(refused["code"], "rate_limited", "{refused}");
    let events = support::log_to_end(&pipeline.brokers, &pipeline.registry, &pipeline.events_topic()).await;
    let queries =
        events.iter().filter(|e| matches!(e, ConversationEvent::QueryReceived(q) if q.user_id == user)).count();
    assert_eq!(queries, 3, "only admitted turns are in the log");
    pipeline.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn parallel_turns_across_gateways_never_overspend_a_token_budget() {
    let Some(stack) = stack() else { return };
    // "Say OK." reserves 2 + 1000 tokens: the daily budget has room for two such turns.
    const RESERVATION: u64 = 1_002;
    const DAILY: u64 = 2_100;
    let budget = ["--daily-token-budget", "2100", "--turn-reserve-tokens", "1000"];
    let mut pipeline = Pipeline::start(&stack, &budget).await;
    let second = pipeline.extra_gateway(&budget).await;
    let (user, token) = pipeline.session_user().await;
    let mut sockets = Vec::new();
    for n in 0..6 {
        let http = if n % 2 == 0 { pipeline.http.clone() } else { second.clone() };
        sockets.push(pipeline.connect(&http, &token).await);
    }
    let replies = futures::future::join_all(sockets.iter_mut().enumerate().map(|(n, socket)| async move {
        let id = format!("b{n}");
        socket.ask(&id, None, "Say OK.").await;
        socket.reply_to(&id).await
    }))
    .await;
    let admitted: Vec<usize> = (0..6).filter(|&n| replies[n]["type"] == "ack").collect();
    assert_eq!(admitted.len(), 2, "room for two reservations, whichever gateway: {replies:?}");
    for refused in replies.iter().filter(|r| r["type"] == "error") {
        assert_eq!(refused["code"], "budget_exceeded", "{refused}");
        assert!(refused["message"].as_str().unwrap().contains("daily token budget"), "{refused}");
        assert!(refused["resets_at"].as_str().unwrap().ends_with("T00:00:00Z"), "midnight UTC: {refused}");
    }
    let mut used = 0;
    for n in &admitted {
        let frames = sockets[*n].until_outcome().await;
        let answer = frames.last().unwrap();
        assert_eq!(answer["type"], "answer", "{frames:?}");
        used += answer["prompt_tokens"].as_u64().unwrap() + answer["completion_tokens"].as_u64().unwrap();
    }
    // A gateway without budgets lets turns through; inference reserves for them itself and
    // fails those that do not fit. The two answers above are settled at their real usage.
    let unchecked = pipeline.extra_gateway(&["--daily-token-budget", "0"]).await;
    let fit = (0..2u64).filter(|k| used + (k + 1) * RESERVATION <= DAILY).count();
    let mut late = Vec::new();
    for n in 0..2 {
        let mut socket = pipeline.connect(&unchecked, &token).await;
        socket.ask(&format!("late{n}"), None, "Say OK.").await;
        late.push(socket);
    }
    let outcomes = futures::future::join_all(late.iter_mut().map(|s| s.until_outcome())).await;
    let answered = outcomes.iter().filter(|f| f.last().unwrap()["type"] == "answer").count();
    assert_eq!(answered, fit, "the first two used {used} tokens: {outcomes:?}");
    for failed in outcomes.iter().map(|f| f.last().unwrap()).filter(|f| f["type"] == "failed") {
        assert_eq!(failed["error_kind"], "budget_exceeded", "{failed}");
    }
    // What the model really spent stays within the budget plus one turn's reservation.
    let events = support::log_to_end(&pipeline.brokers, &pipeline.registry, &pipeline.events_topic()).await;
    let spent: u64 = events
        .iter()
        .filter_map(|e| match e {
            ConversationEvent::ResponseGenerated(a) if a.user_id == user => {
                Some(u64::try_from(a.prompt_tokens + a.completion_tokens).unwrap())
            }
            _ => None,
        })
        .sum();
    assert!(spent <= DAILY + RESERVATION, "spent {spent}");
    // `parley usage` tells the same from the log, with what is left and what was refused.
    let usage = pipeline.cli(&["--daily-token-budget", "2100", "usage", &user, "--format", "json"]);
    let stdout = String::from_utf8_lossy(&usage.stdout);
    assert!(usage.status.success(), "{stdout}{}", String::from_utf8_lossy(&usage.stderr));
    let report: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(report["today"]["spent"], spent, "{report}");
    assert_eq!(report["today"]["budget"], DAILY, "{report}");
    assert_eq!(report["today"]["left"], DAILY.saturating_sub(spent), "{report}");
    assert_eq!(report["today"]["budget_source"], "default", "{report}");
    assert_eq!(report["refused_by_inference"].as_array().unwrap().len(), 2 - fit, "{report}");
    let text = pipeline.cli(&["--daily-token-budget", "2100", "usage", &user]);
    let text = String::from_utf8_lossy(&text.stdout);
    let today = text.lines().find(|l| l.contains("today")).unwrap();
    let columns: Vec<&str> = today.split_whitespace().collect();
    assert_eq!(columns[2..], [spent.to_string(), DAILY.to_string(), DAILY.saturating_sub(spent).to_string()], "{text}");
    assert_eq!(text.matches("refused by inference").count(), 2 - fit, "{text}");
    // A user's own budget wins over the default: 0 lifts the daily one for them.
    let set = pipeline.cli(&["budget", &user, "--daily", "0"]);
    assert!(set.status.success(), "{}", String::from_utf8_lossy(&set.stderr));
    let mut lifted = pipeline.connect(&pipeline.http, &token).await;
    lifted.ask("lifted", None, "Say OK.").await;
    assert_eq!(lifted.reply_to("lifted").await["type"], "ack");
    pipeline.stop().await;
}

/// With every default budget off (the quick start), a budget an operator sets for one user
/// is enforced, `parley usage` shows it, and other users stay unlimited.
#[tokio::test(flavor = "multi_thread")]
async fn a_users_own_budget_holds_when_the_defaults_are_off() {
    let Some(stack) = stack() else { return };
    let pipeline = Pipeline::start(&stack, &["--turn-reserve-tokens", "1000"]).await;
    let (user, token) = pipeline.session_user().await;
    // Room for one reservation of "Say OK." (2 + 1000), not for a second after its real use.
    let set = pipeline.cli(&["budget", &user, "--daily", "1010"]);
    let said = String::from_utf8_lossy(&set.stdout);
    assert!(set.status.success(), "{said}{}", String::from_utf8_lossy(&set.stderr));
    assert!(said.contains("daily 1010 tokens, monthly no limit, per conversation no limit"), "in words: {said}");
    let mut socket = pipeline.connect(&pipeline.http, &token).await;
    socket.ask("own-1", None, "Say OK.").await;
    assert_eq!(socket.until_outcome().await.last().unwrap()["type"], "answer");
    socket.ask("own-2", None, "Say OK.").await;
    let refused = socket.reply_to("own-2").await;
    assert_eq!(refused["code"], "budget_exceeded", "{refused}");
    let usage = pipeline.cli(&["usage", &user, "--format", "json"]);
    let report: Value = serde_json::from_slice(&usage.stdout).unwrap();
    assert_eq!(
        (report["today"]["budget"].as_u64(), report["today"]["budget_source"].as_str()),
        (Some(1010), Some("own"))
    );
    assert_eq!(report["this_month"]["budget"], Value::Null, "no monthly limit: {report}");
    // A command's stderr into a pipe: no colour codes, no libraries' INFO lines.
    let stderr = String::from_utf8_lossy(&usage.stderr);
    assert!(!stderr.contains('\u{1b}') && !stderr.contains(" INFO "), "{stderr}");
    // Users without budgets of their own have none.
    let mut other = pipeline.client().await;
    for n in 0..2 {
        other.ask(&format!("free-{n}"), None, "Say OK.").await;
        assert_eq!(other.until_outcome().await.last().unwrap()["type"], "answer");
    }
    pipeline.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn past_the_queue_age_threshold_new_turns_are_refused_and_admitted_ones_finish() {
    let Some(stack) = stack() else { return };
    let mut args = vec!["--concurrency", "1", "--shed-queue-age", "1s", "--without-retrieval"];
    args.extend(support::NO_RATE_LIMITS);
    let pipeline = Pipeline::start(&stack, &args).await;
    // Six long questions for one model slot: the last of them waits for seconds.
    let mut crowd = Vec::new();
    for n in 0..6 {
        let mut client = pipeline.client().await;
        let id = format!("crowd{n}");
        client.ask(&id, None, "List 20 animals, one per line.").await;
        let reply = client.reply_to(&id).await;
        crowd.push((client, reply));
    }
    let mut probe = pipeline.client().await;
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut admitted_probes = Vec::new();
    let refused = loop {
        let id = format!("probe{}", admitted_probes.len());
        probe.ask(&id, None, "Say OK.").await;
        let reply = probe.reply_to(&id).await;
        if reply["type"] == "error" {
            break reply;
        }
        admitted_probes.push(reply);
        assert!(Instant::now() < deadline, "never shed while the queue grew");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(refused["code"], "overloaded", "{refused}");
    assert!(refused["retry_after_ms"].as_u64().unwrap() >= 1_000, "{refused}");
    // Every turn admitted before finishes: shedding refuses new work, it drops none.
    for (client, reply) in crowd.iter_mut().filter(|(_, reply)| reply["type"] == "ack") {
        let frames = client.until_outcome().await;
        assert_eq!(frames.last().unwrap()["type"], "answer", "{reply} {frames:?}");
    }
    // Drained, it takes turns again.
    let deadline = Instant::now() + Duration::from_secs(90);
    for n in 0.. {
        let id = format!("after{n}");
        probe.ask(&id, None, "Say OK.").await;
        if probe.reply_to(&id).await["type"] == "ack" {
            break;
        }
        assert!(Instant::now() < deadline, "still shedding after the queue drained");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    pipeline.stop().await;
}

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
    assert_eq!((cancel.query_event_id.as_str(), cancel.envelope.sequence), (query, 2));
    let replay = pipeline.cli(&["replay", conversation, "--scan"]);
    let shown = String::from_utf8_lossy(&replay.stdout);
    assert!(replay.status.success() && shown.contains("cancel     asked by"), "{shown}");
    let audit = pipeline.cli(&["audit", conversation, "--scan"]);
    let audit = String::from_utf8_lossy(&audit.stdout);
    assert!(audit.contains("TurnCancelRequested") && audit.contains("stopped by a cancel after"), "{audit}");
    pipeline.stop().await;
}

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
async fn resumed_turn(client: &mut support::Client) -> (String, Vec<i64>, String, Value) {
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
    // Well after the grace period, the answer was stopped where it was.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut back = pipeline.connect(&pipeline.http, &token).await;
    let resume = json!({"type": "resume", "conversation_id": ack["conversation_id"], "query_event_id": ack["event_id"],
                        "last_index": -1});
    back.send(resume).await;
    let (status, _, _, answer) = resumed_turn(&mut back).await;
    assert_eq!((status.as_str(), &answer["finish_reason"]), ("complete", &json!("cancelled")), "{answer}");
    pipeline.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_page_from_another_site_cannot_open_a_socket_or_change_anything() {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let Some(stack) = stack() else { return };
    let pipeline = Pipeline::start(&stack, &["--max-sockets-per-user", "2"]).await;
    let (_, token) = pipeline.session_user().await;
    let url = format!("{}/ws?token={token}", pipeline.http.replace("http://", "ws://"));
    let from = |origin: &str| {
        let mut request = url.as_str().into_client_request().unwrap();
        request.headers_mut().insert("Origin", origin.parse().unwrap());
        request
    };
    let status_of = |refused: Result<_, tokio_tungstenite::tungstenite::Error>| match refused {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => response.status().as_u16(),
        Err(other) => panic!("{other}"),
        Ok(_) => 101,
    };
    assert_eq!(status_of(tokio_tungstenite::connect_async(from("https://evil.example")).await.map(drop)), 403);
    // The chat page's own origin, and clients that are not browsers (no Origin), pass.
    let (own_page, _) = tokio_tungstenite::connect_async(from(&pipeline.http)).await.unwrap();
    let (no_browser, _) = tokio_tungstenite::connect_async(url.as_str()).await.unwrap();
    // Two sockets per user here: a third is refused until one closes.
    assert_eq!(status_of(tokio_tungstenite::connect_async(url.as_str()).await.map(drop)), 429);
    drop(own_page);
    let deadline = Instant::now() + Duration::from_secs(10);
    while status_of(tokio_tungstenite::connect_async(url.as_str()).await.map(drop)) != 101 {
        assert!(Instant::now() < deadline, "a closed socket was never given back");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop(no_browser);

    // State-changing requests from another site are refused; reads are not.
    let http = reqwest::Client::new();
    let evil = |request: reqwest::RequestBuilder| request.header("Origin", "https://evil.example").send();
    let session = evil(http.post(format!("{}/api/session", pipeline.http))).await.unwrap();
    assert_eq!(session.status(), 403);
    let cancel =
        evil(http.post(format!("{}/api/conversations/{}/cancel", pipeline.http, uuid::Uuid::new_v4()))).await.unwrap();
    assert_eq!(cancel.status(), 403);
    let read = evil(http.get(format!("{}/api/conversations", pipeline.http)).bearer_auth(&token)).await.unwrap();
    assert_eq!(read.status(), 200);
    pipeline.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn documents_per_minute_hold_across_gateways() {
    let Some(stack) = stack() else { return };
    let args = ["--without-retrieval", "--user-documents-per-minute", "2"];
    let mut pipeline = Pipeline::start(&stack, &args).await;
    let second = pipeline.extra_gateway(&args).await;
    let token = pipeline.session().await;
    let http = reqwest::Client::new();
    let post = |gateway: &str, n: usize| {
        let body = json!({"title": format!("note {n}.txt"), "text": format!("note number {n}")});
        http.post(format!("{gateway}/api/documents")).bearer_auth(&token).json(&body).send()
    };
    for n in 0..2 {
        assert_eq!(post(&pipeline.http, n).await.unwrap().status(), 202);
    }
    // The other gateway learns of them from the documents topic, and refuses the third.
    let deadline = Instant::now() + Duration::from_secs(20);
    let refused = loop {
        let response = post(&second, 2).await.unwrap();
        if response.status() == 429 {
            break response;
        }
        assert_eq!(response.status(), 202, "accepted only while the second gateway had not seen the others");
        assert!(Instant::now() < deadline, "the limit never held on the second gateway");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(refused.headers().contains_key("retry-after"));
    let body: Value = refused.json().await.unwrap();
    assert_eq!(body["error"], "rate_limited", "{body}");
    pipeline.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn no_token_secret_or_api_key_reaches_the_logs() {
    let Some(stack) = stack() else { return };
    const API_KEY: &str = "sk-parley-test-4711-do-not-log";
    // The key comes from a file only its owner reads (a secret is never an argument).
    let secrets = tempfile::tempdir().unwrap();
    let key_file = secrets.path().join("llm-api-key");
    std::fs::write(&key_file, API_KEY).unwrap();
    std::fs::set_permissions(&key_file, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let key_file = key_file.display().to_string();
    let pipeline = Pipeline::start(&stack, &["--without-retrieval", "--llm-api-key-file", &key_file]).await;
    let (_, token) = pipeline.session_user().await;
    let mut client = pipeline.connect(&pipeline.http, &token).await;
    client.ask("q", None, "Say OK.").await;
    let frames = client.until_outcome().await;
    assert_eq!(frames.last().unwrap()["type"], "answer");
    let (status, _) = pipeline.get("/api/conversations", &token).await;
    assert_eq!(status, 200);
    // One signature character changed (not the last: its low bits may be padding that a
    // decoder ignores, and a last "0" replaced by "0" was no forgery at all).
    let at = token.len() - 3;
    let swapped = if &token[at..=at] == "A" { "B" } else { "A" };
    let forged = format!("{}{swapped}{}", &token[..at], &token[at + 1..]);
    assert_ne!(forged, token);
    assert_eq!(pipeline.get("/api/conversations", &forged).await.0, 401);
    // The turn's whole trace, as Jaeger keeps it.
    let conversation = frames[0]["conversation_id"].as_str().unwrap().to_owned();
    let audit = pipeline.cli(&["audit", &conversation, "--format", "json"]);
    let first: Value = serde_json::from_str(String::from_utf8_lossy(&audit.stdout).lines().next().unwrap()).unwrap();
    let trace_id = first["trace_id"].as_str().unwrap().to_owned();
    let traced = trace_text(&stack.jaeger, &trace_id, "inference.llm_attempt").await;
    let log = pipeline.log_path();
    pipeline.stop().await;

    let logged = std::fs::read_to_string(log).unwrap_or_default();
    assert!(!logged.is_empty(), "the pipeline logged something");
    let signature = token.rsplit('.').next().unwrap();
    for secret in [API_KEY, support::AUTH_SECRET, signature] {
        assert!(!logged.contains(secret), "{secret:?} is in the log");
        assert!(!traced.contains(secret), "{secret:?} is in the trace");
    }
}

/// The JSON Jaeger serves for `trace_id`, once it holds a span named `operation`.
async fn trace_text(jaeger: &str, trace_id: &str, operation: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let body = match reqwest::get(format!("{jaeger}/api/traces/{trace_id}")).await {
            Ok(response) => response.text().await.unwrap_or_default(),
            Err(_) => String::new(),
        };
        if body.contains(&format!("\"operationName\":\"{operation}\"")) {
            return body;
        }
        assert!(Instant::now() < deadline, "trace {trace_id} has no {operation} span in Jaeger: {body}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}
