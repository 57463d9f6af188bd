//! Small helpers for the tasks the agent spawns.

use std::time::Duration;

use tokio::task::JoinHandle;

/// Aborts a task when dropped, so that a task never outlives what owns it. Dropping the
/// process driver (an agent restart) thereby ends its monitors without touching workloads.
#[derive(Debug)]
pub struct AbortOnDrop(Option<JoinHandle<()>>);

impl AbortOnDrop {
    pub fn new(handle: JoinHandle<()>) -> Self {
        Self(Some(handle))
    }

    /// Waits for the task to end by itself, for at most `timeout`, then aborts it.
    pub async fn join(mut self, timeout: Duration) {
        if let Some(handle) = self.0.as_mut() {
            let _ = tokio::time::timeout(timeout, handle).await;
        }
    }
}

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        if let Some(handle) = self.0.take() {
            handle.abort();
        }
    }
}
