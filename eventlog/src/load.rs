//! Load shedding's signal: each inference instance publishes how long its oldest waiting
//! query has waited (its driver's [`QueueAge`](crate::driver::QueueAge)), overall and per lane, to the load topic
//! twice a second; every gateway reads all reports and refuses a lane's new turns while
//! the worst fresh age of that lane is past its threshold. Reports are small JSON records: an operational signal, not a conversation
//! event, so they stay out of the Avro contract.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use rdkafka::Message;
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::consumer::{LogConsumer, next_record, tail};
use crate::driver::QueueAge;
use crate::error::EventLogError;
use crate::settings::KafkaSettings;

/// How often an instance reports.
pub const REPORT_EVERY: Duration = Duration::from_millis(500);

/// One instance's queue at one moment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoadReport {
    /// The reporting inference instance.
    pub instance: String,
    /// The oldest waiting query of any lane.
    pub queue_age_ms: u64,
    /// When it was measured (ms since the epoch).
    pub at_ms: i64,
    /// The oldest waiting query of each lane, by lane name.
    #[serde(default)]
    pub lanes: BTreeMap<String, u64>,
}

/// The latest report of each instance, as a gateway knows them.
#[derive(Debug, Default)]
pub struct LoadBoard {
    latest: HashMap<String, LoadReport>,
}

/// Reports older than this are of an instance that stopped (or cannot reach Kafka): they
/// no longer count.
const FRESH_MS: i64 = 3_000;

impl LoadBoard {
    /// Takes an instance's latest report in.
    pub fn record(&mut self, report: LoadReport) {
        self.latest.insert(report.instance.clone(), report);
    }

    /// The longest queue age of `lane` (of any lane: `None`) among the instances that
    /// reported lately, as of `now_ms` (a report's age grows by the time since it was
    /// made). A report without the lane counts with its overall age.
    pub fn queue_age_ms(&self, lane: Option<&str>, now_ms: i64) -> u64 {
        self.latest
            .values()
            .filter(|r| now_ms - r.at_ms <= FRESH_MS)
            .map(|r| {
                let age = lane.and_then(|lane| r.lanes.get(lane)).copied().unwrap_or(r.queue_age_ms);
                if age == 0 { 0 } else { age + u64::try_from(now_ms - r.at_ms).unwrap_or(0) }
            })
            .max()
            .unwrap_or(0)
    }

    /// While `lane`'s queue (any lane's: `None`) is older than `threshold` (zero: never):
    /// how long to wait before trying again, in ms (one threshold, at least a second: what
    /// the queue needs to drain that far).
    pub fn overloaded(&self, lane: Option<&str>, threshold: Duration, now_ms: i64) -> Option<u64> {
        let threshold = u64::try_from(threshold.as_millis()).unwrap_or(u64::MAX);
        (threshold > 0 && self.queue_age_ms(lane, now_ms) > threshold).then_some(threshold.max(1_000))
    }
}

/// Publishes `queue`'s age (its lanes named by `lanes`) as `instance` until `shutdown`. A
/// report that cannot be sent is dropped (the next one follows in half a second).
pub async fn publish(
    kafka: KafkaSettings,
    instance: String,
    queue: QueueAge,
    lanes: Vec<&'static str>,
    shutdown: CancellationToken,
) {
    let producer: FutureProducer = match kafka.client_config().set("linger.ms", "0").create() {
        Ok(producer) => producer,
        Err(error) => {
            warn!(%error, "no load reports: cannot create a producer");
            return;
        }
    };
    let topic = kafka.topics().load;
    let mut every = tokio::time::interval(REPORT_EVERY);
    while tokio::select! { () = shutdown.cancelled() => false, _ = every.tick() => true } {
        let now = parley_events::event::now_millis();
        let by_lane = lanes.iter().enumerate().map(|(index, name)| ((*name).to_owned(), queue.lane_age_ms(index, now)));
        let report = LoadReport {
            instance: instance.clone(),
            queue_age_ms: queue.age_ms(now),
            at_ms: now,
            lanes: by_lane.collect(),
        };
        let payload = serde_json::to_vec(&report).unwrap_or_default();
        let record = FutureRecord::to(&topic).key(&instance).payload(&payload);
        if let Err((error, _)) = producer.send(record, Duration::from_secs(1)).await {
            warn!(%error, "load report not sent");
        }
    }
}

/// A consumer of the load topic from its end (only what is reported from now on counts).
pub fn follower(kafka: &KafkaSettings) -> Result<LogConsumer, EventLogError> {
    tail(kafka, "parley-load", &[&kafka.topics().load])
}

/// Records every report `consumer` reads on `board` until `shutdown`.
pub async fn follow(
    consumer: LogConsumer,
    board: std::sync::Arc<std::sync::Mutex<LoadBoard>>,
    shutdown: CancellationToken,
) {
    while let Some(message) = next_record(&consumer, &shutdown, "load reports").await {
        match serde_json::from_slice::<LoadReport>(message.payload().unwrap_or_default()) {
            Ok(report) => board.lock().unwrap_or_else(std::sync::PoisonError::into_inner).record(report),
            Err(error) => warn!(%error, "undecodable load report skipped"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(instance: &str, queue_age_ms: u64, at_ms: i64) -> LoadReport {
        LoadReport { instance: instance.into(), queue_age_ms, at_ms, lanes: BTreeMap::new() }
    }

    #[test]
    fn the_worst_fresh_report_counts_and_ages_with_time() {
        let mut board = LoadBoard::default();
        assert_eq!(board.queue_age_ms(None, 0), 0, "no reports: no load");
        board.record(report("a", 800, 10_000));
        board.record(report("b", 0, 10_000));
        assert_eq!(board.queue_age_ms(None, 10_200), 1_000, "a's queue has waited 200 ms more since");
        board.record(report("a", 100, 10_500));
        assert_eq!(board.queue_age_ms(None, 10_500), 100, "the latest report of an instance replaces its older one");
        board.record(report("c", 5_000, 1_000));
        assert_eq!(board.queue_age_ms(None, 10_500), 100, "a stale report (an instance gone) does not count");
        let second = Duration::from_secs(1);
        assert_eq!(board.overloaded(None, Duration::from_millis(50), 10_500), Some(1_000), "wait at least 1 s");
        assert_eq!(board.overloaded(None, second, 10_500), None);
        assert_eq!(board.overloaded(None, Duration::ZERO, 10_500), None, "0: never shed");
    }

    #[test]
    fn each_lane_has_its_own_age_and_reports_without_lanes_count_whole() {
        let mut board = LoadBoard::default();
        let lanes = [("premium".to_owned(), 0), ("batch".to_owned(), 9_000)].into();
        board.record(LoadReport { lanes, ..report("a", 9_000, 1_000) });
        assert_eq!(board.queue_age_ms(Some("premium"), 1_000), 0, "a flooded batch lane does not age premium");
        assert_eq!(board.queue_age_ms(Some("batch"), 1_000), 9_000);
        assert_eq!(board.queue_age_ms(None, 1_000), 9_000);
        board.record(report("old", 2_000, 1_000));
        assert_eq!(board.queue_age_ms(Some("premium"), 1_000), 2_000, "an older instance's report counts whole");
        let json = r#"{"instance":"x","queue_age_ms":5,"at_ms":1}"#;
        assert!(serde_json::from_str::<LoadReport>(json).unwrap().lanes.is_empty());
    }
}
