//! The live operations page (`/ops`) charts what an operator reads at a glance (turns/s,
//! first-token p50/p99, lag per consumer, errors, dead letters, sockets) with uPlot,
//! vendored from npm. Its series come from one of two sources: the gateway's own process
//! (every few seconds it snapshots its metrics, in `parley all` every service's, and keeps
//! the last half hour), or a Prometheus that scrapes every Parley service (the fleet, over
//! its query API). Snapshots and series are plain values computed here without I/O.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use parley_events::event::now_millis;
use prometheus::proto::MetricFamily;
use serde::Serialize;
use tokio_util::sync::CancellationToken;

/// How often a snapshot is taken.
pub const EVERY: Duration = Duration::from_secs(5);

/// Snapshots kept: half an hour.
const KEPT: usize = 360;

/// Rates and quantiles are over this many snapshots (a minute).
const WINDOW: usize = 12;

/// What the page charts, read from one gather of the registry.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Snapshot {
    /// When it was taken (ms since the epoch).
    pub at_ms: i64,
    /// Turns admitted so far (a counter).
    pub turns_admitted: f64,
    /// Turns refused so far.
    pub turns_refused: f64,
    /// Model calls that failed so far.
    pub llm_failures: f64,
    /// Error frames sent so far.
    pub error_frames: f64,
    /// Dead letters written so far.
    pub dead_letters: f64,
    /// Keys held back behind open dead letters, by the group holding the most.
    pub held_keys: f64,
    /// Open sockets.
    pub sockets: f64,
    /// `parley_first_token_seconds`, every lane: (upper bound, cumulative count).
    pub first_token: Vec<(f64, f64)>,
    /// Per consumer group, how long its oldest waiting record has waited (the worst partition).
    pub lag_seconds: BTreeMap<String, f64>,
}

impl Snapshot {
    /// The snapshot of `families` (the registry's gather) at `at_ms`.
    pub fn of(families: &[MetricFamily], at_ms: i64) -> Self {
        let mut snapshot = Snapshot { at_ms, ..Snapshot::default() };
        let mut first_token: BTreeMap<u64, f64> = BTreeMap::new();
        for family in families {
            for metric in family.get_metric() {
                let label =
                    |name: &str| metric.get_label().iter().find(|l| l.name() == name).map(|l| l.value().to_owned());
                match family.name() {
                    "parley_turns_total" => match label("outcome").as_deref() {
                        Some("admitted") => snapshot.turns_admitted += metric.get_counter().get_value(),
                        Some("refused") => snapshot.turns_refused += metric.get_counter().get_value(),
                        _ => {}
                    },
                    "parley_llm_failures_total" => snapshot.llm_failures += metric.get_counter().get_value(),
                    "parley_error_frames_total" => snapshot.error_frames += metric.get_counter().get_value(),
                    "parley_dead_letters_total" => snapshot.dead_letters += metric.get_counter().get_value(),
                    "parley_open_sockets" => snapshot.sockets += metric.get_gauge().get_value(),
                    "parley_dead_letter_held_keys" => {
                        snapshot.held_keys = snapshot.held_keys.max(metric.get_gauge().get_value());
                    }
                    "parley_consumer_lag_seconds" => {
                        let group = label("group").unwrap_or_default();
                        let worst = snapshot.lag_seconds.entry(group).or_insert(0.0);
                        *worst = worst.max(metric.get_gauge().get_value());
                    }
                    "parley_first_token_seconds" => {
                        // Positive floats order as their bits do; +Inf (every observation)
                        // is not among the buckets the registry gives.
                        let histogram = metric.get_histogram();
                        let bounds = histogram.get_bucket().iter().map(|b| (b.upper_bound(), b.cumulative_count()));
                        for (bound, count) in bounds.chain([(f64::INFINITY, histogram.get_sample_count())]) {
                            *first_token.entry(bound.to_bits()).or_insert(0.0) += count as f64;
                        }
                    }
                    _ => {}
                }
            }
        }
        snapshot.first_token = first_token.into_iter().map(|(bound, count)| (f64::from_bits(bound), count)).collect();
        snapshot
    }
}

/// The snapshots of the last half hour.
#[derive(Debug, Default)]
pub struct History {
    snapshots: VecDeque<Snapshot>,
}

/// The page's data: one point per snapshot; None where a value is not defined (no turn in
/// the window has a quantile; the first snapshots have no rate).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Series {
    /// Where the values come from (this process, or a Prometheus).
    pub source: String,
    /// Seconds since the epoch.
    pub at: Vec<f64>,
    /// Turns admitted per second.
    pub turns_per_second: Vec<Option<f64>>,
    /// Turns refused per second.
    pub refused_per_second: Vec<Option<f64>>,
    /// Median first-token latency (s).
    pub first_token_p50: Vec<Option<f64>>,
    /// 99th percentile first-token latency (s).
    pub first_token_p99: Vec<Option<f64>>,
    /// Failed model calls per second.
    pub llm_failures_per_second: Vec<Option<f64>>,
    /// Error frames per second.
    pub error_frames_per_second: Vec<Option<f64>>,
    /// Dead letters per minute.
    pub dead_letters_per_minute: Vec<Option<f64>>,
    /// Conversations held behind open dead letters.
    pub held_conversations: Vec<Option<f64>>,
    /// Open sockets.
    pub sockets: Vec<Option<f64>>,
    /// Per consumer group.
    pub lag_seconds: BTreeMap<String, Vec<Option<f64>>>,
}

impl History {
    /// Adds a snapshot (the oldest goes once the history is full).
    pub fn push(&mut self, snapshot: Snapshot) {
        if self.snapshots.len() == KEPT {
            self.snapshots.pop_front();
        }
        self.snapshots.push_back(snapshot);
    }

    /// Each snapshot's rates and quantiles over the minute before it.
    pub fn series(&self) -> Series {
        let mut series = Series { source: "this process".into(), ..Series::default() };
        let groups: Vec<&String> = {
            let mut groups: Vec<&String> = self.snapshots.iter().flat_map(|s| s.lag_seconds.keys()).collect();
            groups.sort_unstable();
            groups.dedup();
            groups
        };
        for (i, now) in self.snapshots.iter().enumerate() {
            let before = i.checked_sub(WINDOW.min(i)).filter(|b| *b < i).map(|b| &self.snapshots[b]);
            let rate = |value: fn(&Snapshot) -> f64, per: f64| {
                before.and_then(|b| {
                    let seconds = (now.at_ms - b.at_ms) as f64 / 1000.0;
                    (seconds > 0.0).then(|| (value(now) - value(b)).max(0.0) / seconds * per)
                })
            };
            series.at.push(now.at_ms as f64 / 1000.0);
            series.turns_per_second.push(rate(|s| s.turns_admitted, 1.0));
            series.refused_per_second.push(rate(|s| s.turns_refused, 1.0));
            series.llm_failures_per_second.push(rate(|s| s.llm_failures, 1.0));
            series.error_frames_per_second.push(rate(|s| s.error_frames, 1.0));
            series.dead_letters_per_minute.push(rate(|s| s.dead_letters, 60.0));
            series.held_conversations.push(Some(now.held_keys));
            series.sockets.push(Some(now.sockets));
            let window = before.map(|b| bucket_increase(&b.first_token, &now.first_token));
            series.first_token_p50.push(window.as_deref().and_then(|w| quantile(0.5, w)));
            series.first_token_p99.push(window.as_deref().and_then(|w| quantile(0.99, w)));
            for group in &groups {
                let lag = now.lag_seconds.get(*group).copied();
                series.lag_seconds.entry((*group).clone()).or_default().push(lag);
            }
        }
        series
    }
}

/// The PromQL of each series the page charts, over the fleet (every scraped process).
pub const FLEET_QUERIES: [(&str, &str); 10] = [
    ("turns_per_second", r#"sum(rate(parley_turns_total{outcome="admitted"}[1m]))"#),
    ("refused_per_second", r#"sum(rate(parley_turns_total{outcome="refused"}[1m]))"#),
    ("first_token_p50", "histogram_quantile(0.5, sum by (le) (rate(parley_first_token_seconds_bucket[1m])))"),
    ("first_token_p99", "histogram_quantile(0.99, sum by (le) (rate(parley_first_token_seconds_bucket[1m])))"),
    ("llm_failures_per_second", "sum(rate(parley_llm_failures_total[1m]))"),
    ("error_frames_per_second", "sum(rate(parley_error_frames_total[1m]))"),
    ("dead_letters_per_minute", "sum(rate(parley_dead_letters_total[1m])) * 60"),
    ("held_conversations", "max(sum by (group) (parley_dead_letter_held_keys))"),
    ("sockets", "sum(parley_open_sockets)"),
    ("lag_seconds", "max by (group) (parley_consumer_lag_seconds)"),
];

/// The page's series from Prometheus range queries (`/api/v1/query_range` answers, named as
/// in [`FLEET_QUERIES`]) on the time axis `at` (seconds): a point Prometheus has not, or
/// that is not a number (a quantile without observations), is None.
pub fn series_from_ranges(source: String, at: Vec<f64>, answers: &[(&str, serde_json::Value)]) -> Series {
    let on_axis = |result: &serde_json::Value| -> Vec<Option<f64>> {
        let points: BTreeMap<i64, f64> = result["values"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|point| {
                let at = point[0].as_f64()?;
                let value = point[1].as_str()?.parse::<f64>().ok().filter(|v| v.is_finite())?;
                Some(((at * 1000.0).round() as i64, value))
            })
            .collect();
        at.iter().map(|t| points.get(&((t * 1000.0).round() as i64)).copied()).collect()
    };
    let mut series = Series { source, ..Series::default() };
    for (name, answer) in answers {
        let results = answer["data"]["result"].as_array().cloned().unwrap_or_default();
        if *name == "lag_seconds" {
            for result in &results {
                let group = result["metric"]["group"].as_str().unwrap_or_default().to_owned();
                series.lag_seconds.insert(group, on_axis(result));
            }
            continue;
        }
        let values = results.first().map_or_else(|| vec![None; at.len()], on_axis);
        match *name {
            "turns_per_second" => series.turns_per_second = values,
            "refused_per_second" => series.refused_per_second = values,
            "first_token_p50" => series.first_token_p50 = values,
            "first_token_p99" => series.first_token_p99 = values,
            "llm_failures_per_second" => series.llm_failures_per_second = values,
            "error_frames_per_second" => series.error_frames_per_second = values,
            "dead_letters_per_minute" => series.dead_letters_per_minute = values,
            "held_conversations" => series.held_conversations = values,
            "sockets" => series.sockets = values,
            _ => {}
        }
    }
    series.at = at;
    series
}

/// The page's series over the last half hour from the Prometheus at `url`.
pub async fn fleet_series(client: &reqwest::Client, url: &str) -> Result<Series, reqwest::Error> {
    let end = (now_millis() / 1000 / 5) * 5; // on the step, so repeated reads line up
    let step = EVERY.as_secs() as i64;
    let start = end - (KEPT as i64 - 1) * step;
    let at: Vec<f64> = (0..KEPT as i64).map(|i| (start + i * step) as f64).collect();
    let range = [("start", start.to_string()), ("end", end.to_string()), ("step", step.to_string())];
    let mut answers = Vec::new();
    for (name, query) in FLEET_QUERIES {
        let answer = client
            .get(format!("{url}/api/v1/query_range"))
            .query(&range)
            .query(&[("query", query)])
            .send()
            .await?
            .error_for_status()?
            .json::<serde_json::Value>()
            .await?;
        answers.push((name, answer));
    }
    Ok(series_from_ranges(format!("Prometheus {url}"), at, &answers))
}

/// The cumulative buckets of `now` minus those of `before` (a counter reset counts from 0).
fn bucket_increase(before: &[(f64, f64)], now: &[(f64, f64)]) -> Vec<(f64, f64)> {
    now.iter()
        .map(|(bound, count)| {
            let earlier = before.iter().find(|(b, _)| b == bound).map_or(0.0, |(_, c)| *c);
            (*bound, if *count >= earlier { count - earlier } else { *count })
        })
        .collect()
}

/// The `q` quantile of cumulative buckets, interpolated linearly inside the bucket it
/// falls in (as Prometheus's `histogram_quantile`); None without observations. Past the
/// last finite bound, the last finite bound.
pub fn quantile(q: f64, buckets: &[(f64, f64)]) -> Option<f64> {
    let total = buckets.iter().map(|(_, count)| *count).fold(0.0, f64::max);
    if total <= 0.0 {
        return None;
    }
    let rank = q * total;
    let mut lower = (0.0, 0.0);
    for (bound, count) in buckets {
        if *count >= rank {
            if bound.is_infinite() {
                return Some(lower.0);
            }
            let in_bucket = count - lower.1;
            let share = if in_bucket > 0.0 { (rank - lower.1) / in_bucket } else { 1.0 };
            return Some(lower.0 + (bound - lower.0) * share);
        }
        lower = (*bound, *count);
    }
    Some(lower.0)
}

/// Takes a snapshot of the process's metrics every [`EVERY`] until `shutdown`.
pub async fn record(history: Arc<Mutex<History>>, shutdown: CancellationToken) {
    loop {
        let snapshot = Snapshot::of(&prometheus::gather(), now_millis());
        history.lock().unwrap_or_else(PoisonError::into_inner).push(snapshot);
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(EVERY) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_quantile_interpolates_inside_its_bucket() {
        let buckets = [(0.5, 0.0), (1.0, 50.0), (2.0, 100.0), (f64::INFINITY, 100.0)];
        assert_eq!(quantile(0.5, &buckets), Some(1.0));
        assert_eq!(quantile(0.75, &buckets), Some(1.5));
        assert_eq!(quantile(0.25, &buckets), Some(0.75));
        assert_eq!(quantile(0.99, &[(1.0, 0.0), (f64::INFINITY, 10.0)]), Some(1.0), "past the last bound");
        assert_eq!(quantile(0.5, &[(1.0, 0.0), (f64::INFINITY, 0.0)]), None);
    }

    fn at(seconds: i64, admitted: f64, first_token: &[(f64, f64)]) -> Snapshot {
        Snapshot {
            at_ms: seconds * 1000,
            turns_admitted: admitted,
            first_token: first_token.to_vec(),
            sockets: 2.0,
            lag_seconds: BTreeMap::from([("inference".to_owned(), 0.5)]),
            ..Snapshot::default()
        }
    }

    #[test]
    fn rates_and_quantiles_are_over_the_minute_before_each_point() {
        let mut history = History::default();
        history.push(at(0, 0.0, &[(1.0, 0.0), (2.0, 0.0), (f64::INFINITY, 0.0)]));
        history.push(at(5, 10.0, &[(1.0, 5.0), (2.0, 10.0), (f64::INFINITY, 10.0)]));
        history.push(at(10, 10.0, &[(1.0, 5.0), (2.0, 10.0), (f64::INFINITY, 10.0)]));
        let series = history.series();
        assert_eq!(series.at, [0.0, 5.0, 10.0]);
        assert_eq!(series.turns_per_second, [None, Some(2.0), Some(1.0)], "10 turns over 5 s, then over 10 s");
        assert_eq!(series.first_token_p50[0], None);
        assert_eq!(series.first_token_p50[1], Some(1.0));
        assert!(series.first_token_p99[2].is_some_and(|p99| (p99 - 1.98).abs() < 1e-9), "{:?}", series.first_token_p99);
        assert_eq!(series.sockets, [Some(2.0); 3]);
        assert_eq!(series.lag_seconds["inference"], [Some(0.5); 3]);
    }

    #[test]
    fn prometheus_range_answers_become_series_on_one_time_axis() {
        let matrix = |results: serde_json::Value| serde_json::json!({"status": "success", "data": {"resultType": "matrix", "result": results}});
        let answers = [
            ("turns_per_second", matrix(serde_json::json!([{"metric": {}, "values": [[100, "0.5"], [110, "1"]]}]))),
            ("first_token_p50", matrix(serde_json::json!([{"metric": {}, "values": [[105, "NaN"], [110, "0.75"]]}]))),
            ("sockets", matrix(serde_json::json!([]))),
            (
                "lag_seconds",
                matrix(serde_json::json!([
                {"metric": {"group": "parley-inference"}, "values": [[100, "0"], [105, "2.5"]]},
                {"metric": {"group": "parley-embedder"}, "values": [[110, "1"]]}])),
            ),
        ];
        let series = series_from_ranges("Prometheus p".into(), vec![100.0, 105.0, 110.0], &answers);
        assert_eq!(series.turns_per_second, [Some(0.5), None, Some(1.0)]);
        assert_eq!(series.first_token_p50, [None, None, Some(0.75)], "NaN (no observations) is no value");
        assert_eq!(series.sockets, [None, None, None]);
        assert_eq!(series.lag_seconds["parley-inference"], [Some(0.0), Some(2.5), None]);
        assert_eq!(series.lag_seconds["parley-embedder"], [None, None, Some(1.0)]);
        assert_eq!(series.source, "Prometheus p");
    }

    #[test]
    fn a_snapshot_reads_the_parley_families_of_a_registry() {
        use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, Opts, Registry};
        let registry = Registry::new();
        let turns = IntCounterVec::new(Opts::new("parley_turns_total", "t"), &["outcome", "reason"]).unwrap();
        let first =
            HistogramVec::new(HistogramOpts::new("parley_first_token_seconds", "f").buckets(vec![0.5, 1.0]), &["lane"])
                .unwrap();
        let held = prometheus::IntGaugeVec::new(Opts::new("parley_dead_letter_held_keys", "h"), &["group"]).unwrap();
        registry.register(Box::new(turns.clone())).unwrap();
        registry.register(Box::new(first.clone())).unwrap();
        registry.register(Box::new(held.clone())).unwrap();
        held.with_label_values(&["inference"]).set(2);
        held.with_label_values(&["embedder"]).set(1);
        turns.with_label_values(&["admitted", ""]).inc_by(3);
        turns.with_label_values(&["refused", "overloaded"]).inc();
        first.with_label_values(&["standard"]).observe(0.7);
        first.with_label_values(&["premium"]).observe(0.2);
        let snapshot = Snapshot::of(&registry.gather(), 1000);
        assert_eq!((snapshot.turns_admitted, snapshot.turns_refused), (3.0, 1.0));
        assert_eq!(snapshot.first_token, [(0.5, 1.0), (1.0, 2.0), (f64::INFINITY, 2.0)], "lanes summed per bound");
        assert_eq!(snapshot.held_keys, 2.0, "the group holding the most");
    }
}
