//! The CQL store of the context projection. Portable CQL only (no Cassandra-only
//! features): it runs on ScyllaDB in production and on Cassandra locally.
//!
//! Every table name carries the projection's generation (`messages_g3`): a rebuild fills
//! a new generation while readers use the live one, readers switch by one row of
//! `projection_generations`, and an old generation is dropped table by table.

mod cache;
mod generation;
mod rows;

use std::sync::Arc;

use clap::Args;
use parley_eventlog::metrics::timed;
use scylla::client::session::Session;
use scylla::client::session_builder::SessionBuilder;
use scylla::deserialize::row::DeserializeRow;
use scylla::serialize::row::SerializeRow;
use scylla::statement::batch::{Batch, BatchType};
use scylla::statement::prepared::PreparedStatement;

pub use self::cache::{CACHE_RETENTION_SECONDS, CachedAnswerRow};
pub use self::generation::Generation;
pub use self::rows::{ConversationRow, EventLocation};
use crate::error::ProjectionError;
use crate::keys::KeyStore;

/// Name of the context projection in `projection_generations`.
pub const CONTEXT: &str = "context";

/// How to reach the CQL store.
#[derive(Debug, Clone, Args)]
pub struct CqlSettings {
    /// CQL contact points (host:port), comma separated.
    #[arg(
        id = "cql_nodes",
        long = "cql-nodes",
        env = "PARLEY_CQL_NODES",
        default_value = "127.0.0.1:19042",
        global = true
    )]
    pub nodes: String,

    /// Keyspace of Parley's projections.
    #[arg(id = "cql_keyspace", long = "cql-keyspace", env = "PARLEY_CQL_KEYSPACE", default_value = "parley", global = true,
          value_parser = parse_identifier)]
    pub keyspace: String,

    /// Replication of the keyspace when Parley creates it (CQL map literal). Production on
    /// ScyllaDB: {'class': 'NetworkTopologyStrategy', 'replication_factor': 3}.
    #[arg(
        id = "cql_replication",
        long = "cql-replication",
        env = "PARLEY_CQL_REPLICATION",
        global = true,
        default_value = "{'class': 'SimpleStrategy', 'replication_factor': 1}"
    )]
    pub replication: String,
}

fn parse_identifier(value: &str) -> Result<String, String> {
    let ok = !value.is_empty()
        && value.len() <= 48
        && value.starts_with(|c: char| c.is_ascii_lowercase())
        && value.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    ok.then(|| value.to_owned())
        .ok_or_else(|| format!("{value:?}: 1 to 48 characters of [a-z0-9_], starting with a letter"))
}

/// A connected store.
#[derive(Debug, Clone)]
pub struct Store {
    session: Arc<Session>,
    keyspace: String,
    /// People's data keys: what readers of sealed rows open them with (none: no master key).
    keys: Option<KeyStore>,
}

impl Store {
    /// Connects and makes sure the keyspace and the generations table exist.
    pub async fn connect(settings: &CqlSettings) -> Result<Self, ProjectionError> {
        let mut builder = SessionBuilder::new();
        for node in settings.nodes.split(',').map(str::trim).filter(|n| !n.is_empty()) {
            builder = builder.known_node(node);
        }
        let session = builder.build().await.map_err(|e| ProjectionError::Connect(e.to_string()))?;
        let store = Self { session: Arc::new(session), keyspace: settings.keyspace.clone(), keys: None };
        store
            .ddl(&format!(
                "CREATE KEYSPACE IF NOT EXISTS {} WITH replication = {}",
                store.keyspace, settings.replication
            ))
            .await?;
        store
            .ddl(&format!(
                "CREATE TABLE IF NOT EXISTS {}.projection_generations \
                 (projection text PRIMARY KEY, live int, previous int, building int)",
                store.keyspace
            ))
            .await?;
        Ok(store)
    }

    /// This store, whose readers open sealed rows with `keys` (and whose projector seals
    /// the titles it derives).
    pub fn with_keys(self, keys: Option<KeyStore>) -> Self {
        Self { keys, ..self }
    }

    /// The data keys sealed rows are opened with, when a master key is configured.
    pub fn keys(&self) -> Option<&KeyStore> {
        self.keys.as_ref()
    }

    pub(crate) fn session(&self) -> &Arc<Session> {
        &self.session
    }

    pub(crate) fn keyspace(&self) -> &str {
        &self.keyspace
    }

    async fn ddl(&self, statement: &str) -> Result<(), ProjectionError> {
        self.session.query_unpaged(statement, ()).await.map_err(|e| ProjectionError::cql(statement, e))?;
        Ok(())
    }

    /// The live generation of a projection (creating generation 1 on first use) and its
    /// generation bookkeeping: (live, previous, building).
    pub async fn generations(&self, projection: &str) -> Result<(i32, Option<i32>, Option<i32>), ProjectionError> {
        let select = format!(
            "SELECT live, previous, building FROM {}.projection_generations WHERE projection = ?",
            self.keyspace
        );
        let row = self
            .session
            .query_unpaged(select.as_str(), (projection,))
            .await
            .map_err(|e| ProjectionError::cql(&select, e))?
            .into_rows_result()
            .map_err(|e| ProjectionError::cql(&select, e))?
            .maybe_first_row::<(Option<i32>, Option<i32>, Option<i32>)>()
            .map_err(|e| ProjectionError::cql(&select, e))?;
        match row {
            Some((Some(live), previous, building)) => Ok((live, previous, building)),
            _ => {
                let insert = format!(
                    "INSERT INTO {}.projection_generations (projection, live) VALUES (?, 1) IF NOT EXISTS",
                    self.keyspace
                );
                self.session
                    .query_unpaged(insert.as_str(), (projection,))
                    .await
                    .map_err(|e| ProjectionError::cql(&insert, e))?;
                Box::pin(self.generations(projection)).await
            }
        }
    }

    /// Records the generation being rebuilt (None when done).
    pub async fn set_building(&self, projection: &str, building: Option<i32>) -> Result<(), ProjectionError> {
        let update = format!("UPDATE {}.projection_generations SET building = ? WHERE projection = ?", self.keyspace);
        self.session
            .query_unpaged(update.as_str(), (building, projection))
            .await
            .map_err(|e| ProjectionError::cql(&update, e))?;
        Ok(())
    }

    /// Makes `generation` the one readers use, keeping the old one as `previous`.
    pub async fn switch_live(&self, projection: &str, generation: i32, previous: i32) -> Result<(), ProjectionError> {
        let update = format!(
            "UPDATE {}.projection_generations SET live = ?, previous = ?, building = null WHERE projection = ?",
            self.keyspace
        );
        self.session
            .query_unpaged(update.as_str(), (generation, previous, projection))
            .await
            .map_err(|e| ProjectionError::cql(&update, e))?;
        Ok(())
    }

    /// Forgets the previous generation (after its tables were dropped).
    pub async fn clear_previous(&self, projection: &str) -> Result<(), ProjectionError> {
        let update =
            format!("UPDATE {}.projection_generations SET previous = null WHERE projection = ?", self.keyspace);
        self.session
            .query_unpaged(update.as_str(), (projection,))
            .await
            .map_err(|e| ProjectionError::cql(&update, e))?;
        Ok(())
    }

    /// Drops the tables of a generation that is neither live nor being built.
    pub async fn drop_generation(&self, generation: i32) -> Result<(), ProjectionError> {
        for table in generation::TABLES {
            self.ddl(&format!("DROP TABLE IF EXISTS {}.{table}_g{generation}", self.keyspace)).await?;
        }
        Ok(())
    }

    async fn exec(&self, statement: &PreparedStatement, values: impl SerializeRow) -> Result<(), ProjectionError> {
        let cql = statement.get_statement();
        timed("cql", &operation_of(cql), self.session.execute_unpaged(statement, values))
            .await
            .map_err(|e| ProjectionError::cql(cql, e))?;
        Ok(())
    }

    /// Runs `statement` once per row of `rows` as one unlogged batch (the rows share a
    /// partition: one replica set, no batch log).
    async fn exec_batch(
        &self,
        statement: &PreparedStatement,
        rows: Vec<impl SerializeRow>,
    ) -> Result<(), ProjectionError> {
        let cql = statement.get_statement();
        let mut batch = Batch::new(BatchType::Unlogged);
        for _ in 0..rows.len() {
            batch.append_statement(statement.clone());
        }
        timed("cql", &operation_of(cql), self.session.batch(&batch, rows))
            .await
            .map_err(|e| ProjectionError::cql(cql, e))?;
        Ok(())
    }

    // --- reads ---

    /// Runs a prepared SELECT and decodes every row as `R`.
    async fn select<R>(
        &self,
        statement: &PreparedStatement,
        values: impl SerializeRow,
    ) -> Result<Vec<R>, ProjectionError>
    where
        R: for<'frame, 'metadata> DeserializeRow<'frame, 'metadata>,
    {
        let cql = statement.get_statement();
        let rows = timed("cql", &operation_of(cql), self.session.execute_unpaged(statement, values))
            .await
            .map_err(|e| ProjectionError::cql(cql, e))?
            .into_rows_result()
            .map_err(|e| ProjectionError::cql(cql, e))?;
        rows.rows::<R>()
            .map_err(|e| ProjectionError::cql(cql, e))?
            .map(|row| row.map_err(|e| ProjectionError::cql(cql, e)))
            .collect()
    }
}

/// A statement's verb and table, without keyspace and generation ("insert messages"): a
/// metric label of few values.
fn operation_of(cql: &str) -> String {
    let words: Vec<&str> = cql.split_whitespace().collect();
    let verb = words.first().map_or("", |w| w).to_lowercase();
    let after = match verb.as_str() {
        "select" | "delete" => words.iter().position(|w| w.eq_ignore_ascii_case("from")),
        "insert" => words.iter().position(|w| w.eq_ignore_ascii_case("into")),
        _ => Some(0),
    };
    let table = after.and_then(|i| words.get(i + 1)).map_or("", |t| t);
    let table = table.rsplit('.').next().unwrap_or(table);
    let table =
        table.rsplit_once("_g").filter(|(_, n)| n.chars().all(|c| c.is_ascii_digit())).map_or(table, |(t, _)| t);
    format!("{verb} {}", table.trim_matches(|c: char| !c.is_alphanumeric() && c != '_'))
}

#[cfg(test)]
mod tests {
    use super::operation_of;

    #[test]
    fn a_statement_is_labelled_by_its_verb_and_table() {
        assert_eq!(operation_of("INSERT INTO parley.messages_g3 (a, b) VALUES (?, ?)"), "insert messages");
        assert_eq!(
            operation_of("SELECT x FROM parley.conversations_by_user_g1 WHERE user_id = ?"),
            "select conversations_by_user"
        );
        assert_eq!(
            operation_of("UPDATE parley.conversations_g12 SET title = ? WHERE conversation_id = ?"),
            "update conversations"
        );
        assert_eq!(operation_of("SELECT next FROM progress_g1"), "select progress");
        assert_eq!(operation_of(""), " ");
    }
}
