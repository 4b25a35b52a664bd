//! Appends many documents quickly: every event is put on the idempotent producer's queue
//! at once (librdkafka batches them), and acknowledgements are awaited as they come, with
//! a progress callback per acknowledged document, pausing while Parley sheds load.

use std::time::Duration;

use futures::StreamExt;
use futures::stream::FuturesUnordered;
use parley_eventlog::{EventLogError, EventProducer, LogPosition};
use parley_events::DocumentSubmitted;

/// Outcome of one document: where it landed, or why not.
pub type Acknowledged = Result<LogPosition, EventLogError>;

/// Appends `documents` to `topic`, calling `progress(index, outcome)` as each is
/// acknowledged. Before each document, `pace()` may ask for a pause (Parley is shedding
/// load): submission slows down instead of failing, acknowledging what lands meanwhile.
pub async fn submit_all(
    producer: &EventProducer,
    topic: &str,
    documents: &[DocumentSubmitted],
    pace: impl Fn() -> Option<Duration>,
    mut progress: impl FnMut(usize, &Acknowledged),
) -> Vec<Acknowledged> {
    let mut outcomes: Vec<Option<Acknowledged>> = documents.iter().map(|_| None).collect();
    let mut pending = FuturesUnordered::new();
    for (index, document) in documents.iter().enumerate() {
        while let Some(wait) = pace() {
            let pause = tokio::time::sleep(wait);
            tokio::pin!(pause);
            loop {
                tokio::select! {
                    () = &mut pause => break,
                    Some((landed, outcome)) = pending.next(), if !pending.is_empty() => {
                        progress(landed, &outcome);
                        outcomes[landed] = Some(outcome);
                    }
                }
            }
        }
        let traceparent = document.envelope.traceparent.as_deref();
        match producer.enqueue(topic, &document.document_id.to_string(), document, traceparent).await {
            Ok(delivery) => pending.push(async move { (index, delivery.await) }),
            Err(error) => {
                let outcome = Err(error);
                progress(index, &outcome);
                outcomes[index] = Some(outcome);
            }
        }
    }
    while let Some((index, outcome)) = pending.next().await {
        progress(index, &outcome);
        outcomes[index] = Some(outcome);
    }
    // Every slot was filled above: by the enqueue error or by the acknowledgement.
    outcomes.into_iter().flatten().collect()
}
