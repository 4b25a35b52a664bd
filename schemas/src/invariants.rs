//! What must hold for any conversation's log, checked by replay and audit (and the fault
//! suite): each event id appears once, each query has at most one outcome, and a query is
//! answered before the next one is asked. Pure: no I/O.

use std::collections::BTreeMap;
use std::fmt;

use crate::event::ConversationEvent;
use crate::ids::EventId;

/// A broken promise of the log about one conversation.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "violation", rename_all = "snake_case")]
pub enum Violation {
    /// One event id on several records: a turn or an outcome written twice.
    RepeatedEventId {
        /// The id.
        event_id: EventId,
        /// Where it appears.
        sequences: Vec<i64>,
    },
    /// One query with several outcomes: the model answered it more than once.
    SeveralOutcomes {
        /// The query.
        query_event_id: EventId,
        /// Its outcomes' sequences.
        sequences: Vec<i64>,
    },
    /// A query followed by the next one without an outcome in between.
    Unanswered {
        /// The query.
        query_event_id: EventId,
        /// Its sequence.
        sequence: i64,
    },
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::RepeatedEventId { event_id, sequences } => {
                write!(f, "event id {event_id} appears {} times, at sequences {sequences:?}", sequences.len())
            }
            Self::SeveralOutcomes { query_event_id, sequences } => {
                write!(f, "query {query_event_id} has {} outcomes, at sequences {sequences:?}", sequences.len())
            }
            Self::Unanswered { query_event_id, sequence } => {
                write!(f, "query {query_event_id} at sequence {sequence} has no outcome before the next query")
            }
        }
    }
}

/// The violations in a conversation's records, in log order (empty for a sound log).
pub fn violations<'a>(events: impl IntoIterator<Item = &'a ConversationEvent>) -> Vec<Violation> {
    let mut by_id: BTreeMap<EventId, Vec<i64>> = BTreeMap::new();
    let mut outcomes: BTreeMap<EventId, Vec<i64>> = BTreeMap::new();
    let mut found = Vec::new();
    let mut open: Option<(EventId, i64)> = None;
    for event in events {
        let envelope = event.envelope();
        by_id.entry(envelope.event_id).or_default().push(envelope.sequence);
        match event {
            ConversationEvent::QueryReceived(query) => {
                if let Some((query_event_id, sequence)) = open.replace((query.envelope.event_id, envelope.sequence)) {
                    found.push(Violation::Unanswered { query_event_id, sequence });
                }
            }
            ConversationEvent::ResponseGenerated(outcome) => {
                outcomes.entry(outcome.query_event_id).or_default().push(envelope.sequence);
                open = None;
            }
            ConversationEvent::ResponseFailed(outcome) => {
                outcomes.entry(outcome.query_event_id).or_default().push(envelope.sequence);
                open = None;
            }
            // A cancel asks for an outcome; the outcome (cancelled or not) is what counts.
            ConversationEvent::Started(_) | ConversationEvent::CancelRequested(_) => {}
        }
    }
    found.extend(
        by_id
            .into_iter()
            .filter(|(_, sequences)| sequences.len() > 1)
            .map(|(id, sequences)| Violation::RepeatedEventId { event_id: id, sequences }),
    );
    found.extend(
        outcomes
            .into_iter()
            .filter(|(_, sequences)| sequences.len() > 1)
            .map(|(id, sequences)| Violation::SeveralOutcomes { query_event_id: id, sequences }),
    );
    found
}

#[cfg(test)]
mod tests {
    use uuid::Uuid;

    use super::*;
    use crate::event::*;
    use crate::ids::ConversationId;
    use crate::test_events::{P, alice, query};
    use crate::turn::query_event_id;

    fn outcome(conversation: ConversationId, sequence: i64, client_message_id: &str) -> ConversationEvent {
        let query_id = query_event_id(conversation, client_message_id);
        ConversationEvent::ResponseFailed(LLMResponseFailed {
            envelope: Envelope::new(Uuid::new_v5(&query_id.uuid(), b"outcome").into(), conversation, sequence, P),
            query_event_id: query_id,
            error_kind: "timeout".into(),
            error_message: "slow".into(),
            attempts: 1,
        })
    }

    fn started(conversation: ConversationId) -> ConversationEvent {
        ConversationEvent::Started(ConversationStarted {
            envelope: Envelope::new(EventId::random(), conversation, 1, P),
            user_id: alice(),
        })
    }

    #[test]
    fn a_sound_log_has_none() {
        let c = ConversationId::random();
        let log = [started(c), query(c, 2, "a"), outcome(c, 3, "a"), query(c, 4, "b")];
        assert_eq!(violations(&log), []);
    }

    #[test]
    fn a_turn_answered_twice_is_reported_by_id_and_by_query() {
        // The log of the duplicate-turn bug: turn A, turn B, then A again at 6 and 7.
        let c = ConversationId::random();
        let log = [
            started(c),
            query(c, 2, "a"),
            outcome(c, 3, "a"),
            query(c, 4, "b"),
            outcome(c, 5, "b"),
            query(c, 6, "a"),
            outcome(c, 7, "a"),
        ];
        let found = violations(&log);
        let query_a = query_event_id(c, "a");
        assert!(found.contains(&Violation::RepeatedEventId { event_id: query_a, sequences: vec![2, 6] }));
        assert!(found.contains(&Violation::SeveralOutcomes { query_event_id: query_a, sequences: vec![3, 7] }));
        assert_eq!(found.len(), 3, "{found:?}");
        assert!(found.iter().all(|v| !v.to_string().is_empty()));
    }

    #[test]
    fn a_query_skipped_by_the_next_is_unanswered() {
        let c = ConversationId::random();
        let log = [started(c), query(c, 2, "a"), query(c, 3, "b")];
        let found = violations(&log);
        assert_eq!(found, [Violation::Unanswered { query_event_id: query_event_id(c, "a"), sequence: 2 }]);
    }
}
