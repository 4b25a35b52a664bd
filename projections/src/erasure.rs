//! A person's copies in the CQL store purged (the erasure worker's CQL half): every
//! generation's conversations, messages, event locations and cached answers of theirs,
//! their budget, limits and tier rows. Idempotent: a second pass finds nothing and says so.
//! Their data key is destroyed apart ([`crate::keys::KeyStore::destroy`]), first, so
//! whatever a purge misses or a rebuild writes back stays sealed under a key that is gone.

use futures::{StreamExt, TryStreamExt};
use parley_events::{PurgedPlace, UserId};
use scylla::client::session::Session;
use scylla::serialize::row::SerializeRow;
use scylla::statement::prepared::PreparedStatement;
use uuid::Uuid;

use crate::store::CONTEXT;
use crate::{ProjectionError, Store};

/// Conversations purged at once (each is four statements).
const CONCURRENCY: usize = 32;

/// Purges `user`'s rows from every table of the store; returns, per place, how many rows
/// (or conversations) this pass removed.
pub async fn purge_person(store: &Store, user: &UserId) -> Result<Vec<PurgedPlace>, ProjectionError> {
    let session = store.session();
    let ks = store.keyspace();
    let (live, previous, building) = store.generations(CONTEXT).await?;
    let mut counts = Counts::default();
    for generation in [Some(live), previous, building].into_iter().flatten() {
        purge_generation(session, ks, generation, user, &mut counts).await?;
    }
    for (place, table) in
        [("cql:budgets", "token_budget"), ("cql:budgets", "token_budget_limits"), ("cql:tiers", "user_tiers")]
    {
        if table_exists(session, ks, table).await? {
            let rows = count(session, &format!("SELECT user_id FROM {ks}.{table} WHERE user_id = ?"), (user.as_str(),))
                .await?;
            execute(session, &format!("DELETE FROM {ks}.{table} WHERE user_id = ?"), (user.as_str(),)).await?;
            counts.add(place, rows);
        }
    }
    Ok(counts.places)
}

async fn purge_generation(
    session: &Session,
    ks: &str,
    n: i32,
    user: &UserId,
    counts: &mut Counts,
) -> Result<(), ProjectionError> {
    let select_ids = format!("SELECT conversation_id FROM {ks}.conversations_by_user_g{n} WHERE user_id = ?");
    let ids = query_rows::<(Uuid,)>(session, &select_ids, (user.as_str(),)).await?;
    let prepare = async |cql: String| session.prepare(cql.as_str()).await.map_err(|e| ProjectionError::cql(&cql, e));
    let count_messages = prepare(format!("SELECT sequence FROM {ks}.messages_g{n} WHERE conversation_id = ?")).await?;
    let count_locations =
        prepare(format!("SELECT sequence FROM {ks}.event_locations_g{n} WHERE conversation_id = ?")).await?;
    let deletes = [
        prepare(format!("DELETE FROM {ks}.messages_g{n} WHERE conversation_id = ?")).await?,
        prepare(format!("DELETE FROM {ks}.event_locations_g{n} WHERE conversation_id = ?")).await?,
        prepare(format!("DELETE FROM {ks}.conversations_g{n} WHERE conversation_id = ?")).await?,
    ];
    let per_conversation = futures::stream::iter(ids.into_iter().map(|(id,)| {
        let (count_messages, count_locations, deletes) = (&count_messages, &count_locations, &deletes);
        async move {
            let messages = prepared_count(session, count_messages, (id,)).await?;
            let locations = prepared_count(session, count_locations, (id,)).await?;
            for delete in deletes {
                session
                    .execute_unpaged(delete, (id,))
                    .await
                    .map_err(|e| ProjectionError::cql(delete.get_statement(), e))?;
            }
            Ok::<_, ProjectionError>((messages, locations))
        }
    }))
    .buffer_unordered(CONCURRENCY);
    let purged: Vec<(i64, i64)> = per_conversation.try_collect().await?;
    counts.add("cql:conversations", i64::try_from(purged.len()).unwrap_or(i64::MAX));
    counts.add("cql:messages", purged.iter().map(|(m, _)| m).sum());
    counts.add("cql:event_locations", purged.iter().map(|(_, l)| l).sum());
    execute(session, &format!("DELETE FROM {ks}.conversations_by_user_g{n} WHERE user_id = ?"), (user.as_str(),))
        .await?;
    let cached = count(
        session,
        &format!("SELECT query_event_id FROM {ks}.answer_cache_g{n} WHERE user_id = ?"),
        (user.as_str(),),
    )
    .await?;
    execute(session, &format!("DELETE FROM {ks}.answer_cache_g{n} WHERE user_id = ?"), (user.as_str(),)).await?;
    counts.add("cql:answer_cache", cached);
    Ok(())
}

/// Items per place, in the order places were first met.
#[derive(Debug, Default)]
struct Counts {
    places: Vec<PurgedPlace>,
}

impl Counts {
    fn add(&mut self, place: &str, items: i64) {
        match self.places.iter_mut().find(|p| p.place == place) {
            Some(known) => known.items += items,
            None => self.places.push(PurgedPlace { place: place.to_owned(), items }),
        }
    }
}

async fn table_exists(session: &Session, ks: &str, table: &str) -> Result<bool, ProjectionError> {
    const CQL: &str = "SELECT table_name FROM system_schema.tables WHERE keyspace_name = ? AND table_name = ?";
    Ok(count(session, CQL, (ks.to_lowercase(), table)).await? > 0)
}

async fn execute(session: &Session, cql: &str, values: impl SerializeRow) -> Result<(), ProjectionError> {
    session.query_unpaged(cql, values).await.map_err(|e| ProjectionError::cql(cql, e))?;
    Ok(())
}

async fn count(session: &Session, cql: &str, values: impl SerializeRow) -> Result<i64, ProjectionError> {
    let result = session.query_unpaged(cql, values).await.map_err(|e| ProjectionError::cql(cql, e))?;
    let rows = result.into_rows_result().map_err(|e| ProjectionError::cql(cql, e))?.rows_num();
    Ok(i64::try_from(rows).unwrap_or(i64::MAX))
}

async fn prepared_count(
    session: &Session,
    statement: &PreparedStatement,
    values: impl SerializeRow,
) -> Result<i64, ProjectionError> {
    let cql = statement.get_statement();
    let result = session.execute_unpaged(statement, values).await.map_err(|e| ProjectionError::cql(cql, e))?;
    let rows = result.into_rows_result().map_err(|e| ProjectionError::cql(cql, e))?.rows_num();
    Ok(i64::try_from(rows).unwrap_or(i64::MAX))
}

async fn query_rows<R>(session: &Session, cql: &str, values: impl SerializeRow) -> Result<Vec<R>, ProjectionError>
where
    R: for<'frame, 'metadata> scylla::deserialize::row::DeserializeRow<'frame, 'metadata>,
{
    let result = session.query_unpaged(cql, values).await.map_err(|e| ProjectionError::cql(cql, e))?;
    let rows = result.into_rows_result().map_err(|e| ProjectionError::cql(cql, e))?;
    rows.rows::<R>()
        .map_err(|e| ProjectionError::cql(cql, e))?
        .map(|row| row.map_err(|e| ProjectionError::cql(cql, e)))
        .collect()
}
