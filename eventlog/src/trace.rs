//! W3C trace context (`traceparent`) carried in event envelopes and Kafka headers, so a
//! turn can be followed across gateway, log and consumers. With the OpenTelemetry layer
//! installed (`--otlp-endpoint`), the traceparents written are those of the exported spans
//! and each consumer's span continues its event's, so Jaeger shows a turn as one trace.
//! Without it they are still minted, so `parley audit` can group a turn's events by trace id.

use opentelemetry::trace::{SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState};
use rdkafka::Message;
use rdkafka::message::Headers;
use tracing::Span;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use uuid::Uuid;

/// Kafka header that carries the W3C trace context.
pub const TRACEPARENT_HEADER: &str = "traceparent";

/// The traceparent for what `span` writes: the span's own exported context, or (no
/// exporter, or the span filtered out) a new span id in `parent`'s trace.
pub fn traceparent_of(span: &Span, parent: Option<&str>) -> String {
    let context = span.context();
    let exported = context.span().span_context().clone();
    if exported.is_valid() {
        format!("00-{}-{}-{:02x}", exported.trace_id(), exported.span_id(), exported.trace_flags().to_u8())
    } else {
        child_of(parent)
    }
}

/// Makes `span` a child of the remote span named by `traceparent`, before the span starts.
/// A missing or malformed traceparent leaves `span` where it was (a new trace for a root).
pub fn continue_trace(span: &Span, traceparent: Option<&str>) {
    if let Some(remote) = traceparent.and_then(span_context) {
        // Fails only without the layer or for a disabled span: nothing to continue then.
        let _ = span.set_parent(opentelemetry::Context::new().with_remote_span_context(remote));
    }
}

/// Links `span` to the remote span named by `traceparent`: for a batch that serves the
/// events of many traces at once (it can have one parent, but many links).
pub fn link_trace(span: &Span, traceparent: Option<&str>) {
    if let Some(remote) = traceparent.and_then(span_context) {
        span.add_link(remote);
    }
}

/// The traceparent in a Kafka record's headers, if any.
pub fn header_traceparent<M: Message>(message: &M) -> Option<&str> {
    header_text(message, TRACEPARENT_HEADER)
}

/// The value of a record's header `name`, as text.
pub fn header_text<'a, M: Message>(message: &'a M, name: &str) -> Option<&'a str> {
    let headers = message.headers()?;
    let header = headers.iter().find(|h| h.key == name)?;
    std::str::from_utf8(header.value?).ok()
}

fn span_context(traceparent: &str) -> Option<SpanContext> {
    let trace = trace_id(traceparent)?;
    let mut rest = traceparent.split('-').skip(2);
    let (span, flags) = (rest.next()?, rest.next()?);
    Some(SpanContext::new(
        TraceId::from_hex(trace).ok()?,
        SpanId::from_hex(span).ok()?,
        TraceFlags::new(u8::from_str_radix(flags, 16).ok()?),
        true,
        TraceState::default(),
    ))
}

/// A new trace: `00-<32 hex trace id>-<16 hex span id>-01`.
pub fn new_traceparent() -> String {
    let trace = Uuid::new_v4().simple().to_string();
    child_traceparent(&trace)
}

/// A new span in the trace of `parent` (or a new trace if `parent` is not valid).
pub fn child_of(parent: Option<&str>) -> String {
    parent.and_then(trace_id).map_or_else(new_traceparent, child_traceparent)
}

/// The 32-hex-digit trace id of a `traceparent`, if it is well formed.
pub fn trace_id(traceparent: &str) -> Option<&str> {
    let mut parts = traceparent.split('-');
    let (version, trace, span, flags) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    let hex = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_hexdigit());
    (hex(version, 2) && hex(trace, 32) && hex(span, 16) && hex(flags, 2) && parts.next().is_none()).then_some(trace)
}

fn child_traceparent(trace: &str) -> String {
    let span = &Uuid::new_v4().simple().to_string()[..16];
    format!("00-{trace}-{span}-01")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn children_stay_in_their_parents_trace() {
        let parent = new_traceparent();
        let trace = trace_id(&parent).unwrap().to_owned();
        let child = child_of(Some(&parent));
        assert_eq!(trace_id(&child), Some(trace.as_str()));
        assert_ne!(child, parent);
        assert!(trace_id("garbage").is_none());
        assert!(trace_id(&child_of(Some("garbage"))).is_some());
    }

    #[test]
    fn traceparents_parse_into_remote_span_contexts() {
        let context = span_context("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01").unwrap();
        assert_eq!(context.trace_id().to_string(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(context.span_id().to_string(), "00f067aa0ba902b7");
        assert!(context.is_sampled() && context.is_remote());
        assert!(span_context("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7").is_none());
        assert!(span_context("not a traceparent").is_none());
    }

    #[test]
    fn with_an_exporter_a_consumer_span_is_the_child_of_the_producer_span() {
        use opentelemetry::trace::TracerProvider as _;
        use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider};
        use tracing_subscriber::layer::SubscriberExt;

        let exporter = InMemorySpanExporter::default();
        let provider = SdkTracerProvider::builder().with_simple_exporter(exporter.clone()).build();
        let subscriber =
            tracing_subscriber::registry().with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")));
        let (written, batch_link) = tracing::subscriber::with_default(subscriber, || {
            let producer = tracing::info_span!("producer");
            let written = traceparent_of(&producer, None);
            drop(producer);
            let consumer = tracing::info_span!(parent: None, "consumer");
            continue_trace(&consumer, Some(&written));
            let forwarded = traceparent_of(&consumer, Some(&written));
            drop(consumer);
            let batch = tracing::info_span!(parent: None, "batch");
            link_trace(&batch, Some(&forwarded));
            drop(batch);
            (written, forwarded)
        });
        let spans = exporter.get_finished_spans().unwrap();
        let named = |name: &str| spans.iter().find(|s| s.name == name).unwrap();
        let (producer, consumer, batch) = (named("producer"), named("consumer"), named("batch"));
        assert_eq!(written, format!("00-{}-{}-01", producer.span_context.trace_id(), producer.span_context.span_id()));
        assert_eq!(consumer.span_context.trace_id(), producer.span_context.trace_id());
        assert_eq!(consumer.parent_span_id, producer.span_context.span_id());
        assert_ne!(batch.span_context.trace_id(), producer.span_context.trace_id());
        let linked = batch.links.links.first().unwrap();
        assert_eq!(linked.span_context.span_id().to_string(), batch_link.split('-').nth(2).unwrap());
    }

    #[test]
    fn without_an_exporter_a_span_writes_a_child_of_its_parent() {
        let parent = new_traceparent();
        let span = tracing::info_span!("test");
        continue_trace(&span, Some(&parent));
        let written = traceparent_of(&span, Some(&parent));
        assert_eq!(trace_id(&written), trace_id(&parent));
        assert_ne!(written, parent);
    }
}
