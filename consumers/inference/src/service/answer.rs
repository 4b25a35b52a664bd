//! One answer: budget, history, retrieval, the model call with its token stream, and the
//! outcome event.

use std::sync::{Mutex, PoisonError};

use futures::future::join_all;
use parley_eventlog::trace::{continue_trace, traceparent_of};
use parley_eventlog::transaction::Outgoing;
use parley_events::budget::BUDGET_EXCEEDED;
use parley_events::event::now_millis;
use parley_events::personal::Personal;
use parley_events::sealing::{DataKey, delta_field};
use parley_events::turn::outcome_sequence;
use parley_events::{
    ConversationId, Envelope, EventId, LLMResponseFailed, LLMResponseGenerated, LLMTokenDelta, PromptProof, UserId,
    UserQueryReceived,
};
use parley_projections::ProjectionError;
use parley_projections::budget::Reserved;
use tokio::sync::mpsc;
use tracing::field::Empty;
use tracing::{Instrument, Span, info, info_span, warn};
use uuid::Uuid;

use super::ahead::Found;
use super::{InferenceError, SOURCE, Worker};
use crate::cancel::Partial;
use crate::completion::millis;
use crate::metrics;
use crate::prompt::{Prompt, build_prompt, estimate_tokens};
use crate::proof::proof_of;

/// How an answer (its deltas and its outcome) goes out.
#[derive(Clone)]
pub(super) enum Sealing {
    /// As the model wrote it (no master key is configured).
    Plain,
    /// Sealed under the asker's data key.
    Sealed(DataKey, UserId),
}

impl Sealing {
    /// `answer` as the log keeps it.
    pub(super) fn seal(&self, mut answer: LLMResponseGenerated) -> LLMResponseGenerated {
        if let Self::Sealed(key, _) = self {
            answer.seal_with(key);
        }
        answer
    }
}

/// The failure kind of a question whose asker was erased before it was answered.
const ERASED: &str = "erased";

/// The deltas of one answer on their way to the tokens topic, in order.
pub(super) struct TokenStream {
    /// (attempt, index, text) of each delta.
    pub(super) sender: mpsc::UnboundedSender<(i32, i32, String)>,
    task: tokio::task::JoinHandle<()>,
}

impl TokenStream {
    /// Waits until every delta sent so far is acknowledged (or given up on).
    pub(super) async fn finish(self) {
        drop(self.sender);
        let _ = self.task.await;
    }
}

impl Worker {
    /// Asks the model and returns the encoded outcome event (generated or failed).
    pub(super) async fn answer(
        &self,
        query: &UserQueryReceived,
        partition: i32,
        offset: i64,
    ) -> Result<Outgoing, InferenceError> {
        let span = info_span!(parent: None, "inference.answer", conversation_id = %query.envelope.conversation_id,
                              query_event_id = %query.envelope.event_id, traceparent = Empty);
        continue_trace(&span, query.envelope.traceparent.as_deref());
        let traceparent = traceparent_of(&span, query.envelope.traceparent.as_deref());
        span.record("traceparent", traceparent.as_str());
        async {
            // Deterministic: a re-delivered query produces an outcome with the same event id.
            // (The codec refuses, and the driver dead-letters, a query whose id is not a UUID.)
            let outcome_id = Uuid::new_v5(&query.envelope.event_id.uuid(), b"outcome").into();
            // Made when the outcome is known: its occurred_at is when the answer was done.
            let envelope = || {
                Envelope::new(
                    outcome_id,
                    query.envelope.conversation_id,
                    outcome_sequence(query.envelope.sequence),
                    SOURCE,
                )
                .caused_by(&query.envelope)
                .with_traceparent(Some(traceparent.clone()))
            };
            let conversation_id = query.envelope.conversation_id;
            let outgoing = |payload| Outgoing {
                topic: self.topics.events.clone(),
                key: conversation_id.to_string(),
                payload,
                traceparent: Some(traceparent.clone()),
            };
            let sealing = match self.sealing(query).instrument(info_span!("inference.seal_key")).await {
                Ok(sealing) => sealing,
                Err(ProjectionError::Erased(_)) => {
                    info!("the asker was erased before the answer; writing LLMResponseFailed");
                    self.outcome_seen(query, partition, ERASED);
                    self.settle_budget(query, 0).await;
                    let message = "the asker's data was erased".to_owned();
                    return Ok(outgoing(self.failed(envelope(), query, ERASED, message, 0).await?));
                }
                Err(error) => return Err(error.into()),
            };
            let Ok(cancel) = self.cancels.start(query.envelope.event_id) else {
                info!("cancelled before its answer started; writing an empty cancelled answer");
                self.outcome_seen(query, partition, "cancelled");
                self.settle_budget(query, 0).await;
                let cancelled = Partial::default().into_answer(envelope(), query, &self.model_name, 0, Vec::new());
                return Ok(outgoing(self.codec.encode(&sealing.seal(cancelled)).await?));
            };
            if let Some(exceeded) = self.over_budget(query).instrument(info_span!("inference.budget")).await {
                warn!(%exceeded, "over its token budget; writing LLMResponseFailed");
                self.outcome_seen(query, partition, BUDGET_EXCEEDED);
                return Ok(outgoing(self.failed(envelope(), query, BUDGET_EXCEEDED, exceeded, 0).await?));
            }
            let (history, past_knowledge) =
                self.context.history(query, partition, offset).instrument(info_span!("inference.context")).await?;
            let found = match &self.knowledge {
                Some(knowledge) => knowledge.for_query(query).await,
                None => Found::default(),
            };
            let prompt = build_prompt(
                &self.system_prompt,
                &history,
                query,
                &found.hits,
                self.context_token_budget,
                self.prompt_layout,
                &past_knowledge,
            );
            if let Some(block) = &prompt.knowledge {
                self.context.remember_knowledge(query, block.clone());
            }
            let fingerprint = self.context_fingerprint(&history, &prompt);
            if let Some(candidate) = self.cache_hit(query, &found.candidates, &prompt, &fingerprint) {
                metrics::first_token(self.lanes.lane_of(partition).as_str(), now_millis() - query.envelope.occurred_at);
                let deltas =
                    self.stream_tokens(conversation_id, query.envelope.event_id, &traceparent, sealing.clone());
                let answer = self.serve_cached(query, candidate, envelope(), prompt, fingerprint, deltas).await?;
                self.outcome_seen(query, partition, "answer");
                self.settle_budget(query, 0).await;
                return Ok(outgoing(self.codec.encode(&sealing.seal(answer)).await?));
            }
            let deltas = self.stream_tokens(conversation_id, query.envelope.event_id, &traceparent, sealing.clone());
            let partial = Mutex::new(Partial::started());
            let lane = self.lanes.lane_of(partition).as_str();
            let mut first_token = true;
            // Named and described as the OpenTelemetry GenAI conventions have it.
            let llm_span = info_span!("inference.llm", otel.name = %format!("chat {}", self.model_name),
                "gen_ai.operation.name" = "chat", "gen_ai.provider.name" = %self.provider,
                "gen_ai.request.model" = %self.model_name, "gen_ai.conversation.id" = %conversation_id,
                "gen_ai.response.model" = Empty, "gen_ai.usage.input_tokens" = Empty,
                "gen_ai.usage.output_tokens" = Empty, "gen_ai.response.finish_reasons" = Empty,
                "error.type" = Empty, prompt_messages = prompt.messages.len());
            let call = self
                .model
                .complete(&prompt.messages, |attempt, index, delta| {
                    if std::mem::take(&mut first_token) {
                        metrics::first_token(lane, now_millis() - query.envelope.occurred_at);
                    }
                    partial.lock().unwrap_or_else(PoisonError::into_inner).add(index, delta);
                    let _ = deltas.sender.send((i32::try_from(attempt).unwrap_or(i32::MAX), index, delta.to_owned()));
                })
                .instrument(llm_span.clone());
            // A cancel drops the call: its stream closes and the model server frees the slot.
            let called = tokio::select! {
                called = call => Some(called),
                () = cancel.cancelled() => None,
            };
            // Deltas reach the log before the outcome is committed, so a reader that sees
            // the outcome has had every delta offered first.
            deltas.finish().await;
            let Some((result, attempts)) = called else {
                let partial = partial.into_inner().unwrap_or_else(PoisonError::into_inner);
                let prompt_tokens = prompt.messages.iter().map(|m| estimate_tokens(&m.content)).sum::<usize>();
                let prompt_tokens = i32::try_from(prompt_tokens).unwrap_or(i32::MAX);
                let proof = self.proof_of(&prompt);
                let cancelled =
                    partial.into_answer(envelope(), query, &self.model_name, prompt_tokens, prompt.retrieved);
                info!(tokens = cancelled.completion_tokens, "cancelled while generating");
                self.outcome_seen(query, partition, "cancelled");
                let used = i64::from(cancelled.prompt_tokens) + i64::from(cancelled.completion_tokens);
                self.settle_budget(query, u64::try_from(used).unwrap_or(0)).await;
                let cancelled = LLMResponseGenerated {
                    context_event_ids: prompt.context_event_ids,
                    prompt: Some(Box::new(proof)),
                    ..cancelled
                };
                return Ok(outgoing(self.codec.encode(&sealing.seal(cancelled)).await?));
            };
            let attempts = i32::try_from(attempts).unwrap_or(i32::MAX);
            let used = result.as_ref().map_or(0, |c| i64::from(c.prompt_tokens) + i64::from(c.completion_tokens));
            self.settle_budget(query, u64::try_from(used).unwrap_or(0)).await;
            match &result {
                Ok(completion) => {
                    llm_span.record("gen_ai.response.model", completion.model.as_str());
                    llm_span.record("gen_ai.usage.input_tokens", completion.prompt_tokens);
                    llm_span.record("gen_ai.usage.output_tokens", completion.completion_tokens);
                    llm_span.record("gen_ai.response.finish_reasons", completion.finish_reason.as_str());
                    self.outcome_seen(query, partition, "answer");
                }
                Err(error) => {
                    llm_span.record("error.type", error.kind());
                    self.outcome_seen(query, partition, error.kind());
                }
            }
            let proof = self.proof_of(&prompt);
            let payload = match result {
                Ok(completion) => {
                    info!(
                        latency_ms = completion.latency.as_millis(),
                        tokens = completion.completion_tokens,
                        "answered"
                    );
                    self.codec
                        .encode(&sealing.seal(LLMResponseGenerated {
                            sealed_for: String::new(),
                            envelope: envelope(),
                            query_event_id: query.envelope.event_id,
                            text: completion.text,
                            model: completion.model,
                            finish_reason: completion.finish_reason,
                            prompt_tokens: completion.prompt_tokens,
                            completion_tokens: completion.completion_tokens,
                            llm_latency_ms: millis(completion.latency),
                            time_to_first_token_ms: completion.time_to_first_token.map(millis),
                            attempts,
                            context_event_ids: prompt.context_event_ids,
                            user_id: Some(query.user_id.clone()),
                            retrieved: prompt.retrieved,
                            context_fingerprint: fingerprint,
                            cached_from: None,
                            prompt: Some(Box::new(proof)),
                        }))
                        .await?
                }
                Err(error) => {
                    warn!(%error, attempts, "LLM failed; writing LLMResponseFailed");
                    self.failed(envelope(), query, error.kind(), error.to_string(), attempts).await?
                }
            };
            Ok(outgoing(payload))
        }
        .instrument(span)
        .await
    }

    /// What the answer records of the prompt sent ([`crate::proof`]).
    fn proof_of(&self, prompt: &Prompt) -> PromptProof {
        proof_of(
            &prompt.messages,
            &prompt.knowledge_turns,
            &self.system_prompt,
            self.context_token_budget,
            self.prompt_layout,
        )
    }

    /// Counts a question's outcome (`answer`, `cancelled` or a failure's kind) and how long
    /// after it was written it came.
    fn outcome_seen(&self, query: &UserQueryReceived, partition: i32, outcome: &str) {
        metrics::outcome(self.lanes.lane_of(partition).as_str(), outcome, now_millis() - query.envelope.occurred_at);
        if !matches!(outcome, "answer" | "cancelled") {
            metrics::failure(outcome);
        }
    }

    /// The encoded `LLMResponseFailed` of `query`.
    async fn failed(
        &self,
        envelope: Envelope,
        query: &UserQueryReceived,
        kind: &str,
        message: String,
        attempts: i32,
    ) -> Result<Vec<u8>, InferenceError> {
        let failed = LLMResponseFailed {
            envelope,
            query_event_id: query.envelope.event_id,
            error_kind: kind.to_owned(),
            error_message: message,
            attempts,
        };
        Ok(self.codec.encode(&failed).await?)
    }

    /// Why `query` may not go to the model, if it is over a token budget: the gateway
    /// reserved for it (then this finds the reservation), or it slipped through (an older
    /// gateway, budgets turned on meanwhile) and is reserved here. A ledger that cannot be
    /// reached does not stop answers: the failure is logged and the turn goes ahead.
    async fn over_budget(&self, query: &UserQueryReceived) -> Option<String> {
        let (ledger, budgets) = &self.budget;
        let envelope = &query.envelope;
        let chars = query.text.chars().count();
        let now = now_millis();
        match ledger.reserve(budgets, &query.user_id, envelope.conversation_id, envelope.event_id, chars, now).await {
            Ok(Reserved::Yes) => None,
            Ok(Reserved::No(exceeded)) => Some(exceeded.describe()),
            Err(error) => {
                warn!(%error, "token budget not checked: the ledger is unreachable");
                None
            }
        }
    }

    /// Replaces the turn's reservation with what the model really used (0 when it failed).
    async fn settle_budget(&self, query: &UserQueryReceived, used: u64) {
        let (ledger, budgets) = &self.budget;
        if let Err(error) = ledger.settle_if_limited(budgets, &query.user_id, query.envelope.event_id, used).await {
            warn!(%error, "token budget not settled: the ledger is unreachable");
        }
    }

    /// How `query`'s answer is to be sealed: under the asker's key when a master key is
    /// configured. An erased asker is [`ProjectionError::Erased`]; a key store that does
    /// not answer fails the turn, which is retried (nothing goes out in clear).
    pub(super) async fn sealing(&self, query: &UserQueryReceived) -> Result<Sealing, ProjectionError> {
        let Some(keys) = &self.keys else { return Ok(Sealing::Plain) };
        let key = keys.key_for_sealing(query.user_id.as_str()).await?;
        Ok(Sealing::Sealed(key, query.user_id.clone()))
    }

    /// Starts the ordered stream of one answer's deltas to the tokens topic. Deltas are a
    /// preview, the outcome event is authoritative: a lost delta costs a flicker, never data.
    pub(super) fn stream_tokens(
        &self,
        conversation_id: ConversationId,
        query_event_id: EventId,
        traceparent: &str,
        sealing: Sealing,
    ) -> TokenStream {
        let (sender, mut receiver) = mpsc::unbounded_channel::<(i32, i32, String)>();
        let tokens = self.tokens.clone();
        let topic = self.topics.tokens.clone();
        let traceparent = traceparent.to_owned();
        let task = tokio::spawn(async move {
            let key = conversation_id.to_string();
            let mut deliveries = Vec::new();
            while let Some((attempt, index, delta)) = receiver.recv().await {
                let (delta, sealed_for) = match &sealing {
                    Sealing::Plain => (delta, String::new()),
                    Sealing::Sealed(key, owner) => {
                        (key.seal(&query_event_id, &delta_field(attempt, index), &delta), owner.to_string())
                    }
                };
                let token = LLMTokenDelta {
                    conversation_id,
                    query_event_id,
                    index,
                    delta,
                    traceparent: Some(traceparent.clone()),
                    attempt,
                    sealed_for,
                };
                // The first delta is what a person waits for: its hop is traced (with the
                // gateway's `gateway.first_token`), the others are not worth a span each.
                let span = if index == 0 {
                    let span = info_span!("inference.first_token");
                    continue_trace(&span, Some(&traceparent));
                    span
                } else {
                    Span::none()
                };
                // Enqueued one at a time, in order; delivery is awaited at the end.
                let enqueued = tokens.enqueue(&topic, &key, &token, Some(&traceparent));
                match enqueued.instrument(span).await {
                    Ok(delivery) => deliveries.push(delivery),
                    Err(error) => warn!(%error, "token delta not sent"),
                }
            }
            for result in join_all(deliveries).await {
                if let Err(error) = result {
                    warn!(%error, "token delta not delivered");
                }
            }
        });
        TokenStream { sender, task }
    }
}
