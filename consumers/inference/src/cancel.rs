//! Stopping answers: a `TurnCancelRequested` on the log asks for it. Every inference
//! instance learns of cancels from a follower of the events topic ([`follow`]), not from
//! its driver, which may have the partition paused or the cancel parked behind the very
//! query it cancels; cancels written while no instance ran are seen by the driver's
//! catch-up (`observe`). [`Cancels`] is the bookkeeping between the two: pure, no I/O.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use parley_eventlog::consumer::{LogConsumer, next_record};
use parley_events::turn::CANCELLED;
use parley_events::{
    ConversationEvent, Envelope, EventCodec, EventId, LLMResponseGenerated, RetrievedContext, UserQueryReceived,
};
use rdkafka::Message;
use tokio_util::sync::CancellationToken;
use tracing::info;

/// How long a cancel of a query this instance never starts is remembered (it was another
/// instance's, or its answer was done already).
const REMEMBER: Duration = Duration::from_secs(600);

/// Cancels requested, and the answers being generated that a cancel stops.
#[derive(Debug, Default)]
pub struct Cancels {
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    requested: HashMap<EventId, Instant>,
    running: HashMap<EventId, CancellationToken>,
}

/// The query was cancelled before its answer started.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CancelledBeforeStart;

impl Cancels {
    /// A cancel of `query_event_id` was read: stops its answer if it is being generated,
    /// or keeps it for when it starts.
    pub fn request(&self, query_event_id: EventId, now: Instant) {
        let mut state = self.lock();
        state.requested.retain(|_, at| now.duration_since(*at) < REMEMBER);
        state.requested.insert(query_event_id, now);
        if let Some(token) = state.running.get(&query_event_id) {
            token.cancel();
        }
    }

    /// The answer to `query_event_id` starts: the token a cancel will trip, or why not to
    /// start at all.
    pub fn start(&self, query_event_id: EventId) -> Result<CancellationToken, CancelledBeforeStart> {
        let mut state = self.lock();
        if state.requested.contains_key(&query_event_id) {
            return Err(CancelledBeforeStart);
        }
        let token = CancellationToken::new();
        state.running.insert(query_event_id, token.clone());
        Ok(token)
    }

    /// The answer's outcome is written (or the work was dropped): forget it.
    pub fn finish(&self, query_event_id: EventId) {
        let mut state = self.lock();
        state.running.remove(&query_event_id);
        state.requested.remove(&query_event_id);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// What an answer had generated when it was stopped.
#[derive(Debug, Default)]
pub struct Partial {
    text: String,
    tokens: i32,
    started: Option<Instant>,
    first_token: Option<Duration>,
}

impl Partial {
    /// The model call starts now.
    pub fn started() -> Self {
        Self { started: Some(Instant::now()), ..Self::default() }
    }

    /// A delta arrived; index 0 again means the call was retried and the text starts over.
    pub fn add(&mut self, index: i32, delta: &str) {
        if index == 0 {
            self.text.clear();
        }
        self.text.push_str(delta);
        self.tokens = index + 1;
        if self.first_token.is_none() {
            self.first_token = self.started.map(|started| started.elapsed());
        }
    }

    /// The cancelled answer: the text so far, a delta per token (the model's usage count
    /// never came), the prompt's estimated tokens.
    pub fn into_answer(
        self,
        envelope: Envelope,
        query: &UserQueryReceived,
        model: &str,
        prompt_tokens: i32,
        retrieved: Vec<RetrievedContext>,
    ) -> LLMResponseGenerated {
        let millis = |d: Duration| i64::try_from(d.as_millis()).unwrap_or(i64::MAX);
        LLMResponseGenerated {
            sealed_for: String::new(),
            envelope,
            query_event_id: query.envelope.event_id,
            text: self.text,
            model: model.to_owned(),
            finish_reason: CANCELLED.to_owned(),
            prompt_tokens,
            completion_tokens: self.tokens,
            llm_latency_ms: self.started.map_or(0, |started| millis(started.elapsed())),
            time_to_first_token_ms: self.first_token.map(millis),
            attempts: i32::from(self.started.is_some()),
            context_event_ids: Vec::new(),
            user_id: Some(query.user_id.clone()),
            retrieved,
            context_fingerprint: String::new(),
            cached_from: None,
            prompt: None,
        }
    }
}

/// Records every cancel `consumer` reads (a tail of the events topic) until `shutdown`.
pub async fn follow(consumer: LogConsumer, codec: Arc<EventCodec>, cancels: Arc<Cancels>, shutdown: CancellationToken) {
    while let Some(message) = next_record(&consumer, &shutdown, "cancel follower").await {
        let payload = message.payload().unwrap_or_default();
        // Undecodable records are the driver's to dead-letter; here they are not cancels.
        if let Ok(decoded) = codec.decode_conversation_event(payload).await
            && let ConversationEvent::CancelRequested(cancel) = decoded.event
        {
            info!(query_event_id = %cancel.query_event_id, "cancel requested");
            cancels.request(cancel.query_event_id, Instant::now());
        }
    }
}

#[cfg(test)]
mod tests {
    use parley_events::ConversationId;

    use super::*;

    #[test]
    fn a_cancel_stops_a_running_answer_or_one_not_started_yet() {
        let cancels = Cancels::default();
        let now = Instant::now();
        let (q1, q2) = (EventId::random(), EventId::random());
        let running = cancels.start(q1).unwrap();
        assert!(!running.is_cancelled());
        cancels.request(q1, now);
        assert!(running.is_cancelled(), "the answer being generated is stopped");
        cancels.finish(q1);

        cancels.request(q2, now);
        assert_eq!(cancels.start(q2).unwrap_err(), CancelledBeforeStart);
        cancels.finish(q2);
        assert!(cancels.start(q2).is_ok(), "finished: a redelivered query is not cancelled twice");
    }

    #[test]
    fn a_stopped_answer_keeps_its_text_so_far_and_counts_a_token_per_delta() {
        let mut partial = Partial::started();
        partial.add(0, "Hel");
        partial.add(1, "lo");
        partial.add(0, "Hi"); // retried: starts over
        partial.add(1, " there");
        let query = query();
        let envelope = Envelope::new(
            EventId::random(),
            ConversationId::random(),
            3,
            parley_events::Producer { name: "t", version: "0" },
        );
        let answer = partial.into_answer(envelope, &query, "m", 40, Vec::new());
        assert_eq!((answer.text.as_str(), answer.finish_reason.as_str()), ("Hi there", CANCELLED));
        assert_eq!((answer.prompt_tokens, answer.completion_tokens, answer.attempts), (40, 2, 1));
        assert!(answer.time_to_first_token_ms.is_some());
        let never = Partial::default().into_answer(answer.envelope.clone(), &query, "m", 0, Vec::new());
        assert_eq!((never.text.as_str(), never.completion_tokens, never.attempts), ("", 0, 0));
    }

    fn query() -> UserQueryReceived {
        let producer = parley_events::Producer { name: "t", version: "0" };
        UserQueryReceived {
            sealed_for: String::new(),
            envelope: Envelope::new(EventId::random(), ConversationId::random(), 2, producer),
            user_id: "alice".parse().unwrap(),
            client_message_id: "m1".into(),
            text: "Tell me a story".into(),
            no_cache: false,
        }
    }

    #[test]
    fn cancels_of_queries_never_started_here_are_forgotten_in_time() {
        let cancels = Cancels::default();
        let then = Instant::now();
        let (elsewhere, later) = (EventId::random(), EventId::random());
        cancels.request(elsewhere, then);
        cancels.request(later, then + REMEMBER);
        assert!(cancels.start(elsewhere).is_ok(), "older than REMEMBER: dropped");
        assert!(cancels.start(later).is_err());
    }
}
