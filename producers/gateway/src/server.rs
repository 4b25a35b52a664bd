//! HTTP and WebSocket front door: the chat page, anonymous sessions, and the socket that
//! turns queries into events and pushes answers back.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{DefaultBodyLimit, Query, State};
use axum::http::StatusCode;
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{delete, get, post};
use clap::Args;
use futures::{SinkExt, StreamExt};
use parley_eventlog::settings::parse_duration;
use parley_eventlog::trace::traceparent_of;
use parley_eventlog::{EventLogError, EventProducer, KafkaSettings, Topics};
use parley_events::turn::STARTED_SEQUENCE;
use parley_events::{ConversationStarted, Envelope, EventCodec, EventsError, Producer, UserQueryReceived};
use parley_ingest::MAX_DOCUMENT_BYTES;
use parley_projections::reader::LiveReader;
use parley_projections::{ProjectionError, Store};
use parley_retrieval::Retriever;
use serde::Deserialize;
use thiserror::Error;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::field::Empty;
use tracing::{Instrument, info, info_span, warn};
use uuid::Uuid;

use crate::auth::TokenSigner;
use crate::hub::{Admission, ConnectionId, Hub, Outbox, Refusal};
use crate::protocol::{
    ClientFrame, ErrorCode, Limits, PROTOCOL_VERSION, Rejection, ServerFrame, parse_frame, validate_query,
};
use crate::{answers, knowledge, query};

pub const SOURCE: Producer = Producer { name: "parley-gateway", version: env!("CARGO_PKG_VERSION") };

/// Frames above this size are refused by the WebSocket layer itself (close code 1009);
/// frames between the protocol limit and this one get an error frame and the socket lives.
pub const TRANSPORT_FRAME_LIMIT: usize = 1024 * 1024;

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

    /// Longest accepted question, in characters.
    #[arg(long, env = "PARLEY_MAX_TEXT_CHARS", default_value_t = 8_000,
          value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub max_text_chars: u32,

    /// Longest time a read with `after=<position>` waits for the projection.
    #[arg(long, env = "PARLEY_READ_WAIT", default_value = "2s", value_parser = parse_duration)]
    pub read_wait: Duration,

    /// Secret that signs user tokens; give every instance the same one. Default: random per
    /// process (tokens then die with the process).
    #[arg(long, env = "PARLEY_AUTH_SECRET", hide_env_values = true)]
    pub auth_secret: Option<String>,
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
}

pub(crate) struct AppState {
    hub: Arc<Hub>,
    limits: Limits,
    pub(crate) signer: TokenSigner,
    pub(crate) reader: Arc<LiveReader>,
    pub(crate) read_wait: Duration,
    pub(crate) retriever: Option<Retriever>,
    pub(crate) producer: EventProducer,
    pub(crate) topics: Topics,
    next_connection: AtomicU64,
}

/// A bound, not yet serving gateway: lets callers learn the address before it runs.
pub struct Gateway {
    listener: TcpListener,
    router: Router,
    answers: tokio::task::JoinHandle<()>,
    shutdown: CancellationToken,
}

impl std::fmt::Debug for Gateway {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gateway").field("addr", &self.listener.local_addr().ok()).finish_non_exhaustive()
    }
}

impl Gateway {
    pub async fn bind(
        kafka: &KafkaSettings,
        registry_url: &str,
        args: &GatewayArgs,
        store: Store,
        retriever: Option<Retriever>,
        shutdown: CancellationToken,
    ) -> Result<Self, GatewayError> {
        let topics = kafka.topics();
        let reader = Arc::new(LiveReader::new(store).await?);
        let codec = Arc::new(EventCodec::new(registry_url)?);
        let hub = Arc::new(Hub::default());
        let consumer = answers::listener(kafka, &topics)?;
        let answers =
            tokio::spawn(answers::run(consumer, topics.clone(), codec.clone(), hub.clone(), shutdown.clone()));
        let secret = args.auth_secret.clone().unwrap_or_else(|| {
            warn!("no --auth-secret given: user tokens are valid for this process only");
            Uuid::new_v4().to_string()
        });
        let state = Arc::new(AppState {
            hub,
            producer: EventProducer::new(kafka.client_config(), codec)?,
            topics,
            limits: Limits {
                max_frame_bytes: args.max_frame_bytes as usize,
                max_text_chars: args.max_text_chars as usize,
            },
            signer: TokenSigner::new(secret.as_bytes()),
            reader,
            read_wait: args.read_wait,
            retriever,
            next_connection: AtomicU64::new(1),
        });
        let router = Router::new()
            .route("/", get(|| async { Html(include_str!("../static/chat.html")) }))
            .route("/healthz", get(|| async { "ok" }))
            .route("/api/session", post(new_session))
            .route("/ws", get(upgrade))
            .route("/api/conversations", get(query::conversations))
            .route("/api/conversations/{id}", get(query::conversation))
            .route(
                "/api/documents",
                post(knowledge::submit_document)
                    .layer(DefaultBodyLimit::max(MAX_DOCUMENT_BYTES + 64 * 1024))
                    .get(knowledge::list_documents),
            )
            .route("/api/documents/{id}", delete(knowledge::delete_document))
            .route("/api/search", get(knowledge::search))
            .with_state(state);
        let listener = TcpListener::bind(args.listen)
            .await
            .map_err(|source| GatewayError::Listen { addr: args.listen, source })?;
        Ok(Self { listener, router, answers, shutdown })
    }

    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.listener.local_addr().ok()
    }

    /// Serves until the shutdown token is cancelled.
    pub async fn serve(self) -> Result<(), GatewayError> {
        let shutdown = self.shutdown.clone();
        info!(addr = ?self.local_addr(), "gateway serving");
        let result = axum::serve(self.listener, self.router)
            .with_graceful_shutdown(async move { shutdown.cancelled().await })
            .await
            .map_err(GatewayError::Serve);
        self.shutdown.cancel();
        let _ = self.answers.await;
        result
    }
}

#[derive(serde::Serialize)]
struct Session {
    user_id: String,
    token: String,
}

async fn new_session(State(state): State<Arc<AppState>>) -> axum::Json<Session> {
    let (user_id, token) = state.signer.issue();
    axum::Json(Session { user_id, token })
}

#[derive(Deserialize)]
struct SocketParams {
    token: Option<String>,
}

async fn upgrade(
    State(state): State<Arc<AppState>>,
    Query(params): Query<SocketParams>,
    ws: WebSocketUpgrade,
) -> Response {
    let Some(user) = params.token.as_deref().and_then(|t| state.signer.verify(t)) else {
        return (StatusCode::UNAUTHORIZED, "missing or invalid token: POST /api/session for one").into_response();
    };
    ws.max_message_size(TRANSPORT_FRAME_LIMIT)
        .max_frame_size(TRANSPORT_FRAME_LIMIT)
        .on_upgrade(move |socket| serve_socket(state, user, socket))
}

async fn serve_socket(state: Arc<AppState>, user: String, socket: WebSocket) {
    let connection = state.next_connection.fetch_add(1, Ordering::Relaxed);
    let span = info_span!("gateway.socket", connection, user = %user);
    async {
        let (mut sink, mut stream) = socket.split();
        let (outbox, mut inbox) = mpsc::channel::<ServerFrame>(OUTBOX_CAPACITY);
        let writer = tokio::spawn(async move {
            while let Some(frame) = inbox.recv().await {
                let Ok(text) = serde_json::to_string(&frame) else {
                    continue;
                };
                if sink.send(Message::Text(text.into())).await.is_err() {
                    break;
                }
            }
            let _ = sink.close().await;
        });
        let _ = outbox
            .send(ServerFrame::Ready {
                user_id: user.clone(),
                protocol_version: PROTOCOL_VERSION,
                max_frame_bytes: state.limits.max_frame_bytes,
                max_text_chars: state.limits.max_text_chars,
            })
            .await;
        while let Some(message) = stream.next().await {
            match message {
                Ok(Message::Text(text)) => handle_text(&state, &user, connection, &outbox, text.as_str()).await,
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
                    break;
                }
            }
        }
        state.hub.disconnect(connection);
        drop(outbox);
        let _ = writer.await;
    }
    .instrument(span)
    .await;
}

async fn handle_text(state: &AppState, user: &str, connection: ConnectionId, outbox: &Outbox, text: &str) {
    let frames = match parse_frame(text, state.limits) {
        Err(rejection) => vec![rejection.into_frame()],
        Ok(ClientFrame::Subscribe { conversation_id }) => {
            vec![subscribe(state, user, connection, outbox, &conversation_id)]
        }
        Ok(ClientFrame::Query { client_message_id, conversation_id, text }) => {
            match validate_query(client_message_id, conversation_id, text, state.limits) {
                Err(rejection) => vec![rejection.into_frame()],
                Ok(query) => accept_query(state, user, connection, outbox, query).await,
            }
        }
    };
    for frame in frames {
        let _ = outbox.send(frame).await;
    }
}

fn subscribe(
    state: &AppState,
    user: &str,
    connection: ConnectionId,
    outbox: &Outbox,
    conversation_id: &str,
) -> ServerFrame {
    match conversation_id.parse::<Uuid>() {
        Ok(id) if state.hub.subscribe(user, id, connection, outbox) => {
            ServerFrame::Subscribed { conversation_id: id.to_string() }
        }
        _ => ServerFrame::Error {
            code: ErrorCode::UnknownConversation,
            message: format!("no conversation {conversation_id} for this user on this gateway"),
            client_message_id: None,
        },
    }
}

async fn accept_query(
    state: &AppState,
    user: &str,
    connection: ConnectionId,
    outbox: &Outbox,
    query: crate::protocol::ValidQuery,
) -> Vec<ServerFrame> {
    let error = |code, message: String| {
        vec![ServerFrame::Error { code, message, client_message_id: Some(query.client_message_id.clone()) }]
    };
    let mut admission = state.hub.admit(user, query.conversation_id, &query.client_message_id, connection, outbox);
    if let (Err(Refusal::UnknownConversation), Some(id)) = (&admission, query.conversation_id)
        && adopt_from_projection(state, user, id).await
    {
        admission = state.hub.admit(user, Some(id), &query.client_message_id, connection, outbox);
    }
    let (conversation_id, query_id, sequence, new_conversation) = match admission {
        Ok(Admission::Accepted { conversation_id, query_id, sequence, new_conversation }) => {
            (conversation_id, query_id, sequence, new_conversation)
        }
        Ok(Admission::Duplicate { frames }) => return frames,
        Err(Refusal::UnknownConversation) => {
            return error(ErrorCode::UnknownConversation, "no such conversation for this user on this gateway".into());
        }
        Err(Refusal::TurnInProgress) => {
            return error(ErrorCode::TurnInProgress, "the previous question has no answer yet".into());
        }
    };
    // A root span: each turn is its own trace, not part of the socket's lifetime.
    let span = info_span!(parent: None, "gateway.query", %conversation_id, %query_id, sequence, traceparent = Empty);
    let traceparent = traceparent_of(&span, None);
    span.record("traceparent", traceparent.as_str());
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
        let event = UserQueryReceived {
            envelope: Envelope::new(query_id, conversation_id, sequence, SOURCE)
                .with_traceparent(Some(traceparent.clone())),
            user_id: user.to_owned(),
            client_message_id: query.client_message_id.clone(),
            text: query.text.clone(),
        };
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
            state.hub.record_ack(conversation_id, query_id, ack.clone());
            vec![ack]
        }
        Err(e) => {
            warn!(error = %e, %conversation_id, "query not written");
            state.hub.release(conversation_id, sequence);
            error(ErrorCode::Unavailable, format!("the event log did not take the query; nothing was written: {e}"))
        }
    }
}

/// Loads a conversation this instance does not hold from the projection, if it is the
/// user's. A turn the projection shows as open stays refused until its outcome arrives.
async fn adopt_from_projection(state: &AppState, user: &str, conversation_id: Uuid) -> bool {
    let row = match state.reader.generation().await {
        Ok(generation) => state.reader.store().conversation(&generation, conversation_id).await,
        Err(error) => Err(error),
    };
    match row {
        Ok(Some(row)) if row.user_id == user => {
            state.hub.adopt(conversation_id, row.head());
            true
        }
        Ok(_) => false,
        Err(error) => {
            warn!(%error, %conversation_id, "could not look the conversation up in the projection");
            false
        }
    }
}
