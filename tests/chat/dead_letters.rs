//! Undecodable records go to the dead-letter topic with their bytes and hold their conversation back.

use super::*;

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
    // Inference has read the copy and is done with it: it did not answer it again.
    let (partition, offset) = (copy["partition"].as_i64().unwrap(), copy["offset"].as_i64().unwrap());
    let inference = format!("{}inference", pipeline.prefix);
    pipeline.wait_consumed(&inference, &pipeline.events_topic(), i32::try_from(partition).unwrap(), offset).await;
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
    let conversation_id = parley_events::ConversationId::random();
    let conversation = conversation_id.to_string();
    let event_id = parley_events::EventId::random();
    let envelope = Envelope::new(event_id, conversation_id, 2, Producer { name: "foreign", version: "1" });
    let query = UserQueryReceived {
        sealed_for: String::new(),
        envelope,
        user_id: "mallory".parse().unwrap(),
        client_message_id: "m1".into(),
        text: "Say OK.".into(),
        no_cache: false,
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
        ConversationEvent::ResponseGenerated(a) => a.envelope.conversation_id == conversation_id,
        ConversationEvent::ResponseFailed(f) => f.envelope.conversation_id == conversation_id,
        _ => false,
    });
    assert_eq!(outcomes.count(), 0);
    pipeline.stop().await;
}
