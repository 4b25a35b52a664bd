//! A conversation's state as a fold over its events: the one definition shared by the
//! projection (which stores it) and by replay (which rebuilds it from the log), so the
//! two cannot drift. Pure: no I/O.

use crate::event::{CachedAnswer, ConversationEvent, RetrievedContext};
use crate::ids::{ConversationId, EventId};
use crate::turn::{Applied, ConversationHead};

/// Who said a message, or that the model failed to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum MessageKind {
    /// A user's question.
    UserQuery,
    /// The model's answer.
    Answer,
    /// A turn the model did not answer.
    Failure,
}

impl MessageKind {
    /// As the projection stores it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::UserQuery => "user_query",
            Self::Answer => "answer",
            Self::Failure => "failure",
        }
    }

    /// The kind stored as `value`, if it is one.
    pub fn parse(value: &str) -> Option<Self> {
        [Self::UserQuery, Self::Answer, Self::Failure].into_iter().find(|k| k.as_str() == value)
    }
}

/// One turn half: what the user asked, or what came back.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Message {
    /// The event's sequence in its conversation.
    pub sequence: i64,
    /// The event the message comes from.
    pub event_id: EventId,
    /// Question, answer or failure.
    pub kind: MessageKind,
    /// The question, the answer, or the failure's message.
    pub text: String,
    /// When it happened (ms since the epoch).
    pub occurred_at: i64,
    /// For outcomes: the query answered.
    pub query_event_id: Option<EventId>,
    /// For answers: the model.
    pub model: Option<String>,
    /// For answers: the prompt's tokens.
    pub prompt_tokens: Option<i32>,
    /// For answers: the answer's tokens.
    pub completion_tokens: Option<i32>,
    /// For answers: how long the model took.
    pub llm_latency_ms: Option<i64>,
    /// For failures: why (a timeout, an exceeded budget…).
    pub error_kind: Option<String>,
    /// For answers: the chunks and earlier messages the prompt carried, best first.
    pub retrieved: Vec<RetrievedContext>,
    /// For answers from the semantic cache: the answer repeated.
    pub cached_from: Option<CachedAnswer>,
}

/// The message an event adds to its conversation, if it adds one.
pub fn message_of(event: &ConversationEvent) -> Option<Message> {
    let base = |envelope: &crate::Envelope, kind, text: &str| Message {
        sequence: envelope.sequence,
        event_id: envelope.event_id,
        kind,
        text: text.to_owned(),
        occurred_at: envelope.occurred_at,
        query_event_id: None,
        model: None,
        prompt_tokens: None,
        completion_tokens: None,
        llm_latency_ms: None,
        error_kind: None,
        retrieved: Vec::new(),
        cached_from: None,
    };
    match event {
        // A cancel changes no message: the answer it leads to is marked cancelled.
        ConversationEvent::Started(_) | ConversationEvent::CancelRequested(_) => None,
        ConversationEvent::QueryReceived(e) => Some(base(&e.envelope, MessageKind::UserQuery, &e.text)),
        ConversationEvent::ResponseGenerated(e) => Some(Message {
            query_event_id: Some(e.query_event_id),
            model: Some(e.model.clone()),
            prompt_tokens: Some(e.prompt_tokens),
            completion_tokens: Some(e.completion_tokens),
            llm_latency_ms: Some(e.llm_latency_ms),
            retrieved: e.retrieved.clone(),
            cached_from: e.cached_from.clone(),
            ..base(&e.envelope, MessageKind::Answer, &e.text)
        }),
        ConversationEvent::ResponseFailed(e) => Some(Message {
            query_event_id: Some(e.query_event_id),
            error_kind: Some(e.error_kind.clone()),
            ..base(&e.envelope, MessageKind::Failure, &e.error_message)
        }),
    }
}

/// A conversation as its events describe it.
#[derive(Debug, Clone, PartialEq)]
pub struct ConversationState {
    /// The conversation.
    pub conversation_id: ConversationId,
    /// Owner, last sequence and open turn.
    pub head: ConversationHead,
    /// When it started (ms since the epoch).
    pub started_at: i64,
    /// When its last event happened.
    pub updated_at: i64,
    /// Its messages in sequence order.
    pub messages: Vec<Message>,
    /// Sequence numbers that were skipped (an event is missing from the log).
    pub gaps: Vec<(i64, i64)>,
}

impl ConversationState {
    /// Folds a conversation's events, in log order, into its state. Events before its
    /// `ConversationStarted` (there should be none) are ignored.
    pub fn fold<'a>(events: impl IntoIterator<Item = &'a ConversationEvent>) -> Option<Self> {
        let mut state: Option<Self> = None;
        for event in events {
            match (&mut state, event) {
                (None, ConversationEvent::Started(started)) => {
                    state = Some(Self {
                        conversation_id: started.envelope.conversation_id,
                        head: ConversationHead::started(started.user_id.clone()),
                        started_at: started.envelope.occurred_at,
                        updated_at: started.envelope.occurred_at,
                        messages: Vec::new(),
                        gaps: Vec::new(),
                    });
                }
                (Some(s), event) => {
                    s.apply(event);
                }
                (None, _) => {}
            }
        }
        state
    }

    /// Applies one event idempotently by sequence number. A gap is recorded and the event
    /// still applied: it is a fact, and stalling the conversation would hide the later ones.
    pub fn apply(&mut self, event: &ConversationEvent) -> Applied {
        let applied = self.head.apply_over_gaps(event);
        if let Applied::Gap { expected, got } = applied {
            self.gaps.push((expected, got));
        }
        if applied != Applied::AlreadyApplied {
            self.updated_at = event.envelope().occurred_at;
            self.messages.extend(message_of(event));
        }
        applied
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::*;
    use crate::test_events::{P, alice};

    fn log(conversation: ConversationId) -> Vec<ConversationEvent> {
        let env = |seq| Envelope::new(EventId::random(), conversation, seq, P);
        vec![
            ConversationEvent::Started(ConversationStarted { envelope: env(1), user_id: alice() }),
            ConversationEvent::QueryReceived(UserQueryReceived {
                sealed_for: String::new(),
                envelope: env(2),
                user_id: alice(),
                client_message_id: "m1".into(),
                text: "hi".into(),
                no_cache: false,
            }),
            ConversationEvent::ResponseGenerated(LLMResponseGenerated {
                sealed_for: String::new(),
                envelope: env(3),
                query_event_id: EventId::random(),
                text: "hello".into(),
                model: "m".into(),
                finish_reason: "stop".into(),
                prompt_tokens: 5,
                completion_tokens: 1,
                llm_latency_ms: 9,
                time_to_first_token_ms: None,
                attempts: 1,
                context_event_ids: vec![],
                user_id: None,
                retrieved: vec![RetrievedContext {
                    vector_id: "v".into(),
                    source_kind: "document".into(),
                    source_id: "d".into(),
                    source_event_id: EventId::random(),
                    position: 0,
                    score: 0.5,
                }],
                context_fingerprint: String::new(),
                cached_from: None,
                prompt: None,
            }),
        ]
    }

    #[test]
    fn folding_a_log_gives_its_turns_in_order() {
        let state = ConversationState::fold(&log(ConversationId::random())).unwrap();
        assert_eq!(state.head.owner, "alice");
        assert_eq!(state.head.last_sequence, 3);
        let kinds: Vec<_> = state.messages.iter().map(|m| (m.sequence, m.kind, m.text.as_str())).collect();
        assert_eq!(kinds, [(2, MessageKind::UserQuery, "hi"), (3, MessageKind::Answer, "hello")]);
        assert_eq!(state.messages[1].model.as_deref(), Some("m"));
        assert_eq!(state.messages[1].retrieved[0].vector_id, "v", "the answer keeps what its prompt carried");
        assert!(state.gaps.is_empty());
    }

    #[test]
    fn re_delivered_events_change_nothing() {
        let events = log(ConversationId::random());
        let once = ConversationState::fold(&events).unwrap();
        let twice: Vec<_> = events.iter().chain(events.iter().skip(1)).cloned().collect();
        assert_eq!(ConversationState::fold(&twice).unwrap(), once);
    }

    #[test]
    fn a_missing_event_is_recorded_as_a_gap_and_later_events_still_apply() {
        let mut events = log(ConversationId::random());
        events.remove(1);
        let state = ConversationState::fold(&events).unwrap();
        assert_eq!(state.gaps, [(2, 3)]);
        assert_eq!(state.messages.len(), 1);
        assert_eq!(state.head.last_sequence, 3);
    }

    #[test]
    fn message_kinds_round_trip_through_text() {
        for kind in [MessageKind::UserQuery, MessageKind::Answer, MessageKind::Failure] {
            assert_eq!(MessageKind::parse(kind.as_str()), Some(kind));
        }
        assert_eq!(MessageKind::parse("other"), None);
    }
}
