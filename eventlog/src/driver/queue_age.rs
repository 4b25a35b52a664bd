//! How long the head of each lane's queue has waited, shared with whoever reports load.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};

use crate::lanes::Lanes;

/// Per lane, the write time (record timestamp, ms) of the oldest record a driver has read
/// and not yet started: the head of the lane's queue. Shared with whoever reports load
/// (inference publishes it so gateways can shed turns before a queue grows long).
#[derive(Debug, Clone)]
pub struct QueueAge(Arc<[AtomicI64]>);

impl QueueAge {
    /// A queue age per lane of `lanes`.
    pub fn new(lanes: &Lanes) -> Self {
        Self((0..lanes.count().max(1)).map(|_| AtomicI64::new(NOTHING_WAITS)).collect())
    }

    /// How long the oldest waiting record of any lane has waited at `now_ms` (0: none waits).
    pub fn age_ms(&self, now_ms: i64) -> u64 {
        (0..self.0.len()).map(|lane| self.lane_age_ms(lane, now_ms)).max().unwrap_or(0)
    }

    /// How long the oldest waiting record of `lane` has waited at `now_ms`.
    pub fn lane_age_ms(&self, lane: usize, now_ms: i64) -> u64 {
        match self.0.get(lane).map_or(NOTHING_WAITS, |since| since.load(Ordering::Relaxed)) {
            NOTHING_WAITS => 0,
            since => u64::try_from(now_ms - since).unwrap_or(0),
        }
    }

    pub(super) fn set_oldest(&self, lane: usize, since_ms: Option<i64>) {
        if let Some(slot) = self.0.get(lane) {
            slot.store(since_ms.unwrap_or(NOTHING_WAITS), Ordering::Relaxed);
        }
    }
}

const NOTHING_WAITS: i64 = i64::MAX;
