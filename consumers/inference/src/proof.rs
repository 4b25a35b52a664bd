//! The prompt proof: an answer records a digest of the messages the model was sent (and
//! how they were built), so `parley replay --prompts` can rebuild the prompt from events
//! alone with [`crate::prompt::build_prompt`] and prove it is the one sent, or say exactly
//! why it cannot. Pure: no I/O.

use parley_events::sealing::ERASED;
use parley_events::turn::CANCELLED;
use parley_events::{EventId, LLMResponseGenerated, PromptProof};
use sha2::{Digest, Sha256};

use crate::prompt::{ChatMessage, PromptLayout, Role};

/// The prompt builder's version: [`crate::prompt::build_prompt`] and [`digest`] as they
/// are. Anything that changes the messages a given history builds bumps it.
pub const PROMPT_BUILDER: &str = "parley-prompt/1";

/// A role as the digest (and the chat API) spells it.
pub fn role_name(role: Role) -> &'static str {
    match role {
        Role::System => "system",
        Role::User => "user",
        Role::Assistant => "assistant",
    }
}

/// The role `name` spells ([`role_name`]'s inverse).
pub fn role_named(name: &str) -> Option<Role> {
    [Role::System, Role::User, Role::Assistant].into_iter().find(|role| role_name(*role) == name)
}

/// SHA-256 (64 hex digits) of `messages`: for each, its role and its content, each
/// preceded by its length in bytes (8 bytes, little-endian), so no two prompts share one.
pub fn digest(messages: &[ChatMessage]) -> String {
    let mut sha = Sha256::new();
    for message in messages {
        for part in [role_name(message.role), message.content.as_str()] {
            sha.update((part.len() as u64).to_le_bytes());
            sha.update(part.as_bytes());
        }
    }
    hex::encode(sha.finalize())
}

/// SHA-256 (64 hex digits) of a system prompt.
pub fn system_prompt_digest(system_prompt: &str) -> String {
    hex::encode(Sha256::digest(system_prompt.as_bytes()))
}

/// The layout as an answer records it.
pub fn layout_name(layout: PromptLayout) -> &'static str {
    match layout {
        PromptLayout::Stable => "stable",
        PromptLayout::Sliding => "sliding",
    }
}

/// The layout an answer recorded.
pub fn layout_named(name: &str) -> Option<PromptLayout> {
    match name {
        "stable" => Some(PromptLayout::Stable),
        "sliding" => Some(PromptLayout::Sliding),
        _ => None,
    }
}

/// What an answer records of `messages`, built from `system_prompt` within `token_budget`,
/// `knowledge_turns` sent again with their knowledge.
pub fn proof_of(
    messages: &[ChatMessage],
    knowledge_turns: &[EventId],
    system_prompt: &str,
    token_budget: usize,
    layout: PromptLayout,
) -> PromptProof {
    PromptProof {
        digest: digest(messages),
        builder: PROMPT_BUILDER.to_owned(),
        layout: layout_name(layout).to_owned(),
        token_budget: i32::try_from(token_budget).unwrap_or(i32::MAX),
        system_prompt_digest: system_prompt_digest(system_prompt),
        messages: i32::try_from(messages.len()).unwrap_or(i32::MAX),
        knowledge_turns: knowledge_turns.to_vec(),
    }
}

/// Whether an answer's prompt could be rebuilt from events and proven the one sent.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "verdict", rename_all = "snake_case")]
pub enum Verdict {
    /// Rebuilt from events; its digest is the one the answer recorded.
    Proven,
    /// Rebuilt, but its digest differs: something the events do not hold shaped it (the
    /// embedder's chunking settings differ from the ones the replay was given, say).
    Differs {
        /// What is known about why.
        why: String,
    },
    /// It cannot be rebuilt exactly; the reason says what is missing.
    Unprovable {
        /// Why.
        why: String,
    },
}

impl std::fmt::Display for Verdict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Proven => write!(f, "proven: the rebuilt prompt has the digest the answer recorded"),
            Self::Differs { why } => write!(f, "DIFFERS from the prompt sent: {why}"),
            Self::Unprovable { why } => write!(f, "cannot be rebuilt exactly: {why}"),
        }
    }
}

/// Why `answer`'s prompt cannot be rebuilt before anything is fetched, if it cannot: served
/// from the cache, cancelled before the model was called, written before proofs, erased,
/// built by another builder, or with another system prompt than `system_prompt`.
pub fn precheck(answer: &LLMResponseGenerated, system_prompt: &str) -> Result<PromptLayout, Verdict> {
    let unprovable = |why: String| Verdict::Unprovable { why };
    if answer.cached_from.is_some() {
        return Err(unprovable("served from the semantic cache: no prompt was sent to the model".into()));
    }
    let Some(proof) = &answer.prompt else {
        if answer.finish_reason == CANCELLED && answer.attempts == 0 {
            return Err(unprovable("cancelled before the model was called: no prompt was sent".into()));
        }
        return Err(unprovable("the answer records no prompt digest (written before LLMResponseGenerated v5)".into()));
    };
    if proof.digest == ERASED {
        return Err(unprovable("the owner was erased: the digest and the words it covers are unreadable".into()));
    }
    if proof.builder != PROMPT_BUILDER {
        return Err(unprovable(format!("built by {}, this replay has {PROMPT_BUILDER}", proof.builder)));
    }
    if proof.system_prompt_digest != system_prompt_digest(system_prompt) {
        return Err(unprovable(
            "the system prompt changed since (its digest differs from the one recorded): pass the one in use then \
             with --system-prompt"
                .into(),
        ));
    }
    layout_named(&proof.layout).ok_or_else(|| unprovable(format!("unknown layout {:?}", proof.layout)))
}

/// The verdict on a rebuilt prompt.
pub fn verify(proof: &PromptProof, rebuilt: &[ChatMessage]) -> Verdict {
    if digest(rebuilt) == proof.digest {
        return Verdict::Proven;
    }
    let count = if usize::try_from(proof.messages).ok() == Some(rebuilt.len()) {
        format!("same number of messages ({})", rebuilt.len())
    } else {
        format!("{} messages rebuilt, {} sent", rebuilt.len(), proof.messages)
    };
    Verdict::Differs {
        why: format!("{count}; a retrieved chunk's text (chunking settings) or an earlier turn differs"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn messages() -> Vec<ChatMessage> {
        vec![
            ChatMessage { role: Role::System, content: "Be brief.".into() },
            ChatMessage { role: Role::User, content: "Name a planet.".into() },
        ]
    }

    #[test]
    fn the_digest_covers_every_role_and_word_and_their_boundaries() {
        let base = digest(&messages());
        assert_eq!(base.len(), 64);
        let mut other_role = messages();
        other_role[1].role = Role::Assistant;
        let mut shifted = messages();
        shifted[0].content = "Be brief.Name".into();
        shifted[1].content = " a planet.".into();
        for changed in [other_role, shifted, messages()[..1].to_vec()] {
            assert_ne!(digest(&changed), base, "{changed:?}");
        }
        assert_eq!(digest(&messages()), base);
    }

    fn answer(proof: Option<PromptProof>) -> LLMResponseGenerated {
        let id = parley_events::ConversationId::random();
        let producer = parley_events::Producer { name: "t", version: "0" };
        LLMResponseGenerated {
            sealed_for: String::new(),
            envelope: parley_events::Envelope::new(EventId::random(), id, 3, producer),
            query_event_id: EventId::random(),
            text: "Mars.".into(),
            model: "m".into(),
            finish_reason: "stop".into(),
            prompt_tokens: 20,
            completion_tokens: 2,
            llm_latency_ms: 90,
            time_to_first_token_ms: None,
            attempts: 1,
            context_event_ids: vec![],
            user_id: Some("alice".parse().unwrap()),
            retrieved: vec![],
            context_fingerprint: String::new(),
            cached_from: None,
            prompt: proof.map(Box::new),
        }
    }

    #[test]
    fn a_rebuilt_prompt_is_proven_only_when_it_is_the_one_sent() {
        let proof = proof_of(&messages(), &[], "Be brief.", 1536, PromptLayout::Stable);
        assert_eq!(precheck(&answer(Some(proof.clone())), "Be brief."), Ok(PromptLayout::Stable));
        assert_eq!(verify(&proof, &messages()), Verdict::Proven);
        let mut edited = messages();
        edited[1].content = "Name a star.".into();
        assert!(
            matches!(verify(&proof, &edited), Verdict::Differs { why } if why.contains("same number of messages (2)"))
        );
    }

    #[test]
    fn each_reason_a_prompt_cannot_be_rebuilt_is_named() {
        let proof = proof_of(&messages(), &[], "Be brief.", 1536, PromptLayout::Sliding);
        let why = |answer: LLMResponseGenerated, system_prompt: &str| match precheck(&answer, system_prompt) {
            Err(Verdict::Unprovable { why }) => why,
            other => panic!("{other:?}"),
        };
        let cached = LLMResponseGenerated {
            cached_from: Some(parley_events::CachedAnswer {
                answer_event_id: EventId::random(),
                query_event_id: EventId::random(),
                similarity: 0.97,
            }),
            ..answer(None)
        };
        assert!(why(cached, "Be brief.").contains("semantic cache"));
        let stopped_early = LLMResponseGenerated { finish_reason: CANCELLED.into(), attempts: 0, ..answer(None) };
        assert!(why(stopped_early, "Be brief.").contains("cancelled before the model was called"));
        assert!(why(answer(None), "Be brief.").contains("before LLMResponseGenerated v5"));
        assert!(why(answer(Some(proof.clone())), "Be verbose.").contains("system prompt changed"));
        let erased = PromptProof { digest: ERASED.into(), ..proof.clone() };
        assert!(why(answer(Some(erased)), "Be brief.").contains("erased"));
        let older = PromptProof { builder: "parley-prompt/0".into(), ..proof };
        assert!(why(answer(Some(older)), "Be brief.").contains("parley-prompt/0"));
    }
}
