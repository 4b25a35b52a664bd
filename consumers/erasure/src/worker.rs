//! The erasure worker: one consumer of the erasures topic (one partition, so erasures are
//! carried out in the order asked). For each request: destroy the person's data key, purge
//! their CQL rows and their vectors, then append the completion and commit the offset in
//! one transaction. A crash anywhere before that commit re-delivers the request; every step
//! is idempotent, so the restarted worker finishes the erasure and completes it once.

use std::collections::BTreeMap;
use std::time::Duration;

use parley_eventlog::KafkaSettings;
use parley_eventlog::consumer::{next_record, reader, reader_config};
use parley_eventlog::dead_letter::dead_letter_for;
use parley_eventlog::transaction::{Outgoing, TransactionalProducer, instance_transactional_id};
use parley_events::event::now_millis;
use parley_events::{
    Envelope, ErasureCompleted, ErasureEvent, ErasureRequested, EventCodec, EventId, Producer, PurgedPlace, UserId,
};
use parley_projections::Store;
use parley_projections::erasure::purge_person;
use parley_retrieval::{SearchFilter, VectorStore};
use rdkafka::Message;
use rdkafka::consumer::Consumer;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, info, info_span, warn};
use uuid::Uuid;

use crate::ErasureError;

/// What the worker writes as.
pub const WORKER: Producer = Producer { name: "parley-erasure", version: env!("CARGO_PKG_VERSION") };

/// The longest wait between two attempts at a step that failed (the store was down, say).
const MAX_RETRY_WAIT: Duration = Duration::from_secs(10);

/// Where a person's copies are, and how to purge them.
#[derive(Debug, Clone)]
pub struct Purger {
    /// The CQL store, with the key store when a master key is configured.
    pub store: Store,
    /// The vector store, unless retrieval is off.
    pub vectors: Option<VectorStore>,
}

impl Purger {
    /// Destroys `user`'s key and purges every copy of theirs; what this pass removed where,
    /// and when the key was destroyed.
    pub async fn erase(&self, user: &UserId) -> Result<(i64, Vec<PurgedPlace>), ErasureError> {
        // The key first: from here on nothing of theirs opens, wherever a copy remains.
        let mut key_erased_at = now_millis();
        if let Some(keys) = self.store.keys() {
            keys.destroy(user.as_str()).await?;
            key_erased_at = keys.erased_at(user.as_str()).await?.unwrap_or(key_erased_at);
        }
        let mut purged = purge_person(&self.store, user).await?;
        if let Some(vectors) = &self.vectors {
            let everything = SearchFilter::owner(user.clone());
            let found = vectors.count(&everything).await?;
            if found > 0 {
                vectors.delete(&everything).await?;
                // Sealed into segments now, so a search no longer sees them even unflushed.
                vectors.flush().await?;
            }
            purged
                .push(PurgedPlace { place: "milvus:vectors".into(), items: i64::try_from(found).unwrap_or(i64::MAX) });
        }
        Ok((key_erased_at, purged))
    }

    /// [`erase`](Self::erase), tried again (waits doubling up to 10 s) until it succeeds;
    /// None when `shutdown` came first.
    async fn erase_until_done(&self, user: &UserId, shutdown: &CancellationToken) -> Option<(i64, Vec<PurgedPlace>)> {
        let mut wait = Duration::from_millis(200);
        loop {
            match self.erase(user).await {
                Ok(done) => return Some(done),
                Err(error) => {
                    warn!(%user, %error, ?wait, "an erasure step failed; trying the erasure again");
                    tokio::select! {
                        () = shutdown.cancelled() => return None,
                        () = tokio::time::sleep(wait) => {}
                    }
                    wait = (wait * 2).min(MAX_RETRY_WAIT);
                }
            }
        }
    }
}

/// The completion of `request`.
pub fn completion_of(request: &ErasureRequested, key_erased_at: i64, purged: Vec<PurgedPlace>) -> ErasureCompleted {
    // Derived from the request: a completion written twice (never, in a committed
    // transaction) would carry the same id.
    let id = EventId::from(Uuid::new_v5(&request.envelope.event_id.uuid(), b"completed"));
    ErasureCompleted {
        envelope: Envelope::new(id, request.envelope.conversation_id, 2, WORKER).caused_by(&request.envelope),
        user_id: request.user_id.clone(),
        request_event_id: request.envelope.event_id,
        key_erased_at,
        purged,
    }
}

/// Carries out every erasure requested on the erasures topic until `shutdown`.
pub async fn run(
    kafka: &KafkaSettings,
    registry: &str,
    purger: Purger,
    shutdown: CancellationToken,
) -> Result<(), ErasureError> {
    let topics = kafka.topics();
    let group = format!("{}parley-erasure", kafka.topic_prefix);
    // A new group starts at the oldest request: none asked before the first start is missed.
    let consumer = reader(reader_config(kafka, &group, false).set("auto.offset.reset", "earliest"))?;
    consumer.subscribe(&[&topics.erasures])?;
    let producer =
        TransactionalProducer::new(kafka, &instance_transactional_id(&group, None, kafka.instance_id.as_deref()))?;
    let codec = EventCodec::new(registry)?;
    info!(topic = %topics.erasures, %group, "erasure worker started");
    while let Some(message) = next_record(&consumer, &shutdown, "erasure worker").await {
        let next = BTreeMap::from([((message.topic().to_owned(), message.partition()), message.offset() + 1)]);
        let payload = message.payload().unwrap_or_default();
        let outgoing = match codec.decode_erasure_event(payload).await {
            Ok(decoded) => match decoded.event {
                ErasureEvent::Requested(request) => {
                    let span = info_span!("erasure", user = %request.user_id, request = %request.envelope.event_id);
                    // Boxed: the purge's many statements in flight make a large future.
                    let erasing = Box::pin(purger.erase_until_done(&request.user_id, &shutdown));
                    let Some((key_erased_at, purged)) = erasing.instrument(span.clone()).await else {
                        break;
                    };
                    let done = completion_of(&request, key_erased_at, purged);
                    span.in_scope(|| info!(purged = ?done.purged, "erasure completed"));
                    vec![Outgoing::new(&topics.erasures, request.user_id.as_str(), codec.encode(&done).await?)]
                }
                ErasureEvent::Completed(_) => Vec::new(),
            },
            Err(error) if error.is_retryable() => return Err(error.into()),
            Err(error) => {
                warn!(%error, offset = message.offset(), "an undecodable erasure record: dead-lettered");
                let letter = dead_letter_for(&message, &group, &error.to_string());
                vec![Outgoing::new(&topics.dead_letter, &topics.erasures, codec.encode(&letter).await?)]
            }
        };
        producer.commit_offsets(&consumer, &next, outgoing).await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_completion_follows_its_request_and_has_one_id_per_request() {
        let alice: UserId = "alice".parse().unwrap_or_else(|e| panic!("{e}"));
        let by = Producer { name: "t", version: "0" };
        let request = ErasureRequested {
            envelope: Envelope::new(EventId::random(), alice.erasure_stream(), 1, by),
            user_id: alice.clone(),
            requested_by: "self".into(),
            reason: String::new(),
        };
        let purged = vec![PurgedPlace { place: "cql:messages".into(), items: 2 }];
        let done = completion_of(&request, 42, purged.clone());
        assert_eq!(done.request_event_id, request.envelope.event_id);
        assert_eq!(done.envelope.causation_id, Some(request.envelope.event_id));
        assert_eq!((done.envelope.conversation_id, done.envelope.sequence), (alice.erasure_stream(), 2));
        assert_eq!((done.key_erased_at, done.purged.as_slice()), (42, purged.as_slice()));
        // A pass redone after a crash completes under the same id; another request does not.
        assert_eq!(completion_of(&request, 43, vec![]).envelope.event_id, done.envelope.event_id);
        let again =
            ErasureRequested { envelope: Envelope::new(EventId::random(), alice.erasure_stream(), 1, by), ..request };
        assert_ne!(completion_of(&again, 42, vec![]).envelope.event_id, done.envelope.event_id);
        assert_ne!(alice.erasure_stream(), "bob".parse::<UserId>().unwrap_or_else(|e| panic!("{e}")).erasure_stream());
    }
}
