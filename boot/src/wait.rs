//! Bounded waits for the unit tests: a condition polled until it holds or a limit
//! passes, never a bare sleep standing for "it happened by now".

use std::future::Future;
use std::time::{Duration, Instant};

/// How long a wait sleeps between two looks.
const POLL_EVERY: Duration = Duration::from_millis(10);

/// Polls `probe` until it gives a value or `limit` passes (looking once more at the
/// end); the value, or `None`.
pub(crate) async fn poll<T, F: Future<Output = Option<T>>>(
    limit: Duration,
    mut probe: impl FnMut() -> F,
) -> Option<T> {
    let deadline = Instant::now() + limit;
    loop {
        let last_look = Instant::now() >= deadline;
        if let Some(value) = probe().await {
            return Some(value);
        }
        if last_look {
            return None;
        }
        tokio::time::sleep(POLL_EVERY).await;
    }
}

/// Polls `condition` until it holds or `limit` passes; whether it held. Blocks the thread.
pub(crate) fn until_blocking(limit: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        let last_look = Instant::now() >= deadline;
        if condition() {
            return true;
        }
        if last_look {
            return false;
        }
        std::thread::sleep(POLL_EVERY);
    }
}
