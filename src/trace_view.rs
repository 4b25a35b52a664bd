//! `parley trace <trace id>`: one trace from Jaeger's query API as an indented tree of
//! spans with start offsets, durations and fields, for reading a turn in a terminal.

use std::collections::HashMap;
use std::fmt::Write as _;

use anyhow::{Context, Result, bail};
use serde_json::Value;

/// Fetches a trace from Jaeger's query API (`/api/traces/<id>`).
pub(crate) async fn fetch(jaeger_url: &str, trace_id: &str) -> Result<Value> {
    let url = format!("{}/api/traces/{trace_id}", jaeger_url.trim_end_matches('/'));
    let response = reqwest::get(&url).await.with_context(|| format!("asking Jaeger at {url}"))?;
    if response.status() == reqwest::StatusCode::NOT_FOUND {
        bail!("trace {trace_id} is not in Jaeger at {jaeger_url} (spans arrive a few seconds after the fact)");
    }
    let body: Value = response.error_for_status()?.json().await.context("Jaeger's answer is not JSON")?;
    body["data"].as_array().and_then(|data| data.first()).cloned().with_context(|| format!("no trace in {body}"))
}

/// Clap parser for a trace id: 32 hex digits, as `parley audit` prints them.
pub(crate) fn parse_trace_id(value: &str) -> Result<String, String> {
    if value.len() == 32 && value.bytes().all(|b| b.is_ascii_hexdigit()) {
        Ok(value.to_ascii_lowercase())
    } else {
        Err(format!("{value:?} is not a trace id (32 hex digits, as `parley audit` prints them)"))
    }
}

/// Fields that every span has and nobody reads when following a turn (a span's own
/// traceparent is its trace and span id, shown already).
const NOISE: [&str; 7] = ["busy_ns", "idle_ns", "span.kind", "target", "thread.id", "thread.name", "traceparent"];

struct Span<'a> {
    id: &'a str,
    parent: Option<&'a str>,
    operation: &'a str,
    service: &'a str,
    start: i64,
    duration: i64,
    fields: Vec<String>,
    links: usize,
}

/// The trace as text: one line per span, children under their parent in start order.
pub(crate) fn render(trace: &Value) -> String {
    let services: HashMap<&str, &str> = trace["processes"]
        .as_object()
        .map(|processes| {
            processes.iter().map(|(id, p)| (id.as_str(), p["serviceName"].as_str().unwrap_or("?"))).collect()
        })
        .unwrap_or_default();
    let mut spans: Vec<Span<'_>> =
        trace["spans"].as_array().into_iter().flatten().map(|s| span(s, &services)).collect();
    spans.sort_by_key(|s| s.start);
    let ids: Vec<&str> = spans.iter().map(|s| s.id).collect();
    let start = spans.first().map_or(0, |s| s.start);
    let end = spans.iter().map(|s| s.start + s.duration).max().unwrap_or(start);
    let mut out = format!(
        "trace {} ({} spans, {})\n",
        trace["traceID"].as_str().unwrap_or("?"),
        spans.len(),
        millis(end - start)
    );
    let roots = spans.iter().filter(|s| s.parent.is_none_or(|p| !ids.contains(&p)));
    for root in roots {
        write_tree(&mut out, &spans, root, 0, start);
    }
    out
}

fn span<'a>(value: &'a Value, services: &HashMap<&str, &'a str>) -> Span<'a> {
    let references = value["references"].as_array().map(Vec::as_slice).unwrap_or_default();
    let fields = value["tags"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|tag| {
            let key = tag["key"].as_str()?;
            let shown = !NOISE.contains(&key) && !key.starts_with("code.") && !key.starts_with("otel.");
            shown.then(|| match &tag["value"] {
                Value::String(text) => format!("{key}={text}"),
                other => format!("{key}={other}"),
            })
        })
        .collect();
    Span {
        id: value["spanID"].as_str().unwrap_or_default(),
        parent: references.iter().find(|r| r["refType"] == "CHILD_OF").and_then(|r| r["spanID"].as_str()),
        operation: value["operationName"].as_str().unwrap_or("?"),
        service: value["processID"].as_str().and_then(|p| services.get(p)).copied().unwrap_or("?"),
        start: value["startTime"].as_i64().unwrap_or_default(),
        duration: value["duration"].as_i64().unwrap_or_default(),
        fields,
        links: references.iter().filter(|r| r["refType"] == "FOLLOWS_FROM").count(),
    }
}

fn write_tree(out: &mut String, spans: &[Span<'_>], span: &Span<'_>, depth: usize, trace_start: i64) {
    let links = if span.links > 0 { format!(" (links {} other span(s))", span.links) } else { String::new() };
    let _ = writeln!(
        out,
        "{:>11} {:>10}  {}{} [{}] {}{links}",
        format!("+{}", millis(span.start - trace_start)),
        millis(span.duration),
        "  ".repeat(depth),
        span.operation,
        span.service,
        span.fields.join(" "),
    );
    for child in spans.iter().filter(|s| s.parent == Some(span.id)) {
        write_tree(out, spans, child, depth + 1, trace_start);
    }
}

/// Microseconds (Jaeger's unit) as milliseconds with one decimal.
fn millis(micros: i64) -> String {
    #[allow(clippy::cast_precision_loss)] // display only
    let ms = micros as f64 / 1000.0;
    format!("{ms:.1} ms")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn spans_nest_under_their_parents_in_start_order() {
        let trace = json!({
            "traceID": "t1",
            "processes": {"p1": {"serviceName": "parley"}},
            "spans": [
                {"spanID": "b", "operationName": "inference.answer", "processID": "p1", "startTime": 1_005_000,
                 "duration": 2_000_000, "references": [{"refType": "CHILD_OF", "spanID": "a"}],
                 "tags": [{"key": "busy_ns", "value": 5}, {"key": "code.file.path", "value": "x.rs"}]},
                {"spanID": "a", "operationName": "gateway.query", "processID": "p1", "startTime": 1_000_000,
                 "duration": 3_000, "references": [], "tags": [{"key": "sequence", "value": 2}]},
                {"spanID": "c", "operationName": "projection.apply", "processID": "p1", "startTime": 1_001_000,
                 "duration": 500, "references": [{"refType": "CHILD_OF", "spanID": "a"}],
                 "tags": [{"key": "kind", "value": "UserQueryReceived"}]},
                {"spanID": "d", "operationName": "orphan", "processID": "p9", "startTime": 1_002_000,
                 "duration": 1, "references": [{"refType": "CHILD_OF", "spanID": "gone"},
                                                {"refType": "FOLLOWS_FROM", "spanID": "z"}], "tags": []}
            ]
        });
        let text = render(&trace);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], "trace t1 (4 spans, 2005.0 ms)");
        assert!(lines[1].ends_with("gateway.query [parley] sequence=2"), "{text}");
        assert!(lines[1].trim_start().starts_with("+0.0 ms"), "{text}");
        assert!(lines[2].contains("  projection.apply [parley] kind=UserQueryReceived"), "{text}");
        assert!(lines[3].contains("  inference.answer [parley] "), "{text}");
        assert!(!lines[3].contains("busy_ns") && !lines[3].contains("code."), "noise is left out: {text}");
        assert!(lines[4].contains(" orphan [?]  (links 1 other span(s))"), "a lost parent makes a root: {text}");
    }
}
