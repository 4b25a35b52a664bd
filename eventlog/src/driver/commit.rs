//! The committer: what finished goes to the log with the offsets it allows, one Kafka
//! transaction per batch of what queued while the previous one ran.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use rdkafka::consumer::{Consumer, StreamConsumer};
use tokio::sync::{mpsc, oneshot};
use tracing::warn;

use super::rebalance::{RebalanceLog, partitions_of};
use super::schedule::PartitionKey;
use crate::error::EventLogError;
use crate::transaction::{Outgoing, TransactionalProducer};

/// A failed transaction is aborted and its outputs and offsets retried this often, with a
/// growing pause, before the driver gives up.
pub const COMMIT_ATTEMPTS: u32 = 5;

/// Outputs and offsets for the committer.
#[derive(Debug, Default)]
pub(super) struct Commit {
    pub(super) outgoing: Vec<Outgoing>,
    /// The partitions the outputs come from: while one of them is not assigned any more,
    /// the outputs are its new owner's to make.
    pub(super) sources: Vec<PartitionKey>,
    pub(super) offsets: BTreeMap<PartitionKey, i64>,
    /// Told once this commit and every one queued before it are done.
    pub(super) flushed: Option<oneshot::Sender<()>>,
}

impl Commit {
    /// Drops what belongs to partitions this member no longer owns.
    fn keep_assigned(&mut self, assigned: &HashSet<PartitionKey>) {
        if self.sources.iter().any(|source| !assigned.contains(source)) {
            self.outgoing.clear();
        }
        self.offsets.retain(|partition, _| assigned.contains(partition));
    }
}

/// Commits what the driver sends, grouping everything queued while the previous
/// transaction ran into the next one.
pub(super) async fn commit_loop(
    transactions: TransactionalProducer,
    consumer: Arc<StreamConsumer<RebalanceLog>>,
    mut queue: mpsc::UnboundedReceiver<Commit>,
) -> Result<(), EventLogError> {
    while let Some(first) = queue.recv().await {
        let mut queued = vec![first];
        while let Ok(more) = queue.try_recv() {
            queued.push(more);
        }
        let mut attempt = 1;
        loop {
            // A partition revoked while its commit waited (or failed: a rebalance fences the
            // transaction of the old generation) is its new owner's; with the new
            // generation, the broker would take this member's offsets for it.
            let assigned: HashSet<PartitionKey> =
                consumer.assignment().map(|list| partitions_of(&list).into_iter().collect())?;
            let (mut outgoing, mut offsets) = (Vec::new(), BTreeMap::new());
            for commit in &mut queued {
                commit.keep_assigned(&assigned);
                outgoing.extend(commit.outgoing.iter().cloned());
                for (partition, offset) in &commit.offsets {
                    let entry = offsets.entry(partition.clone()).or_insert(*offset);
                    *entry = (*entry).max(*offset);
                }
            }
            match transactions.commit_offsets(consumer.as_ref(), &offsets, outgoing).await {
                Ok(()) => {
                    for flushed in queued.iter_mut().filter_map(|commit| commit.flushed.take()) {
                        let _ = flushed.send(());
                    }
                    break;
                }
                Err(error) if attempt < COMMIT_ATTEMPTS && !error.is_fatal() => {
                    let pause = Duration::from_millis(50 << attempt);
                    warn!(%error, attempt, ?pause, "transaction aborted; retrying its outputs and offsets");
                    tokio::time::sleep(pause).await;
                    attempt += 1;
                }
                Err(error) => return Err(error),
            }
        }
    }
    Ok(())
}
