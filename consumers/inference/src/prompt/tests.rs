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
    let prompt = build_prompt("Be brief.", &[], &query(2, "What is Kafka?"), &[], 1000, PromptLayout::Stable, &none());
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
    let prompt = build_prompt("", &history(), &query(8, "And my drink?"), &[], budget, PromptLayout::Sliding, &none());
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

    let forgotten = build_prompt("Be brief.", &next_history, &next_question, &[], 1000, PromptLayout::Stable, &none());
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
