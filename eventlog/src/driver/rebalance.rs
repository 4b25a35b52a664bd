//! What the consumer's callbacks tell the driver: partitions assigned or revoked, and each
//! fetched partition's end from librdkafka's statistics.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use rdkafka::TopicPartitionList;
use rdkafka::client::ClientContext;
use rdkafka::consumer::{BaseConsumer, ConsumerContext, Rebalance};
use rdkafka::error::KafkaError;
use tracing::warn;

use super::schedule::PartitionKey;
use crate::consumer::ReaderContext;
use crate::metrics::partition_ends;

/// Partitions assigned or revoked since the driver last looked.
#[derive(Default)]
pub(super) struct RebalanceLog {
    pub(super) changes: Arc<Mutex<Vec<Change>>>,
    /// Each fetched partition's end, from librdkafka's statistics (every 5 s): the lag's.
    pub(super) ends: Arc<Mutex<HashMap<PartitionKey, i64>>>,
}

pub(super) enum Change {
    Assigned(Vec<PartitionKey>),
    Revoked(Vec<PartitionKey>),
}

pub(super) fn partitions_of(list: &TopicPartitionList) -> Vec<PartitionKey> {
    list.elements().iter().map(|e| (e.topic().to_owned(), e.partition())).collect()
}

impl ClientContext for RebalanceLog {
    fn error(&self, error: KafkaError, reason: &str) {
        ReaderContext.error(error, reason);
    }

    fn stats_raw(&self, statistics: &[u8]) {
        let mut ends = self.ends.lock().unwrap_or_else(PoisonError::into_inner);
        ends.extend(partition_ends(statistics));
    }
}

impl ConsumerContext for RebalanceLog {
    fn post_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let change = match rebalance {
            Rebalance::Assign(list) => Change::Assigned(partitions_of(list)),
            Rebalance::Revoke(list) => Change::Revoked(partitions_of(list)),
            Rebalance::Error(error) => {
                warn!(%error, "rebalance error");
                return;
            }
        };
        self.changes.lock().unwrap_or_else(PoisonError::into_inner).push(change);
    }
}
