//! W3C trace context (`traceparent`) carried in event envelopes and Kafka headers, so a
//! turn can be followed across gateway, log and consumers.

use uuid::Uuid;

/// Kafka header that carries the W3C trace context.
pub const TRACEPARENT_HEADER: &str = "traceparent";

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
}
