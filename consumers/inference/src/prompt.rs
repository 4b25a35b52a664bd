//! Prompt assembly: what the model is asked, as plain data.

use parley_events::UserQueryReceived;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    System,
    User,
    Assistant,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChatMessage {
    pub role: Role,
    pub content: String,
}

/// The messages for answering `query`: the system prompt, then the user's text.
pub fn build_prompt(system_prompt: &str, query: &UserQueryReceived) -> Vec<ChatMessage> {
    let mut messages = Vec::with_capacity(2);
    if !system_prompt.is_empty() {
        messages.push(ChatMessage { role: Role::System, content: system_prompt.to_owned() });
    }
    messages.push(ChatMessage { role: Role::User, content: query.text.clone() });
    messages
}

#[cfg(test)]
mod tests {
    use parley_events::{Envelope, Producer};
    use uuid::Uuid;

    use super::*;

    #[test]
    fn prompt_is_system_then_user() {
        let query = UserQueryReceived {
            envelope: Envelope::new(Uuid::new_v4(), Uuid::new_v4(), 2, Producer { name: "t", version: "0" }),
            user_id: "u".into(),
            client_message_id: "m".into(),
            text: "What is Kafka?".into(),
        };
        let prompt = build_prompt("Be brief.", &query);
        assert_eq!(prompt.len(), 2);
        assert_eq!(prompt[0].role, Role::System);
        assert_eq!(prompt[1], ChatMessage { role: Role::User, content: "What is Kafka?".into() });
        assert_eq!(build_prompt("", &query).len(), 1);
    }
}
