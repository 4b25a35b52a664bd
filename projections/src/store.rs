//! The CQL store of the context projection. Portable CQL only (no Cassandra-only
//! features): it runs on ScyllaDB in production and on Cassandra locally.
//!
//! Every table name carries the projection's generation (`messages_g3`): a rebuild fills
//! a new generation while readers use the live one, readers switch by one row of
//! `projection_generations`, and an old generation is dropped table by table.

use std::sync::Arc;

use clap::Args;
use parley_eventlog::LogPosition;
use parley_eventlog::metrics::timed;
use parley_events::conversation::{Message, MessageKind};
use parley_events::turn::{ConversationHead, OpenQuery};
use parley_events::{ConversationId, EventId, InvalidId, RetrievedContext, UserId};
use scylla::client::session::Session;
use scylla::client::session_builder::SessionBuilder;
use scylla::deserialize::row::DeserializeRow;
use scylla::serialize::row::SerializeRow;
use scylla::statement::prepared::PreparedStatement;
use uuid::Uuid;

use crate::error::ProjectionError;

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

/// A conversation's row of the projection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConversationRow {
    pub conversation_id: ConversationId,
    pub user_id: UserId,
    pub started_at: i64,
    pub updated_at: i64,
    pub last_sequence: i64,
    pub open_query_event_id: Option<EventId>,
    pub title: String,
}

impl ConversationRow {
    /// The writer's view of the conversation (owner, last sequence, open turn).
    pub fn head(&self) -> ConversationHead {
        ConversationHead {
            owner: self.user_id.clone(),
            last_sequence: self.last_sequence,
            open_query: self.open_query_event_id.map(|event_id| OpenQuery {
                event_id,
                sequence: self.last_sequence,
                client_message_id: String::new(),
            }),
        }
    }
}

/// Where one event of a conversation sits in the log (the replay/audit index).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventLocation {
    pub sequence: i64,
    pub event_id: EventId,
    pub event_type: String,
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
}

impl EventLocation {
    /// The record's position in the log.
    pub fn position(&self) -> LogPosition {
        LogPosition { topic: self.topic.clone(), partition: self.partition, offset: self.offset }
    }
}

/// A connected store.
#[derive(Debug, Clone)]
pub struct Store {
    session: Arc<Session>,
    keyspace: String,
}

/// The prepared statements of one generation.
#[derive(Debug)]
pub struct Generation {
    pub number: i32,
    insert_conversation: PreparedStatement,
    insert_by_user: PreparedStatement,
    update_conversation: PreparedStatement,
    insert_message: PreparedStatement,
    insert_location: PreparedStatement,
    upsert_progress: PreparedStatement,
    select_conversation: PreparedStatement,
    select_messages: PreparedStatement,
    select_by_user: PreparedStatement,
    select_by_user_before: PreparedStatement,
    select_locations: PreparedStatement,
    select_progress: PreparedStatement,
}

/// user_id, started_at, updated_at, last_sequence, open_query_event_id, title
type ConversationColumns = (String, i64, i64, i64, Option<String>, Option<String>);

type MessageColumns = (
    i64,
    String,
    String,
    String,
    i64,
    Option<String>,
    Option<String>,
    Option<i32>,
    Option<i32>,
    Option<i64>,
    Option<String>,
    Option<Vec<RetrievedColumns>>,
);

/// One retrieved context of an answer: vector_id, source_kind, source_id, source_event_id,
/// position, score.
type RetrievedColumns = (String, String, String, String, i64, f32);

/// Frozen, so an answer's list is one cell (a non-frozen empty list would be a tombstone
/// on every insert).
const RETRIEVED_TYPE: &str = "frozen<list<frozen<tuple<text, text, text, text, bigint, float>>>>";

impl Store {
    /// Connects and makes sure the keyspace and the generations table exist.
    pub async fn connect(settings: &CqlSettings) -> Result<Self, ProjectionError> {
        let mut builder = SessionBuilder::new();
        for node in settings.nodes.split(',').map(str::trim).filter(|n| !n.is_empty()) {
            builder = builder.known_node(node);
        }
        let session = builder.build().await.map_err(|e| ProjectionError::Connect(e.to_string()))?;
        let store = Self { session: Arc::new(session), keyspace: settings.keyspace.clone() };
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
        for table in TABLES {
            self.ddl(&format!("DROP TABLE IF EXISTS {}.{table}_g{generation}", self.keyspace)).await?;
        }
        Ok(())
    }

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
                 PRIMARY KEY ((conversation_id), sequence))"
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
        ] {
            self.ddl(&statement).await?;
        }
        // Generations created before answers kept their retrieved context.
        self.add_missing_column(&format!("messages_g{n}"), "retrieved", RETRIEVED_TYPE).await
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
                                       prompt_tokens, completion_tokens, llm_latency_ms, error_kind, retrieved";
        Ok(Generation {
            number: n,
            insert_conversation: prepare(format!(
                "INSERT INTO {ks}.conversations_g{n} (conversation_id, user_id, started_at, updated_at, last_sequence, title) \
                 VALUES (?, ?, ?, ?, ?, '')"
            ))
            .await?,
            insert_by_user: prepare(format!(
                "INSERT INTO {ks}.conversations_by_user_g{n} (user_id, started_at, conversation_id, title) VALUES (?, ?, ?, ?)"
            ))
            .await?,
            update_conversation: prepare(format!(
                "UPDATE {ks}.conversations_g{n} SET updated_at = ?, last_sequence = ?, open_query_event_id = ? \
                 WHERE conversation_id = ?"
            ))
            .await?,
            insert_message: prepare(format!("INSERT INTO {ks}.messages_g{n} (conversation_id, {MESSAGE_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)")).await?,
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
        })
    }

    // --- writes (all idempotent upserts) ---

    pub async fn insert_conversation(
        &self,
        g: &Generation,
        id: ConversationId,
        user: &UserId,
        started_at: i64,
    ) -> Result<(), ProjectionError> {
        let (id, user) = (id.uuid(), user.as_str());
        self.exec(&g.insert_conversation, (id, user, started_at, started_at, parley_events::turn::STARTED_SEQUENCE))
            .await?;
        self.exec(&g.insert_by_user, (user, started_at, id, "")).await
    }

    pub async fn set_title(
        &self,
        g: &Generation,
        id: ConversationId,
        user: &UserId,
        started_at: i64,
        title: &str,
    ) -> Result<(), ProjectionError> {
        let (id, user) = (id.uuid(), user.as_str());
        let update =
            format!("UPDATE {}.conversations_g{} SET title = ? WHERE conversation_id = ?", self.keyspace, g.number);
        self.session.query_unpaged(update.as_str(), (title, id)).await.map_err(|e| ProjectionError::cql(&update, e))?;
        self.exec(&g.insert_by_user, (user, started_at, id, title)).await
    }

    pub async fn advance_conversation(
        &self,
        g: &Generation,
        id: ConversationId,
        head: &ConversationHead,
        updated_at: i64,
    ) -> Result<(), ProjectionError> {
        let open = head.open_query.as_ref().map(|q| q.event_id.to_string());
        self.exec(&g.update_conversation, (updated_at, head.last_sequence, open, id.uuid())).await
    }

    pub async fn insert_message(&self, g: &Generation, id: ConversationId, m: &Message) -> Result<(), ProjectionError> {
        let values = (
            id.uuid(),
            m.sequence,
            m.event_id.to_string(),
            m.kind.as_str(),
            &m.text,
            m.occurred_at,
            m.query_event_id.map(|id| id.to_string()),
            &m.model,
            m.prompt_tokens,
            m.completion_tokens,
            m.llm_latency_ms,
            &m.error_kind,
            m.retrieved.iter().map(retrieved_columns).collect::<Vec<_>>(),
        );
        self.exec(&g.insert_message, values).await
    }

    pub async fn insert_location(
        &self,
        g: &Generation,
        id: ConversationId,
        l: &EventLocation,
    ) -> Result<(), ProjectionError> {
        let values = (id.uuid(), l.sequence, l.event_id.to_string(), &l.event_type, &l.topic, l.partition, l.offset);
        self.exec(&g.insert_location, values).await
    }

    pub async fn store_progress(
        &self,
        g: &Generation,
        topic: &str,
        partition: i32,
        next_offset: i64,
    ) -> Result<(), ProjectionError> {
        self.exec(&g.upsert_progress, (topic, partition, next_offset)).await
    }

    async fn exec(&self, statement: &PreparedStatement, values: impl SerializeRow) -> Result<(), ProjectionError> {
        let cql = statement.get_statement();
        timed("cql", &operation_of(cql), self.session.execute_unpaged(statement, values))
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

    pub async fn conversation(
        &self,
        g: &Generation,
        id: ConversationId,
    ) -> Result<Option<ConversationRow>, ProjectionError> {
        let rows: Vec<ConversationColumns> = self.select(&g.select_conversation, (id.uuid(),)).await?;
        rows.into_iter()
            .next()
            .map(|(user_id, started_at, updated_at, last_sequence, open_query_event_id, title)| {
                Ok(ConversationRow {
                    conversation_id: id,
                    user_id: stored_id(&user_id)?,
                    started_at,
                    updated_at,
                    last_sequence,
                    open_query_event_id: open_query_event_id.as_deref().map(stored_id).transpose()?,
                    title: title.unwrap_or_default(),
                })
            })
            .transpose()
    }

    pub async fn messages(&self, g: &Generation, id: ConversationId) -> Result<Vec<Message>, ProjectionError> {
        let rows: Vec<MessageColumns> = self.select(&g.select_messages, (id.uuid(),)).await?;
        rows.into_iter()
            .map(
                |(
                    sequence,
                    event_id,
                    kind,
                    text,
                    occurred_at,
                    query_event_id,
                    model,
                    prompt_tokens,
                    completion_tokens,
                    llm_latency_ms,
                    error_kind,
                    retrieved,
                )| {
                    let kind = MessageKind::parse(&kind)
                        .ok_or_else(|| ProjectionError::Corrupt(format!("message kind {kind:?}")))?;
                    Ok(Message {
                        sequence,
                        event_id: stored_id(&event_id)?,
                        kind,
                        text,
                        occurred_at,
                        query_event_id: query_event_id.as_deref().map(stored_id).transpose()?,
                        model,
                        prompt_tokens,
                        completion_tokens,
                        llm_latency_ms,
                        error_kind,
                        retrieved: retrieved
                            .unwrap_or_default()
                            .into_iter()
                            .map(retrieved_context)
                            .collect::<Result<_, _>>()?,
                    })
                },
            )
            .collect()
    }

    /// A user's conversations, newest first, `limit` at a time; `before` is the
    /// (started_at, conversation_id) of the last one of the previous page.
    pub async fn conversations_of(
        &self,
        g: &Generation,
        user: &UserId,
        before: Option<(i64, ConversationId)>,
        limit: i32,
    ) -> Result<Vec<(i64, ConversationId, String)>, ProjectionError> {
        let user = user.as_str();
        let rows: Vec<(i64, Uuid, Option<String>)> = match before {
            None => self.select(&g.select_by_user, (user, limit)).await?,
            Some((at, id)) => self.select(&g.select_by_user_before, (user, at, id.uuid(), limit)).await?,
        };
        Ok(rows.into_iter().map(|(at, id, title)| (at, id.into(), title.unwrap_or_default())).collect())
    }

    pub async fn locations(&self, g: &Generation, id: ConversationId) -> Result<Vec<EventLocation>, ProjectionError> {
        let rows: Vec<(i64, String, String, String, i32, i64)> = self.select(&g.select_locations, (id.uuid(),)).await?;
        rows.into_iter()
            .map(|(sequence, event_id, event_type, topic, partition, offset)| {
                Ok(EventLocation { sequence, event_id: stored_id(&event_id)?, event_type, topic, partition, offset })
            })
            .collect()
    }

    /// Per partition of `topic`, the next offset this generation will apply.
    pub async fn progress(&self, g: &Generation, topic: &str) -> Result<Vec<(i32, i64)>, ProjectionError> {
        self.select(&g.select_progress, (topic,)).await
    }

    /// The next offset of `partition` of `topic` this generation will apply (0: none yet).
    pub async fn applied(&self, g: &Generation, topic: &str, partition: i32) -> Result<i64, ProjectionError> {
        let progress = self.progress(g, topic).await?;
        Ok(progress.into_iter().find(|(p, _)| *p == partition).map_or(0, |(_, next)| next))
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

/// The tables of one generation, without the `_g<N>` suffix.
const TABLES: [&str; 5] = ["conversations", "conversations_by_user", "messages", "event_locations", "progress"];

fn retrieved_columns(r: &RetrievedContext) -> RetrievedColumns {
    (
        r.vector_id.clone(),
        r.source_kind.clone(),
        r.source_id.clone(),
        r.source_event_id.to_string(),
        r.position,
        r.score,
    )
}

fn retrieved_context(
    (vector_id, source_kind, source_id, source_event_id, position, score): RetrievedColumns,
) -> Result<RetrievedContext, ProjectionError> {
    let source_event_id = stored_id(&source_event_id)?;
    Ok(RetrievedContext { vector_id, source_kind, source_id, source_event_id, position, score })
}

/// An id read back from a row: the projection wrote only valid ids, so a bad one is a
/// corrupt row (never silently skipped).
fn stored_id<T: std::str::FromStr<Err = InvalidId>>(value: &str) -> Result<T, ProjectionError> {
    value.parse().map_err(|e: InvalidId| ProjectionError::Corrupt(e.to_string()))
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
