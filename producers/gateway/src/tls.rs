//! HTTPS and WSS served by the gateway itself (rustls, no OpenSSL), for a deployment
//! without a TLS-terminating ingress: a certificate chain and its key in PEM files, loaded
//! at start-up and again whenever either file changes (a renewed certificate is served to
//! new connections without a restart; open ones keep theirs).

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use axum_server::tls_rustls::RustlsConfig;
use clap::Args;
use parley_eventlog::secret::exposed_mode;
use parley_eventlog::settings::parse_duration;
use thiserror::Error;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// HTTPS and WSS (off without a certificate).
#[derive(Debug, Clone, Args)]
pub struct TlsSettings {
    /// PEM certificate chain (leaf first): with --tls-key, the gateway serves HTTPS and WSS.
    #[arg(long = "tls-cert", env = "PARLEY_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,

    /// PEM private key of the certificate (PKCS#8, PKCS#1 or SEC1).
    #[arg(long = "tls-key", env = "PARLEY_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,

    /// How often the certificate and key files are checked for a change.
    #[arg(long = "tls-reload-check", env = "PARLEY_TLS_RELOAD_CHECK", default_value = "10s",
          value_parser = parse_duration)]
    pub tls_reload_check: Duration,
}

#[derive(Debug, Error)]
/// The certificate or key could not be loaded (the io or parse error is the source).
#[error("cannot use the TLS certificate {cert} and key {key}")]
pub struct TlsError {
    cert: String,
    key: String,
    source: std::io::Error,
}

/// The certificate files being served.
#[derive(Debug, Clone)]
pub struct Certificate {
    /// What the server serves with (reloaded in place).
    pub config: RustlsConfig,
    cert: PathBuf,
    key: PathBuf,
}

impl Certificate {
    /// Loads the files named in `settings`; None when TLS is not configured.
    pub async fn load(settings: &TlsSettings) -> Result<Option<Self>, TlsError> {
        let (Some(cert), Some(key)) = (&settings.tls_cert, &settings.tls_key) else {
            return Ok(None);
        };
        // Several crypto providers may be compiled in; the gateway's TLS uses aws-lc-rs.
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
        warn_if_exposed(key);
        let config = RustlsConfig::from_pem_file(cert, key).await.map_err(|source| TlsError {
            cert: cert.display().to_string(),
            key: key.display().to_string(),
            source,
        })?;
        info!(cert = %cert.display(), "serving HTTPS and WSS");
        Ok(Some(Self { config, cert: cert.clone(), key: key.clone() }))
    }

    /// Reloads the certificate and key whenever either file changes, until `shutdown`. A
    /// pair that does not load (a half-written renewal, a key of another certificate) is
    /// logged and the one in use stays.
    pub async fn watch(self, every: Duration, shutdown: CancellationToken) {
        let mut seen = (modified(&self.cert), modified(&self.key));
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(every) => {}
            }
            let now = (modified(&self.cert), modified(&self.key));
            if now == seen {
                continue;
            }
            match self.config.reload_from_pem_file(&self.cert, &self.key).await {
                Ok(()) => {
                    info!(cert = %self.cert.display(), "TLS certificate reloaded");
                    seen = now;
                }
                Err(error) => {
                    warn!(%error, "the changed TLS certificate does not load; still serving the previous one")
                }
            }
        }
    }
}

fn modified(path: &Path) -> Option<(SystemTime, u64)> {
    std::fs::metadata(path).ok().and_then(|m| Some((m.modified().ok()?, m.len())))
}

/// A private key others can read is no longer private: said at start-up.
fn warn_if_exposed(key: &Path) {
    if let Some(mode) = std::fs::metadata(key).ok().as_ref().and_then(exposed_mode) {
        warn!(key = %key.display(), mode = format!("{mode:o}"), "the TLS private key can be read by other users; chmod 600 it");
    }
}
