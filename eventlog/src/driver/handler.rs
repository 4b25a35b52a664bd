//! The common consumer in a few lines: conversation events in, and for each one the
//! records to append, exactly once (in the transaction that commits its offset).

use std::fmt;
use std::sync::Arc;

use parley_events::{ConversationEvent, EventCodec};
use rdkafka::Message;
use rdkafka::message::OwnedMessage;
use tokio_util::sync::CancellationToken;

use super::{Decoded, Processor};
use crate::registry_wait::retry_while_registry_down;
use crate::transaction::Outgoing;

/// A [`Processor`] made of a function: `handle` sees every conversation event in log order
/// (decoded through the registry, riding out its outages) and says what to append for it
/// (nothing: the event is not its work). An error of `handle` stops the driver.
pub struct EventHandler<F> {
    codec: Arc<EventCodec>,
    shutdown: CancellationToken,
    handle: F,
}

impl<F> fmt::Debug for EventHandler<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EventHandler").finish_non_exhaustive()
    }
}

impl<F, E> EventHandler<F>
where
    F: Fn(&ConversationEvent) -> Result<Vec<Outgoing>, E> + Send + Sync + 'static,
    E: std::error::Error + Send + Sync + 'static,
{
    /// `handle` over events decoded by `codec`; a registry outage is waited out until
    /// `shutdown`.
    pub fn new(codec: Arc<EventCodec>, shutdown: CancellationToken, handle: F) -> Self {
        Self { codec, shutdown, handle }
    }
}

impl<F, E> Processor for EventHandler<F>
where
    F: Fn(&ConversationEvent) -> Result<Vec<Outgoing>, E> + Send + Sync + 'static,
    E: std::error::Error + Send + Sync + 'static,
{
    /// What `handle` said, worked out as the record is read (in log order).
    type Item = Result<Vec<Outgoing>, E>;
    type Error = E;

    async fn decode(&self, record: &OwnedMessage) -> Option<Decoded<Self::Item>> {
        let payload = record.payload().unwrap_or_default();
        let decoded = retry_while_registry_down(&self.shutdown, || self.codec.decode_conversation_event(payload));
        decoded.await.map(|result| result.map(|decoded| (self.handle)(&decoded.event)))
    }

    fn wants(&self, outgoing: &Self::Item) -> bool {
        outgoing.as_ref().map_or(true, |records| !records.is_empty())
    }

    async fn process(self: Arc<Self>, unit: Vec<(OwnedMessage, Self::Item)>) -> Result<Vec<Outgoing>, E> {
        let mut outgoing = Vec::new();
        for (_, records) in unit {
            outgoing.extend(records?);
        }
        Ok(outgoing)
    }
}
