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
mod tests;
