//! The Milvus collection of every embedded chunk and message. One row per vector, keyed by
//! a deterministic id, so writing the same source twice overwrites instead of adding.

use std::collections::HashMap;

use clap::{Args, ValueEnum};
use milvus::v2 as sdk;
use milvus::v2::prelude::{
    ClientV2, ConnectConfig, ConsistencyLevel, FieldData, FlushRequest, IndexParam, IndexType, InsertRequest,
    LoadCollectionRequest, MetricType, QueryRequest, SearchRequest, SearchVectors,
};
use parley_eventlog::metrics::timed;
use parley_events::{ConversationId, EventId, UserId};
use serde::Serialize;

use crate::error::RetrievalError;
use crate::filter::{SearchFilter, SourceKind};

const ID: &str = "id";
const OWNER: &str = "owner";
const KIND: &str = "kind";
const SOURCE_ID: &str = "source_id";
const SOURCE_EVENT_ID: &str = "source_event_id";
const POSITION: &str = "position";
const LABEL: &str = "label";
const TEXT: &str = "text";
const EMBEDDING: &str = "embedding";

/// Largest stored text in bytes (Milvus VARCHAR limit of this collection); longer message
/// texts are cut at a character boundary. Chunks are far smaller.
pub const MAX_TEXT_BYTES: usize = 16_384;
const MAX_LABEL_BYTES: usize = 512;

/// The approximate index Milvus builds over the vectors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum IndexKind {
    /// Graph index: the best latency/recall trade-off for in-memory collections.
    Hnsw,
    /// Inverted file over k-means clusters: less memory, needs enough rows to train.
    IvfFlat,
    /// Exact search: the reference for recall, linear in the collection size.
    Flat,
}

/// Where the vectors live and how they are indexed and searched.
#[derive(Debug, Clone, Args)]
pub struct MilvusSettings {
    /// Milvus (or Milvus Lite) gRPC endpoint.
    #[arg(long, global = true, env = "PARLEY_MILVUS_URL", default_value = "http://127.0.0.1:19530")]
    pub milvus_url: String,

    /// `user:password` or API key of a secured cluster.
    #[arg(long, global = true, env = "PARLEY_MILVUS_TOKEN", hide_env_values = true)]
    pub milvus_token: Option<String>,

    /// The Milvus collection of Parley's vectors.
    #[arg(long, global = true, env = "PARLEY_MILVUS_COLLECTION", default_value = "parley_knowledge",
          value_parser = parse_collection_name)]
    pub milvus_collection: String,

    /// Index built when the collection is created (an existing collection keeps its own).
    #[arg(long, global = true, env = "PARLEY_MILVUS_INDEX", value_enum, default_value = "hnsw")]
    pub milvus_index: IndexKind,

    /// HNSW: links per node.
    #[arg(long, global = true, env = "PARLEY_MILVUS_HNSW_M", default_value_t = 16, value_parser = clap::value_parser!(u32).range(2..=2048))]
    pub milvus_hnsw_m: u32,

    /// HNSW: candidate list size while building.
    #[arg(long, global = true, env = "PARLEY_MILVUS_HNSW_EF_CONSTRUCTION", default_value_t = 200,
          value_parser = clap::value_parser!(u32).range(8..=65536))]
    pub milvus_hnsw_ef_construction: u32,

    /// HNSW: candidate list size while searching (at least top-k); higher is slower and more exact.
    #[arg(long, global = true, env = "PARLEY_MILVUS_SEARCH_EF", default_value_t = 64,
          value_parser = clap::value_parser!(u32).range(1..=65536))]
    pub milvus_search_ef: u32,

    /// IVF_FLAT: clusters built / clusters searched.
    #[arg(long, global = true, env = "PARLEY_MILVUS_IVF_NLIST", default_value_t = 128, value_parser = clap::value_parser!(u32).range(1..=65536))]
    pub milvus_ivf_nlist: u32,
    /// Clusters an IVF index searches.
    #[arg(long, global = true, env = "PARLEY_MILVUS_IVF_NPROBE", default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..=65536))]
    pub milvus_ivf_nprobe: u32,
}

fn parse_collection_name(value: &str) -> Result<String, String> {
    let legal = value.chars().next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && value.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        && value.len() <= 255;
    if legal {
        Ok(value.to_owned())
    } else {
        Err(format!("{value:?}: letters, digits and _ only, not starting with a digit"))
    }
}

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

/// One search result, best first; `score` is cosine similarity (1 = same direction).
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
    /// Cosine similarity to the question (1: same direction).
    pub score: f32,
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
                Ok(search_params) => {
                    return Ok(Self {
                        client,
                        collection: settings.milvus_collection.clone(),
                        search_params,
                        dimension,
                    });
                }
            }
        }
    }

    /// One attempt of [`Self::open`]; returns the search parameters of the index.
    async fn open_with(
        client: &ClientV2,
        settings: &MilvusSettings,
        dimension: usize,
        model: &str,
    ) -> Result<HashMap<String, String>, RetrievalError> {
        let collection = settings.milvus_collection.clone();
        if !exists(client, &collection).await? {
            create(client, settings, dimension).await?;
        }
        let existing = collection_dimension(client, &collection).await?;
        if existing != dimension {
            return Err(RetrievalError::DimensionMismatch {
                collection,
                collection_dimension: existing,
                backend_dimension: dimension,
                model: model.to_owned(),
            });
        }
        client.load_collection(LoadCollectionRequest::builder().collection_name(&collection).build()?).await?;
        Ok(match settings.milvus_index {
            IndexKind::Hnsw => HashMap::from([("ef".to_owned(), settings.milvus_search_ef.to_string())]),
            IndexKind::IvfFlat => HashMap::from([("nprobe".to_owned(), settings.milvus_ivf_nprobe.to_string())]),
            IndexKind::Flat => HashMap::new(),
        })
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

    /// The `limit` nearest vectors to `vector` among those `filter` admits.
    pub async fn search(
        &self,
        vector: Vec<f32>,
        filter: &SearchFilter,
        limit: usize,
    ) -> Result<Vec<Hit>, RetrievalError> {
        let request = SearchRequest::builder()
            .collection_name(&self.collection)
            .vector_field(EMBEDDING)
            .vectors(SearchVectors::Float(vec![vector]))
            .filter(filter.expression())
            .output_fields([ID, KIND, SOURCE_ID, SOURCE_EVENT_ID, POSITION, LABEL, TEXT])
            .limit(i64::try_from(limit).unwrap_or(i64::MAX))
            .extra_params(self.search_params.clone())
            .build()?;
        let response = timed("milvus", "search", Box::pin(self.client.search(request))).await?;
        let mut hits = Vec::new();
        for result in response.results() {
            for row in result.rows()? {
                hits.push(Hit {
                    id: row.get_str(ID)?.to_owned(),
                    kind: SourceKind::parse(row.get_str(KIND)?).unwrap_or(SourceKind::Document),
                    source_id: row.get_str(SOURCE_ID)?.to_owned(),
                    source_event_id: row.get_str(SOURCE_EVENT_ID)?.parse().map_err(|e: parley_events::InvalidId| {
                        RetrievalError::Corrupt(format!("a vector whose {e}"))
                    })?,
                    position: row.get_i64(POSITION)?,
                    label: row.get_str(LABEL)?.to_owned(),
                    text: row.get_str(TEXT)?.to_owned(),
                    score: row.get_f32("score")?,
                });
            }
        }
        Ok(hits)
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

    /// Drops the collection named in `settings` (tests and benchmarks clean up with it).
    pub async fn drop_collection(settings: &MilvusSettings) -> Result<(), RetrievalError> {
        let client = ClientV2::new(&ConnectConfig::new().uri(settings.milvus_url.clone())).await?;
        if exists(&client, &settings.milvus_collection).await? {
            let request = sdk::request::collection::DropCollectionRequest::builder()
                .collection_name(&settings.milvus_collection)
                .build()?;
            client.drop_collection(request).await?;
        }
        Ok(())
    }
}

async fn exists(client: &ClientV2, collection: &str) -> Result<bool, RetrievalError> {
    let request = sdk::request::collection::HasCollectionRequest::builder().collection_name(collection).build()?;
    Ok(client.has_collection(request).await?.exists())
}

async fn collection_dimension(client: &ClientV2, collection: &str) -> Result<usize, RetrievalError> {
    let request = sdk::request::collection::DescribeCollectionRequest::builder().collection_name(collection).build()?;
    let described = client.describe_collection(request).await?;
    let field =
        described.description().get_schema().get_fields().iter().find(|f| f.get_name() == EMBEDDING).ok_or_else(
            || RetrievalError::Milvus(format!("collection {collection} has no {EMBEDDING} field; it is not Parley's")),
        )?;
    usize::try_from(field.get_dimension()).map_err(|e| RetrievalError::Milvus(e.to_string()))
}

async fn create(client: &ClientV2, settings: &MilvusSettings, dimension: usize) -> Result<(), RetrievalError> {
    let varchar = |name: &str, max: usize| {
        sdk::FieldSchema::new()
            .name(name)
            .data_type(sdk::DataType::VarChar)
            .max_length(u32::try_from(max).unwrap_or(u32::MAX))
    };
    let schema = sdk::CollectionSchema::new()
        .add_field(varchar(ID, 64).primary_key(true))
        // Milvus hashes owners onto its partitions, so a search (always owner-filtered) scans
        // only the asker's partition instead of every tenant's segments.
        .add_field(varchar(OWNER, 256).partition_key(true))
        .add_field(varchar(KIND, 16))
        .add_field(varchar(SOURCE_ID, 64))
        .add_field(varchar(SOURCE_EVENT_ID, 64))
        .add_field(sdk::FieldSchema::new().name(POSITION).data_type(sdk::DataType::Int64))
        .add_field(varchar(LABEL, MAX_LABEL_BYTES))
        .add_field(varchar(TEXT, MAX_TEXT_BYTES))
        .add_field(
            sdk::FieldSchema::new()
                .name(EMBEDDING)
                .data_type(sdk::DataType::FloatVector)
                .dimension(u32::try_from(dimension).unwrap_or(u32::MAX)),
        );
    let collection = &settings.milvus_collection;
    client
        .create_collection(
            sdk::request::collection::CreateCollectionRequest::builder()
                .collection_name(collection)
                .schema(schema)
                .build()?,
        )
        .await?;
    let (index_type, params) = match settings.milvus_index {
        IndexKind::Hnsw => (
            IndexType::Hnsw,
            HashMap::from([
                ("M".to_owned(), settings.milvus_hnsw_m.to_string()),
                ("efConstruction".to_owned(), settings.milvus_hnsw_ef_construction.to_string()),
            ]),
        ),
        IndexKind::IvfFlat => {
            (IndexType::IvfFlat, HashMap::from([("nlist".to_owned(), settings.milvus_ivf_nlist.to_string())]))
        }
        IndexKind::Flat => (IndexType::Flat, HashMap::new()),
    };
    let vector_index =
        IndexParam::new().field_name(EMBEDDING).index_type(index_type).metric_type(MetricType::Ip).extra_params(params);
    // sync(false): Milvus Lite has no AllocTimestamp, which waiting for the build needs.
    let request = sdk::request::index::CreateIndexRequest::builder()
        .collection_name(collection)
        .index_params(vec![vector_index])
        .sync(false)
        .build()?;
    client.create_index(request).await?;
    Ok(())
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

    #[test]
    fn collection_names_are_checked() {
        assert!(parse_collection_name("parley_knowledge").is_ok());
        assert!(parse_collection_name("9lives").is_err());
        assert!(parse_collection_name("a-b").unwrap_err().contains("a-b"));
    }
}
