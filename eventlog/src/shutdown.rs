//! How a Parley process learns to stop.

use tokio_util::sync::CancellationToken;

/// A token cancelled on SIGINT (Ctrl-C) or SIGTERM (what Kubernetes sends before killing a
/// pod): every loop given it finishes what it must and returns.
pub fn on_signal() -> CancellationToken {
    let token = CancellationToken::new();
    let cancel = token.clone();
    tokio::spawn(async move {
        let terminate = async {
            if let Ok(mut signal) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                signal.recv().await;
            }
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            () = terminate => {}
        }
        cancel.cancel();
    });
    token
}
