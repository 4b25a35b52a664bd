//! A question in, the answer pushed back: the chat path end to end.

use parley_gateway::protocol::{ErrorCode, ServerFrame};

use super::*;

#[tokio::test(flavor = "multi_thread")]
async fn a_question_gets_the_models_answer_pushed_back() {
    let Some(stack) = stack() else { return };
    let pipeline = Pipeline::start(&stack, &[]).await;
    let mut client = pipeline.client().await;

    client.ask("m-1", None, "Name a primary color.").await;
    let frames = client.turn().await;
    let (conversation, query, sequence) = ack_of(&frames);
    let Some(ServerFrame::Answer {
        conversation_id,
        query_event_id,
        sequence: answer_sequence,
        text,
        completion_tokens,
        llm_latency_ms,
        time_to_first_token_ms,
        ..
    }) = frames.last()
    else {
        panic!("the turn ends with its answer: {frames:?}")
    };
    assert_eq!(sequence, 2, "ConversationStarted is 1, the first query 2");
    assert_eq!((conversation_id, query_event_id, *answer_sequence), (&conversation, &query, 3));
    assert!(!text.trim().is_empty());
    assert!(*completion_tokens > 0);
    assert!((0..=*llm_latency_ms).contains(&time_to_first_token_ms.unwrap()));
    let position = frames.iter().find_map(|f| match f {
        ServerFrame::Ack { position, .. } => Some(position),
        _ => None,
    });
    assert!(position.unwrap().starts_with(&pipeline.events_topic()), "{position:?}");

    // Deltas stream before the answer and spell (a prefix of) it; none comes after it.
    let streamed: Vec<&str> = frames
        .iter()
        .filter_map(|f| match f {
            ServerFrame::Token { delta, .. } => Some(delta.as_str()),
            _ => None,
        })
        .collect();
    assert!(!streamed.is_empty(), "tokens stream before the answer");
    assert!(text.starts_with(&streamed.concat()), "{streamed:?} vs {text:?}");

    // A follow-up in the same conversation continues its sequence.
    client.ask("m-2", Some(&conversation), "And another one?").await;
    let frames = client.turn().await;
    assert_eq!(ack_of(&frames).2, 4);
    assert!(matches!(frames.last(), Some(ServerFrame::Answer { sequence: 5, .. })), "{frames:?}");
    pipeline.stop().await;
}

/// The conversation, event id and sequence a turn's `ack` gave its question.
fn ack_of(frames: &[ServerFrame]) -> (String, String, i64) {
    let ack = frames.iter().find_map(|f| match f {
        ServerFrame::Ack { conversation_id, event_id, sequence, .. } => {
            Some((conversation_id.clone(), event_id.clone(), *sequence))
        }
        _ => None,
    });
    ack.unwrap_or_else(|| panic!("no ack among {frames:?}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_conversations_each_get_their_own_answer() {
    let Some(stack) = stack() else { return };
    let pipeline = Pipeline::start(&stack, &[]).await;
    let mut alice = pipeline.client().await;
    let mut bob = pipeline.client().await;
    alice.ask("a-1", None, "What is two plus two?").await;
    bob.ask("b-1", None, "What color is the sky?").await;
    let (alice_frames, bob_frames) = tokio::join!(alice.turn(), bob.turn());
    for frames in [&alice_frames, &bob_frames] {
        let (conversation, query, _) = ack_of(frames);
        let answered =
            matches!(frames.last(), Some(ServerFrame::Answer { query_event_id, .. }) if *query_event_id == query);
        assert!(answered, "{frames:?}");
        for frame in frames {
            if let ServerFrame::Token { conversation_id, .. } | ServerFrame::Answer { conversation_id, .. } = frame {
                assert_eq!(*conversation_id, conversation, "no frame of another conversation: {frame:?}");
            }
        }
    }
    let alices = ack_of(&alice_frames).0;
    assert_ne!(alices, ack_of(&bob_frames).0);

    // Bob cannot write into Alice's conversation.
    bob.ask("b-2", Some(&alices), "hijack").await;
    let error = bob.frame().await;
    assert!(matches!(error, ServerFrame::Error { code: ErrorCode::UnknownConversation, .. }), "{error:?}");
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
        assert_eq!(event.envelope().conversation_id.to_string(), ack["conversation_id"].as_str().unwrap());
        assert_eq!(event.envelope().traceparent.as_deref(), traceparent.as_deref(), "header and envelope agree");
    }
    let (ConversationEvent::QueryReceived(query), ConversationEvent::ResponseGenerated(response)) =
        (&events[1].0, &events[2].0)
    else {
        panic!("{events:?}")
    };
    assert_eq!(query.envelope.event_id.to_string(), ack["event_id"].as_str().unwrap());
    assert_eq!(response.envelope.causation_id, Some(query.envelope.event_id));
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
    // decoder ignores) to another value: a hex decoder reads "a" and "A" alike, so the
    // replacement is a digit other than the one there.
    let at = token.len() - 3;
    let swapped = if &token[at..=at] == "0" { "1" } else { "0" };
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
