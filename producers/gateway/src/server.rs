//! The gateway as a server: binds everything a gateway needs ([`Gateway::bind`]), routes
//! HTTP and the WebSocket upgrade to their handlers, and serves (HTTPS and WSS when it has a
//! certificate) until shut down.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use axum::Router;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{delete, get, post};
use parley_erasure::request::Erasures;
use parley_eventlog::load::{self, LoadBoard};
use parley_eventlog::{EventProducer, KafkaSettings};
use parley_events::EventCodec;
use parley_events::event::now_millis as now_ms;
use parley_ingest::MAX_DOCUMENT_BYTES;
use parley_projections::Store;
use parley_projections::budget::{BudgetLedger, BudgetSettings};
use parley_projections::keys::KeyStore;
use parley_projections::reader::LiveReader;
use parley_projections::replay::LogReader;
use parley_projections::tiers::TierBook;
use parley_retrieval::Retriever;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::adoption::Adopter;
use crate::api::ApiError;
use crate::hub::Hub;
use crate::origin;
use crate::protocol::Limits;
use crate::rate::RateLimiter;
use crate::recent::Recent;
use crate::settings::GatewayArgs;
use crate::socket::upgrade;
use crate::state::{AppState, Credentials, GatewayError, SOURCE};
use crate::tls::Certificate;
use crate::{answers, erasure, knowledge, metrics, ops, query, rate_feed};

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

impl Gateway {
    /// Binds the gateway's address and connects it to the log, the registry and the store.
    #[allow(clippy::too_many_arguments)] // one per edge: log, registry, settings, identity, budgets, store, vectors, keys, stop
    pub async fn bind(
        kafka: &KafkaSettings,
        registry_url: &str,
        args: &GatewayArgs,
        credentials: Credentials,
        budgets: BudgetSettings,
        store: Store,
        retriever: Option<Retriever>,
        keys: Option<KeyStore>,
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
        kafka.lanes.check(event_partitions)?;
        let answers = tokio::spawn(answers::run(
            consumer,
            topics.clone(),
            codec.clone(),
            hub.clone(),
            recent.clone(),
            keys.clone(),
            shutdown.clone(),
        ));
        // A person waits on each append's acknowledgement (their question's `ack`): it goes
        // out at once; what piles up while a request is in flight still shares one.
        let producer = EventProducer::new(kafka.client_config().set("linger.ms", "0").clone(), codec.clone())?;
        let erasures = Erasures::new(kafka, producer.clone(), SOURCE);
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
            keys,
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
            erasures,
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
            .route("/api/me", delete(erasure::erase_me))
            .route("/api/search", get(knowledge::search))
            .layer(middleware::from_fn_with_state(state.clone(), check_origin))
            .with_state(state);
        let listener = TcpListener::bind(args.listen)
            .await
            .map_err(|source| GatewayError::Listen { addr: args.listen, source })?;
        let tls_reload_check = args.tls.tls_reload_check;
        Ok(Self { listener, router, answers, rate_feed, load_feed, shutdown, certificate, tls_reload_check })
    }

    /// The address it listens on.
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
            ApiError::new(StatusCode::BAD_GATEWAY, "prometheus_unavailable", message).into_response()
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
        let refusal = ApiError::new(
            StatusCode::NOT_FOUND,
            "anonymous_sessions_off",
            "this gateway takes tokens from the identity provider, not anonymous sessions",
        );
        return refusal.into_response();
    };
    let (user_id, token) = signer.issue();
    axum::Json(Session { user_id, token }).into_response()
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
