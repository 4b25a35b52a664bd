//! The options of `parley gateway`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use parley_eventlog::settings::parse_duration;

use crate::identity::JwtSettings;
use crate::rate::RateSettings;
use crate::tls::TlsSettings;

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

    /// JWT mode.
    #[command(flatten)]
    pub jwt: JwtSettings,

    /// HTTPS and WSS.
    #[command(flatten)]
    pub tls: TlsSettings,

    /// Rate limits.
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
