//! Typed ids: what every reader of an event relies on, checked once, when the record is
//! decoded. On the wire they stay Avro strings (the schemas do not change); a record whose
//! id is not valid fails to decode, so a consumer treats it as it treats any poison record
//! (a dead letter) and nothing past the decoder ever parses an id again.

use std::fmt;
use std::str::FromStr;

use serde::de::{self, Deserializer, Visitor};
use serde::{Deserialize, Serialize, Serializer};
use thiserror::Error;
use uuid::Uuid;

/// Longest user id Parley accepts (a JWT subject, a CLI argument, an event field).
pub const MAX_USER_ID_CHARS: usize = 256;

/// Longest part of a bad id an error repeats.
const SHOWN_CHARS: usize = 64;

/// A string that is not a valid id of its kind.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("{value:?} is not a valid {kind}: {rule}")]
pub struct InvalidId {
    /// Which id, e.g. `event id`.
    pub kind: &'static str,
    /// The start of the refused value.
    pub value: String,
    /// What a valid one looks like.
    pub rule: &'static str,
}

impl InvalidId {
    fn new(kind: &'static str, value: &str, rule: &'static str) -> Self {
        Self { kind, value: value.chars().take(SHOWN_CHARS).collect(), rule }
    }
}

macro_rules! uuid_id {
    ($(#[$doc:meta])* $name:ident, $kind:literal) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(Uuid);

        impl $name {
            /// A new random (v4) id.
            pub fn random() -> Self {
                Self(Uuid::new_v4())
            }

            /// The id as the UUID it is.
            pub const fn uuid(self) -> Uuid {
                self.0
            }
        }

        impl From<Uuid> for $name {
            fn from(uuid: Uuid) -> Self {
                Self(uuid)
            }
        }

        impl From<$name> for Uuid {
            fn from(id: $name) -> Self {
                id.0
            }
        }

        impl FromStr for $name {
            type Err = InvalidId;

            fn from_str(value: &str) -> Result<Self, InvalidId> {
                Uuid::parse_str(value).map(Self).map_err(|_| InvalidId::new($kind, value, "expected a UUID"))
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                self.0.hyphenated().fmt(f)
            }
        }

        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                serializer.serialize_str(self.0.hyphenated().encode_lower(&mut Uuid::encode_buffer()))
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                deserializer.deserialize_str(ParsedVisitor::<Self>::new($kind))
            }
        }
    };
}

uuid_id!(
    /// A conversation's id; also the Kafka key of its events.
    ConversationId,
    "conversation id"
);
uuid_id!(
    /// One event's id (a query's id is the id its outcome and its deltas name).
    EventId,
    "event id"
);
uuid_id!(
    /// A document's id (uuid5 of its owner, source name and content).
    DocumentId,
    "document id"
);

impl DocumentId {
    /// The id of the document's own stream of events: a document event's envelope carries
    /// the document id where a conversation event carries its conversation's.
    pub const fn stream(self) -> ConversationId {
        ConversationId(self.0)
    }
}

/// Who a conversation, a document or a budget belongs to: the JWT subject, or the name a
/// trusted client gave. Not empty, at most [`MAX_USER_ID_CHARS`], no control characters.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct UserId(String);

impl UserId {
    /// The id of the person's erasure stream: an erasure event's envelope carries it where a
    /// conversation event carries its conversation's (a UUIDv5 of the id, so every request
    /// about one person is in one stream).
    pub fn erasure_stream(&self) -> ConversationId {
        ConversationId(Uuid::new_v5(&Uuid::NAMESPACE_OID, format!("parley-erasure:{}", self.0).as_bytes()))
    }

    /// The id of the person's account stream: the envelope's conversation id of their
    /// tier and budget changes.
    pub fn account_stream(&self) -> ConversationId {
        ConversationId(Uuid::new_v5(&Uuid::NAMESPACE_OID, format!("parley-account:{}", self.0).as_bytes()))
    }

    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for UserId {
    type Err = InvalidId;

    fn from_str(value: &str) -> Result<Self, InvalidId> {
        let rule = "expected 1 to 256 characters, none of them control characters";
        if value.is_empty() || value.chars().count() > MAX_USER_ID_CHARS || value.chars().any(char::is_control) {
            return Err(InvalidId::new("user id", value, rule));
        }
        Ok(Self(value.to_owned()))
    }
}

impl fmt::Display for UserId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl AsRef<str> for UserId {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl PartialEq<str> for UserId {
    fn eq(&self, other: &str) -> bool {
        self.0 == other
    }
}

impl PartialEq<&str> for UserId {
    fn eq(&self, other: &&str) -> bool {
        self.0 == *other
    }
}

impl Serialize for UserId {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for UserId {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_str(ParsedVisitor::<Self>::new("user id"))
    }
}

/// Deserializes any of the ids above from a string through its `FromStr`, so the decoder
/// and every other parser apply one rule.
struct ParsedVisitor<T> {
    kind: &'static str,
    id: std::marker::PhantomData<T>,
}

impl<T> ParsedVisitor<T> {
    fn new(kind: &'static str) -> Self {
        Self { kind, id: std::marker::PhantomData }
    }
}

impl<T: FromStr<Err = InvalidId>> Visitor<'_> for ParsedVisitor<T> {
    type Value = T;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "a {} as a string", self.kind)
    }

    fn visit_str<E: de::Error>(self, value: &str) -> Result<T, E> {
        value.parse().map_err(E::custom)
    }
}

/// Serde for a user id that events written before a schema version leave empty: an empty
/// string is `None` (`#[serde(with = "crate::ids::empty_is_none")]`).
pub mod empty_is_none {
    use serde::{Deserialize, Deserializer, Serializer};

    use super::UserId;

    /// Writes `None` as the empty string.
    pub fn serialize<S: Serializer>(user: &Option<UserId>, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(user.as_ref().map_or("", UserId::as_str))
    }

    /// Reads the empty string as `None`, anything else as a user id.
    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<UserId>, D::Error> {
        let text = String::deserialize(deserializer)?;
        if text.is_empty() { Ok(None) } else { text.parse().map(Some).map_err(serde::de::Error::custom) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uuid_ids_round_trip_as_hyphenated_strings_and_refuse_anything_else() {
        let id = EventId::random();
        let json = serde_json::to_string(&id).unwrap();
        assert_eq!(json, format!("\"{id}\""));
        assert_eq!(serde_json::from_str::<EventId>(&json).unwrap(), id);
        assert_eq!(id.to_string().parse::<EventId>().unwrap(), id);
        let refused = "x".repeat(500).parse::<ConversationId>().unwrap_err();
        assert_eq!(refused.kind, "conversation id");
        assert_eq!(refused.value.len(), SHOWN_CHARS);
        let error = serde_json::from_str::<DocumentId>("\"not-a-document\"").unwrap_err().to_string();
        assert!(error.contains("\"not-a-document\" is not a valid document id"), "{error}");
    }

    #[test]
    fn a_user_id_is_not_empty_not_too_long_and_has_no_control_characters() {
        assert_eq!("alice".parse::<UserId>().unwrap().as_str(), "alice");
        assert!("ünïcødé@example.org".parse::<UserId>().is_ok());
        assert!("a".repeat(MAX_USER_ID_CHARS).parse::<UserId>().is_ok());
        for bad in [String::new(), "a".repeat(MAX_USER_ID_CHARS + 1), "ali\nce".into(), "\u{0}".into()] {
            assert_eq!(bad.parse::<UserId>().unwrap_err().kind, "user id", "{bad:?}");
        }
    }

    #[test]
    fn an_empty_legacy_user_is_none_and_none_is_written_empty() {
        #[derive(Serialize, Deserialize, PartialEq, Debug)]
        struct Answer {
            #[serde(with = "empty_is_none")]
            user_id: Option<UserId>,
        }
        let legacy: Answer = serde_json::from_str(r#"{"user_id":""}"#).unwrap();
        assert_eq!(legacy, Answer { user_id: None });
        assert_eq!(serde_json::to_string(&legacy).unwrap(), r#"{"user_id":""}"#);
        let current: Answer = serde_json::from_str(r#"{"user_id":"bob"}"#).unwrap();
        assert_eq!(current.user_id.unwrap(), "bob");
        assert!(serde_json::from_str::<Answer>(r#"{"user_id":"\u0007"}"#).is_err());
    }
}
