//! Telling systemd how a `Type=notify` service is doing (sd_notify(3): READY=1, STOPPING=1 over the datagram
//! socket named by `$NOTIFY_SOCKET`). Outside systemd the variable is unset and nothing is sent.

use std::future::Future;

use anyhow::Result;
use sd_notify::NotifyState;
use tokio::sync::watch;

/// Sends READY=1 now, and returns a task that sends STOPPING=1 once `stop` turns true (or its sender is gone). A
/// failed send is logged, never fatal: the service works the same, only systemd's view of it is late.
pub fn ready_until_stopped(mut stop: watch::Receiver<bool>) -> impl Future<Output = Result<()>> + Send + 'static {
    send(NotifyState::Ready);
    async move {
        let _ = stop.wait_for(|s| *s).await;
        send(NotifyState::Stopping);
        Ok(())
    }
}

fn send(state: NotifyState<'_>) {
    if let Err(e) = sd_notify::notify(&[state]) {
        tracing::warn!("telling systemd (NOTIFY_SOCKET) the service state: {e}");
    }
}
