//! The driver's dead letters: writing one for an undecodable record, and taking in the
//! letters and decisions its follower reads, which the scheduler settles.

use std::time::Instant;

use parley_events::dead_letters::LetterId;
use parley_events::event::DeadLetterRecord;
use rdkafka::Message;
use rdkafka::message::OwnedMessage;
use tracing::{info, warn};

use super::{Driver, Processor};
use crate::LogPosition;
use crate::dead_letter::dead_letter_for;
use crate::error::EventLogError;
use crate::metrics::DEAD_LETTERS;
use crate::transaction::Outgoing;

impl<P: Processor> Driver<P> {
    /// An undecodable record: its letter, unless one is known (a record read again after a
    /// restart); its key is then held back until the letter is settled.
    pub(super) async fn dead_letter(
        &mut self,
        message: &OwnedMessage,
        position: &LogPosition,
        error: &str,
    ) -> Result<Option<Outgoing>, EventLogError> {
        let group = self.settings.group_id.as_str();
        if let Some(entry) = self.book.find(group, position) {
            info!(%position, letter = %entry.id, status = entry.status.as_str(), "undecodable record lettered before; not lettered again");
            return Ok(None);
        }
        if !self.lettered.insert(position.clone()) {
            return Ok(None);
        }
        warn!(%position, %error, "undecodable record sent to the dead-letter topic; its key is held back until the letter is redriven or discarded");
        let letter = dead_letter_for(message, group, error);
        DEAD_LETTERS.with_label_values(&[group, message.topic()]).inc();
        Ok(Some(Outgoing {
            topic: self.settings.dead_letter_topic.clone(),
            key: String::from_utf8_lossy(message.key().unwrap_or_default()).into_owned(),
            payload: self.codec.encode(&letter).await?,
            traceparent: None,
        }))
    }

    /// Letters and decisions the follower handed out meanwhile.
    pub(super) fn take_letters(&mut self) {
        while let Some((id, record)) = self.letters.try_next() {
            self.take_letter(id, record);
        }
    }

    /// A letter or decision of this group: the scheduler settles every entry of its record.
    pub(super) fn take_letter(&mut self, id: LetterId, record: DeadLetterRecord) {
        let source = match &record {
            DeadLetterRecord::Letter(letter) => letter.source(),
            DeadLetterRecord::Resolved(resolution) => resolution.source(),
        };
        self.book.apply(id, record);
        // The book knows it now: this process's own note of it is no longer needed.
        self.lettered.remove(&source);
        let group = self.settings.group_id.as_str();
        for entry in
            self.book.entries().iter().filter(|entry| entry.letter.consumer == group && entry.letter.source() == source)
        {
            if let Some(copy) = entry.status.copy() {
                info!(letter = %entry.id, %copy, "dead letter settled by a redrive; its key waits for the copy");
            }
            self.scheduler.settle(entry, Instant::now());
        }
    }
}
