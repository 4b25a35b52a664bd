//! `parley experiments`: what-if re-runs in bulk, for a model comparison. `run` samples
//! conversations, rebuilds each chosen answer's prompt from events (as `replay --rerun`
//! does) and appends one `ExperimentRequested` per answer and model; inference serves them
//! in its batch lane, after chat, and appends each `ExperimentRun` in the transaction that
//! commits the request. `summary` folds a batch per model against the original answers.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use parley_eventlog::consumer::scan_topic;
use parley_eventlog::{EventProducer, KafkaSettings};
use parley_events::experiment::{BatchSummary, OriginalAnswer, Side, summarize};
use parley_events::{
    ConversationEvent, ConversationId, Envelope, EventCodec, EventId, ExperimentEvent, ExperimentRequested, Producer,
};
use parley_inference::experiment::to_experiment_messages;
use parley_inference::prompt::PromptLayout;
use parley_inference::proof::system_prompt_digest;
use parley_inference::service::DEFAULT_CONTEXT_TOKEN_BUDGET;
use parley_projections::Store;
use parley_projections::replay::{LogReader, Lookup, conversation_records};
use rdkafka::Message;
use serde::Serialize;

use crate::cli::{Common, ExperimentsCommand};
use crate::commands::prompts::{PromptSettings, rerun_prompt};
use crate::commands::{connect_store, scan_decoded};

/// Who writes experiment requests.
const SOURCE: Producer = Producer { name: "parley-experiments", version: env!("CARGO_PKG_VERSION") };

/// How often a wait looks for new runs.
const POLL: Duration = Duration::from_secs(2);

/// `parley experiments`.
pub(crate) async fn experiments(common: &Common, command: ExperimentsCommand) -> Result<ExitCode> {
    match command {
        ExperimentsCommand::Run { conversations, sample, since, seed, turns, models, prompt, batch, wait, format } => {
            let store = connect_store(common).await?;
            let conversations = if conversations.is_empty() {
                let active = conversations_since(&common.kafka, since).await?;
                pick_sample(active, usize::try_from(sample).unwrap_or(usize::MAX), seed)
            } else {
                conversations
            };
            let batch = batch.unwrap_or_else(|| format!("batch-{}", &uuid::Uuid::new_v4().simple().to_string()[..12]));
            let models = if models.is_empty() { vec![String::new()] } else { models };
            let prompts = PromptSettings::from(prompt);
            let asked = Box::pin(request(common, &store, &conversations, turns == "all", &models, &prompts, &batch));
            let requested = asked.await?;
            let json = format == "json";
            if !json {
                println!(
                    "batch {batch}: {} re-run(s) requested ({} conversation(s), {} model(s)); inference serves them \
                     in its batch lane",
                    requested.count,
                    conversations.len(),
                    models.len()
                );
                for (why, count) in &requested.skipped {
                    println!("  {count} answer(s) not re-run: {why}");
                }
            }
            if wait.is_zero() || requested.count == 0 {
                if json {
                    println!(
                        "{}",
                        serde_json::json!({"batch": batch, "requested": requested.count, "skipped": requested.skipped})
                    );
                }
                return Ok(ExitCode::SUCCESS);
            }
            let summary = Box::pin(wait_for(common, &store, &batch, wait)).await?;
            if json {
                println!(
                    "{}",
                    serde_json::json!({"batch": batch, "requested": requested.count, "skipped": requested.skipped, "summary": summary})
                );
            } else {
                print_summary(&summary);
            }
            Ok(if summary.complete() { ExitCode::SUCCESS } else { ExitCode::FAILURE })
        }
        ExperimentsCommand::Summary { batch, wait, format } => {
            let store = connect_store(common).await?;
            let summary = Box::pin(wait_for(common, &store, &batch, wait)).await?;
            if summary.requested == 0 {
                eprintln!("no batch {batch:?} on the experiments topic");
                return Ok(ExitCode::FAILURE);
            }
            if format == "json" {
                println!("{}", serde_json::to_string(&summary)?);
            } else {
                print_summary(&summary);
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// What `run` appended.
#[derive(Debug, Default, Serialize)]
struct Requested {
    count: usize,
    /// Why answers were not re-run, with how many.
    skipped: BTreeMap<String, usize>,
}

/// Appends a request per chosen answer of each conversation and per model.
async fn request(
    common: &Common,
    store: &Store,
    conversations: &[ConversationId],
    all_turns: bool,
    models: &[String],
    prompts: &PromptSettings,
    batch: &str,
) -> Result<Requested> {
    let registry = common.schema_registry_url.as_str();
    let reader = LogReader::new(&common.kafka, registry)?;
    let producer = EventProducer::new(common.kafka.client_config(), Arc::new(EventCodec::new(registry)?))?;
    let topic = common.kafka.topics().experiments;
    let system_prompt_digest = system_prompt_digest(&prompts.system_prompt);
    let mut requested = Requested::default();
    let mut skip = |why: String| *requested.skipped.entry(why).or_default() += 1;
    let mut pending = Vec::new();
    for &conversation_id in conversations {
        let (records, _, _) = conversation_records(&reader, store, conversation_id, Lookup::IndexOrScan).await?;
        let answers: Vec<_> = records
            .iter()
            .filter_map(|r| match &r.event {
                ConversationEvent::ResponseGenerated(answer) => Some(answer),
                _ => None,
            })
            .collect();
        let chosen = if all_turns { &answers[..] } else { &answers[answers.len().saturating_sub(1)..] };
        if chosen.is_empty() {
            skip("the conversation has no answer".into());
        }
        for answer in chosen {
            let Some(owner) = answer.user_id.clone() else {
                skip("written before answers named their owner".into());
                continue;
            };
            let rebuilt = rerun_prompt(
                common,
                store,
                &reader,
                &records,
                answer,
                prompts,
                (PromptLayout::Stable, DEFAULT_CONTEXT_TOKEN_BUDGET),
            );
            let prompt = match Box::pin(rebuilt).await? {
                Ok(prompt) => prompt,
                Err(why) => {
                    skip(format!("its context cannot be rebuilt: {why}"));
                    continue;
                }
            };
            for model in models {
                let mut request = ExperimentRequested {
                    envelope: Envelope::new(EventId::random(), conversation_id, answer.envelope.sequence, SOURCE)
                        .caused_by(&answer.envelope),
                    user_id: owner.clone(),
                    batch_id: batch.to_owned(),
                    answer_event_id: answer.envelope.event_id,
                    query_event_id: answer.query_event_id,
                    requested_by: "operator".into(),
                    model: model.clone(),
                    system_prompt_digest: system_prompt_digest.clone(),
                    messages: to_experiment_messages(&prompt.messages),
                    sealed_for: String::new(),
                };
                if let Some(keys) = store.keys() {
                    keys.seal_event(&mut request).await?;
                }
                pending.push(producer.enqueue(&topic, &conversation_id.to_string(), &request, None).await?);
            }
        }
    }
    for delivery in pending {
        delivery.await.context("appending an experiment request")?;
        requested.count += 1;
    }
    Ok(requested)
}

/// The conversations the events topic took records of since `since` (the whole log: None),
/// by record key: nothing is decoded.
async fn conversations_since(kafka: &KafkaSettings, since: Option<i64>) -> Result<HashSet<ConversationId>> {
    let mut ids = HashSet::new();
    scan_topic(kafka, &kafka.topics().events, since, async |message| {
        if let Some(id) = message.key().and_then(|k| std::str::from_utf8(k).ok()).and_then(|k| k.parse().ok()) {
            ids.insert(id);
        }
        anyhow::Ok(())
    })
    .await?;
    Ok(ids)
}

/// `n` of `ids`, the same for the same ids and seed: those whose seeded name-based UUID
/// sorts first.
fn pick_sample(ids: impl IntoIterator<Item = ConversationId>, n: usize, seed: u64) -> Vec<ConversationId> {
    let namespace = uuid::Uuid::from_u64_pair(seed, !seed);
    let mut ranked: Vec<_> =
        ids.into_iter().map(|id| (uuid::Uuid::new_v5(&namespace, id.to_string().as_bytes()), id)).collect();
    ranked.sort_unstable();
    ranked.into_iter().take(n).map(|(_, id)| id).collect()
}

/// The batch's summary once every request has its run, or when `wait` is over.
async fn wait_for(common: &Common, store: &Store, batch: &str, wait: Duration) -> Result<BatchSummary> {
    let codec = EventCodec::new(common.schema_registry_url.as_str())?;
    let reader = LogReader::new(&common.kafka, common.schema_registry_url.as_str())?;
    let deadline = Instant::now() + wait;
    let mut originals = HashMap::new();
    let mut read_from = HashSet::new();
    loop {
        let events = batch_events(common, &codec, store, batch).await?;
        // The originals of the answers re-run, read once per conversation.
        for event in &events {
            let conversation_id = event.envelope().conversation_id;
            if matches!(event, ExperimentEvent::Requested(_)) && read_from.insert(conversation_id) {
                let (records, _, _) =
                    conversation_records(&reader, store, conversation_id, Lookup::IndexOrScan).await?;
                originals.extend(records.into_iter().filter_map(|r| match r.event {
                    ConversationEvent::ResponseGenerated(answer) => Some((
                        answer.envelope.event_id,
                        OriginalAnswer {
                            model: answer.model,
                            text: answer.text,
                            prompt_tokens: answer.prompt_tokens,
                            completion_tokens: answer.completion_tokens,
                            llm_latency_ms: answer.llm_latency_ms,
                        },
                    )),
                    _ => None,
                }));
            }
        }
        let summary = summarize(batch, &events, &originals);
        if summary.complete() || Instant::now() >= deadline {
            return Ok(summary);
        }
        tokio::time::sleep(POLL.min(deadline.saturating_duration_since(Instant::now()))).await;
    }
}

/// The batch's records of the experiments topic, opened.
async fn batch_events(common: &Common, codec: &EventCodec, store: &Store, batch: &str) -> Result<Vec<ExperimentEvent>> {
    let mut events = Vec::new();
    let mut undecodable = 0;
    scan_decoded(
        &common.kafka,
        &common.kafka.topics().experiments,
        None,
        &mut undecodable,
        async |bytes| codec.decode_experiment_event(bytes).await,
        |event, _| {
            if event.batch_id() == batch {
                events.push(event);
            }
        },
    )
    .await
    .context("reading the experiments topic")?;
    if let Some(keys) = store.keys() {
        for event in &mut events {
            keys.open_event(event).await?;
        }
    }
    Ok(events)
}

fn print_summary(summary: &BatchSummary) {
    println!("batch {}: {} of {} re-run(s) done", summary.batch_id, summary.done, summary.requested);
    println!(
        "{:<9} {:<28} {:>5} {:>8} {:>6} {:>7} {:>9} {:>17} {:>17}",
        "", "MODEL", "TURNS", "ANSWERED", "FAILED", "PENDING", "CHANGED", "TOKENS IN/OUT", "LATENCY p50/p95"
    );
    for row in &summary.rows {
        let changed = match row.side {
            Side::Original => "-".to_owned(),
            Side::Rerun => format!("{}/{}", row.changed, row.answered),
        };
        let side = match row.side {
            Side::Original => "original",
            Side::Rerun => "re-run",
        };
        let model = if row.model.is_empty() { "(inference's own)" } else { row.model.as_str() };
        println!(
            "{side:<9} {model:<28} {:>5} {:>8} {:>6} {:>7} {changed:>9} {:>17} {:>17}",
            row.turns,
            row.answered,
            row.failed,
            row.pending,
            format!("{:.1}/{:.1}", row.mean_prompt_tokens, row.mean_completion_tokens),
            format!("{}/{} ms", row.latency_p50_ms, row.latency_p95_ms),
        );
        for (error, count) in &row.errors {
            println!("{:<9}   {count} failed: {error}", "");
        }
    }
    if summary.originals_missing > 0 {
        println!("{} original answer(s) could not be read: not counted as changed or not", summary.originals_missing);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sample_is_the_same_for_the_same_seed_and_all_when_asked_for_more() {
        let ids: Vec<ConversationId> = (0..50).map(|_| ConversationId::random()).collect();
        let first = pick_sample(ids.clone(), 5, 7);
        assert_eq!(first.len(), 5);
        let mut reversed = ids.clone();
        reversed.reverse();
        assert_eq!(pick_sample(reversed, 5, 7), first, "the order ids come in does not matter");
        assert_ne!(pick_sample(ids.clone(), 5, 8), first, "another seed, another sample");
        assert_eq!(pick_sample(ids.clone(), 100, 7).len(), 50);
    }
}
