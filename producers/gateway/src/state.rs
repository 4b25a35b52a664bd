//! What a gateway's handlers share (`AppState`), what it checks before it connects to
//! anything ([`Credentials`]), and how it fails to start ([`GatewayError`]).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use parley_erasure::request::Erasures;
use parley_eventlog::load::LoadBoard;
use parley_eventlog::secret::{SecretError, secret_from};
use parley_eventlog::{EventLogError, EventProducer, KafkaSettings, Topics};
use parley_events::UserId;
use parley_events::event::now_millis as now_ms;
use parley_events::lanes::{Lane, LaneLayout, LayoutError};
use parley_events::{EventCodec, EventsError, Producer};
use parley_projections::ProjectionError;
use parley_projections::budget::{BudgetLedger, BudgetSettings};
use parley_projections::keys::KeyStore;
use parley_projections::reader::LiveReader;
use parley_projections::replay::LogReader;
use parley_projections::tiers::TierBook;
use parley_retrieval::Retriever;
use thiserror::Error;
use tokio_util::sync::CancellationToken;
use tracing::warn;
use uuid::Uuid;

use crate::adoption::Adopter;
use crate::hub::{ConnectionId, Hub, Outbox};
use crate::identity::{Identity, IdentityError};
use crate::ops;
use crate::protocol::Limits;
use crate::rate::RateLimiter;
use crate::resume::TokenOrder;
use crate::settings::GatewayArgs;
use crate::tls::{Certificate, TlsError};

/// Who writes the gateway's events.
pub const SOURCE: Producer = Producer { name: "parley-gateway", version: env!("CARGO_PKG_VERSION") };

/// What stops a gateway from starting or serving.
#[derive(Debug, Error)]
pub enum GatewayError {
    /// The event log failed.
    #[error(transparent)]
    EventLog(#[from] EventLogError),
    /// The schema registry or the codec failed.
    #[error(transparent)]
    Events(#[from] EventsError),
    /// The address could not be bound.
    #[error("cannot listen on {addr}")]
    Listen {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The HTTP server failed.
    #[error("the server stopped")]
    Serve(#[source] std::io::Error),
    /// The CQL store failed.
    #[error(transparent)]
    Projection(#[from] ProjectionError),
    /// The lane layout names partitions the topic lacks.
    #[error("--lanes does not fit the events topic")]
    Lanes(#[from] LayoutError),
    /// A secret file could not be read.
    #[error(transparent)]
    Secret(#[from] SecretError),
    /// JWT mode could not start.
    #[error(transparent)]
    Identity(#[from] IdentityError),
    /// The certificate could not be loaded.
    #[error(transparent)]
    Tls(#[from] TlsError),
}

/// What every handler of a gateway shares: the hub, the log, the store and the settings.
pub(crate) struct AppState {
    /// People's data keys: sealed token deltas are opened with them (none: no master key).
    pub(crate) keys: Option<KeyStore>,
    pub(crate) hub: Arc<Hub>,
    /// Where `DELETE /api/me` asks for an erasure and waits for it.
    pub(crate) erasures: Erasures,
    /// For read-backs of the tokens topic (a resumed answer).
    pub(crate) kafka: KafkaSettings,
    pub(crate) codec: Arc<EventCodec>,
    pub(crate) limits: Limits,
    /// Rate limits, fed from the log by [`rate_feed`].
    pub(crate) rate: Arc<Mutex<RateLimiter>>,
    /// The token budget ledger and the default budgets.
    pub(crate) budget: (BudgetLedger, BudgetSettings),
    /// The inference instances' queue ages, fed by [`load::follow`].
    pub(crate) load: Arc<Mutex<LoadBoard>>,
    pub(crate) shed_queue_age: Duration,
    pub(crate) cancel_after_disconnect: Duration,
    pub(crate) allowed_origins: Vec<String>,
    /// Open sockets per user, against `max_sockets_per_user`.
    pub(crate) sockets: Mutex<HashMap<UserId, u32>>,
    pub(crate) max_sockets_per_user: u32,
    pub(crate) identity: Identity,
    /// The metrics the operations page charts: this process's, or the fleet's from a
    /// Prometheus (its URL, and a client with a timeout).
    pub(crate) ops_history: Arc<Mutex<ops::History>>,
    pub(crate) ops_prometheus: Option<(String, reqwest::Client)>,
    pub(crate) reader: Arc<LiveReader>,
    pub(crate) read_wait: Duration,
    pub(crate) retriever: Option<Retriever>,
    pub(crate) producer: EventProducer,
    /// Takes over conversations this instance does not hold.
    pub(crate) adopter: Adopter,
    /// Reads single events back from the log (the outcome of a resent earlier query).
    pub(crate) log: tokio::sync::Mutex<LogReader>,
    pub(crate) topics: Topics,
    /// Partitions of the events topic: where a conversation's events are.
    pub(crate) event_partitions: i32,
    /// Which partitions serve which lane, and each user's tier (the lane of their new
    /// conversations).
    pub(crate) lanes: LaneLayout,
    pub(crate) tiers: TierBook,
    pub(crate) next_connection: AtomicU64,
}

impl AppState {
    /// When `lane`'s inference queue (any lane's: `None`) is past the shedding threshold:
    /// how long to wait before trying again.
    pub(crate) fn overloaded(&self, lane: Option<Lane>) -> Option<u64> {
        let board = self.load.lock().unwrap_or_else(PoisonError::into_inner);
        board.overloaded(lane.map(Lane::as_str), self.shed_queue_age, now_ms())
    }
}

/// Who may connect and how: checked from the settings alone, before the gateway connects
/// to the log, the store or loads a model, so a bad identity or TLS setting is the first
/// error an operator sees.
#[derive(Debug)]
pub struct Credentials {
    pub(crate) identity: Identity,
    pub(crate) certificate: Option<Certificate>,
}

impl Credentials {
    /// The secret, the identity provider's keys and the certificate `args` name.
    pub async fn load(args: &GatewayArgs, shutdown: &CancellationToken) -> Result<Self, GatewayError> {
        let secret = secret_from("PARLEY_AUTH_SECRET", args.auth_secret_file.as_deref())?;
        let secret = secret.unwrap_or_else(|| {
            if args.jwt.jwks.is_none() {
                warn!("no auth secret (PARLEY_AUTH_SECRET or --auth-secret-file): anonymous tokens are valid for this process only");
            }
            Uuid::new_v4().to_string()
        });
        let identity = Identity::from_settings(&args.jwt, &secret, shutdown).await?;
        let certificate = Certificate::load(&args.tls).await?;
        Ok(Self { identity, certificate })
    }
}

/// One client's socket as its frames' handlers see it.
pub(crate) struct Socket<'a> {
    pub(crate) connection: ConnectionId,
    pub(crate) outbox: &'a Outbox,
    pub(crate) order: &'a Mutex<TokenOrder>,
}
