//! The systemd side of `fleet serve` under `Type=notify`: READY=1 once it holds the status
//! lock and serves its page (not after the first reconcile, whose applies may outlast any
//! start timeout), a status line after every pass (`systemctl status`), the watchdog's
//! pings while the runtime answers, STOPPING=1 at shutdown. Outside systemd (no
//! `NOTIFY_SOCKET`) each is a no-op.

use std::time::Duration;

/// Says the daemon is up, with a one-line status for `systemctl status`.
pub fn ready(status: &str) {
    if let Err(e) = sd_notify::notify(&[
        sd_notify::NotifyState::Ready,
        sd_notify::NotifyState::Status(status),
    ]) {
        tracing::warn!("could not tell systemd fleet serve is ready: {e}");
    }
}

/// Updates the line `systemctl status` shows.
pub fn status(status: &str) {
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Status(status)]);
}

pub fn stopping() {
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
}

/// Pings the watchdog (`WatchdogSec=`) at half its interval from a task of the runtime: a
/// wedged runtime misses them and systemd restarts fleet. A long apply does not: steps run
/// on their own tasks and threads.
pub fn spawn_watchdog() {
    let Some(interval) = sd_notify::watchdog_enabled() else {
        return;
    };
    let period = (interval / 2).max(Duration::from_millis(100));
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(period);
        loop {
            tick.tick().await;
            let _ = sd_notify::notify(&[sd_notify::NotifyState::Watchdog]);
        }
    });
}
