//! What this gateway has read of the events topic that the projection may not have applied
//! yet: per partition, the few facts of each conversation a writer needs (owner, sequences,
//! queries), from where the projection stood when the gateway started to where its own
//! listener has read. The projection's row plus these facts is the conversation as the log
//! has it, so "new, duplicate or next turn" is decided without waiting for the read model.
//! Facts the projection has applied are pruned ([`RecentEvents::prune`]); a window that
//! outgrows its cap drops its oldest facts, and an adoption in that partition then waits
//! for the projection to reach them, as every adoption once did. [`RecentEvents`] is pure;
//! [`Recent`] shares it between the listener and the sockets.

use std::collections::{HashMap, VecDeque};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::sync::Notify;

use parley_events::turn::{ConversationHead, OpenQuery};
use parley_events::{ConversationEvent, ConversationId, EventId, UserId};

use crate::hub::WrittenQuery;

/// What a writer keeps of one event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fact {
    /// A `ConversationStarted`.
    Started {
        /// The conversation's owner.
        owner: UserId,
    },
    /// A query.
    Query {
        /// Its event id.
        id: EventId,
        /// Its sequence.
        sequence: i64,
        /// The client's id of the message.
        client_message_id: String,
    },
    /// An outcome (or any other event that takes a sequence and opens no turn).
    Closed {
        /// Its sequence.
        sequence: i64,
    },
}

impl Fact {
    /// The fact an event is to a writer; none for a cancel request (it advances nothing).
    pub fn of(event: &ConversationEvent) -> Option<Self> {
        let sequence = event.envelope().sequence;
        match event {
            ConversationEvent::Started(started) => Some(Fact::Started { owner: started.user_id.clone() }),
            ConversationEvent::QueryReceived(query) => Some(Fact::Query {
                id: query.envelope.event_id,
                sequence,
                client_message_id: query.client_message_id.clone(),
            }),
            ConversationEvent::ResponseGenerated(_) | ConversationEvent::ResponseFailed(_) => {
                Some(Fact::Closed { sequence })
            }
            ConversationEvent::CancelRequested(_) => None,
        }
    }
}

/// A conversation as a writer knows it: its head and every query written to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Known {
    /// Owner, last sequence and open turn.
    pub head: ConversationHead,
    /// Every query written to it, by event id.
    pub queries: HashMap<EventId, WrittenQuery>,
}

#[derive(Debug, Default)]
struct PartitionWindow {
    /// The first offset whose facts are all here (or pruned as applied by the projection).
    from: i64,
    /// The next offset the listener will read: everything before it was read.
    next: i64,
    /// Every fact's offset and conversation, in log order (what pruning walks).
    order: VecDeque<(i64, ConversationId)>,
    by_conversation: HashMap<ConversationId, VecDeque<(i64, Fact)>>,
}

impl PartitionWindow {
    /// Drops the oldest fact; returns its offset.
    fn pop_oldest(&mut self) -> Option<i64> {
        let (offset, conversation) = self.order.pop_front()?;
        if let Some(facts) = self.by_conversation.get_mut(&conversation) {
            facts.pop_front();
            if facts.is_empty() {
                self.by_conversation.remove(&conversation);
            }
        }
        Some(offset)
    }
}

/// The facts read past the projection, per partition of the events topic.
#[derive(Debug)]
pub struct RecentEvents {
    partitions: HashMap<i32, PartitionWindow>,
    /// Facts kept per partition at most.
    cap: usize,
}

impl RecentEvents {
    /// A window keeping at most `cap` facts per partition.
    pub fn new(cap: usize) -> Self {
        Self { partitions: HashMap::new(), cap: cap.max(1) }
    }

    /// The listener reads `partition` from `offset` on.
    pub fn start(&mut self, partition: i32, offset: i64) {
        self.partitions.insert(partition, PartitionWindow { from: offset, next: offset, ..PartitionWindow::default() });
    }

    /// The listener read the record at `offset` (of `conversation`, with `fact`, if it is one).
    pub fn record(&mut self, partition: i32, offset: i64, conversation: Option<ConversationId>, fact: Option<Fact>) {
        let Some(window) = self.partitions.get_mut(&partition) else { return };
        window.next = window.next.max(offset + 1);
        let (Some(conversation), Some(fact)) = (conversation, fact) else { return };
        if offset < window.from {
            return;
        }
        window.order.push_back((offset, conversation));
        window.by_conversation.entry(conversation).or_default().push_back((offset, fact));
        while window.order.len() > self.cap {
            if let Some(dropped) = window.pop_oldest() {
                window.from = window.from.max(dropped + 1);
            }
        }
    }

    /// The listener reached the end of `partition`: its position (past any transaction
    /// markers after the last record) is `position`.
    pub fn reached(&mut self, partition: i32, position: i64) {
        if let Some(window) = self.partitions.get_mut(&partition) {
            window.next = window.next.max(position);
        }
    }

    /// The next offset the listener will read on `partition` (everything before it is here).
    pub fn read_to(&self, partition: i32) -> Option<i64> {
        self.partitions.get(&partition).map(|w| w.next)
    }

    /// The first offset of `partition` whose facts are here: a projection that has applied
    /// everything before it, plus these facts, is the whole partition read so far.
    pub fn from(&self, partition: i32) -> Option<i64> {
        self.partitions.get(&partition).map(|w| w.from)
    }

    /// The projection has applied everything of `partition` before `applied_next`: its facts
    /// are in the read model now.
    pub fn prune(&mut self, partition: i32, applied_next: i64) {
        let Some(window) = self.partitions.get_mut(&partition) else { return };
        while window.order.front().is_some_and(|(offset, _)| *offset < applied_next) {
            window.pop_oldest();
        }
        window.from = window.from.max(applied_next.min(window.next));
    }

    /// The offset of `conversation`'s outcome at `sequence`, if it is among the facts.
    pub fn outcome_offset(&self, partition: i32, conversation: ConversationId, sequence: i64) -> Option<i64> {
        let facts = self.partitions.get(&partition)?.by_conversation.get(&conversation)?;
        facts.iter().find_map(|(offset, fact)| (*fact == Fact::Closed { sequence }).then_some(*offset))
    }

    /// Facts held, over all partitions.
    pub fn facts(&self) -> usize {
        self.partitions.values().map(|w| w.order.len()).sum()
    }

    /// `conversation` as the log has it: what the projection knows (`projected`, read after
    /// it had applied everything before [`Self::from`]) with the facts read past it
    /// applied idempotently by sequence. `None`: the log has no such conversation.
    pub fn merge(&self, partition: i32, conversation: ConversationId, projected: Option<Known>) -> Option<Known> {
        let facts = self.partitions.get(&partition).and_then(|w| w.by_conversation.get(&conversation));
        let mut known = projected;
        for (offset, fact) in facts.into_iter().flatten() {
            match (fact, &mut known) {
                (Fact::Started { owner }, None) => {
                    known = Some(Known { head: ConversationHead::started(owner.clone()), queries: HashMap::new() });
                }
                (Fact::Started { .. }, Some(_)) => {}
                (Fact::Query { id, sequence, client_message_id }, Some(known)) => {
                    known.queries.entry(*id).or_insert(WrittenQuery { sequence: *sequence, offset: *offset });
                    let opens =
                        OpenQuery { event_id: *id, sequence: *sequence, client_message_id: client_message_id.clone() };
                    known.head.advance_over_gaps(*sequence, Some(opens));
                }
                (Fact::Closed { sequence }, Some(known)) => {
                    known.head.advance_over_gaps(*sequence, None);
                }
                // A query or outcome of a conversation the log never started: not a conversation.
                (Fact::Query { .. } | Fact::Closed { .. }, None) => {}
            }
        }
        known
    }
}

/// [`RecentEvents`] shared: the listener writes it, adoptions read it and wait for the
/// listener to have read a partition far enough.
#[derive(Debug)]
pub struct Recent {
    events: Mutex<RecentEvents>,
    advanced: Notify,
}

impl Recent {
    /// Shared facts, at most `cap` per partition.
    pub fn new(cap: usize) -> Self {
        Self { events: Mutex::new(RecentEvents::new(cap)), advanced: Notify::new() }
    }

    /// The window, locked. Whoever changes what a hub holds from it (the listener applying
    /// an event, an adoption) does so under this lock, so no event falls between them.
    pub fn lock(&self) -> MutexGuard<'_, RecentEvents> {
        self.events.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Wakes the adoptions waiting for the listener (call after it read on).
    pub fn advanced(&self) {
        self.advanced.notify_waiters();
    }

    /// Waits up to `bound` until the listener has read `partition` up to `end` (exclusive).
    pub async fn wait_until_read(&self, partition: i32, end: i64, bound: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + bound;
        loop {
            let notified = self.advanced.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.lock().read_to(partition).is_some_and(|next| next >= end) {
                return true;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return false;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use uuid::Uuid;

    use super::*;

    fn user(name: &str) -> UserId {
        name.parse().unwrap()
    }

    fn query(id: u128, sequence: i64) -> Fact {
        Fact::Query { id: Uuid::from_u128(id).into(), sequence, client_message_id: format!("m{id}") }
    }

    fn started(owner: &str) -> Fact {
        Fact::Started { owner: user(owner) }
    }

    #[test]
    fn a_conversation_the_projection_has_not_applied_is_known_from_the_facts() {
        let c = ConversationId::random();
        let mut recent = RecentEvents::new(100);
        recent.start(3, 40);
        recent.record(3, 40, Some(c), Some(started("alice")));
        recent.record(3, 41, Some(c), Some(query(7, 2)));
        let known = recent.merge(3, c, None).expect("started in the window");
        assert_eq!(known.head.owner, "alice");
        assert_eq!(known.head.last_sequence, 2);
        assert_eq!(known.head.open_query.as_ref().map(|q| q.client_message_id.as_str()), Some("m7"));
        assert_eq!(known.queries[&EventId::from(Uuid::from_u128(7))], WrittenQuery { sequence: 2, offset: 41 });
        assert_eq!(recent.read_to(3), Some(42));
        assert_eq!(recent.merge(3, ConversationId::random(), None), None, "another conversation is new");
    }

    #[test]
    fn facts_extend_the_projected_row_idempotently() {
        let c = ConversationId::random();
        let mut recent = RecentEvents::new(100);
        recent.start(0, 10);
        // The projection applied the first turn already (offsets 10 and 11), not the second.
        recent.record(0, 10, Some(c), Some(query(1, 2)));
        recent.record(0, 11, Some(c), Some(Fact::Closed { sequence: 3 }));
        recent.record(0, 12, Some(c), Some(query(2, 4)));
        let mut head = ConversationHead::started(user("alice"));
        head.last_sequence = 3;
        let projected = Known {
            head,
            queries: HashMap::from([(EventId::from(Uuid::from_u128(1)), WrittenQuery { sequence: 2, offset: 10 })]),
        };
        let known = recent.merge(0, c, Some(projected)).unwrap();
        assert_eq!(known.head.last_sequence, 4);
        assert_eq!(known.head.admit(&user("alice")).map_err(|_| ()), Err(()), "the second turn is open");
        assert_eq!(known.queries.len(), 2);
        assert_eq!(known.queries[&EventId::from(Uuid::from_u128(2))].offset, 12);
        assert_eq!(recent.outcome_offset(0, c, 3), Some(11), "where the first turn's answer is");
        assert_eq!(recent.outcome_offset(0, c, 5), None);
    }

    #[test]
    fn pruning_drops_what_the_projection_applied_and_moves_the_window() {
        let (a, b) = (ConversationId::random(), ConversationId::random());
        let mut recent = RecentEvents::new(100);
        recent.start(1, 0);
        recent.record(1, 0, Some(a), Some(started("alice")));
        recent.record(1, 1, Some(b), Some(started("bob")));
        recent.record(1, 2, None, None);
        recent.prune(1, 1);
        assert_eq!(recent.facts(), 1);
        assert_eq!(recent.from(1), Some(1));
        assert_eq!(recent.merge(1, a, None), None, "a's start is the projection's now");
        assert!(recent.merge(1, b, None).is_some());
        recent.prune(1, 9);
        assert_eq!(recent.from(1), Some(3), "never past what the listener read");
    }

    #[test]
    fn a_window_over_its_cap_forgets_its_oldest_facts_and_says_so() {
        let c = ConversationId::random();
        let mut recent = RecentEvents::new(2);
        recent.start(0, 0);
        for offset in 0..5 {
            recent.record(0, offset, Some(c), Some(query(offset as u128, offset + 2)));
        }
        assert_eq!(recent.facts(), 2);
        assert_eq!(recent.from(0), Some(3), "an adoption here must wait for the projection to reach 3");
    }

    #[test]
    fn the_end_of_a_partition_moves_the_read_position_past_its_markers() {
        let mut recent = RecentEvents::new(10);
        recent.start(2, 5);
        recent.record(2, 5, None, None);
        recent.reached(2, 8);
        assert_eq!(recent.read_to(2), Some(8));
        recent.reached(2, 7);
        assert_eq!(recent.read_to(2), Some(8), "never backwards");
        assert_eq!(recent.read_to(9), None);
    }

    #[test]
    fn a_cancel_request_is_no_fact() {
        let c = ConversationId::random();
        let cancel = ConversationEvent::CancelRequested(parley_events::TurnCancelRequested {
            envelope: parley_events::Envelope::new(
                EventId::random(),
                c,
                2,
                parley_events::Producer { name: "t", version: "0" },
            ),
            query_event_id: EventId::random(),
            user_id: "alice".parse().unwrap(),
        });
        assert_eq!(Fact::of(&cancel), None);
    }
}
