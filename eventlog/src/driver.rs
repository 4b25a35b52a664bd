//! The one consume-transform-produce driver: records in, records to append out, exactly
//! once from the log's point of view. Inference and the embedder are [`Processor`]s; the
//! driver owns everything else: the consumer and its group, decoding failures (dead
//! letters, built here only), concurrency, the commit rule, and what is fatal.
//!
//! - **Continuous**: a unit of work (one record, or a batch of up to `batch_size`) starts
//!   as soon as it is fetched and one of `concurrency` slots is free, on its own task, so
//!   a slow unit never delays another one's start or its outcome.
//! - **One per key** (optional): a record waits while an earlier record of its key is in
//!   flight (one conversation, one turn).
//! - **Lanes** (optional, [`Lanes`]): each partition is in a lane; a lane reads ahead up
//!   to a unit or one record per slot, and its partitions are paused while that is full,
//!   so the consumer keeps fetching the other lanes; a free slot goes to a lane by weight.
//! - **Commit rule**: outputs are appended as units finish, grouped into one Kafka
//!   transaction per commit (what finished while the previous commit ran goes into the
//!   next); the transaction also commits, per partition, the offset of the first record
//!   not finished yet. A committed offset never passes unanswered work.
//! - **Catch-up after an assignment**: output may already be in the log for records past
//!   the committed offset (a later record finished before an earlier one, then the member
//!   died). Records read before the partition's end as of the assignment are held until
//!   that end is reached, and every record is shown to [`Processor::observe`] first, so a
//!   processor learns which work is done before any of it is started again. The end counts
//!   transactions still open (a read_committed consumer stops short of them, and their
//!   outputs may yet commit), and it is taken only once this member's own commits queued
//!   before the assignment are in the log.
//! - **Dead letters keep order**: an undecodable record goes to the dead-letter topic
//!   (once: a record lettered before is known from the topic) and its key is held back:
//!   the key's later records wait, unfinished, until an operator discards the letter, or
//!   redrives it and the copy has run first (`parley_events::dead_letters`). The driver
//!   follows the topic's letters and decisions for its group from the start.
//! - **Fatal**: a processor error, an unusable consumer, or a transaction that fails
//!   [`COMMIT_ATTEMPTS`] times in a row stops the driver with the error (the process
//!   exits and is restarted; nothing is committed past unfinished work, so nothing is lost).

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::future::Future;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use futures::future::join_all;
use parley_events::dead_letters::{Holds, LetterBook, LetterId};
use parley_events::event::{DeadLetterRecord, now_millis};
use parley_events::{EventCodec, EventsError};
use rdkafka::client::ClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, Rebalance, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::message::OwnedMessage;
use rdkafka::{Message, TopicPartitionList};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::LogPosition;
use crate::consumer::{ReaderContext, blocking_query, is_fatal, reader_config};
use crate::dead_letter::{LetterFollower, dead_letter_for, redriven_for};
use crate::error::EventLogError;
use crate::lanes::{Lanes, Stride};
use crate::metrics::{
    CONSUMER_LAG_RECORDS, CONSUMER_LAG_SECONDS, DEAD_LETTERS, HELD_KEYS, HELD_RECORDS, STATISTICS_INTERVAL_MS,
    partition_ends,
};
use crate::settings::KafkaSettings;
use crate::transaction::{Outgoing, TransactionalProducer};

/// A failed transaction is aborted and its outputs and offsets retried this often, with a
/// growing pause, before the driver gives up.
pub const COMMIT_ATTEMPTS: u32 = 5;

/// How often the consumer lag metrics are updated.
const LAG_EVERY: Duration = Duration::from_secs(1);

/// How long the consumer may sit idle before [`Processor::idle`] runs.
const IDLE: Duration = Duration::from_secs(1);

/// What a processor says about one record once decoded.
pub type Decoded<T> = Result<T, EventsError>;

/// A service's work: decode a record, do what it asks, say what to append.
pub trait Processor: Send + Sync + 'static {
    /// A decoded record.
    type Item: Send + 'static;
    /// Why a unit could not be done (fatal for the driver).
    type Error: std::error::Error + Send + Sync + 'static;

    /// Decodes a record (riding out registry outages). `None`: shutdown came while
    /// waiting. `Some(Err)`: the record is poison and goes to the dead-letter topic.
    fn decode(&self, record: &OwnedMessage) -> impl Future<Output = Option<Decoded<Self::Item>>> + Send;

    /// Sees every decoded record in log order as it is read, before any work on it starts;
    /// `catching_up` while the partition is read up to its end as of the assignment.
    fn observe(&self, _item: &Self::Item, _catching_up: bool) {}

    /// Whether the record is work for this processor (other records complete at once).
    fn wants(&self, item: &Self::Item) -> bool;

    /// Does the work of a unit (its records in log order) and returns what to append for
    /// it. Transient failures are the processor's to retry; an error here is fatal.
    fn process(
        self: Arc<Self>,
        unit: Vec<(OwnedMessage, Self::Item)>,
    ) -> impl Future<Output = Result<Vec<Outgoing>, Self::Error>> + Send;

    /// Runs when no record arrived for a while (e.g. flush a buffer).
    fn idle(&self) -> impl Future<Output = ()> + Send {
        async {}
    }
}

/// How a driver consumes and schedules.
#[derive(Debug, Clone)]
pub struct DriverSettings {
    pub group_id: String,
    pub transactional_id: String,
    pub topics: Vec<String>,
    pub dead_letter_topic: String,
    /// Records per unit of work (1: each record on its own).
    pub batch_size: usize,
    /// Longest wait for a unit to fill once its first record arrived.
    pub batch_wait: Duration,
    /// Units in flight at once.
    pub concurrency: usize,
    /// Whether a record waits while an earlier record with its key is in flight.
    pub one_per_key: bool,
    /// Which lane each partition's records are served in.
    pub lanes: Lanes,
    /// Where the driver shows how long the oldest waiting record of each lane has waited.
    pub queue: QueueAge,
}

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

    fn set_oldest(&self, lane: usize, since_ms: Option<i64>) {
        if let Some(slot) = self.0.get(lane) {
            slot.store(since_ms.unwrap_or(NOTHING_WAITS), Ordering::Relaxed);
        }
    }
}

const NOTHING_WAITS: i64 = i64::MAX;

/// Runs `processor` over the settings' topics until `shutdown` (or a fatal error).
pub async fn run<P: Processor>(
    kafka: &KafkaSettings,
    settings: DriverSettings,
    processor: Arc<P>,
    codec: Arc<EventCodec>,
    shutdown: CancellationToken,
) -> Result<(), EventLogError> {
    let context = RebalanceLog::default();
    let (assignments, ends) = (context.changes.clone(), context.ends.clone());
    let mut config = reader_config(kafka, &settings.group_id, true);
    config
        .set("auto.offset.reset", "earliest")
        // Only partitions that move are revoked: work on the others goes on through a rebalance.
        .set("partition.assignment.strategy", "cooperative-sticky")
        // A member that died without leaving holds its partitions this long.
        .set("session.timeout.ms", "10000")
        // A resumed lane's partitions join the next fetch: the broker holds one this long.
        .set("fetch.wait.max.ms", "100")
        .set("heartbeat.interval.ms", "1000")
        .set("statistics.interval.ms", STATISTICS_INTERVAL_MS);
    if let Some(instance) = &kafka.instance_id {
        config.set("group.instance.id", instance);
    }
    let consumer: StreamConsumer<RebalanceLog> = config.create_with_context(context)?;
    let topics: Vec<&str> = settings.topics.iter().map(String::as_str).collect();
    consumer.subscribe(&topics)?;
    let consumer = Arc::new(consumer);
    // The consumer's own watermark query answers the last stable offset (read_committed);
    // a catch-up must also wait out the transactions open at the assignment.
    let log_ends: BaseConsumer = kafka.client_config().set("isolation.level", "read_uncommitted").create()?;
    let transactions = TransactionalProducer::new(kafka, &settings.transactional_id)?;
    info!(group = %settings.group_id, transactional_id = %settings.transactional_id,
          concurrency = settings.concurrency, batch_size = settings.batch_size, "driver started");

    for topic in &settings.topics {
        DEAD_LETTERS.with_label_values(&[settings.group_id.as_str(), topic.as_str()]); // from 0
    }
    // The letters of this group known before any record is read: which keys wait.
    let follower_stop = shutdown.child_token();
    let letters = LetterFollower::start(kafka, codec.clone(), &settings.group_id, follower_stop.clone()).await?;
    letters.sync().await?;
    let (commits, commit_queue) = mpsc::unbounded_channel::<Commit>();
    let committer = tokio::spawn(commit_loop(transactions, consumer.clone(), commit_queue));
    let lanes = settings.lanes.count();
    let mut driver = Driver {
        queues: (0..lanes).map(|_| LaneQueue::default()).collect(),
        stride: Stride::new(lanes),
        settings,
        processor,
        codec,
        assignments,
        ends,
        lag_shown: Instant::now(),
        consumer: consumer.clone(),
        log_ends: Arc::new(log_ends),
        partitions: HashMap::new(),
        last_commit: Instant::now(),
        assignments_made: 0,
        busy_keys: HashSet::new(),
        parked: HashMap::new(),
        letters,
        book: LetterBook::default(),
        holds: Holds::default(),
        held: HashMap::new(),
        lettered: HashSet::new(),
        running: JoinSet::new(),
        commits,
    };
    driver.take_letters();
    let outcome = Box::pin(driver.drive(&shutdown)).await;
    follower_stop.cancel();
    // Work not finished is not committed: it is redone by whoever gets its partition.
    driver.running.abort_all();
    driver.enqueue_commit(vec![], vec![]);
    drop(driver);
    let committed = committer.await.unwrap_or(Err(EventLogError::Kafka(KafkaError::Canceled)));
    info!("driver stopped");
    outcome.and(committed)
}

/// Partitions assigned or revoked since the driver last looked.
#[derive(Default)]
struct RebalanceLog {
    changes: Arc<Mutex<Vec<Change>>>,
    /// Each fetched partition's end, from librdkafka's statistics (every 5 s): the lag's.
    ends: Arc<Mutex<HashMap<PartitionKey, i64>>>,
}

enum Change {
    Assigned(Vec<(String, i32)>),
    Revoked(Vec<(String, i32)>),
}

fn partitions_of(list: &TopicPartitionList) -> Vec<(String, i32)> {
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

/// One partition's bookkeeping.
struct PartitionState<I> {
    /// Offsets read and not finished (held, parked, waiting or running).
    unfinished: BTreeMap<i64, Unfinished>,
    /// One past the highest offset read.
    read_up_to: Option<i64>,
    /// The offset last sent to be committed.
    committed: Option<i64>,
    /// Which assignment of the partition this is (units remember it).
    assignment: u64,
    /// While catching up: the partition's end as of the assignment (open transactions
    /// included), and the records held until the consumer's position reaches it.
    catch_up: Option<(i64, Vec<(OwnedMessage, I)>)>,
}

/// A record read and not finished: when it was written (ms), whether its work started, and
/// whether it is held back behind a dead letter of its key.
#[derive(Debug, Clone, Copy)]
struct Unfinished {
    written_ms: i64,
    started: bool,
    held: bool,
}

impl<I> Default for PartitionState<I> {
    fn default() -> Self {
        Self { unfinished: BTreeMap::new(), read_up_to: None, committed: None, assignment: 0, catch_up: None }
    }
}

impl<I> PartitionState<I> {
    /// The offset to commit: the first unfinished record, or one past the last read.
    fn commit_position(&self) -> Option<i64> {
        self.unfinished.first_key_value().map(|(offset, _)| *offset).or(self.read_up_to)
    }
}

type PartitionKey = (String, i32);

/// Outputs and offsets for the committer.
#[derive(Debug, Default)]
struct Commit {
    outgoing: Vec<Outgoing>,
    /// The partitions the outputs come from: while one of them is not assigned any more,
    /// the outputs are its new owner's to make.
    sources: Vec<PartitionKey>,
    offsets: BTreeMap<PartitionKey, i64>,
    /// Told once this commit and every one queued before it are done.
    flushed: Option<oneshot::Sender<()>>,
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

/// One lane's records ready to start, in log order.
struct LaneQueue<I> {
    ready: VecDeque<(OwnedMessage, I)>,
    /// Since when the oldest ready record has waited (a unit fills until `batch_wait`).
    since: Option<Instant>,
    /// Whether the lane's partitions are paused (its read-ahead is full).
    paused: bool,
}

impl<I> Default for LaneQueue<I> {
    fn default() -> Self {
        Self { ready: VecDeque::new(), since: None, paused: false }
    }
}

impl<I> LaneQueue<I> {
    fn push_back(&mut self, record: (OwnedMessage, I)) {
        self.since.get_or_insert_with(Instant::now);
        self.ready.push_back(record);
    }
}

/// A unit of work that finished.
struct Finished {
    /// Partition, its assignment, offset and key of each record of the unit.
    records: Vec<(PartitionKey, u64, i64, Option<Vec<u8>>)>,
    outgoing: Result<Vec<Outgoing>, EventLogError>,
}

struct Driver<P: Processor> {
    settings: DriverSettings,
    processor: Arc<P>,
    codec: Arc<EventCodec>,
    assignments: Arc<Mutex<Vec<Change>>>,
    consumer: Arc<StreamConsumer<RebalanceLog>>,
    /// Reads partition ends with open transactions counted (read_uncommitted).
    log_ends: Arc<BaseConsumer>,
    partitions: HashMap<PartitionKey, PartitionState<P::Item>>,
    /// When outputs or offsets were last sent to the committer.
    last_commit: Instant,
    /// Partition ends from librdkafka's statistics, and when the lag was last published.
    ends: Arc<Mutex<HashMap<PartitionKey, i64>>>,
    lag_shown: Instant,
    /// Partition assignments so far.
    assignments_made: u64,
    /// Keys with a record in flight, and the records of those keys waiting their turn.
    busy_keys: HashSet<Vec<u8>>,
    parked: HashMap<Vec<u8>, VecDeque<(OwnedMessage, P::Item)>>,
    /// This group's dead letters and decisions as they are written, folded; the keys they
    /// hold back, with those keys' records read meanwhile; the records lettered by this
    /// process until the follower hands their letters back.
    letters: LetterFollower,
    book: LetterBook,
    holds: Holds,
    held: HashMap<Vec<u8>, VecDeque<(OwnedMessage, P::Item)>>,
    lettered: HashSet<LogPosition>,
    /// Each lane's records ready to start.
    queues: Vec<LaneQueue<P::Item>>,
    /// Which lane gets the next free slot.
    stride: Stride,
    running: JoinSet<Finished>,
    commits: mpsc::UnboundedSender<Commit>,
}

impl<P: Processor> Driver<P> {
    async fn drive(&mut self, shutdown: &CancellationToken) -> Result<(), EventLogError> {
        loop {
            self.apply_rebalances().await?;
            self.start_ready();
            self.show_queue_age();
            self.show_lag();
            self.pause_full_lanes();
            let has_room = self.running.len() < self.settings.concurrency;
            // Read ahead while a lane has room.
            let can_read = self.queues.iter().any(|queue| queue.ready.len() < self.read_ahead());
            // A unit that is not full starts once its first record has waited `batch_wait`
            // (only in a lane that may start one now: else this would spin).
            let (running, lanes) = (self.running.len(), &self.settings.lanes);
            let fill_deadline = self
                .queues
                .iter()
                .enumerate()
                .filter(|(lane, _)| has_room && lanes.may_start(*lane, running, self.settings.concurrency))
                .filter_map(|(_, queue)| queue.since)
                .min()
                .map(|since| since + self.settings.batch_wait);
            tokio::select! {
                () = shutdown.cancelled() => return Ok(()),
                Some(finished) = self.running.join_next(), if !self.running.is_empty() => {
                    let finished = finished.map_err(|_| EventLogError::Kafka(KafkaError::Canceled))?;
                    if finished.outgoing.is_err() && shutdown.is_cancelled() {
                        return Ok(()); // interrupted by the shutdown: redone after the restart
                    }
                    self.finish(finished)?;
                }
                () = tokio::time::sleep_until(fill_deadline.unwrap_or_else(Instant::now).into()), if fill_deadline.is_some() => {}
                letter = self.letters.next() => match letter {
                    Some((id, record)) => self.take_letter(id, record),
                    None if shutdown.is_cancelled() => return Ok(()),
                    None => return Err(EventLogError::DeadLetter("the dead-letter follower stopped".into())),
                },
                received = tokio::time::timeout(IDLE, self.consumer.recv()), if can_read => match received {
                    Err(_idle) => {
                        self.enqueue_commit(vec![], vec![]); // offsets of records that were no work
                        if self.running.is_empty() {
                            self.processor.idle().await;
                        }
                    }
                    Ok(Ok(message)) => {
                        let message = message.detach();
                        self.read(message).await?;
                    }
                    Ok(Err(KafkaError::PartitionEOF(partition))) => self.reached_end_of(partition),
                    Ok(Err(error)) if is_fatal(&error) => return Err(error.into()),
                    Ok(Err(error)) => warn!(%error, "consumer error; continuing"),
                },
            }
        }
    }

    /// Takes note of assignments (catch-up ends) and revocations (forget the partition:
    /// its unfinished work is redone by its new owner, so its outputs are dropped).
    async fn apply_rebalances(&mut self) -> Result<(), EventLogError> {
        let changes = std::mem::take(&mut *self.assignments.lock().unwrap_or_else(PoisonError::into_inner));
        for change in changes {
            match change {
                Change::Assigned(partitions) => {
                    // Outputs made before the assignment (of a partition revoked and given
                    // back, say) are committed before the end is read, so the catch-up
                    // sees them rather than doing their work again; and every letter
                    // written so far (by the partition's last owner too) is known before
                    // its records are read again, so none is lettered twice.
                    self.flush_commits().await?;
                    self.letters.sync().await?;
                    self.take_letters();
                    // One round trip for all of them, not one after the other (each took
                    // ~0.5 s after a broker restart: 3 s before the sixth partition resumed).
                    let ends =
                        join_all(partitions.iter().map(|(topic, partition)| self.end_offset(topic, *partition))).await;
                    for ((topic, partition), end) in partitions.into_iter().zip(ends) {
                        let end = end?;
                        info!(%topic, partition, end, "partition assigned; catching up to its end before new work");
                        self.assignments_made += 1;
                        let state = PartitionState {
                            catch_up: Some((end, Vec::new())),
                            assignment: self.assignments_made,
                            ..PartitionState::default()
                        };
                        // A partition takes its lane's state: paused with it, and resumed
                        // otherwise (one paused when it was revoked may come back paused).
                        let lane = self.settings.lanes.of(&topic, partition);
                        if self.queues.len() > 1 {
                            self.pause_or_resume(&[(topic.clone(), partition)], self.queues[lane].paused);
                        }
                        self.partitions.insert((topic, partition), state);
                    }
                }
                Change::Revoked(partitions) => {
                    for key in partitions {
                        info!(topic = %key.0, partition = key.1, "partition revoked; its unfinished work is left to its new owner");
                        self.partitions.remove(&key);
                        let labels = [self.settings.group_id.as_str(), key.0.as_str(), &key.1.to_string()];
                        let _ = CONSUMER_LAG_SECONDS.remove_label_values(&labels);
                        let _ = CONSUMER_LAG_RECORDS.remove_label_values(&labels);
                        let lane = self.settings.lanes.of(&key.0, key.1);
                        let queue = &mut self.queues[lane];
                        queue.ready.retain(|(m, _)| (m.topic(), m.partition()) != (key.0.as_str(), key.1));
                        if queue.ready.is_empty() {
                            queue.since = None;
                        }
                        for queue in self.parked.values_mut().chain(self.held.values_mut()) {
                            queue.retain(|(m, _)| (m.topic(), m.partition()) != (key.0.as_str(), key.1));
                        }
                        self.held.retain(|_, queue| !queue.is_empty());
                    }
                }
            }
        }
        Ok(())
    }

    /// The partition's high watermark: one past its last record, committed or not.
    async fn end_offset(&self, topic: &str, partition: i32) -> Result<i64, EventLogError> {
        let (log_ends, topic) = (self.log_ends.clone(), topic.to_owned());
        let watermarks = blocking_query(move || log_ends.fetch_watermarks(&topic, partition, Duration::from_secs(30)));
        Ok(watermarks.await?.1)
    }

    /// Waits until the committer has done every commit queued so far.
    async fn flush_commits(&mut self) -> Result<(), EventLogError> {
        let (flushed, done) = oneshot::channel();
        let _ = self.commits.send(Commit { flushed: Some(flushed), ..Commit::default() });
        // Dropped unsent: the committer stopped on an error, which the driver gets at its end.
        done.await.map_err(|_| EventLogError::Kafka(KafkaError::Canceled))
    }

    /// Decodes a record read from the log and files it: dead letter, nothing to do, held
    /// back behind a dead letter of its key, held while catching up, or ready.
    async fn read(&mut self, message: OwnedMessage) -> Result<(), EventLogError> {
        // A rebalance callback runs inside the poll that returned this record.
        self.apply_rebalances().await?;
        let key = (message.topic().to_owned(), message.partition());
        let offset = message.offset();
        // A copy redriven for another group: this one did the original (it passes it by).
        let foreign_copy = redriven_for(&message).is_some_and(|group| group != self.settings.group_id);
        let decoded = if foreign_copy {
            None
        } else {
            let Some(decoded) = self.processor.decode(&message).await else {
                return Ok(()); // shutting down: the record is read again after the restart
            };
            Some(decoded)
        };
        let state = self.partitions.entry(key.clone()).or_default();
        state.read_up_to = Some(state.read_up_to.map_or(offset + 1, |r| r.max(offset + 1)));
        let catch_up_end = state.catch_up.as_ref().map(|(end, _)| *end);
        let catching_up = catch_up_end.is_some_and(|end| offset < end);
        // A redriven copy awaited here (or earlier in the partition: done before) frees its
        // key; the copy itself goes before the records the key held.
        let position = LogPosition { topic: key.0.clone(), partition: key.1, offset };
        let mut copy_of = None;
        for released in self.holds.read_at(&position) {
            if released.by_copy {
                copy_of = Some(released.key);
            } else {
                self.release_held(&released.key);
            }
        }
        let record_key = message.key().unwrap_or_default().to_vec();
        match decoded {
            None => {}
            Some(Err(error)) => self.dead_letter(&message, position, &error.to_string()).await?,
            Some(Ok(item)) => {
                self.processor.observe(&item, catching_up);
                if self.processor.wants(&item) {
                    let held = self.holds.is_held(&record_key);
                    let written_ms = message.timestamp().to_millis().unwrap_or_else(now_millis);
                    let state = self.partitions.entry(key.clone()).or_default();
                    state.unfinished.insert(offset, Unfinished { written_ms, started: false, held });
                    if held {
                        self.held.entry(record_key.clone()).or_default().push_back((message, item));
                    } else {
                        self.schedule((message, item));
                    }
                } else if self.last_commit.elapsed() >= IDLE {
                    // Records that are no work ride with the next commit; under a steady
                    // stream of them, their offsets still advance every IDLE.
                    self.enqueue_commit(vec![], vec![]);
                }
                if copy_of.is_some() {
                    self.release_held(&record_key);
                }
            }
        }
        if catch_up_end.is_some_and(|end| offset + 1 >= end) {
            self.release_caught_up(&key);
        }
        Ok(())
    }

    /// An undecodable record: lettered (unless a letter of it is known: a record read again
    /// after a restart), and its key held back until the letter is settled.
    async fn dead_letter(
        &mut self,
        message: &OwnedMessage,
        position: LogPosition,
        error: &str,
    ) -> Result<(), EventLogError> {
        let group = self.settings.group_id.as_str();
        if let Some(entry) = self.book.find(group, &position) {
            info!(%position, letter = %entry.id, status = entry.status.as_str(), "undecodable record lettered before; not lettered again");
            return Ok(());
        }
        if !self.lettered.insert(position.clone()) {
            return Ok(());
        }
        warn!(%position, %error, "undecodable record sent to the dead-letter topic; its key is held back until the letter is redriven or discarded");
        if let Some(record_key) = message.key().filter(|k| !k.is_empty()) {
            self.holds.hold(record_key.to_vec(), position);
        }
        let letter = dead_letter_for(message, group, error);
        DEAD_LETTERS.with_label_values(&[group, message.topic()]).inc();
        let outgoing = Outgoing {
            topic: self.settings.dead_letter_topic.clone(),
            key: String::from_utf8_lossy(message.key().unwrap_or_default()).into_owned(),
            payload: self.codec.encode(&letter).await?,
            traceparent: None,
        };
        self.enqueue_commit(vec![outgoing], vec![(message.topic().to_owned(), message.partition())]);
        Ok(())
    }

    /// A record that may start: held with its partition's catch-up, or into its lane.
    fn schedule(&mut self, record: (OwnedMessage, P::Item)) {
        let partition = (record.0.topic().to_owned(), record.0.partition());
        let offset = record.0.offset();
        if let Some(state) = self.partitions.get_mut(&partition) {
            if let Some(unfinished) = state.unfinished.get_mut(&offset) {
                unfinished.held = false;
            }
            if let Some((end, held)) = state.catch_up.as_mut()
                && offset < *end
            {
                held.push(record);
                return;
            }
        }
        let lane = self.settings.lanes.of(&partition.0, partition.1);
        self.queues[lane].push_back(record);
    }

    /// Letters and decisions the follower handed out meanwhile.
    fn take_letters(&mut self) {
        while let Some((id, record)) = self.letters.try_next() {
            self.take_letter(id, record);
        }
    }

    /// A letter or decision of this group: held keys change, and a key set free lets the
    /// records it held go on (after its redriven copy, if that was read already).
    fn take_letter(&mut self, id: LetterId, record: DeadLetterRecord) {
        let source = match &record {
            DeadLetterRecord::Letter(letter) => letter.source(),
            DeadLetterRecord::Resolved(resolution) => resolution.source(),
        };
        self.book.apply(id, record);
        // The book knows it now: this process's own note of it is no longer needed.
        self.lettered.remove(&source);
        let group = self.settings.group_id.clone();
        let settled: Vec<_> = self
            .book
            .entries()
            .iter()
            .filter(|entry| entry.letter.consumer == group && entry.letter.source() == source)
            .cloned()
            .collect();
        for entry in settled {
            self.holds.apply(&entry);
            if let Some(copy) = entry.status.copy() {
                info!(letter = %entry.id, %copy, "dead letter redriven; its key waits for the copy");
                for released in self.copy_read_already(copy) {
                    self.release_held(&released);
                }
            }
            if let Some(record_key) = entry.letter.key.as_deref()
                && !self.holds.is_held(record_key)
                && self.held.contains_key(record_key)
            {
                info!(letter = %entry.id, status = entry.status.as_str(), "dead letter settled; its key's held records go on");
                self.release_held(record_key);
            }
        }
    }

    /// A redriven copy this driver read before it learnt of the redrive is seen: it goes
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
            let queue = self.held.get_mut(key);
            let at = |(m, _): &(OwnedMessage, P::Item)| {
                (m.topic(), m.partition(), m.offset()) == (copy.topic.as_str(), copy.partition, copy.offset)
            };
            if let Some(queue) = queue
                && let Some(index) = queue.iter().position(at)
                && let Some(record) = queue.remove(index)
            {
                queue.push_front(record);
            }
        }
        released.into_iter().map(|released| released.key).collect()
    }

    /// Lets the records a free key held go on, in log order.
    fn release_held(&mut self, record_key: &[u8]) {
        if self.holds.is_held(record_key) {
            return;
        }
        for record in self.held.remove(record_key).unwrap_or_default() {
            self.schedule(record);
        }
    }

    /// The consumer reached the partition's last stable offset: the catch-up is over if
    /// that is past the end as of the assignment (else a transaction open then still
    /// holds the rest back, and its records or markers come first).
    fn reached_end_of(&mut self, partition: i32) {
        let positions = self.consumer.position().map(|list| {
            list.elements()
                .iter()
                .filter_map(|e| {
                    e.offset()
                        .to_raw()
                        .filter(|offset| *offset >= 0)
                        .map(|offset| ((e.topic().to_owned(), e.partition()), offset))
                })
                .collect::<HashMap<_, _>>()
        });
        let positions = positions.unwrap_or_else(|error| {
            warn!(%error, "reading the consumer's position failed; the catch-up waits for the next record");
            HashMap::new()
        });
        let caught_up: Vec<PartitionKey> = self
            .partitions
            .iter()
            .filter(|(key, state)| {
                key.1 == partition
                    && state
                        .catch_up
                        .as_ref()
                        .is_some_and(|(end, _)| positions.get(*key).is_some_and(|position| position >= end))
            })
            .map(|(key, _)| key.clone())
            .collect();
        for key in caught_up {
            self.release_caught_up(&key);
        }
    }

    /// The partition is read up to its end as of the assignment: its held records start.
    fn release_caught_up(&mut self, key: &PartitionKey) {
        let Some(state) = self.partitions.get_mut(key) else { return };
        let Some((_, held)) = state.catch_up.take() else { return };
        let lane = self.settings.lanes.of(&key.0, key.1);
        for record in held {
            self.queues[lane].push_back(record);
        }
    }

    /// Publishes, per lane, the write time of the oldest record waiting (ready, or parked
    /// behind its key): the fronts are the oldest of each queue.
    fn show_queue_age(&self) {
        let lanes = &self.settings.lanes;
        let lane_of = |message: &OwnedMessage| lanes.of(message.topic(), message.partition());
        for (lane, queue) in self.queues.iter().enumerate() {
            let parked = self.parked.values().filter_map(VecDeque::front).filter(|(m, _)| lane_of(m) == lane);
            let oldest = queue.ready.iter().chain(parked).filter_map(|(m, _)| m.timestamp().to_millis()).min();
            self.settings.queue.set_oldest(lane, oldest);
        }
    }

    /// Publishes, per owned partition, the consumer lag: records from the first not finished
    /// (or the consumer's position, past transaction markers, when all are) to the end, and
    /// the age of the oldest record read and waiting to start (a record in the works is not
    /// late: a long answer is not lag).
    fn show_lag(&mut self) {
        if self.lag_shown.elapsed() < LAG_EVERY {
            return;
        }
        self.lag_shown = Instant::now();
        let positions: HashMap<PartitionKey, i64> = self.consumer.position().map_or_else(
            |_| HashMap::new(),
            |list| {
                let valid = |e: &rdkafka::topic_partition_list::TopicPartitionListElem<'_>| {
                    e.offset().to_raw().filter(|o| *o >= 0).map(|o| ((e.topic().to_owned(), e.partition()), o))
                };
                list.elements().iter().filter_map(valid).collect()
            },
        );
        let ends = self.ends.lock().unwrap_or_else(PoisonError::into_inner).clone();
        let group = [self.settings.group_id.as_str()];
        HELD_RECORDS.with_label_values(&group).set(self.held.values().map(VecDeque::len).sum::<usize>() as i64);
        HELD_KEYS.with_label_values(&group).set(self.holds.held_keys() as i64);
        let now = now_millis();
        for (key, state) in &self.partitions {
            let labels = [self.settings.group_id.as_str(), key.0.as_str(), &key.1.to_string()];
            // Records held back behind a dead letter are not lag: they wait for an operator
            // (parley_dead_letter_held_records counts them).
            let waiting = state.unfinished.values().filter(|u| !u.started && !u.held).map(|u| u.written_ms).min();
            let oldest = waiting.map_or(0.0, |written| (now - written).max(0) as f64 / 1000.0);
            CONSUMER_LAG_SECONDS.with_label_values(&labels).set(oldest);
            let first_not_held = state.unfinished.iter().find(|(_, u)| !u.held).map(|(offset, _)| *offset);
            let done_up_to = first_not_held.or_else(|| positions.get(key).copied());
            if let (Some(end), Some(at)) = (ends.get(key), done_up_to) {
                CONSUMER_LAG_RECORDS.with_label_values(&labels).set((end - at).max(0));
            }
        }
    }

    /// Records a lane reads ahead: a unit, or one per slot (so a resumed lane refills in
    /// one fetch rather than one round trip per record).
    fn read_ahead(&self) -> usize {
        self.settings.batch_size.max(self.settings.concurrency)
    }

    /// With several lanes, pauses the partitions of a lane whose read-ahead is full (the
    /// rest waits in Kafka, and the consumer keeps fetching the other lanes), and resumes
    /// them once it is half empty. With one lane, not reading is enough.
    fn pause_full_lanes(&mut self) {
        if self.queues.len() < 2 {
            return;
        }
        let read_ahead = self.read_ahead();
        for lane in 0..self.queues.len() {
            let waiting = self.queues[lane].ready.len();
            let full = if self.queues[lane].paused { waiting > read_ahead / 2 } else { waiting >= read_ahead };
            if full == self.queues[lane].paused {
                continue;
            }
            let partitions: Vec<PartitionKey> = self
                .partitions
                .keys()
                .filter(|(topic, partition)| self.settings.lanes.of(topic, *partition) == lane)
                .cloned()
                .collect();
            self.pause_or_resume(&partitions, full);
            self.queues[lane].paused = full;
        }
    }

    fn pause_or_resume(&self, partitions: &[PartitionKey], pause: bool) {
        let mut list = TopicPartitionList::new();
        for (topic, partition) in partitions {
            list.add_partition(topic, *partition);
        }
        let done = if pause { self.consumer.pause(&list) } else { self.consumer.resume(&list) };
        if let Err(error) = done {
            // Not fatal: a lane not paused only reads ahead more than it needs.
            warn!(%error, pause, "pausing or resuming a lane's partitions failed");
        }
    }

    /// Starts ready records while slots are free, the next unit from the lane the weights
    /// choose among those that may start one: full, or its first record has waited
    /// `batch_wait`. With `one_per_key`, a record whose key is busy is parked behind the
    /// one in flight.
    fn start_ready(&mut self) {
        while self.running.len() < self.settings.concurrency {
            let (running, concurrency) = (self.running.len(), self.settings.concurrency);
            let (batch_size, batch_wait) = (self.settings.batch_size, self.settings.batch_wait);
            let (queues, lanes) = (&self.queues, &self.settings.lanes);
            let startable = |lane: usize| {
                let queue = &queues[lane];
                let due = queue.ready.len() >= batch_size || queue.since.is_none_or(|s| s.elapsed() >= batch_wait);
                !queue.ready.is_empty() && due && lanes.may_start(lane, running, concurrency)
            };
            let Some(lane) = self.stride.pick(lanes, startable) else { return };
            let mut unit = Vec::new();
            while unit.len() < batch_size {
                let Some((message, item)) = self.queues[lane].ready.pop_front() else { break };
                if self.settings.one_per_key {
                    let key = message.key().unwrap_or_default().to_vec();
                    if !self.busy_keys.insert(key.clone()) {
                        self.parked.entry(key).or_default().push_back((message, item));
                        continue;
                    }
                }
                unit.push((message, item));
            }
            let queue = &mut self.queues[lane];
            queue.since = (!queue.ready.is_empty()).then(Instant::now);
            if unit.is_empty() {
                continue;
            }
            let records = unit
                .iter()
                .map(|(m, _)| {
                    let partition = (m.topic().to_owned(), m.partition());
                    let state = self.partitions.get_mut(&partition);
                    let assignment = state.map_or(0, |state| {
                        if let Some(record) = state.unfinished.get_mut(&m.offset()) {
                            record.started = true;
                        }
                        state.assignment
                    });
                    (partition, assignment, m.offset(), m.key().map(<[u8]>::to_vec))
                })
                .collect();
            let processor = self.processor.clone();
            self.running.spawn(async move {
                let outgoing = processor.process(unit).await.map_err(|e| EventLogError::Processor(Box::new(e)));
                Finished { records, outgoing }
            });
        }
    }

    /// A unit finished: its records are done, its outputs go to the next commit (unless
    /// its partition was revoked meanwhile), and parked records of its keys may start.
    fn finish(&mut self, finished: Finished) -> Result<(), EventLogError> {
        let outgoing = finished.outgoing?;
        let mut revoked = false;
        let mut sources = Vec::new();
        for (partition, assignment, offset, key) in finished.records {
            sources.push(partition.clone());
            // Revoked meanwhile (and perhaps assigned again: then the record was read anew
            // and is that assignment's to finish).
            match self.partitions.get_mut(&partition).filter(|state| state.assignment == assignment) {
                Some(state) => {
                    state.unfinished.remove(&offset);
                }
                None => revoked = true,
            }
            if let Some(key) = key.filter(|_| self.settings.one_per_key) {
                self.busy_keys.remove(&key);
                if let Some(queue) = self.parked.get_mut(&key) {
                    if let Some(next) = queue.pop_front() {
                        let lane = self.settings.lanes.of(next.0.topic(), next.0.partition());
                        let lane = &mut self.queues[lane];
                        lane.since.get_or_insert_with(Instant::now);
                        lane.ready.push_front(next);
                    }
                    if queue.is_empty() {
                        self.parked.remove(&key);
                    }
                }
            }
        }
        if revoked {
            warn!("a unit of a revoked partition finished; its outputs are left to the partition's new owner");
            return Ok(());
        }
        sources.sort_unstable();
        sources.dedup();
        self.enqueue_commit(outgoing, sources);
        Ok(())
    }

    /// Sends outputs and every partition's advanced commit position to the committer.
    fn enqueue_commit(&mut self, outgoing: Vec<Outgoing>, sources: Vec<PartitionKey>) {
        let mut offsets = BTreeMap::new();
        for (key, state) in &mut self.partitions {
            if let Some(position) = state.commit_position()
                && state.committed.is_none_or(|c| c < position)
            {
                state.committed = Some(position);
                offsets.insert(key.clone(), position);
            }
        }
        if outgoing.is_empty() && offsets.is_empty() {
            return;
        }
        self.last_commit = Instant::now();
        // The committer only stops after the driver: a send cannot fail while it runs.
        let _ = self.commits.send(Commit { outgoing, sources, offsets, flushed: None });
    }
}

/// Commits what the driver sends, grouping everything queued while the previous
/// transaction ran into the next one.
async fn commit_loop(
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
