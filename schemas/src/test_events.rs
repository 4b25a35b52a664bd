//! Events for the domain rules' unit tests.

use crate::event::{ConversationEvent, Envelope, Producer, UserQueryReceived};
use crate::ids::{ConversationId, UserId};
use crate::turn::query_event_id;

pub(crate) const P: Producer = Producer { name: "test", version: "0" };

/// Alice's query `client_message_id` at `sequence`, with the id the gateway gives it.
pub(crate) fn query(conversation: ConversationId, sequence: i64, client_message_id: &str) -> ConversationEvent {
    ConversationEvent::QueryReceived(UserQueryReceived {
        sealed_for: String::new(),
        envelope: Envelope::new(query_event_id(conversation, client_message_id), conversation, sequence, P),
        user_id: alice(),
        client_message_id: client_message_id.into(),
        text: "hi".into(),
        no_cache: false,
    })
}

/// The user the tests' conversations belong to.
pub(crate) fn alice() -> UserId {
    "alice".parse().expect("a valid user id")
}
