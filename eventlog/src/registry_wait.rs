//! Riding out schema-registry outages: a record that cannot be decoded because the
//! registry is unreachable is not the record's fault, so it is retried, never skipped
//! or dead-lettered.

use std::future::Future;
use std::time::Duration;

use parley_events::EventsError;
use tokio_util::sync::CancellationToken;
use tracing::warn;

const FIRST_DELAY: Duration = Duration::from_millis(100);
const MAX_DELAY: Duration = Duration::from_secs(5);

/// Runs `attempt` until it succeeds or fails for a reason other than the registry being
/// unreachable, backing off in between. None when `shutdown` fires while waiting.
pub async fn retry_while_registry_down<T, F, Fut>(
    shutdown: &CancellationToken,
    mut attempt: F,
) -> Option<Result<T, EventsError>>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, EventsError>>,
{
    let mut delay = FIRST_DELAY;
    loop {
        match attempt().await {
            Err(error) if error.is_retryable() => {
                warn!(%error, ?delay, "schema registry unavailable; retrying");
                tokio::select! {
                    () = shutdown.cancelled() => return None,
                    () = tokio::time::sleep(delay) => {}
                }
                delay = (delay * 2).min(MAX_DELAY);
            }
            result => return Some(result),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;

    use super::*;

    #[tokio::test]
    async fn retries_registry_outages_but_not_bad_records() {
        let shutdown = CancellationToken::new();
        let calls = Cell::new(0);
        let result = retry_while_registry_down(&shutdown, || {
            calls.set(calls.get() + 1);
            let outcome = if calls.get() < 3 { Err(EventsError::Registry("down".into())) } else { Ok(7) };
            async move { outcome }
        })
        .await;
        assert_eq!((result.map(Result::ok), calls.get()), (Some(Some(7)), 3));

        let calls = Cell::new(0);
        let result = retry_while_registry_down(&shutdown, || {
            calls.set(calls.get() + 1);
            async { Err::<(), _>(EventsError::NotWireFormat("junk".into())) }
        })
        .await;
        assert!(matches!(result, Some(Err(EventsError::NotWireFormat(_)))));
        assert_eq!(calls.get(), 1);

        shutdown.cancel();
        let result =
            retry_while_registry_down(&shutdown, || async { Err::<(), _>(EventsError::Registry("down".into())) }).await;
        assert!(result.is_none());
    }
}
