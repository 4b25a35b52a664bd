//! The gateway: WebSocket + HTTP front door of Parley's command path.
//!
//! The server and what it shares:
//! - [`server`]: binds a gateway, routes, serves; [`settings`]: its options;
//!   [`state`]: what every handler shares, the credentials checked before connecting;
//!
//! The socket path (WebSocket):
//! - [`socket`]: the upgrade, the frame loop and the writer of one socket;
//! - [`turns`]: a question becomes a turn (admission, shedding, limits, budget, the write);
//! - [`follow`]: `subscribe` and `resume`; [`cancel`]: stopping an answer; [`refusal`]: why
//!   one of them was refused, mapped to the protocol's codes;
//! - [`protocol`]: the JSON frames and their validation (pure);
//! - [`hub`]: conversation heads and socket subscriptions of this instance;
//! - [`answers`]: the listener that routes questions, token deltas and outcomes to sockets,
//!   and keeps [`recent`]: what it read that the projection may not have applied yet;
//! - [`adoption`]: taking over a conversation from the projection plus [`recent`], no wait;
//! - [`resume`]: the order of a resumed answer's deltas on its new socket (pure);
//! - [`rate`]: rate limits as token buckets (pure); [`rate_feed`] keeps them from the log;
//!
//! The HTTP path:
//! - [`api`]: the caller's user and the error answer every HTTP handler shares;
//! - [`query`]: the query path over the projection;
//! - [`knowledge`]: document submission and vector search;
//! - [`erasure`]: `DELETE /api/me`, a person erasing everything of theirs;
//! - [`ops`]: the live operations page's snapshots and series (pure), charted at `/ops`;
//! - [`metrics`]: turns admitted and refused, error frames, open sockets (`/metrics`);
//!
//! Who may connect: [`auth`]: anonymous users' signed tokens (pure); [`identity`]: who a
//! token is, anonymous or a JWT verified against the identity provider's keys; [`origin`]:
//! browser-origin checks (pure); [`tls`]: HTTPS and WSS, reloaded on change.

#![warn(missing_docs)]

pub mod adoption;
pub mod answers;
pub mod api;
pub mod auth;
pub mod cancel;
pub mod erasure;
pub mod follow;
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
pub mod refusal;
pub mod resume;
pub mod server;
pub mod settings;
pub mod socket;
pub mod state;
pub mod tls;
pub mod turns;

pub use server::Gateway;
pub use settings::GatewayArgs;
pub use state::{Credentials, GatewayError};
