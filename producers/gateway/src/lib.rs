//! The gateway: WebSocket + HTTP front door of Parley's command path.
//!
//! - [`protocol`]: the JSON frames and their validation (pure);
//! - [`auth`]: anonymous users' signed tokens (pure); [`identity`]: who a token is,
//!   anonymous or a JWT verified against the identity provider's keys;
//! - [`hub`]: conversation heads and socket subscriptions of this instance;
//! - [`answers`]: the listener that routes questions, token deltas and outcomes to sockets,
//!   and keeps [`recent`]: what it read that the projection may not have applied yet;
//! - [`adoption`]: taking over a conversation from the projection plus [`recent`], no wait;
//! - [`rate`]: rate limits as token buckets (pure); [`rate_feed`] keeps them from the log;
//! - [`resume`]: the order of a resumed answer's deltas on its new socket (pure);
//! - [`query`]: the HTTP query path over the projection;
//! - [`knowledge`]: document submission and vector search over HTTP;
//! - [`metrics`]: turns admitted and refused, error frames, open sockets (`/metrics`);
//! - [`ops`]: the live operations page's snapshots and series (pure), charted at `/ops`;
//! - [`origin`]: browser-origin checks (pure); [`tls`]: HTTPS and WSS, reloaded on change;
//! - [`server`]: axum routes, the socket loop, query → event.

pub mod adoption;
pub mod answers;
pub mod auth;
pub mod hub;
pub mod identity;
pub mod knowledge;
pub mod metrics;
pub mod ops;
pub mod origin;
pub mod protocol;
pub mod query;
pub mod rate;
pub mod rate_feed;
pub mod recent;
pub mod resume;
pub mod server;
pub mod tls;

pub use server::{Credentials, Gateway, GatewayArgs, GatewayError};
