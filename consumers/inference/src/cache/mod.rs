//! The semantic cache: an earlier answer to the same question, asked in the same context
//! by the same person, served instead of calling the model.
//!
//! - [`equivalence`]: whether two questions are the same question (pure);
//! - [`context_fingerprint`]: what an answer's context was, in 32 hex digits (pure).

pub mod equivalence;

use sha2::{Digest, Sha256};

/// The lowest cosine similarity of two questions' embeddings at which the cache considers
/// them (the word checks of [`equivalence`] decide the rest), chosen on tests/cache_eval.
pub const DEFAULT_MIN_SIMILARITY: f32 = 0.8;

/// A digest of what, besides the question, an answer depended on: the system prompt and
/// the earlier turns of the conversation that went into its prompt (role and text, in
/// order; case and runs of white space aside). A question that follows other turns, or
/// other instructions, has another fingerprint: "and of Germany?" after a question about
/// France never matches the same words after one about Spain.
pub fn context_fingerprint<'a>(system_prompt: &str, turns: impl IntoIterator<Item = (&'a str, &'a str)>) -> String {
    let mut digest = Sha256::new();
    let mut part = |text: &str| {
        let normal = text.split_whitespace().collect::<Vec<_>>().join(" ").to_lowercase();
        digest.update(normal.len().to_le_bytes());
        digest.update(normal.as_bytes());
    };
    part(system_prompt);
    for (role, text) in turns {
        part(role);
        part(text);
    }
    hex::encode(&digest.finalize()[..16])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fingerprint_is_of_the_turns_and_the_instructions() {
        let france = [("user", "Capital of France?"), ("assistant", "Paris.")];
        let spain = [("user", "Capital of Spain?"), ("assistant", "Madrid.")];
        let base = context_fingerprint("Be brief.", france);
        assert_eq!(base.len(), 32);
        assert_eq!(base, context_fingerprint("be  brief.", [("user", "capital of france?"), ("assistant", "paris.")]));
        assert_ne!(base, context_fingerprint("Be brief.", spain));
        assert_ne!(base, context_fingerprint("Be verbose.", france));
        assert_ne!(base, context_fingerprint("Be brief.", []));
        // Where one text ends and the next begins is part of it.
        assert_ne!(
            context_fingerprint("", [("user", "a b"), ("assistant", "c")]),
            context_fingerprint("", [("user", "a"), ("assistant", "b c")])
        );
    }
}
