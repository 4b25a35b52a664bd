//! The inference consumer: a [`Processor`] of the event log's driver. Each query starts
//! as soon as it is fetched and a slot is free (`--concurrency`), one per conversation at
//! a time; its outcome is appended in the next Kafka transaction after it is done,
//! together with offsets that never pass an unanswered query (see
//! [`parley_eventlog::driver`]). After a crash or a rebalance, a query whose outcome is
//! already in the log is not sent to the model again: the driver shows every record read
//! while catching up to [`Processor::observe`], and those outcomes are remembered until
//! their queries come back. Token deltas go to the tokens topic outside any transaction,
//! because the gateway must see them while the answer is being generated.

mod ahead;
mod answer;
mod args;
mod cached;
mod experiment;

use std::collections::HashSet;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use parley_eventlog::consumer::tail;
use parley_eventlog::driver::{Decoded, DriverSettings, Processor, QueueAge};
use parley_eventlog::lanes::Lanes;
use parley_eventlog::load;
use parley_eventlog::registry_wait::retry_while_registry_down;
use parley_eventlog::secret::SecretError;
use parley_eventlog::transaction::{Outgoing, instance_transactional_id};
use parley_eventlog::{EventLogError, EventProducer, KafkaSettings, Topics};
use parley_events::lanes::{Lane, LaneLayout};
use parley_events::personal::Personal;
use parley_events::{ConversationEvent, EventCodec, EventId, EventsError, ExperimentEvent, Producer as EventSource};
use parley_projections::budget::{BudgetLedger, BudgetSettings};
use parley_projections::keys::KeyStore;
use parley_projections::reader::LiveReader;
use parley_projections::replay::LogReader;
use parley_projections::{ProjectionError, Store};
use parley_retrieval::Retriever;
use rdkafka::Message;
use rdkafka::message::OwnedMessage;
use thiserror::Error;
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::cache::CacheSettings;
use crate::cancel::{self, Cancels};
use crate::context::ContextSource;
use crate::llm::{ChatModel, MissingKey};
use crate::metrics;
use crate::prompt::PromptLayout;

use self::ahead::Knowledge;

pub use self::args::{
    DEFAULT_CONTEXT_TOKEN_BUDGET, DEFAULT_LLM_BASE_URL, DEFAULT_LLM_MODEL, DEFAULT_SYSTEM_PROMPT, InferenceArgs,
};

/// Who writes the inference consumer's events.
pub const SOURCE: EventSource = EventSource { name: "parley-inference", version: env!("CARGO_PKG_VERSION") };

/// What stops the inference consumer (a model's failure is an outcome, not an error).
#[derive(Debug, Error)]
pub enum InferenceError {
    /// The event log failed.
    #[error(transparent)]
    EventLog(#[from] EventLogError),
    /// An event could not be encoded.
    #[error(transparent)]
    Events(#[from] EventsError),
    /// The history could not be read.
    #[error(transparent)]
    Context(#[from] ProjectionError),
    /// The LLM pool is misconfigured.
    #[error(transparent)]
    Config(#[from] MissingKey),
    /// A secret file could not be read.
    #[error(transparent)]
    Secret(#[from] SecretError),
}

/// The driver's lanes: an events partition's lane, and the experiments topic in the batch
/// lane, served by weight; standard kept off `premium_slots` last slots, batch off one more.
fn lanes(layout: &LaneLayout, ratio: u32, premium_slots: usize, experiments: String) -> Lanes {
    let names = Lane::ALL.iter().map(|lane| lane.as_str()).collect();
    let layout = layout.clone();
    Lanes::new(
        names,
        ratio,
        move |topic, partition| {
            if topic == experiments { Lane::Batch.index() } else { layout.lane_of(partition).index() }
        },
    )
    .reserve(Lane::Standard.index(), premium_slots)
    .reserve(Lane::Batch.index(), premium_slots + 1)
}

/// Runs the inference consumer until `shutdown` is cancelled.
#[allow(clippy::too_many_arguments)] // one per edge: log, registry, store, vectors, keys, settings, budgets, stop
pub async fn run(
    kafka: &KafkaSettings,
    registry_url: &str,
    store: Store,
    retriever: Option<Retriever>,
    keys: Option<KeyStore>,
    args: InferenceArgs,
    budgets: BudgetSettings,
    shutdown: CancellationToken,
) -> Result<(), InferenceError> {
    let topics = kafka.topics();
    // Always on: a user's own budget holds whatever the defaults are.
    let budget = (BudgetLedger::open(&store).await?, budgets);
    let cache_rows = Arc::new(LiveReader::new(store.clone()).await?);
    let log = LogReader::new(kafka, registry_url)?;
    let context = Arc::new(ContextSource::new(store, log, args.context_wait, args.history_keep_bytes).await?);
    let codec = Arc::new(EventCodec::new(registry_url)?);
    let lanes = lanes(&kafka.lanes, args.lane_ratio, usize::from(args.premium_slots), topics.experiments.clone());
    let settings = DriverSettings {
        group_id: args.group_id.clone(),
        transactional_id: instance_transactional_id(
            &args.group_id,
            args.transactional_id.as_deref(),
            kafka.instance_id.as_deref(),
        ),
        // Experiments (batch re-runs) are served in the batch lane, after chat.
        topics: vec![topics.events.clone(), topics.experiments.clone()],
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
    // An erased person's kept histories go with their key.
    let forgetter = keys.as_ref().map(|keys| {
        let mut forgotten = keys.forgotten();
        let context = context.clone();
        tokio::spawn(async move {
            loop {
                match forgotten.recv().await {
                    Ok(subject) => match subject.parse() {
                        Ok(owner) => context.forget_owner(&owner),
                        Err(_) => continue,
                    },
                    // Missed some: every kept history could hold one of them.
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => context.forget_all(),
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                }
            }
        })
    });
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
        knowledge: retriever.filter(|_| args.retrieval_top_k > 0).map(|retriever| {
            let cache = args.semantic_cache.then_some((cache_rows, args.cache_min_similarity));
            Knowledge::new(retriever, usize::from(args.retrieval_top_k), args.retrieval_min_score, cache)
        }),
        cache: CacheSettings { min_similarity: args.cache_min_similarity, ttl: args.cache_ttl },
        keys,
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
    if let Some(forgetter) = forgetter {
        forgetter.abort();
    }
    cancel_follower.abort();
    driven?;
    info!("inference consumer stopped");
    Ok(())
}

/// How often endpoints with an open breaker are asked whether they answer again.
const HEALTH_PROBE: Duration = Duration::from_secs(2);

/// What answers queries: the shared clients and settings of every answer.
struct Worker {
    codec: Arc<EventCodec>,
    tokens: EventProducer,
    model: ChatModel,
    topics: Topics,
    system_prompt: String,
    context: Arc<ContextSource>,
    context_token_budget: usize,
    /// Retrieval, looked up ahead of the model slot (none: answers use no stored knowledge),
    /// with the semantic cache's candidates when it is on.
    knowledge: Option<Knowledge>,
    /// How the semantic cache decides.
    cache: CacheSettings,
    /// People's data keys: token deltas are sealed under the asker's (none: sent plain).
    keys: Option<KeyStore>,
    prompt_layout: PromptLayout,
    /// Queries (and experiment requests) whose outcome was read while catching up: answered
    /// already.
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

/// What inference reads: a conversation's event, or an experiment (batch-lane work).
enum Work {
    Conversation(ConversationEvent),
    Experiment(ExperimentEvent),
}

impl Worker {
    /// Opens a decoded event's sealed fields (waiting out a key store that does not
    /// answer); None: shutdown came while waiting.
    async fn opened<E: Personal>(&self, decoded: Option<Decoded<parley_events::Decoded<E>>>) -> Option<Decoded<E>> {
        let mut decoded = decoded?;
        if let (Some(keys), Ok(decoded)) = (&self.keys, &mut decoded)
            && !keys.open_event_waiting(&mut decoded.event, &self.shutdown).await
        {
            return None;
        }
        Some(decoded.map(|d| d.event))
    }

    /// Outcomes read in normal operation answer queries read before them: only those read
    /// while catching up can be of queries (or requests) still to come.
    fn answered_while_catching_up(&self, id: EventId, catching_up: bool) {
        if catching_up {
            self.answered.lock().unwrap_or_else(PoisonError::into_inner).insert(id);
        }
    }

    /// Whether the outcome of `id` was read while catching up (then it is not done again).
    fn was_answered(&self, id: &EventId) -> bool {
        self.answered.lock().unwrap_or_else(PoisonError::into_inner).remove(id)
    }

    fn observe_conversation(&self, event: &ConversationEvent, catching_up: bool) {
        self.context.observe(event);
        let query_event_id = match event {
            ConversationEvent::ResponseGenerated(outcome) => &outcome.query_event_id,
            ConversationEvent::ResponseFailed(outcome) => &outcome.query_event_id,
            // Usually known from the follower already; not when written while none ran.
            ConversationEvent::CancelRequested(cancel) => {
                self.cancels.request(cancel.query_event_id, Instant::now());
                return;
            }
            // A question waits for a slot: its knowledge need not. (One read while catching
            // up may turn out answered already: then its lookup is dropped unused.)
            ConversationEvent::QueryReceived(query) => {
                if let Some(knowledge) = &self.knowledge {
                    knowledge.look_ahead(query);
                }
                return;
            }
            ConversationEvent::Started(_) => return,
        };
        self.answered_while_catching_up(*query_event_id, catching_up);
    }
}

impl Processor for Worker {
    type Item = Work;
    type Error = InferenceError;

    async fn decode(&self, record: &OwnedMessage) -> Option<Decoded<Work>> {
        let payload = record.payload().unwrap_or_default();
        if record.topic() == self.topics.experiments {
            let decoded = retry_while_registry_down(&self.shutdown, || self.codec.decode_experiment_event(payload));
            return Some(self.opened(decoded.await).await?.map(Work::Experiment));
        }
        let decoded = retry_while_registry_down(&self.shutdown, || self.codec.decode_conversation_event(payload));
        Some(self.opened(decoded.await).await?.map(Work::Conversation))
    }

    fn observe(&self, work: &Work, catching_up: bool) {
        match work {
            Work::Conversation(event) => self.observe_conversation(event, catching_up),
            Work::Experiment(ExperimentEvent::Run(run)) => {
                if let Some(request) = run.request_event_id {
                    self.answered_while_catching_up(request, catching_up);
                }
            }
            Work::Experiment(ExperimentEvent::Requested(_)) => {}
        }
    }

    fn wants(&self, work: &Work) -> bool {
        matches!(
            work,
            Work::Conversation(ConversationEvent::QueryReceived(_)) | Work::Experiment(ExperimentEvent::Requested(_))
        )
    }

    async fn process(self: Arc<Self>, unit: Vec<(OwnedMessage, Work)>) -> Result<Vec<Outgoing>, InferenceError> {
        let mut outgoing = Vec::with_capacity(unit.len());
        for (message, work) in unit {
            let query = match work {
                Work::Conversation(ConversationEvent::QueryReceived(query)) => query,
                Work::Experiment(ExperimentEvent::Requested(request)) => {
                    if self.was_answered(&request.envelope.event_id) {
                        info!(request = %request.envelope.event_id, "experiment already run; not asking the model again");
                    } else {
                        outgoing.push(self.experiment(&request).await?);
                    }
                    continue;
                }
                Work::Conversation(_) | Work::Experiment(_) => continue,
            };
            let outcome = if self.was_answered(&query.envelope.event_id) {
                info!(query_event_id = %query.envelope.event_id, "outcome already in the log; not asking the model again");
                None
            } else {
                Some(self.answer(&query, message.partition(), message.offset()).await)
            };
            self.cancels.finish(query.envelope.event_id);
            // An answer that needed no knowledge (cancelled, over budget) leaves its lookup.
            if let Some(knowledge) = &self.knowledge {
                knowledge.forget(&query.envelope.event_id);
            }
            if let Some(outcome) = outcome {
                outgoing.push(outcome?);
            }
        }
        Ok(outgoing)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn experiments_wait_in_the_batch_lane_whatever_their_partition() {
        let layout: LaneLayout = "premium=0,batch=5".parse().unwrap();
        let lanes = lanes(&layout, 4, 1, "p.experiments".into());
        assert_eq!(lanes.of("p.conversation-events", 0), Lane::Premium.index());
        assert_eq!(lanes.of("p.conversation-events", 2), Lane::Standard.index());
        for partition in 0..6 {
            assert_eq!(lanes.of("p.experiments", partition), Lane::Batch.index());
        }
        assert!(!lanes.may_start(Lane::Batch.index(), 2, 4), "batch work leaves the last two slots to chat");
    }
}
