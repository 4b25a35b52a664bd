//! What-if re-runs of answers (the `experiments` topic, keyed by conversation id), never
//! written to a conversation's own topic: a single re-run an operator ran from the CLI, or
//! a batch's requests that inference serves in its batch lane, and the pure fold of a
//! batch into one row per model ([`summarize`]).

use std::collections::{BTreeMap, HashMap};

use serde::{Deserialize, Serialize};

use crate::event::{AvroEvent, Envelope};
use crate::ids::{EventId, UserId};

/// One message of a re-run's prompt.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExperimentMessage {
    /// `system`, `user` or `assistant`.
    pub role: String,
    /// What it says (sealed under the owner's data key when the request is).
    pub content: String,
}

/// A request, part of a batch, to re-run one answer with another model: inference serves it
/// in the batch lane and writes its [`ExperimentRun`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExperimentRequested {
    /// Conversation id, the answer's sequence, caused by the answer.
    pub envelope: Envelope,
    /// The conversation's owner (whose key seals the prompt).
    pub user_id: UserId,
    /// The batch it belongs to.
    pub batch_id: String,
    /// The answer re-run.
    pub answer_event_id: EventId,
    /// Its question.
    pub query_event_id: EventId,
    /// Who asked.
    pub requested_by: String,
    /// The model to ask for (empty: what chat asks each model server for).
    pub model: String,
    /// SHA-256 of the system prompt in `messages`.
    pub system_prompt_digest: String,
    /// The prompt, rebuilt from events as the answer's turn sent it (with the system
    /// prompt asked for).
    pub messages: Vec<ExperimentMessage>,
    /// Whose data key sealed the messages' content; empty: plain.
    #[serde(default)]
    pub sealed_for: String,
}

/// A what-if re-run of one answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExperimentRun {
    /// Conversation id, the answer's sequence, caused by the answer (or by the request).
    pub envelope: Envelope,
    /// The conversation's owner (whose key seals `text`).
    pub user_id: UserId,
    /// The answer re-run.
    pub answer_event_id: EventId,
    /// Its question.
    pub query_event_id: EventId,
    /// Who ran it.
    pub requested_by: String,
    /// The model asked for.
    pub model: String,
    /// The model server's base URL.
    pub endpoint: String,
    /// SHA-256 of the system prompt used.
    pub system_prompt_digest: String,
    /// How many messages the prompt had.
    pub prompt_messages: i32,
    /// The new answer; empty when the call failed.
    pub text: String,
    /// Why it stopped; empty when the call failed.
    pub finish_reason: String,
    /// Tokens of the prompt.
    pub prompt_tokens: i32,
    /// Tokens of the answer.
    pub completion_tokens: i32,
    /// Wall time of the call.
    pub llm_latency_ms: i64,
    /// From the call to the first token.
    pub time_to_first_token_ms: Option<i64>,
    /// Why the call failed; empty when it answered.
    #[serde(default)]
    pub error: String,
    /// Whose data key sealed `text`; empty: plain.
    #[serde(default)]
    pub sealed_for: String,
    /// Since v2: the batch it belongs to; empty for a single re-run.
    #[serde(default)]
    pub batch_id: String,
    /// Since v2: the [`ExperimentRequested`] it answers; None for a single re-run.
    #[serde(default)]
    pub request_event_id: Option<EventId>,
}

impl ExperimentRun {
    /// A re-run of `answer_event_id` for `user_id` with nothing asked or answered yet: the
    /// caller names what it asks (struct update syntax), the model call's outcome fills the rest.
    pub fn unanswered(envelope: Envelope, user_id: UserId, answer_event_id: EventId, query_event_id: EventId) -> Self {
        Self {
            envelope,
            user_id,
            answer_event_id,
            query_event_id,
            requested_by: String::new(),
            model: String::new(),
            endpoint: String::new(),
            system_prompt_digest: String::new(),
            prompt_messages: 0,
            text: String::new(),
            finish_reason: String::new(),
            prompt_tokens: 0,
            completion_tokens: 0,
            llm_latency_ms: 0,
            time_to_first_token_ms: None,
            error: String::new(),
            sealed_for: String::new(),
            batch_id: String::new(),
            request_event_id: None,
        }
    }
}

impl AvroEvent for ExperimentRequested {
    const FULL_NAME: &'static str = "io.parley.events.ExperimentRequested";
}
impl AvroEvent for ExperimentRun {
    const FULL_NAME: &'static str = "io.parley.events.ExperimentRun";
}

/// A record of the `experiments` topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExperimentEvent {
    /// A batch's re-run to do.
    Requested(ExperimentRequested),
    /// A re-run done.
    Run(ExperimentRun),
}

impl ExperimentEvent {
    /// What every event carries.
    pub fn envelope(&self) -> &Envelope {
        match self {
            Self::Requested(e) => &e.envelope,
            Self::Run(e) => &e.envelope,
        }
    }

    /// The batch it belongs to (empty: a single re-run).
    pub fn batch_id(&self) -> &str {
        match self {
            Self::Requested(e) => &e.batch_id,
            Self::Run(e) => &e.batch_id,
        }
    }
}

/// What a batch's summary knows of an answer re-run (read from its conversation).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OriginalAnswer {
    /// The model that gave it.
    pub model: String,
    /// Its text (opened; [`crate::sealing::ERASED`] when its owner was erased).
    pub text: String,
    /// Tokens of its prompt.
    pub prompt_tokens: i32,
    /// Tokens of it.
    pub completion_tokens: i32,
    /// Wall time of its model call.
    pub llm_latency_ms: i64,
}

/// Whose answers a row sums up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Side {
    /// The answers re-run, as the conversations have them.
    Original,
    /// The batch's re-runs.
    Rerun,
}

/// One model's row of a batch's summary.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ModelRow {
    /// Originals or re-runs.
    pub side: Side,
    /// The model.
    pub model: String,
    /// Originals: the answers re-run (each once, however many models re-ran it); re-runs:
    /// the runs requested with this model.
    pub turns: usize,
    /// Answered (re-runs: not failed).
    pub answered: usize,
    /// Re-runs that failed (their errors in `errors`).
    pub failed: usize,
    /// Re-runs not done yet.
    pub pending: usize,
    /// Re-runs whose answer differs from the original's, word for word (of those whose
    /// original could be read).
    pub changed: usize,
    /// Mean prompt tokens per answered turn.
    pub mean_prompt_tokens: f64,
    /// Mean completion tokens per answered turn.
    pub mean_completion_tokens: f64,
    /// Model latency of answered turns, median.
    pub latency_p50_ms: i64,
    /// And 95th percentile (nearest rank).
    pub latency_p95_ms: i64,
    /// The distinct failures, with how many turns each.
    pub errors: BTreeMap<String, usize>,
}

/// A batch folded: one row per model of the originals, then one per model re-run.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BatchSummary {
    /// The batch.
    pub batch_id: String,
    /// Re-runs requested.
    pub requested: usize,
    /// Of them, done (answered or failed).
    pub done: usize,
    /// Answers re-run whose original could not be read (their `changed` is unknown).
    pub originals_missing: usize,
    /// Originals first, then re-runs, each by model name.
    pub rows: Vec<ModelRow>,
}

impl BatchSummary {
    /// Every request has its run.
    pub fn complete(&self) -> bool {
        self.done == self.requested
    }
}

/// Folds a batch's requests and runs (other batches' records are ignored) with the
/// originals of the answers re-run, by answer event id.
pub fn summarize(
    batch_id: &str,
    events: &[ExperimentEvent],
    originals: &HashMap<EventId, OriginalAnswer>,
) -> BatchSummary {
    let mut runs: HashMap<EventId, &ExperimentRun> = HashMap::new();
    for event in events {
        if let ExperimentEvent::Run(run) = event
            && run.batch_id == batch_id
            && let Some(request) = run.request_event_id
        {
            // A request is served once; a second run (none under exactly once) is ignored.
            runs.entry(request).or_insert(run);
        }
    }
    let mut requested = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for event in events {
        if let ExperimentEvent::Requested(request) = event
            && request.batch_id == batch_id
            && seen.insert(request.envelope.event_id)
        {
            requested.push(request);
        }
    }
    let mut rows: BTreeMap<(Side, String), RowBuilder> = BTreeMap::new();
    let mut originals_missing = 0;
    let mut done = 0;
    let mut answers_counted = std::collections::HashSet::new();
    for request in &requested {
        let original = originals.get(&request.answer_event_id);
        // An answer re-run with several models is one original.
        if answers_counted.insert(request.answer_event_id) {
            match original {
                Some(original) => rows.entry((Side::Original, original.model.clone())).or_default().answered(
                    original.prompt_tokens,
                    original.completion_tokens,
                    original.llm_latency_ms,
                ),
                None => originals_missing += 1,
            }
        }
        let run = runs.get(&request.envelope.event_id);
        let model = run.map_or(&request.model, |run| &run.model);
        let row = rows.entry((Side::Rerun, model.clone())).or_default();
        let Some(run) = run else {
            row.pending += 1;
            continue;
        };
        done += 1;
        if !run.error.is_empty() {
            row.failed += 1;
            *row.errors.entry(run.error.clone()).or_default() += 1;
            continue;
        }
        row.answered(run.prompt_tokens, run.completion_tokens, run.llm_latency_ms);
        if original.is_some_and(|original| original.text != run.text) {
            row.changed += 1;
        }
    }
    BatchSummary {
        batch_id: batch_id.to_owned(),
        requested: requested.len(),
        done,
        originals_missing,
        rows: rows.into_iter().map(|((side, model), row)| row.finish(side, model)).collect(),
    }
}

#[derive(Default)]
struct RowBuilder {
    pending: usize,
    failed: usize,
    changed: usize,
    prompt_tokens: i64,
    completion_tokens: i64,
    latencies: Vec<i64>,
    errors: BTreeMap<String, usize>,
}

impl RowBuilder {
    fn answered(&mut self, prompt_tokens: i32, completion_tokens: i32, latency_ms: i64) {
        self.prompt_tokens += i64::from(prompt_tokens);
        self.completion_tokens += i64::from(completion_tokens);
        self.latencies.push(latency_ms);
    }

    fn finish(mut self, side: Side, model: String) -> ModelRow {
        self.latencies.sort_unstable();
        let answered = self.latencies.len();
        let mean = |total: i64| if answered == 0 { 0.0 } else { total as f64 / answered as f64 };
        ModelRow {
            side,
            model,
            turns: answered + self.failed + self.pending,
            answered,
            failed: self.failed,
            pending: self.pending,
            changed: self.changed,
            mean_prompt_tokens: mean(self.prompt_tokens),
            mean_completion_tokens: mean(self.completion_tokens),
            latency_p50_ms: nearest_rank(&self.latencies, 50),
            latency_p95_ms: nearest_rank(&self.latencies, 95),
            errors: self.errors,
        }
    }
}

/// The nearest-rank percentile of sorted values (0 when there are none).
fn nearest_rank(sorted: &[i64], percent: usize) -> i64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = (percent * sorted.len()).div_ceil(100).max(1);
    sorted[rank - 1]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::SchemaCatalog;
    use crate::event::Producer;
    use crate::ids::ConversationId;

    const P: Producer = Producer { name: "test", version: "0" };

    fn request(batch: &str, conversation: ConversationId, model: &str) -> ExperimentRequested {
        ExperimentRequested {
            envelope: Envelope::new(EventId::random(), conversation, 3, P),
            user_id: "u-ann".parse().unwrap(),
            batch_id: batch.into(),
            answer_event_id: EventId::random(),
            query_event_id: EventId::random(),
            requested_by: "operator".into(),
            model: model.into(),
            system_prompt_digest: "0".repeat(64),
            messages: vec![ExperimentMessage { role: "user".into(), content: "hi".into() }],
            sealed_for: String::new(),
        }
    }

    fn run(request: &ExperimentRequested, text: &str, error: &str, latency: i64) -> ExperimentRun {
        ExperimentRun {
            envelope: Envelope::new(EventId::random(), request.envelope.conversation_id, 3, P)
                .caused_by(&request.envelope),
            user_id: request.user_id.clone(),
            answer_event_id: request.answer_event_id,
            query_event_id: request.query_event_id,
            requested_by: request.requested_by.clone(),
            model: request.model.clone(),
            endpoint: "http://127.0.0.1:1/v1".into(),
            system_prompt_digest: request.system_prompt_digest.clone(),
            prompt_messages: 1,
            text: text.into(),
            finish_reason: if error.is_empty() { "stop".into() } else { String::new() },
            prompt_tokens: 10,
            completion_tokens: 4,
            llm_latency_ms: latency,
            time_to_first_token_ms: None,
            error: error.into(),
            sealed_for: String::new(),
            batch_id: request.batch_id.clone(),
            request_event_id: Some(request.envelope.event_id),
        }
    }

    fn original(text: &str) -> OriginalAnswer {
        OriginalAnswer {
            model: "small".into(),
            text: text.into(),
            prompt_tokens: 8,
            completion_tokens: 6,
            llm_latency_ms: 100,
        }
    }

    #[test]
    fn a_batch_folds_into_a_row_per_model_with_changes_failures_and_pending() {
        let c = ConversationId::from(uuid::Uuid::new_v4());
        let (same, changed, failed, pending) =
            (request("b1", c, "big"), request("b1", c, "big"), request("b1", c, "big"), request("b1", c, "big"));
        let other_batch = request("b2", c, "big");
        let originals: HashMap<_, _> =
            [&same, &changed, &failed, &pending].iter().map(|r| (r.answer_event_id, original("Paris."))).collect();
        let events = vec![
            ExperimentEvent::Requested(same.clone()),
            ExperimentEvent::Requested(changed.clone()),
            ExperimentEvent::Requested(failed.clone()),
            ExperimentEvent::Requested(pending.clone()),
            ExperimentEvent::Requested(other_batch.clone()),
            ExperimentEvent::Run(run(&same, "Paris.", "", 300)),
            ExperimentEvent::Run(run(&changed, "It is Paris.", "", 500)),
            ExperimentEvent::Run(run(&failed, "", "timeout: 60 s", 0)),
            ExperimentEvent::Run(run(&other_batch, "Lyon.", "", 1)),
        ];
        let mut events = events;
        let mut same_by_other = request("b1", c, "other");
        same_by_other.answer_event_id = same.answer_event_id;
        events.push(ExperimentEvent::Requested(same_by_other.clone()));
        events.push(ExperimentEvent::Run(run(&same_by_other, "Paris.", "", 200)));
        let summary = summarize("b1", &events, &originals);
        assert_eq!((summary.requested, summary.done, summary.complete()), (5, 4, false));
        let [original_row, rerun, other] = &summary.rows[..] else { panic!("{:?}", summary.rows) };
        assert_eq!((other.model.as_str(), other.turns, other.changed), ("other", 1, 0));
        assert_eq!((original_row.side, original_row.model.as_str(), original_row.turns), (Side::Original, "small", 4));
        assert_eq!(original_row.mean_completion_tokens, 6.0);
        assert_eq!((rerun.side, rerun.model.as_str()), (Side::Rerun, "big"));
        assert_eq!((rerun.turns, rerun.answered, rerun.failed, rerun.pending, rerun.changed), (4, 2, 1, 1, 1));
        assert_eq!((rerun.latency_p50_ms, rerun.latency_p95_ms), (300, 500));
        assert_eq!(rerun.errors.get("timeout: 60 s"), Some(&1));
    }

    #[test]
    fn an_original_that_cannot_be_read_is_counted_and_never_called_changed() {
        let r = request("b", ConversationId::from(uuid::Uuid::new_v4()), "m");
        let events = [ExperimentEvent::Requested(r.clone()), ExperimentEvent::Run(run(&r, "new", "", 5))];
        let summary = summarize("b", &events, &HashMap::new());
        assert_eq!((summary.originals_missing, summary.rows.len(), summary.rows[0].changed), (1, 1, 0));
        assert!(summary.complete());
    }

    #[test]
    fn nearest_rank_percentiles() {
        assert_eq!(nearest_rank(&[], 50), 0);
        assert_eq!(nearest_rank(&[7], 95), 7);
        assert_eq!(nearest_rank(&[1, 2, 3, 4], 50), 2);
        assert_eq!(nearest_rank(&(1..=20).collect::<Vec<_>>(), 95), 19);
    }

    #[test]
    fn the_rust_types_match_their_schemas() {
        let catalog = SchemaCatalog::embedded();
        let r = request("b", ConversationId::from(uuid::Uuid::new_v4()), "m");
        let done = run(&r, "text", "", 5);
        for (name, value) in [
            (ExperimentRequested::FULL_NAME, apache_avro::to_value(&r).unwrap()),
            (ExperimentRun::FULL_NAME, apache_avro::to_value(&done).unwrap()),
        ] {
            let schema = &catalog.latest(name).unwrap().schema;
            let resolved = value.resolve(schema).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert!(resolved.validate(schema), "{name}");
        }
        let back: ExperimentRun = apache_avro::from_value(
            &apache_avro::to_value(&done)
                .unwrap()
                .resolve(&catalog.latest(ExperimentRun::FULL_NAME).unwrap().schema)
                .unwrap(),
        )
        .unwrap();
        assert_eq!(back, done);
    }
}
