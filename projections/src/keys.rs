//! The key store: each data subject's data key, wrapped by the key-encryption key
//! ([`KeyWrapper`]), in the CQL store. There because every service already reaches it, it
//! is replicated like the projection, and a key is one small row read once per process and
//! subject (kept in memory after). Erasing a subject deletes its row and records the
//! erasure: from then on its sealed content opens nowhere, and no new key is made for it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use parley_events::conversation::Message;
use parley_events::event::now_millis;
use parley_events::personal::Personal;
use parley_events::sealing::{DataKey, ERASED, KeyWrapper, UNREADABLE, is_sealed};
use parley_events::{ConversationId, EventId, UserId};
use scylla::client::session::Session;
use scylla::response::query_result::QueryRowsResult;
use scylla::serialize::row::SerializeRow;
use scylla::statement::prepared::PreparedStatement;
use scylla::value::{CqlValue, Row};
use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::replay::AuditRecord;
use crate::{ProjectionError, Store};

/// The field a conversation's title is sealed as, bound to the conversation's id.
pub const TITLE: &str = "title";

/// Keys held in memory at most; past that the cache starts over (a miss costs one read).
const CACHED_KEYS: usize = 10_000;

/// A subject's key, as the store knows it.
#[derive(Debug, Clone)]
pub enum SubjectKey {
    /// The key: content sealed under it opens.
    Live(DataKey),
    /// The subject was erased at this time (ms since the epoch): nothing of theirs opens.
    Erased(i64),
    /// No key was ever made: nothing of theirs was sealed.
    None,
}

impl SubjectKey {
    /// The key, when it is live.
    pub fn live(&self) -> Option<&DataKey> {
        match self {
            Self::Live(key) => Some(key),
            Self::Erased(_) | Self::None => None,
        }
    }
}

/// The data keys of every subject, wrapped, in the CQL store.
#[derive(Clone)]
pub struct KeyStore {
    session: Arc<Session>,
    wrapper: Arc<dyn KeyWrapper>,
    cache: Arc<Mutex<HashMap<String, DataKey>>>,
    /// Tells whoever holds a person's plain content in memory that they were erased.
    forgotten: tokio::sync::broadcast::Sender<String>,
    select: PreparedStatement,
    insert: PreparedStatement,
    select_erased: PreparedStatement,
    insert_erased: PreparedStatement,
    delete: PreparedStatement,
}

impl std::fmt::Debug for KeyStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyStore").field("wrapped_by", &self.wrapper.id()).finish_non_exhaustive()
    }
}

impl KeyStore {
    /// Opens the store (creating its tables), wrapping with `wrapper`.
    pub async fn open(store: &Store, wrapper: Arc<dyn KeyWrapper>) -> Result<Self, ProjectionError> {
        let ks = store.keyspace();
        let session = store.session();
        for create in [
            format!(
                "CREATE TABLE IF NOT EXISTS {ks}.data_keys (subject text PRIMARY KEY, wrapped blob, wrapped_by text, \
                 created_at bigint)"
            ),
            format!("CREATE TABLE IF NOT EXISTS {ks}.erased_subjects (subject text PRIMARY KEY, erased_at bigint)"),
        ] {
            session.query_unpaged(create.as_str(), ()).await.map_err(|e| ProjectionError::cql(&create, e))?;
        }
        let prepare =
            async |cql: String| session.prepare(cql.as_str()).await.map_err(|e| ProjectionError::cql(&cql, e));
        Ok(Self {
            select: prepare(format!("SELECT wrapped FROM {ks}.data_keys WHERE subject = ?")).await?,
            // Two processes making a subject's first key at once: the first one's wins.
            insert: prepare(format!(
                "INSERT INTO {ks}.data_keys (subject, wrapped, wrapped_by, created_at) VALUES (?, ?, ?, ?) IF NOT EXISTS"
            ))
            .await?,
            select_erased: prepare(format!("SELECT erased_at FROM {ks}.erased_subjects WHERE subject = ?")).await?,
            insert_erased: prepare(format!("INSERT INTO {ks}.erased_subjects (subject, erased_at) VALUES (?, ?)"))
                .await?,
            delete: prepare(format!("DELETE FROM {ks}.data_keys WHERE subject = ?")).await?,
            session: session.clone(),
            wrapper,
            cache: Arc::new(Mutex::new(HashMap::new())),
            forgotten: tokio::sync::broadcast::channel(64).0,
        })
    }

    /// `subject`'s key for reading.
    pub async fn key(&self, subject: &str) -> Result<SubjectKey, ProjectionError> {
        if let Some(key) = self.cache.lock().unwrap_or_else(PoisonError::into_inner).get(subject) {
            return Ok(SubjectKey::Live(key.clone()));
        }
        if let Some(erased_at) = self.erased_at(subject).await? {
            return Ok(SubjectKey::Erased(erased_at));
        }
        let rows = self.rows(&self.select, (subject,)).await?;
        let Some((Some(wrapped),)) =
            rows.maybe_first_row::<(Option<Vec<u8>>,)>().map_err(|e| self.fail(&self.select, e))?
        else {
            return Ok(SubjectKey::None);
        };
        let key = self
            .wrapper
            .unwrap(subject, &wrapped)
            .map_err(|e| ProjectionError::Corrupt(format!("the data key of {subject} does not unwrap: {e}")))?;
        self.remember(subject, &key);
        Ok(SubjectKey::Live(key))
    }

    /// `subject`'s key for sealing new content: theirs, or a new one. An erased subject gets
    /// none (Err): what they write after an erasure is refused, not sealed under a key
    /// nobody could tell from the destroyed one.
    pub async fn key_for_sealing(&self, subject: &str) -> Result<DataKey, ProjectionError> {
        match self.key(subject).await? {
            SubjectKey::Live(key) => Ok(key),
            SubjectKey::Erased(_) => Err(ProjectionError::Erased(subject.to_owned())),
            SubjectKey::None => {
                let key = DataKey::generate();
                let wrapped = self.wrapper.wrap(subject, &key);
                let values = (subject, wrapped, self.wrapper.id(), now_millis());
                // `[applied]` comes first; when another process won, its row follows.
                let rows = self.rows(&self.insert, values).await?;
                let first = rows.first_row::<Row>().map_err(|e| self.fail(&self.insert, e))?;
                let won = matches!(first.columns.first(), Some(Some(CqlValue::Boolean(true))));
                if won {
                    self.remember(subject, &key);
                    return Ok(key);
                }
                // Another process made it first: use that one.
                match self.key(subject).await? {
                    SubjectKey::Live(key) => Ok(key),
                    _ => Err(ProjectionError::Corrupt(format!("the data key of {subject} vanished while made"))),
                }
            }
        }
    }

    /// What `value`, sealed for `subject` as `field` of `event_id`, holds; None when it does
    /// not open (the subject was erased, or has no key, or the value was altered).
    pub async fn open_sealed(
        &self,
        subject: &str,
        event_id: &EventId,
        field: &str,
        value: &str,
    ) -> Result<Option<String>, ProjectionError> {
        Ok(match self.key(subject).await? {
            SubjectKey::Live(key) => key.open(event_id, field, value).ok(),
            SubjectKey::Erased(_) | SubjectKey::None => None,
        })
    }

    /// Seals `event`'s personal fields under its subject's key (made on first use). An
    /// erased subject's new content is refused ([`ProjectionError::Erased`]).
    pub async fn seal_event<E: Personal>(&self, event: &mut E) -> Result<(), ProjectionError> {
        let Some(subject) = event.subject() else { return Ok(()) };
        if event.is_sealed() {
            return Ok(());
        }
        event.seal_with(&self.key_for_sealing(subject.as_str()).await?);
        Ok(())
    }

    /// Opens `event`'s sealed fields: their text, [`ERASED`] when the subject's key is gone,
    /// [`UNREADABLE`] (and a warning) when a value does
    /// not open with the live key.
    pub async fn open_event<E: Personal>(&self, event: &mut E) -> Result<(), ProjectionError> {
        if !event.is_sealed() {
            return Ok(());
        }
        let Some(subject) = event.subject() else { return Ok(()) };
        let key = self.key(subject.as_str()).await?;
        if let Err(error) = event.open_with(key.live()) {
            warn!(%subject, %error, "a sealed value does not open with its subject's key");
        }
        Ok(())
    }

    /// Opens `event` as [`open_event`](Self::open_event) does, trying again (waits doubling
    /// up to 5 s) while the key store does not answer: a reader never goes on with content
    /// it could not open. False when `shutdown` came first.
    pub async fn open_event_waiting<E: Personal>(&self, event: &mut E, shutdown: &CancellationToken) -> bool {
        let mut delay = Duration::from_millis(100);
        loop {
            match self.open_event(event).await {
                Ok(()) => return true,
                Err(error) => {
                    warn!(%error, ?delay, "the key store did not answer; opening the event again");
                    tokio::select! {
                        () = shutdown.cancelled() => return false,
                        () = tokio::time::sleep(delay) => {}
                    }
                    delay = (delay * 2).min(Duration::from_secs(5));
                }
            }
        }
    }

    /// `value` (a field of `bound_to`, owned by `subject`) opened in place when sealed, as
    /// [`open`](Self::open) does for an event's fields.
    pub async fn open_text(
        &self,
        subject: &UserId,
        bound_to: &(dyn std::fmt::Display + Sync),
        field: &str,
        value: &mut String,
    ) -> Result<(), ProjectionError> {
        if !is_sealed(value) {
            return Ok(());
        }
        *value = match self.key(subject.as_str()).await? {
            SubjectKey::Live(key) => key.open(bound_to, field, value).unwrap_or_else(|error| {
                warn!(%subject, %error, field, "a sealed value does not open with its subject's key");
                UNREADABLE.to_owned()
            }),
            SubjectKey::Erased(_) | SubjectKey::None => ERASED.to_owned(),
        };
        Ok(())
    }

    /// The events of `records` (read back from the log) opened in place.
    pub async fn open_records(&self, records: &mut [AuditRecord]) -> Result<(), ProjectionError> {
        for record in records {
            self.open_event(&mut record.event).await?;
        }
        Ok(())
    }

    /// `messages` of `owner`'s conversation (as the projection keeps them) opened in place.
    pub async fn open_messages(&self, owner: &UserId, messages: &mut [Message]) -> Result<(), ProjectionError> {
        for message in messages {
            self.open_text(owner, &message.event_id, "text", &mut message.text).await?;
        }
        Ok(())
    }

    /// The title of `owner`'s conversation `id` (as the projection keeps it) opened in place.
    pub async fn open_title(
        &self,
        owner: &UserId,
        id: ConversationId,
        title: &mut String,
    ) -> Result<(), ProjectionError> {
        self.open_text(owner, &id, TITLE, title).await
    }

    /// `text` sealed for `field` of `bound_to` under `subject`'s key (made on first use).
    pub async fn seal_text(
        &self,
        subject: &UserId,
        bound_to: &(dyn std::fmt::Display + Sync),
        field: &str,
        text: &str,
    ) -> Result<String, ProjectionError> {
        Ok(self.key_for_sealing(subject.as_str()).await?.seal(bound_to, field, text))
    }

    /// Destroys `subject`'s key and records the erasure (idempotent: the first time stays).
    pub async fn destroy(&self, subject: &str) -> Result<(), ProjectionError> {
        if self.erased_at(subject).await?.is_none() {
            self.exec(&self.insert_erased, (subject, now_millis())).await?;
        }
        self.exec(&self.delete, (subject,)).await?;
        self.cache.lock().unwrap_or_else(PoisonError::into_inner).remove(subject);
        Ok(())
    }

    /// Forgets `subject`'s key held in memory (another process erased them), and tells
    /// every [`Self::forgotten`] receiver.
    pub fn forget(&self, subject: &str) {
        self.cache.lock().unwrap_or_else(PoisonError::into_inner).remove(subject);
        let _ = self.forgotten.send(subject.to_owned()); // no receiver: nothing else holds content
    }

    /// The subjects forgotten from now on: what else this process keeps of them in memory
    /// (inference's kept histories) is dropped on each.
    pub fn forgotten(&self) -> tokio::sync::broadcast::Receiver<String> {
        self.forgotten.subscribe()
    }

    /// When `subject` was erased (ms since the epoch), if they were.
    pub async fn erased_at(&self, subject: &str) -> Result<Option<i64>, ProjectionError> {
        let rows = self.rows(&self.select_erased, (subject,)).await?;
        let row = rows.maybe_first_row::<(Option<i64>,)>().map_err(|e| self.fail(&self.select_erased, e))?;
        Ok(row.and_then(|(at,)| at))
    }

    fn remember(&self, subject: &str, key: &DataKey) {
        let mut cache = self.cache.lock().unwrap_or_else(PoisonError::into_inner);
        if cache.len() >= CACHED_KEYS {
            cache.clear();
        }
        cache.insert(subject.to_owned(), key.clone());
    }

    async fn exec(&self, statement: &PreparedStatement, values: impl SerializeRow) -> Result<(), ProjectionError> {
        self.session.execute_unpaged(statement, values).await.map_err(|e| self.fail(statement, e))?;
        Ok(())
    }

    async fn rows(
        &self,
        statement: &PreparedStatement,
        values: impl SerializeRow,
    ) -> Result<QueryRowsResult, ProjectionError> {
        let result = self.session.execute_unpaged(statement, values).await.map_err(|e| self.fail(statement, e))?;
        result.into_rows_result().map_err(|e| self.fail(statement, e))
    }

    fn fail(&self, statement: &PreparedStatement, error: impl std::fmt::Display) -> ProjectionError {
        ProjectionError::cql(statement.get_statement(), error)
    }
}
