//! The tables of one generation of the context projection, and their prepared statements.

use scylla::statement::prepared::PreparedStatement;

use super::Store;
use super::cache::{CACHE_RETENTION_SECONDS, COLUMNS as CACHE_COLUMNS};
use crate::error::ProjectionError;

/// The prepared statements of one generation.
#[derive(Debug)]
pub struct Generation {
    /// The generation's number (the tables' `_g<N>`).
    pub number: i32,
    pub(super) insert_conversation: PreparedStatement,
    pub(super) insert_by_user: PreparedStatement,
    pub(super) update_conversation: PreparedStatement,
    pub(super) update_title: PreparedStatement,
    pub(super) insert_message: PreparedStatement,
    pub(super) insert_location: PreparedStatement,
    pub(super) upsert_progress: PreparedStatement,
    pub(super) select_conversation: PreparedStatement,
    pub(super) select_messages: PreparedStatement,
    pub(super) select_by_user: PreparedStatement,
    pub(super) select_by_user_before: PreparedStatement,
    pub(super) select_locations: PreparedStatement,
    pub(super) select_progress: PreparedStatement,
    pub(super) insert_cached_answer: PreparedStatement,
    pub(super) select_cached_answers: PreparedStatement,
    pub(super) delete_cached_answers: PreparedStatement,
    pub(super) select_user_cached_answers: PreparedStatement,
    pub(super) delete_cached_answer: PreparedStatement,
}

/// Frozen, so an answer's list is one cell (a non-frozen empty list would be a tombstone
/// on every insert).
const RETRIEVED_TYPE: &str = "frozen<list<frozen<tuple<text, text, text, text, bigint, float>>>>";

/// An answer from the semantic cache: the answer repeated, its question, the similarity.
const CACHED_FROM_TYPE: &str = "frozen<tuple<text, text, float>>";

/// The tables of one generation, without the `_g<N>` suffix.
pub(super) const TABLES: [&str; 6] =
    ["conversations", "conversations_by_user", "messages", "event_locations", "progress", "answer_cache"];

impl Store {
    /// Creates the tables of a generation (idempotent).
    pub async fn create_generation(&self, n: i32) -> Result<(), ProjectionError> {
        let ks = &self.keyspace;
        for statement in [
            format!(
                "CREATE TABLE IF NOT EXISTS {ks}.conversations_g{n} (conversation_id uuid PRIMARY KEY, user_id text, \
                 started_at bigint, updated_at bigint, last_sequence bigint, open_query_event_id text, title text)"
            ),
            format!(
                "CREATE TABLE IF NOT EXISTS {ks}.conversations_by_user_g{n} (user_id text, started_at bigint, \
                 conversation_id uuid, title text, PRIMARY KEY ((user_id), started_at, conversation_id)) \
                 WITH CLUSTERING ORDER BY (started_at DESC, conversation_id DESC)"
            ),
            format!(
                "CREATE TABLE IF NOT EXISTS {ks}.messages_g{n} (conversation_id uuid, sequence bigint, event_id text, \
                 kind text, text text, occurred_at bigint, query_event_id text, model text, prompt_tokens int, \
                 completion_tokens int, llm_latency_ms bigint, error_kind text, retrieved {RETRIEVED_TYPE}, \
                 cached_from {CACHED_FROM_TYPE}, PRIMARY KEY ((conversation_id), sequence))"
            ),
            format!(
                "CREATE TABLE IF NOT EXISTS {ks}.event_locations_g{n} (conversation_id uuid, sequence bigint, \
                 event_id text, event_type text, log_topic text, log_partition int, log_offset bigint, \
                 PRIMARY KEY ((conversation_id), sequence, event_id))"
            ),
            format!(
                "CREATE TABLE IF NOT EXISTS {ks}.progress_g{n} (log_topic text, log_partition int, next_offset bigint, \
                 PRIMARY KEY ((log_topic), log_partition))"
            ),
            format!(
                "CREATE TABLE IF NOT EXISTS {ks}.answer_cache_g{n} (user_id text, query_event_id text, \
                 answer_event_id text, conversation_id uuid, text text, model text, context_fingerprint text, \
                 documents frozen<list<text>>, llm_latency_ms bigint, occurred_at bigint, \
                 PRIMARY KEY ((user_id), query_event_id)) WITH default_time_to_live = {CACHE_RETENTION_SECONDS}"
            ),
        ] {
            self.ddl(&statement).await?;
        }
        // Generations created before answers kept their retrieved context, or where a cached
        // answer came from.
        self.add_missing_column(&format!("messages_g{n}"), "retrieved", RETRIEVED_TYPE).await?;
        self.add_missing_column(&format!("messages_g{n}"), "cached_from", CACHED_FROM_TYPE).await
    }

    /// Adds a column that a table created by an older version lacks (CREATE TABLE IF NOT
    /// EXISTS leaves an existing table as it is). Rows written before have it null.
    async fn add_missing_column(&self, table: &str, column: &str, cql_type: &str) -> Result<(), ProjectionError> {
        if self.column_exists(table, column).await? {
            return Ok(());
        }
        match self.ddl(&format!("ALTER TABLE {}.{table} ADD {column} {cql_type}", self.keyspace)).await {
            // Another process may have added it in between.
            Err(_) if self.column_exists(table, column).await? => Ok(()),
            added => added,
        }
    }

    async fn column_exists(&self, table: &str, column: &str) -> Result<bool, ProjectionError> {
        const CQL: &str = "SELECT column_name FROM system_schema.columns WHERE keyspace_name = ? AND table_name = ? AND column_name = ?";
        let result = self
            .session
            // Unquoted CQL names are stored in lower case.
            .query_unpaged(CQL, (self.keyspace.to_lowercase(), table, column))
            .await
            .map_err(|e| ProjectionError::cql(CQL, e))?;
        Ok(result.into_rows_result().map_err(|e| ProjectionError::cql(CQL, e))?.rows_num() > 0)
    }

    /// Prepares the statements of a generation, creating its tables if they do not exist
    /// yet (another process may have registered the generation a moment before).
    pub async fn generation(&self, n: i32) -> Result<Generation, ProjectionError> {
        self.create_generation(n).await?;
        let ks = &self.keyspace;
        let prepare = |cql: String| {
            let session = self.session.clone();
            async move { session.prepare(cql.as_str()).await.map_err(|e| ProjectionError::cql(&cql, e)) }
        };
        const MESSAGE_COLUMNS: &str = "sequence, event_id, kind, text, occurred_at, query_event_id, model, \
                                       prompt_tokens, completion_tokens, llm_latency_ms, error_kind, retrieved, cached_from";
        Ok(Generation {
            number: n,
            insert_conversation: prepare(format!(
                "INSERT INTO {ks}.conversations_g{n} (conversation_id, user_id, started_at, updated_at, last_sequence, \
                 open_query_event_id, title) VALUES (?, ?, ?, ?, ?, ?, ?)"
            ))
            .await?,
            insert_by_user: prepare(format!(
                "INSERT INTO {ks}.conversations_by_user_g{n} (user_id, started_at, conversation_id, title) VALUES (?, ?, ?, ?)"
            ))
            .await?,
            update_title: prepare(format!("UPDATE {ks}.conversations_g{n} SET title = ? WHERE conversation_id = ?")).await?,
            update_conversation: prepare(format!(
                "UPDATE {ks}.conversations_g{n} SET updated_at = ?, last_sequence = ?, open_query_event_id = ? \
                 WHERE conversation_id = ?"
            ))
            .await?,
            insert_message: prepare(format!("INSERT INTO {ks}.messages_g{n} (conversation_id, {MESSAGE_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)")).await?,
            insert_location: prepare(format!(
                "INSERT INTO {ks}.event_locations_g{n} (conversation_id, sequence, event_id, event_type, log_topic, \
                 log_partition, log_offset) VALUES (?, ?, ?, ?, ?, ?, ?)"
            ))
            .await?,
            upsert_progress: prepare(format!(
                "INSERT INTO {ks}.progress_g{n} (log_topic, log_partition, next_offset) VALUES (?, ?, ?)"
            ))
            .await?,
            select_conversation: prepare(format!(
                "SELECT user_id, started_at, updated_at, last_sequence, open_query_event_id, title \
                 FROM {ks}.conversations_g{n} WHERE conversation_id = ?"
            ))
            .await?,
            select_messages: prepare(format!("SELECT {MESSAGE_COLUMNS} FROM {ks}.messages_g{n} WHERE conversation_id = ?")).await?,
            select_by_user: prepare(format!(
                "SELECT started_at, conversation_id, title FROM {ks}.conversations_by_user_g{n} WHERE user_id = ? LIMIT ?"
            ))
            .await?,
            select_by_user_before: prepare(format!(
                "SELECT started_at, conversation_id, title FROM {ks}.conversations_by_user_g{n} \
                 WHERE user_id = ? AND (started_at, conversation_id) < (?, ?) LIMIT ?"
            ))
            .await?,
            select_locations: prepare(format!(
                "SELECT sequence, event_id, event_type, log_topic, log_partition, log_offset \
                 FROM {ks}.event_locations_g{n} WHERE conversation_id = ?"
            ))
            .await?,
            select_progress: prepare(format!(
                "SELECT log_partition, next_offset FROM {ks}.progress_g{n} WHERE log_topic = ?"
            ))
            .await?,
            insert_cached_answer: prepare(format!(
                "INSERT INTO {ks}.answer_cache_g{n} (user_id, {CACHE_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
            ))
            .await?,
            select_cached_answers: prepare(format!(
                "SELECT {CACHE_COLUMNS} FROM {ks}.answer_cache_g{n} WHERE user_id = ? AND query_event_id IN ?"
            ))
            .await?,
            delete_cached_answers: prepare(format!("DELETE FROM {ks}.answer_cache_g{n} WHERE user_id = ?")).await?,
            select_user_cached_answers: prepare(format!(
                "SELECT {CACHE_COLUMNS} FROM {ks}.answer_cache_g{n} WHERE user_id = ?"
            ))
            .await?,
            delete_cached_answer: prepare(format!(
                "DELETE FROM {ks}.answer_cache_g{n} WHERE user_id = ? AND query_event_id = ?"
            ))
            .await?,
        })
    }
}
