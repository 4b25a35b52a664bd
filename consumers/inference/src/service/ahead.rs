//! Retrieval run ahead of the model slot: a question's knowledge is looked up as soon as
//! the question is read, while it waits for a slot, so that a slot is held only while the
//! model works. A question without a lookup ahead (past [`AHEAD`] held lookups) is looked
//! up when its turn comes. The same embedding finds the semantic cache's candidates: the
//! asker's earlier questions nearest to this one that have a cached answer.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use parley_eventlog::trace::continue_trace;
use parley_events::{EventId, UserQueryReceived};
use parley_projections::reader::LiveReader;
use parley_retrieval::{Hit, Retriever, SearchFilter, SourceKind, VectorStore};
use tokio::task::JoinHandle;
use tracing::{Instrument, info_span, warn};

use crate::cache::Candidate;

/// The most lookups held at once (running or done, not yet taken): a backlog's questions
/// beyond these are looked up in their turn, so a long queue never floods the vector store.
const AHEAD: usize = 64;
/// A lookup nobody took for this long is of a question this instance will not answer
/// (its partition went to another instance): it is dropped when room is needed.
const UNCLAIMED: Duration = Duration::from_secs(300);

/// Earlier questions looked at per lookup: the nearest few (an answer's own vector, also a
/// message, may take a place).
const CACHE_CANDIDATES: usize = 6;

/// What retrieval needs, and the lookups started ahead.
pub(super) struct Knowledge {
    search: Search,
    ahead: Mutex<HashMap<EventId, Lookup>>,
}

/// What one lookup searches with.
#[derive(Clone)]
struct Search {
    retriever: Retriever,
    top_k: usize,
    min_score: f32,
    /// The cache's rows and its similarity floor (none: the cache is off).
    cache: Option<(Arc<LiveReader>, f32)>,
}

/// What a lookup found: the knowledge for the prompt, and the cache's candidates.
#[derive(Debug, Default)]
pub(super) struct Found {
    pub(super) hits: Vec<Hit>,
    pub(super) candidates: Vec<Candidate>,
}

/// A lookup started ahead; dropping it stops it.
struct Lookup {
    started: Instant,
    task: Option<JoinHandle<Found>>,
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
    /// hit has one), and with `cache`, the cache's candidates at least that similar.
    pub(super) fn new(
        retriever: Retriever,
        top_k: usize,
        min_score: f32,
        cache: Option<(Arc<LiveReader>, f32)>,
    ) -> Self {
        Self { search: Search { retriever, top_k, min_score, cache }, ahead: Mutex::new(HashMap::new()) }
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
        let span = info_span!(parent: None, "inference.retrieve", k = self.search.top_k, ahead = true);
        continue_trace(&span, query.envelope.traceparent.as_deref());
        let task = tokio::spawn(self.search.clone().lookup(query.clone()).instrument(span));
        ahead.insert(query.envelope.event_id, Lookup { started: Instant::now(), task: Some(task) });
    }

    /// Whether lookups find the semantic cache's candidates.
    pub(super) fn caches(&self) -> bool {
        self.search.cache.is_some()
    }

    /// Stops and drops `query_event_id`'s lookup ahead, if any (its answer needs none).
    pub(super) fn forget(&self, query_event_id: &EventId) {
        self.ahead.lock().unwrap_or_else(PoisonError::into_inner).remove(query_event_id);
    }

    /// `query`'s knowledge and cache candidates: the lookup started ahead (waited for if it
    /// still runs), or one made now.
    pub(super) async fn for_query(&self, query: &UserQueryReceived) -> Found {
        let started = self.ahead.lock().unwrap_or_else(PoisonError::into_inner).remove(&query.envelope.event_id);
        if let Some(task) = started.and_then(|mut lookup| lookup.task.take()) {
            match task.instrument(info_span!("inference.retrieve_wait")).await {
                Ok(hits) => return hits,
                Err(error) => warn!(%error, "the lookup ahead did not finish; looking up now"),
            }
        }
        let span = info_span!("inference.retrieve", k = self.search.top_k, ahead = false);
        self.search.clone().lookup(query.clone()).instrument(span).await
    }
}

impl Search {
    /// The user's stored chunks and messages of other conversations that best answer the
    /// question (the owner filter is applied inside the search), above the relevance floor,
    /// and the cache's candidates. A vector store or CQL outage costs the answer its extra
    /// context or its cache lookup, not the answer: it is logged, and the event records
    /// that nothing was retrieved.
    async fn lookup(self, query: UserQueryReceived) -> Found {
        let vector = match self.retriever.embed_question(&query.text).await {
            Ok(vector) => vector,
            Err(error) => {
                warn!(%error, "the question could not be embedded; answering without retrieved context");
                return Found::default();
            }
        };
        let filter = SearchFilter {
            exclude_source_ids: vec![query.envelope.conversation_id.to_string()],
            ..SearchFilter::owner(query.user_id.clone())
        };
        let store = self.retriever.store();
        let knowledge = async {
            match store.search(&query.text, vector.clone(), &filter, self.top_k).await {
                Ok(hits) => hits.into_iter().filter(|h| h.similarity.is_none_or(|s| s >= self.min_score)).collect(),
                Err(error) => {
                    warn!(%error, "retrieval failed; answering without retrieved context");
                    vec![]
                }
            }
        };
        let candidates = async {
            match (&self.cache, &vector) {
                (Some((reader, floor)), Some(vector)) if !query.no_cache => {
                    candidates(store, reader, &query, vector.clone(), *floor)
                        .instrument(info_span!("inference.cache_candidates"))
                        .await
                }
                _ => vec![],
            }
        };
        let (hits, candidates) = tokio::join!(knowledge, candidates);
        Found { hits, candidates }
    }
}

/// The asker's earlier questions at least `floor` similar to `query` that have a cached
/// answer, with it (from any conversation of theirs, this one included).
async fn candidates(
    store: &VectorStore,
    reader: &LiveReader,
    query: &UserQueryReceived,
    vector: Vec<f32>,
    floor: f32,
) -> Vec<Candidate> {
    let filter = SearchFilter { kind: Some(SourceKind::Message), ..SearchFilter::owner(query.user_id.clone()) };
    let near: Vec<Hit> = match store.search_vectors(vector, &filter, CACHE_CANDIDATES).await {
        Ok(hits) => hits.into_iter().filter(|h| h.similarity.unwrap_or(h.score) >= floor).collect(),
        Err(error) => {
            warn!(%error, "the semantic cache's search failed; asking the model");
            return vec![];
        }
    };
    if near.is_empty() {
        return vec![];
    }
    let ids: Vec<EventId> = near.iter().map(|h| h.source_event_id).collect();
    let rows = match reader.generation().await {
        Ok(generation) => reader.store().cached_answers(&generation, &query.user_id, &ids).await,
        Err(error) => Err(error),
    };
    let rows = rows.unwrap_or_else(|error| {
        warn!(%error, "the semantic cache's rows could not be read; asking the model");
        vec![]
    });
    rows.into_iter()
        .filter_map(|entry| {
            let hit = near.iter().find(|h| h.source_event_id == entry.query_event_id)?;
            Some(Candidate { question: hit.text.clone(), similarity: hit.similarity.unwrap_or(hit.score), entry })
        })
        .collect()
}
