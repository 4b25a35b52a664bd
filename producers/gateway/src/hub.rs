//! What one gateway instance knows: the conversations its sockets write to (their heads,
//! so it can assign sequence numbers, and every query written to them, so a resent one is
//! recognised whichever turn it was), which sockets want which conversation's answers,
//! and each conversation's latest outcome (to answer a duplicate of the open turn again).
//! A conversation nobody here follows, with no open turn, is forgotten once idle
//! ([`Hub::evict_idle`]): its next use adopts it again from the projection, as a restart would.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use parley_eventlog::LogPosition;
use parley_eventlog::partitioner::partition_for_key;
use parley_events::lanes::{Lane, LaneLayout, pick_in_lane};
use parley_events::turn::{
    Applied, ConversationHead, OpenQuery, STARTED_SEQUENCE, TurnRejection, outcome_sequence, query_event_id,
};
use parley_events::{ConversationEvent, ConversationId, EventId, UserId};
use tokio::sync::mpsc;
use uuid::Uuid;

use crate::protocol::ServerFrame;

/// Identifies one socket.
pub type ConnectionId = u64;

/// A socket's outbox. Bounded: a client that stops reading loses its socket, not the server.
pub type Outbox = mpsc::Sender<ServerFrame>;

/// Where a query of the conversation sits in the log (its partition is the conversation's).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WrittenQuery {
    /// The query's sequence.
    pub sequence: i64,
    /// Its offset in the conversation's partition.
    pub offset: i64,
}

#[derive(Debug)]
struct Slot {
    head: ConversationHead,
    /// The conversation's partition of the events topic, once known.
    partition: Option<i32>,
    subscribers: HashMap<ConnectionId, Outbox>,
    /// Every query of the conversation, by event id: a resend of any turn is a duplicate.
    queries: HashMap<EventId, WrittenQuery>,
    /// The outcome frame of the latest answered turn, by query event id.
    last_outcome: Option<(EventId, ServerFrame)>,
    /// The log has no `ConversationStarted` for it yet: its first query writes one.
    unstarted: bool,
    /// When a socket last asked, subscribed or left, or an event of it was applied.
    last_active: Instant,
}

impl Slot {
    fn new(head: ConversationHead, unstarted: bool) -> Self {
        Self {
            head,
            partition: None,
            subscribers: HashMap::new(),
            queries: HashMap::new(),
            last_outcome: None,
            unstarted,
            last_active: Instant::now(),
        }
    }
}

/// How a query was admitted.
#[derive(Debug, Clone, PartialEq)]
pub enum Admission {
    /// A new turn: write `ConversationStarted` first if `new_conversation`, then the query at `sequence`.
    Accepted {
        /// The conversation.
        conversation_id: ConversationId,
        /// The query's event id.
        query_id: EventId,
        /// The sequence reserved for it.
        sequence: i64,
        /// Whether the log has no `ConversationStarted` for it yet.
        new_conversation: bool,
    },
    /// The same client message id again: resend the original ack (marked duplicate) and the
    /// outcome, write nothing.
    Duplicate {
        /// The original ack, marked duplicate.
        ack: Box<ServerFrame>,
        /// Where its outcome comes from.
        outcome: DuplicateOutcome,
    },
}

/// What a duplicate's client gets after the repeated ack.
#[derive(Debug, Clone, PartialEq)]
pub enum DuplicateOutcome {
    /// The outcome, known here.
    Known(Box<ServerFrame>),
    /// The turn is still open: the outcome will be pushed when it comes.
    Pending,
    /// An earlier turn: its outcome is in the projection once it has applied `after`.
    InProjection {
        /// The conversation.
        conversation_id: ConversationId,
        /// The query.
        query_id: EventId,
        /// The outcome's sequence.
        outcome_sequence: i64,
        /// The position the projection must have applied.
        after: LogPosition,
    },
}

/// What a cancel would stop.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CancelTarget {
    /// The turn waiting for its answer: a cancel is written for it.
    Open {
        /// The open query.
        query_event_id: EventId,
        /// Its sequence (the cancel's too).
        sequence: i64,
    },
    /// The query was answered already: nothing to stop.
    Complete,
    /// No turn is open (a cancel of "whatever is open").
    NothingOpen,
    /// No such query in the conversation.
    UnknownQuery,
    /// No such conversation of the user's (or not held here).
    UnknownConversation,
}

/// Why the hub did not admit a query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// This instance does not hold the conversation: look it up in the projection, adopt
    /// it, and admit again.
    NotHeld,
    /// Not the user's conversation.
    UnknownConversation,
    /// The previous question has no outcome yet.
    TurnInProgress,
}

/// The conversations held by one gateway instance.
#[derive(Debug)]
pub struct Hub {
    slots: Mutex<HashMap<ConversationId, Slot>>,
    events_topic: String,
}

/// Namespace for conversation ids derived from (user, client message id): a retried first
/// message maps to the same new conversation.
const NEW_CONVERSATION_NAMESPACE: Uuid = Uuid::from_u128(0x6d1f_0c3a_9b1e_4a47_8f5e_2b0d_7c41_aa01);

/// Candidate ids tried for a new conversation before its lane is given up (each lands in
/// a lane of one partition in six with probability 1/6: 256 misses are ~1e-20).
const LANE_TRIES: u32 = 256;

/// The conversation a first message (sent without a conversation id) starts, in `lane`:
/// the first of a fixed series of candidate ids that hashes into one of the lane's
/// partitions, so a resent first message names the same conversation on any gateway.
pub fn new_conversation_id(
    user: &UserId,
    client_message_id: &str,
    lane: Lane,
    layout: &LaneLayout,
    partitions: i32,
) -> ConversationId {
    let candidate = |n: u32| {
        let name =
            if n == 0 { format!("{user}/{client_message_id}") } else { format!("{user}/{client_message_id}/{n}") };
        ConversationId::from(Uuid::new_v5(&NEW_CONVERSATION_NAMESPACE, name.as_bytes()))
    };
    let partition_of = |id: &ConversationId| partition_for_key(id.to_string().as_bytes(), partitions);
    pick_in_lane(layout, layout.effective(lane, partitions), LANE_TRIES, candidate, partition_of)
}

impl Hub {
    /// A hub whose conversations' events are on `events_topic`.
    pub fn new(events_topic: impl Into<String>) -> Self {
        Self { slots: Mutex::default(), events_topic: events_topic.into() }
    }

    /// Admits `user`'s query and reserves its sequence number, subscribing `outbox` to the
    /// conversation's answers.
    pub fn admit(
        &self,
        user: &UserId,
        conversation_id: ConversationId,
        client_message_id: &str,
        connection: ConnectionId,
        outbox: &Outbox,
    ) -> Result<Admission, Refusal> {
        let query_id = query_event_id(conversation_id, client_message_id);
        let mut slots = self.lock();
        let slot = slots.get_mut(&conversation_id).ok_or(Refusal::NotHeld)?;
        if &slot.head.owner != user {
            return Err(Refusal::UnknownConversation);
        }
        slot.subscribers.insert(connection, outbox.clone());
        slot.last_active = Instant::now();
        if let Some(written) = slot.queries.get(&query_id) {
            let ack = Box::new(ServerFrame::Ack {
                client_message_id: client_message_id.to_owned(),
                conversation_id: conversation_id.to_string(),
                event_id: query_id.to_string(),
                sequence: written.sequence,
                position: self.position(slot, written.offset).to_string(),
                duplicate: true,
            });
            return Ok(Admission::Duplicate {
                ack,
                outcome: self.outcome_of(slot, conversation_id, query_id, written.sequence),
            });
        }
        let sequence = slot.head.admit(user).map_err(|rejection| match rejection {
            TurnRejection::NotOwner => Refusal::UnknownConversation,
            TurnRejection::TurnInProgress { .. } => Refusal::TurnInProgress,
        })?;
        slot.head.last_sequence = sequence;
        slot.head.open_query =
            Some(OpenQuery { event_id: query_id, sequence, client_message_id: client_message_id.to_owned() });
        let new_conversation = slot.unstarted && sequence == STARTED_SEQUENCE + 1;
        Ok(Admission::Accepted { conversation_id, query_id, sequence, new_conversation })
    }

    fn position(&self, slot: &Slot, offset: i64) -> LogPosition {
        LogPosition { topic: self.events_topic.clone(), partition: slot.partition.unwrap_or(0), offset }
    }

    /// Where the outcome of a repeated query comes from.
    fn outcome_of(
        &self,
        slot: &Slot,
        conversation_id: ConversationId,
        query_id: EventId,
        sequence: i64,
    ) -> DuplicateOutcome {
        if let Some((_, frame)) = slot.last_outcome.as_ref().filter(|(q, _)| *q == query_id) {
            return DuplicateOutcome::Known(Box::new(frame.clone()));
        }
        if slot.head.open_query.as_ref().is_some_and(|open| open.event_id == query_id) {
            return DuplicateOutcome::Pending;
        }
        // A closed turn whose outcome this instance did not see (an earlier turn, or one
        // from before it adopted the conversation): the outcome precedes every later query
        // in the partition, and an adopted head was read after the projection caught up.
        let latest = slot.queries.values().filter(|q| q.sequence >= sequence).map(|q| q.offset).max();
        let offset = latest.unwrap_or_default();
        DuplicateOutcome::InProjection {
            conversation_id,
            query_id,
            outcome_sequence: outcome_sequence(sequence),
            after: self.position(slot, offset),
        }
    }

    /// Takes over a conversation this instance did not hold (a restart, another instance's
    /// conversation), with its head and queries as the log shows them. A conversation
    /// already held is left as it is.
    pub fn adopt(
        &self,
        conversation_id: ConversationId,
        head: ConversationHead,
        partition: i32,
        queries: impl IntoIterator<Item = (EventId, WrittenQuery)>,
    ) {
        self.hold(conversation_id, head, partition, queries, false);
    }

    /// Holds a conversation the log does not have yet: `user`'s first message starts it.
    pub fn adopt_new(&self, conversation_id: ConversationId, user: &UserId, partition: i32) {
        self.hold(conversation_id, ConversationHead::started(user.clone()), partition, [], true);
    }

    fn hold(
        &self,
        conversation_id: ConversationId,
        head: ConversationHead,
        partition: i32,
        queries: impl IntoIterator<Item = (EventId, WrittenQuery)>,
        unstarted: bool,
    ) {
        let mut slots = self.lock();
        slots.entry(conversation_id).or_insert_with(|| {
            let mut slot = Slot::new(head, unstarted);
            slot.partition = Some(partition);
            slot.queries.extend(queries);
            slot
        });
    }

    /// Records where a written query landed, for duplicates.
    /// The query is in the log: returns the conversation's other sockets here (besides
    /// `asker`), which show the question too.
    pub fn record_written(
        &self,
        conversation_id: ConversationId,
        query_id: EventId,
        sequence: i64,
        position: &LogPosition,
        asker: ConnectionId,
    ) -> Vec<Outbox> {
        let mut slots = self.lock();
        let Some(slot) = slots.get_mut(&conversation_id) else { return vec![] };
        slot.unstarted = false;
        slot.partition = Some(position.partition);
        slot.queries.insert(query_id, WrittenQuery { sequence, offset: position.offset });
        slot.subscribers
            .iter()
            .filter(|(connection, _)| **connection != asker)
            .map(|(_, outbox)| outbox.clone())
            .collect()
    }

    /// Undoes a reservation whose query could not be written.
    pub fn release(&self, conversation_id: ConversationId, sequence: i64) {
        let mut slots = self.lock();
        let Some(slot) = slots.get_mut(&conversation_id) else {
            return;
        };
        if slot.head.last_sequence == sequence {
            slot.head.last_sequence = sequence - 1;
            slot.head.open_query = None;
        }
        if sequence == STARTED_SEQUENCE + 1 {
            slots.remove(&conversation_id); // its ConversationStarted may not exist either
        }
    }

    /// Subscribes a socket to a conversation the user owns.
    pub fn subscribe(
        &self,
        user: &UserId,
        conversation_id: ConversationId,
        connection: ConnectionId,
        outbox: &Outbox,
    ) -> bool {
        let mut slots = self.lock();
        match slots.get_mut(&conversation_id) {
            Some(slot) if &slot.head.owner == user => {
                slot.subscribers.insert(connection, outbox.clone());
                slot.last_active = Instant::now();
                true
            }
            _ => false,
        }
    }

    /// Forgets a closed socket; returns the open turns it followed, as (conversation,
    /// query, owner), for a caller that stops answers nobody follows any more.
    pub fn disconnect(&self, connection: ConnectionId) -> Vec<(ConversationId, EventId, UserId)> {
        let mut followed = Vec::new();
        for (conversation, slot) in self.lock().iter_mut() {
            let followed_here = slot.subscribers.remove(&connection).is_some();
            if followed_here {
                slot.last_active = Instant::now();
            }
            if followed_here && let Some(open) = slot.head.open_query.as_ref() {
                followed.push((*conversation, open.event_id, slot.head.owner.clone()));
            }
        }
        followed
    }

    /// Whether `query` is still the open turn of `conversation` and no socket here follows it.
    pub fn abandoned(&self, conversation_id: ConversationId, query: EventId) -> bool {
        let slots = self.lock();
        slots.get(&conversation_id).is_some_and(|slot| {
            slot.subscribers.is_empty() && slot.head.open_query.as_ref().is_some_and(|open| open.event_id == query)
        })
    }

    /// Whether this instance holds the conversation (a cheap filter before decoding).
    pub fn holds(&self, conversation_id: &ConversationId) -> bool {
        self.lock().contains_key(conversation_id)
    }

    /// Where a resumed answer stands: its outcome (known, pending, or in the projection)
    /// and its query's place in the events topic; `None` for a query the conversation
    /// (held, the user's) does not have.
    pub fn resume_target(
        &self,
        user: &UserId,
        conversation_id: ConversationId,
        query: EventId,
    ) -> Option<(DuplicateOutcome, LogPosition)> {
        let slots = self.lock();
        let slot = slots.get(&conversation_id).filter(|slot| &slot.head.owner == user)?;
        let written = slot.queries.get(&query)?;
        let outcome = self.outcome_of(slot, conversation_id, query, written.sequence);
        Some((outcome, self.position(slot, written.offset)))
    }

    /// What a cancel by `user` of `query` (the open one: `None`) of a held conversation
    /// would stop.
    pub fn cancel_target(
        &self,
        user: &UserId,
        conversation_id: ConversationId,
        query: Option<EventId>,
    ) -> CancelTarget {
        let slots = self.lock();
        let Some(slot) = slots.get(&conversation_id).filter(|slot| &slot.head.owner == user) else {
            return CancelTarget::UnknownConversation;
        };
        let open = slot.head.open_query.as_ref().map(|open| (open.event_id, open.sequence));
        match (query, open) {
            (None, Some((id, sequence))) => CancelTarget::Open { query_event_id: id, sequence },
            (None, None) => CancelTarget::NothingOpen,
            (Some(asked), Some((id, sequence))) if asked == id => CancelTarget::Open { query_event_id: id, sequence },
            (Some(asked), _) if slot.queries.contains_key(&asked) => CancelTarget::Complete,
            (Some(_), _) => CancelTarget::UnknownQuery,
        }
    }

    /// Applies an event read from the log at `partition`/`offset` (a query another
    /// instance wrote, or an outcome) and returns the subscribers to notify with `frame`:
    /// all of them for an outcome or another instance's question, none for an event
    /// already applied (a re-delivery, or this instance's own query) or a start or cancel.
    pub fn apply(
        &self,
        event: &ConversationEvent,
        partition: i32,
        offset: i64,
        frame: Option<ServerFrame>,
    ) -> Vec<Outbox> {
        let conversation_id = event.envelope().conversation_id;
        let mut slots = self.lock();
        let Some(slot) = slots.get_mut(&conversation_id) else {
            return vec![];
        };
        slot.partition = Some(partition);
        slot.last_active = Instant::now();
        if let ConversationEvent::QueryReceived(query) = event {
            let written = WrittenQuery { sequence: query.envelope.sequence, offset };
            slot.queries.entry(query.envelope.event_id).or_insert(written);
        }
        if slot.head.apply_over_gaps(event) == Applied::AlreadyApplied {
            return vec![]; // re-delivered, or this instance's own query: the sockets have it
        }
        let query_event_id = match event {
            ConversationEvent::ResponseGenerated(e) => e.query_event_id,
            ConversationEvent::ResponseFailed(e) => e.query_event_id,
            // Asked through another instance: every socket here shows the question.
            ConversationEvent::QueryReceived(_) => return slot.subscribers.values().cloned().collect(),
            ConversationEvent::Started(_) | ConversationEvent::CancelRequested(_) => return vec![],
        };
        let Some(frame) = frame else { return vec![] };
        slot.last_outcome = Some((query_event_id, frame));
        slot.subscribers.values().cloned().collect()
    }

    /// The subscribers to send a token delta of `query_event_id` to: none once the
    /// query's outcome was delivered (deltas travel on another topic and may arrive late;
    /// a late one must not be appended to a finished answer).
    pub fn token_subscribers(&self, conversation_id: &ConversationId, query_event_id: EventId) -> Vec<Outbox> {
        let slots = self.lock();
        let Some(slot) = slots.get(conversation_id) else {
            return vec![];
        };
        if slot.last_outcome.as_ref().is_some_and(|(query, _)| *query == query_event_id) {
            return vec![];
        }
        slot.subscribers.values().cloned().collect()
    }

    /// Forgets the conversations that no socket here follows, whose turn is closed, and that
    /// were idle for `idle` at `now`; returns how many are held still. (A user who comes back
    /// has the conversation adopted again, with its head and queries from the projection.)
    pub fn evict_idle(&self, now: Instant, idle: Duration) -> usize {
        let mut slots = self.lock();
        slots.retain(|_, slot| {
            !slot.subscribers.is_empty()
                || slot.head.open_query.is_some()
                || now.saturating_duration_since(slot.last_active) < idle
        });
        slots.len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<ConversationId, Slot>> {
        self.slots.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use parley_events::{Envelope, LLMResponseFailed, Producer, UserQueryReceived};

    use super::*;

    const TOPIC: &str = "t.events";

    fn u(name: &str) -> UserId {
        name.parse().unwrap()
    }

    fn outbox() -> (Outbox, mpsc::Receiver<ServerFrame>) {
        mpsc::channel(8)
    }

    fn hub_holding_new(user: &str, client_message_id: &str) -> (Hub, ConversationId) {
        let (hub, user) = (Hub::new(TOPIC), u(user));
        let conversation = new_conversation_id(&user, client_message_id, Lane::Standard, &LaneLayout::default(), 6);
        hub.adopt_new(conversation, &user, 0);
        (hub, conversation)
    }

    fn accepted(admission: Result<Admission, Refusal>) -> (ConversationId, EventId, i64, bool) {
        match admission {
            Ok(Admission::Accepted { conversation_id, query_id, sequence, new_conversation }) => {
                (conversation_id, query_id, sequence, new_conversation)
            }
            other => panic!("{other:?}"),
        }
    }

    fn failed_outcome(conversation: ConversationId, query: EventId, sequence: i64) -> ConversationEvent {
        ConversationEvent::ResponseFailed(LLMResponseFailed {
            envelope: Envelope::new(EventId::random(), conversation, sequence, Producer { name: "t", version: "0" }),
            query_event_id: query,
            error_kind: "timeout".into(),
            error_message: "slow".into(),
            attempts: 1,
        })
    }

    fn frame_of(query: EventId) -> ServerFrame {
        ServerFrame::Failed {
            conversation_id: String::new(),
            query_event_id: query.to_string(),
            event_id: String::new(),
            error_kind: "timeout".into(),
            message: "slow".into(),
        }
    }

    /// Admits, records the write at `offset` and applies a failed outcome: one whole turn.
    fn turn(hub: &Hub, conversation: ConversationId, client_message_id: &str, offset: i64) -> EventId {
        let (tx, _rx) = outbox();
        let (_, query, sequence, _) = accepted(hub.admit(&u("alice"), conversation, client_message_id, 1, &tx));
        let position = LogPosition { topic: TOPIC.into(), partition: 2, offset };
        let others = hub.record_written(conversation, query, sequence, &position, 1);
        assert!(others.is_empty(), "the asking socket is not sent its own question");
        hub.apply(&failed_outcome(conversation, query, sequence + 1), 2, offset + 1, Some(frame_of(query)));
        query
    }

    #[test]
    fn a_new_conversation_then_one_turn_at_a_time() {
        let (hub, conversation) = hub_holding_new("alice", "m1");
        let (tx, _rx) = outbox();
        let (_, query, sequence, new) = accepted(hub.admit(&u("alice"), conversation, "m1", 1, &tx));
        assert_eq!((sequence, new), (2, true));
        assert_eq!(hub.admit(&u("alice"), conversation, "m2", 1, &tx), Err(Refusal::TurnInProgress));

        let outcome = failed_outcome(conversation, query, 3);
        assert_eq!(hub.apply(&outcome, 0, 1, Some(frame_of(query))).len(), 1);
        assert!(hub.apply(&outcome, 0, 1, Some(frame_of(query))).is_empty(), "re-delivery is not pushed twice");
        let (_, _, sequence, new) = accepted(hub.admit(&u("alice"), conversation, "m2", 1, &tx));
        assert_eq!((sequence, new), (4, false));
    }

    #[test]
    fn only_idle_conversations_nobody_follows_and_without_an_open_turn_are_forgotten() {
        let idle = Duration::from_secs(600);
        let later = || Instant::now() + idle + Duration::from_secs(1);
        let (hub, followed) = hub_holding_new("alice", "f");
        let (tx, _rx) = outbox();
        assert!(hub.subscribe(&u("alice"), followed, 7, &tx));
        let closed = ConversationId::random();
        hub.adopt_new(closed, &u("alice"), 2);
        turn(&hub, closed, "c", 10);
        hub.disconnect(1);
        let open = ConversationId::random();
        hub.adopt_new(open, &u("alice"), 2);
        accepted(hub.admit(&u("alice"), open, "o", 9, &tx));
        hub.disconnect(9);

        assert_eq!(hub.evict_idle(Instant::now(), idle), 3, "nothing is idle yet");
        assert_eq!(hub.evict_idle(later(), idle), 2, "the closed, unfollowed conversation is forgotten");
        assert!(hub.holds(&followed) && hub.holds(&open) && !hub.holds(&closed));
        assert_eq!(hub.admit(&u("alice"), closed, "d", 1, &tx), Err(Refusal::NotHeld), "its next use adopts it again");
        hub.disconnect(7);
        hub.disconnect(1);
        assert_eq!(hub.evict_idle(later(), idle), 1, "an open turn keeps its conversation");
    }

    #[test]
    fn conversations_not_held_are_looked_up_and_other_users_refused() {
        let (hub, conversation) = hub_holding_new("alice", "m1");
        let (tx, _rx) = outbox();
        assert_eq!(hub.admit(&u("mallory"), conversation, "x", 2, &tx), Err(Refusal::UnknownConversation));
        assert_eq!(hub.admit(&u("alice"), ConversationId::random(), "x", 1, &tx), Err(Refusal::NotHeld));
        assert!(!hub.subscribe(&u("mallory"), conversation, 2, &tx));
        assert!(hub.subscribe(&u("alice"), conversation, 3, &tx));
    }

    #[test]
    fn a_resent_earlier_turn_is_a_duplicate_whose_outcome_is_read_after_the_later_turns() {
        let (hub, conversation) = hub_holding_new("alice", "a");
        let first = turn(&hub, conversation, "a", 10);
        turn(&hub, conversation, "b", 20);
        let (tx, _rx) = outbox();
        let Ok(Admission::Duplicate { ack, outcome }) = hub.admit(&u("alice"), conversation, "a", 1, &tx) else {
            panic!("turn 1 resent after turn 2 must be a duplicate")
        };
        let ServerFrame::Ack { event_id, sequence, position, duplicate, .. } = *ack else { panic!("{ack:?}") };
        assert_eq!((event_id, sequence, position.as_str(), duplicate), (first.to_string(), 2, "t.events/2/10", true));
        let after = LogPosition { topic: TOPIC.into(), partition: 2, offset: 20 };
        assert_eq!(
            outcome,
            DuplicateOutcome::InProjection {
                conversation_id: conversation,
                query_id: first,
                outcome_sequence: 3,
                after
            }
        );
        // The latest turn's outcome is known in memory.
        let Ok(Admission::Duplicate { outcome, .. }) = hub.admit(&u("alice"), conversation, "b", 1, &tx) else {
            panic!()
        };
        assert!(
            matches!(outcome, DuplicateOutcome::Known(ref frame) if matches!(**frame, ServerFrame::Failed { .. })),
            "{outcome:?}"
        );
    }

    #[test]
    fn an_adopted_conversation_knows_its_queries_and_those_other_instances_write() {
        let hub = Hub::new(TOPIC);
        let conversation = ConversationId::random();
        let earlier = query_event_id(conversation, "a");
        let head = ConversationHead { owner: "alice".parse().unwrap(), last_sequence: 3, open_query: None };
        hub.adopt(conversation, head, 4, [(earlier, WrittenQuery { sequence: 2, offset: 7 })]);
        let (tx, _rx) = outbox();
        assert!(matches!(hub.admit(&u("alice"), conversation, "a", 1, &tx), Ok(Admission::Duplicate { .. })));

        // Another instance writes turn 2: this one sees it on the log and treats a resend
        // as a duplicate of a turn still open.
        let query = ConversationEvent::QueryReceived(UserQueryReceived {
            sealed_for: String::new(),
            envelope: Envelope::new(
                query_event_id(conversation, "b"),
                conversation,
                4,
                Producer { name: "t", version: "0" },
            ),
            user_id: "alice".parse().unwrap(),
            client_message_id: "b".into(),
            text: "hi".into(),
            no_cache: false,
        });
        assert_eq!(hub.apply(&query, 4, 9, None).len(), 1, "its socket here is shown the question");
        let Ok(Admission::Duplicate { ack, outcome }) = hub.admit(&u("alice"), conversation, "b", 1, &tx) else {
            panic!()
        };
        assert!(matches!(*ack, ServerFrame::Ack { sequence: 4, .. }), "{ack:?}");
        assert_eq!(outcome, DuplicateOutcome::Pending);
        assert_eq!(hub.admit(&u("alice"), conversation, "c", 1, &tx), Err(Refusal::TurnInProgress));
    }

    #[test]
    fn late_token_deltas_of_a_finished_answer_are_not_pushed() {
        let (hub, conversation) = hub_holding_new("alice", "m1");
        let (tx, _rx) = outbox();
        let (_, query, _, _) = accepted(hub.admit(&u("alice"), conversation, "m1", 1, &tx));
        assert_eq!(hub.token_subscribers(&conversation, query).len(), 1);
        hub.apply(&failed_outcome(conversation, query, 3), 0, 1, Some(frame_of(query)));
        assert!(hub.token_subscribers(&conversation, query).is_empty());
    }

    #[test]
    fn a_released_reservation_frees_the_turn() {
        let (hub, conversation) = hub_holding_new("alice", "m1");
        turn(&hub, conversation, "m1", 1);
        let (tx, _rx) = outbox();
        let (_, _, sequence, _) = accepted(hub.admit(&u("alice"), conversation, "m2", 1, &tx));
        hub.release(conversation, sequence);
        let (_, _, again, _) = accepted(hub.admit(&u("alice"), conversation, "m2", 1, &tx));
        assert_eq!(again, sequence);
    }

    #[test]
    fn only_a_conversation_the_log_lacks_gets_a_conversation_started() {
        let (tx, _rx) = outbox();
        let (fresh, conversation) = hub_holding_new("alice", "m1");
        let (_, _, _, new) = accepted(fresh.admit(&u("alice"), conversation, "m1", 1, &tx));
        assert!(new, "a new conversation's first query writes ConversationStarted");
        // Its ConversationStarted reached the log but the query did not: adopted again
        // from the log, its first query must not start it a second time.
        let adopted = Hub::new(TOPIC);
        adopted.adopt(conversation, ConversationHead::started(u("alice")), 0, []);
        let (_, _, sequence, new) = accepted(adopted.admit(&u("alice"), conversation, "m1", 1, &tx));
        assert_eq!((sequence, new), (2, false));
    }

    #[test]
    fn a_new_conversation_lands_in_its_lane_and_a_resend_names_it_again() {
        let layout: LaneLayout = "premium=0,batch=5".parse().unwrap();
        for lane in Lane::ALL {
            for n in 0..20 {
                let message = format!("m-{n}");
                let id = new_conversation_id(&u("alice"), &message, lane, &layout, 6);
                assert_eq!(layout.lane_of(partition_for_key(id.to_string().as_bytes(), 6)), lane);
                assert_eq!(new_conversation_id(&u("alice"), &message, lane, &layout, 6), id);
            }
        }
        // One lane: the first candidate, as before lanes existed.
        let single = new_conversation_id(&u("alice"), "m-1", Lane::Premium, &LaneLayout::default(), 6);
        assert_eq!(single, Uuid::new_v5(&NEW_CONVERSATION_NAMESPACE, b"alice/m-1").into());
    }
}
