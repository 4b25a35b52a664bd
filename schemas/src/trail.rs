//! One person's trail through the log (`parley audit --user`), for a support or compliance
//! request: their conversations (each summed up, with where it begins and ends in the log),
//! every budget refusal, their documents' submissions and deletions, every change of their
//! tier or budgets, their dead letters and their erasures. Structure only: no content, so
//! the trail of an erased person reads the same as anyone's. Pure: the records are fed in
//! log order by the caller.

use std::collections::{BTreeMap, HashMap};

use serde::Serialize;

use crate::budget::BUDGET_EXCEEDED;
use crate::dead_letters::Entry;
use crate::event::{AccountChanged, Budgets, ConversationEvent, DocumentEvent, ErasureEvent};
use crate::ids::{ConversationId, UserId};
use crate::position::LogPosition;

/// Where and when the log took a record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Place {
    /// `topic/partition/offset`.
    pub position: String,
    /// The record's log timestamp (ms since the epoch).
    pub at: i64,
}

impl Place {
    /// The place of the record at `position`, taken at `at`.
    pub fn new(position: &LogPosition, at: i64) -> Self {
        Self { position: position.to_string(), at }
    }
}

/// One conversation of the person, summed up.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ConversationSummary {
    /// Its id.
    pub conversation_id: ConversationId,
    /// Its first record in the window read (its ConversationStarted, unless `--since` cut it).
    pub first: Place,
    /// Its last record.
    pub last: Place,
    /// Whether its ConversationStarted was read (false: it began before `--since`).
    pub started_in_window: bool,
    /// Records read.
    pub events: u64,
    /// Questions asked.
    pub questions: u64,
    /// Answers given (from the model or the semantic cache).
    pub answers: u64,
    /// Answers served from the semantic cache (no model tokens).
    pub cached_answers: u64,
    /// Turns without an answer (budget refusals included).
    pub failures: u64,
    /// Cancels asked.
    pub cancels: u64,
    /// Model tokens charged to the person's budgets: prompt, then completion.
    pub prompt_tokens: i64,
    /// See `prompt_tokens`.
    pub completion_tokens: i64,
}

/// One dated fact of the trail other than a conversation summary.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Fact {
    /// A turn refused because a budget was spent.
    BudgetRefusal {
        /// The conversation.
        conversation_id: ConversationId,
        /// The refused question.
        query_event_id: String,
        /// The refusal's record.
        place: Place,
    },
    /// A document added.
    DocumentSubmitted {
        /// The document.
        document_id: String,
        /// Its media type.
        media_type: String,
        /// Its record.
        place: Place,
    },
    /// A document taken out.
    DocumentDeleted {
        /// The document.
        document_id: String,
        /// Its record.
        place: Place,
    },
    /// A record of theirs some consumer gave up on.
    DeadLetter {
        /// The letter (`<dead-letter topic>/<partition>/<offset>`).
        letter: String,
        /// The consumer that gave up.
        consumer: String,
        /// The record given up on.
        source: String,
        /// Open, redriven or discarded.
        status: String,
        /// Why it could not be read.
        error: String,
    },
    /// An operator changed the person's tier or budgets.
    AccountChanged {
        /// Who changed it.
        changed_by: String,
        /// The new tier, if it changed.
        tier: Option<String>,
        /// Their own budgets from then on, if they changed.
        budgets: Option<Budgets>,
        /// Its record.
        place: Place,
    },
    /// An erasure asked for.
    ErasureRequested {
        /// Who asked (`self` or `operator`).
        requested_by: String,
        /// Its record.
        place: Place,
    },
    /// An erasure done, with what was purged where.
    ErasureCompleted {
        /// When the data key was destroyed (ms since the epoch).
        key_erased_at: i64,
        /// Items purged per place.
        purged: BTreeMap<String, i64>,
        /// Its record.
        place: Place,
    },
}

/// A person's trail, built by feeding it the log's records.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize)]
pub struct UserTrail {
    /// Their conversations, in the order they appear.
    pub conversations: Vec<ConversationSummary>,
    /// Everything else, in the order fed.
    pub facts: Vec<Fact>,
    #[serde(skip)]
    index: HashMap<ConversationId, usize>,
}

impl UserTrail {
    /// Takes a conversation event: it belongs to the trail when it names `user` (a start, a
    /// question, an answer, a cancel) or its conversation already does. Outcomes name no
    /// user: the question before them in the same partition brought the conversation in.
    pub fn conversation_event(&mut self, user: &UserId, event: &ConversationEvent, place: Place) {
        let id = event.envelope().conversation_id;
        let names_user = match event {
            ConversationEvent::Started(started) => started.user_id == *user,
            ConversationEvent::QueryReceived(query) => query.user_id == *user,
            ConversationEvent::ResponseGenerated(answer) => answer.user_id.as_ref() == Some(user),
            ConversationEvent::CancelRequested(cancel) => cancel.user_id == *user,
            ConversationEvent::ResponseFailed(_) => false,
        };
        let slot = match self.index.get(&id) {
            Some(slot) => *slot,
            None if names_user => {
                self.conversations.push(ConversationSummary {
                    conversation_id: id,
                    first: place.clone(),
                    last: place.clone(),
                    started_in_window: false,
                    events: 0,
                    questions: 0,
                    answers: 0,
                    cached_answers: 0,
                    failures: 0,
                    cancels: 0,
                    prompt_tokens: 0,
                    completion_tokens: 0,
                });
                self.index.insert(id, self.conversations.len() - 1);
                self.conversations.len() - 1
            }
            None => return,
        };
        let summary = &mut self.conversations[slot];
        summary.events += 1;
        summary.last = place.clone();
        match event {
            ConversationEvent::Started(_) => summary.started_in_window = true,
            ConversationEvent::QueryReceived(_) => summary.questions += 1,
            ConversationEvent::ResponseGenerated(answer) => {
                summary.answers += 1;
                summary.cached_answers += u64::from(answer.cached_from.is_some());
                summary.prompt_tokens += i64::from(answer.prompt_tokens);
                summary.completion_tokens += i64::from(answer.completion_tokens);
            }
            ConversationEvent::ResponseFailed(failure) => {
                summary.failures += 1;
                if failure.error_kind == BUDGET_EXCEEDED {
                    self.facts.push(Fact::BudgetRefusal {
                        conversation_id: id,
                        query_event_id: failure.query_event_id.to_string(),
                        place,
                    });
                }
            }
            ConversationEvent::CancelRequested(_) => summary.cancels += 1,
        }
    }

    /// Takes a document event: kept when `user` owns the document.
    pub fn document_event(&mut self, user: &UserId, event: &DocumentEvent, place: Place) {
        match event {
            DocumentEvent::Submitted(submitted) if submitted.owner == *user => {
                self.facts.push(Fact::DocumentSubmitted {
                    document_id: submitted.document_id.to_string(),
                    media_type: submitted.media_type.clone(),
                    place,
                });
            }
            DocumentEvent::Deleted(deleted) if deleted.owner == *user => {
                self.facts.push(Fact::DocumentDeleted { document_id: deleted.document_id.to_string(), place });
            }
            _ => {}
        }
    }

    /// Takes an account change: kept when it is about `user`.
    pub fn account_event(&mut self, user: &UserId, change: &AccountChanged, place: Place) {
        if change.user_id == *user {
            self.facts.push(Fact::AccountChanged {
                changed_by: change.changed_by.clone(),
                tier: change.tier.clone(),
                budgets: change.budgets,
                place,
            });
        }
    }

    /// Takes an erasure event: kept when it is about `user`.
    pub fn erasure_event(&mut self, user: &UserId, event: &ErasureEvent, place: Place) {
        if event.user_id() != user {
            return;
        }
        self.facts.push(match event {
            ErasureEvent::Requested(request) => {
                Fact::ErasureRequested { requested_by: request.requested_by.clone(), place }
            }
            ErasureEvent::Completed(done) => Fact::ErasureCompleted {
                key_erased_at: done.key_erased_at,
                purged: done.purged.iter().map(|p| (p.place.clone(), p.items)).collect(),
                place,
            },
        });
    }

    /// Takes the dead letters of the trail's conversations and of `documents` (the letters'
    /// keys are conversation and document ids).
    pub fn dead_letters<'a>(&mut self, letters: impl IntoIterator<Item = &'a Entry>, documents: &[String]) {
        for entry in letters {
            let Some(key) = entry.letter.key.as_deref().and_then(|k| std::str::from_utf8(k).ok()) else { continue };
            let of_conversation = key.parse::<ConversationId>().is_ok_and(|id| self.index.contains_key(&id));
            if of_conversation || documents.iter().any(|d| d == key) {
                self.facts.push(Fact::DeadLetter {
                    letter: entry.id.to_string(),
                    consumer: entry.letter.consumer.clone(),
                    source: entry.letter.source().to_string(),
                    status: entry.status.as_str().to_owned(),
                    error: entry.letter.error.clone(),
                });
            }
        }
    }

    /// The ids of the documents the trail holds.
    pub fn document_ids(&self) -> Vec<String> {
        let mut ids: Vec<String> = self
            .facts
            .iter()
            .filter_map(|fact| match fact {
                Fact::DocumentSubmitted { document_id, .. } | Fact::DocumentDeleted { document_id, .. } => {
                    Some(document_id.clone())
                }
                _ => None,
            })
            .collect();
        ids.sort();
        ids.dedup();
        ids
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::*;
    use crate::ids::{DocumentId, EventId};
    use crate::test_events::{P, alice, query};

    fn place(offset: i64) -> Place {
        Place::new(&LogPosition { topic: "events".into(), partition: 0, offset }, 1000 + offset)
    }

    fn failed(conversation: ConversationId, sequence: i64, kind: &str) -> ConversationEvent {
        ConversationEvent::ResponseFailed(LLMResponseFailed {
            envelope: Envelope::new(EventId::random(), conversation, sequence, P),
            query_event_id: EventId::random(),
            error_kind: kind.into(),
            error_message: "spent".into(),
            attempts: 0,
        })
    }

    fn started(conversation: ConversationId, owner: &str) -> ConversationEvent {
        ConversationEvent::Started(ConversationStarted {
            envelope: Envelope::new(EventId::random(), conversation, 1, P),
            user_id: owner.parse().unwrap(),
        })
    }

    #[test]
    fn a_persons_conversations_are_summed_up_and_others_left_out() {
        let (mine, theirs) = (ConversationId::random(), ConversationId::random());
        let mut trail = UserTrail::default();
        let user = alice();
        trail.conversation_event(&user, &started(mine, "alice"), place(1));
        trail.conversation_event(&user, &started(theirs, "bob"), place(2));
        trail.conversation_event(&user, &query(mine, 2, "m1"), place(3));
        trail.conversation_event(&user, &failed(theirs, 3, BUDGET_EXCEEDED), place(4));
        let refusal = failed(mine, 3, BUDGET_EXCEEDED);
        trail.conversation_event(&user, &refusal, place(5));
        assert_eq!(trail.conversations.len(), 1);
        let summary = &trail.conversations[0];
        assert_eq!((summary.events, summary.questions, summary.failures), (3, 1, 1));
        assert!(summary.started_in_window);
        assert_eq!((summary.first.position.as_str(), summary.last.position.as_str()), ("events/0/1", "events/0/5"));
        let ConversationEvent::ResponseFailed(refused) = refusal else { unreachable!() };
        assert_eq!(
            trail.facts,
            [Fact::BudgetRefusal {
                conversation_id: mine,
                query_event_id: refused.query_event_id.to_string(),
                place: place(5)
            }]
        );
    }

    #[test]
    fn a_conversation_begun_before_the_window_joins_at_its_first_question() {
        let id = ConversationId::random();
        let mut trail = UserTrail::default();
        trail.conversation_event(&alice(), &failed(id, 3, "timeout"), place(1));
        trail.conversation_event(&alice(), &query(id, 4, "m2"), place(2));
        assert_eq!(trail.conversations.len(), 1);
        assert!(!trail.conversations[0].started_in_window);
        assert_eq!(trail.conversations[0].events, 1);
    }

    #[test]
    fn documents_and_erasures_of_the_person_are_kept() {
        let user = alice();
        let document = DocumentId::random();
        let mut trail = UserTrail::default();
        let deleted = |owner: &str| {
            DocumentEvent::Deleted(DocumentDeleted {
                envelope: Envelope::new(EventId::random(), ConversationId::random(), 1, P),
                document_id: document,
                owner: owner.parse().unwrap(),
            })
        };
        trail.document_event(&user, &deleted("bob"), place(1));
        trail.document_event(&user, &deleted("alice"), place(2));
        let completed = ErasureEvent::Completed(ErasureCompleted {
            envelope: Envelope::new(EventId::random(), ConversationId::random(), 2, P),
            user_id: user.clone(),
            request_event_id: EventId::random(),
            key_erased_at: 7,
            purged: vec![PurgedPlace { place: "cql:messages".into(), items: 4 }],
        });
        let change = |who: &str| AccountChanged {
            envelope: Envelope::new(EventId::random(), user.account_stream(), 1, P),
            user_id: who.parse().unwrap(),
            changed_by: "operator".into(),
            tier: Some("premium".into()),
            budgets: None,
        };
        trail.account_event(&user, &change("bob"), place(5));
        trail.account_event(&user, &change("alice"), place(6));
        trail.erasure_event(&"bob".parse().unwrap(), &completed, place(3));
        trail.erasure_event(&user, &completed, place(4));
        assert_eq!(trail.document_ids(), [document.to_string()]);
        assert_eq!(trail.facts.len(), 3);
        assert!(matches!(&trail.facts[1], Fact::AccountChanged { tier: Some(tier), .. } if tier == "premium"));
        assert_eq!(
            trail.facts[2],
            Fact::ErasureCompleted {
                key_erased_at: 7,
                purged: BTreeMap::from([("cql:messages".to_owned(), 4)]),
                place: place(4)
            }
        );
    }
}
