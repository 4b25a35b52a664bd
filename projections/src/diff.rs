//! How the projection differs from the log: replay's check that the stored rows of a
//! conversation are what its events fold to.

use parley_events::ConversationId;
use parley_events::conversation::{ConversationState, Message};

use crate::error::ProjectionError;
use crate::store::{ConversationRow, Store};

/// Differences between a replayed conversation and what the projection holds; empty when
/// they agree.
pub fn diff(replayed: &ConversationState, projected: Option<(&ConversationRow, &[Message])>) -> Vec<String> {
    let Some((row, messages)) = projected else {
        return vec!["the projection has no row for this conversation".into()];
    };
    let mut differences = Vec::new();
    if row.user_id != replayed.head.owner {
        differences.push(format!("owner: projection {:?}, log {:?}", row.user_id, replayed.head.owner));
    }
    if row.last_sequence != replayed.head.last_sequence {
        differences
            .push(format!("last sequence: projection {}, log {}", row.last_sequence, replayed.head.last_sequence));
    }
    let open = replayed.head.open_query.as_ref().map(|q| q.event_id);
    if row.open_query_event_id != open {
        differences.push(format!("open query: projection {:?}, log {:?}", row.open_query_event_id, open));
    }
    for m in &replayed.messages {
        match messages.iter().find(|p| p.sequence == m.sequence) {
            None => differences.push(format!("sequence {}: missing from the projection", m.sequence)),
            // Rows written before the projection kept `retrieved` differ only there: say so.
            Some(p)
                if p.retrieved.is_empty()
                    && !m.retrieved.is_empty()
                    && *p == Message { retrieved: vec![], ..m.clone() } =>
            {
                differences.push(format!(
                    "sequence {}: the projection lacks the retrieved context ({} entries in the log); it was \
                     written before the projection kept it, `parley projections rebuild context` fills it",
                    m.sequence,
                    m.retrieved.len()
                ));
            }
            Some(p) if p != m => differences.push(format!("sequence {}: projection {p:?}, log {m:?}", m.sequence)),
            Some(_) => {}
        }
    }
    for p in messages.iter().filter(|p| !replayed.messages.iter().any(|m| m.sequence == p.sequence)) {
        differences.push(format!("sequence {}: in the projection but not in the log", p.sequence));
    }
    differences
}

/// How the live projection of a conversation differs from `state` (replayed from the log),
/// both opened with the owner's key: what was erased reads [erased] on both.
pub(crate) async fn differences_from_projection(
    store: &Store,
    conversation_id: ConversationId,
    state: Option<&ConversationState>,
) -> Result<Vec<String>, ProjectionError> {
    let (live, _, _) = store.generations(crate::store::CONTEXT).await?;
    let generation = store.generation(live).await?;
    let mut row = store.conversation(&generation, conversation_id).await?;
    let mut messages = store.messages(&generation, conversation_id).await?;
    if let (Some(keys), Some(row)) = (store.keys(), &mut row) {
        keys.open_messages(&row.user_id, &mut messages).await?;
        keys.open_title(&row.user_id, conversation_id, &mut row.title).await?;
    }
    // An erased owner's rows were purged: the projection holding none of it is no difference.
    let purged_with_owner = match (state, store.keys()) {
        (Some(state), Some(keys)) if row.is_none() => keys.erased_at(state.head.owner.as_str()).await?.is_some(),
        _ => false,
    };
    Ok(match state {
        Some(_) if purged_with_owner => vec![],
        Some(state) => diff(state, row.as_ref().map(|r| (r, messages.as_slice()))),
        None if row.is_none() => vec![],
        None => vec!["the log has no ConversationStarted for a conversation the projection holds".into()],
    })
}

#[cfg(test)]
mod tests {
    use parley_events::turn::ConversationHead;
    use parley_events::{ConversationEvent, Envelope, EventId, Producer, RetrievedContext, UserQueryReceived};

    use super::*;

    fn state() -> ConversationState {
        let id = ConversationId::random();
        let mut state = ConversationState {
            conversation_id: id,
            head: ConversationHead::started("alice".parse().unwrap()),
            started_at: 1,
            updated_at: 1,
            messages: vec![],
            gaps: vec![],
        };
        state.apply(&ConversationEvent::QueryReceived(UserQueryReceived {
            sealed_for: String::new(),
            envelope: Envelope::new(EventId::random(), id, 2, Producer { name: "t", version: "0" }),
            user_id: "alice".parse().unwrap(),
            client_message_id: "m".into(),
            text: "hi".into(),
            no_cache: false,
        }));
        state
    }

    fn row_of(state: &ConversationState) -> ConversationRow {
        ConversationRow {
            conversation_id: state.conversation_id,
            user_id: state.head.owner.clone(),
            started_at: 1,
            updated_at: 1,
            last_sequence: state.head.last_sequence,
            open_query_event_id: state.head.open_query.as_ref().map(|q| q.event_id),
            title: String::new(),
        }
    }

    #[test]
    fn an_agreeing_projection_has_no_differences() {
        let state = state();
        assert!(diff(&state, Some((&row_of(&state), &state.messages))).is_empty());
    }

    #[test]
    fn missing_changed_and_extra_messages_are_reported() {
        let state = state();
        let row = row_of(&state);
        assert_eq!(diff(&state, Some((&row, &[]))), ["sequence 2: missing from the projection"]);
        let mut changed = state.messages.clone();
        changed[0].text = "edited".into();
        assert!(diff(&state, Some((&row, &changed)))[0].contains("sequence 2: projection"));
        let mut extra = state.messages.clone();
        extra.push(Message { sequence: 9, ..state.messages[0].clone() });
        assert_eq!(diff(&state, Some((&row, &extra))), ["sequence 9: in the projection but not in the log"]);
        assert_eq!(diff(&state, None).len(), 1);
    }

    #[test]
    fn a_row_from_before_retrieved_was_kept_is_named_as_such() {
        let mut state = state();
        state.messages[0].retrieved = vec![RetrievedContext {
            vector_id: "v".into(),
            source_kind: "document".into(),
            source_id: "d".into(),
            source_event_id: EventId::random(),
            position: 0,
            score: 0.5,
        }];
        let older = vec![Message { retrieved: vec![], ..state.messages[0].clone() }];
        let differences = diff(&state, Some((&row_of(&state), &older)));
        assert_eq!(differences.len(), 1);
        assert!(differences[0].contains("lacks the retrieved context (1 entries in the log)"), "{differences:?}");
    }
}
