//! A turn answered from the semantic cache: the same outcome event as a model's answer,
//! marked with where it came from, its text streamed as one delta.

use parley_events::conversation::Message;
use parley_events::event::now_millis;
use parley_events::{CachedAnswer, Envelope, LLMResponseGenerated, UserQueryReceived};
use parley_projections::ProjectionError;
use parley_projections::store::CachedAnswerRow;
use tracing::{Instrument, info, info_span};

use super::Worker;
use super::answer::TokenStream;
use crate::cache::{Asked, Candidate, choose, context_fingerprint};
use crate::metrics;
use crate::prompt::Prompt;

impl Worker {
    /// The fingerprint of the context `prompt` gives the model: the model configured, the
    /// system prompt and the earlier turns it holds.
    pub(super) fn context_fingerprint(&self, history: &[Message], prompt: &Prompt) -> String {
        let turns = history
            .iter()
            .filter(|m| prompt.context_event_ids.contains(&m.event_id))
            .map(|m| (m.kind.as_str(), m.text.as_str()));
        context_fingerprint(&self.model_name, &self.system_prompt, turns)
    }

    /// The cached answer that answers `query`, if the cache is on for it and one does
    /// (counted either way, a miss by its reason).
    pub(super) fn cache_hit<'c>(
        &self,
        query: &UserQueryReceived,
        candidates: &'c [Candidate],
        prompt: &Prompt,
        fingerprint: &str,
    ) -> Option<&'c Candidate> {
        if query.no_cache || !self.knowledge.as_ref().is_some_and(|k| k.caches()) {
            return None;
        }
        let documents = CachedAnswerRow::documents_of(&prompt.retrieved);
        let asked = Asked { text: &query.text, fingerprint, documents: &documents, now: now_millis() };
        match choose(&asked, candidates, &self.cache) {
            Ok(candidate) => {
                metrics::cache_lookup("hit", candidate.entry.llm_latency_ms);
                Some(candidate)
            }
            Err(miss) => {
                metrics::cache_lookup(miss.as_str(), 0);
                None
            }
        }
    }

    /// Streams `candidate`'s answer to the asker through `deltas` and returns the outcome event: the cached
    /// text, no model tokens and no model time, the prompt's context as it would have been,
    /// and `cached_from`.
    pub(super) async fn serve_cached(
        &self,
        query: &UserQueryReceived,
        candidate: &Candidate,
        envelope: Envelope,
        prompt: Prompt,
        fingerprint: String,
        deltas: TokenStream,
    ) -> Result<LLMResponseGenerated, ProjectionError> {
        let entry = &candidate.entry;
        let span = info_span!("inference.cache_hit", similarity = candidate.similarity,
                              answer_event_id = %entry.answer_event_id, saved_ms = entry.llm_latency_ms);
        async {
            // The cache row holds the earlier answer as its event had it (sealed for it).
            let mut text = entry.text.clone();
            if let Some(keys) = &self.keys {
                keys.open_text(&query.user_id, &entry.answer_event_id, "text", &mut text).await?;
            }
            let _ = deltas.sender.send((1, 0, text.clone()));
            deltas.finish().await;
            info!("answered from the semantic cache");
            Ok(LLMResponseGenerated {
                sealed_for: String::new(),
                envelope,
                query_event_id: query.envelope.event_id,
                text,
                model: entry.model.clone(),
                finish_reason: "stop".into(),
                prompt_tokens: 0,
                completion_tokens: 0,
                llm_latency_ms: 0,
                time_to_first_token_ms: None,
                attempts: 0,
                context_event_ids: prompt.context_event_ids,
                user_id: Some(query.user_id.clone()),
                retrieved: prompt.retrieved,
                context_fingerprint: fingerprint,
                cached_from: Some(CachedAnswer {
                    answer_event_id: entry.answer_event_id,
                    query_event_id: entry.query_event_id,
                    similarity: candidate.similarity,
                }),
                prompt: None, // no prompt was sent
            })
        }
        .instrument(span)
        .await
    }
}
