//! What one gateway instance knows: the conversations its sockets write to (their heads,
//! so it can assign sequence numbers), which sockets want which conversation's answers,
//! and each conversation's latest outcome (to answer a duplicate query again).

use std::collections::HashMap;
use std::sync::Mutex;

use parley_events::ConversationEvent;
use parley_events::turn::{Applied, ConversationHead, TurnRejection, query_event_id};
use tokio::sync::mpsc;
use uuid::Uuid;

use crate::protocol::ServerFrame;

/// Identifies one socket.
pub type ConnectionId = u64;

/// A socket's outbox. Bounded: a client that stops reading loses its socket, not the server.
pub type Outbox = mpsc::Sender<ServerFrame>;

#[derive(Debug, Default)]
struct Slot {
    head: Option<ConversationHead>,
    subscribers: HashMap<ConnectionId, Outbox>,
    /// Ack and outcome frames of the latest turn, by query event id.
    last_ack: Option<(String, ServerFrame)>,
    last_outcome: Option<(String, ServerFrame)>,
}

/// How a query was admitted.
#[derive(Debug, Clone, PartialEq)]
pub enum Admission {
    /// A new turn: write `ConversationStarted` first if `new_conversation`, then the query at `sequence`.
    Accepted { conversation_id: Uuid, query_id: Uuid, sequence: i64, new_conversation: bool },
    /// The same client message id again: resend these frames, write nothing.
    Duplicate { frames: Vec<ServerFrame> },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    UnknownConversation,
    TurnInProgress,
}

#[derive(Debug, Default)]
pub struct Hub {
    slots: Mutex<HashMap<Uuid, Slot>>,
}

/// Namespace for conversation ids derived from (user, client message id): a retried first
/// message maps to the same new conversation.
const NEW_CONVERSATION_NAMESPACE: Uuid = Uuid::from_u128(0x6d1f_0c3a_9b1e_4a47_8f5e_2b0d_7c41_aa01);

impl Hub {
    /// Admits `user`'s query and reserves its sequence number, subscribing `outbox` to the
    /// conversation's answers.
    pub fn admit(
        &self,
        user: &str,
        conversation_id: Option<Uuid>,
        client_message_id: &str,
        connection: ConnectionId,
        outbox: &Outbox,
    ) -> Result<Admission, Refusal> {
        let new_conversation = conversation_id.is_none();
        let conversation_id = conversation_id.unwrap_or_else(|| {
            Uuid::new_v5(&NEW_CONVERSATION_NAMESPACE, format!("{user}/{client_message_id}").as_bytes())
        });
        let query_id = query_event_id(conversation_id, client_message_id);
        let mut slots = self.lock();
        let slot = slots.entry(conversation_id).or_default();
        if slot.head.is_none() && new_conversation {
            slot.head = Some(ConversationHead::started(user));
        }
        let Some(head) = slot.head.as_mut().filter(|h| h.owner == user) else {
            return Err(Refusal::UnknownConversation);
        };
        slot.subscribers.insert(connection, outbox.clone());
        let query_key = query_id.to_string();
        if let Some((id, ack)) = &slot.last_ack
            && *id == query_key
        {
            let mut frames = vec![mark_duplicate(ack.clone())];
            frames.extend(slot.last_outcome.iter().filter(|(q, _)| *q == query_key).map(|(_, f)| f.clone()));
            return Ok(Admission::Duplicate { frames });
        }
        let sequence = head.admit(user).map_err(|rejection| match rejection {
            TurnRejection::NotOwner => Refusal::UnknownConversation,
            TurnRejection::TurnInProgress { .. } => Refusal::TurnInProgress,
        })?;
        head.last_sequence = sequence;
        head.open_query = Some(parley_events::turn::OpenQuery {
            event_id: query_key,
            sequence,
            client_message_id: client_message_id.to_owned(),
        });
        let new_conversation = sequence == parley_events::turn::STARTED_SEQUENCE + 1 && new_conversation;
        Ok(Admission::Accepted { conversation_id, query_id, sequence, new_conversation })
    }

    /// Takes over a conversation this instance did not hold (e.g. after a restart), with its
    /// head as the projection knows it. A conversation already held is left as it is.
    pub fn adopt(&self, conversation_id: Uuid, head: ConversationHead) {
        let mut slots = self.lock();
        let slot = slots.entry(conversation_id).or_default();
        if slot.head.is_none() {
            slot.head = Some(head);
        }
    }

    /// Records the ack of a written query, for duplicates.
    pub fn record_ack(&self, conversation_id: Uuid, query_id: Uuid, ack: ServerFrame) {
        if let Some(slot) = self.lock().get_mut(&conversation_id) {
            slot.last_ack = Some((query_id.to_string(), ack));
        }
    }

    /// Undoes a reservation whose query could not be written.
    pub fn release(&self, conversation_id: Uuid, sequence: i64) {
        let mut slots = self.lock();
        let Some(slot) = slots.get_mut(&conversation_id) else {
            return;
        };
        if let Some(head) = slot.head.as_mut().filter(|h| h.last_sequence == sequence) {
            head.last_sequence = sequence - 1;
            head.open_query = None;
        }
        if sequence == parley_events::turn::STARTED_SEQUENCE + 1 {
            slots.remove(&conversation_id); // its ConversationStarted may not exist either
        }
    }

    /// Subscribes a socket to a conversation the user owns.
    pub fn subscribe(&self, user: &str, conversation_id: Uuid, connection: ConnectionId, outbox: &Outbox) -> bool {
        let mut slots = self.lock();
        match slots.get_mut(&conversation_id) {
            Some(slot) if slot.head.as_ref().is_some_and(|h| h.owner == user) => {
                slot.subscribers.insert(connection, outbox.clone());
                true
            }
            _ => false,
        }
    }

    /// Forgets a closed socket.
    pub fn disconnect(&self, connection: ConnectionId) {
        for slot in self.lock().values_mut() {
            slot.subscribers.remove(&connection);
        }
    }

    /// Whether this instance holds the conversation (a cheap filter before decoding).
    pub fn holds(&self, conversation_id: &Uuid) -> bool {
        self.lock().contains_key(conversation_id)
    }

    /// Applies an event from the log and returns the subscribers to notify with `frame`.
    pub fn apply_outcome(&self, event: &ConversationEvent, frame: ServerFrame) -> Vec<Outbox> {
        let Ok(conversation_id) = event.envelope().conversation_id.parse::<Uuid>() else {
            return vec![];
        };
        let mut slots = self.lock();
        let Some(slot) = slots.get_mut(&conversation_id) else {
            return vec![];
        };
        let applied = slot.head.as_mut().map(|head| head.apply(event));
        if applied == Some(Applied::AlreadyApplied) {
            return vec![]; // re-delivered: the sockets have it
        }
        if let ConversationEvent::ResponseGenerated(e) = event {
            slot.last_outcome = Some((e.query_event_id.clone(), frame));
        } else if let ConversationEvent::ResponseFailed(e) = event {
            slot.last_outcome = Some((e.query_event_id.clone(), frame));
        }
        slot.subscribers.values().cloned().collect()
    }

    /// The subscribers to send a token delta of `query_event_id` to: none once the
    /// query's outcome was delivered (deltas travel on another topic and may arrive late;
    /// a late one must not be appended to a finished answer).
    pub fn token_subscribers(&self, conversation_id: &Uuid, query_event_id: &str) -> Vec<Outbox> {
        let slots = self.lock();
        let Some(slot) = slots.get(conversation_id) else {
            return vec![];
        };
        if slot.last_outcome.as_ref().is_some_and(|(query, _)| query == query_event_id) {
            return vec![];
        }
        slot.subscribers.values().cloned().collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Uuid, Slot>> {
        self.slots.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

fn mark_duplicate(frame: ServerFrame) -> ServerFrame {
    match frame {
        ServerFrame::Ack { client_message_id, conversation_id, event_id, sequence, position, .. } => {
            ServerFrame::Ack { client_message_id, conversation_id, event_id, sequence, position, duplicate: true }
        }
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use parley_events::{Envelope, LLMResponseFailed, Producer};

    use super::*;

    fn outbox() -> (Outbox, mpsc::Receiver<ServerFrame>) {
        mpsc::channel(8)
    }

    fn accepted(admission: Result<Admission, Refusal>) -> (Uuid, Uuid, i64, bool) {
        match admission {
            Ok(Admission::Accepted { conversation_id, query_id, sequence, new_conversation }) => {
                (conversation_id, query_id, sequence, new_conversation)
            }
            other => panic!("{other:?}"),
        }
    }

    fn failed_outcome(conversation: Uuid, query: Uuid, sequence: i64) -> ConversationEvent {
        ConversationEvent::ResponseFailed(LLMResponseFailed {
            envelope: Envelope::new(Uuid::new_v4(), conversation, sequence, Producer { name: "t", version: "0" }),
            query_event_id: query.to_string(),
            error_kind: "timeout".into(),
            error_message: "slow".into(),
            attempts: 1,
        })
    }

    #[test]
    fn a_new_conversation_then_one_turn_at_a_time() {
        let hub = Hub::default();
        let (tx, _rx) = outbox();
        let (conversation, query, sequence, new) = accepted(hub.admit("alice", None, "m1", 1, &tx));
        assert_eq!((sequence, new), (2, true));
        assert_eq!(hub.admit("alice", Some(conversation), "m2", 1, &tx), Err(Refusal::TurnInProgress));

        let frame = ServerFrame::Subscribed { conversation_id: conversation.to_string() };
        assert_eq!(hub.apply_outcome(&failed_outcome(conversation, query, 3), frame.clone()).len(), 1);
        assert!(
            hub.apply_outcome(&failed_outcome(conversation, query, 3), frame).is_empty(),
            "re-delivery is not pushed twice"
        );
        let (_, _, sequence, new) = accepted(hub.admit("alice", Some(conversation), "m2", 1, &tx));
        assert_eq!((sequence, new), (4, false));
    }

    #[test]
    fn other_users_and_unknown_conversations_are_refused_alike() {
        let hub = Hub::default();
        let (tx, _rx) = outbox();
        let (conversation, ..) = accepted(hub.admit("alice", None, "m1", 1, &tx));
        assert_eq!(hub.admit("mallory", Some(conversation), "x", 2, &tx), Err(Refusal::UnknownConversation));
        assert_eq!(hub.admit("alice", Some(Uuid::new_v4()), "x", 1, &tx), Err(Refusal::UnknownConversation));
        assert!(!hub.subscribe("mallory", conversation, 2, &tx));
        assert!(hub.subscribe("alice", conversation, 3, &tx));
    }

    #[test]
    fn a_repeated_client_message_id_is_a_duplicate_with_its_ack() {
        let hub = Hub::default();
        let (tx, _rx) = outbox();
        let (conversation, query, sequence, _) = accepted(hub.admit("alice", None, "m1", 1, &tx));
        let ack = ServerFrame::Ack {
            client_message_id: "m1".into(),
            conversation_id: conversation.to_string(),
            event_id: query.to_string(),
            sequence,
            position: "t/0/1".into(),
            duplicate: false,
        };
        hub.record_ack(conversation, query, ack);
        // The same first message again (no conversation id yet) lands in the same conversation.
        let Ok(Admission::Duplicate { frames }) = hub.admit("alice", None, "m1", 1, &tx) else { panic!() };
        assert!(matches!(&frames[..], [ServerFrame::Ack { duplicate: true, .. }]), "{frames:?}");
    }

    #[test]
    fn late_token_deltas_of_a_finished_answer_are_not_pushed() {
        let hub = Hub::default();
        let (tx, _rx) = outbox();
        let (conversation, query, _, _) = accepted(hub.admit("alice", None, "m1", 1, &tx));
        assert_eq!(hub.token_subscribers(&conversation, &query.to_string()).len(), 1);
        let frame = ServerFrame::Subscribed { conversation_id: conversation.to_string() };
        hub.apply_outcome(&failed_outcome(conversation, query, 3), frame);
        assert!(hub.token_subscribers(&conversation, &query.to_string()).is_empty());
    }

    #[test]
    fn a_released_reservation_frees_the_turn() {
        let hub = Hub::default();
        let (tx, _rx) = outbox();
        let (conversation, query, _, _) = accepted(hub.admit("alice", None, "m1", 1, &tx));
        let frame = ServerFrame::Subscribed { conversation_id: conversation.to_string() };
        hub.apply_outcome(&failed_outcome(conversation, query, 3), frame);
        let (_, _, sequence, _) = accepted(hub.admit("alice", Some(conversation), "m2", 1, &tx));
        hub.release(conversation, sequence);
        let (_, _, again, _) = accepted(hub.admit("alice", Some(conversation), "m2", 1, &tx));
        assert_eq!(again, sequence);
    }
}
