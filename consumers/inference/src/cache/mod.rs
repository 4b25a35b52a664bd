//! The semantic cache: an earlier answer to the same question, asked in the same context
//! by the same person, served instead of calling the model.
//!
//! - [`equivalence`]: whether two questions are the same question (pure);
//! - [`context_fingerprint`]: what an answer's context was, in 32 hex digits (pure);
//! - [`choose`]: which candidate, if any, answers a question (pure).
//!
//! Candidates come from the vector store (the asker's earlier questions nearest to the
//! new one, found with the embedding retrieval computes anyway) joined with the cache's
//! rows in the projection ([`parley_projections::store::CachedAnswerRow`]).

pub mod equivalence;

use std::time::Duration;

use parley_projections::store::CachedAnswerRow;
use sha2::{Digest, Sha256};

use self::equivalence::{Refusal, equivalent};

/// The lowest cosine similarity of two questions' embeddings at which the cache considers
/// them (the word checks of [`equivalence`] decide the rest), chosen on tests/cache_eval.
pub const DEFAULT_MIN_SIMILARITY: f32 = 0.8;

/// A digest of what, besides the question, an answer depended on: the model configured, the system prompt and
/// the earlier turns of the conversation that went into its prompt (role and text, in
/// order; case and runs of white space aside). A question that follows other turns, or
/// other instructions, has another fingerprint: "and of Germany?" after a question about
/// France never matches the same words after one about Spain.
pub fn context_fingerprint<'a>(
    model: &str,
    system_prompt: &str,
    turns: impl IntoIterator<Item = (&'a str, &'a str)>,
) -> String {
    let mut digest = Sha256::new();
    let mut part = |text: &str| {
        let normal = text.split_whitespace().collect::<Vec<_>>().join(" ").to_lowercase();
        digest.update(normal.len().to_le_bytes());
        digest.update(normal.as_bytes());
    };
    part(model);
    part(system_prompt);
    for (role, text) in turns {
        part(role);
        part(text);
    }
    hex::encode(&digest.finalize()[..16])
}

/// How the cache decides.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CacheSettings {
    /// The lowest cosine similarity of two questions considered.
    pub min_similarity: f32,
    /// Entries older than this are not served.
    pub ttl: Duration,
}

/// An earlier question of the asker's, near the new one, with its cached answer.
#[derive(Debug, Clone, PartialEq)]
pub struct Candidate {
    /// Its text.
    pub question: String,
    /// Cosine similarity to the new question.
    pub similarity: f32,
    /// Its cached answer.
    pub entry: CachedAnswerRow,
}

/// The new question, as the cache compares it.
#[derive(Debug, Clone, PartialEq)]
pub struct Asked<'a> {
    /// Its text.
    pub text: &'a str,
    /// Its context's fingerprint.
    pub fingerprint: &'a str,
    /// The versions of the documents its prompt quotes, sorted.
    pub documents: &'a [String],
    /// Now (ms since the epoch).
    pub now: i64,
}

/// Why no candidate was served: the reason of the nearest one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Miss {
    /// No earlier answered question near enough.
    NoCandidate,
    /// Older than the TTL.
    Expired,
    /// Asked after other earlier turns, other instructions or for another model.
    OtherContext,
    /// Its prompt quoted other documents, or other versions of them (one since deleted,
    /// replaced or no longer found for this question).
    OtherDocuments,
    /// Not the same question.
    Refused(Refusal),
}

impl Miss {
    /// As metrics name it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::NoCandidate => "no_candidate",
            Self::Expired => "expired",
            Self::OtherContext => "other_context",
            Self::OtherDocuments => "other_documents",
            Self::Refused(refusal) => refusal.as_str(),
        }
    }
}

/// The newest candidate whose answer answers `asked`, or why none does (the nearest
/// candidate's reason). Every condition must hold: young enough, the same context, the
/// same documents, and the same question ([`equivalent`]).
pub fn choose<'c>(
    asked: &Asked<'_>,
    candidates: &'c [Candidate],
    settings: &CacheSettings,
) -> Result<&'c Candidate, Miss> {
    let ttl = i64::try_from(settings.ttl.as_millis()).unwrap_or(i64::MAX);
    let verdict = |c: &Candidate| {
        if asked.now.saturating_sub(c.entry.occurred_at) > ttl {
            Err(Miss::Expired)
        } else if c.entry.context_fingerprint != asked.fingerprint {
            Err(Miss::OtherContext)
        } else if c.entry.documents != asked.documents {
            Err(Miss::OtherDocuments)
        } else {
            equivalent(asked.text, &c.question, c.similarity, settings.min_similarity).map_err(Miss::Refused)
        }
    };
    let mut nearest: Option<(f32, Miss)> = None;
    let mut chosen: Option<&Candidate> = None;
    for candidate in candidates {
        match verdict(candidate) {
            Ok(()) if chosen.is_none_or(|c| c.entry.occurred_at < candidate.entry.occurred_at) => {
                chosen = Some(candidate)
            }
            Ok(()) => {}
            Err(miss) if nearest.is_none_or(|(s, _)| s < candidate.similarity) => {
                nearest = Some((candidate.similarity, miss))
            }
            Err(_) => {}
        }
    }
    chosen.ok_or(nearest.map_or(Miss::NoCandidate, |(_, miss)| miss))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fingerprint_is_of_the_turns_and_the_instructions() {
        let france = [("user", "Capital of France?"), ("assistant", "Paris.")];
        let spain = [("user", "Capital of Spain?"), ("assistant", "Madrid.")];
        let base = context_fingerprint("m", "Be brief.", france);
        assert_eq!(base.len(), 32);
        assert_eq!(
            base,
            context_fingerprint("m", "be  brief.", [("user", "capital of france?"), ("assistant", "paris.")])
        );
        assert_ne!(base, context_fingerprint("m", "Be brief.", spain));
        assert_ne!(base, context_fingerprint("m", "Be verbose.", france));
        assert_ne!(base, context_fingerprint("other model", "Be brief.", france));
        assert_ne!(base, context_fingerprint("m", "Be brief.", []));
        // Where one text ends and the next begins is part of it.
        assert_ne!(
            context_fingerprint("m", "", [("user", "a b"), ("assistant", "c")]),
            context_fingerprint("m", "", [("user", "a"), ("assistant", "b c")])
        );
    }

    fn candidate(question: &str, similarity: f32, occurred_at: i64, documents: &[&str]) -> Candidate {
        let id = || uuid::Uuid::new_v4().into();
        Candidate {
            question: question.into(),
            similarity,
            entry: CachedAnswerRow {
                query_event_id: id(),
                answer_event_id: id(),
                conversation_id: uuid::Uuid::new_v4().into(),
                text: "Paris.".into(),
                model: "m".into(),
                context_fingerprint: "f".into(),
                documents: documents.iter().map(|d| (*d).to_owned()).collect(),
                llm_latency_ms: 900,
                occurred_at,
            },
        }
    }

    #[test]
    fn the_newest_candidate_that_passes_every_check_is_served() {
        let settings = CacheSettings { min_similarity: 0.8, ttl: Duration::from_secs(60) };
        let documents = vec!["d1".to_owned()];
        let asked =
            Asked { text: "What is the capital of France?", fingerprint: "f", documents: &documents, now: 100_000 };
        let old = candidate("what's the capital of France", 0.97, 50_000, &["d1"]);
        let new = candidate("What is the capital of France", 0.95, 90_000, &["d1"]);
        let candidates = [old.clone(), new.clone()];
        assert_eq!(choose(&asked, &candidates, &settings), Ok(&candidates[1]));
        assert_eq!(choose(&asked, &[], &settings), Err(Miss::NoCandidate));
        let expired = candidate("What is the capital of France", 0.99, 10_000, &["d1"]);
        assert_eq!(choose(&asked, &[expired], &settings), Err(Miss::Expired));
        let elsewhere = Candidate {
            entry: CachedAnswerRow { context_fingerprint: "g".into(), ..new.entry.clone() },
            ..new.clone()
        };
        assert_eq!(choose(&asked, &[elsewhere], &settings), Err(Miss::OtherContext));
        let other_documents = candidate("What is the capital of France", 0.99, 90_000, &["d2"]);
        assert_eq!(choose(&asked, &[other_documents], &settings), Err(Miss::OtherDocuments));
        let germany = candidate("What is the capital of Germany?", 0.9, 90_000, &["d1"]);
        let negated = candidate("What is not the capital of France?", 0.85, 90_000, &["d1"]);
        // The nearest candidate's reason is the miss's.
        assert_eq!(choose(&asked, &[negated, germany.clone()], &settings), Err(Miss::Refused(Refusal::Wording)));
        let dissimilar = Candidate { similarity: 0.5, ..old };
        assert_eq!(choose(&asked, &[dissimilar], &settings), Err(Miss::Refused(Refusal::Dissimilar)));
    }
}
