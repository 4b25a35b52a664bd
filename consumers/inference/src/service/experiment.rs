//! A batch's what-if re-run, served in the batch lane: the request's prompt (rebuilt from
//! events by `parley experiments run`) goes to the model asked for, and the `ExperimentRun`
//! is appended in the transaction that commits the request's offset. Nothing is charged to
//! the person's token budget and nothing is streamed: no one is waiting on a screen.

use parley_eventlog::trace::{continue_trace, traceparent_of};
use parley_eventlog::transaction::Outgoing;
use parley_events::personal::Personal;
use parley_events::{Envelope, ExperimentRequested, ExperimentRun};
use parley_projections::ProjectionError;
use tracing::field::Empty;
use tracing::{Instrument, info, info_span, warn};
use uuid::Uuid;

use super::{InferenceError, SOURCE, Worker};
use crate::experiment::{from_experiment_messages, record_outcome};

impl Worker {
    /// Runs `request` and returns its encoded `ExperimentRun` (answered or failed).
    pub(super) async fn experiment(&self, request: &ExperimentRequested) -> Result<Outgoing, InferenceError> {
        let span = info_span!(parent: None, "inference.experiment", conversation_id = %request.envelope.conversation_id,
                              batch_id = %request.batch_id, request = %request.envelope.event_id,
                              model = %request.model, traceparent = Empty);
        continue_trace(&span, request.envelope.traceparent.as_deref());
        let traceparent = traceparent_of(&span, request.envelope.traceparent.as_deref());
        span.record("traceparent", traceparent.as_str());
        async {
            // Deterministic: a re-delivered request produces a run with the same event id.
            let run_id = Uuid::new_v5(&request.envelope.event_id.uuid(), b"experiment run").into();
            // No model named: each endpoint's own, as for chat.
            let asked = (!request.model.is_empty()).then_some(request.model.as_str());
            let model = asked.map_or_else(|| self.model_name.clone(), str::to_owned);
            let envelope = Envelope::new(run_id, request.envelope.conversation_id, request.envelope.sequence, SOURCE)
                .caused_by(&request.envelope)
                .with_traceparent(Some(traceparent.clone()));
            let mut run = ExperimentRun {
                requested_by: request.requested_by.clone(),
                model,
                system_prompt_digest: request.system_prompt_digest.clone(),
                prompt_messages: i32::try_from(request.messages.len()).unwrap_or(i32::MAX),
                batch_id: request.batch_id.clone(),
                request_event_id: Some(request.envelope.event_id),
                ..ExperimentRun::unanswered(
                    envelope,
                    request.user_id.clone(),
                    request.answer_event_id,
                    request.query_event_id,
                )
            };
            // The run is sealed under the owner's key; an erased owner's prompt reads
            // "[erased]" and is never sent.
            let key = match &self.keys {
                None => None,
                Some(keys) => match keys.key_for_sealing(request.user_id.as_str()).await {
                    Ok(key) => Some(key),
                    Err(ProjectionError::Erased(_)) => {
                        info!("the owner was erased; the experiment is not run");
                        run.error = "erased: the owner's data was erased".into();
                        return self.encoded(run, traceparent).await;
                    }
                    Err(error) => return Err(error.into()),
                },
            };
            match from_experiment_messages(&request.messages) {
                Ok(messages) => {
                    let (result, _) = self.model.complete_as(asked, &messages, |_, _, _| {}).await;
                    if let Err(error) = &result {
                        warn!(%error, "experiment's model call failed");
                    }
                    record_outcome(&mut run, result);
                }
                Err(why) => run.error = format!("invalid_request: {why}"),
            }
            if let Some(key) = &key {
                run.seal_with(key);
            }
            self.encoded(run, traceparent).await
        }
        .instrument(span)
        .await
    }

    async fn encoded(&self, run: ExperimentRun, traceparent: String) -> Result<Outgoing, InferenceError> {
        Ok(Outgoing {
            topic: self.topics.experiments.clone(),
            key: run.envelope.conversation_id.to_string(),
            payload: self.codec.encode(&run).await?,
            traceparent: Some(traceparent),
        })
    }
}
