//! Turn rules, as plain functions: how sequence numbers are assigned and when a query may
//! start. One conversation has one writer of user queries at a time (the gateway holding
//! it) and at most one turn in flight, so sequence numbers are dense and need no
//! coordination: `ConversationStarted` is 1, turn k's query is 2k and its outcome
//! (`LLMResponseGenerated` or `LLMResponseFailed`) is 2k+1.

use uuid::Uuid;

use crate::event::ConversationEvent;
use crate::ids::{ConversationId, EventId, UserId};

/// Every conversation starts with its `ConversationStarted` at this sequence.
pub const STARTED_SEQUENCE: i64 = 1;

/// The `finish_reason` of an answer stopped by a `TurnCancelRequested`: its text is what
/// was generated until then. It ends the turn like any answer.
pub const CANCELLED: &str = "cancelled";

/// The id of the query a client message becomes: a repeat of the same client message id in
/// the same conversation maps to the same event id, so duplicates are recognisable anywhere.
pub fn query_event_id(conversation_id: ConversationId, client_message_id: &str) -> EventId {
    Uuid::new_v5(&conversation_id.uuid(), client_message_id.as_bytes()).into()
}

/// The outcome of a query takes the sequence number right after it.
pub fn outcome_sequence(query_sequence: i64) -> i64 {
    query_sequence + 1
}

/// The query a conversation is waiting on an answer for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenQuery {
    /// The query's event id.
    pub event_id: EventId,
    /// Its sequence.
    pub sequence: i64,
    /// The client's id of the message (empty when the head was read from the projection).
    pub client_message_id: String,
}

/// What a conversation's writer must know: owner, last sequence applied, open turn.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConversationHead {
    /// Who may extend it.
    pub owner: UserId,
    /// The last sequence applied.
    pub last_sequence: i64,
    /// The turn waiting for its outcome.
    pub open_query: Option<OpenQuery>,
}

/// Why a query cannot start a turn now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TurnRejection {
    /// The conversation belongs to another user.
    NotOwner,
    /// The previous query has no outcome yet.
    TurnInProgress {
        /// The query waiting for its outcome.
        open_query_event_id: EventId,
    },
}

/// How an event related to the head it was applied to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    /// The event advanced the head.
    Advanced,
    /// Already applied (at or below the last sequence): re-delivery, ignored.
    AlreadyApplied,
    /// The event skips sequence numbers: an earlier event is missing.
    Gap {
        /// The sequence that should have come.
        expected: i64,
        /// The one that came.
        got: i64,
    },
}

impl ConversationHead {
    /// The head right after `ConversationStarted`.
    pub fn started(owner: UserId) -> Self {
        Self { owner, last_sequence: STARTED_SEQUENCE, open_query: None }
    }

    /// Rebuilds a head from a conversation's events in log order.
    pub fn fold<'a>(events: impl IntoIterator<Item = &'a ConversationEvent>) -> Option<Self> {
        let mut head: Option<Self> = None;
        for event in events {
            match (&mut head, event) {
                (None, ConversationEvent::Started(started)) => head = Some(Self::started(started.user_id.clone())),
                (Some(h), event) => {
                    h.apply(event);
                }
                (None, _) => {}
            }
        }
        head
    }

    /// The sequence number `user`'s next query gets, or why it may not start now.
    pub fn admit(&self, user: &UserId) -> Result<i64, TurnRejection> {
        if &self.owner != user {
            return Err(TurnRejection::NotOwner);
        }
        if let Some(open) = &self.open_query {
            return Err(TurnRejection::TurnInProgress { open_query_event_id: open.event_id });
        }
        Ok(self.last_sequence + 1)
    }

    /// Applies one event idempotently, and also across a gap: a later event is a fact, and
    /// refusing it would stall the conversation and hide every event after it. Returns what
    /// the event was relative to the head before (so a gap can be reported).
    pub fn apply_over_gaps(&mut self, event: &ConversationEvent) -> Applied {
        self.advance_over_gaps(event.envelope().sequence, Self::opened_by(event))
    }

    /// Applies one event idempotently by its sequence number.
    pub fn apply(&mut self, event: &ConversationEvent) -> Applied {
        self.advance(event.envelope().sequence, Self::opened_by(event))
    }

    /// [`Self::apply_over_gaps`] for a writer that keeps only an event's sequence and the
    /// turn it opens (a query opens one; an outcome, at the next sequence, closes it).
    pub fn advance_over_gaps(&mut self, sequence: i64, opens: Option<OpenQuery>) -> Applied {
        let applied = self.advance(sequence, opens.clone());
        if let Applied::Gap { got, .. } = applied {
            self.last_sequence = got - 1;
            self.advance(sequence, opens);
        }
        applied
    }

    /// [`Self::apply`] from an event's sequence and the turn it opens.
    pub fn advance(&mut self, sequence: i64, opens: Option<OpenQuery>) -> Applied {
        if sequence <= self.last_sequence {
            return Applied::AlreadyApplied;
        }
        if sequence != self.last_sequence + 1 {
            return Applied::Gap { expected: self.last_sequence + 1, got: sequence };
        }
        self.last_sequence = sequence;
        self.open_query = opens;
        Applied::Advanced
    }

    /// The turn an event opens: a query's; every other event that advances closes the turn.
    fn opened_by(event: &ConversationEvent) -> Option<OpenQuery> {
        match event {
            ConversationEvent::QueryReceived(q) => Some(OpenQuery {
                event_id: q.envelope.event_id,
                sequence: q.envelope.sequence,
                client_message_id: q.client_message_id.clone(),
            }),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::*;
    use crate::test_events::{P, alice, query};

    fn failed(conversation: ConversationId, sequence: i64) -> ConversationEvent {
        ConversationEvent::ResponseFailed(LLMResponseFailed {
            envelope: Envelope::new(EventId::random(), conversation, sequence, P),
            query_event_id: EventId::random(),
            error_kind: "timeout".into(),
            error_message: "slow".into(),
            attempts: 3,
        })
    }

    #[test]
    fn turns_take_dense_sequence_numbers_one_at_a_time() {
        let c = ConversationId::random();
        let mut head = ConversationHead::started(alice());
        assert_eq!(head.admit(&alice()), Ok(2));
        assert_eq!(head.apply(&query(c, 2, "m1")), Applied::Advanced);
        assert!(matches!(head.admit(&alice()), Err(TurnRejection::TurnInProgress { .. })));
        assert_eq!(head.apply(&failed(c, outcome_sequence(2))), Applied::Advanced);
        assert_eq!(head.admit(&alice()), Ok(4));
    }

    #[test]
    fn only_the_owner_may_extend_a_conversation() {
        assert_eq!(ConversationHead::started(alice()).admit(&"mallory".parse().unwrap()), Err(TurnRejection::NotOwner));
    }

    #[test]
    fn applying_is_idempotent_and_detects_gaps() {
        let c = ConversationId::random();
        let mut head = ConversationHead::started(alice());
        assert_eq!(head.apply(&query(c, 2, "m1")), Applied::Advanced);
        let before = head.clone();
        assert_eq!(head.apply(&query(c, 2, "m1")), Applied::AlreadyApplied);
        assert_eq!(head, before);
        assert_eq!(head.apply(&query(c, 5, "m3")), Applied::Gap { expected: 3, got: 5 });
        assert_eq!(head, before);
    }

    #[test]
    fn fold_rebuilds_the_head_from_the_log() {
        let c = ConversationId::random();
        let started = ConversationEvent::Started(ConversationStarted {
            envelope: Envelope::new(EventId::random(), c, 1, P),
            user_id: alice(),
        });
        let log = [started, query(c, 2, "m1"), failed(c, 3), query(c, 4, "m2")];
        let head = ConversationHead::fold(&log).unwrap();
        assert_eq!(head.last_sequence, 4);
        assert_eq!(head.open_query.map(|q| q.client_message_id), Some("m2".to_owned()));
    }

    #[test]
    fn a_repeated_client_message_id_maps_to_the_same_query_id() {
        let c = ConversationId::random();
        assert_eq!(query_event_id(c, "m1"), query_event_id(c, "m1"));
        assert_ne!(query_event_id(c, "m1"), query_event_id(c, "m2"));
        assert_ne!(query_event_id(c, "m1"), query_event_id(ConversationId::random(), "m1"));
    }
}
