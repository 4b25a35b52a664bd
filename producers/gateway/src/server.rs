//! HTTP and WebSocket front door: the chat page, anonymous sessions, and the socket that
//! turns queries into events and pushes answers back.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::{DefaultBodyLimit, Query, Request, State};
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{delete, get, post};
use clap::Args;
use futures::{SinkExt, StreamExt};
use parley_eventlog::LogPosition;
use parley_eventlog::consumer::read_back;
use parley_eventlog::load::{self, LoadBoard};
use parley_eventlog::partitioner::partition_for_key;
use parley_eventlog::secret::{SecretError, secret_from};
use parley_eventlog::settings::parse_duration;
use parley_eventlog::trace::traceparent_of;
use parley_eventlog::{EventLogError, EventProducer, KafkaSettings, Topics};
use parley_events::event::now_millis as now_ms;
use parley_events::lanes::{Lane, LaneLayout};
use parley_events::turn::STARTED_SEQUENCE;
use parley_events::{
    ConversationStarted, Envelope, EventCodec, EventsError, LLMTokenDelta, Producer, TurnCancelRequested,
    UserQueryReceived,
};
use parley_ingest::MAX_DOCUMENT_BYTES;
use parley_projections::budget::{BudgetLedger, BudgetSettings, Reserved};
use parley_projections::reader::{Freshness, LiveReader};
use parley_projections::replay::LogReader;
use parley_projections::store::EventLocation;
use parley_projections::tiers::TierBook;
use parley_projections::{ProjectionError, Store};
use parley_retrieval::Retriever;
use rdkafka::Message as _;
use serde::Deserialize;
use thiserror::Error;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::field::Empty;
use tracing::{Instrument, info, info_span, warn};
use uuid::Uuid;

use crate::adoption::{Adopted, Adopter};
use crate::hub::{Admission, CancelTarget, ConnectionId, DuplicateOutcome, Hub, Outbox, Refusal, new_conversation_id};
use crate::identity::{Identity, IdentityError, JwtSettings};
use crate::origin;
use crate::protocol::{
    ClientFrame, ErrorCode, Limits, PROTOCOL_VERSION, Rejection, ServerFrame, parse_frame, validate_query,
};
use crate::rate::{RateLimiter, RateSettings};
use crate::recent::Recent;
use crate::resume::TokenOrder;
use crate::tls::{Certificate, TlsError, TlsSettings};
use crate::{answers, knowledge, metrics, ops, query, rate_feed};

pub const SOURCE: Producer = Producer { name: "parley-gateway", version: env!("CARGO_PKG_VERSION") };

/// Frames above this size are refused by the WebSocket layer itself (close code 1009);
/// frames between the protocol limit and this one get an error frame and the socket lives.
pub const TRANSPORT_FRAME_LIMIT: usize = 1024 * 1024;

/// Initial read buffer of a socket.
const SOCKET_READ_BUFFER: usize = 4 * 1024;

/// Frames queued per socket; a client that stops reading stops receiving.
const OUTBOX_CAPACITY: usize = 1024;

/// Options of `parley gateway`.
#[derive(Debug, Clone, Args)]
pub struct GatewayArgs {
    /// Address to serve the chat page, the HTTP API and the WebSocket on.
    #[arg(long, env = "PARLEY_GATEWAY_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,

    /// Largest accepted WebSocket frame, in bytes.
    #[arg(long, env = "PARLEY_MAX_FRAME_BYTES", default_value_t = 65_536,
          value_parser = clap::value_parser!(u32).range(256..=1_048_576))]
    pub max_frame_bytes: u32,

    /// Browser origins besides the gateway's own that may open sockets and change state
    /// (`https://app.example.com`; `*`: any); space separated in the environment.
    #[arg(long = "allowed-origin", env = "PARLEY_ALLOWED_ORIGINS", value_delimiter = ' ')]
    pub allowed_origins: Vec<String>,

    /// Sockets one user may hold open on this instance at once (tabs, devices).
    #[arg(long, env = "PARLEY_MAX_SOCKETS_PER_USER", default_value_t = 16,
          value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub max_sockets_per_user: u32,

    /// Longest accepted question, in characters.
    #[arg(long, env = "PARLEY_MAX_TEXT_CHARS", default_value_t = 8_000,
          value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub max_text_chars: u32,

    /// Longest time a read with `after=<position>` waits for the projection.
    #[arg(long, env = "PARLEY_READ_WAIT", default_value = "2s", value_parser = parse_duration)]
    pub read_wait: Duration,

    /// File holding the secret that signs anonymous users' tokens (readable by its owner
    /// only); give every instance the same one. The secret may instead come from the
    /// environment variable PARLEY_AUTH_SECRET, never from an argument (every local user
    /// can read a process's arguments). Neither: random per process (tokens then die with
    /// the process).
    #[arg(long, env = "PARLEY_AUTH_SECRET_FILE")]
    pub auth_secret_file: Option<PathBuf>,

    #[command(flatten)]
    pub jwt: JwtSettings,

    #[command(flatten)]
    pub tls: TlsSettings,

    #[command(flatten)]
    pub rates: RateSettings,

    /// Refuse new turns (`overloaded`) and documents (429) while an inference instance's
    /// oldest waiting query has waited longer than this (0: never).
    #[arg(long, env = "PARLEY_SHED_QUEUE_AGE", default_value = "10s", value_parser = parse_duration)]
    pub shed_queue_age: Duration,

    /// Stop an answer once no socket on this instance has followed it for this long after
    /// the last one closed (0: never; disconnecting does not cancel). A client that comes
    /// back on another instance within the time is not seen here.
    #[arg(long, env = "PARLEY_CANCEL_AFTER_DISCONNECT", default_value = "0s", value_parser = parse_duration)]
    pub cancel_after_disconnect: Duration,

    /// A Prometheus that scrapes every Parley service: the operations page (`/ops`) then
    /// charts the fleet from it, instead of this process's own metrics.
    #[arg(long, env = "PARLEY_OPS_PROMETHEUS_URL")]
    pub ops_prometheus_url: Option<String>,

    /// Forget a conversation that no socket here follows and whose turn is closed after it
    /// was idle this long (memory stays bounded under a crowd; its next use reads it back
    /// from the projection).
    #[arg(long, env = "PARLEY_HUB_IDLE", default_value = "10m", value_parser = parse_duration)]
    pub hub_idle: Duration,

    /// Conversation events per partition this gateway keeps that the projection has not
    /// applied yet (new and resent turns are told apart from them without waiting for the
    /// projection; past this many, an adoption in that partition waits for it again).
    #[arg(long, env = "PARLEY_UNPROJECTED_WINDOW", default_value_t = 100_000,
          value_parser = clap::value_parser!(u32).range(1..=10_000_000))]
    pub unprojected_window: u32,
}

#[derive(Debug, Error)]
pub enum GatewayError {
    #[error(transparent)]
    EventLog(#[from] EventLogError),
    #[error(transparent)]
    Events(#[from] EventsError),
    #[error("cannot listen on {addr}: {source}")]
    Listen { addr: SocketAddr, source: std::io::Error },
    #[error("server: {0}")]
    Serve(std::io::Error),
    #[error(transparent)]
    Projection(#[from] ProjectionError),
    #[error("--lanes: {0}")]
    Lanes(String),
    #[error(transparent)]
    Secret(#[from] SecretError),
    #[error(transparent)]
    Identity(#[from] IdentityError),
    #[error(transparent)]
    Tls(#[from] TlsError),
}

pub(crate) struct AppState {
    hub: Arc<Hub>,
    /// For read-backs of the tokens topic (a resumed answer).
    kafka: KafkaSettings,
    codec: Arc<EventCodec>,
    limits: Limits,
    /// Rate limits, fed from the log by [`rate_feed`].
    pub(crate) rate: Arc<Mutex<RateLimiter>>,
    /// The token budget ledger and the default budgets.
    budget: (BudgetLedger, BudgetSettings),
    /// The inference instances' queue ages, fed by [`load::follow`].
    load: Arc<Mutex<LoadBoard>>,
    shed_queue_age: Duration,
    cancel_after_disconnect: Duration,
    allowed_origins: Vec<String>,
    /// Open sockets per user, against `max_sockets_per_user`.
    sockets: Mutex<HashMap<String, u32>>,
    max_sockets_per_user: u32,
    pub(crate) identity: Identity,
    /// The metrics the operations page charts: this process's, or the fleet's from a
    /// Prometheus (its URL, and a client with a timeout).
    ops_history: Arc<Mutex<ops::History>>,
    ops_prometheus: Option<(String, reqwest::Client)>,
    pub(crate) reader: Arc<LiveReader>,
    pub(crate) read_wait: Duration,
    pub(crate) retriever: Option<Retriever>,
    pub(crate) producer: EventProducer,
    /// Takes over conversations this instance does not hold.
    adopter: Adopter,
    /// Reads single events back from the log (the outcome of a resent earlier query).
    log: tokio::sync::Mutex<LogReader>,
    pub(crate) topics: Topics,
    /// Partitions of the events topic: where a conversation's events are.
    event_partitions: i32,
    /// Which partitions serve which lane, and each user's tier (the lane of their new
    /// conversations).
    lanes: LaneLayout,
    tiers: TierBook,
    next_connection: AtomicU64,
}

/// A bound, not yet serving gateway: lets callers learn the address before it runs.
pub struct Gateway {
    listener: TcpListener,
    router: Router,
    answers: tokio::task::JoinHandle<()>,
    rate_feed: tokio::task::JoinHandle<()>,
    load_feed: tokio::task::JoinHandle<()>,
    shutdown: CancellationToken,
    /// Served over TLS when given.
    certificate: Option<Certificate>,
    tls_reload_check: Duration,
}

impl std::fmt::Debug for Gateway {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gateway").field("addr", &self.listener.local_addr().ok()).finish_non_exhaustive()
    }
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
    identity: Identity,
    certificate: Option<Certificate>,
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

impl Gateway {
    #[allow(clippy::too_many_arguments)] // one per edge: log, registry, settings, identity, budgets, store, vectors, stop
    pub async fn bind(
        kafka: &KafkaSettings,
        registry_url: &str,
        args: &GatewayArgs,
        credentials: Credentials,
        budgets: BudgetSettings,
        store: Store,
        retriever: Option<Retriever>,
        shutdown: CancellationToken,
    ) -> Result<Self, GatewayError> {
        let topics = kafka.topics();
        // Always on: a user's own budget holds whatever the defaults are.
        let budget = (BudgetLedger::open(&store).await?, budgets);
        let tiers = TierBook::open(&store).await?;
        let reader = Arc::new(LiveReader::new(store).await?);
        let codec = Arc::new(EventCodec::new(registry_url)?);
        let hub = Arc::new(Hub::new(&topics.events));
        let recent = Arc::new(Recent::new(args.unprojected_window as usize));
        let applied = reader.store().progress(&*reader.generation().await?, &topics.events).await?;
        let (consumer, event_partitions) =
            answers::listener(kafka, &topics, &applied, &recent, args.unprojected_window as usize)?;
        kafka.lanes.check(event_partitions).map_err(GatewayError::Lanes)?;
        let answers = tokio::spawn(answers::run(
            consumer,
            topics.clone(),
            codec.clone(),
            hub.clone(),
            recent.clone(),
            shutdown.clone(),
        ));
        let producer = EventProducer::new(kafka.client_config(), codec.clone())?;
        let adopter = Adopter {
            hub: hub.clone(),
            recent,
            reader: reader.clone(),
            producer: producer.clone(),
            topic: topics.events.clone(),
            partitions: event_partitions,
            wait: args.read_wait,
        };
        tokio::spawn(adopter.clone().prune_applied(shutdown.clone()));
        tokio::spawn(forget_idle(hub.clone(), args.hub_idle, shutdown.clone()));
        let rate = Arc::new(Mutex::new(RateLimiter::new(args.rates, now_ms())));
        let rate_feed = tokio::spawn(rate_feed::run(
            rate_feed::follower(kafka, &topics)?,
            topics.documents.clone(),
            codec.clone(),
            rate.clone(),
            shutdown.clone(),
        ));
        let Credentials { identity, certificate } = credentials;
        metrics::init();
        let ops_history = Arc::new(Mutex::new(ops::History::default()));
        tokio::spawn(ops::record(ops_history.clone(), shutdown.clone()));
        let load = Arc::new(Mutex::new(LoadBoard::default()));
        let load_feed = tokio::spawn(load::follow(load::follower(kafka)?, load.clone(), shutdown.clone()));
        let state = Arc::new(AppState {
            hub,
            rate,
            budget,
            load,
            shed_queue_age: args.shed_queue_age,
            cancel_after_disconnect: args.cancel_after_disconnect,
            allowed_origins: args.allowed_origins.clone(),
            sockets: Mutex::new(HashMap::new()),
            max_sockets_per_user: args.max_sockets_per_user,
            producer,
            adopter,
            codec,
            kafka: kafka.clone(),
            topics,
            event_partitions,
            lanes: kafka.lanes.clone(),
            tiers,
            log: tokio::sync::Mutex::new(LogReader::new(kafka, registry_url)?),
            limits: Limits {
                max_frame_bytes: args.max_frame_bytes as usize,
                max_text_chars: args.max_text_chars as usize,
            },
            identity,
            ops_history,
            ops_prometheus: args.ops_prometheus_url.as_ref().map(|url| {
                let client = reqwest::Client::builder().timeout(Duration::from_secs(10)).build().unwrap_or_default();
                (url.trim_end_matches('/').to_owned(), client)
            }),
            reader,
            read_wait: args.read_wait,
            retriever,
            next_connection: AtomicU64::new(1),
        });
        let router = Router::new()
            .route("/", get(|| async { Html(include_str!("../static/chat.html")) }))
            .route("/healthz", get(|| async { "ok" }))
            .route("/metrics", get(|| async { ([(header::CONTENT_TYPE, metrics::CONTENT_TYPE)], metrics::render()) }))
            .route("/ops", get(|| async { Html(include_str!("../static/ops.html")) }))
            .route("/ops/series", get(ops_series))
            .route(
                "/ops/uPlot.iife.min.js",
                get(|| async { vendored("text/javascript", include_str!("../static/vendor/uPlot.iife.min.js")) }),
            )
            .route(
                "/ops/uPlot.min.css",
                get(|| async { vendored("text/css", include_str!("../static/vendor/uPlot.min.css")) }),
            )
            .route("/api/session", post(new_session))
            .route("/ws", get(upgrade))
            .route("/api/conversations", get(query::conversations))
            .route("/api/conversations/{id}", get(query::conversation))
            .route("/api/conversations/{id}/cancel", post(query::cancel))
            .route(
                "/api/documents",
                post(knowledge::submit_document)
                    .layer(DefaultBodyLimit::max(MAX_DOCUMENT_BYTES + 64 * 1024))
                    .get(knowledge::list_documents),
            )
            .route("/api/documents/{id}", delete(knowledge::delete_document))
            .route("/api/search", get(knowledge::search))
            .layer(middleware::from_fn_with_state(state.clone(), check_origin))
            .with_state(state);
        let listener = TcpListener::bind(args.listen)
            .await
            .map_err(|source| GatewayError::Listen { addr: args.listen, source })?;
        let tls_reload_check = args.tls.tls_reload_check;
        Ok(Self { listener, router, answers, rate_feed, load_feed, shutdown, certificate, tls_reload_check })
    }

    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.listener.local_addr().ok()
    }

    /// Serves (HTTPS and WSS when it has a certificate) until the shutdown token is cancelled.
    pub async fn serve(self) -> Result<(), GatewayError> {
        let shutdown = self.shutdown.clone();
        let addr = self.local_addr();
        let result = match self.certificate {
            None => {
                info!(?addr, "gateway serving (plain HTTP: TLS is the ingress's, or not there)");
                axum::serve(self.listener, self.router)
                    .with_graceful_shutdown(async move { shutdown.cancelled().await })
                    .await
            }
            Some(certificate) => {
                info!(?addr, "gateway serving HTTPS and WSS");
                let handle = axum_server::Handle::new();
                tokio::spawn(certificate.clone().watch(self.tls_reload_check, shutdown.clone()));
                tokio::spawn({
                    let handle = handle.clone();
                    async move {
                        shutdown.cancelled().await;
                        handle.graceful_shutdown(Some(Duration::from_secs(5)));
                    }
                });
                let listener = self.listener.into_std().map_err(GatewayError::Serve)?;
                axum_server::from_tcp_rustls(listener, certificate.config)
                    .map_err(GatewayError::Serve)?
                    .handle(handle)
                    .serve(self.router.into_make_service())
                    .await
            }
        }
        .map_err(GatewayError::Serve);
        self.shutdown.cancel();
        let _ = self.answers.await;
        let _ = self.rate_feed.await;
        let _ = self.load_feed.await;
        result
    }
}

/// The operations page's data: the last half hour of the fleet's metrics from Prometheus,
/// or of this process's.
async fn ops_series(State(state): State<Arc<AppState>>) -> Response {
    let Some((url, client)) = &state.ops_prometheus else {
        return axum::Json(state.ops_history.lock().unwrap_or_else(PoisonError::into_inner).series()).into_response();
    };
    match ops::fleet_series(client, url).await {
        Ok(series) => axum::Json(series).into_response(),
        Err(error) => {
            warn!(%error, "the operations page's Prometheus did not answer");
            let message = format!("Prometheus at {url} did not answer: {error}");
            query::ApiError::new(StatusCode::BAD_GATEWAY, "prometheus_unavailable", message).into_response()
        }
    }
}

/// A vendored asset (the operations page's charting library), cached by browsers for a day.
fn vendored(content_type: &'static str, body: &'static str) -> Response {
    ([(header::CONTENT_TYPE, content_type), (header::CACHE_CONTROL, "public, max-age=86400")], body).into_response()
}

#[derive(serde::Serialize)]
struct Session {
    user_id: String,
    token: String,
}

/// A new anonymous user and its token; in JWT mode, 404: users come from the identity
/// provider.
async fn new_session(State(state): State<Arc<AppState>>) -> Response {
    let Some(signer) = state.identity.sessions() else {
        let refusal = query::ApiError::new(
            StatusCode::NOT_FOUND,
            "anonymous_sessions_off",
            "this gateway takes tokens from the identity provider, not anonymous sessions",
        );
        return refusal.into_response();
    };
    let (user_id, token) = signer.issue();
    axum::Json(Session { user_id, token }).into_response()
}

/// The close code of a socket whose token expired (WebSocket private-use range): the
/// client reconnects with a fresh token.
pub const TOKEN_EXPIRED_CLOSE_CODE: u16 = 4001;

/// How long a socket closed for a frame too large stays open for the close frame to reach
/// the client while the rest of its frame still arrives.
const CLOSE_LINGER: Duration = Duration::from_secs(1);

#[derive(Deserialize)]
struct SocketParams {
    token: Option<String>,
}

async fn upgrade(
    State(state): State<Arc<AppState>>,
    Query(params): Query<SocketParams>,
    ws: WebSocketUpgrade,
) -> Response {
    let Some(token) = params.token.as_deref() else {
        return (StatusCode::UNAUTHORIZED, "missing token: /ws?token=<token>").into_response();
    };
    let (user, expires_at) = match state.identity.verify(token).await {
        Ok(verified) => (verified.user_id, verified.expires_at),
        Err(refusal) => return (StatusCode::UNAUTHORIZED, format!("invalid token: {refusal}")).into_response(),
    };
    {
        let mut sockets = state.sockets.lock().unwrap_or_else(PoisonError::into_inner);
        let open = sockets.entry(user.clone()).or_default();
        if *open >= state.max_sockets_per_user {
            let message = format!("{} sockets are open for this user already; close one", *open);
            return (StatusCode::TOO_MANY_REQUESTS, message).into_response();
        }
        *open += 1; // given back when the socket ends (or the upgrade fails)
    }
    let sockets = SocketCount { state: state.clone(), user: user.clone() };
    metrics::socket(1);
    ws.max_message_size(TRANSPORT_FRAME_LIMIT)
        .max_frame_size(TRANSPORT_FRAME_LIMIT)
        // The library's default 128 KiB read buffer per socket made an idle socket cost
        // ~143 KiB; protocol frames are small, and the buffer still grows for a large one.
        .read_buffer_size(SOCKET_READ_BUFFER)
        // Frames are written as they come (each is a token or an answer a person waits for).
        .write_buffer_size(0)
        .on_upgrade(move |socket| async move {
            serve_socket(state, user, expires_at, socket).await;
            drop(sockets);
        })
}

/// One open socket of a user, counted until dropped.
struct SocketCount {
    state: Arc<AppState>,
    user: String,
}

impl Drop for SocketCount {
    fn drop(&mut self) {
        metrics::socket(-1);
        let mut sockets = self.state.sockets.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(open) = sockets.get_mut(&self.user) {
            *open = open.saturating_sub(1);
            if *open == 0 {
                sockets.remove(&self.user);
            }
        }
    }
}

/// Refuses a socket or a state-changing request a browser sends from another site.
async fn check_origin(State(state): State<Arc<AppState>>, request: Request, next: Next) -> Response {
    let refused = {
        let reads = matches!(*request.method(), Method::GET | Method::HEAD) && request.uri().path() != "/ws";
        let value = |name| request.headers().get(name).and_then(|v: &HeaderValue| v.to_str().ok());
        let (origin, host) = (value(header::ORIGIN), value(header::HOST));
        (!reads && !origin::allowed(origin, host, &state.allowed_origins))
            .then(|| origin.unwrap_or_default().to_owned())
    };
    if let Some(origin) = refused {
        warn!(%origin, path = request.uri().path(), "request from another site refused");
        return (StatusCode::FORBIDDEN, "this origin may not use Parley's API").into_response();
    }
    next.run(request).await
}

async fn serve_socket(state: Arc<AppState>, user: String, expires_at: Option<u64>, socket: WebSocket) {
    let connection = state.next_connection.fetch_add(1, Ordering::Relaxed);
    let span = info_span!("gateway.socket", connection, user = %user);
    async {
        let (mut sink, mut stream) = socket.split();
        let (outbox, mut inbox) = mpsc::channel::<ServerFrame>(OUTBOX_CAPACITY);
        // Deltas of a resumed answer come read back and live: sent once each, in order.
        let order = Arc::new(Mutex::new(TokenOrder::default()));
        // How the writer closes the socket: a plain close, or one saying why.
        let (close_with, close_frame) = tokio::sync::oneshot::channel::<CloseFrame>();
        let writer = tokio::spawn({
            let order = order.clone();
            async move {
                'frames: while let Some(frame) = inbox.recv().await {
                    let frames = order.lock().unwrap_or_else(PoisonError::into_inner).admit(frame);
                    for frame in frames {
                        let Ok(text) = serde_json::to_string(&frame) else {
                            continue;
                        };
                        if sink.send(Message::Text(text.into())).await.is_err() {
                            break 'frames;
                        }
                    }
                }
                match close_frame.await {
                    Ok(frame) => drop(sink.send(Message::Close(Some(frame))).await),
                    Err(_) => drop(sink.close().await),
                }
            }
        });
        let _ = outbox
            .send(ServerFrame::Ready {
                user_id: user.clone(),
                protocol_version: PROTOCOL_VERSION,
                max_frame_bytes: state.limits.max_frame_bytes,
                max_text_chars: state.limits.max_text_chars,
            })
            .await;
        let expiry = token_expiry(expires_at);
        tokio::pin!(expiry);
        let mut close_with = Some(close_with);
        let mut lingering = false;
        loop {
            let message = tokio::select! {
                message = stream.next() => message,
                () = &mut expiry => {
                    info!("token expired; closing the socket");
                    let frame = CloseFrame { code: TOKEN_EXPIRED_CLOSE_CODE, reason: "token expired".into() };
                    if let Some(close_with) = close_with.take() {
                        let _ = close_with.send(frame);
                    }
                    break;
                }
            };
            let Some(message) = message else { break };
            match message {
                Ok(Message::Text(text)) => {
                    let socket = Socket { connection, outbox: &outbox, order: &order };
                    handle_text(&state, &user, &socket, text.as_str()).await;
                }
                Ok(Message::Binary(_)) => {
                    let rejection = Rejection {
                        code: ErrorCode::MalformedFrame,
                        message: "binary frames are not part of the protocol; send JSON text".into(),
                        client_message_id: None,
                    };
                    let _ = outbox.send(rejection.into_frame()).await;
                }
                Ok(Message::Close(_)) => break,
                Ok(_) => {} // ping/pong are answered by the WebSocket layer
                Err(error) => {
                    info!(%error, "socket closed by transport error");
                    if let (Some(frame), Some(close_with)) = (too_large(&error), close_with.take()) {
                        let _ = close_with.send(frame);
                        lingering = true;
                    }
                    break;
                }
            }
        }
        let followed = state.hub.disconnect(connection);
        if !state.cancel_after_disconnect.is_zero() && !followed.is_empty() {
            tokio::spawn(cancel_abandoned(state.clone(), followed));
        }
        // The writer closes the socket once every frame is out: with the reason, if any.
        drop(close_with);
        drop(outbox);
        let _ = writer.await;
        if lingering {
            // The client is still sending the frame that was refused: dropping the socket
            // now would reset the connection and lose the close frame on its way to it.
            let _ = tokio::time::timeout(CLOSE_LINGER, async { while stream.next().await.is_some() {} }).await;
        }
    }
    .instrument(span)
    .await;
}

/// The close frame for a transport error that is a frame over [`TRANSPORT_FRAME_LIMIT`]:
/// 1009 (message too big), as the protocol promises.
fn too_large(error: &axum::Error) -> Option<CloseFrame> {
    let source = std::error::Error::source(error)?.downcast_ref::<tungstenite::Error>()?;
    matches!(source, tungstenite::Error::Capacity(_)).then(|| CloseFrame {
        code: tungstenite::protocol::frame::coding::CloseCode::Size.into(),
        reason: format!("frame too large: the limit is {TRANSPORT_FRAME_LIMIT} bytes").into(),
    })
}

/// Resolves when a token that expires at `expires_at` (seconds since the epoch) stops
/// being valid; never for a token without expiry.
async fn token_expiry(expires_at: Option<u64>) {
    let Some(expires_at) = expires_at else { return std::future::pending().await };
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    tokio::time::sleep(Duration::from_secs(expires_at).saturating_sub(now)).await;
}

/// One client's socket as its frames' handlers see it.
struct Socket<'a> {
    connection: ConnectionId,
    outbox: &'a Outbox,
    order: &'a Mutex<TokenOrder>,
}

async fn handle_text(state: &AppState, user: &str, socket: &Socket<'_>, text: &str) {
    let (connection, outbox) = (socket.connection, socket.outbox);
    let parsed = parse_frame(text, state.limits);
    let query = matches!(parsed, Ok(ClientFrame::Query { .. }));
    let frames = match parsed {
        Err(rejection) => vec![rejection.into_frame()],
        Ok(ClientFrame::Subscribe { conversation_id }) => {
            vec![subscribe(state, user, connection, outbox, &conversation_id).await]
        }
        Ok(ClientFrame::Resume { conversation_id, query_event_id, last_index, position }) => {
            let resumed = resume(state, user, socket, &conversation_id, &query_event_id, last_index, position);
            resumed.await.unwrap_or_else(|(code, message)| vec![ServerFrame::error(code, message, None)])
        }
        Ok(ClientFrame::Cancel { conversation_id, query_event_id }) => {
            let frame = match query_event_id.parse::<Uuid>() {
                Err(_) => ServerFrame::error(ErrorCode::InvalidField, "query_event_id is not a UUID".into(), None),
                Ok(query) => match cancel(state, user, &conversation_id, Some(query)).await {
                    Ok(done) => {
                        ServerFrame::CancelResult { conversation_id, query_event_id, status: done.status().to_owned() }
                    }
                    Err((code, message)) => ServerFrame::error(code, message, None),
                },
            };
            vec![frame]
        }
        Ok(ClientFrame::Query { client_message_id, conversation_id, text, lane }) => {
            match validate_query(client_message_id, conversation_id, text, lane, state.limits) {
                Err(rejection) => vec![rejection.into_frame()],
                Ok(query) => accept_query(state, user, connection, outbox, query).await,
            }
        }
    };
    metrics::answered(query, &frames);
    for frame in frames {
        let _ = outbox.send(frame).await;
    }
}

/// What a cancel did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CancelOutcome {
    /// A `TurnCancelRequested` for this query is in the log.
    Requested(Uuid),
    /// The answer exists: nothing to stop.
    AlreadyComplete,
    /// No turn is open.
    NothingToCancel,
}

impl CancelOutcome {
    /// As the protocol and the HTTP API name it.
    pub(crate) fn status(self) -> &'static str {
        match self {
            Self::Requested(_) => "requested",
            Self::AlreadyComplete => "already_complete",
            Self::NothingToCancel => "nothing_to_cancel",
        }
    }
}

/// Asks to stop the answer to `query` (the open turn's: `None`) of a conversation of the
/// user's, held here or adopted from the log: writes a `TurnCancelRequested` for it.
pub(crate) async fn cancel(
    state: &AppState,
    user: &str,
    conversation_id: &str,
    query: Option<Uuid>,
) -> Result<CancelOutcome, (ErrorCode, String)> {
    let id = hold(state, user, conversation_id).await?;
    let unknown = || (ErrorCode::UnknownConversation, unknown_conversation(conversation_id));
    let (query_event_id, sequence) = match state.hub.cancel_target(user, id, query) {
        CancelTarget::Open { query_event_id, sequence } => (query_event_id, sequence),
        CancelTarget::Complete => return Ok(CancelOutcome::AlreadyComplete),
        CancelTarget::NothingOpen => return Ok(CancelOutcome::NothingToCancel),
        CancelTarget::UnknownQuery => {
            return Err((
                ErrorCode::UnknownQuery,
                format!("no query {} in this conversation", query.unwrap_or_default()),
            ));
        }
        CancelTarget::UnknownConversation => return Err(unknown()),
    };
    let span = info_span!(parent: None, "gateway.cancel", conversation_id = %id, %query_event_id, traceparent = Empty);
    let traceparent = traceparent_of(&span, None);
    span.record("traceparent", traceparent.as_str());
    // The query's sequence: a cancel annotates its turn and advances nothing.
    let event = TurnCancelRequested {
        envelope: Envelope::new(Uuid::new_v4(), id, sequence, SOURCE)
            .with_correlation(query_event_id.to_string())
            .with_traceparent(Some(traceparent.clone())),
        query_event_id: query_event_id.to_string(),
        user_id: user.to_owned(),
    };
    let key = id.to_string();
    let written = state.producer.append(&state.topics.events, &key, &event, Some(&traceparent));
    match written.instrument(span).await {
        Ok(_) => Ok(CancelOutcome::Requested(query_event_id)),
        Err(e) => Err((ErrorCode::Unavailable, format!("the event log did not take the cancel; retry: {e}"))),
    }
}

/// After `--cancel-after-disconnect`, stops the answers a closed socket followed that no
/// socket here follows any more.
async fn cancel_abandoned(state: Arc<AppState>, followed: Vec<(Uuid, Uuid, String)>) {
    tokio::time::sleep(state.cancel_after_disconnect).await;
    for (conversation, query, owner) in followed {
        if state.hub.abandoned(conversation, query) {
            match cancel(&state, &owner, &conversation.to_string(), Some(query)).await {
                Ok(_) => info!(%conversation, %query, "answer stopped: no socket followed it"),
                Err((_, message)) => warn!(%conversation, %query, %message, "abandoned answer not stopped"),
            }
        }
    }
}

/// Subscribes the socket to a conversation of the user's, held here or adopted from the
/// log (any instance serves any conversation, also right after it started).
async fn subscribe(
    state: &AppState,
    user: &str,
    connection: ConnectionId,
    outbox: &Outbox,
    conversation_id: &str,
) -> ServerFrame {
    let id = match hold(state, user, conversation_id).await {
        Ok(id) => id,
        Err((code, message)) => return ServerFrame::error(code, message, None),
    };
    if state.hub.subscribe(user, id, connection, outbox) {
        ServerFrame::Subscribed { conversation_id: id.to_string() }
    } else {
        ServerFrame::error(ErrorCode::UnknownConversation, unknown_conversation(conversation_id), None)
    }
}

fn unknown_conversation(conversation_id: &str) -> String {
    format!("no conversation {conversation_id} for this user")
}

/// Makes this instance hold a conversation of `user`'s, adopting it from the log if need
/// be (any instance serves any conversation, also right after it started).
async fn hold(state: &AppState, user: &str, conversation_id: &str) -> Result<Uuid, (ErrorCode, String)> {
    let unknown = || (ErrorCode::UnknownConversation, unknown_conversation(conversation_id));
    let id = conversation_id.parse::<Uuid>().map_err(|_| unknown())?;
    if state.hub.holds(&id) {
        return Ok(id);
    }
    match state.adopter.adopt(user, id, false).instrument(info_span!("gateway.adopt", conversation_id = %id)).await {
        Adopted::Held => Ok(id),
        Adopted::Unknown => Err(unknown()),
        Adopted::Unavailable(message) => Err((ErrorCode::Unavailable, message)),
    }
}

async fn accept_query(
    state: &AppState,
    user: &str,
    connection: ConnectionId,
    outbox: &Outbox,
    query: crate::protocol::ValidQuery,
) -> Vec<ServerFrame> {
    let client_message_id = Some(query.client_message_id.clone());
    let error = |code, message: String| vec![ServerFrame::error(code, message, client_message_id.clone())];
    let requested_new = query.conversation_id.is_none();
    let conversation_id = match query.conversation_id {
        Some(id) => id,
        None => match lane_of_new_conversation(state, user, query.lane).await {
            Ok(lane) => new_conversation_id(user, &query.client_message_id, lane, &state.lanes, state.event_partitions),
            Err(e) => return error(ErrorCode::Unavailable, format!("the user's tier could not be read: {e}")),
        },
    };
    let admit = || state.hub.admit(user, conversation_id, &query.client_message_id, connection, outbox);
    let mut admission = admit();
    if admission == Err(Refusal::NotHeld) {
        let adopting = info_span!("gateway.adopt", %conversation_id);
        match state.adopter.adopt(user, conversation_id, requested_new).instrument(adopting).await {
            Adopted::Held => admission = admit(),
            Adopted::Unknown => admission = Err(Refusal::UnknownConversation),
            Adopted::Unavailable(message) => return error(ErrorCode::Unavailable, message),
        }
    }
    let (conversation_id, query_id, sequence, new_conversation) = match admission {
        Ok(Admission::Accepted { conversation_id, query_id, sequence, new_conversation }) => {
            (conversation_id, query_id, sequence, new_conversation)
        }
        Ok(Admission::Duplicate { ack, outcome }) => return duplicate_frames(state, ack, outcome).await,
        Err(Refusal::UnknownConversation | Refusal::NotHeld) => {
            return error(ErrorCode::UnknownConversation, "no such conversation for this user".into());
        }
        Err(Refusal::TurnInProgress) => {
            return error(ErrorCode::TurnInProgress, "the previous question has no answer yet".into());
        }
    };
    // Shedding, rate limits and budgets apply to new turns only: a resent one (a
    // duplicate) was admitted before.
    if let Err(refused) = admission_control(state, user, conversation_id, query_id, &query.text).await {
        state.hub.release(conversation_id, sequence);
        return vec![ServerFrame::Error {
            code: refused.code,
            message: refused.message,
            client_message_id,
            retry_after_ms: refused.retry_after_ms,
            resets_at: refused.resets_at,
        }];
    }
    // A root span: each turn is its own trace, not part of the socket's lifetime.
    let span = info_span!(parent: None, "gateway.query", %conversation_id, %query_id, sequence, traceparent = Empty);
    let traceparent = traceparent_of(&span, None);
    span.record("traceparent", traceparent.as_str());
    let event = UserQueryReceived {
        envelope: Envelope::new(query_id, conversation_id, sequence, SOURCE)
            .with_traceparent(Some(traceparent.clone())),
        user_id: user.to_owned(),
        client_message_id: query.client_message_id.clone(),
        text: query.text.clone(),
    };
    let written = async {
        if new_conversation {
            let started = ConversationStarted {
                envelope: Envelope::new(Uuid::new_v4(), conversation_id, STARTED_SEQUENCE, SOURCE)
                    .with_correlation(query_id.to_string())
                    .with_traceparent(Some(traceparent.clone())),
                user_id: user.to_owned(),
            };
            state
                .producer
                .append(&state.topics.events, &conversation_id.to_string(), &started, Some(&traceparent))
                .await?;
        }
        state.producer.append(&state.topics.events, &conversation_id.to_string(), &event, Some(&traceparent)).await
    }
    .instrument(span)
    .await;
    match written {
        Ok(position) => {
            let ack = ServerFrame::Ack {
                client_message_id: query.client_message_id.clone(),
                conversation_id: conversation_id.to_string(),
                event_id: query_id.to_string(),
                sequence,
                position: position.to_string(),
                duplicate: false,
            };
            let other_tabs = state.hub.record_written(conversation_id, query_id, sequence, &position, connection);
            let question = answers::question_frame(&event);
            for outbox in other_tabs {
                let _ = outbox.try_send(question.clone());
            }
            vec![ack]
        }
        Err(e) => {
            warn!(error = %e, %conversation_id, "query not written");
            state.hub.release(conversation_id, sequence);
            state.rate.lock().unwrap_or_else(PoisonError::into_inner).refund(user, &query_id.to_string(), now_ms());
            if let Err(error) = state.budget.0.settle(user, &query_id.to_string(), 0).await {
                warn!(%error, %query_id, "the reservation of an unwritten query was not released");
            }
            error(ErrorCode::Unavailable, format!("the event log did not take the query; nothing was written: {e}"))
        }
    }
}

/// Why admission control refused a new turn (nothing of it was charged or written).
struct Refused {
    code: ErrorCode,
    message: String,
    retry_after_ms: Option<u64>,
    resets_at: Option<String>,
}

/// The lane a new conversation of `user`'s is served in: their tier, or the lower lane the
/// client asked for (never a higher one).
async fn lane_of_new_conversation(state: &AppState, user: &str, asked: Option<Lane>) -> Result<Lane, ProjectionError> {
    if state.lanes.is_single_lane() {
        return Ok(Lane::Standard);
    }
    let tier = state.tiers.tier_of(user).await?;
    Ok(asked.map_or(tier, |asked| asked.max(tier)))
}

/// Load shedding, then rate limits, then the token budget reservation: the first that
/// refuses decides, and what the earlier ones charged is given back. Shedding comes first
/// so a shed turn costs the user nothing.
async fn admission_control(
    state: &AppState,
    user: &str,
    conversation_id: Uuid,
    query_id: Uuid,
    text: &str,
) -> Result<(), Refused> {
    let partition = partition_for_key(conversation_id.to_string().as_bytes(), state.event_partitions);
    if let Some(retry_after_ms) = state.overloaded(Some(state.lanes.lane_of(partition))) {
        let seconds = retry_after_ms.div_ceil(1000);
        return Err(Refused {
            code: ErrorCode::Overloaded,
            message: format!("Parley has more questions than it can answer right now; try again in {seconds} s"),
            retry_after_ms: Some(retry_after_ms),
            resets_at: None,
        });
    }
    let query_id = query_id.to_string();
    let rate = || state.rate.lock().unwrap_or_else(PoisonError::into_inner);
    if let Err(limited) = rate().admit(user, &query_id, now_ms()) {
        let seconds = limited.retry_after_ms.div_ceil(1000);
        return Err(Refused {
            code: ErrorCode::RateLimited,
            message: format!("{}; try again in {seconds} s", limited.limit.describe()),
            retry_after_ms: Some(limited.retry_after_ms),
            resets_at: None,
        });
    }
    let (ledger, budgets) = &state.budget;
    let chars = text.chars().count();
    let refused = match ledger.reserve(budgets, user, &conversation_id.to_string(), &query_id, chars, now_ms()).await {
        Ok(Reserved::Yes) => return Ok(()),
        Ok(Reserved::No(exceeded)) => {
            let resets_at = exceeded.resets_at_ms.map(format_time);
            let when = resets_at.as_ref().map_or(String::new(), |at| format!("; it starts again at {at}"));
            let message = format!("{}{when}", exceeded.describe());
            Refused { code: ErrorCode::BudgetExceeded, message, retry_after_ms: None, resets_at }
        }
        Err(e) => {
            let message = format!("the token budget could not be checked: {e}");
            Refused { code: ErrorCode::Unavailable, message, retry_after_ms: None, resets_at: None }
        }
    };
    rate().refund(user, &query_id, now_ms());
    Err(refused)
}

/// Every so often, forgets the conversations idle for `idle` ([`Hub::evict_idle`]).
async fn forget_idle(hub: Arc<Hub>, idle: Duration, shutdown: CancellationToken) {
    let mut every = tokio::time::interval(idle.clamp(Duration::from_secs(1), Duration::from_secs(60)));
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = every.tick() => metrics::held_conversations(hub.evict_idle(std::time::Instant::now(), idle)),
        }
    }
}

/// The frames a duplicate query gets: its original ack, marked duplicate, then its outcome
/// if it has one (an earlier turn's is read from the log once the projection, which
/// indexes it, has caught up).
async fn duplicate_frames(state: &AppState, ack: Box<ServerFrame>, outcome: DuplicateOutcome) -> Vec<ServerFrame> {
    std::iter::once(*ack).chain(resolve_outcome(state, outcome).await).collect()
}

/// The outcome frame of a turn, when it has one: known here, or read from the log.
async fn resolve_outcome(state: &AppState, outcome: DuplicateOutcome) -> Option<ServerFrame> {
    match outcome {
        DuplicateOutcome::Known(frame) => Some(frame),
        DuplicateOutcome::Pending => None,
        DuplicateOutcome::InProjection { conversation_id, query_id, outcome_sequence, after } => {
            match earlier_outcome(state, conversation_id, query_id, outcome_sequence, &after).await {
                Ok(frame) => frame,
                // The ack alone is still right; the client reads the answer from the history.
                Err(error) => {
                    warn!(%error, "outcome of an earlier query not read");
                    None
                }
            }
        }
    }
}

/// Picks an answer up on this socket after a reconnect: subscribes it to the conversation,
/// then sends the deltas after `last_index`, read back from the tokens topic (from after
/// `position`, else from when the question was asked), while live ones keep coming (the
/// socket's [`TokenOrder`] sends each once, in order), and the answer after them.
async fn resume(
    state: &AppState,
    user: &str,
    socket: &Socket<'_>,
    conversation_id: &str,
    query_event_id: &str,
    last_index: i32,
    position: Option<String>,
) -> Result<Vec<ServerFrame>, (ErrorCode, String)> {
    let subscribed = subscribe(state, user, socket.connection, socket.outbox, conversation_id).await;
    if !matches!(subscribed, ServerFrame::Subscribed { .. }) {
        return Ok(vec![subscribed]);
    }
    let unknown_query = || (ErrorCode::UnknownQuery, format!("no query {query_event_id} in this conversation"));
    let (Ok(conversation), Ok(query)) = (conversation_id.parse::<Uuid>(), query_event_id.parse::<Uuid>()) else {
        return Err(unknown_query());
    };
    let (outcome, asked_at) = state.hub.resume_target(user, conversation, query).ok_or_else(unknown_query)?;
    socket.order.lock().unwrap_or_else(PoisonError::into_inner).resume(query_event_id, last_index);
    let resumed = |status: &str, replay: Vec<ServerFrame>| ServerFrame::Resumed {
        conversation_id: conversation_id.to_owned(),
        query_event_id: query_event_id.to_owned(),
        status: status.to_owned(),
        replay,
    };
    if outcome != DuplicateOutcome::Pending {
        let outcome = resolve_outcome(state, outcome).await;
        return Ok(std::iter::once(resumed("complete", Vec::new())).chain(outcome).collect());
    }
    let unavailable =
        |e: EventLogError| (ErrorCode::Unavailable, format!("the tokens could not be read back; retry: {e}"));
    let partition = partition_for_key(conversation_id.as_bytes(), state.event_partitions);
    let after = position
        .and_then(|p| p.parse::<LogPosition>().ok())
        .filter(|p| p.topic == state.topics.tokens && p.partition == partition);
    // From the client's own last delta (inclusive): its attempt says whether a delta at
    // index 0 read after it is a retried call starting over or one the client has.
    let from = match &after {
        Some(after) => (after.offset, false),
        None => {
            let question = read_back(&state.kafka, &asked_at.topic, asked_at.partition, asked_at.offset, false, 1);
            let written_at =
                question.await.map_err(unavailable)?.and_then(|records| records.first()?.timestamp().to_millis());
            let gone = || (ErrorCode::Unavailable, "the question is not in the log any more".to_owned());
            (written_at.ok_or_else(gone)?, true)
        }
    };
    let tokens = &state.topics.tokens;
    let read = read_back(&state.kafka, tokens, partition, from.0, from.1, usize::MAX).await.map_err(unavailable)?;
    let Some(records) = read else {
        return Ok(vec![resumed("tokens_expired", Vec::new())]);
    };
    let mut replay = Vec::new();
    for record in records {
        let Ok(decoded) = state.codec.decode::<LLMTokenDelta>(record.payload().unwrap_or_default()).await else {
            continue;
        };
        let delta = decoded.event;
        if delta.query_event_id != query_event_id {
            continue;
        }
        if after.as_ref().is_some_and(|after| after.offset == record.offset()) {
            socket.order.lock().unwrap_or_else(PoisonError::into_inner).client_attempt(query_event_id, delta.attempt);
            continue;
        }
        // The socket's order drops what the client has (and deltas of an attempt replaced since).
        let at = LogPosition { topic: tokens.clone(), partition, offset: record.offset() };
        replay.push(ServerFrame::Token {
            conversation_id: delta.conversation_id,
            query_event_id: delta.query_event_id,
            index: delta.index,
            delta: delta.delta,
            attempt: delta.attempt,
            position: Some(at.to_string()),
        });
    }
    Ok(vec![resumed("streaming", replay)])
}

/// The outcome event of an earlier turn, read from the log where the projection's index
/// says it is, as the frame it was first pushed as.
async fn earlier_outcome(
    state: &AppState,
    conversation_id: Uuid,
    query_id: Uuid,
    outcome_sequence: i64,
    after: &LogPosition,
) -> Result<Option<ServerFrame>, ProjectionError> {
    // Read past the projection by this gateway: the outcome's position is known at once.
    let recent = state.adopter.recent.lock().outcome_offset(after.partition, conversation_id, outcome_sequence);
    let locations: Vec<_> = if let Some(offset) = recent {
        vec![EventLocation {
            sequence: outcome_sequence,
            event_id: String::new(),
            event_type: String::new(),
            topic: after.topic.clone(),
            partition: after.partition,
            offset,
        }]
    } else {
        if state.reader.wait_for(after, state.read_wait).await? != Freshness::Applied {
            return Ok(None);
        }
        let generation = state.reader.generation().await?;
        state
            .reader
            .store()
            .locations(&generation, conversation_id)
            .await?
            .into_iter()
            .filter(|l| l.sequence == outcome_sequence)
            .collect()
    };
    if locations.is_empty() {
        return Ok(None); // (an empty index would make the reader scan every partition)
    }
    let (records, _, _) = state.log.lock().await.read(conversation_id, &locations, false).await?;
    let query_event_id = query_id.to_string();
    Ok(records
        .iter()
        .filter_map(|r| answers::outcome_frame(&r.event))
        .find(|frame| matches!(frame, ServerFrame::Answer { query_event_id: q, .. } | ServerFrame::Failed { query_event_id: q, .. } if *q == query_event_id)))
}

/// An instant (ms since the epoch) as RFC 3339 UTC, to the second.
fn format_time(millis: i64) -> String {
    let at = UNIX_EPOCH + Duration::from_millis(u64::try_from(millis).unwrap_or(0));
    humantime::format_rfc3339_seconds(at).to_string()
}
