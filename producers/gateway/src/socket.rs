//! One WebSocket: the upgrade (token, per-user socket cap), the loop that reads frames and
//! hands each to its handler ([`crate::turns`], [`crate::follow`], [`crate::cancel`]), the
//! writer that sends what the socket's outbox holds, and how the socket closes (1009 for a
//! frame over the transport limit, 4001 for an expired token).

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use futures::{SinkExt, StreamExt};
use parley_events::{EventId, UserId};
use serde::Deserialize;
use tokio::sync::mpsc;
use tracing::{Instrument, info, info_span};

use crate::cancel::{cancel, cancel_abandoned};
use crate::follow::{resume, subscribe};
use crate::metrics;
use crate::protocol::{
    ClientFrame, ErrorCode, PROTOCOL_VERSION, Rejection, ServerFrame, ValidQuery, parse_frame, validate_query,
};
use crate::resume::TokenOrder;
use crate::state::{AppState, Socket};
use crate::turns::accept_query;

/// Frames above this size are refused by the WebSocket layer itself (close code 1009);
/// frames between the protocol limit and this one get an error frame and the socket lives.
pub const TRANSPORT_FRAME_LIMIT: usize = 1024 * 1024;

/// Initial read buffer of a socket.
const SOCKET_READ_BUFFER: usize = 4 * 1024;

/// Frames queued per socket; a client that stops reading stops receiving.
const OUTBOX_CAPACITY: usize = 1024;

/// The close code of a socket whose token expired (WebSocket private-use range): the
/// client reconnects with a fresh token.
pub const TOKEN_EXPIRED_CLOSE_CODE: u16 = 4001;

/// How long a socket closed for a frame too large stays open for the close frame to reach
/// the client while the rest of its frame still arrives.
const CLOSE_LINGER: Duration = Duration::from_secs(1);

#[derive(Deserialize)]
pub(crate) struct SocketParams {
    token: Option<String>,
}

pub(crate) async fn upgrade(
    State(state): State<Arc<AppState>>,
    Query(params): Query<SocketParams>,
    ws: WebSocketUpgrade,
) -> Response {
    let Some(token) = params.token.as_deref() else {
        return (StatusCode::UNAUTHORIZED, "invalid token: none given (connect to /ws?token=<token>)").into_response();
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
    user: UserId,
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

async fn serve_socket(state: Arc<AppState>, user: UserId, expires_at: Option<u64>, socket: WebSocket) {
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
                user_id: user.to_string(),
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

async fn handle_text(state: &AppState, user: &UserId, socket: &Socket<'_>, text: &str) {
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
            resumed.await.unwrap_or_else(|refusal| vec![refusal.into_frame()])
        }
        Ok(ClientFrame::Cancel { conversation_id, query_event_id }) => {
            let frame = match query_event_id.parse::<EventId>() {
                Err(_) => ServerFrame::error(ErrorCode::InvalidField, "query_event_id is not a UUID".into(), None),
                Ok(query) => match cancel(state, user, &conversation_id, Some(query)).await {
                    Ok(done) => {
                        ServerFrame::CancelResult { conversation_id, query_event_id, status: done.status().to_owned() }
                    }
                    Err(refusal) => refusal.into_frame(),
                },
            };
            vec![frame]
        }
        Ok(ClientFrame::Query { client_message_id, conversation_id, text, lane, no_cache }) => {
            match validate_query(client_message_id, conversation_id, text, lane, state.limits)
                .map(|valid| ValidQuery { no_cache, ..valid })
            {
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
