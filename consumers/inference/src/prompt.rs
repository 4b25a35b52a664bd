//! Prompt assembly: what the model is asked, as plain data. Retrieved knowledge (document
//! chunks and messages of other conversations, best first) may take up to half of the
//! budget left after the system prompt and the question; earlier turns of this
//! conversation take the rest.
//!
//! The layout keeps a conversation's prompt prefix stable from turn to turn (see
//! [`PromptLayout::Stable`]), so a model server that caches prompts (llama.cpp, vLLM)
//! evaluates only what is new: the last answer and the new question. With retrieval on,
//! an earlier question goes in again with the knowledge it was sent with, when that is
//! known ([`PastKnowledge`]): the next prompt then begins with the whole previous one.

use std::collections::HashMap;

use parley_events::conversation::{Message, MessageKind};
use parley_events::{EventId, RetrievedContext, UserQueryReceived};
use parley_retrieval::{Hit, SourceKind};

/// How the parts of a prompt are placed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum PromptLayout {
    /// System prompt, then the history, then the retrieved knowledge with the question;
    /// old turns are dropped [`HISTORY_BLOCK`] at a time, so the prefix changes only when
    /// a block goes.
    Stable,
    /// Retrieved knowledge in the system message and the oldest turn dropped one at a
    /// time: every turn changes the prompt's beginning. Kept to measure the difference.
    Sliding,
}

/// Turns dropped together when the history outgrows its budget (stable layout).
pub const HISTORY_BLOCK: usize = 4;

/// Introduces retrieved knowledge.
pub const KNOWLEDGE_HEADER: &str = "Use this context from the user's documents and earlier conversations if it helps:";

/// Who says a message of the prompt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Instructions and retrieved knowledge.
    System,
    /// The person.
    User,
    /// The model.
    Assistant,
}

/// One message of the prompt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChatMessage {
    /// Who says it.
    pub role: Role,
    /// What is said.
    pub content: String,
}

/// A prompt and what it carries (both recorded in the response event).
#[derive(Debug, Clone, PartialEq)]
pub struct Prompt {
    /// The messages, in order.
    pub messages: Vec<ChatMessage>,
    /// Earlier turns of this conversation.
    pub context_event_ids: Vec<EventId>,
    /// Retrieved chunks and messages, best first.
    pub retrieved: Vec<RetrievedContext>,
    /// The knowledge block sent with the question (None: none was).
    pub knowledge: Option<String>,
    /// The earlier questions whose knowledge block the builder was given, in order (what
    /// it decided with: they go in with it when the history fits in whole blocks so).
    pub knowledge_turns: Vec<EventId>,
}

/// The knowledge block each earlier question was sent with, by question event id: what
/// [`PromptLayout::Stable`] sends again with it. Inference keeps those it sent; replay
/// rebuilds those an answer's proof lists from the earlier answers' `retrieved`.
pub type PastKnowledge = HashMap<EventId, String>;

/// A cheap, model-independent token estimate, used only to stay within the budget; the
/// model's own count is in the response usage. Three characters a token, not GPT's four:
/// small models split English finer (SmolLM2 made 19 tokens of 68 characters), and at four
/// a 1,536-token budget became a 2,056-token prompt that overflowed a 2,048-token context.
pub fn estimate_tokens(text: &str) -> usize {
    text.chars().count().div_ceil(3) + 6 // + per-message overhead of the chat template
}

/// The prompt for `query`: the system prompt, the retrieved hits that fit their share of
/// `budget` tokens, as many earlier turns (question and answer together; with the stable
/// layout, a question with the knowledge `past` holds for it) as fit the rest, then the
/// question, placed as `layout` says. Failures are not dialogue and are left out; a turn or
/// a hit is never cut in half.
pub fn build_prompt(
    system_prompt: &str,
    history: &[Message],
    query: &UserQueryReceived,
    retrieved: &[Hit],
    budget: usize,
    layout: PromptLayout,
    past: &PastKnowledge,
) -> Prompt {
    let system_cost = if system_prompt.is_empty() { 0 } else { estimate_tokens(system_prompt) };
    let mut spent = system_cost + estimate_tokens(&query.text);
    let knowledge_budget = budget.saturating_sub(spent) / 2;
    let mut knowledge_cost = estimate_tokens(KNOWLEDGE_HEADER);
    let mut hits: Vec<&Hit> = Vec::new();
    for hit in retrieved {
        let cost = estimate_tokens(&knowledge_line(hits.len() + 1, hit));
        if knowledge_cost + cost <= knowledge_budget {
            knowledge_cost += cost;
            hits.push(hit);
        }
    }
    if !hits.is_empty() {
        spent += knowledge_cost;
    }
    let past_given = past;
    let (turns, past) = earlier_turns(history, query.envelope.sequence, budget.saturating_sub(spent), layout, past);
    let knowledge = knowledge_block(&hits);

    let mut messages = Vec::with_capacity(2 + 2 * turns.len());
    let mut system = system_prompt.to_owned();
    let mut question = query.text.clone();
    match (layout, &knowledge) {
        (PromptLayout::Sliding, Some(knowledge)) => {
            if !system.is_empty() {
                system.push_str("\n\n");
            }
            system.push_str(knowledge);
        }
        (PromptLayout::Stable, Some(knowledge)) => question = with_knowledge(Some(knowledge), &question),
        (_, None) => {}
    }
    if !system.is_empty() {
        messages.push(ChatMessage { role: Role::System, content: system });
    }
    let mut context_event_ids = Vec::with_capacity(2 * turns.len());
    let knowledge_turns =
        if layout == PromptLayout::Stable { known_blocks(history, query, past_given) } else { vec![] };
    for (asked, answer) in turns {
        let sent_with = past.get(&asked.event_id);
        messages.push(ChatMessage { role: Role::User, content: with_knowledge(sent_with, &asked.text) });
        messages.push(ChatMessage { role: Role::Assistant, content: answer.text.clone() });
        context_event_ids.extend([asked.event_id, answer.event_id]);
    }
    messages.push(ChatMessage { role: Role::User, content: question });
    let retrieved = hits
        .iter()
        .map(|hit| RetrievedContext {
            vector_id: hit.id.clone(),
            source_kind: hit.kind.as_str().to_owned(),
            source_id: hit.source_id.clone(),
            source_event_id: hit.source_event_id,
            position: hit.position,
            // The cosine, as the event's schema defines the field; keyword mode has none.
            score: hit.similarity.unwrap_or(hit.score),
        })
        .collect();
    let knowledge = knowledge.filter(|_| layout == PromptLayout::Stable);
    Prompt { messages, context_event_ids, retrieved, knowledge, knowledge_turns }
}

/// The knowledge block of `hits` as a prompt carries it (None: no hits).
pub fn knowledge_block(hits: &[&Hit]) -> Option<String> {
    (!hits.is_empty()).then(|| {
        let lines = hits.iter().enumerate().map(|(i, hit)| knowledge_line(i + 1, hit));
        std::iter::once(KNOWLEDGE_HEADER.to_owned()).chain(lines).collect::<Vec<_>>().join("\n")
    })
}

/// A question as sent: after its knowledge block, when it had one.
fn with_knowledge(knowledge: Option<&String>, question: &str) -> String {
    match knowledge {
        Some(knowledge) => format!("{knowledge}\n\n{question}"),
        None => question.to_owned(),
    }
}

/// The earlier questions of `history` that `past` holds a block for, in order.
fn known_blocks(history: &[Message], query: &UserQueryReceived, past: &PastKnowledge) -> Vec<EventId> {
    history
        .iter()
        .filter(|m| m.sequence < query.envelope.sequence && past.contains_key(&m.event_id))
        .map(|m| m.event_id)
        .collect()
}

/// The whole turns before `sequence` that go into the prompt within `budget`, in order,
/// and the knowledge their questions go in with: the newest that fit (sliding), or the
/// shortest suffix starting at a multiple of [`HISTORY_BLOCK`] that fits (stable), falling
/// back to the newest that fit when even the last block is too long. Stable sends each
/// question with its `past` knowledge only when the history fits in whole blocks so: else
/// a turn would drop every turn and no prefix would stay put.
fn earlier_turns<'a, 'p>(
    history: &'a [Message],
    sequence: i64,
    budget: usize,
    layout: PromptLayout,
    past: &'p PastKnowledge,
) -> (Vec<(&'a Message, &'a Message)>, &'p PastKnowledge) {
    static NONE: std::sync::LazyLock<PastKnowledge> = std::sync::LazyLock::new(PastKnowledge::new);
    let dialogue: Vec<&Message> = history.iter().filter(|m| m.sequence < sequence).collect();
    let turns: Vec<(&Message, &Message)> = dialogue
        .windows(2)
        .map(|pair| (pair[0], pair[1]))
        .filter(|(question, answer)| {
            question.kind == MessageKind::UserQuery
                && answer.kind == MessageKind::Answer
                && answer.query_event_id == Some(question.event_id)
        })
        .collect();
    let cost = |turn: &(&Message, &Message), past: &PastKnowledge| {
        let knowledge = past.get(&turn.0.event_id).map_or(0, |k| estimate_tokens(k));
        knowledge + estimate_tokens(&turn.0.text) + estimate_tokens(&turn.1.text)
    };
    if layout == PromptLayout::Stable {
        let block_start = |past: &PastKnowledge| {
            // The cost of `turns[start..]` for every start, summed once from the end.
            let mut from = vec![0; turns.len() + 1];
            for (start, turn) in turns.iter().enumerate().rev() {
                from[start] = from[start + 1] + cost(turn, past);
            }
            (0..turns.len()).step_by(HISTORY_BLOCK).find(|start| from[*start] <= budget)
        };
        if !past.is_empty()
            && let Some(start) = block_start(past)
        {
            return (turns[start..].to_vec(), past);
        }
        if let Some(start) = block_start(&NONE) {
            return (turns[start..].to_vec(), &NONE);
        }
    }
    let mut spent = 0;
    let newest = turns.iter().rev().take_while(|turn| {
        spent += cost(turn, &NONE);
        spent <= budget
    });
    let count = newest.count();
    (turns[turns.len() - count..].to_vec(), &NONE)
}

/// One retrieved hit as the model sees it, e.g. `[1] (notes.md) Kafka keeps...`.
fn knowledge_line(number: usize, hit: &Hit) -> String {
    let origin = match hit.kind {
        SourceKind::Document => hit.label.clone(),
        SourceKind::Message => format!("earlier {} message", hit.label),
    };
    format!("[{number}] ({origin}) {}", hit.text.replace('\n', " "))
}

#[cfg(test)]
mod tests {
    use parley_events::ConversationId;
    use parley_events::{Envelope, Producer};
    use uuid::Uuid;

    use super::*;

    fn query(sequence: i64, text: &str) -> UserQueryReceived {
        UserQueryReceived {
            sealed_for: String::new(),
            envelope: Envelope::new(
                EventId::random(),
                ConversationId::random(),
                sequence,
                Producer { name: "t", version: "0" },
            ),
            user_id: "u".parse().unwrap(),
            client_message_id: "m".into(),
            text: text.into(),
            no_cache: false,
        }
    }

    fn none() -> PastKnowledge {
        PastKnowledge::new()
    }

    /// The event id of the history's message at `sequence`.
    fn e(sequence: i64) -> EventId {
        Uuid::from_u128(u128::try_from(sequence).unwrap()).into()
    }

    fn message(sequence: i64, kind: MessageKind, text: &str, answers: Option<i64>) -> Message {
        Message {
            sequence,
            event_id: e(sequence),
            kind,
            text: text.into(),
            occurred_at: 0,
            query_event_id: answers.map(e),
            model: None,
            prompt_tokens: None,
            completion_tokens: None,
            llm_latency_ms: None,
            error_kind: None,
            retrieved: vec![],
            cached_from: None,
        }
    }

    fn history() -> Vec<Message> {
        vec![
            message(2, MessageKind::UserQuery, "My name is Ada.", None),
            message(3, MessageKind::Answer, "Hello Ada.", Some(2)),
            message(4, MessageKind::UserQuery, "I like tea.", None),
            message(5, MessageKind::Failure, "timeout", Some(4)),
            message(6, MessageKind::UserQuery, "What is my name?", None),
            message(7, MessageKind::Answer, "Ada.", Some(6)),
        ]
    }

    #[test]
    fn a_first_question_is_system_then_user() {
        let prompt =
            build_prompt("Be brief.", &[], &query(2, "What is Kafka?"), &[], 1000, PromptLayout::Stable, &none());
        assert_eq!(prompt.messages.len(), 2);
        assert_eq!(prompt.messages[0].role, Role::System);
        assert_eq!(prompt.messages[1], ChatMessage { role: Role::User, content: "What is Kafka?".into() });
        assert!(prompt.context_event_ids.is_empty());
        assert_eq!(build_prompt("", &[], &query(2, "x"), &[], 1000, PromptLayout::Stable, &none()).messages.len(), 1);
    }

    #[test]
    fn earlier_turns_come_in_order_and_failures_are_left_out() {
        let prompt = build_prompt("", &history(), &query(8, "And my drink?"), &[], 1000, PromptLayout::Stable, &none());
        let roles: Vec<_> = prompt.messages.iter().map(|m| (m.role, m.content.as_str())).collect();
        assert_eq!(
            roles,
            [
                (Role::User, "My name is Ada."),
                (Role::Assistant, "Hello Ada."),
                (Role::User, "What is my name?"),
                (Role::Assistant, "Ada."),
                (Role::User, "And my drink?"),
            ]
        );
        assert_eq!(prompt.context_event_ids, [e(2), e(3), e(6), e(7)]);
    }

    #[test]
    fn the_budget_keeps_the_newest_whole_turns() {
        let newest_turn = estimate_tokens("What is my name?") + estimate_tokens("Ada.");
        let budget = estimate_tokens("And my drink?") + newest_turn;
        let prompt =
            build_prompt("", &history(), &query(8, "And my drink?"), &[], budget, PromptLayout::Sliding, &none());
        assert_eq!(prompt.context_event_ids, [e(6), e(7)]);
        let none =
            build_prompt("", &history(), &query(8, "And my drink?"), &[], budget - 1, PromptLayout::Sliding, &none());
        assert!(none.context_event_ids.is_empty());
        assert_eq!(none.messages.len(), 1, "the question itself always goes in");
    }

    #[test]
    fn only_turns_before_the_query_are_context() {
        let prompt = build_prompt("", &history(), &query(4, "I like tea."), &[], 1000, PromptLayout::Stable, &none());
        assert_eq!(prompt.context_event_ids, [e(2), e(3)]);
    }

    fn hit(id: &str, text: &str, score: f32) -> Hit {
        Hit {
            id: id.into(),
            kind: SourceKind::Document,
            source_id: "d1".into(),
            source_event_id: EventId::random(),
            position: 0,
            label: "notes.md".into(),
            text: text.into(),
            score,
            similarity: Some(score),
            keyword_score: None,
        }
    }

    #[test]
    fn sliding_layout_puts_retrieved_hits_into_the_system_message_and_records_them() {
        let hits = [hit("v1", "The launch code is 7421.", 0.8), hit("v2", "Tea is a drink.", 0.4)];
        let prompt = build_prompt(
            "Be brief.",
            &history(),
            &query(8, "What is the launch code?"),
            &hits,
            1000,
            PromptLayout::Sliding,
            &none(),
        );
        let system = &prompt.messages[0].content;
        assert!(system.starts_with("Be brief.\n\n") && system.contains(KNOWLEDGE_HEADER), "{system}");
        assert!(system.contains("[1] (notes.md) The launch code is 7421.\n[2] (notes.md) Tea is a drink."), "{system}");
        assert_eq!(prompt.retrieved.iter().map(|r| r.vector_id.as_str()).collect::<Vec<_>>(), ["v1", "v2"]);
        assert_eq!((prompt.retrieved[0].score, prompt.retrieved[0].source_kind.as_str()), (0.8, "document"));
        assert_eq!(prompt.context_event_ids, [e(2), e(3), e(6), e(7)], "history still fits beside them");
    }

    #[test]
    fn hits_take_at_most_half_the_remaining_budget_and_are_never_cut() {
        let question = query(8, "q");
        let base = estimate_tokens("q");
        let long = "x".repeat(400); // ~100 tokens
        let hits = [hit("big", &long, 0.9), hit("small", "short fact", 0.5)];
        let prompt = build_prompt("", &[], &question, &hits, base + 120, PromptLayout::Stable, &none());
        assert_eq!(prompt.retrieved.iter().map(|r| r.vector_id.as_str()).collect::<Vec<_>>(), ["small"]);
        let none = build_prompt("", &[], &question, &hits, base + 10, PromptLayout::Stable, &none());
        assert!(none.retrieved.is_empty() && none.messages.len() == 1, "no system message without knowledge");
    }

    #[test]
    fn stable_layout_puts_retrieved_hits_with_the_question_after_the_history() {
        let hits = [hit("v1", "The launch code is 7421.", 0.8)];
        let prompt = build_prompt(
            "Be brief.",
            &history(),
            &query(8, "What is the code?"),
            &hits,
            1000,
            PromptLayout::Stable,
            &none(),
        );
        assert_eq!(prompt.messages[0], ChatMessage { role: Role::System, content: "Be brief.".into() });
        let last = &prompt.messages.last().unwrap().content;
        assert!(
            last.starts_with(KNOWLEDGE_HEADER)
                && last.ends_with("[1] (notes.md) The launch code is 7421.\n\nWhat is the code?"),
            "{last}"
        );
        assert_eq!(prompt.context_event_ids, [e(2), e(3), e(6), e(7)]);
    }

    /// A conversation of `turns` answered turns, each question and answer ~10 tokens.
    fn long_history(turns: i64) -> Vec<Message> {
        (0..turns)
            .flat_map(|t| {
                let q = 2 + 2 * t;
                [
                    message(q, MessageKind::UserQuery, &format!("question number {t:04} here"), None),
                    message(q + 1, MessageKind::Answer, &format!("answer number {t:04} there"), Some(q)),
                ]
            })
            .collect()
    }

    #[test]
    fn stable_layout_drops_old_turns_in_blocks_so_the_prefix_stays_put() {
        let turn_cost = estimate_tokens("question number 0000 here") + estimate_tokens("answer number 0000 there");
        let budget = estimate_tokens("next") + 10 * turn_cost; // room for 10 turns
        let first_kept = |turns: i64, layout| {
            let history = long_history(turns);
            let prompt = build_prompt("", &history, &query(2 + 2 * turns, "next"), &[], budget, layout, &none());
            prompt.context_event_ids.first().cloned()
        };
        // Sliding: from the 11th turn on, the first kept turn moves every turn.
        let sliding: Vec<_> = (11..=14).map(|t| first_kept(t, PromptLayout::Sliding)).collect();
        assert_eq!(sliding.iter().collect::<std::collections::HashSet<_>>().len(), 4, "{sliding:?}");
        // Stable: it moves by a block, then stays for the next turns.
        let stable: Vec<_> = (11..=14).map(|t| first_kept(t, PromptLayout::Stable)).collect();
        assert_eq!(stable, vec![Some(e(10)); 4], "block of 4 dropped at once: {stable:?}");
        assert_eq!(first_kept(15, PromptLayout::Stable), Some(e(18)), "the next block goes when it must");
    }

    #[test]
    fn with_its_knowledge_kept_the_next_prompt_begins_with_the_whole_previous_one() {
        let hits = [hit("v1", "The launch code is 7421.", 0.8)];
        let history = history();
        let asked = query(8, "What is the code?");
        let first = build_prompt("Be brief.", &history, &asked, &hits, 1000, PromptLayout::Stable, &none());
        let block = first.knowledge.clone().expect("the stable layout says what it sent");
        let mut next_history = history.clone();
        next_history.push(Message {
            event_id: asked.envelope.event_id,
            ..message(8, MessageKind::UserQuery, "What is the code?", None)
        });
        let mut answer = message(9, MessageKind::Answer, "7421.", None);
        answer.query_event_id = Some(asked.envelope.event_id);
        next_history.push(answer);
        let next_question = query(10, "And the name?");

        let past: PastKnowledge = [(asked.envelope.event_id, block)].into();
        let next = build_prompt("Be brief.", &next_history, &next_question, &[], 1000, PromptLayout::Stable, &past);
        assert_eq!(&next.messages[..first.messages.len()], &first.messages[..], "the previous prompt is the prefix");
        assert_eq!(next.messages[first.messages.len()].content, "7421.", "then its answer");
        assert_eq!(next.knowledge_turns, [asked.envelope.event_id]);

        let forgotten =
            build_prompt("Be brief.", &next_history, &next_question, &[], 1000, PromptLayout::Stable, &none());
        assert_ne!(forgotten.messages[first.messages.len() - 1], first.messages[first.messages.len() - 1]);
        assert!(forgotten.knowledge_turns.is_empty());
        let sliding = build_prompt("", &next_history, &next_question, &[], 1000, PromptLayout::Sliding, &past);
        assert!(sliding.knowledge_turns.is_empty(), "sliding sends no question with knowledge");
        assert!(!sliding.messages.iter().any(|m| m.content.contains("7421") && m.role == Role::User));

        // Too little room for whole blocks with the knowledge: every question goes in as
        // its text alone (the block rule keeps the prefix), and the proof still names what
        // the builder was given, so replay decides the same.
        let tight = estimate_tokens("And the name?") + 2 + {
            let turns = build_prompt("", &next_history, &next_question, &[], 1000, PromptLayout::Stable, &none());
            turns.messages.iter().take(turns.messages.len() - 1).map(|m| estimate_tokens(&m.content)).sum::<usize>()
        };
        let plain = build_prompt("", &next_history, &next_question, &[], tight, PromptLayout::Stable, &past);
        assert!(!plain.messages.iter().any(|m| m.content.starts_with(KNOWLEDGE_HEADER)), "{:?}", plain.messages);
        assert_eq!(plain.context_event_ids.len(), 6, "the whole history, as text");
        assert_eq!(plain.knowledge_turns, [asked.envelope.event_id]);
    }
}
