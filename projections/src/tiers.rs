//! Each user's tier: the lane their new conversations are served in (premium, standard or
//! batch; standard unless an operator set another). Kept in the CQL store beside the
//! budgets, set with `parley tier`.

use std::sync::Arc;

use parley_events::UserId;
use parley_events::lanes::Lane;
use scylla::client::session::Session;
use scylla::statement::prepared::PreparedStatement;

use crate::{ProjectionError, Store};

/// Each user's tier (the lane of their new conversations) in the CQL store.
#[derive(Debug, Clone)]
pub struct TierBook {
    session: Arc<Session>,
    select: PreparedStatement,
    upsert: PreparedStatement,
}

impl TierBook {
    /// Opens the book (creating its table).
    pub async fn open(store: &Store) -> Result<Self, ProjectionError> {
        let ks = store.keyspace();
        let session = store.session();
        let create = format!("CREATE TABLE IF NOT EXISTS {ks}.user_tiers (user_id text PRIMARY KEY, tier text)");
        session.query_unpaged(create.as_str(), ()).await.map_err(|e| ProjectionError::cql(&create, e))?;
        let prepare =
            async |cql: String| session.prepare(cql.as_str()).await.map_err(|e| ProjectionError::cql(&cql, e));
        Ok(Self {
            select: prepare(format!("SELECT tier FROM {ks}.user_tiers WHERE user_id = ?")).await?,
            upsert: prepare(format!("UPDATE {ks}.user_tiers SET tier = ? WHERE user_id = ?")).await?,
            session: session.clone(),
        })
    }

    /// `user`'s tier (standard when none was set, or when the stored one is not a lane).
    pub async fn tier_of(&self, user: &UserId) -> Result<Lane, ProjectionError> {
        let cql = self.select.get_statement();
        let row = self
            .session
            .execute_unpaged(&self.select, (user.as_str(),))
            .await
            .map_err(|e| ProjectionError::cql(cql, e))?
            .into_rows_result()
            .map_err(|e| ProjectionError::cql(cql, e))?
            .maybe_first_row::<(Option<String>,)>()
            .map_err(|e| ProjectionError::cql(cql, e))?;
        Ok(row.and_then(|(tier,)| tier?.parse().ok()).unwrap_or(Lane::Standard))
    }

    /// Sets `user`'s tier.
    pub async fn set(&self, user: &UserId, tier: Lane) -> Result<(), ProjectionError> {
        self.session
            .execute_unpaged(&self.upsert, (tier.as_str(), user.as_str()))
            .await
            .map_err(|e| ProjectionError::cql(self.upsert.get_statement(), e))?;
        Ok(())
    }
}
