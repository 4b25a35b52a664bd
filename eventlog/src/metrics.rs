//! Prometheus metrics every service shares: the process registry and its text exposition
//! for a scrape, and the families every consumer reports (lag, dead letters, the latency of
//! calls to the stores). A service's own metrics are defined next to what they count.

use std::collections::HashMap;
use std::future::Future;
use std::sync::LazyLock;
use std::time::Instant;

use prometheus::{
    Encoder, GaugeVec, HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, TextEncoder, default_registry,
};
use serde::Deserialize;

/// Buckets (seconds) for what a person waits for: a first token, an answer, a model call.
pub const HUMAN_SECONDS: &[f64] = &[0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 15.0, 30.0, 60.0, 120.0];

/// Buckets (seconds) for calls to a store or the log.
pub const CALL_SECONDS: &[f64] = &[0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5];

/// The label values of a family without labels.
pub const NO_LABELS: &[&str] = &[];

/// How often librdkafka reports the statistics lag comes from (ms).
pub const STATISTICS_INTERVAL_MS: &str = "5000";

/// The text exposition of every metric of this process (what `/metrics` serves).
pub fn render() -> String {
    let mut text = Vec::new();
    // Encoding into memory fails only on a metric with an invalid name: none is.
    let _ = TextEncoder::new().encode(&default_registry().gather(), &mut text);
    String::from_utf8(text).unwrap_or_default()
}

/// The content type of [`render`]'s text.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Registers a metric with the process registry. Metric definitions are constants: a
/// failure is a programming error (a name used twice), found by the first test.
#[allow(clippy::expect_used)]
pub fn register<M: prometheus::core::Collector + Clone + 'static>(metric: M) -> M {
    default_registry().register(Box::new(metric.clone())).expect("metric names are unique");
    metric
}

/// A counter family.
#[allow(clippy::expect_used)]
pub fn counter(name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    register(IntCounterVec::new(Opts::new(name, help), labels).expect("a valid metric definition"))
}

/// A histogram family with `buckets`.
#[allow(clippy::expect_used)]
pub fn histogram(name: &str, help: &str, labels: &[&str], buckets: &[f64]) -> HistogramVec {
    let opts = HistogramOpts::new(name, help).buckets(buckets.to_vec());
    register(HistogramVec::new(opts, labels).expect("a valid metric definition"))
}

/// An integer gauge family.
#[allow(clippy::expect_used)]
pub fn int_gauge(name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    register(IntGaugeVec::new(Opts::new(name, help), labels).expect("a valid metric definition"))
}

/// A gauge family.
#[allow(clippy::expect_used)]
pub fn gauge(name: &str, help: &str, labels: &[&str]) -> GaugeVec {
    register(GaugeVec::new(Opts::new(name, help), labels).expect("a valid metric definition"))
}

/// Records of a partition its consumer group has not done yet: the partition's end (its
/// last stable offset, from librdkafka's statistics) minus the first record not finished.
pub static CONSUMER_LAG_RECORDS: LazyLock<IntGaugeVec> = LazyLock::new(|| {
    int_gauge(
        "parley_consumer_lag_records",
        "Records of the partition the consumer group has not finished yet",
        &["group", "topic", "partition"],
    )
});

/// How long the oldest record a consumer has read and not started has waited, per partition.
pub static CONSUMER_LAG_SECONDS: LazyLock<GaugeVec> = LazyLock::new(|| {
    gauge(
        "parley_consumer_lag_seconds",
        "Age of the oldest record of the partition read and waiting to start (0: none waits)",
        &["group", "topic", "partition"],
    )
});

/// Records sent to the dead-letter topic, by the consumer group that gave up on them.
pub static DEAD_LETTERS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counter("parley_dead_letters_total", "Records a consumer sent to the dead-letter topic", &["group", "topic"])
});

/// Records a consumer holds back behind an open dead letter of their key, and the keys held.
pub static HELD_RECORDS: LazyLock<IntGaugeVec> = LazyLock::new(|| {
    int_gauge(
        "parley_dead_letter_held_records",
        "Records held back until a dead letter of their key is redriven or discarded",
        &["group"],
    )
});
/// Keys a consumer group holds back behind an open dead letter.
pub static HELD_KEYS: LazyLock<IntGaugeVec> = LazyLock::new(|| {
    int_gauge("parley_dead_letter_held_keys", "Keys (conversations) held back by an open dead letter", &["group"])
});

/// Latency of calls to the stores (CQL, Milvus), by operation.
pub static STORE_CALL_SECONDS: LazyLock<HistogramVec> = LazyLock::new(|| {
    histogram(
        "parley_store_call_duration_seconds",
        "Duration of a call to a store",
        &["store", "operation", "outcome"],
        CALL_SECONDS,
    )
});

/// Runs a store call and records how long it took and whether it succeeded.
pub async fn timed<T, E>(store: &str, operation: &str, call: impl Future<Output = Result<T, E>>) -> Result<T, E> {
    let started = Instant::now();
    let result = call.await;
    let outcome = if result.is_ok() { "ok" } else { "error" };
    STORE_CALL_SECONDS.with_label_values(&[store, operation, outcome]).observe(started.elapsed().as_secs_f64());
    result
}

/// The part of librdkafka's statistics JSON the log's ends come from (decoded by hand: the
/// client library's full model of it fails on fields newer librdkafka versions add).
#[derive(Debug, Deserialize)]
struct Statistics {
    #[serde(default)]
    topics: HashMap<String, TopicStatistics>,
}

#[derive(Debug, Deserialize)]
struct TopicStatistics {
    #[serde(default)]
    partitions: HashMap<String, PartitionStatistics>,
}

#[derive(Debug, Deserialize)]
struct PartitionStatistics {
    partition: i32,
    /// The last stable offset (the end a read_committed consumer reads to); -1 unknown.
    ls_offset: i64,
}

/// Per (topic, partition) a consumer fetches, its end (last stable offset) in librdkafka's
/// statistics JSON. Consumer lag is that minus where the group is: librdkafka's own
/// `consumer_lag` knows no offsets committed through a producer's transaction.
pub fn partition_ends(statistics_json: &[u8]) -> Vec<((String, i32), i64)> {
    let Ok(statistics) = serde_json::from_slice::<Statistics>(statistics_json) else { return Vec::new() };
    statistics
        .topics
        .into_iter()
        .flat_map(|(topic, stats)| {
            stats
                .partitions
                .into_values()
                .filter(|p| p.partition >= 0 && p.ls_offset >= 0) // -1: librdkafka's unassigned partition
                .map(move |p| ((topic.clone(), p.partition), p.ls_offset))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_timed_call_and_the_lag_show_up_in_the_exposition() {
        let failed: Result<(), &str> = timed("cql", "test_write", async { Err("down") }).await;
        assert!(failed.is_err());
        CONSUMER_LAG_SECONDS.with_label_values(&["g", "t", "0"]).set(1.5);
        let text = render();
        assert!(
            text.contains(
                r#"parley_store_call_duration_seconds_count{operation="test_write",outcome="error",store="cql"} 1"#
            ),
            "{text}"
        );
        assert!(text.contains(r#"parley_consumer_lag_seconds{group="g",partition="0",topic="t"} 1.5"#), "{text}");
    }

    #[test]
    fn partition_ends_come_from_librdkafka_statistics() {
        let json = br#"{"name": "c", "topics": {"events": {"topic": "events", "partitions": {
            "0": {"partition": 0, "ls_offset": 7, "unknown_new_field": 1},
            "1": {"partition": 1, "ls_offset": -1},
            "-1": {"partition": -1, "ls_offset": -1}}}}}"#;
        assert_eq!(partition_ends(json), [(("events".to_owned(), 0), 7)]);
        assert!(partition_ends(b"not json").is_empty());
    }
}
