//! Traces in the real Jaeger: one turn (gateway → Kafka → inference → LLM → Kafka →
//! projection) is one trace, its spans parented across the log through the events'
//! traceparents; the embedder's batch links to it.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use serde_json::Value;
use support::{Pipeline, stack};

/// A span as Jaeger's query API returns it: operation, span id, parent span id, service,
/// and its tags (as text).
#[derive(Debug, Clone)]
struct SpanRow {
    operation: String,
    span_id: String,
    parent: Option<String>,
    service: String,
    tags: HashMap<String, String>,
}

/// The model call's span, named as the OpenTelemetry GenAI conventions have it.
const LLM_SPAN: &str = "chat SmolLM2-135M-Instruct";

fn spans_of(trace: &Value) -> Vec<SpanRow> {
    let services: HashMap<&str, &str> = trace["processes"]
        .as_object()
        .map(|p| p.iter().map(|(id, process)| (id.as_str(), process["serviceName"].as_str().unwrap())).collect())
        .unwrap_or_default();
    trace["spans"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|span| SpanRow {
            operation: span["operationName"].as_str().unwrap().to_owned(),
            span_id: span["spanID"].as_str().unwrap().to_owned(),
            parent: span["references"]
                .as_array()
                .and_then(|r| r.iter().find(|r| r["refType"] == "CHILD_OF"))
                .map(|r| r["spanID"].as_str().unwrap().to_owned()),
            service: services.get(span["processID"].as_str().unwrap()).copied().unwrap_or("?").to_owned(),
            tags: span["tags"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|tag| {
                    let value = tag["value"].as_str().map_or_else(|| tag["value"].to_string(), str::to_owned);
                    (tag["key"].as_str().unwrap().to_owned(), value)
                })
                .collect(),
        })
        .collect()
}

/// Polls Jaeger until `done` holds for the trace's spans (spans arrive in export batches).
async fn trace_until(jaeger: &str, trace_id: &str, done: impl Fn(&[SpanRow]) -> bool) -> Vec<SpanRow> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let body: Value = match reqwest::get(format!("{jaeger}/api/traces/{trace_id}")).await {
            Ok(response) => response.json().await.unwrap_or(Value::Null),
            Err(_) => Value::Null,
        };
        let spans = body["data"].as_array().and_then(|d| d.first()).map(spans_of).unwrap_or_default();
        if done(&spans) {
            return spans;
        }
        assert!(Instant::now() < deadline, "trace {trace_id} incomplete in Jaeger: {spans:#?}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_turn_is_one_trace_in_jaeger_across_every_hop() {
    let Some(stack) = stack() else { return };
    let pipeline = Pipeline::start(&stack, &[]).await;
    let token = pipeline.session().await;
    let mut client = pipeline.connect(&pipeline.http, &token).await;
    client.ask("t-1", None, "Name a planet.").await;
    let frames = client.until_outcome().await;
    assert_eq!(frames.last().unwrap()["type"], "answer", "{frames:?}");
    let conversation = frames[0]["conversation_id"].as_str().unwrap().to_owned();
    pipeline.conversation_when(&token, &conversation, 2).await;

    // The trace id `parley audit` shows is the one to look up in Jaeger.
    let audit = pipeline.cli(&["audit", &conversation, "--format", "json"]);
    assert!(audit.status.success(), "{}", String::from_utf8_lossy(&audit.stderr));
    let records: Vec<Value> =
        String::from_utf8_lossy(&audit.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let trace_id = records[0]["trace_id"].as_str().unwrap().to_owned();
    assert!(records.iter().all(|r| r["trace_id"] == trace_id.as_str()), "one turn, one trace: {records:#?}");

    let wanted = [
        "gateway.query",
        "inference.answer",
        "inference.context",
        "inference.retrieve",
        "inference.retrieve_wait",
        LLM_SPAN,
        "inference.llm_attempt",
        "eventlog.transaction",
    ];
    let spans = trace_until(&stack.jaeger, &trace_id, |spans| {
        wanted.iter().all(|w| spans.iter().any(|s| s.operation == *w))
            && spans.iter().filter(|s| s.operation == "projection.apply").count() >= records.len()
    })
    .await;
    let one = |operation: &str| spans.iter().find(|s| s.operation == operation).unwrap();
    let (gateway, answer, llm) = (one("gateway.query"), one("inference.answer"), one(LLM_SPAN));
    assert_eq!(gateway.parent, None, "each turn is a root trace");
    assert_eq!(answer.parent.as_ref(), Some(&gateway.span_id), "inference continues the query's span");
    assert_eq!(llm.parent.as_ref(), Some(&answer.span_id));
    // Retrieval ran ahead of the answer, as soon as inference read the query.
    let retrieve = one("inference.retrieve");
    assert_eq!(retrieve.parent.as_ref(), Some(&gateway.span_id), "looked up beside the answer, not in it");
    assert_eq!(retrieve.tags.get("ahead").map(String::as_str), Some("true"), "{:?}", retrieve.tags);
    assert_eq!(one("inference.retrieve_wait").parent.as_ref(), Some(&answer.span_id));
    let tag = |key: &str| llm.tags.get(key).map(String::as_str);
    assert_eq!(tag("gen_ai.operation.name"), Some("chat"), "{:?}", llm.tags);
    assert_eq!(tag("gen_ai.provider.name"), Some("llama.cpp"));
    assert_eq!(tag("gen_ai.request.model"), Some("SmolLM2-135M-Instruct"));
    assert_eq!(tag("gen_ai.conversation.id"), Some(conversation.as_str()));
    assert!(tag("gen_ai.usage.output_tokens").is_some_and(|n| n.parse::<u32>().is_ok_and(|n| n > 0)), "{:?}", llm.tags);
    assert!(tag("gen_ai.usage.input_tokens").is_some() && tag("gen_ai.response.finish_reasons").is_some());
    assert_eq!(one("inference.llm_attempt").parent.as_ref(), Some(&llm.span_id));
    assert_eq!(one("eventlog.transaction").parent.as_ref(), Some(&answer.span_id), "the answer's commit");
    let projected: Vec<_> = spans.iter().filter(|s| s.operation == "projection.apply").collect();
    assert!(projected.iter().any(|s| s.parent.as_ref() == Some(&gateway.span_id)), "the query, projected");
    assert!(projected.iter().any(|s| s.parent.as_ref() == Some(&answer.span_id)), "the answer, projected");
    assert!(spans.iter().all(|s| s.service == "parley"), "{spans:#?}");

    // `parley trace` prints the same trace as a tree.
    let shown = pipeline.cli(&["trace", &trace_id, "--jaeger-url", &stack.jaeger]);
    let tree = String::from_utf8_lossy(&shown.stdout);
    assert!(shown.status.success(), "{}", String::from_utf8_lossy(&shown.stderr));
    let lines: Vec<&str> = tree.lines().collect();
    assert!(lines[0].starts_with(&format!("trace {trace_id} (")), "{tree}");
    // Children are indented two columns per level under their parent.
    let column = |operation: &str| {
        let line = lines.iter().find(|l| l.contains(&format!(" {operation} [parley]"))).unwrap();
        line.find(operation).unwrap()
    };
    assert_eq!(column("inference.answer"), column("gateway.query") + 2, "{tree}");
    assert_eq!(column("inference.llm_attempt"), column("gateway.query") + 6, "{tree}");
    let unknown = pipeline.cli(&["trace", "0123456789abcdef0123456789abcdef", "--jaeger-url", &stack.jaeger]);
    assert!(!unknown.status.success());
    assert!(String::from_utf8_lossy(&unknown.stderr).contains("is not in Jaeger"), "{unknown:?}");

    // The embedder's batch has its own trace, linked to this one (FOLLOWS_FROM in Jaeger).
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let search: Value = reqwest::get(format!(
            "{}/api/traces?service=parley&operation=embedder.batch&limit=200&lookback=1h",
            stack.jaeger
        ))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
        let linked =
            search["data"].as_array().into_iter().flatten().flat_map(|t| t["spans"].as_array().unwrap()).any(|span| {
                span["references"].as_array().is_some_and(|r| {
                    r.iter().any(|r| r["refType"] == "FOLLOWS_FROM" && r["traceID"] == trace_id.as_str())
                })
            });
        if linked {
            break;
        }
        assert!(Instant::now() < deadline, "no embedder.batch span links to trace {trace_id}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    pipeline.stop().await;
}
