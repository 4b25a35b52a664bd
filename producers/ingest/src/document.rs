//! What a valid document is, and its event. The document id is derived from the owner,
//! the title and the content, so submitting the same file twice yields the same document
//! (and the same vector ids: no duplicates), while an edited file is a new document.

use std::collections::HashMap;

use parley_events::{
    DocumentDeleted, DocumentId, DocumentSubmitted, Envelope, EventId, Producer as EventSource, UserId,
};
use thiserror::Error;
use uuid::Uuid;

/// The producer named in the envelope of every event ingest writes.
pub const SOURCE: EventSource = EventSource { name: "parley-ingest", version: env!("CARGO_PKG_VERSION") };

/// Largest document text accepted, in bytes (the documents topic caps records at 2 MiB).
pub const MAX_DOCUMENT_BYTES: usize = 1_000_000;
const MAX_TITLE_CHARS: usize = 256;
const MEDIA_TYPES: &[&str] = &["text/plain", "text/markdown"];
/// Namespace of document ids (uuid5).
const DOCUMENT_NAMESPACE: Uuid = Uuid::from_u128(0x6a1f_3c2e_8d4b_4f7a_9e21_5b0c_d3a8_7e64);

/// Why a submission is refused (the caller's mistake: HTTP 4xx).
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum SubmissionError {
    /// No text.
    #[error("the document is empty")]
    Empty,
    /// Over [`MAX_DOCUMENT_BYTES`].
    #[error("the document is {bytes} bytes; at most {MAX_DOCUMENT_BYTES} are accepted")]
    TooLarge {
        /// Its size.
        bytes: usize,
    },
    /// An empty title, or one too long.
    #[error("the title must be 1 to {MAX_TITLE_CHARS} characters")]
    BadTitle,
    /// Neither plain text nor Markdown.
    #[error("unsupported media type {0:?}: use text/plain or text/markdown")]
    MediaType(String),
    /// Bytes that are not UTF-8.
    #[error("the document is not UTF-8 text")]
    NotText,
}

/// A document someone wants in their knowledge base.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Submission {
    /// The user it belongs to (only they retrieve from it).
    pub owner: UserId,
    /// Shown with the chunks an answer cites.
    pub title: String,
    /// `text/plain` or `text/markdown`.
    pub media_type: String,
    /// The document's text.
    pub text: String,
    /// Free-form labels kept with the document.
    pub metadata: HashMap<String, String>,
}

impl Submission {
    /// Checks the submission and builds its event (sequence 1 of the document's own stream).
    pub fn into_event(self, traceparent: Option<String>) -> Result<DocumentSubmitted, SubmissionError> {
        if self.text.trim().is_empty() {
            return Err(SubmissionError::Empty);
        }
        if self.text.len() > MAX_DOCUMENT_BYTES {
            return Err(SubmissionError::TooLarge { bytes: self.text.len() });
        }
        let title_chars = self.title.chars().count();
        if title_chars == 0 || title_chars > MAX_TITLE_CHARS {
            return Err(SubmissionError::BadTitle);
        }
        if !MEDIA_TYPES.contains(&self.media_type.as_str()) {
            return Err(SubmissionError::MediaType(self.media_type));
        }
        let document_id = document_id(&self.owner, &self.title, &self.text);
        let event_id = Uuid::new_v5(&document_id.uuid(), b"submitted").into();
        Ok(DocumentSubmitted {
            sealed_for: String::new(),
            envelope: Envelope::new(event_id, document_id.stream(), 1, SOURCE).with_traceparent(traceparent),
            document_id,
            owner: self.owner,
            title: self.title,
            media_type: self.media_type,
            text: self.text,
            metadata: self.metadata,
        })
    }
}

/// The event that takes `document_id` out of `owner`'s knowledge base (sequence 2 of the
/// document's stream). Each request is a fact of its own, so its event id is new.
pub fn deletion_event(owner: &UserId, document_id: DocumentId, traceparent: Option<String>) -> DocumentDeleted {
    DocumentDeleted {
        envelope: Envelope::new(EventId::random(), document_id.stream(), 2, SOURCE).with_traceparent(traceparent),
        document_id,
        owner: owner.clone(),
    }
}

/// uuid5 over owner, title and content (length-prefixed, so fields cannot run together).
pub fn document_id(owner: &UserId, title: &str, text: &str) -> DocumentId {
    let owner = owner.as_str();
    let mut name = Vec::with_capacity(owner.len() + title.len() + text.len() + 24);
    for part in [owner, title, text] {
        name.extend_from_slice(&(part.len() as u64).to_be_bytes());
        name.extend_from_slice(part.as_bytes());
    }
    Uuid::new_v5(&DOCUMENT_NAMESPACE, &name).into()
}

/// The media type of a file by its extension: Markdown or plain text.
pub fn media_type_of(file_name: &str) -> &'static str {
    let lower = file_name.to_ascii_lowercase();
    if lower.ends_with(".md") || lower.ends_with(".markdown") { "text/markdown" } else { "text/plain" }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn submission(text: &str) -> Submission {
        Submission {
            owner: "alice".parse().unwrap(),
            title: "notes.md".into(),
            media_type: "text/markdown".into(),
            text: text.into(),
            metadata: HashMap::new(),
        }
    }

    #[test]
    fn the_same_document_gets_the_same_ids_and_an_edit_a_new_one() {
        let a = submission("Kafka is a log.").into_event(None).unwrap();
        let again = submission("Kafka is a log.").into_event(None).unwrap();
        let edited = submission("Kafka is a distributed log.").into_event(None).unwrap();
        assert_eq!((a.document_id, a.envelope.event_id), (again.document_id, again.envelope.event_id));
        assert_ne!(a.document_id, edited.document_id);
        assert_eq!(a.envelope.conversation_id, a.document_id.stream());
        assert_eq!(a.envelope.sequence, 1);
        let bob =
            Submission { owner: "bob".parse().unwrap(), ..submission("Kafka is a log.") }.into_event(None).unwrap();
        assert_ne!(a.document_id, bob.document_id, "ids are per owner");
    }

    #[test]
    fn bad_submissions_are_refused_with_a_reason() {
        assert_eq!(submission("  \n").into_event(None), Err(SubmissionError::Empty));
        let huge = "x".repeat(MAX_DOCUMENT_BYTES + 1);
        assert_eq!(
            submission(&huge).into_event(None),
            Err(SubmissionError::TooLarge { bytes: MAX_DOCUMENT_BYTES + 1 })
        );
        let untitled = Submission { title: String::new(), ..submission("text") };
        assert_eq!(untitled.into_event(None), Err(SubmissionError::BadTitle));
        let pdf = Submission { media_type: "application/pdf".into(), ..submission("text") };
        assert!(pdf.into_event(None).unwrap_err().to_string().contains("application/pdf"));
    }

    #[test]
    fn markdown_is_recognised_by_extension() {
        assert_eq!(media_type_of("README.MD"), "text/markdown");
        assert_eq!(media_type_of("notes.txt"), "text/plain");
    }
}
