//! Rebuilding a projection after its code changed: a new generation is filled from offset
//! 0 while the live one keeps serving; once every partition has been read to its end, one
//! row switches readers (and the live projector) to it. The old generation stays until it
//! is dropped on purpose.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use parley_eventlog::KafkaSettings;
use parley_eventlog::consumer::{LogConsumer, partitions};
use parley_events::EventCodec;
use rdkafka::Message;
use rdkafka::consumer::Consumer;
use rdkafka::error::KafkaError;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::error::ProjectionError;
use crate::projector::{LoggedEvent, Projector, decode};
use crate::store::{CONTEXT, Store};

/// Records applied per batch: a batch writes each conversation's rows together, so the
/// larger it is, the more of a conversation's events (which the log interleaves with
/// others') share one write.
const BATCH: usize = 5_000;

/// What a rebuild did.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RebuildReport {
    /// The generation built.
    pub generation: i32,
    /// The generation it replaced.
    pub previous: i32,
    /// Records applied.
    pub records: u64,
    /// Records passed by because they did not decode (each logged with its position).
    pub undecodable: u64,
    /// How long it took.
    pub elapsed: Duration,
}

impl RebuildReport {
    /// The rebuild's speed.
    pub fn records_per_second(&self) -> f64 {
        self.records as f64 / self.elapsed.as_secs_f64().max(f64::EPSILON)
    }
}

/// Progress of a rebuild: records read so far and the records the log held at the start.
pub type Progress<'a> = &'a mut dyn FnMut(u64, u64, Duration);

/// Rebuilds the context projection into a new generation and makes it live.
pub async fn rebuild_context(
    kafka: &KafkaSettings,
    registry_url: &str,
    store: &Store,
    shutdown: &CancellationToken,
    progress: Progress<'_>,
) -> Result<RebuildReport, ProjectionError> {
    let codec = EventCodec::new(registry_url)?;
    let topic = kafka.topics().events;
    let (live, previous, building) = store.generations(CONTEXT).await?;
    let generation = live.max(previous.unwrap_or(0)).max(building.unwrap_or(0)) + 1;
    store.set_building(CONTEXT, Some(generation)).await?;
    let mut projector = Projector::for_new_generation(store.clone(), generation, &topic).await?;
    let consumer = projector.consumer(kafka, true).await?;

    let partitions = partitions(&consumer, &topic)?;
    let mut total = 0u64;
    for partition in &partitions {
        let (low, high) = consumer.fetch_watermarks(&topic, *partition, Duration::from_secs(30))?;
        total += u64::try_from(high - low).unwrap_or(0);
    }

    let started = Instant::now();
    // Reading and decoding the next batch overlap with writing the last one.
    let counts = Arc::new(Counts::default());
    let (batches, mut ready) = mpsc::channel(2);
    let reading =
        tokio::spawn(read_batches(consumer, codec, partitions.len(), batches, shutdown.clone(), counts.clone()));
    let mut last_report = Instant::now();
    loop {
        let batch = tokio::select! {
            () = shutdown.cancelled() => return Err(ProjectionError::Interrupted { generation }),
            batch = ready.recv() => batch,
        };
        let Some(batch) = batch else { break };
        projector.apply_batch(batch).await?;
        if last_report.elapsed() >= Duration::from_millis(200) {
            progress(counts.read.load(Ordering::Relaxed), total, started.elapsed());
            last_report = Instant::now();
        }
    }
    if !reading.await.unwrap_or(false) {
        return Err(ProjectionError::Interrupted { generation });
    }
    let records = counts.read.load(Ordering::Relaxed);
    progress(records, total.max(records), started.elapsed());
    store.switch_live(CONTEXT, generation, live).await?;
    let undecodable = counts.undecodable.load(Ordering::Relaxed);
    Ok(RebuildReport { generation, previous: live, records, undecodable, elapsed: started.elapsed() })
}

/// Records a rebuild's reader has read, and passed by as undecodable.
#[derive(Debug, Default)]
struct Counts {
    read: AtomicU64,
    undecodable: AtomicU64,
}

/// Reads every partition to its end, decoding records into batches of [`BATCH`] for the
/// writer. False when stopped before the end (shutdown, or the writer gave up).
async fn read_batches(
    consumer: LogConsumer,
    codec: EventCodec,
    partitions: usize,
    batches: mpsc::Sender<Vec<LoggedEvent>>,
    shutdown: CancellationToken,
    counts: Arc<Counts>,
) -> bool {
    let mut at_end = HashSet::new();
    let mut batch: Vec<LoggedEvent> = Vec::with_capacity(BATCH);
    while at_end.len() < partitions {
        let received = tokio::select! {
            () = shutdown.cancelled() => return false,
            received = consumer.recv() => received,
        };
        match received {
            Ok(message) => {
                at_end.remove(&message.partition());
                counts.read.fetch_add(1, Ordering::Relaxed);
                match decode(&codec, &message.detach(), &shutdown).await {
                    None => return false,
                    Some(None) => {
                        counts.undecodable.fetch_add(1, Ordering::Relaxed);
                    }
                    Some(Some(logged)) => batch.push(logged),
                }
            }
            Err(KafkaError::PartitionEOF(partition)) => {
                at_end.insert(partition);
            }
            Err(error) => warn!(%error, "rebuild consumer error"),
        }
        let done = at_end.len() == partitions;
        if (batch.len() >= BATCH || (done && !batch.is_empty()))
            && batches.send(std::mem::take(&mut batch)).await.is_err()
        {
            return false;
        }
    }
    true
}

/// Drops the generation a rebuild replaced, once nobody needs it.
pub async fn drop_previous(store: &Store) -> Result<Option<i32>, ProjectionError> {
    let (live, previous, building) = store.generations(CONTEXT).await?;
    let Some(previous) = previous.filter(|p| *p != live && Some(*p) != building) else { return Ok(None) };
    store.drop_generation(previous).await?;
    store.clear_previous(CONTEXT).await?;
    Ok(Some(previous))
}
