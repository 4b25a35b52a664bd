//! What a service plugs into the driver.

use std::future::Future;
use std::sync::Arc;

use parley_events::EventsError;
use rdkafka::message::OwnedMessage;

use crate::transaction::Outgoing;

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

    /// Runs when no record arrived for a while (e.g. flush a buffer); given up after 10 s
    /// (it runs again at the next idle), so it never stops the consumption of records.
    fn idle(&self) -> impl Future<Output = ()> + Send {
        async {}
    }
}
