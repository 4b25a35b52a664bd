//! Every process that holds data keys in memory follows the erasures topic and forgets a
//! person's key the moment their erasure is requested and again when it completes: after
//! the completion, no process opens or seals anything of theirs (the key store answers
//! `erased` from then on).

use parley_eventlog::KafkaSettings;
use parley_eventlog::consumer::{next_record, tail};
use parley_events::EventCodec;
use parley_projections::keys::KeyStore;
use rdkafka::Message;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::ErasureError;

/// Follows the erasures topic from now until `shutdown`, forgetting each erased person's
/// key held by `keys` (and by every clone of it).
pub async fn forget_erased_keys(
    kafka: &KafkaSettings,
    registry: &str,
    keys: KeyStore,
    shutdown: CancellationToken,
) -> Result<(), ErasureError> {
    let topic = kafka.topics().erasures;
    let consumer = tail(kafka, "parley-erasure-watch", &[&topic])?;
    let codec = EventCodec::new(registry)?;
    while let Some(message) = next_record(&consumer, &shutdown, "erasure watch").await {
        let Some(payload) = message.payload() else { continue };
        match codec.decode_erasure_event(payload).await {
            Ok(decoded) => {
                let user = decoded.event.user_id();
                keys.forget(user.as_str());
                info!(%user, "an erasure: this process's copy of the person's key is forgotten");
            }
            // The worker dead-letters it; nothing here to forget.
            Err(error) => warn!(%error, offset = message.offset(), "an undecodable record on the erasures topic"),
        }
    }
    Ok(())
}
