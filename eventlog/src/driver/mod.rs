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
//!   to a unit or 16 records per slot, and its partitions are paused while that is full,
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
//!
//! Every decision above is `schedule::Scheduler`'s, a state machine without I/O with
//! its own tests; this module is the consumer, the tasks and the committer around it.
//!
//! - **Fatal**: a processor error, an unusable consumer, or a transaction that fails
//!   [`COMMIT_ATTEMPTS`] times in a row stops the driver with the error (the process
//!   exits and is restarted; nothing is committed past unfinished work, so nothing is lost).

mod commit;
mod handler;
mod letters;
mod processor;
mod queue_age;
mod rebalance;
mod schedule;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use futures::future::join_all;
use parley_events::EventCodec;
use parley_events::dead_letters::LetterBook;
use parley_events::event::now_millis;
use rdkafka::consumer::{BaseConsumer, Consumer, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::message::OwnedMessage;
use rdkafka::{Message, TopicPartitionList};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

pub use self::commit::COMMIT_ATTEMPTS;
use self::commit::{Commit, commit_loop};
pub use self::handler::EventHandler;
pub use self::processor::{Decoded, Processor};
pub use self::queue_age::QueueAge;
use self::rebalance::{Change, RebalanceLog};
use self::schedule::{PartitionKey, Read, Rules, Scheduler, Ticket};
use crate::LogPosition;
use crate::consumer::{blocking_query, is_fatal, reader_config};
use crate::dead_letter::{LetterFollower, redriven_for};
use crate::error::EventLogError;
use crate::lanes::Lanes;
use crate::metrics::{
    CONSUMER_LAG_RECORDS, CONSUMER_LAG_SECONDS, DEAD_LETTERS, HELD_KEYS, HELD_RECORDS, STATISTICS_INTERVAL_MS,
};
use crate::settings::KafkaSettings;
use crate::transaction::{Outgoing, TransactionalProducer, instance_transactional_id};

/// How often the consumer lag metrics are updated.
const LAG_EVERY: Duration = Duration::from_secs(1);

/// How long [`Processor::idle`] may take before the driver goes back to the log.
const IDLE_WORK: Duration = Duration::from_secs(10);

/// How long the consumer may sit idle before [`Processor::idle`] runs.
const IDLE: Duration = Duration::from_secs(1);

/// How a driver consumes and schedules.
#[derive(Debug, Clone)]
pub struct DriverSettings {
    /// The consumer group (one per service).
    pub group_id: String,
    /// This instance's transactional id ([`crate::transaction::instance_transactional_id`]).
    pub transactional_id: String,
    /// The topics read.
    pub topics: Vec<String>,
    /// Where undecodable records go.
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

impl DriverSettings {
    /// Group `group_id` over `topics` with what a simple consumer wants: one record per
    /// unit, one unit at a time, one lane, this instance's transactional id and the
    /// dead-letter topic of `kafka`'s prefix. Change fields to scale out.
    pub fn new(kafka: &KafkaSettings, group_id: &str, topics: Vec<String>) -> Self {
        let lanes = Lanes::single();
        Self {
            group_id: group_id.to_owned(),
            transactional_id: instance_transactional_id(group_id, None, kafka.instance_id.as_deref()),
            topics,
            dead_letter_topic: kafka.topics().dead_letter,
            batch_size: 1,
            batch_wait: Duration::ZERO,
            concurrency: 1,
            one_per_key: true,
            queue: QueueAge::new(&lanes),
            lanes,
        }
    }
}

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
    let scheduler = Scheduler::new(Rules {
        batch_size: settings.batch_size.max(1),
        batch_wait: settings.batch_wait,
        concurrency: settings.concurrency.max(1),
        one_per_key: settings.one_per_key,
        lanes: settings.lanes.clone(),
    });
    let mut driver = Driver {
        scheduler,
        settings,
        processor,
        codec,
        assignments,
        ends,
        lag_shown: Instant::now(),
        consumer: consumer.clone(),
        log_ends: Arc::new(log_ends),
        last_commit: Instant::now(),
        letters,
        book: LetterBook::default(),
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

/// A unit of work that finished.
struct Finished {
    tickets: Vec<Ticket>,
    outgoing: Result<Vec<Outgoing>, EventLogError>,
}

/// The I/O around the scheduler: the consumer, the units' tasks, the dead-letter follower
/// and the committer.
struct Driver<P: Processor> {
    scheduler: Scheduler<(OwnedMessage, P::Item)>,
    settings: DriverSettings,
    processor: Arc<P>,
    codec: Arc<EventCodec>,
    assignments: Arc<Mutex<Vec<Change>>>,
    consumer: Arc<StreamConsumer<RebalanceLog>>,
    /// Reads partition ends with open transactions counted (read_uncommitted).
    log_ends: Arc<BaseConsumer>,
    /// When outputs or offsets were last sent to the committer.
    last_commit: Instant,
    /// Partition ends from librdkafka's statistics, and when the lag was last published.
    ends: Arc<Mutex<HashMap<PartitionKey, i64>>>,
    lag_shown: Instant,
    /// This group's dead letters and decisions as they are written, folded; the records
    /// lettered by this process until the follower hands their letters back.
    letters: LetterFollower,
    book: LetterBook,
    lettered: HashSet<LogPosition>,
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
            for (partitions, pause) in self.scheduler.pauses() {
                self.pause_or_resume(&partitions, pause);
            }
            let can_read = self.scheduler.can_read();
            let fill_deadline = self.scheduler.fill_deadline();
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
                    None => return Err(EventLogError::FollowerStopped),
                },
                received = tokio::time::timeout(IDLE, self.consumer.recv()), if can_read => match received {
                    Err(_idle) => {
                        self.enqueue_commit(vec![], vec![]); // offsets of records that were no work
                        // Bounded: idle work (a vector store's flush, say) that does not answer
                        // must not stop the consumption of records.
                        if self.running.is_empty()
                            && tokio::time::timeout(IDLE_WORK, self.processor.idle()).await.is_err()
                        {
                            warn!(after = ?IDLE_WORK, "the processor's idle work did not finish; it runs again at the next idle");
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
                        let key = (topic, partition);
                        // A partition takes its lane's state: paused with it, and resumed
                        // otherwise (one paused when it was revoked may come back paused).
                        if let Some(paused) = self.scheduler.assign(key.clone(), end) {
                            self.pause_or_resume(&[key], paused);
                        }
                    }
                }
                Change::Revoked(partitions) => {
                    for key in partitions {
                        info!(topic = %key.0, partition = key.1, "partition revoked; its unfinished work is left to its new owner");
                        self.scheduler.revoke(&key);
                        let labels = [self.settings.group_id.as_str(), key.0.as_str(), &key.1.to_string()];
                        let _ = CONSUMER_LAG_SECONDS.remove_label_values(&labels);
                        let _ = CONSUMER_LAG_RECORDS.remove_label_values(&labels);
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

    /// Decodes a record read from the log and hands it to the scheduler: work, no work, or
    /// a dead letter.
    async fn read(&mut self, message: OwnedMessage) -> Result<(), EventLogError> {
        // A rebalance callback runs inside the poll that returned this record.
        self.apply_rebalances().await?;
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
        let position =
            LogPosition { topic: message.topic().to_owned(), partition: message.partition(), offset: message.offset() };
        let key = message.key().unwrap_or_default().to_vec();
        // What to commit once the scheduler knows the record (its offset then counts): a
        // dead letter with it, or, for a record that is no work, the offsets every IDLE
        // under a steady stream of such records (else they ride with the next commit).
        let (mut letter, mut commit_offsets) = (None, false);
        let read = match decoded {
            None => Read::Done,
            Some(Err(error)) => match self.dead_letter(&message, &position, &error.to_string()).await? {
                Some(outgoing) => {
                    letter = Some(outgoing);
                    Read::Lettered
                }
                None => Read::Done,
            },
            Some(Ok(item)) => {
                self.processor.observe(&item, self.scheduler.catching_up(&position));
                if self.processor.wants(&item) {
                    let written_ms = message.timestamp().to_millis().unwrap_or_else(now_millis);
                    Read::Work { written_ms, record: (message, item) }
                } else {
                    commit_offsets = self.last_commit.elapsed() >= IDLE;
                    Read::Done
                }
            }
        };
        self.scheduler.read(&position, &key, read, Instant::now());
        if let Some(letter) = letter {
            self.enqueue_commit(vec![letter], vec![(position.topic, position.partition)]);
        } else if commit_offsets {
            self.enqueue_commit(vec![], vec![]);
        }
        Ok(())
    }

    /// The consumer reached a partition's last stable offset: the catch-ups it ends.
    fn reached_end_of(&mut self, partition: i32) {
        let positions = self.consumer.position().map(|list| positions_in(&list)).unwrap_or_else(|error| {
            warn!(%error, "reading the consumer's position failed; the catch-up waits for the next record");
            HashMap::new()
        });
        self.scheduler.reached_end(partition, &positions, Instant::now());
    }

    /// Publishes, per lane, the write time of the oldest record waiting to start.
    fn show_queue_age(&self) {
        for (lane, oldest) in self.scheduler.oldest_waiting().into_iter().enumerate() {
            self.settings.queue.set_oldest(lane, oldest);
        }
    }

    /// Publishes, per owned partition, the consumer lag: records from the first not finished
    /// (or the consumer's position, past transaction markers, when all are) to the end, and
    /// the age of the oldest record read and waiting to start (a record in the works is not
    /// late: a long answer is not lag; one held behind a dead letter waits for an operator,
    /// and parley_dead_letter_held_records counts it).
    fn show_lag(&mut self) {
        if self.lag_shown.elapsed() < LAG_EVERY {
            return;
        }
        self.lag_shown = Instant::now();
        let positions = self.consumer.position().map(|list| positions_in(&list)).unwrap_or_default();
        let ends = self.ends.lock().unwrap_or_else(PoisonError::into_inner).clone();
        let group = [self.settings.group_id.as_str()];
        let (held_records, held_keys) = self.scheduler.held();
        HELD_RECORDS.with_label_values(&group).set(held_records as i64);
        HELD_KEYS.with_label_values(&group).set(held_keys as i64);
        let now = now_millis();
        for (key, backlog) in self.scheduler.backlogs() {
            let labels = [self.settings.group_id.as_str(), key.0.as_str(), &key.1.to_string()];
            let oldest = backlog.oldest_waiting_ms.map_or(0.0, |written| (now - written).max(0) as f64 / 1000.0);
            CONSUMER_LAG_SECONDS.with_label_values(&labels).set(oldest);
            let done_up_to = backlog.first_not_held.or_else(|| positions.get(key).copied());
            if let (Some(end), Some(at)) = (ends.get(key), done_up_to) {
                CONSUMER_LAG_RECORDS.with_label_values(&labels).set((end - at).max(0));
            }
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

    /// Starts the units the scheduler lets start, each on its own task.
    fn start_ready(&mut self) {
        while let Some(unit) = self.scheduler.next_unit(Instant::now()) {
            let (processor, tickets) = (self.processor.clone(), unit.tickets);
            let records = unit.records;
            self.running.spawn(async move {
                let outgoing = processor.process(records).await.map_err(|e| EventLogError::Processor(Box::new(e)));
                Finished { tickets, outgoing }
            });
        }
    }

    /// A unit finished: its outputs go to the next commit, unless its partition was revoked
    /// meanwhile.
    fn finish(&mut self, finished: Finished) -> Result<(), EventLogError> {
        let outgoing = finished.outgoing?;
        match self.scheduler.finish(finished.tickets, Instant::now()) {
            Some(sources) => self.enqueue_commit(outgoing, sources),
            None => warn!("a unit of a revoked partition finished; its outputs are left to the partition's new owner"),
        }
        Ok(())
    }

    /// Sends outputs and every partition's advanced commit position to the committer.
    fn enqueue_commit(&mut self, outgoing: Vec<Outgoing>, sources: Vec<PartitionKey>) {
        let offsets = self.scheduler.commit_offsets();
        if outgoing.is_empty() && offsets.is_empty() {
            return;
        }
        self.last_commit = Instant::now();
        // The committer only stops after the driver: a send cannot fail while it runs.
        let _ = self.commits.send(Commit { outgoing, sources, offsets, flushed: None });
    }
}

/// The consumer's valid positions, per partition.
fn positions_in(list: &TopicPartitionList) -> HashMap<PartitionKey, i64> {
    let valid = |e: rdkafka::topic_partition_list::TopicPartitionListElem<'_>| {
        e.offset().to_raw().filter(|offset| *offset >= 0).map(|offset| ((e.topic().to_owned(), e.partition()), offset))
    };
    list.elements().into_iter().filter_map(valid).collect()
}
