//! The token budget ledger in the CQL store: reservations at admission, settlement with
//! the model's real usage (rules in [`parley_events::budget`]).
//!
//! One partition per user, one row per budget period (`day:…`, `month:…`,
//! `conversation:…`) holding what is committed (spent + reserved), and one row per turn
//! (`turn:<query id>`) holding its reservation, the periods it is charged to and whether
//! it is settled. Every change is one conditional batch over that partition (a Paxos
//! round; Cassandra and ScyllaDB allow conditions on several rows of one partition), so
//! gateways and inference instances racing for the same budget never both win: the loser
//! reads again and decides again.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use clap::Args;
use parley_events::budget::{BudgetLimits, Exceeded, check, periods, reservation, settled, turn_key};
use parley_events::{ConversationId, EventId, UserId};
use scylla::client::session::Session;
use scylla::statement::Consistency;
use scylla::statement::batch::{Batch, BatchType};
use scylla::statement::prepared::PreparedStatement;
use scylla::value::{CqlValue, Row};

use crate::error::ProjectionError;
use crate::store::Store;

/// Default token budgets (0: none) and what a turn reserves, for the gateway (which
/// reserves at admission) and inference (which checks again and settles). A user's own
/// budgets (`parley budget`) hold whatever the defaults are; defaults are off: an operator
/// sets what their model pool and price allow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Args)]
pub struct BudgetSettings {
    /// Model tokens (prompt + completion) a user may spend per UTC day.
    #[arg(long, global = true, env = "PARLEY_DAILY_TOKEN_BUDGET", default_value_t = 0)]
    pub daily_token_budget: u64,

    /// Model tokens a user may spend per UTC month.
    #[arg(long, global = true, env = "PARLEY_MONTHLY_TOKEN_BUDGET", default_value_t = 0)]
    pub monthly_token_budget: u64,

    /// Model tokens one conversation may spend.
    #[arg(long, global = true, env = "PARLEY_CONVERSATION_TOKEN_BUDGET", default_value_t = 0)]
    pub conversation_token_budget: u64,

    /// What a turn reserves besides its question: the worst case of its prompt's context
    /// and its answer (the context token budget plus the answer's max tokens).
    #[arg(long, global = true, env = "PARLEY_TURN_RESERVE_TOKENS", default_value_t = 2_048)]
    pub turn_reserve_tokens: u64,
}

impl BudgetSettings {
    /// The default budgets these settings give.
    pub fn limits(&self) -> BudgetLimits {
        BudgetLimits {
            daily: self.daily_token_budget,
            monthly: self.monthly_token_budget,
            per_conversation: self.conversation_token_budget,
        }
    }
}

/// A turn's reservation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reserved {
    /// Reserved now, or by an earlier call for the same turn.
    Yes,
    /// It does not: this budget would be exceeded.
    No(Exceeded),
}

/// Tries before a reservation or settlement gives up on a budget others keep changing.
const CAS_ATTEMPTS: usize = 20;

/// How long a user's own budgets are taken from memory before they are read again: a
/// budget an operator sets holds from at most this long after (the read is on every new
/// turn's path).
pub const OWN_LIMITS_TTL: Duration = Duration::from_secs(2);

/// Users whose own budgets are remembered at most (the memory is cleared past it).
const OWN_LIMITS_CACHED: usize = 100_000;

/// A user's own budgets as stored: `None` where the default applies.
type OwnLimits = Option<(Option<i64>, Option<i64>, Option<i64>)>;

/// Token budgets in the CQL store: what each user committed per period, with compare-and-set.
#[derive(Debug, Clone)]
pub struct BudgetLedger {
    session: Arc<Session>,
    own_limits: Arc<Mutex<HashMap<String, (OwnLimits, Instant)>>>,
    select_limits: PreparedStatement,
    upsert_limits: PreparedStatement,
    select: PreparedStatement,
    select_turn: PreparedStatement,
    update: PreparedStatement,
    insert: PreparedStatement,
    insert_turn: PreparedStatement,
    settle_turn: PreparedStatement,
}

impl BudgetLedger {
    /// Opens the ledger (creating its tables).
    pub async fn open(store: &Store) -> Result<Self, ProjectionError> {
        let ks = store.keyspace();
        let session = store.session();
        let create = format!(
            "CREATE TABLE IF NOT EXISTS {ks}.token_budget (user_id text, period text, committed bigint, \
             reserved bigint, periods list<text>, settled boolean, PRIMARY KEY (user_id, period))"
        );
        session.query_unpaged(create.as_str(), ()).await.map_err(|e| ProjectionError::cql(&create, e))?;
        let create = format!(
            "CREATE TABLE IF NOT EXISTS {ks}.token_budget_limits (user_id text PRIMARY KEY, daily bigint, \
             monthly bigint, conversation bigint)"
        );
        session.query_unpaged(create.as_str(), ()).await.map_err(|e| ProjectionError::cql(&create, e))?;
        let prepare = async |cql: String, serial: bool| {
            let mut statement = session.prepare(cql.as_str()).await.map_err(|e| ProjectionError::cql(&cql, e))?;
            if serial {
                // Reads what the last Paxos round decided, not a replica's older value.
                statement.set_consistency(Consistency::Serial);
            }
            Ok::<_, ProjectionError>(statement)
        };
        Ok(Self {
            select_limits: prepare(
                format!("SELECT daily, monthly, conversation FROM {ks}.token_budget_limits WHERE user_id = ?"),
                false,
            )
            .await?,
            upsert_limits: prepare(
                format!(
                    "UPDATE {ks}.token_budget_limits SET daily = ?, monthly = ?, conversation = ? WHERE user_id = ?"
                ),
                false,
            )
            .await?,
            select: prepare(
                format!("SELECT period, committed FROM {ks}.token_budget WHERE user_id = ? AND period IN ?"),
                true,
            )
            .await?,
            select_turn: prepare(
                format!("SELECT reserved, periods, settled FROM {ks}.token_budget WHERE user_id = ? AND period = ?"),
                true,
            )
            .await?,
            update: prepare(
                format!("UPDATE {ks}.token_budget SET committed = ? WHERE user_id = ? AND period = ? IF committed = ?"),
                false,
            )
            .await?,
            insert: prepare(
                format!("INSERT INTO {ks}.token_budget (user_id, period, committed) VALUES (?, ?, ?) IF NOT EXISTS"),
                false,
            )
            .await?,
            insert_turn: prepare(
                format!(
                    "INSERT INTO {ks}.token_budget (user_id, period, reserved, periods, settled) \
                     VALUES (?, ?, ?, ?, false) IF NOT EXISTS"
                ),
                false,
            )
            .await?,
            settle_turn: prepare(
                format!(
                    "UPDATE {ks}.token_budget SET settled = true, committed = ? WHERE user_id = ? AND period = ? \
                     IF settled = false"
                ),
                false,
            )
            .await?,
            session: Arc::clone(session),
            own_limits: Arc::default(),
        })
    }

    /// Reserves what turn `query_id` (of `question_chars`) may spend in each budget of
    /// `user` that is on, or says which budget it does not fit. Idempotent per turn.
    pub async fn reserve(
        &self,
        settings: &BudgetSettings,
        user: &UserId,
        conversation_id: ConversationId,
        query_id: EventId,
        question_chars: usize,
        now_ms: i64,
    ) -> Result<Reserved, ProjectionError> {
        let periods = periods(self.limits_of(user, settings).await?, &conversation_id.to_string(), now_ms);
        let user = user.as_str();
        if periods.is_empty() {
            return Ok(Reserved::Yes);
        }
        let amount = reservation(question_chars, settings.turn_reserve_tokens);
        let turn = turn_key(query_id);
        for _ in 0..CAS_ATTEMPTS {
            let mut keys: Vec<String> = periods.iter().map(|p| p.key.clone()).collect();
            keys.push(turn.clone());
            let committed = self.committed(user, keys).await?;
            if committed.contains_key(&turn) {
                return Ok(Reserved::Yes);
            }
            if let Err(exceeded) = check(&periods, &committed, amount) {
                return Ok(Reserved::No(exceeded));
            }
            let mut batch = Batch::new(BatchType::Logged);
            let mut values: Vec<Vec<CqlValue>> = Vec::new();
            let charged: Vec<String> = periods.iter().map(|p| p.key.clone()).collect();
            self.add_changes(&mut batch, &mut values, user, &charged, &committed, |old| old + amount);
            batch.append_statement(self.insert_turn.clone());
            values.push(vec![
                text(user),
                text(&turn),
                bigint(amount),
                CqlValue::List(periods.iter().map(|p| text(&p.key)).collect()),
            ]);
            if self.applied(&batch, values).await? {
                return Ok(Reserved::Yes);
            }
        }
        Err(ProjectionError::Contention(format!("the token budget of {user}")))
    }

    /// [`Self::settle`], skipped when `user` has no budget at all (own or default): then no
    /// turn of theirs was reserved, and a settlement would cost a Paxos read per turn for
    /// nothing. (A reservation made while they had one, lifted since, stays unsettled in
    /// budgets that no longer limit them.)
    pub async fn settle_if_limited(
        &self,
        settings: &BudgetSettings,
        user: &UserId,
        query_id: EventId,
        used: u64,
    ) -> Result<bool, ProjectionError> {
        if self.limits_of(user, settings).await? == BudgetLimits::default() {
            return Ok(false);
        }
        self.settle(user, query_id, used).await
    }

    /// Replaces turn `query_id`'s reservation with `used` tokens in each budget it was
    /// charged to. False when the turn had no reservation or was settled already (a
    /// re-delivered outcome settles nothing twice).
    pub async fn settle(&self, user: &UserId, query_id: EventId, used: u64) -> Result<bool, ProjectionError> {
        let (user, turn) = (user.as_str(), turn_key(query_id));
        for _ in 0..CAS_ATTEMPTS {
            let statement = &self.select_turn;
            let row = self
                .session
                .execute_unpaged(statement, (user, &turn))
                .await
                .map_err(|e| ProjectionError::cql(statement.get_statement(), e))?
                .into_rows_result()
                .map_err(|e| ProjectionError::cql(statement.get_statement(), e))?
                .maybe_first_row::<(Option<i64>, Option<Vec<String>>, Option<bool>)>()
                .map_err(|e| ProjectionError::cql(statement.get_statement(), e))?;
            let Some((Some(reserved), Some(keys), Some(false))) = row else { return Ok(false) };
            let reserved = u64::try_from(reserved).unwrap_or(0);
            let committed = self.committed(user, keys.clone()).await?;
            let mut batch = Batch::new(BatchType::Logged);
            let mut values: Vec<Vec<CqlValue>> = Vec::new();
            self.add_changes(&mut batch, &mut values, user, &keys, &committed, |old| settled(old, reserved, used));
            batch.append_statement(self.settle_turn.clone());
            values.push(vec![bigint(used), text(user), text(&turn)]);
            if self.applied(&batch, values).await? {
                return Ok(true);
            }
        }
        Err(ProjectionError::Contention(format!("the token budget of {user}")))
    }

    /// `user`'s budgets: their own where an operator set them, else the defaults.
    pub async fn limits_of(&self, user: &UserId, settings: &BudgetSettings) -> Result<BudgetLimits, ProjectionError> {
        let defaults = settings.limits();
        let own = |value: Option<i64>, default: u64| value.map_or(default, |v| u64::try_from(v).unwrap_or(0));
        Ok(match self.own_limits(user.as_str()).await? {
            Some((daily, monthly, conversation)) => BudgetLimits {
                daily: own(daily, defaults.daily),
                monthly: own(monthly, defaults.monthly),
                per_conversation: own(conversation, defaults.per_conversation),
            },
            None => defaults,
        })
    }

    /// `user`'s own budgets as stored, from memory when read within [`OWN_LIMITS_TTL`].
    async fn own_limits(&self, user: &str) -> Result<OwnLimits, ProjectionError> {
        let cache = || self.own_limits.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some((limits, read_at)) = cache().get(user)
            && read_at.elapsed() < OWN_LIMITS_TTL
        {
            return Ok(*limits);
        }
        let statement = &self.select_limits;
        let cql = statement.get_statement();
        let row = self
            .session
            .execute_unpaged(statement, (user,))
            .await
            .map_err(|e| ProjectionError::cql(cql, e))?
            .into_rows_result()
            .map_err(|e| ProjectionError::cql(cql, e))?
            .maybe_first_row::<(Option<i64>, Option<i64>, Option<i64>)>()
            .map_err(|e| ProjectionError::cql(cql, e))?;
        let mut cache = cache();
        if cache.len() >= OWN_LIMITS_CACHED {
            cache.clear();
        }
        cache.insert(user.to_owned(), (row, Instant::now()));
        Ok(row)
    }

    /// Whether `user` has budgets of their own (else the defaults apply).
    pub async fn has_own_limits(&self, user: &UserId) -> Result<bool, ProjectionError> {
        Ok(self.own_limits(user.as_str()).await?.is_some())
    }

    /// Sets `user`'s own budgets (0: unlimited for that user).
    pub async fn set_limits(&self, user: &UserId, limits: BudgetLimits) -> Result<(), ProjectionError> {
        let user = user.as_str();
        let as_cql = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        let values = (as_cql(limits.daily), as_cql(limits.monthly), as_cql(limits.per_conversation), user);
        let statement = &self.upsert_limits;
        self.session
            .execute_unpaged(statement, values)
            .await
            .map_err(|e| ProjectionError::cql(statement.get_statement(), e))?;
        self.own_limits.lock().unwrap_or_else(PoisonError::into_inner).remove(user);
        Ok(())
    }

    /// What each of `keys` has committed (absent: no row yet).
    async fn committed(&self, user: &str, keys: Vec<String>) -> Result<HashMap<String, u64>, ProjectionError> {
        let statement = &self.select;
        let rows = self
            .session
            .execute_unpaged(statement, (user, keys))
            .await
            .map_err(|e| ProjectionError::cql(statement.get_statement(), e))?
            .into_rows_result()
            .map_err(|e| ProjectionError::cql(statement.get_statement(), e))?;
        let mut committed = HashMap::new();
        for row in
            rows.rows::<(String, Option<i64>)>().map_err(|e| ProjectionError::cql(statement.get_statement(), e))?
        {
            let (period, value) = row.map_err(|e| ProjectionError::cql(statement.get_statement(), e))?;
            committed.insert(period, u64::try_from(value.unwrap_or(0)).unwrap_or(0));
        }
        Ok(committed)
    }

    /// Adds to `batch` the change of each period's committed tokens, conditional on the
    /// value read (or on the row still not existing).
    fn add_changes(
        &self,
        batch: &mut Batch,
        values: &mut Vec<Vec<CqlValue>>,
        user: &str,
        periods: &[String],
        committed: &HashMap<String, u64>,
        change: impl Fn(u64) -> u64,
    ) {
        for period in periods {
            match committed.get(period) {
                Some(&old) => {
                    batch.append_statement(self.update.clone());
                    values.push(vec![bigint(change(old)), text(user), text(period), bigint(old)]);
                }
                None => {
                    batch.append_statement(self.insert.clone());
                    values.push(vec![text(user), text(period), bigint(change(0))]);
                }
            }
        }
    }

    /// Runs a conditional batch: whether every condition held (and so it was applied).
    async fn applied(&self, batch: &Batch, values: Vec<Vec<CqlValue>>) -> Result<bool, ProjectionError> {
        const WHAT: &str = "conditional batch on token_budget";
        let result = self.session.batch(batch, values).await.map_err(|e| ProjectionError::cql(WHAT, e))?;
        let rows = result.into_rows_result().map_err(|e| ProjectionError::cql(WHAT, e))?;
        // `[applied]` comes first; a failed condition adds the rows' current values after it.
        let first = rows.first_row::<Row>().map_err(|e| ProjectionError::cql(WHAT, e))?;
        Ok(matches!(first.columns.first(), Some(Some(CqlValue::Boolean(true)))))
    }
}

fn text(value: &str) -> CqlValue {
    CqlValue::Text(value.to_owned())
}

fn bigint(value: u64) -> CqlValue {
    CqlValue::BigInt(i64::try_from(value).unwrap_or(i64::MAX))
}
