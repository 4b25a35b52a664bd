//! Search filters, rendered as Milvus boolean expressions. The owner is mandatory: every
//! search runs inside one user's data, and Milvus applies the expression before ranking
//! (pre-filtering), so another user's vectors can never take a top-k slot.

use std::fmt::Write;

use parley_events::UserId;

/// What a vector was made from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SourceKind {
    /// A chunk of a submitted document; source id is the document id.
    Document,
    /// A user or assistant message; source id is the conversation id.
    Message,
}

impl SourceKind {
    /// As the store's `kind` field holds it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Document => "document",
            Self::Message => "message",
        }
    }

    /// The kind stored as `value`, if it is one.
    pub fn parse(value: &str) -> Option<Self> {
        match value {
            "document" => Some(Self::Document),
            "message" => Some(Self::Message),
            _ => None,
        }
    }
}

/// Which vectors a search may return.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SearchFilter {
    /// Whose vectors: always set, so no search crosses users.
    pub owner: UserId,
    /// Documents or messages only (both, when None).
    pub kind: Option<SourceKind>,
    /// Only these documents or conversations (any, when empty).
    pub source_ids: Vec<String>,
    /// Never these documents or conversations (e.g. the one whose history is already in the prompt).
    pub exclude_source_ids: Vec<String>,
}

impl SearchFilter {
    /// Every vector of `owner`, of any kind and source.
    pub fn owner(owner: UserId) -> Self {
        Self { owner, kind: None, source_ids: Vec::new(), exclude_source_ids: Vec::new() }
    }

    /// The Milvus expression for this filter.
    pub fn expression(&self) -> String {
        let mut expr = format!("owner == {}", quoted(self.owner.as_str()));
        if let Some(kind) = self.kind {
            let _ = write!(expr, " && kind == {}", quoted(kind.as_str()));
        }
        if !self.source_ids.is_empty() {
            let _ = write!(expr, " && source_id in {}", list(&self.source_ids));
        }
        if !self.exclude_source_ids.is_empty() {
            let _ = write!(expr, " && source_id not in {}", list(&self.exclude_source_ids));
        }
        expr
    }
}

/// A Milvus string literal: double quotes, with backslash and quote escaped, so a user id
/// or document id can never change the expression's structure.
fn quoted(value: &str) -> String {
    let mut out = String::with_capacity(value.len() + 2);
    out.push('"');
    for c in value.chars() {
        if matches!(c, '"' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('"');
    out
}

fn list(values: &[String]) -> String {
    format!("[{}]", values.iter().map(|v| quoted(v)).collect::<Vec<_>>().join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owner_alone_is_the_minimum_filter() {
        assert_eq!(SearchFilter::owner("alice".parse().unwrap()).expression(), r#"owner == "alice""#);
    }

    #[test]
    fn every_part_is_anded_onto_the_owner() {
        let filter = SearchFilter {
            owner: "alice".parse().unwrap(),
            kind: Some(SourceKind::Document),
            source_ids: vec!["d1".into(), "d2".into()],
            exclude_source_ids: vec!["c9".into()],
        };
        assert_eq!(
            filter.expression(),
            r#"owner == "alice" && kind == "document" && source_id in ["d1", "d2"] && source_id not in ["c9"]"#
        );
    }

    #[test]
    fn quotes_and_backslashes_cannot_escape_the_literal() {
        let hostile = SearchFilter::owner(r#"x" || owner != "y\"#.parse().unwrap());
        assert_eq!(hostile.expression(), r#"owner == "x\" || owner != \"y\\""#);
    }

    #[test]
    fn kinds_round_trip_through_their_names() {
        for kind in [SourceKind::Document, SourceKind::Message] {
            assert_eq!(SourceKind::parse(kind.as_str()), Some(kind));
        }
        assert_eq!(SourceKind::parse("vector"), None);
    }
}
