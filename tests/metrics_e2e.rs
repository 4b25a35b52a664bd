//! Prometheus metrics on the real stack: after a turn, a refused turn and a malformed frame,
//! the gateway's `/metrics` (and `--metrics-listen`, where a service without a gateway
//! serves them) shows the turn counts, the socket, the GenAI call metrics, the latency a
//! person saw, the store calls, the consumer lag and the breakers.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::time::{Duration, Instant};

use support::{Pipeline, stack};

/// The metrics text once every one of `wanted` is in it (a minute at most).
async fn metrics_with(url: &str, wanted: &[&str]) -> String {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let text = reqwest::get(url).await.unwrap().text().await.unwrap();
        let missing: Vec<&&str> = wanted.iter().filter(|w| !text.contains(**w)).collect();
        if missing.is_empty() {
            return text;
        }
        assert!(Instant::now() < deadline, "missing {missing:?} in:\n{text}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// The value of the sample that starts with `series` (name and labels).
fn sample(text: &str, series: &str) -> f64 {
    let line = text.lines().find(|l| l.starts_with(series)).unwrap_or_else(|| panic!("no {series} in:\n{text}"));
    line.rsplit(' ').next().unwrap().parse().unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_turn_shows_in_every_metric_family() {
    let Some(stack) = stack() else { return };
    let metrics_port = support::free_port();
    let listen = format!("127.0.0.1:{metrics_port}");
    // Idle conversations are looked for every second (the conversation, followed, stays).
    let pipeline = Pipeline::start(&stack, &["--metrics-listen", &listen, "--hub-idle", "1s"]).await;
    let token = pipeline.session().await;
    let mut client = pipeline.connect(&pipeline.http, &token).await;
    client.ask("m-1", None, "Say OK.").await;
    let frames = client.until_outcome().await;
    assert_eq!(frames.last().unwrap()["type"], "answer", "{frames:?}");
    let conversation = frames[0]["conversation_id"].as_str().unwrap().to_owned();
    client.send_raw("{not json".into()).await;
    assert_eq!(client.next_frame().await["code"], "malformed_frame");
    // A question to a conversation that is not the user's is refused.
    client.ask("m-2", Some(&uuid::Uuid::new_v4().to_string()), "Hello?").await;
    assert_eq!(client.reply_to("m-2").await["code"], "unknown_conversation");
    pipeline.conversation_when(&token, &conversation, 2).await;

    let url = format!("{}/metrics", pipeline.http);
    let text = metrics_with(
        &url,
        &[
            r#"parley_turns_total{outcome="admitted",reason=""} 1"#,
            r#"parley_turns_total{outcome="refused",reason="unknown_conversation"} 1"#,
            r#"parley_error_frames_total{code="malformed_frame"} 1"#,
            "parley_open_sockets 1",
            "parley_gateway_conversations 1",
            "parley_dead_letter_held_keys{group=",
            "parley_dead_letter_held_records{group=",
            r#"gen_ai_client_operation_duration_seconds_count{error_type="",gen_ai_operation_name="chat",gen_ai_provider_name="llama.cpp",gen_ai_request_model="SmolLM2-135M-Instruct""#,
            r#"gen_ai_token_type="output""#,
            r#"gen_ai_token_type="input""#,
            "gen_ai_client_operation_time_to_first_chunk_seconds_count",
            r#"parley_first_token_seconds_count{lane="standard"} 1"#,
            r#"parley_answer_seconds_count{lane="standard",outcome="answer"} 1"#,
            r#"parley_llm_breaker_open{endpoint="#,
            r#"parley_store_call_duration_seconds_count{operation="insert messages",outcome="ok",store="cql"}"#,
            r#"store="milvus""#,
            "parley_consumer_lag_records{group=",
            "parley_consumer_lag_seconds{group=",
            "parley_projection_delay_seconds_count",
            "parley_projection_lag_seconds",
        ],
    )
    .await;
    let output_tokens = text
        .lines()
        .find(|l| l.starts_with("gen_ai_client_token_usage_sum") && l.contains(r#"gen_ai_token_type="output""#))
        .unwrap();
    assert!(output_tokens.rsplit(' ').next().unwrap().parse::<f64>().unwrap() >= 1.0, "{output_tokens}");
    assert!(sample(&text, r#"parley_first_token_seconds_sum{lane="standard"}"#) > 0.0);
    // Once everything is done, no group is behind.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let text = reqwest::get(&url).await.unwrap().text().await.unwrap();
        let behind: Vec<&str> =
            text.lines().filter(|l| l.starts_with("parley_consumer_lag_") && !l.ends_with(" 0")).collect();
        if behind.is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "still behind a minute after the turn: {behind:?}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // The same registry on the metrics address of its own.
    let own = reqwest::get(format!("http://{listen}/metrics")).await.unwrap();
    assert_eq!(own.headers()["content-type"], "text/plain; version=0.0.4; charset=utf-8");
    assert!(own.text().await.unwrap().contains("parley_turns_total"));
    pipeline.stop().await;
}

/// The first result of an instant query to the local Prometheus, once it is `value`.
async fn query_until(prometheus: &str, promql: &str, value: &str) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(90);
    let client = reqwest::Client::new();
    loop {
        let answer: serde_json::Value = client
            .get(format!("{prometheus}/api/v1/query"))
            .query(&[("query", promql)])
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(answer["status"], "success", "{answer}");
        if let Some(first) = answer["data"]["result"].as_array().and_then(|r| r.first())
            && first["value"][1] == value
        {
            return first.clone();
        }
        assert!(Instant::now() < deadline, "Prometheus has no {value} for {promql}: {answer}");
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn prometheus_scrapes_parley_and_loads_the_alert_rules() {
    let Some(stack) = stack() else { return };
    let (Ok(prometheus), Ok(targets)) =
        (std::env::var("PARLEY_PROMETHEUS_URL"), std::env::var("PARLEY_PROMETHEUS_TARGETS"))
    else {
        assert_ne!(std::env::var("PARLEY_REQUIRE_STACK").as_deref(), Ok("1"), "PARLEY_PROMETHEUS_URL/_TARGETS unset");
        return;
    };
    // Its operations page charts the fleet from the same Prometheus.
    let pipeline = Pipeline::start(&stack, &["--ops-prometheus-url", &prometheus]).await;
    let instance = pipeline.http.trim_start_matches("http://").to_owned();
    // Listed for file-based discovery: Prometheus scrapes it within seconds.
    let target = std::path::Path::new(&targets).join(format!("test-{}.json", instance.replace([':', '.'], "-")));
    std::fs::write(&target, serde_json::to_vec(&serde_json::json!([{"targets": [instance]}])).unwrap()).unwrap();
    // Scraped once before the turn: its count goes from 0 to 1 in Prometheus's eyes.
    let admitted = format!(r#"parley_turns_total{{instance="{instance}",outcome="admitted"}}"#);
    query_until(&prometheus, &admitted, "0").await;
    let token = pipeline.session().await;
    let mut client = pipeline.connect(&pipeline.http, &token).await;
    client.ask("p-1", None, "Say OK.").await;
    assert_eq!(client.until_outcome().await.last().unwrap()["type"], "answer");

    query_until(&prometheus, &admitted, "1").await;
    let calls = format!(r#"sum(gen_ai_client_operation_duration_seconds_count{{instance="{instance}"}})"#);
    query_until(&prometheus, &calls, "1").await;

    // Every rule loaded and evaluated without an error (health "ok" after its first run).
    let deadline = Instant::now() + Duration::from_secs(60);
    let rules = loop {
        let rules: serde_json::Value =
            reqwest::get(format!("{prometheus}/api/v1/rules")).await.unwrap().json().await.unwrap();
        let rules: Vec<serde_json::Value> = rules["data"]["groups"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default())
            .collect();
        if !rules.is_empty() && rules.iter().all(|r| r["health"] == "ok") {
            break rules;
        }
        assert!(Instant::now() < deadline, "rules not all healthy: {rules:?}");
        tokio::time::sleep(Duration::from_secs(1)).await;
    };
    let alerts: Vec<&str> = rules.iter().filter_map(|r| r["name"].as_str()).collect();

    // The operations page's series, from Prometheus: the turn shows as a rate.
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let series: serde_json::Value =
            reqwest::get(format!("{}/ops/series", pipeline.http)).await.unwrap().json().await.unwrap();
        assert_eq!(series["source"], format!("Prometheus {prometheus}"), "{series}");
        let turns = series["turns_per_second"].as_array().unwrap();
        assert_eq!(turns.len(), series["at"].as_array().unwrap().len());
        if turns.iter().any(|v| v.as_f64().is_some_and(|v| v > 0.0)) {
            break;
        }
        assert!(Instant::now() < deadline, "no turn rate from Prometheus on /ops/series: {series}");
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    for alert in [
        "ParleyConsumerLagging",
        "ParleyLlmErrorRate",
        "ParleyLlmBreakerOpen",
        "ParleyBudgetRefusalsSpike",
        "ParleyDeadLetters",
        "ParleyConversationsHeld",
    ] {
        assert!(alerts.contains(&alert), "{alert} not loaded: {alerts:?}");
    }
    let _ = std::fs::remove_file(target);
    pipeline.stop().await;
}
