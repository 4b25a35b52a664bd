//! The inference consumer: a [`Processor`] of the event log's driver. Each query starts
//! as soon as it is fetched and a slot is free (`--concurrency`), one per conversation at
//! a time; its outcome is appended in the next Kafka transaction after it is done,
//! together with offsets that never pass an unanswered query (see
//! [`parley_eventlog::driver`]). After a crash or a rebalance, a query whose outcome is
//! already in the log is not sent to the model again: the driver shows every record read
//! while catching up to [`Processor::observe`], and those outcomes are remembered until
//! their queries come back. Token deltas go to the tokens topic outside any transaction,
//! because the gateway must see them while the answer is being generated.

use std::collections::HashSet;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use clap::Args;
use futures::future::join_all;
use parley_eventlog::consumer::tail;
use parley_eventlog::driver::{Decoded, DriverSettings, Processor, QueueAge};
use parley_eventlog::lanes::Lanes;
use parley_eventlog::load;
use parley_eventlog::registry_wait::retry_while_registry_down;
use parley_eventlog::secret::{SecretError, secret_from};
use parley_eventlog::settings::parse_duration;
use parley_eventlog::trace::{continue_trace, traceparent_of};
use parley_eventlog::transaction::{Outgoing, instance_transactional_id};
use parley_eventlog::{EventLogError, EventProducer, KafkaSettings, Topics};
use parley_events::budget::BUDGET_EXCEEDED;
use parley_events::event::now_millis;
use parley_events::lanes::{Lane, LaneLayout};
use parley_events::turn::outcome_sequence;
use parley_events::{
    ConversationEvent, ConversationId, Envelope, EventCodec, EventId, EventsError, LLMResponseFailed,
    LLMResponseGenerated, LLMTokenDelta, Producer as EventSource, UserQueryReceived,
};
use parley_projections::budget::{BudgetLedger, BudgetSettings, Reserved};
use parley_projections::replay::LogReader;
use parley_projections::{ProjectionError, Store};
use parley_retrieval::{Hit, Retriever, SearchFilter};
use rdkafka::Message;
use rdkafka::message::OwnedMessage;
use thiserror::Error;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::field::Empty;
use tracing::{Instrument, Span, info, info_span, warn};
use uuid::Uuid;

use crate::balancer::EndpointSpec;
use crate::cancel::{self, Cancels, Partial};
use crate::context::ContextSource;
use crate::llm::{ChatModel, LlmSettings, MissingKey};
use crate::metrics;
use crate::prompt::{PromptLayout, build_prompt, estimate_tokens};

pub const SOURCE: EventSource = EventSource { name: "parley-inference", version: env!("CARGO_PKG_VERSION") };

/// Options of `parley inference`.
#[derive(Debug, Clone, Args)]
pub struct InferenceArgs {
    /// Base URL of the OpenAI-compatible API, up to and including /v1 (the pool's only
    /// endpoint when no --llm-endpoint is given).
    #[arg(long, env = "PARLEY_LLM_BASE_URL", default_value = "http://127.0.0.1:18080/v1")]
    pub llm_base_url: String,

    /// An endpoint of the LLM pool, `URL[;model=NAME][;slots=N][;api_key_env=VAR]`;
    /// repeat for several (the environment variable separates them with spaces). Calls go
    /// to the least loaded endpoint whose breaker is closed; a failed one is retried on
    /// another.
    #[arg(long = "llm-endpoint", env = "PARLEY_LLM_ENDPOINTS", value_delimiter = ' ')]
    pub llm_endpoints: Vec<EndpointSpec>,

    /// Model name sent to the API and recorded when the API does not name one.
    #[arg(long, env = "PARLEY_LLM_MODEL", default_value = "SmolLM2-135M-Instruct")]
    pub llm_model: String,

    /// Who serves the model, as `gen_ai.provider.name` on spans and metrics (e.g. openai,
    /// azure.ai.openai, llama.cpp).
    #[arg(long, env = "PARLEY_LLM_PROVIDER", default_value = "llama.cpp")]
    pub llm_provider: String,

    /// File holding the API key of endpoints that name no `api_key_env` (readable by its
    /// owner only). The key may instead come from the environment variable
    /// PARLEY_LLM_API_KEY, never from an argument (every local user can read a process's
    /// arguments). Neither: "none".
    #[arg(long, env = "PARLEY_LLM_API_KEY_FILE")]
    pub llm_api_key_file: Option<std::path::PathBuf>,

    /// Upper bound on one LLM call, streaming included.
    #[arg(long, env = "PARLEY_LLM_TIMEOUT", default_value = "60s", value_parser = parse_duration)]
    pub llm_timeout: Duration,

    #[arg(long, env = "PARLEY_LLM_MAX_TOKENS", default_value_t = 256,
          value_parser = clap::value_parser!(u32).range(1..=32768))]
    pub llm_max_tokens: u32,

    /// LLM calls per query before LLMResponseFailed is written.
    #[arg(long, env = "PARLEY_LLM_MAX_ATTEMPTS", default_value_t = 3,
          value_parser = clap::value_parser!(u32).range(1..=10))]
    pub llm_max_attempts: u32,

    /// First retry delay; doubles per attempt, with jitter.
    #[arg(long, env = "PARLEY_LLM_RETRY_BACKOFF", default_value = "500ms", value_parser = parse_duration)]
    pub llm_retry_backoff: Duration,

    /// Consecutive failed calls that open the circuit breaker.
    #[arg(long, env = "PARLEY_LLM_BREAKER_THRESHOLD", default_value_t = 5,
          value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub llm_breaker_threshold: u32,

    /// How long an open breaker refuses calls before letting one probe through.
    #[arg(long, env = "PARLEY_LLM_BREAKER_COOL_DOWN", default_value = "30s", value_parser = parse_duration)]
    pub llm_breaker_cool_down: Duration,

    /// Estimated tokens of earlier turns, question and system prompt sent to the model.
    #[arg(long, env = "PARLEY_CONTEXT_TOKEN_BUDGET", default_value_t = 1536,
          value_parser = clap::value_parser!(u32).range(16..=1_000_000))]
    pub context_token_budget: u32,

    /// How long to wait for the projection to hold the previous turn before reading the
    /// history from the log instead.
    #[arg(long, env = "PARLEY_CONTEXT_WAIT", default_value = "2s", value_parser = parse_duration)]
    pub context_wait: Duration,

    /// Chunks and earlier messages retrieved from the vector store per question (0: none).
    #[arg(long, env = "PARLEY_RETRIEVAL_TOP_K", default_value_t = 4,
          value_parser = clap::value_parser!(u16).range(0..=50))]
    pub retrieval_top_k: u16,

    /// Hits less similar than this (cosine) are left out of the prompt.
    #[arg(long, env = "PARLEY_RETRIEVAL_MIN_SCORE", default_value_t = 0.3)]
    pub retrieval_min_score: f32,

    #[arg(long, env = "PARLEY_SYSTEM_PROMPT", default_value = "You are Parley, a helpful assistant. Answer briefly.")]
    pub system_prompt: String,

    /// Prompt layout: `stable` keeps a conversation's prompt prefix from turn to turn (the
    /// model server's prompt cache reuses it); `sliding` is the older layout, for comparison.
    #[arg(long, env = "PARLEY_PROMPT_LAYOUT", value_enum, default_value = "stable")]
    pub prompt_layout: PromptLayout,

    /// Each lane's share of free slots when several lanes have turns waiting, relative to
    /// the lane below it (premium : standard : batch = R² : R : 1). Batch work never takes
    /// the last free slot, so a chat turn does not wait for a batch answer to finish.
    #[arg(long, env = "PARLEY_LANE_RATIO", default_value_t = 4,
          value_parser = clap::value_parser!(u32).range(1..=100))]
    pub lane_ratio: u32,

    /// Slots kept free for premium turns: standard turns never take the last N (batch
    /// turns never the last N + 1), so a premium turn does not wait for an answer to
    /// finish; 0 lets standard use every slot while no premium turn waits.
    #[arg(long, env = "PARLEY_PREMIUM_SLOTS", default_value_t = 0,
          value_parser = clap::value_parser!(u16).range(0..=255))]
    pub premium_slots: u16,

    /// Queries answered at once (each starts as soon as it is fetched and a slot is free);
    /// match it to the model servers' slots.
    #[arg(long, env = "PARLEY_INFERENCE_CONCURRENCY", default_value_t = 4,
          value_parser = clap::value_parser!(u16).range(1..=256))]
    pub concurrency: u16,

    #[arg(long, env = "PARLEY_INFERENCE_GROUP", default_value = "parley-inference")]
    pub group_id: String,

    /// Kafka transactional id, unique per running instance (default: group id + random suffix;
    /// zombie instances are fenced through the consumer group generation).
    #[arg(long, env = "PARLEY_INFERENCE_TRANSACTIONAL_ID")]
    pub transactional_id: Option<String>,
}

impl InferenceArgs {
    fn llm_settings(&self) -> Result<LlmSettings, SecretError> {
        let single = || EndpointSpec {
            base_url: self.llm_base_url.clone(),
            model: None,
            api_key_env: None,
            slots: u32::from(self.concurrency),
        };
        let api_key = secret_from("PARLEY_LLM_API_KEY", self.llm_api_key_file.as_deref())?;
        Ok(LlmSettings {
            endpoints: if self.llm_endpoints.is_empty() { vec![single()] } else { self.llm_endpoints.clone() },
            api_key: api_key.unwrap_or_else(|| "none".to_owned()),
            model: self.llm_model.clone(),
            provider: self.llm_provider.clone(),
            max_tokens: self.llm_max_tokens,
            timeout: self.llm_timeout,
            max_attempts: self.llm_max_attempts,
            retry_backoff: self.llm_retry_backoff,
            breaker_threshold: self.llm_breaker_threshold,
            breaker_cool_down: self.llm_breaker_cool_down,
        })
    }
}

#[derive(Debug, Error)]
pub enum InferenceError {
    #[error(transparent)]
    EventLog(#[from] EventLogError),
    #[error(transparent)]
    Events(#[from] EventsError),
    #[error(transparent)]
    Context(#[from] ProjectionError),
    #[error(transparent)]
    Config(#[from] MissingKey),
    #[error(transparent)]
    Secret(#[from] SecretError),
}

/// The driver's lanes: an events partition's lane, served by weight; standard kept off
/// `premium_slots` last slots, batch off one more.
fn lanes(layout: &LaneLayout, ratio: u32, premium_slots: usize) -> Lanes {
    let names = Lane::ALL.iter().map(|lane| lane.as_str()).collect();
    let layout = layout.clone();
    Lanes::new(names, ratio, move |_, partition| layout.lane_of(partition).index())
        .reserve(Lane::Standard.index(), premium_slots)
        .reserve(Lane::Batch.index(), premium_slots + 1)
}

/// Runs the inference consumer until `shutdown` is cancelled.
pub async fn run(
    kafka: &KafkaSettings,
    registry_url: &str,
    store: Store,
    retriever: Option<Retriever>,
    args: InferenceArgs,
    budgets: BudgetSettings,
    shutdown: CancellationToken,
) -> Result<(), InferenceError> {
    let topics = kafka.topics();
    // Always on: a user's own budget holds whatever the defaults are.
    let budget = (BudgetLedger::open(&store).await?, budgets);
    let context = ContextSource::new(store, LogReader::new(kafka, registry_url)?, args.context_wait).await?;
    let codec = Arc::new(EventCodec::new(registry_url)?);
    let lanes = lanes(&kafka.lanes, args.lane_ratio, usize::from(args.premium_slots));
    let settings = DriverSettings {
        group_id: args.group_id.clone(),
        transactional_id: instance_transactional_id(
            &args.group_id,
            args.transactional_id.as_deref(),
            kafka.instance_id.as_deref(),
        ),
        topics: vec![topics.events.clone()],
        dead_letter_topic: topics.dead_letter.clone(),
        batch_size: 1,
        batch_wait: Duration::ZERO,
        concurrency: usize::from(args.concurrency),
        one_per_key: true,
        queue: QueueAge::new(&lanes),
        lanes,
    };
    // Gateways shed turns on this instance's queue age.
    let reporter = tokio::spawn(load::publish(
        kafka.clone(),
        settings.transactional_id.clone(),
        settings.queue.clone(),
        settings.lanes.names().to_vec(),
        shutdown.clone(),
    ));
    let cancels = Arc::new(Cancels::default());
    let cancel_follower = tokio::spawn(cancel::follow(
        tail(kafka, "parley-inference-cancels", &[&topics.events])?,
        codec.clone(),
        cancels.clone(),
        shutdown.clone(),
    ));
    let llm = args.llm_settings()?;
    metrics::init();
    let endpoints: Vec<String> = llm.endpoints.iter().map(|e| e.base_url.clone()).collect();
    let worker = Arc::new(Worker {
        // A delta is shown the moment it arrives: each goes out at once instead of lingering.
        tokens: EventProducer::new(kafka.client_config().set("linger.ms", "0").clone(), codec.clone())?,
        model: ChatModel::new(llm)?,
        codec: codec.clone(),
        topics,
        system_prompt: args.system_prompt.clone(),
        context,
        context_token_budget: usize::try_from(args.context_token_budget).unwrap_or(usize::MAX),
        retriever: retriever.filter(|_| args.retrieval_top_k > 0),
        retrieval_top_k: usize::from(args.retrieval_top_k),
        retrieval_min_score: args.retrieval_min_score,
        prompt_layout: args.prompt_layout,
        answered: Mutex::new(HashSet::new()),
        model_name: args.llm_model.clone(),
        provider: args.llm_provider.clone(),
        lanes: kafka.lanes.clone(),
        cancels: cancels.clone(),
        budget,
        shutdown: shutdown.clone(),
    });
    info!(group = %args.group_id, llm = ?endpoints, "inference consumer started");
    let probe = tokio::spawn({
        let (worker, shutdown) = (worker.clone(), shutdown.clone());
        async move {
            let mut every = tokio::time::interval(HEALTH_PROBE);
            while tokio::select! { () = shutdown.cancelled() => false, _ = every.tick() => true } {
                worker.model.probe_open_endpoints().await;
            }
        }
    });
    let driven = parley_eventlog::driver::run(kafka, settings, worker, codec, shutdown).await;
    probe.abort();
    reporter.abort();
    cancel_follower.abort();
    driven?;
    info!("inference consumer stopped");
    Ok(())
}

/// How often endpoints with an open breaker are asked whether they answer again.
const HEALTH_PROBE: Duration = Duration::from_secs(2);

/// The deltas of one answer on their way to the tokens topic, in order.
struct TokenStream {
    /// (attempt, index, text) of each delta.
    sender: mpsc::UnboundedSender<(i32, i32, String)>,
    task: tokio::task::JoinHandle<()>,
}

impl TokenStream {
    /// Waits until every delta sent so far is acknowledged (or given up on).
    async fn finish(self) {
        drop(self.sender);
        let _ = self.task.await;
    }
}

struct Worker {
    codec: Arc<EventCodec>,
    tokens: EventProducer,
    model: ChatModel,
    topics: Topics,
    system_prompt: String,
    context: ContextSource,
    context_token_budget: usize,
    retriever: Option<Retriever>,
    retrieval_top_k: usize,
    retrieval_min_score: f32,
    prompt_layout: PromptLayout,
    /// Queries whose outcome was read while catching up: answered already.
    answered: Mutex<HashSet<EventId>>,
    /// Cancels requested, and the answers a cancel stops.
    cancels: Arc<Cancels>,
    /// The model named in a cancelled answer (no response named one).
    model_name: String,
    /// Who serves the model (`gen_ai.provider.name`).
    provider: String,
    /// Which lane each partition serves (a label of the latency metrics).
    lanes: LaneLayout,
    /// The token budget ledger and the default budgets: checked before the model is called
    /// (a turn that slipped past the gateway's reservation), settled after.
    budget: (BudgetLedger, BudgetSettings),
    shutdown: CancellationToken,
}

impl Processor for Worker {
    type Item = ConversationEvent;
    type Error = InferenceError;

    async fn decode(&self, record: &OwnedMessage) -> Option<Decoded<ConversationEvent>> {
        let payload = record.payload().unwrap_or_default();
        let decoded = retry_while_registry_down(&self.shutdown, || self.codec.decode_conversation_event(payload));
        decoded.await.map(|result| result.map(|d| d.event))
    }

    fn observe(&self, event: &ConversationEvent, catching_up: bool) {
        let query_event_id = match event {
            ConversationEvent::ResponseGenerated(outcome) => &outcome.query_event_id,
            ConversationEvent::ResponseFailed(outcome) => &outcome.query_event_id,
            // Usually known from the follower already; not when written while none ran.
            ConversationEvent::CancelRequested(cancel) => {
                self.cancels.request(cancel.query_event_id, Instant::now());
                return;
            }
            ConversationEvent::Started(_) | ConversationEvent::QueryReceived(_) => return,
        };
        // Outcomes read in normal operation answer queries read before them: only those
        // read while catching up can be of queries still to come.
        if catching_up {
            self.answered.lock().unwrap_or_else(PoisonError::into_inner).insert(*query_event_id);
        }
    }

    fn wants(&self, event: &ConversationEvent) -> bool {
        matches!(event, ConversationEvent::QueryReceived(_))
    }

    async fn process(
        self: Arc<Self>,
        unit: Vec<(OwnedMessage, ConversationEvent)>,
    ) -> Result<Vec<Outgoing>, InferenceError> {
        let mut outgoing = Vec::with_capacity(unit.len());
        for (message, event) in unit {
            let ConversationEvent::QueryReceived(query) = event else { continue };
            let answered =
                self.answered.lock().unwrap_or_else(PoisonError::into_inner).remove(&query.envelope.event_id);
            if answered {
                info!(query_event_id = %query.envelope.event_id, "outcome already in the log; not asking the model again");
                continue;
            }
            let answered = self.answer(&query, message.partition(), message.offset()).await;
            self.cancels.finish(query.envelope.event_id);
            outgoing.push(answered?);
        }
        Ok(outgoing)
    }
}

impl Worker {
    /// Asks the model and returns the encoded outcome event (generated or failed).
    async fn answer(&self, query: &UserQueryReceived, partition: i32, offset: i64) -> Result<Outgoing, InferenceError> {
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
            let Ok(cancel) = self.cancels.start(query.envelope.event_id) else {
                info!("cancelled before its answer started; writing an empty cancelled answer");
                self.outcome_seen(query, partition, "cancelled");
                self.settle_budget(query, 0).await;
                let cancelled = Partial::default().into_answer(envelope(), query, &self.model_name, 0, Vec::new());
                return Ok(outgoing(self.codec.encode(&cancelled).await?));
            };
            if let Some(exceeded) = self.over_budget(query).await {
                warn!(%exceeded, "over its token budget; writing LLMResponseFailed");
                self.outcome_seen(query, partition, BUDGET_EXCEEDED);
                return Ok(outgoing(self.failed(envelope(), query, BUDGET_EXCEEDED, exceeded, 0).await?));
            }
            let history =
                self.context.history(query, partition, offset).instrument(info_span!("inference.context")).await?;
            let retrieved = self.retrieve(query).await;
            let prompt = build_prompt(
                &self.system_prompt,
                &history,
                query,
                &retrieved,
                self.context_token_budget,
                self.prompt_layout,
            );
            let deltas = self.stream_tokens(conversation_id, query.envelope.event_id, &traceparent);
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
                let cancelled =
                    partial.into_answer(envelope(), query, &self.model_name, prompt_tokens, prompt.retrieved);
                info!(tokens = cancelled.completion_tokens, "cancelled while generating");
                self.outcome_seen(query, partition, "cancelled");
                let used = i64::from(cancelled.prompt_tokens) + i64::from(cancelled.completion_tokens);
                self.settle_budget(query, u64::try_from(used).unwrap_or(0)).await;
                let cancelled = LLMResponseGenerated { context_event_ids: prompt.context_event_ids, ..cancelled };
                return Ok(outgoing(self.codec.encode(&cancelled).await?));
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
            let payload = match result {
                Ok(completion) => {
                    info!(
                        latency_ms = completion.latency.as_millis(),
                        tokens = completion.completion_tokens,
                        "answered"
                    );
                    self.codec
                        .encode(&LLMResponseGenerated {
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
                        })
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

    /// The user's stored chunks and messages of other conversations nearest to the question
    /// (the owner filter is applied inside the vector search). A vector store outage costs
    /// the answer its extra context, not the answer: it is logged, and the event records
    /// that nothing was retrieved.
    async fn retrieve(&self, query: &UserQueryReceived) -> Vec<Hit> {
        let Some(retriever) = &self.retriever else { return vec![] };
        let filter = SearchFilter {
            exclude_source_ids: vec![query.envelope.conversation_id.to_string()],
            ..SearchFilter::owner(query.user_id.clone())
        };
        let span = info_span!("inference.retrieve", k = self.retrieval_top_k);
        match retriever.search(&query.text, &filter, self.retrieval_top_k).instrument(span).await {
            Ok(hits) => hits.into_iter().filter(|h| h.score >= self.retrieval_min_score).collect(),
            Err(error) => {
                warn!(%error, "retrieval failed; answering without retrieved context");
                vec![]
            }
        }
    }

    /// Starts the ordered stream of one answer's deltas to the tokens topic. Deltas are a
    /// preview, the outcome event is authoritative: a lost delta costs a flicker, never data.
    fn stream_tokens(
        &self,
        conversation_id: ConversationId,
        query_event_id: EventId,
        traceparent: &str,
    ) -> TokenStream {
        let (sender, mut receiver) = mpsc::unbounded_channel::<(i32, i32, String)>();
        let tokens = self.tokens.clone();
        let topic = self.topics.tokens.clone();
        let traceparent = traceparent.to_owned();
        let task = tokio::spawn(async move {
            let key = conversation_id.to_string();
            let mut deliveries = Vec::new();
            while let Some((attempt, index, delta)) = receiver.recv().await {
                let token = LLMTokenDelta {
                    conversation_id,
                    query_event_id,
                    index,
                    delta,
                    traceparent: Some(traceparent.clone()),
                    attempt,
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

fn millis(duration: Duration) -> i64 {
    i64::try_from(duration.as_millis()).unwrap_or(i64::MAX)
}
