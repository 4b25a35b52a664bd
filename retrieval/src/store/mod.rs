//! The Milvus collection of every embedded chunk and message. One row per vector, keyed by
//! a deterministic id, so writing the same source twice overwrites instead of adding.

mod schema;
mod settings;

use std::collections::HashMap;

use milvus::v2 as sdk;
use milvus::v2::prelude::{
    ClientV2, ConnectConfig, ConsistencyLevel, FieldData, FlushRequest, InsertRequest, LoadCollectionRequest,
    QueryRequest, SearchRequest, SearchVectors,
};
use parley_eventlog::metrics::timed;
use parley_events::{ConversationId, EventId, UserId};
pub use schema::MAX_TEXT_BYTES;
use schema::{
    EMBEDDING, ID, KIND, LABEL, MAX_LABEL_BYTES, OWNER, POSITION, SOURCE_EVENT_ID, SOURCE_ID, TEXT, TEXT_TERMS,
};
use serde::Serialize;
pub use settings::{IndexKind, MilvusSettings};

use crate::error::RetrievalError;
use crate::filter::{SearchFilter, SourceKind};
use crate::fusion::{SearchMode, reciprocal_rank_fusion};

/// One vector and what it stands for.
#[derive(Debug, Clone, PartialEq)]
pub struct VectorRecord {
    /// Deterministic: the message's event id, or uuid5(document id, chunk number).
    pub id: String,
    /// Whose it is: only their searches find it.
    pub owner: UserId,
    /// A document chunk or a message.
    pub kind: SourceKind,
    /// The stream of the source: its conversation, or the document's own stream (a
    /// document event's envelope carries the document id as its conversation id).
    pub source_id: ConversationId,
    /// The event whose text it embeds.
    pub source_event_id: EventId,
    /// Chunk number or message sequence.
    pub position: i64,
    /// Document title, or the message's role (user, assistant).
    pub label: String,
    /// The text embedded (returned with a hit).
    pub text: String,
    /// The vector.
    pub embedding: Vec<f32>,
}

/// One search result, best first.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Hit {
    /// The vector's id.
    pub id: String,
    /// A document chunk or a message.
    pub kind: SourceKind,
    /// The document's or conversation's id.
    pub source_id: String,
    /// The event whose text it embeds.
    pub source_event_id: EventId,
    /// Chunk number or message sequence.
    pub position: i64,
    /// Document title, or the message's role.
    pub label: String,
    /// The text.
    pub text: String,
    /// What the ranking used: the reciprocal-rank-fusion score in hybrid search, the
    /// cosine similarity in vector search, the BM25 score in keyword search.
    pub score: f32,
    /// Cosine similarity to the question (1: same direction); None only in keyword mode,
    /// where the question is not embedded.
    pub similarity: Option<f32>,
    /// BM25 score of the question's words in the text, when the keyword search found it.
    pub keyword_score: Option<f32>,
}

/// A searchable document, as its first chunk in the store describes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StoredDocument {
    /// The document's id.
    pub document_id: String,
    /// Its title.
    pub title: String,
    /// The DocumentSubmitted it was indexed from.
    pub event_id: String,
}

/// Parley's collection in Milvus.
#[derive(Clone)]
pub struct VectorStore {
    client: ClientV2,
    collection: String,
    search_params: HashMap<String, String>,
    dimension: usize,
    mode: SearchMode,
    rrf_k: u32,
    candidates: usize,
}

impl std::fmt::Debug for VectorStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VectorStore").field("collection", &self.collection).finish_non_exhaustive()
    }
}

/// Attempts to open the collection before start-up fails (see [`VectorStore::open`]).
pub const OPEN_ATTEMPTS: u32 = 20;

impl VectorStore {
    /// Connects, creating, indexing and loading the collection if it does not exist. An
    /// existing collection whose dimension differs from `dimension` is a start-up error.
    /// Services starting together race to create it: the loser of the race (an error from
    /// Milvus Lite: the collection's directory exists) tries again until the winner's
    /// collection is complete, for up to [`OPEN_ATTEMPTS`] × 250 ms.
    pub async fn open(settings: &MilvusSettings, dimension: usize, model: &str) -> Result<Self, RetrievalError> {
        let mut config = ConnectConfig::new().uri(settings.milvus_url.clone());
        if let Some(token) = &settings.milvus_token {
            config = config.token(token.clone());
        }
        let client = ClientV2::new(&config).await?;
        let mut attempt = 1;
        loop {
            match Self::open_with(&client, settings, dimension, model).await {
                Err(error) if attempt < OPEN_ATTEMPTS && !matches!(error, RetrievalError::DimensionMismatch { .. }) => {
                    tracing::warn!(%error, attempt, "opening the vector collection failed; trying again");
                    tokio::time::sleep(std::time::Duration::from_millis(250)).await;
                    attempt += 1;
                }
                Err(error) => return Err(error),
                Ok(described) => {
                    let mode = if described.keywords || !settings.search_mode.uses_keywords() {
                        settings.search_mode
                    } else {
                        tracing::warn!(
                            collection = %settings.milvus_collection,
                            "the collection predates keyword search (no {TEXT_TERMS} field): searching vectors only; \
                             to search keywords too, start the embedder with a new --milvus-collection and \
                             --embedder-group and point the services at it (docs/knowledge.md)"
                        );
                        SearchMode::Vector
                    };
                    return Ok(Self {
                        client,
                        collection: settings.milvus_collection.clone(),
                        search_params: index_search_params(settings),
                        dimension,
                        mode,
                        rrf_k: settings.search_rrf_k,
                        candidates: usize::try_from(settings.search_candidates).unwrap_or(usize::MAX),
                    });
                }
            }
        }
    }

    /// One attempt of [`Self::open`].
    async fn open_with(
        client: &ClientV2,
        settings: &MilvusSettings,
        dimension: usize,
        model: &str,
    ) -> Result<schema::Described, RetrievalError> {
        let collection = settings.milvus_collection.clone();
        if !schema::exists(client, &collection).await? {
            schema::create(client, settings, dimension).await?;
        }
        let described = schema::describe(client, &collection).await?;
        if described.dimension != dimension {
            return Err(RetrievalError::DimensionMismatch {
                collection,
                collection_dimension: described.dimension,
                backend_dimension: dimension,
                model: model.to_owned(),
            });
        }
        client.load_collection(LoadCollectionRequest::builder().collection_name(&collection).build()?).await?;
        Ok(described)
    }

    /// The retrievers a search asks (vectors only on a collection without the keyword field).
    pub fn search_mode(&self) -> SearchMode {
        self.mode
    }

    /// The collection's name.
    pub fn collection(&self) -> &str {
        &self.collection
    }

    /// The length of its vectors.
    pub fn dimension(&self) -> usize {
        self.dimension
    }

    /// Inserts or replaces `records` by id.
    pub async fn upsert(&self, records: &[VectorRecord]) -> Result<(), RetrievalError> {
        if records.is_empty() {
            return Ok(());
        }
        let strings = |f: fn(&VectorRecord) -> &str, max: usize| -> Vec<String> {
            records.iter().map(|r| truncated(f(r), max).to_owned()).collect()
        };
        let source_ids = records.iter().map(|r| r.source_id.to_string()).collect();
        let event_ids = records.iter().map(|r| r.source_event_id.to_string()).collect();
        let columns = vec![
            FieldData::varchar(ID, strings(|r| &r.id, 64)),
            FieldData::varchar(OWNER, strings(|r| r.owner.as_str(), 256)),
            FieldData::varchar(KIND, strings(|r| r.kind.as_str(), 16)),
            FieldData::varchar(SOURCE_ID, source_ids),
            FieldData::varchar(SOURCE_EVENT_ID, event_ids),
            FieldData::int64(POSITION, records.iter().map(|r| r.position).collect()),
            FieldData::varchar(LABEL, strings(|r| &r.label, MAX_LABEL_BYTES)),
            FieldData::varchar(TEXT, strings(|r| &r.text, MAX_TEXT_BYTES)),
            FieldData::float_vector(EMBEDDING, records.iter().map(|r| r.embedding.clone()).collect()),
        ];
        let insert = InsertRequest::builder().collection_name(&self.collection).columns(columns).build()?;
        let request = sdk::request::dml::UpsertRequest::builder().insert(insert).build()?;
        timed("milvus", "upsert", self.client.upsert(request)).await?;
        Ok(())
    }

    /// Removes every vector `filter` admits (the owner is always part of it).
    pub async fn delete(&self, filter: &SearchFilter) -> Result<(), RetrievalError> {
        let request = sdk::request::dml::DeleteRequest::builder()
            .collection_name(&self.collection)
            .filter(filter.expression())
            .build()?;
        timed("milvus", "delete", self.client.delete(request)).await?;
        Ok(())
    }

    /// Seals what was upserted into indexed segments. Milvus Lite searches unsealed rows by
    /// brute force in Python (20,000 rows: ~0.9 s a search against ~40 ms once sealed), so
    /// the embedder flushes after enough vectors or when idle; a cluster seals on its own.
    pub async fn flush(&self) -> Result<(), RetrievalError> {
        let request = FlushRequest::builder().collection_names([self.collection.as_str()]).build()?;
        timed("milvus", "flush", self.client.flush(request)).await?;
        Ok(())
    }

    /// The `limit` best hits for a question among those `filter` admits, by the store's
    /// search mode: `vector` is the question's embedding (None in keyword mode), `text` its
    /// words. Hybrid runs both searches at once and fuses them ([`reciprocal_rank_fusion`]).
    pub async fn search(
        &self,
        text: &str,
        vector: Option<Vec<f32>>,
        filter: &SearchFilter,
        limit: usize,
    ) -> Result<Vec<Hit>, RetrievalError> {
        match (self.mode, vector) {
            (SearchMode::Keyword, _) => self.search_keywords(text, None, filter, limit).await,
            (SearchMode::Vector, Some(vector)) => self.search_vectors(vector, filter, limit).await,
            (SearchMode::Hybrid, Some(vector)) => {
                let candidates = self.candidates.max(limit);
                let (keyword_hits, vector_hits) = tokio::try_join!(
                    self.search_keywords(text, Some(&vector), filter, candidates),
                    self.search_vectors(vector.clone(), filter, candidates),
                )?;
                Ok(reciprocal_rank_fusion(vector_hits, keyword_hits, self.rrf_k, limit))
            }
            (mode, None) => Err(RetrievalError::Embedding(format!("a {mode:?} search needs the question's vector"))),
        }
    }

    /// The `limit` nearest vectors to `vector` among those `filter` admits.
    pub async fn search_vectors(
        &self,
        vector: Vec<f32>,
        filter: &SearchFilter,
        limit: usize,
    ) -> Result<Vec<Hit>, RetrievalError> {
        let request = self
            .search_request(EMBEDDING, SearchVectors::Float(vec![vector]), filter, limit, false)
            .extra_params(self.search_params.clone())
            .build()?;
        let response = timed("milvus", "search", Box::pin(self.client.search(request))).await?;
        hits(&response, |score, _| Ok((score, Some(score), None)))
    }

    /// The `limit` texts among those `filter` admits whose words best match `text` by BM25.
    /// With the question's `vector`, each hit's similarity to it is computed from its stored
    /// vector, so a keyword hit has a cosine too. A question with no indexed word (only
    /// stop words, say) finds nothing.
    pub async fn search_keywords(
        &self,
        text: &str,
        vector: Option<&[f32]>,
        filter: &SearchFilter,
        limit: usize,
    ) -> Result<Vec<Hit>, RetrievalError> {
        let query = SearchVectors::EmbeddedText(vec![text.to_owned()]);
        let request = self.search_request(TEXT_TERMS, query, filter, limit, vector.is_some()).build()?;
        let response = timed("milvus", "keyword_search", Box::pin(self.client.search(request))).await?;
        hits(&response, |score, row| {
            // Milvus Lite reports BM25 negated (smaller is nearer); a cluster reports it as is.
            let bm25 = score.abs();
            let similarity = match vector {
                Some(question) => Some(question.iter().zip(row.get_float_vector(EMBEDDING)?).map(|(a, b)| a * b).sum()),
                None => None,
            };
            Ok((bm25, similarity, Some(bm25)))
        })
    }

    fn search_request(
        &self,
        field: &str,
        query: SearchVectors,
        filter: &SearchFilter,
        limit: usize,
        with_vectors: bool,
    ) -> sdk::request::dql::SearchRequestBuilder {
        let mut fields = vec![ID, KIND, SOURCE_ID, SOURCE_EVENT_ID, POSITION, LABEL, TEXT];
        if with_vectors {
            fields.push(EMBEDDING);
        }
        SearchRequest::builder()
            .collection_name(&self.collection)
            .vector_field(field)
            .vectors(query)
            .filter(filter.expression())
            .output_fields(fields)
            .limit(i64::try_from(limit).unwrap_or(i64::MAX))
    }

    /// How many vectors `filter` admits (strongly consistent: sees every acknowledged upsert).
    pub async fn count(&self, filter: &SearchFilter) -> Result<u64, RetrievalError> {
        let request = QueryRequest::builder()
            .collection_name(&self.collection)
            .filter(filter.expression())
            .output_fields(["count(*)"])
            .consistency_level(ConsistencyLevel::Strong)
            .build()?;
        let response = self.client.query(request).await?;
        let count = match response.results().rows()?.next() {
            Some(row) => row.get_i64("count(*)")?,
            None => 0,
        };
        Ok(u64::try_from(count).unwrap_or(0))
    }

    /// The id and source event id of every vector `filter` admits, at most `limit`
    /// (strongly consistent): what an audit compares with the log.
    pub async fn vector_sources(
        &self,
        filter: &SearchFilter,
        limit: usize,
    ) -> Result<Vec<(String, String)>, RetrievalError> {
        let request = QueryRequest::builder()
            .collection_name(&self.collection)
            .filter(filter.expression())
            .output_fields([ID, SOURCE_EVENT_ID])
            .limit(i64::try_from(limit).unwrap_or(i64::MAX))
            .consistency_level(ConsistencyLevel::Strong)
            .build()?;
        let response = self.client.query(request).await?;
        let mut sources = Vec::new();
        for row in response.results().rows()? {
            sources.push((row.get_str(ID)?.to_owned(), row.get_str(SOURCE_EVENT_ID)?.to_owned()));
        }
        Ok(sources)
    }

    /// `owner`'s searchable documents by title, at most `limit`: one row each, its first chunk
    /// (so a document shows up once it is indexed, and not after it was deleted).
    pub async fn documents(&self, owner: &UserId, limit: usize) -> Result<Vec<StoredDocument>, RetrievalError> {
        let filter = SearchFilter { kind: Some(SourceKind::Document), ..SearchFilter::owner(owner.clone()) };
        let request = QueryRequest::builder()
            .collection_name(&self.collection)
            .filter(format!("{} && {POSITION} == 0", filter.expression()))
            .output_fields([SOURCE_ID, LABEL, SOURCE_EVENT_ID])
            .limit(i64::try_from(limit).unwrap_or(i64::MAX))
            .consistency_level(ConsistencyLevel::Strong)
            .build()?;
        let response = self.client.query(request).await?;
        let mut documents = Vec::new();
        for row in response.results().rows()? {
            documents.push(StoredDocument {
                document_id: row.get_str(SOURCE_ID)?.to_owned(),
                title: row.get_str(LABEL)?.to_owned(),
                event_id: row.get_str(SOURCE_EVENT_ID)?.to_owned(),
            });
        }
        documents.sort_by(|a, b| (&a.title, &a.document_id).cmp(&(&b.title, &b.document_id)));
        Ok(documents)
    }

    /// Replaces the collection's vector index with the one `settings` ask for, waits until
    /// every row is indexed (up to `timeout`) and loads the collection again. Searches fail
    /// while it runs; reopen the store with `settings` to search with the new index's
    /// parameters.
    pub async fn rebuild_vector_index(
        &self,
        settings: &MilvusSettings,
        timeout: std::time::Duration,
    ) -> Result<(), RetrievalError> {
        schema::rebuild_vector_index(&self.client, &self.collection, settings, timeout).await
    }

    /// Drops the collection named in `settings` (tests and benchmarks clean up with it).
    pub async fn drop_collection(settings: &MilvusSettings) -> Result<(), RetrievalError> {
        let client = ClientV2::new(&ConnectConfig::new().uri(settings.milvus_url.clone())).await?;
        if schema::exists(&client, &settings.milvus_collection).await? {
            let request = sdk::request::collection::DropCollectionRequest::builder()
                .collection_name(&settings.milvus_collection)
                .build()?;
            client.drop_collection(request).await?;
        }
        Ok(())
    }
}

/// The search parameters of the configured vector index.
fn index_search_params(settings: &MilvusSettings) -> HashMap<String, String> {
    match settings.milvus_index {
        IndexKind::Hnsw | IndexKind::HnswSq => {
            HashMap::from([("ef".to_owned(), settings.milvus_search_ef.to_string())])
        }
        IndexKind::IvfFlat | IndexKind::IvfSq8 => {
            HashMap::from([("nprobe".to_owned(), settings.milvus_ivf_nprobe.to_string())])
        }
        IndexKind::Flat => HashMap::new(),
    }
}

/// The hits of a one-query search response, best first; `scores` turns Milvus's score and
/// the row into the hit's (score, similarity, keyword score).
fn hits(
    response: &sdk::response::dql::SearchResponse,
    scores: impl Fn(f32, &sdk::ResultRow<'_>) -> Result<(f32, Option<f32>, Option<f32>), RetrievalError>,
) -> Result<Vec<Hit>, RetrievalError> {
    let mut hits = Vec::new();
    for result in response.results() {
        for row in result.rows()? {
            let (score, similarity, keyword_score) = scores(row.get_f32("score")?, &row)?;
            hits.push(Hit {
                id: row.get_str(ID)?.to_owned(),
                kind: SourceKind::parse(row.get_str(KIND)?).unwrap_or(SourceKind::Document),
                source_id: row.get_str(SOURCE_ID)?.to_owned(),
                source_event_id: row
                    .get_str(SOURCE_EVENT_ID)?
                    .parse()
                    .map_err(|e: parley_events::InvalidId| RetrievalError::Corrupt(format!("a vector whose {e}")))?,
                position: row.get_i64(POSITION)?,
                label: row.get_str(LABEL)?.to_owned(),
                text: row.get_str(TEXT)?.to_owned(),
                score,
                similarity,
                keyword_score,
            });
        }
    }
    Ok(hits)
}

/// The longest prefix of `text` of at most `max` bytes that ends on a character boundary.
pub fn truncated(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn truncation_never_splits_a_character() {
        assert_eq!(truncated("héllo", 2), "h");
        assert_eq!(truncated("héllo", 3), "hé");
        assert_eq!(truncated("abc", 10), "abc");
    }
}
