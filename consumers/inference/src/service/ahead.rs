//! Retrieval run ahead of the model slot: a question's knowledge is looked up as soon as
//! the question is read, while it waits for a slot, so that a slot is held only while the
//! model works. A question without a lookup ahead (past [`AHEAD`] held lookups) is looked
//! up when its turn comes.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use parley_eventlog::trace::continue_trace;
use parley_events::{EventId, UserQueryReceived};
use parley_retrieval::{Hit, Retriever, SearchFilter};
use tokio::task::JoinHandle;
use tracing::{Instrument, info_span, warn};

/// The most lookups held at once (running or done, not yet taken): a backlog's questions
/// beyond these are looked up in their turn, so a long queue never floods the vector store.
const AHEAD: usize = 64;
/// A lookup nobody took for this long is of a question this instance will not answer
/// (its partition went to another instance): it is dropped when room is needed.
const UNCLAIMED: Duration = Duration::from_secs(300);

/// What retrieval needs, and the lookups started ahead.
pub(super) struct Knowledge {
    retriever: Retriever,
    top_k: usize,
    min_score: f32,
    ahead: Mutex<HashMap<EventId, Lookup>>,
}

/// A lookup started ahead; dropping it stops it.
struct Lookup {
    started: Instant,
    task: Option<JoinHandle<Vec<Hit>>>,
}

impl Drop for Lookup {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

impl Knowledge {
    /// Retrieval of the `top_k` best hits scoring at least `min_score` (cosine, where a
    /// hit has one).
    pub(super) fn new(retriever: Retriever, top_k: usize, min_score: f32) -> Self {
        Self { retriever, top_k, min_score, ahead: Mutex::new(HashMap::new()) }
    }

    /// Starts looking up `query`'s knowledge, unless [`AHEAD`] lookups are held already.
    pub(super) fn look_ahead(&self, query: &UserQueryReceived) {
        let mut ahead = self.ahead.lock().unwrap_or_else(PoisonError::into_inner);
        if ahead.len() >= AHEAD {
            ahead.retain(|_, lookup| lookup.started.elapsed() < UNCLAIMED);
            if ahead.len() >= AHEAD {
                return;
            }
        }
        let span = info_span!(parent: None, "inference.retrieve", k = self.top_k, ahead = true);
        continue_trace(&span, query.envelope.traceparent.as_deref());
        let task =
            tokio::spawn(lookup(self.retriever.clone(), query.clone(), self.top_k, self.min_score).instrument(span));
        ahead.insert(query.envelope.event_id, Lookup { started: Instant::now(), task: Some(task) });
    }

    /// Stops and drops `query_event_id`'s lookup ahead, if any (its answer needs none).
    pub(super) fn forget(&self, query_event_id: &EventId) {
        self.ahead.lock().unwrap_or_else(PoisonError::into_inner).remove(query_event_id);
    }

    /// `query`'s knowledge: the lookup started ahead (waited for if it still runs), or one
    /// made now.
    pub(super) async fn for_query(&self, query: &UserQueryReceived) -> Vec<Hit> {
        let started = self.ahead.lock().unwrap_or_else(PoisonError::into_inner).remove(&query.envelope.event_id);
        if let Some(task) = started.and_then(|mut lookup| lookup.task.take()) {
            match task.instrument(info_span!("inference.retrieve_wait")).await {
                Ok(hits) => return hits,
                Err(error) => warn!(%error, "the lookup ahead did not finish; looking up now"),
            }
        }
        let span = info_span!("inference.retrieve", k = self.top_k, ahead = false);
        lookup(self.retriever.clone(), query.clone(), self.top_k, self.min_score).instrument(span).await
    }
}

/// The user's stored chunks and messages of other conversations that best answer the
/// question (the owner filter is applied inside the search), above the relevance floor. A
/// vector store outage costs the answer its extra context, not the answer: it is logged,
/// and the event records that nothing was retrieved.
async fn lookup(retriever: Retriever, query: UserQueryReceived, top_k: usize, min_score: f32) -> Vec<Hit> {
    let filter = SearchFilter {
        exclude_source_ids: vec![query.envelope.conversation_id.to_string()],
        ..SearchFilter::owner(query.user_id.clone())
    };
    match retriever.search(&query.text, &filter, top_k).await {
        Ok(hits) => hits.into_iter().filter(|h| h.similarity.is_none_or(|s| s >= min_score)).collect(),
        Err(error) => {
            warn!(%error, "retrieval failed; answering without retrieved context");
            vec![]
        }
    }
}
