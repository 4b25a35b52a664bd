//! The driver's decisions without I/O: which record may start (lanes, one turn per key,
//! keys held behind a dead letter, a partition catching up after its assignment) and which
//! offset may be committed. The driver tells it what it read, what finished and what time
//! it is, and does what it answers; the tests below drive it directly.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::time::{Duration, Instant};

use parley_events::dead_letters::{Entry, Holds};

use crate::LogPosition;
use crate::lanes::{Lanes, Stride};

/// Records a lane reads ahead per slot (see [`Scheduler::read_ahead`]).
pub(crate) const READ_AHEAD_PER_SLOT: usize = 16;

/// A topic and partition.
pub(crate) type PartitionKey = (String, i32);

/// How units are made and how many run.
#[derive(Debug, Clone)]
pub(crate) struct Rules {
    /// Records per unit of work (1: each record on its own).
    pub(crate) batch_size: usize,
    /// Longest wait for a unit to fill once its first record is ready.
    pub(crate) batch_wait: Duration,
    /// Units in flight at once.
    pub(crate) concurrency: usize,
    /// Whether a record waits while an earlier record with its key is in flight.
    pub(crate) one_per_key: bool,
    /// Which lane each partition's records are served in.
    pub(crate) lanes: Lanes,
}

/// A record that is work, with what the driver carries along for it.
#[derive(Debug)]
pub(crate) struct Work<R> {
    pub(crate) partition: PartitionKey,
    pub(crate) offset: i64,
    /// The record's key (empty: none; such records are never held or kept in turn).
    pub(crate) key: Vec<u8>,
    /// When it was written (ms): the queue age and lag are measured from it.
    pub(crate) written_ms: i64,
    pub(crate) record: R,
}

/// What a record read turned out to be.
#[derive(Debug)]
pub(crate) enum Read<R> {
    /// Work to do.
    Work { written_ms: i64, record: R },
    /// Nothing to do (not this processor's work, another group's copy, or a record
    /// lettered before).
    Done,
    /// Undecodable, and lettered now: its key is held back until the letter is settled.
    Lettered,
}

/// A started record, handed back when its unit finishes.
#[derive(Debug, Clone)]
pub(crate) struct Ticket {
    partition: PartitionKey,
    /// Which assignment of the partition the record was read in.
    assignment: u64,
    offset: i64,
    key: Vec<u8>,
}

/// Records to run together, in log order, and their tickets.
#[derive(Debug)]
pub(crate) struct Unit<R> {
    pub(crate) tickets: Vec<Ticket>,
    pub(crate) records: Vec<R>,
}

/// Per owned partition, what its lag is measured from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Backlog {
    /// When the oldest record read and not started was written (held ones aside: they
    /// wait for an operator, not for a slot).
    pub(crate) oldest_waiting_ms: Option<i64>,
    /// The first unfinished record not held back (None: all done up to what was read).
    pub(crate) first_not_held: Option<i64>,
}

/// One partition's bookkeeping.
#[derive(Debug)]
struct PartitionState<R> {
    /// Offsets read and not finished (held, parked, waiting or running).
    unfinished: BTreeMap<i64, Unfinished>,
    /// One past the highest offset read.
    read_up_to: Option<i64>,
    /// The offset last handed out to be committed.
    committed: Option<i64>,
    assignment: u64,
    /// While catching up: the partition's end as of the assignment, and the records read
    /// before it, held until the consumer's position reaches it.
    catch_up: Option<(i64, Vec<Work<R>>)>,
}

impl<R> Default for PartitionState<R> {
    fn default() -> Self {
        Self { unfinished: BTreeMap::new(), read_up_to: None, committed: None, assignment: 0, catch_up: None }
    }
}

impl<R> PartitionState<R> {
    /// The offset to commit: the first unfinished record, or one past the last read.
    fn commit_position(&self) -> Option<i64> {
        self.unfinished.first_key_value().map(|(offset, _)| *offset).or(self.read_up_to)
    }
}

#[derive(Debug, Clone, Copy)]
struct Unfinished {
    written_ms: i64,
    started: bool,
    held: bool,
}

/// One lane's records ready to start, in log order.
#[derive(Debug)]
struct LaneQueue<R> {
    ready: VecDeque<Work<R>>,
    /// Since when the oldest ready record has waited (a unit fills until `batch_wait`).
    since: Option<Instant>,
    /// Whether the lane's partitions are paused (its read-ahead is full).
    paused: bool,
}

impl<R> Default for LaneQueue<R> {
    fn default() -> Self {
        Self { ready: VecDeque::new(), since: None, paused: false }
    }
}

/// The scheduler: every record read and not finished is in exactly one place (held behind
/// a dead letter, held by its partition's catch-up, ready in its lane, parked behind its
/// key, or running).
#[derive(Debug)]
pub(crate) struct Scheduler<R> {
    rules: Rules,
    partitions: HashMap<PartitionKey, PartitionState<R>>,
    queues: Vec<LaneQueue<R>>,
    stride: Stride,
    running: usize,
    assignments_made: u64,
    /// Keys with a record running, and the records of those keys waiting their turn.
    busy_keys: HashSet<Vec<u8>>,
    parked: HashMap<Vec<u8>, VecDeque<Work<R>>>,
    /// Keys held back behind a dead letter, and their records read meanwhile.
    holds: Holds,
    held: HashMap<Vec<u8>, VecDeque<Work<R>>>,
}

impl<R> Scheduler<R> {
    pub(crate) fn new(rules: Rules) -> Self {
        let lanes = rules.lanes.count().max(1);
        Self {
            queues: (0..lanes).map(|_| LaneQueue::default()).collect(),
            stride: Stride::new(lanes),
            rules,
            partitions: HashMap::new(),
            running: 0,
            assignments_made: 0,
            busy_keys: HashSet::new(),
            parked: HashMap::new(),
            holds: Holds::default(),
            held: HashMap::new(),
        }
    }

    /// A partition was assigned; `end` is its end then (open transactions included): the
    /// records read before it wait until the consumer has reached it. Returns whether its
    /// lane is paused when lanes pause (several lanes), else `None`.
    pub(crate) fn assign(&mut self, partition: PartitionKey, end: i64) -> Option<bool> {
        self.assignments_made += 1;
        let lane = self.rules.lanes.of(&partition.0, partition.1);
        let state = PartitionState {
            catch_up: Some((end, Vec::new())),
            assignment: self.assignments_made,
            ..Default::default()
        };
        self.partitions.insert(partition, state);
        (self.queues.len() > 1).then(|| self.queues[lane].paused)
    }

    /// A partition was revoked: its unfinished work is its new owner's.
    pub(crate) fn revoke(&mut self, partition: &PartitionKey) {
        self.partitions.remove(partition);
        let queue = &mut self.queues[self.rules.lanes.of(&partition.0, partition.1)];
        queue.ready.retain(|work| work.partition != *partition);
        if queue.ready.is_empty() {
            queue.since = None;
        }
        for queue in self.parked.values_mut().chain(self.held.values_mut()) {
            queue.retain(|work| work.partition != *partition);
        }
        self.held.retain(|_, queue| !queue.is_empty());
        self.parked.retain(|_, queue| !queue.is_empty());
    }

    /// Whether the record at `at` is read while its partition catches up.
    pub(crate) fn catching_up(&self, at: &LogPosition) -> bool {
        let state = self.partitions.get(&(at.topic.clone(), at.partition));
        state.and_then(|state| state.catch_up.as_ref()).is_some_and(|(end, _)| at.offset < *end)
    }

    /// The driver read the record at `at` (every record, work or not, in log order) with
    /// key `key`, and found it to be `read`.
    pub(crate) fn read(&mut self, at: &LogPosition, key: &[u8], read: Read<R>, now: Instant) {
        let partition = (at.topic.clone(), at.partition);
        let state = self.partitions.entry(partition.clone()).or_default();
        state.read_up_to = Some(state.read_up_to.map_or(at.offset + 1, |read| read.max(at.offset + 1)));
        let catch_up_end = state.catch_up.as_ref().map(|(end, _)| *end);
        // A redriven copy awaited here (or earlier in the partition: done before) frees its
        // key; the copy itself goes before the records the key held.
        let mut copy_of = None;
        for released in self.holds.read_at(at) {
            if released.by_copy {
                copy_of = Some(released.key);
            } else {
                self.release_held(&released.key, now);
            }
        }
        match read {
            Read::Done => {}
            Read::Lettered => {
                if !key.is_empty() {
                    self.holds.hold(key.to_vec(), at.clone());
                }
            }
            Read::Work { written_ms, record } => {
                let held = self.holds.is_held(key);
                let state = self.partitions.entry(partition.clone()).or_default();
                state.unfinished.insert(at.offset, Unfinished { written_ms, started: false, held });
                let work =
                    Work { partition: partition.clone(), offset: at.offset, key: key.to_vec(), written_ms, record };
                if held {
                    self.held.entry(work.key.clone()).or_default().push_back(work);
                } else {
                    self.schedule(work, now);
                }
            }
        }
        if let Some(key) = copy_of {
            self.release_held(&key, now);
        }
        if catch_up_end.is_some_and(|end| at.offset + 1 >= end) {
            self.release_caught_up(&partition, now);
        }
    }

    /// A letter of this group, as it now stands: held keys change, and a key set free lets
    /// the records it held go on (after its redriven copy, if that was read already).
    pub(crate) fn settle(&mut self, entry: &Entry, now: Instant) {
        self.holds.apply(entry);
        if let Some(copy) = entry.status.copy() {
            for key in self.copy_read_already(copy) {
                self.release_held(&key, now);
            }
        }
        if let Some(key) = entry.letter.key.as_deref() {
            self.release_held(key, now);
        }
    }

    /// The consumer's positions after it reached the end of `partition` of some topic:
    /// a catch-up is over once the position is at or past the end as of the assignment
    /// (else a transaction open then still holds the rest back).
    pub(crate) fn reached_end(&mut self, partition: i32, positions: &HashMap<PartitionKey, i64>, now: Instant) {
        let caught_up: Vec<PartitionKey> = self
            .partitions
            .iter()
            .filter(|(key, state)| {
                key.1 == partition
                    && state.catch_up.as_ref().is_some_and(|(end, _)| positions.get(*key).is_some_and(|at| at >= end))
            })
            .map(|(key, _)| key.clone())
            .collect();
        for key in caught_up {
            self.release_caught_up(&key, now);
        }
    }

    /// The next unit to start, if a slot is free and a lane may start one: the lane the
    /// weights choose among those whose unit is full or whose first record has waited
    /// `batch_wait`. With one turn per key, a record whose key is busy is parked behind
    /// the one running.
    pub(crate) fn next_unit(&mut self, now: Instant) -> Option<Unit<R>> {
        while self.running < self.rules.concurrency {
            let (running, rules, queues) = (self.running, &self.rules, &self.queues);
            let startable = |lane: usize| {
                let queue = &queues[lane];
                let due = queue.ready.len() >= rules.batch_size
                    || queue.since.is_none_or(|since| now.duration_since(since) >= rules.batch_wait);
                !queue.ready.is_empty() && due && rules.lanes.may_start(lane, running, rules.concurrency)
            };
            let lane = self.stride.pick(&self.rules.lanes, startable)?;
            let mut unit = Vec::new();
            while unit.len() < self.rules.batch_size {
                let Some(work) = self.queues[lane].ready.pop_front() else { break };
                if self.rules.one_per_key && !self.busy_keys.insert(work.key.clone()) {
                    self.parked.entry(work.key.clone()).or_default().push_back(work);
                    continue;
                }
                unit.push(work);
            }
            let queue = &mut self.queues[lane];
            queue.since = (!queue.ready.is_empty()).then_some(now);
            if unit.is_empty() {
                continue;
            }
            self.running += 1;
            let mut tickets = Vec::with_capacity(unit.len());
            let mut records = Vec::with_capacity(unit.len());
            for work in unit {
                let state = self.partitions.get_mut(&work.partition);
                let assignment = state.map_or(0, |state| {
                    if let Some(record) = state.unfinished.get_mut(&work.offset) {
                        record.started = true;
                    }
                    state.assignment
                });
                tickets.push(Ticket { partition: work.partition, assignment, offset: work.offset, key: work.key });
                records.push(work.record);
            }
            return Some(Unit { tickets, records });
        }
        None
    }

    /// A unit finished: its records are done and the next parked record of each of its
    /// keys is ready. Returns the partitions its outputs come from, or `None` when one of
    /// them was revoked meanwhile (then its outputs are the partition's new owner's to make).
    pub(crate) fn finish(&mut self, tickets: Vec<Ticket>, now: Instant) -> Option<Vec<PartitionKey>> {
        self.running = self.running.saturating_sub(1);
        let mut revoked = false;
        let mut sources = Vec::new();
        for ticket in tickets {
            // Revoked meanwhile (and perhaps assigned again: then the record was read anew
            // and is that assignment's to finish).
            match self.partitions.get_mut(&ticket.partition).filter(|state| state.assignment == ticket.assignment) {
                Some(state) => {
                    state.unfinished.remove(&ticket.offset);
                }
                None => revoked = true,
            }
            if self.rules.one_per_key {
                self.busy_keys.remove(&ticket.key);
                if let Some(queue) = self.parked.get_mut(&ticket.key) {
                    if let Some(next) = queue.pop_front() {
                        let lane = &mut self.queues[self.rules.lanes.of(&next.partition.0, next.partition.1)];
                        lane.since.get_or_insert(now);
                        lane.ready.push_front(next);
                    }
                    if queue.is_empty() {
                        self.parked.remove(&ticket.key);
                    }
                }
            }
            sources.push(ticket.partition);
        }
        sources.sort_unstable();
        sources.dedup();
        (!revoked).then_some(sources)
    }

    /// Every owned partition's commit position that moved since it was last handed out:
    /// the first unfinished record, or one past the last read when all are done.
    pub(crate) fn commit_offsets(&mut self) -> BTreeMap<PartitionKey, i64> {
        let mut offsets = BTreeMap::new();
        for (key, state) in &mut self.partitions {
            if let Some(position) = state.commit_position()
                && state.committed.is_none_or(|committed| committed < position)
            {
                state.committed = Some(position);
                offsets.insert(key.clone(), position);
            }
        }
        offsets
    }

    /// Records a lane reads ahead: a unit, or [`READ_AHEAD_PER_SLOT`] per slot. Records
    /// read start oldest first; those left in Kafka come back in the order a fetch returns
    /// them, partition by partition, so a read-ahead as short as the slots served users of
    /// some partitions twice while others waited out the gateway's shedding threshold.
    fn read_ahead(&self) -> usize {
        self.rules.batch_size.max(self.rules.concurrency * READ_AHEAD_PER_SLOT)
    }

    /// Whether a lane has room to read ahead.
    pub(crate) fn can_read(&self) -> bool {
        self.queues.iter().any(|queue| queue.ready.len() < self.read_ahead())
    }

    /// When a unit that is not full is due to start anyway (its first record has waited
    /// `batch_wait`), counting only lanes that may start one now (else this would spin).
    pub(crate) fn fill_deadline(&self) -> Option<Instant> {
        let (running, rules) = (self.running, &self.rules);
        let has_room = running < rules.concurrency;
        self.queues
            .iter()
            .enumerate()
            .filter(|(lane, _)| has_room && rules.lanes.may_start(*lane, running, rules.concurrency))
            .filter_map(|(_, queue)| queue.since)
            .min()
            .map(|since| since + rules.batch_wait)
    }

    /// With several lanes, the partitions to pause (`true`) or resume: a lane whose
    /// read-ahead is full pauses (the rest waits in Kafka while the consumer fetches the
    /// other lanes) and resumes once half empty. With one lane, not reading is enough.
    pub(crate) fn pauses(&mut self) -> Vec<(Vec<PartitionKey>, bool)> {
        if self.queues.len() < 2 {
            return vec![];
        }
        let read_ahead = self.read_ahead();
        let mut changes = Vec::new();
        for lane in 0..self.queues.len() {
            let queue = &self.queues[lane];
            let waiting = queue.ready.len();
            let full = if queue.paused { waiting > read_ahead / 2 } else { waiting >= read_ahead };
            if full == queue.paused {
                continue;
            }
            let lanes = &self.rules.lanes;
            let partitions = self
                .partitions
                .keys()
                .filter(|(topic, partition)| lanes.of(topic, *partition) == lane)
                .cloned()
                .collect();
            changes.push((partitions, full));
            self.queues[lane].paused = full;
        }
        changes
    }

    /// Per lane, when the oldest record waiting to start (ready, or parked behind its
    /// key) was written.
    pub(crate) fn oldest_waiting(&self) -> Vec<Option<i64>> {
        let lanes = &self.rules.lanes;
        let parked: Vec<&Work<R>> = self.parked.values().filter_map(VecDeque::front).collect();
        (0..self.queues.len())
            .map(|lane| {
                let parked =
                    parked.iter().copied().filter(|work| lanes.of(&work.partition.0, work.partition.1) == lane);
                self.queues[lane].ready.iter().chain(parked).map(|work| work.written_ms).min()
            })
            .collect()
    }

    /// Per owned partition, what its lag is measured from.
    pub(crate) fn backlogs(&self) -> impl Iterator<Item = (&PartitionKey, Backlog)> {
        self.partitions.iter().map(|(key, state)| {
            let waiting = state.unfinished.values().filter(|u| !u.started && !u.held);
            let oldest_waiting_ms = waiting.map(|u| u.written_ms).min();
            let first_not_held = state.unfinished.iter().find(|(_, u)| !u.held).map(|(offset, _)| *offset);
            (key, Backlog { oldest_waiting_ms, first_not_held })
        })
    }

    /// Records held back behind a dead letter of their key, and how many keys are held.
    pub(crate) fn held(&self) -> (usize, usize) {
        (self.held.values().map(VecDeque::len).sum(), self.holds.held_keys())
    }

    /// A record that may start: held with its partition's catch-up, or into its lane.
    fn schedule(&mut self, work: Work<R>, now: Instant) {
        if let Some(state) = self.partitions.get_mut(&work.partition) {
            if let Some(unfinished) = state.unfinished.get_mut(&work.offset) {
                unfinished.held = false;
            }
            if let Some((end, held)) = state.catch_up.as_mut()
                && work.offset < *end
            {
                held.push(work);
                return;
            }
        }
        let queue = &mut self.queues[self.rules.lanes.of(&work.partition.0, work.partition.1)];
        queue.since.get_or_insert(now);
        queue.ready.push_back(work);
    }

    /// Lets the records a key held go on, in log order, once nothing holds it.
    fn release_held(&mut self, key: &[u8], now: Instant) {
        if self.holds.is_held(key) {
            return;
        }
        for work in self.held.remove(key).unwrap_or_default() {
            self.schedule(work, now);
        }
    }

    /// The partition is read up to its end as of the assignment: its held records start.
    fn release_caught_up(&mut self, partition: &PartitionKey, now: Instant) {
        let Some(state) = self.partitions.get_mut(partition) else { return };
        let Some((_, held)) = state.catch_up.take() else { return };
        let queue = &mut self.queues[self.rules.lanes.of(&partition.0, partition.1)];
        for work in held {
            queue.since.get_or_insert(now);
            queue.ready.push_back(work);
        }
    }

    /// A redriven copy read before the letter's redrive was known is seen now: it goes
    /// first among its key's held records. Returns the keys this frees.
    fn copy_read_already(&mut self, copy: &LogPosition) -> Vec<Vec<u8>> {
        let read = self
            .partitions
            .get(&(copy.topic.clone(), copy.partition))
            .and_then(|state| state.read_up_to)
            .is_some_and(|read_up_to| read_up_to > copy.offset);
        if !read {
            return vec![];
        }
        let released = self.holds.read_at(copy);
        for key in released.iter().filter(|released| released.by_copy).map(|released| &released.key) {
            let at = |work: &Work<R>| {
                (work.partition.0.as_str(), work.partition.1, work.offset)
                    == (copy.topic.as_str(), copy.partition, copy.offset)
            };
            if let Some(queue) = self.held.get_mut(key)
                && let Some(index) = queue.iter().position(at)
                && let Some(work) = queue.remove(index)
            {
                queue.push_front(work);
            }
        }
        released.into_iter().map(|released| released.key).collect()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use parley_events::dead_letters::{LetterId, Status};
    use parley_events::event::DeadLetter;
    use proptest::prelude::*;

    use super::*;

    const TOPIC: &str = "queries";

    fn rules(batch_size: usize, concurrency: usize) -> Rules {
        Rules { batch_size, batch_wait: Duration::ZERO, concurrency, one_per_key: true, lanes: Lanes::single() }
    }

    fn at(partition: i32, offset: i64) -> LogPosition {
        LogPosition { topic: TOPIC.into(), partition, offset }
    }

    fn work(offset: i64) -> Read<i64> {
        Read::Work { written_ms: offset, record: offset }
    }

    /// A scheduler that owns partitions 0 and 1, caught up (their end was 0).
    fn owning(rules: Rules) -> (Scheduler<i64>, Instant) {
        let mut scheduler = Scheduler::new(rules);
        for partition in [0, 1] {
            scheduler.assign((TOPIC.into(), partition), 0);
        }
        (scheduler, Instant::now())
    }

    fn letter(key: &[u8], source: &LogPosition, status: Status) -> Entry {
        let letter = DeadLetter {
            source_topic: source.topic.clone(),
            source_partition: source.partition,
            source_offset: source.offset,
            key: Some(key.to_vec()),
            payload: None,
            consumer: "inference".into(),
            error: "undecodable".into(),
            failed_at: 0,
            headers: HashMap::new(),
        };
        Entry { id: LetterId { partition: 0, offset: 0 }, letter, status, resolution: None }
    }

    /// Starts and finishes units one at a time until none can start: their first records.
    fn run_one_at_a_time(scheduler: &mut Scheduler<i64>, now: Instant) -> Vec<i64> {
        std::iter::from_fn(|| {
            let unit = scheduler.next_unit(now)?;
            scheduler.finish(unit.tickets, now);
            Some(unit.records[0])
        })
        .collect()
    }

    fn started(scheduler: &mut Scheduler<i64>, now: Instant) -> Vec<Unit<i64>> {
        std::iter::from_fn(|| scheduler.next_unit(now)).collect()
    }

    #[test]
    fn a_key_runs_one_record_at_a_time_in_log_order() {
        let (mut scheduler, now) = owning(rules(1, 4));
        for offset in 0..3 {
            scheduler.read(&at(0, offset), b"a", work(offset), now);
        }
        scheduler.read(&at(0, 3), b"b", work(3), now);
        let units = started(&mut scheduler, now);
        let records: Vec<i64> = units.iter().flat_map(|unit| unit.records.clone()).collect();
        assert_eq!(records, [0, 3], "a's second record waits for its first; b runs beside it");
        let first = units.into_iter().next().unwrap();
        scheduler.finish(first.tickets, now);
        let next = started(&mut scheduler, now);
        assert_eq!(next.iter().flat_map(|unit| unit.records.clone()).collect::<Vec<_>>(), [1]);
    }

    #[test]
    fn the_commit_position_never_passes_unfinished_work() {
        let (mut scheduler, now) = owning(rules(1, 2));
        scheduler.read(&at(0, 0), b"a", work(0), now);
        scheduler.read(&at(0, 1), b"b", work(1), now);
        scheduler.read(&at(0, 2), b"c", Read::Done, now);
        let mut units = started(&mut scheduler, now);
        assert_eq!(scheduler.commit_offsets().get(&(TOPIC.into(), 0)), Some(&0));
        // The later record finishes first: the offset stays at the earlier one.
        let second = units.pop().unwrap();
        assert_eq!(scheduler.finish(second.tickets, now), Some(vec![(TOPIC.into(), 0)]));
        assert!(scheduler.commit_offsets().is_empty(), "nothing moved: offset 0 is still running");
        let first = units.pop().unwrap();
        scheduler.finish(first.tickets, now);
        assert_eq!(scheduler.commit_offsets().get(&(TOPIC.into(), 0)), Some(&3), "past the record that was no work");
    }

    #[test]
    fn a_unit_fills_up_to_the_batch_size_or_starts_after_the_batch_wait() {
        let rules = Rules { batch_wait: Duration::from_millis(50), one_per_key: false, ..rules(3, 1) };
        let (mut scheduler, now) = owning(rules);
        scheduler.read(&at(0, 0), b"a", work(0), now);
        scheduler.read(&at(0, 1), b"b", work(1), now);
        assert!(scheduler.next_unit(now).is_none(), "not full and not due");
        assert_eq!(scheduler.fill_deadline(), Some(now + Duration::from_millis(50)));
        let unit = scheduler.next_unit(now + Duration::from_millis(50)).expect("due");
        assert_eq!(unit.records, [0, 1]);
        for offset in 2..6 {
            scheduler.read(&at(0, offset), b"c", work(offset), now);
        }
        scheduler.finish(unit.tickets, now);
        assert_eq!(scheduler.next_unit(now).expect("full").records, [2, 3, 4]);
    }

    #[test]
    fn a_partition_catching_up_starts_nothing_before_its_end_is_reached() {
        let mut scheduler = Scheduler::new(rules(1, 4));
        let now = Instant::now();
        let partition = (TOPIC.to_owned(), 0);
        scheduler.assign(partition.clone(), 5);
        assert!(scheduler.catching_up(&at(0, 1)));
        scheduler.read(&at(0, 1), b"a", work(1), now);
        scheduler.read(&at(0, 2), b"b", work(2), now);
        assert!(scheduler.next_unit(now).is_none());
        // The consumer's position reached the end as of the assignment (past a transaction
        // marker, say): the held records start, in order.
        scheduler.reached_end(0, &HashMap::from([(partition.clone(), 5)]), now);
        assert_eq!(started(&mut scheduler, now).iter().map(|unit| unit.records[0]).collect::<Vec<_>>(), [1, 2]);
        assert!(!scheduler.catching_up(&at(0, 6)));
    }

    #[test]
    fn reading_the_last_record_before_the_end_ends_the_catch_up() {
        let mut scheduler = Scheduler::new(rules(1, 4));
        let now = Instant::now();
        scheduler.assign((TOPIC.into(), 0), 2);
        scheduler.read(&at(0, 0), b"a", work(0), now);
        assert!(scheduler.next_unit(now).is_none());
        scheduler.read(&at(0, 1), b"b", Read::Done, now);
        assert_eq!(scheduler.next_unit(now).map(|unit| unit.records), Some(vec![0]));
    }

    #[test]
    fn a_held_key_waits_for_its_letter_and_keeps_its_order() {
        let (mut scheduler, now) = owning(rules(1, 4));
        scheduler.read(&at(0, 0), b"a", Read::Lettered, now);
        scheduler.read(&at(0, 1), b"a", work(1), now);
        scheduler.read(&at(0, 2), b"b", work(2), now);
        scheduler.read(&at(0, 3), b"a", work(3), now);
        let units = started(&mut scheduler, now);
        assert_eq!(units.iter().map(|unit| unit.records[0]).collect::<Vec<_>>(), [2], "only the free key runs");
        assert_eq!(scheduler.held(), (2, 1));
        assert_eq!(scheduler.commit_offsets().get(&(TOPIC.into(), 0)), Some(&1), "held records are unfinished");
        scheduler.settle(&letter(b"a", &at(0, 0), Status::Discarded), now);
        assert_eq!(scheduler.held(), (0, 0));
        let first = scheduler.next_unit(now).expect("a's first held record");
        assert_eq!(first.records, [1]);
        assert!(scheduler.next_unit(now).is_none(), "a's next record waits its turn");
        scheduler.finish(first.tickets, now);
        assert_eq!(scheduler.next_unit(now).map(|unit| unit.records), Some(vec![3]));
    }

    #[test]
    fn a_redriven_copy_runs_before_the_records_its_key_held() {
        let (mut scheduler, now) = owning(rules(1, 4));
        scheduler.read(&at(0, 0), b"a", Read::Lettered, now);
        scheduler.read(&at(0, 1), b"a", work(1), now);
        // Redriven: the copy is written at offset 2; the key waits for it.
        scheduler.settle(&letter(b"a", &at(0, 0), Status::Redriven { copy: at(0, 2) }), now);
        assert!(scheduler.next_unit(now).is_none());
        scheduler.read(&at(0, 2), b"a", work(2), now);
        assert_eq!(run_one_at_a_time(&mut scheduler, now), [2, 1]);
    }

    #[test]
    fn a_copy_read_before_its_redrive_was_known_still_goes_first() {
        let (mut scheduler, now) = owning(rules(1, 4));
        scheduler.read(&at(0, 0), b"a", Read::Lettered, now);
        scheduler.read(&at(0, 1), b"a", work(1), now);
        scheduler.read(&at(0, 2), b"a", work(2), now); // the copy, not yet known as one
        scheduler.settle(&letter(b"a", &at(0, 0), Status::Redriven { copy: at(0, 2) }), now);
        assert_eq!(run_one_at_a_time(&mut scheduler, now), [2, 1]);
    }

    #[test]
    fn a_unit_of_a_revoked_partition_gives_its_outputs_up() {
        let (mut scheduler, now) = owning(rules(1, 4));
        scheduler.read(&at(1, 0), b"a", work(0), now);
        let unit = scheduler.next_unit(now).unwrap();
        scheduler.revoke(&(TOPIC.into(), 1));
        scheduler.assign((TOPIC.into(), 1), 0);
        assert_eq!(scheduler.finish(unit.tickets, now), None);
        assert!(scheduler.commit_offsets().is_empty(), "the new assignment read nothing yet");
    }

    #[test]
    fn a_full_lane_pauses_and_resumes_when_half_empty() {
        let lanes = Lanes::new(vec!["premium", "batch"], 4, |_, partition| usize::try_from(partition).unwrap());
        let rules = Rules { lanes, one_per_key: false, ..rules(1, 2) };
        let (mut scheduler, now) = owning(rules);
        let read_ahead = 2 * READ_AHEAD_PER_SLOT;
        for offset in 0..i64::try_from(read_ahead).unwrap() + 2 {
            scheduler.read(&at(1, offset), b"k", work(offset), now);
        }
        assert_eq!(scheduler.pauses(), vec![(vec![(TOPIC.to_owned(), 1)], true)]);
        assert!(scheduler.can_read(), "the other lane still reads");
        let mut units = started(&mut scheduler, now);
        assert_eq!(units.len(), 2);
        assert!(scheduler.pauses().is_empty(), "a read-ahead and then some waiting: still full");
        // Half the read-ahead done, one by one: the lane reads again.
        for _ in 0..read_ahead / 2 {
            scheduler.finish(units.pop().unwrap().tickets, now);
            units.extend(started(&mut scheduler, now));
        }
        assert_eq!(scheduler.pauses(), vec![(vec![(TOPIC.to_owned(), 1)], false)]);
    }

    /// One step of a random interleaving.
    #[derive(Debug, Clone)]
    enum Step {
        Read { partition: i32, key: u8, kind: u8 },
        Start,
        Finish(usize),
        Commit,
        Settle(u8),
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            4 => (0..2i32, 0..3u8, 0..6u8).prop_map(|(partition, key, kind)| Step::Read { partition, key, kind }),
            3 => Just(Step::Start),
            3 => (0..8usize).prop_map(Step::Finish),
            1 => Just(Step::Commit),
            1 => (0..3u8).prop_map(Step::Settle),
        ]
    }

    proptest! {
        /// Over any interleaving of reads (work, no work, poison), starts, finishes in any
        /// order, commits and discarded letters: a committed offset never passes a record
        /// that is not finished, two records of a key never run at once, a held key's
        /// records never start while it is held, and each key's records start in log order.
        #[test]
        fn the_rules_hold_over_any_interleaving(steps in prop::collection::vec(step(), 1..120)) {
            let (mut scheduler, now) = owning(rules(2, 3));
            let mut next_offset = [0i64; 2];
            let mut key_of = HashMap::new();
            let mut unfinished: BTreeSet<(i32, i64)> = BTreeSet::new();
            let mut running: Vec<Unit<i64>> = Vec::new();
            let mut held: HashMap<u8, LogPosition> = HashMap::new();
            let mut last_started: HashMap<u8, i64> = HashMap::new();
            // Records read while their key was held: none may start before its letter is settled.
            let mut behind_letter: HashSet<i64> = HashSet::new();
            for step in steps {
                match step {
                    Step::Read { partition, key, kind } => {
                        let offset = next_offset[partition as usize];
                        next_offset[partition as usize] += 1;
                        let position = at(partition, offset);
                        let read = match kind {
                            0 => Read::Done,
                            1 if !held.contains_key(&key) => {
                                held.insert(key, position.clone());
                                Read::Lettered
                            }
                            _ => {
                                unfinished.insert((partition, offset));
                                // Unique record ids across partitions: offset * 2 + partition.
                                let id = offset * 2 + i64::from(partition);
                                key_of.insert(id, key);
                                if held.contains_key(&key) {
                                    behind_letter.insert(id);
                                }
                                Read::Work { written_ms: 0, record: id }
                            }
                        };
                        scheduler.read(&position, &[key], read, now);
                    }
                    Step::Start => {
                        while let Some(unit) = scheduler.next_unit(now) {
                            for id in &unit.records {
                                let key = key_of[id];
                                prop_assert!(!behind_letter.contains(id), "record {} of held key {} started", id, key);
                                let busy = running.iter().flat_map(|unit| &unit.records).any(|other| key_of[other] == key)
                                    || unit.records.iter().filter(|other| key_of[*other] == key).count() > 1;
                                prop_assert!(!busy, "two records of key {} at once", key);
                                // Log order within a key: ids of one partition grow with
                                // offsets; a key's records may sit in both partitions, so
                                // compare offsets only within one.
                                if let Some(previous) = last_started.insert(key, *id)
                                    && previous % 2 == id % 2
                                {
                                    prop_assert!(previous < *id, "key {} started {} after {}", key, id, previous);
                                }
                            }
                            running.push(unit);
                        }
                    }
                    Step::Finish(index) if !running.is_empty() => {
                        let unit = running.remove(index % running.len());
                        for id in &unit.records {
                            unfinished.remove(&((id % 2) as i32, id / 2));
                        }
                        scheduler.finish(unit.tickets, now);
                    }
                    Step::Finish(_) => {}
                    Step::Commit => {
                        for ((_, partition), offset) in scheduler.commit_offsets() {
                            let first = unfinished.iter().find(|(p, _)| *p == partition).map(|(_, o)| *o);
                            prop_assert!(first.is_none_or(|first| offset <= first),
                                "partition {} committed {} past unfinished {:?}", partition, offset, first);
                        }
                    }
                    Step::Settle(key) => {
                        if let Some(source) = held.remove(&key) {
                            behind_letter.retain(|id| key_of[id] != key);
                            scheduler.settle(&letter(&[key], &source, Status::Discarded), now);
                        }
                    }
                }
            }
        }
    }
}
