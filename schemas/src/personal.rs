//! Which fields of which event hold what a person wrote or was answered, and whose they
//! are: what [`crate::sealing`] seals when an event is written and opens when it is read.
//! Ids, sequences, times, token counts, model names and positions stay in clear, so
//! budgets, audit and the replay of structure work without any key.

use std::borrow::Cow;

use crate::event::{ConversationEvent, DocumentSubmitted, LLMResponseGenerated, UserQueryReceived};
use crate::experiment::{ExperimentEvent, ExperimentRequested, ExperimentRun};
use crate::ids::{EventId, UserId};
use crate::sealing::{DataKey, ERASED, SealError, UNREADABLE, is_sealed};

/// An event's personal text: its subject, the id its values are bound to, and the fields.
#[derive(Debug)]
pub struct PersonalFields<'a> {
    /// Whose content it is: their data key seals it.
    pub subject: UserId,
    /// What each value is bound to (the event's id).
    pub bound_to: EventId,
    /// The event's `sealed_for` (empty: plain).
    pub sealed_for: &'a mut String,
    /// Each field's name (as bound) and value.
    pub fields: Vec<(Cow<'static, str>, &'a mut String)>,
}

/// An event that may hold personal content.
pub trait Personal {
    /// Its personal fields; None when it holds none (or its subject is unknown: an answer
    /// written before answers named their asker).
    fn personal(&mut self) -> Option<PersonalFields<'_>>;

    /// Seals every personal field under `key` (of the event's subject). Already sealed: kept.
    fn seal_with(&mut self, key: &DataKey) {
        let Some(p) = self.personal() else { return };
        if !p.sealed_for.is_empty() {
            return;
        }
        for (field, value) in p.fields {
            *value = key.seal(&p.bound_to, &field, value);
        }
        *p.sealed_for = p.subject.to_string();
    }

    /// Opens every sealed field with `key` (None: the subject's key is gone, so each becomes
    /// [`ERASED`]). A value that does not open with a live key becomes [`UNREADABLE`];
    /// the first such error is returned after every field was handled. Opened, the event
    /// is plain (`sealed_for` empty).
    fn open_with(&mut self, key: Option<&DataKey>) -> Result<(), SealError> {
        let Some(p) = self.personal() else { return Ok(()) };
        if p.sealed_for.is_empty() {
            return Ok(());
        }
        let mut failed = Ok(());
        for (field, value) in p.fields {
            if !is_sealed(value) {
                continue;
            }
            *value = match key.map(|key| key.open(&p.bound_to, &field, value)) {
                None => ERASED.to_owned(),
                Some(Ok(text)) => text,
                Some(Err(error)) => {
                    failed = failed.and(Err(error));
                    UNREADABLE.to_owned()
                }
            };
        }
        p.sealed_for.clear();
        failed
    }

    /// Whose content this is, if it holds any.
    fn subject(&mut self) -> Option<UserId> {
        self.personal().map(|p| p.subject)
    }

    /// Whether its personal fields are sealed.
    fn is_sealed(&mut self) -> bool {
        self.personal().is_some_and(|p| !p.sealed_for.is_empty())
    }
}

impl Personal for UserQueryReceived {
    fn personal(&mut self) -> Option<PersonalFields<'_>> {
        Some(PersonalFields {
            subject: self.user_id.clone(),
            bound_to: self.envelope.event_id,
            sealed_for: &mut self.sealed_for,
            fields: vec![(Cow::Borrowed("text"), &mut self.text)],
        })
    }
}

impl Personal for LLMResponseGenerated {
    fn personal(&mut self) -> Option<PersonalFields<'_>> {
        Some(PersonalFields {
            subject: self.user_id.clone()?,
            bound_to: self.envelope.event_id,
            sealed_for: &mut self.sealed_for,
            // The prompt's digest is of the person's words: a guessable question could be
            // confirmed by hashing guesses, so it is sealed (and erased) with the text.
            fields: std::iter::once((Cow::Borrowed("text"), &mut self.text))
                .chain(self.prompt.as_mut().map(|proof| (Cow::Borrowed("prompt digest"), &mut proof.digest)))
                .collect(),
        })
    }
}

impl Personal for ExperimentRun {
    fn personal(&mut self) -> Option<PersonalFields<'_>> {
        Some(PersonalFields {
            subject: self.user_id.clone(),
            bound_to: self.envelope.event_id,
            sealed_for: &mut self.sealed_for,
            fields: vec![(Cow::Borrowed("text"), &mut self.text)],
        })
    }
}

impl Personal for ExperimentRequested {
    fn personal(&mut self) -> Option<PersonalFields<'_>> {
        Some(PersonalFields {
            subject: self.user_id.clone(),
            bound_to: self.envelope.event_id,
            sealed_for: &mut self.sealed_for,
            fields: self
                .messages
                .iter_mut()
                .enumerate()
                .map(|(i, message)| (Cow::Owned(format!("message {i}")), &mut message.content))
                .collect(),
        })
    }
}

impl Personal for ExperimentEvent {
    fn personal(&mut self) -> Option<PersonalFields<'_>> {
        match self {
            Self::Requested(request) => request.personal(),
            Self::Run(run) => run.personal(),
        }
    }
}

impl Personal for ConversationEvent {
    fn personal(&mut self) -> Option<PersonalFields<'_>> {
        match self {
            Self::QueryReceived(query) => query.personal(),
            Self::ResponseGenerated(answer) => answer.personal(),
            Self::Started(_) | Self::ResponseFailed(_) | Self::CancelRequested(_) => None,
        }
    }
}

impl Personal for DocumentSubmitted {
    fn personal(&mut self) -> Option<PersonalFields<'_>> {
        let mut fields: Vec<(Cow<'static, str>, &mut String)> =
            vec![(Cow::Borrowed("title"), &mut self.title), (Cow::Borrowed("text"), &mut self.text)];
        fields.extend(self.metadata.iter_mut().map(|(name, value)| (Cow::Owned(format!("metadata {name}")), value)));
        Some(PersonalFields {
            subject: self.owner.clone(),
            bound_to: self.envelope.event_id,
            sealed_for: &mut self.sealed_for,
            fields,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_events;

    #[test]
    fn a_sealed_question_keeps_its_structure_and_opens_only_with_its_key() {
        let mut plain = test_events::query(uuid::Uuid::new_v4().into(), 2, "m-1");
        if let ConversationEvent::QueryReceived(q) = &mut plain {
            q.text = "the canary 91b2".into();
        }
        let mut event = plain.clone();
        let key = DataKey::generate();
        event.seal_with(&key);
        let ConversationEvent::QueryReceived(q) = &event else { panic!() };
        assert!(is_sealed(&q.text) && !q.text.contains("canary"));
        assert_eq!(q.sealed_for, q.user_id.to_string());
        assert_eq!(event.envelope(), plain.envelope(), "the structure stays in clear");
        let sealed = event.clone();
        event.seal_with(&DataKey::generate());
        assert_eq!(event, sealed, "sealing twice changes nothing");

        event.open_with(Some(&key)).unwrap();
        assert_eq!(event, plain);

        let mut erased = sealed.clone();
        erased.open_with(None).unwrap();
        let ConversationEvent::QueryReceived(q) = &erased else { panic!() };
        assert_eq!(q.text, ERASED);

        let mut wrong = sealed;
        assert_eq!(wrong.open_with(Some(&DataKey::generate())), Err(SealError::Unopenable));
        let ConversationEvent::QueryReceived(q) = &wrong else { panic!() };
        assert_eq!(q.text, UNREADABLE);
    }

    #[test]
    fn a_document_seals_its_title_text_and_labels() {
        let document_id: crate::ids::DocumentId = uuid::Uuid::new_v4().into();
        let mut document = DocumentSubmitted {
            envelope: crate::event::Envelope::new(EventId::random(), document_id.stream(), 1, test_events::P),
            document_id,
            owner: "u-dana".parse().unwrap(),
            title: "canary title".into(),
            media_type: "text/plain".into(),
            text: "canary text".into(),
            metadata: [("file_name".to_owned(), "canary.txt".to_owned())].into(),
            sealed_for: String::new(),
        };
        let plain = document.clone();
        let key = DataKey::generate();
        document.seal_with(&key);
        assert!(!format!("{document:?}").contains("canary"), "{document:?}");
        assert_eq!(document.metadata.keys().collect::<Vec<_>>(), ["file_name"], "label names stay");
        document.open_with(Some(&key)).unwrap();
        assert_eq!(document, plain);
    }
}
