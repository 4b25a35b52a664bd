//! The collection's fields and indexes: created once, described at every start.

use std::collections::HashMap;

use milvus::v2 as sdk;
use milvus::v2::prelude::{
    ClientV2, IndexDesc, IndexParam, IndexStateCode, IndexType, LoadCollectionRequest, MetricType,
};

use super::settings::{IndexKind, MilvusSettings};
use crate::error::RetrievalError;

pub(super) const ID: &str = "id";
pub(super) const OWNER: &str = "owner";
pub(super) const KIND: &str = "kind";
pub(super) const SOURCE_ID: &str = "source_id";
pub(super) const SOURCE_EVENT_ID: &str = "source_event_id";
pub(super) const POSITION: &str = "position";
pub(super) const LABEL: &str = "label";
pub(super) const TEXT: &str = "text";
pub(super) const EMBEDDING: &str = "embedding";
/// BM25 term weights of `text`, computed by Milvus on insert (never written by Parley).
pub(super) const TEXT_TERMS: &str = "text_terms";

/// Largest stored text in bytes (Milvus VARCHAR limit of this collection); longer message
/// texts are cut at a character boundary. Chunks are far smaller.
pub const MAX_TEXT_BYTES: usize = 16_384;
pub(super) const MAX_LABEL_BYTES: usize = 512;

/// Words too common to tell chunks apart; left out of the keyword index and of questions.
const STOP_WORDS: &[&str] = &[
    "a", "an", "and", "are", "as", "at", "be", "but", "by", "can", "do", "does", "for", "from", "how", "i", "if", "in",
    "into", "is", "it", "its", "me", "my", "no", "not", "of", "on", "or", "our", "so", "such", "that", "the", "their",
    "then", "there", "these", "they", "this", "to", "was", "we", "what", "when", "where", "which", "who", "why",
    "will", "with", "you", "your",
];

/// What an existing collection offers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Described {
    /// The length of its vectors.
    pub(super) dimension: usize,
    /// Whether it has the BM25 field (collections made before hybrid search do not).
    pub(super) keywords: bool,
}

pub(super) async fn exists(client: &ClientV2, collection: &str) -> Result<bool, RetrievalError> {
    let request = sdk::request::collection::HasCollectionRequest::builder().collection_name(collection).build()?;
    Ok(client.has_collection(request).await?.exists())
}

pub(super) async fn describe(client: &ClientV2, collection: &str) -> Result<Described, RetrievalError> {
    let request = sdk::request::collection::DescribeCollectionRequest::builder().collection_name(collection).build()?;
    let described = client.describe_collection(request).await?;
    let fields = described.description().get_schema().get_fields();
    let embedding = fields.iter().find(|f| f.get_name() == EMBEDDING).ok_or_else(|| {
        RetrievalError::Milvus(format!("collection {collection} has no {EMBEDDING} field; it is not Parley's"))
    })?;
    Ok(Described {
        dimension: usize::try_from(embedding.get_dimension()).map_err(|e| RetrievalError::Milvus(e.to_string()))?,
        keywords: fields.iter().any(|f| f.get_name() == TEXT_TERMS),
    })
}

pub(super) async fn create(
    client: &ClientV2,
    settings: &MilvusSettings,
    dimension: usize,
) -> Result<(), RetrievalError> {
    let varchar = |name: &str, max: usize| {
        sdk::FieldSchema::new()
            .name(name)
            .data_type(sdk::DataType::VarChar)
            .max_length(u32::try_from(max).unwrap_or(u32::MAX))
    };
    let analyzer = serde_json::json!({
        "tokenizer": "standard",
        "filter": ["lowercase", {"type": "stop", "stop_words": STOP_WORDS}],
    });
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
        .add_field(varchar(TEXT, MAX_TEXT_BYTES).enable_analyzer(true).analyzer_params(analyzer))
        .add_field(sdk::FieldSchema::new().name(TEXT_TERMS).data_type(sdk::DataType::SparseFloatVector))
        .add_field(
            sdk::FieldSchema::new()
                .name(EMBEDDING)
                .data_type(sdk::DataType::FloatVector)
                .dimension(u32::try_from(dimension).unwrap_or(u32::MAX)),
        )
        .add_function(
            sdk::Function::new()
                .name("text_bm25")
                .function_type(sdk::FunctionType::Bm25)
                .input_fields([TEXT])
                .output_fields([TEXT_TERMS]),
        );
    let collection = &settings.milvus_collection;
    let mut request =
        sdk::request::collection::CreateCollectionRequest::builder().collection_name(collection).schema(schema);
    if settings.milvus_shards > 0 {
        request = request.num_shards(i32::from(settings.milvus_shards));
    }
    if settings.milvus_partitions > 0 {
        request = request.num_partitions(i64::from(settings.milvus_partitions));
    }
    client.create_collection(request.build()?).await?;
    let keyword_index = IndexParam::new()
        .field_name(TEXT_TERMS)
        .index_type(IndexType::SparseInvertedIndex)
        .metric_type(MetricType::Bm25);
    // sync(false): Milvus Lite has no AllocTimestamp, which waiting for the build needs.
    let request = sdk::request::index::CreateIndexRequest::builder()
        .collection_name(collection)
        .index_params(vec![vector_index(settings), keyword_index])
        .sync(false)
        .build()?;
    client.create_index(request).await?;
    Ok(())
}

/// The vector index `settings` ask for, with its build parameters.
pub(super) fn vector_index(settings: &MilvusSettings) -> IndexParam {
    let hnsw = || {
        HashMap::from([
            ("M".to_owned(), settings.milvus_hnsw_m.to_string()),
            ("efConstruction".to_owned(), settings.milvus_hnsw_ef_construction.to_string()),
        ])
    };
    let ivf = || HashMap::from([("nlist".to_owned(), settings.milvus_ivf_nlist.to_string())]);
    let (index_type, params) = match settings.milvus_index {
        IndexKind::Hnsw => (IndexType::Hnsw, hnsw()),
        IndexKind::HnswSq => {
            let mut params = hnsw();
            params.insert("sq_type".to_owned(), "SQ8".to_owned());
            (IndexType::HnswSq, params)
        }
        IndexKind::IvfFlat => (IndexType::IvfFlat, ivf()),
        IndexKind::IvfSq8 => (IndexType::IvfSq8, ivf()),
        IndexKind::Flat => (IndexType::Flat, HashMap::new()),
    };
    IndexParam::new().field_name(EMBEDDING).index_type(index_type).metric_type(MetricType::Ip).extra_params(params)
}

/// Replaces `collection`'s vector index with the one `settings` ask for, waits until every
/// row is indexed (up to `timeout`) and loads the collection again.
pub(super) async fn rebuild_vector_index(
    client: &ClientV2,
    collection: &str,
    settings: &MilvusSettings,
    timeout: std::time::Duration,
) -> Result<(), RetrievalError> {
    let release = sdk::request::collection::ReleaseCollectionRequest::builder().collection_name(collection).build()?;
    client.release_collection(release).await?;
    let drop =
        sdk::request::index::DropIndexRequest::builder().collection_name(collection).field_name(EMBEDDING).build()?;
    // At a million rows Milvus Lite takes minutes to drop an index (it waits for its
    // background compaction) and to create one (on a loaded collection it builds at
    // once): the client's call times out and is retried while the first still runs.
    // A retried drop may find no index (the first dropped it); a create may find the
    // old index (the drop is not through: try again) or the new one (the first
    // create went through: done).
    match client.drop_index(drop).await {
        Err(error) if !error.to_string().contains("no index") => return Err(error.into()),
        _ => {}
    }
    let deadline = std::time::Instant::now() + timeout;
    let wanted = vector_index(settings);
    loop {
        let create = sdk::request::index::CreateIndexRequest::builder()
            .collection_name(collection)
            .index_params(vec![wanted.clone()])
            .sync(false)
            .build()?;
        match client.create_index(create).await {
            Ok(()) => break,
            Err(error) if error.to_string().contains("already exists") && std::time::Instant::now() < deadline => {
                let current = vector_index_description(client, collection).await;
                if current.is_some_and(|index| index.get_index_type() == wanted.get_index_type()) {
                    break;
                }
                tokio::time::sleep(std::time::Duration::from_secs(1)).await;
            }
            Err(error) => return Err(error.into()),
        }
    }
    loop {
        let index = vector_index_description(client, collection).await;
        match index.as_ref().map(IndexDesc::get_state) {
            Some(IndexStateCode::Finished) => break,
            Some(IndexStateCode::Failed) => {
                let reason = index.as_ref().map(IndexDesc::get_failure_reason).unwrap_or_default();
                return Err(RetrievalError::Milvus(format!("building the {EMBEDDING} index failed: {reason}")));
            }
            _ if std::time::Instant::now() >= deadline => {
                return Err(RetrievalError::Milvus(format!(
                    "the {EMBEDDING} index of {collection} was not built within {timeout:?} ({index:?})"
                )));
            }
            _ => tokio::time::sleep(std::time::Duration::from_millis(500)).await,
        }
    }
    client.load_collection(LoadCollectionRequest::builder().collection_name(collection).build()?).await?;
    Ok(())
}

/// The vector index as Milvus describes it (None: the field has no index, or Milvus did
/// not answer).
async fn vector_index_description(client: &ClientV2, collection: &str) -> Option<IndexDesc> {
    let describe = sdk::request::index::DescribeIndexRequest::builder()
        .collection_name(collection)
        .field_name(EMBEDDING)
        .build()
        .ok()?;
    let described = client.describe_index(describe).await.ok()?;
    described.indexes().iter().find(|i| i.get_field_name() == EMBEDDING).cloned()
}
