//! What admits a turn or a socket: rate limits, token budgets, queue age, origin and socket limits.

use super::*;

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
    let queries = events
        .iter()
        .filter(|e| matches!(e, ConversationEvent::QueryReceived(q) if q.user_id.as_str() == user))
        .count();
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
            ConversationEvent::ResponseGenerated(a) if a.user_id.as_ref().is_some_and(|u| u.as_str() == user) => {
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
