//! The WebSocket protocol (JSON text frames), as plain types with validation and no I/O.
//! docs/protocol.md is its reference.

use parley_events::ConversationId;
use parley_events::lanes::Lane;
use parley_events::{CachedAnswer, RetrievedContext};
use serde::{Deserialize, Serialize};

/// 2 added `cancel` (version 1 clients never send it and see no new frame).
pub const PROTOCOL_VERSION: u32 = 2;

/// What a client may send.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum ClientFrame {
    /// Ask a question; without `conversation_id` it starts a new conversation, served in
    /// `lane` when that is below the user's tier (`batch` for bulk work).
    Query {
        /// The client's id of the message: a resend with the same id is the same question.
        client_message_id: String,
        /// The conversation; none starts a new one.
        conversation_id: Option<String>,
        /// The question.
        text: String,
        /// `premium`, `standard` or `batch`, for a new conversation.
        lane: Option<String>,
        /// True: the model answers, never the semantic cache (absent: false).
        #[serde(default)]
        no_cache: bool,
    },
    /// Receive the answers of an existing conversation on this socket (after a reconnect).
    Subscribe {
        /// The conversation.
        conversation_id: String,
    },
    /// Stop the answer to a query being generated (its text so far becomes the answer).
    Cancel {
        /// The conversation.
        conversation_id: String,
        /// The query whose answer to stop (its ack's `event_id`).
        query_event_id: String,
    },
    /// After a reconnect: the deltas of an answer after `last_index` (-1: none yet), read
    /// back from `position` (the last token frame's) or from the question, then live.
    Resume {
        /// The conversation.
        conversation_id: String,
        /// The query whose answer to pick up.
        query_event_id: String,
        /// The index of the last delta the client has (-1: none).
        last_index: i32,
        /// The `position` of the last token frame the client has.
        position: Option<String>,
    },
}

/// What the server sends (clients and tests read it back with `Deserialize`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerFrame {
    /// The socket is open: who it is for and the limits of what it may send.
    Ready {
        /// The user the token names.
        user_id: String,
        /// [`PROTOCOL_VERSION`].
        protocol_version: u32,
        /// Largest frame the server reads.
        max_frame_bytes: usize,
        /// Longest question.
        max_text_chars: usize,
    },
    /// The query is durably in the log at `position`.
    Ack {
        /// The client's id of the message.
        client_message_id: String,
        /// The conversation (new or not).
        conversation_id: String,
        /// The query's event id (what its answer names).
        event_id: String,
        /// The query's sequence.
        sequence: i64,
        /// Where it is in the log (`after=` of the query API).
        position: String,
        /// The same message was acked before: this is that ack again.
        duplicate: bool,
    },
    /// A piece of the answer being generated. `index` 0 (again) means: start over.
    Token {
        /// The conversation.
        conversation_id: String,
        /// The query being answered.
        query_event_id: String,
        /// The delta's place in the answer.
        index: i32,
        /// The text.
        delta: String,
        /// The model call the delta comes from (1: the first); a retry starts again at index 0.
        attempt: i32,
        /// Where the delta is in the tokens topic (v2): what `resume` starts after.
        #[serde(skip_serializing_if = "Option::is_none")]
        position: Option<String>,
    },
    /// The answer, whole (authoritative: it replaces the deltas).
    Answer {
        /// The conversation.
        conversation_id: String,
        /// The query answered.
        query_event_id: String,
        /// The answer's event id.
        event_id: String,
        /// The answer's sequence.
        sequence: i64,
        /// The answer's text.
        text: String,
        /// The model that answered.
        model: String,
        /// Why it stopped (`stop`, `length`, `cancelled`…).
        finish_reason: String,
        /// Tokens of the prompt.
        prompt_tokens: i32,
        /// Tokens of the answer.
        completion_tokens: i32,
        /// How long the model took.
        llm_latency_ms: i64,
        /// From the (last) LLM call's start to its first generated text; none without text.
        time_to_first_token_ms: Option<i64>,
        /// Chunks and earlier messages the prompt carried, best first.
        retrieved: Vec<RetrievedContext>,
        /// Set when the semantic cache answered instead of the model: the answer it repeats,
        /// that answer's question and the two questions' similarity.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        cached_from: Option<CachedAnswer>,
    },
    /// The query got no answer (the turn is over; the next question may be asked).
    Failed {
        /// The conversation.
        conversation_id: String,
        /// The query.
        query_event_id: String,
        /// The failure's event id.
        event_id: String,
        /// `timeout`, `unavailable`, `budget_exceeded`…
        error_kind: String,
        /// What went wrong, for people.
        message: String,
    },
    /// The socket follows the conversation now.
    Subscribed {
        /// The conversation.
        conversation_id: String,
    },
    /// A question asked on another socket of the user's (another tab or device) in a
    /// conversation this socket follows (v2).
    Question {
        /// The conversation.
        conversation_id: String,
        /// The query's event id.
        event_id: String,
        /// Its sequence.
        sequence: i64,
        /// The asking client's id of the message.
        client_message_id: String,
        /// The question.
        text: String,
    },
    /// A `resume` was accepted (v2): `streaming` (the missing deltas follow, then live
    /// ones and the answer), `complete` (the answer follows: no deltas) or `tokens_expired`
    /// (the deltas aged out of the tokens topic: the answer follows when it exists).
    Resumed {
        /// The conversation.
        conversation_id: String,
        /// The query whose answer is resumed.
        query_event_id: String,
        /// `streaming`, `complete` or `tokens_expired`.
        status: String,
        /// The deltas read back, sent right after this frame (not a field on the wire).
        #[serde(skip)]
        replay: Vec<ServerFrame>,
    },
    /// What a `cancel` did: `requested` (the answer, marked `cancelled`, follows) or
    /// `already_complete` (nothing to stop: the answer exists).
    CancelResult {
        /// The conversation.
        conversation_id: String,
        /// The query.
        query_event_id: String,
        /// `requested` or `already_complete`.
        status: String,
    },
    /// A frame or a command was refused; nothing was written.
    Error {
        /// What kind of refusal.
        code: ErrorCode,
        /// Why, for people.
        message: String,
        /// The refused query's id (its prefix, when it was too long).
        client_message_id: Option<String>,
        /// When the same frame may pass (`rate_limited`, `overloaded`); absent otherwise.
        #[serde(skip_serializing_if = "Option::is_none")]
        retry_after_ms: Option<u64>,
        /// When the exhausted budget starts again (`budget_exceeded`; RFC 3339, UTC);
        /// absent otherwise, and for a conversation's budget, which never does.
        #[serde(skip_serializing_if = "Option::is_none")]
        resets_at: Option<String>,
    },
}

impl ServerFrame {
    /// An error frame without retry hints (`retry_after_ms`, `resets_at`).
    pub fn error(code: ErrorCode, message: String, client_message_id: Option<String>) -> Self {
        Self::Error { code, message, client_message_id, retry_after_ms: None, resets_at: None }
    }
}

/// The `code` of an error frame (docs/protocol.md lists what each asks of a client).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// Not a JSON frame of the protocol (or a binary frame).
    MalformedFrame,
    /// Larger than the frame limit.
    FrameTooLarge,
    /// A field is missing, empty, too long or of the wrong form.
    InvalidField,
    /// No such conversation for this user (or not held by this gateway yet).
    UnknownConversation,
    /// The previous question of the conversation has no answer yet.
    TurnInProgress,
    /// No such query in the conversation (a `cancel`).
    UnknownQuery,
    /// The log could not take the event; nothing was written, retry later.
    Unavailable,
    /// A rate limit refused the query; nothing was written; `retry_after_ms` says when.
    RateLimited,
    /// A token budget has no room for the turn; nothing was written; `resets_at` says when.
    BudgetExceeded,
    /// More turns wait for the model than it can answer soon; nothing was written;
    /// `retry_after_ms` says when to try again.
    Overloaded,
    /// The identity's data was erased (docs/security.md, "Erasure"): it takes no new
    /// content; nothing was written.
    Erased,
}

/// Bounds on what a client may send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest frame read.
    pub max_frame_bytes: usize,
    /// Longest question.
    pub max_text_chars: usize,
}

/// A query that passed validation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValidQuery {
    /// The client's id of the message.
    pub client_message_id: String,
    /// The conversation; none starts a new one.
    pub conversation_id: Option<ConversationId>,
    /// The question.
    pub text: String,
    /// The lane asked for (a new conversation's; never above the user's tier).
    pub lane: Option<Lane>,
    /// The model must answer, not the semantic cache.
    pub no_cache: bool,
}

/// A rejected frame: the error frame to send back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    /// What kind of refusal.
    pub code: ErrorCode,
    /// Why.
    pub message: String,
    /// The refused query's id, if it had one.
    pub client_message_id: Option<String>,
}

impl Rejection {
    fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self { code, message: message.into(), client_message_id: None }
    }

    /// The error frame that says it.
    pub fn into_frame(self) -> ServerFrame {
        ServerFrame::error(self.code, self.message, self.client_message_id)
    }
}

/// Longest `client_message_id`.
pub const MAX_CLIENT_MESSAGE_ID_CHARS: usize = 128;

/// How much of an invalid `client_message_id` an error frame echoes.
pub const INVALID_ID_ECHO_CHARS: usize = 64;

/// Parses a text frame within `limits`.
pub fn parse_frame(text: &str, limits: Limits) -> Result<ClientFrame, Rejection> {
    if text.len() > limits.max_frame_bytes {
        return Err(Rejection::new(
            ErrorCode::FrameTooLarge,
            format!("frame of {} bytes exceeds the limit of {} bytes", text.len(), limits.max_frame_bytes),
        ));
    }
    serde_json::from_str(text).map_err(|e| Rejection::new(ErrorCode::MalformedFrame, format!("not a valid frame: {e}")))
}

/// Checks a query's fields.
pub fn validate_query(
    client_message_id: String,
    conversation_id: Option<String>,
    text: String,
    lane: Option<String>,
    limits: Limits,
) -> Result<ValidQuery, Rejection> {
    let invalid = |message: String| Rejection {
        code: ErrorCode::InvalidField,
        message,
        client_message_id: Some(client_message_id.clone()),
    };
    let legal = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':');
    if client_message_id.is_empty()
        || client_message_id.len() > MAX_CLIENT_MESSAGE_ID_CHARS
        || !client_message_id.chars().all(legal)
    {
        return Err(Rejection {
            code: ErrorCode::InvalidField,
            message: format!(
                "client_message_id must be 1 to {MAX_CLIENT_MESSAGE_ID_CHARS} characters of [A-Za-z0-9._:-]"
            ),
            // Echoed so the client can match the refusal, but never more than a prefix of it.
            client_message_id: Some(client_message_id.chars().take(INVALID_ID_ECHO_CHARS).collect()),
        });
    }
    let conversation_id = conversation_id
        .map(|id| id.parse::<ConversationId>().map_err(|_| invalid(format!("conversation_id {id:?} is not a UUID"))))
        .transpose()?;
    if text.trim().is_empty() {
        return Err(invalid("text must not be empty".into()));
    }
    let chars = text.chars().count();
    if chars > limits.max_text_chars {
        return Err(invalid(format!("text of {chars} characters exceeds the limit of {}", limits.max_text_chars)));
    }
    let lane = lane.map(|lane| lane.parse::<Lane>().map_err(|e| invalid(format!("lane: {e}")))).transpose()?;
    Ok(ValidQuery { client_message_id, conversation_id, text, lane, no_cache: false })
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: Limits = Limits { max_frame_bytes: 200, max_text_chars: 20 };

    #[test]
    fn a_query_frame_parses_and_validates() {
        let frame = parse_frame(r#"{"type":"query","client_message_id":"m-1","text":"hello"}"#, LIMITS).unwrap();
        let ClientFrame::Query { client_message_id, conversation_id, text, lane, .. } = frame else {
            panic!("{frame:?}")
        };
        let valid = validate_query(client_message_id, conversation_id, text, lane, LIMITS).unwrap();
        assert_eq!(valid.text, "hello");
        assert_eq!(valid.conversation_id, None);
        assert_eq!(valid.lane, None);
        let frame = parse_frame(r#"{"type":"query","client_message_id":"m-2","text":"hi","lane":"batch"}"#, LIMITS);
        let Ok(ClientFrame::Query { lane, .. }) = frame else { panic!("{frame:?}") };
        assert_eq!(validate_query("m-2".into(), None, "hi".into(), lane, LIMITS).unwrap().lane, Some(Lane::Batch));
    }

    #[test]
    fn malformed_and_oversized_frames_are_rejected_with_their_code() {
        assert_eq!(parse_frame("{nope", LIMITS).unwrap_err().code, ErrorCode::MalformedFrame);
        assert_eq!(parse_frame(r#"{"type":"dance"}"#, LIMITS).unwrap_err().code, ErrorCode::MalformedFrame);
        assert_eq!(
            parse_frame(r#"{"type":"query","client_message_id":"m","text":"x","extra":1}"#, LIMITS).unwrap_err().code,
            ErrorCode::MalformedFrame
        );
        assert_eq!(parse_frame(&"x".repeat(201), LIMITS).unwrap_err().code, ErrorCode::FrameTooLarge);
    }

    #[test]
    fn invalid_fields_name_the_field_and_keep_the_client_id() {
        let err = validate_query("m1".into(), None, "hi".into(), Some("gold".into()), LIMITS).unwrap_err();
        assert!(err.message.contains("lane") && err.message.contains("not a lane"), "{}", err.message);
        let err = validate_query("m 1".into(), None, "hi".into(), None, LIMITS).unwrap_err();
        assert!(err.message.contains("client_message_id"), "{err:?}");
        assert_eq!(err.client_message_id.as_deref(), Some("m 1"));
        let long = "é".repeat(60_000);
        let err = validate_query(long, None, "hi".into(), None, LIMITS).unwrap_err();
        let echoed = err.client_message_id.unwrap();
        assert_eq!(echoed.chars().count(), INVALID_ID_ECHO_CHARS, "an invalid id is echoed as a short prefix");
        assert!(echoed.chars().all(|c| c == 'é'));
        let err = validate_query("m1".into(), Some("not-a-uuid".into()), "hi".into(), None, LIMITS).unwrap_err();
        assert_eq!((err.code, err.client_message_id.as_deref()), (ErrorCode::InvalidField, Some("m1")));
        assert!(validate_query("m1".into(), None, "   ".into(), None, LIMITS).unwrap_err().message.contains("empty"));
        let err = validate_query("m1".into(), None, "é".repeat(21), None, LIMITS).unwrap_err();
        assert!(err.message.contains("21 characters"), "{err:?}");
        assert!(
            validate_query("m1".into(), None, "é".repeat(20), None, LIMITS).is_ok(),
            "the limit counts characters, not bytes"
        );
    }

    #[test]
    fn server_frames_serialize_with_a_type_tag() {
        let frame = Rejection::new(ErrorCode::TurnInProgress, "wait").into_frame();
        let json = serde_json::to_value(frame).unwrap();
        assert_eq!(json["type"], "error");
        assert_eq!(json["code"], "turn_in_progress");
    }

    #[test]
    fn server_frames_read_back_as_they_were_sent() {
        let frames = [
            ServerFrame::Ready {
                user_id: "u".parse().unwrap(),
                protocol_version: 2,
                max_frame_bytes: 10,
                max_text_chars: 5,
            },
            ServerFrame::Token {
                conversation_id: "c".into(),
                query_event_id: "q".into(),
                index: 0,
                delta: "Hi".into(),
                attempt: 1,
                position: None,
            },
            ServerFrame::error(ErrorCode::Overloaded, "later".into(), Some("m1".into())),
            ServerFrame::Resumed {
                conversation_id: "c".into(),
                query_event_id: "q".into(),
                status: "complete".into(),
                replay: vec![],
            },
        ];
        for frame in frames {
            let text = serde_json::to_string(&frame).unwrap();
            assert_eq!(serde_json::from_str::<ServerFrame>(&text).unwrap(), frame, "{text}");
        }
    }
}

/// Generated and mutated frames (10,000 cases each): every input is a frame or a typed
/// refusal, never a panic.
#[cfg(test)]
mod fuzz {
    use parley_events::fuzzing;
    use proptest::collection::vec;
    use proptest::option;
    use proptest::prelude::*;
    use serde_json::json;

    use super::*;

    const LIMITS: Limits = Limits { max_frame_bytes: 2048, max_text_chars: 300 };
    const VALID: [&str; 6] = [
        r#"{"type":"query","client_message_id":"m-1","text":"hello"}"#,
        r#"{"type":"query","client_message_id":"m-2","conversation_id":"0b7c2a44-4f1e-4d7e-9a1c-2f0d5e6a7b8c","text":"more","lane":"batch"}"#,
        r#"{"type":"subscribe","conversation_id":"0b7c2a44-4f1e-4d7e-9a1c-2f0d5e6a7b8c"}"#,
        r#"{"type":"cancel","conversation_id":"0b7c2a44-4f1e-4d7e-9a1c-2f0d5e6a7b8c","query_event_id":"1da44acd-a8c7-561d-936b-481fbaa1a141"}"#,
        r#"{"type":"resume","conversation_id":"0b7c2a44-4f1e-4d7e-9a1c-2f0d5e6a7b8c","query_event_id":"1da44acd-a8c7-561d-936b-481fbaa1a141","last_index":4,"position":"t/1/9"}"#,
        r#"{"type":"resume","conversation_id":"x","query_event_id":"y","last_index":-1}"#,
    ];

    /// What the gateway does with a text frame, short of I/O: parse, then validate a query.
    fn handle(text: &str) {
        match parse_frame(text, LIMITS) {
            Ok(ClientFrame::Query { client_message_id, conversation_id, text, lane, .. }) => {
                if let Err(refusal) = validate_query(client_message_id, conversation_id, text, lane, LIMITS) {
                    assert_eq!(refusal.code, ErrorCode::InvalidField);
                    assert!(refusal.client_message_id.is_some() && !refusal.message.is_empty());
                }
            }
            Ok(_) => {}
            Err(refusal) => {
                assert!(matches!(refusal.code, ErrorCode::MalformedFrame | ErrorCode::FrameTooLarge), "{refusal:?}");
                assert!(!refusal.message.is_empty());
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(fuzzing::cases()))]

        #[test]
        fn any_text_is_a_frame_or_a_typed_refusal(text in any::<String>()) {
            handle(&text);
        }

        #[test]
        fn mutated_frames_are_frames_or_typed_refusals(
            which in 0..VALID.len(),
            edits in vec((any::<usize>(), any::<u8>(), 0..4_u8), 1..10),
        ) {
            let mut bytes = VALID[which].as_bytes().to_vec();
            fuzzing::mutate(&mut bytes, &edits);
            handle(&String::from_utf8_lossy(&bytes));
        }

        #[test]
        fn queries_with_fields_of_any_value_are_accepted_or_refused_by_field(
            client_message_id in any::<String>(),
            conversation_id in option::of(any::<String>()),
            text in any::<String>(),
            lane in option::of(prop_oneof![Just("batch".to_owned()), any::<String>()]),
            padding in 0..3000_usize,
        ) {
            let mut frame = json!({"type": "query", "client_message_id": client_message_id, "text": text});
            if let Some(id) = conversation_id { frame["conversation_id"] = json!(id); }
            if let Some(lane) = lane { frame["lane"] = json!(lane); }
            let encoded = format!("{frame}{}", " ".repeat(padding));
            if encoded.len() > LIMITS.max_frame_bytes {
                prop_assert_eq!(parse_frame(&encoded, LIMITS).unwrap_err().code, ErrorCode::FrameTooLarge);
            } else {
                handle(&encoded);
            }
        }
    }
}
