//! The histories inference keeps of the conversations its partitions hold, so a turn's
//! earlier messages need no read of the projection. Pure: no I/O.
//!
//! Every event inference reads goes through [`Histories::observe`] in log order. A
//! conversation that starts while its partition is held is kept from its first event; one
//! that started before is kept from its first question here, seeded with the history read
//! from the projection ([`Histories::seed`]). A kept history is used only when it holds
//! every event before the question (sequences are dense: nothing can be missing unseen);
//! an event that skips a sequence (the partition went to another instance and came back)
//! drops it, and the next question reads the projection again.
//!
//! Memory is bounded by `max_bytes` of message text: the least recently used conversations
//! are dropped first, and one longer than an eighth of the bound is never kept.

use std::collections::{BTreeMap, HashMap};

use parley_events::conversation::{Message, message_of};
use parley_events::{ConversationEvent, ConversationId, EventId, UserId};

use crate::prompt::PastKnowledge;

/// What a kept message costs besides its text (ids, times, counts), in bytes.
const MESSAGE_OVERHEAD: usize = 160;

/// A conversation's history as read so far.
#[derive(Debug)]
struct Kept {
    owner: Option<UserId>,
    messages: Vec<Message>,
    /// The knowledge block each question answered here was sent with.
    knowledge: PastKnowledge,
    /// The last sequence applied: every event up to it is held.
    through: i64,
    bytes: usize,
    /// When it was last used (a tick of [`Histories::clock`]).
    used: u64,
}

/// The histories kept, by conversation, bounded in bytes.
#[derive(Debug)]
pub struct Histories {
    kept: HashMap<ConversationId, Kept>,
    /// Conversations by last use, oldest first.
    by_use: BTreeMap<u64, ConversationId>,
    clock: u64,
    bytes: usize,
    max_bytes: usize,
}

/// How a question's history was found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Found {
    /// Kept here: no read.
    Kept,
    /// Not kept (a conversation started before this instance held its partition, dropped
    /// for memory, or a sequence missed): read from the projection or the log.
    NotKept,
}

impl Histories {
    /// Keeps at most `max_bytes` of history (0: none).
    pub fn new(max_bytes: usize) -> Self {
        Self { kept: HashMap::new(), by_use: BTreeMap::new(), clock: 0, bytes: 0, max_bytes }
    }

    /// Applies one event read from the log.
    pub fn observe(&mut self, event: &ConversationEvent) {
        let envelope = event.envelope();
        let id = envelope.conversation_id;
        if let ConversationEvent::Started(started) = event {
            if envelope.sequence == parley_events::turn::STARTED_SEQUENCE && self.max_bytes > 0 {
                let owner = Some(started.user_id.clone());
                let kept = Kept {
                    owner,
                    messages: Vec::new(),
                    knowledge: PastKnowledge::new(),
                    through: envelope.sequence,
                    bytes: 0,
                    used: 0,
                };
                self.insert(id, kept);
            }
            return;
        }
        let Some(kept) = self.kept.get_mut(&id) else { return };
        match envelope.sequence - kept.through {
            // Read again (a redelivery), or a cancel (it carries its question's sequence).
            ..=0 => {}
            1 => {
                kept.through = envelope.sequence;
                if let Some(message) = message_of(event) {
                    let cost = cost_of(&message);
                    kept.bytes += cost;
                    self.bytes += cost;
                    kept.messages.push(message);
                }
                if kept.bytes > self.max_bytes / 8 {
                    self.remove(&id);
                }
                self.shrink();
            }
            // A sequence was skipped here: this history is not whole any more.
            _ => self.remove(&id),
        }
    }

    /// The messages before `sequence` of `id`, if every one of them is kept, with the
    /// knowledge their questions were sent with (of those answered here).
    pub fn before(&mut self, id: ConversationId, sequence: i64) -> Option<(Vec<Message>, PastKnowledge)> {
        let kept = self.kept.get(&id)?;
        if kept.through < sequence - 1 {
            return None;
        }
        let messages: Vec<Message> = kept.messages.iter().filter(|m| m.sequence < sequence).cloned().collect();
        let knowledge = messages
            .iter()
            .filter_map(|m| kept.knowledge.get(&m.event_id).map(|block| (m.event_id, block.clone())))
            .collect();
        self.touch(id);
        Some((messages, knowledge))
    }

    /// Keeps the knowledge block `question` of `id` was sent with (the next prompt sends
    /// the question with it again).
    pub fn remember_knowledge(&mut self, id: ConversationId, question: EventId, block: String) {
        let Some(kept) = self.kept.get_mut(&id) else { return };
        let cost = block.len();
        if let Some(previous) = kept.knowledge.insert(question, block) {
            kept.bytes -= previous.len();
            self.bytes -= previous.len();
        }
        kept.bytes += cost;
        self.bytes += cost;
        if kept.bytes > self.max_bytes / 8 {
            self.remove(&id);
        }
        self.shrink();
    }

    /// Keeps `messages`, every message of `id` before `sequence` (read from the projection
    /// or the log), then `question` (the event at `sequence`) on top: later events extend
    /// it as they are read.
    pub fn seed(&mut self, id: ConversationId, sequence: i64, messages: &[Message], question: &ConversationEvent) {
        if self.max_bytes == 0 || self.kept.get(&id).is_some_and(|k| k.through >= sequence) {
            return;
        }
        let messages: Vec<Message> = messages.iter().filter(|m| m.sequence < sequence).cloned().collect();
        let bytes = messages.iter().map(cost_of).sum();
        let owner = match question {
            ConversationEvent::QueryReceived(query) => Some(query.user_id.clone()),
            _ => None,
        };
        let kept = Kept { owner, messages, knowledge: PastKnowledge::new(), through: sequence - 1, bytes, used: 0 };
        self.insert(id, kept);
        self.observe(question);
    }

    /// Drops every history `owner` holds (their data was erased).
    pub fn forget_owner(&mut self, owner: &UserId) {
        let theirs: Vec<ConversationId> =
            self.kept.iter().filter(|(_, k)| k.owner.as_ref() == Some(owner)).map(|(id, _)| *id).collect();
        theirs.iter().for_each(|id| self.remove(id));
    }

    /// Drops every history.
    pub fn forget_all(&mut self) {
        self.kept.clear();
        self.by_use.clear();
        self.bytes = 0;
    }

    /// How many conversations and bytes are kept.
    pub fn size(&self) -> (usize, usize) {
        (self.kept.len(), self.bytes)
    }

    fn insert(&mut self, id: ConversationId, kept: Kept) {
        self.remove(&id);
        if kept.bytes > self.max_bytes / 8 {
            return;
        }
        self.bytes += kept.bytes;
        self.kept.insert(id, kept);
        self.touch(id);
        self.shrink();
    }

    fn touch(&mut self, id: ConversationId) {
        self.clock += 1;
        if let Some(kept) = self.kept.get_mut(&id) {
            self.by_use.remove(&kept.used);
            kept.used = self.clock;
            self.by_use.insert(self.clock, id);
        }
    }

    fn remove(&mut self, id: &ConversationId) {
        if let Some(kept) = self.kept.remove(id) {
            self.by_use.remove(&kept.used);
            self.bytes -= kept.bytes;
        }
    }

    /// Drops the least recently used histories until the bound holds.
    fn shrink(&mut self) {
        while self.bytes > self.max_bytes {
            let Some((_, oldest)) = self.by_use.pop_first() else { return };
            if let Some(kept) = self.kept.remove(&oldest) {
                self.bytes -= kept.bytes;
            }
        }
    }
}

fn cost_of(message: &Message) -> usize {
    message.text.len() + MESSAGE_OVERHEAD
}

#[cfg(test)]
mod tests {
    use parley_events::conversation::ConversationState;
    use parley_events::{
        ConversationStarted, Envelope, EventId, LLMResponseGenerated, Producer, TurnCancelRequested, UserQueryReceived,
    };

    use super::*;

    const P: Producer = Producer { name: "test", version: "0" };

    fn started(id: ConversationId) -> ConversationEvent {
        ConversationEvent::Started(ConversationStarted {
            envelope: Envelope::new(EventId::random(), id, 1, P),
            user_id: "u-ann".parse().unwrap(),
        })
    }

    fn query(id: ConversationId, sequence: i64, text: &str) -> ConversationEvent {
        ConversationEvent::QueryReceived(UserQueryReceived {
            envelope: Envelope::new(EventId::random(), id, sequence, P),
            user_id: "u-ann".parse().unwrap(),
            client_message_id: format!("m-{sequence}"),
            text: text.into(),
            no_cache: false,
            sealed_for: String::new(),
        })
    }

    fn answer(question: &ConversationEvent, text: &str) -> ConversationEvent {
        let ConversationEvent::QueryReceived(q) = question else { panic!() };
        let envelope = Envelope::new(EventId::random(), q.envelope.conversation_id, q.envelope.sequence + 1, P);
        let answer = crate::cancel::Partial::default().into_answer(envelope, q, "m", 3, vec![]);
        ConversationEvent::ResponseGenerated(LLMResponseGenerated { text: text.into(), ..answer })
    }

    fn conversation(id: ConversationId, turns: usize) -> Vec<ConversationEvent> {
        let mut events = vec![started(id)];
        for turn in 0..turns {
            let q = query(id, 2 + 2 * turn as i64, &format!("question {turn}"));
            let a = answer(&q, &format!("answer {turn}"));
            events.extend([q, a]);
        }
        events
    }

    #[test]
    fn a_conversation_read_from_its_start_is_kept_as_the_projection_folds_it() {
        let id = ConversationId::random();
        let events = conversation(id, 3);
        let mut histories = Histories::new(1 << 20);
        events.iter().for_each(|e| histories.observe(e));
        let next = query(id, 8, "question 3");
        histories.observe(&next);
        let (kept, knowledge) = histories.before(id, 8).expect("kept whole");
        assert!(knowledge.is_empty());
        let folded = ConversationState::fold(&events).unwrap().messages;
        assert_eq!(kept, folded, "the same messages the projection's fold holds");
        assert_eq!(histories.before(id, 4).unwrap().0.len(), 2, "only what came before");
        let first_question = events[1].envelope().event_id;
        histories.remember_knowledge(id, first_question, "Use this context: ...".into());
        assert_eq!(
            histories.before(id, 8).unwrap().1.get(&first_question).map(String::as_str),
            Some("Use this context: ...")
        );
        assert!(histories.before(id, 2).unwrap().1.is_empty(), "only for questions before");
    }

    #[test]
    fn a_conversation_begun_elsewhere_is_kept_once_seeded_and_a_skipped_sequence_drops_it() {
        let id = ConversationId::random();
        let events = conversation(id, 2);
        let mut histories = Histories::new(1 << 20);
        events[3..].iter().for_each(|e| histories.observe(e)); // read from the middle
        let question = query(id, 6, "question 2");
        histories.observe(&question);
        assert_eq!(histories.before(id, 6), None, "not kept: the projection is read");
        let projected = ConversationState::fold(&events).unwrap().messages;
        histories.seed(id, 6, &projected, &question);
        let a = answer(&question, "answer 2");
        histories.observe(&a);
        let cancel = ConversationEvent::CancelRequested(TurnCancelRequested {
            envelope: Envelope::new(EventId::random(), id, 6, P),
            query_event_id: question.envelope().event_id,
            user_id: "u-ann".parse().unwrap(),
        });
        histories.observe(&cancel);
        histories.observe(&a); // delivered again
        let next = query(id, 8, "question 3");
        histories.observe(&next);
        assert_eq!(histories.before(id, 8).unwrap().0.len(), 6);

        histories.observe(&query(id, 11, "after a gap"));
        assert_eq!(histories.before(id, 12), None, "a skipped sequence drops the history");
    }

    #[test]
    fn memory_is_bounded_and_the_least_recently_used_go_first() {
        let mut histories = Histories::new(8 * 4 * (MESSAGE_OVERHEAD + 16));
        let ids: Vec<ConversationId> = (0..12).map(|_| ConversationId::random()).collect();
        for id in &ids {
            conversation(*id, 2).iter().for_each(|e| histories.observe(e));
        }
        let (conversations, bytes) = histories.size();
        assert!(bytes <= 8 * 4 * (MESSAGE_OVERHEAD + 16) && conversations < 12, "{conversations} {bytes}");
        assert_eq!(histories.before(ids[0], 6), None, "the oldest went first");
        assert!(histories.before(ids[11], 6).is_some(), "the newest stays");

        let mut none = Histories::new(0);
        conversation(ids[0], 1).iter().for_each(|e| none.observe(e));
        assert_eq!(none.size(), (0, 0), "0 keeps nothing");
    }

    #[test]
    fn an_erased_owner_s_histories_are_forgotten() {
        let id = ConversationId::random();
        let mut histories = Histories::new(1 << 20);
        conversation(id, 1).iter().for_each(|e| histories.observe(e));
        histories.forget_owner(&"u-ann".parse().unwrap());
        assert_eq!(histories.size(), (0, 0));
    }
}
