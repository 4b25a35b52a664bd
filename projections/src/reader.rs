//! The query side: reads from the live generation, following a switch made by a rebuild
//! within a second, and waits (bounded) for a log position to be applied.

use std::sync::Arc;
use std::time::{Duration, Instant};

use parley_eventlog::LogPosition;
use tokio::sync::Mutex;

use crate::error::ProjectionError;
use crate::store::{CONTEXT, Generation, Store};

/// How often readers look for a new live generation.
const GENERATION_REFRESH: Duration = Duration::from_secs(1);
/// Interval between checks while waiting for a position.
const POSITION_POLL: Duration = Duration::from_millis(20);

/// Reads the live generation of the context projection for the query API and inference.
#[derive(Debug)]
pub struct LiveReader {
    store: Store,
    current: Mutex<(Arc<Generation>, Instant)>,
}

/// Whether the projection has applied a log position.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Freshness {
    /// The projection has applied the position.
    Applied,
    /// Not within the bound: the next offset the projection will apply on that partition.
    Behind {
        /// The next offset it will apply.
        applied_up_to: i64,
    },
}

impl LiveReader {
    /// A reader of `store`'s live generation.
    pub async fn new(store: Store) -> Result<Self, ProjectionError> {
        let generation = Arc::new(Self::load(&store).await?);
        Ok(Self { store, current: Mutex::new((generation, Instant::now())) })
    }

    async fn load(store: &Store) -> Result<Generation, ProjectionError> {
        let (live, _, _) = store.generations(CONTEXT).await?;
        store.generation(live).await
    }

    /// The store it reads.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The live generation's statements.
    pub async fn generation(&self) -> Result<Arc<Generation>, ProjectionError> {
        let mut current = self.current.lock().await;
        if current.1.elapsed() >= GENERATION_REFRESH {
            let (live, _, _) = self.store.generations(CONTEXT).await?;
            if live != current.0.number {
                current.0 = Arc::new(self.store.generation(live).await?);
            }
            current.1 = Instant::now();
        }
        Ok(current.0.clone())
    }

    /// Waits up to `bound` until the live generation has applied `position`.
    pub async fn wait_for(&self, position: &LogPosition, bound: Duration) -> Result<Freshness, ProjectionError> {
        let deadline = Instant::now() + bound;
        loop {
            let generation = self.generation().await?;
            let applied_up_to = self.store.applied(&generation, &position.topic, position.partition).await?;
            if applied_up_to > position.offset {
                return Ok(Freshness::Applied);
            }
            if Instant::now() >= deadline {
                return Ok(Freshness::Behind { applied_up_to });
            }
            tokio::time::sleep(POSITION_POLL).await;
        }
    }
}
