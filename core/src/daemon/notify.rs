//! systemd's notify protocol (`Type=notify`): READY once serving, STATUS with
//! the queue and GPU use, WATCHDOG from the main loop itself (so a stuck loop
//! is restarted), STOPPING and EXTEND_TIMEOUT_USEC while workers checkpoint.
//! Without `NOTIFY_SOCKET` every call is a no-op.

use std::time::{Duration, Instant};

use sd_notify::NotifyState;

pub struct Notifier {
    watchdog: Option<Duration>,
    last_ping: Option<Instant>,
    last_status: String,
}

impl Notifier {
    pub fn new() -> Self {
        Self {
            watchdog: sd_notify::watchdog_enabled(),
            last_ping: None,
            last_status: String::new(),
        }
    }

    /// How often the loop must come round to keep the watchdog fed.
    pub(crate) fn ping_interval(&self) -> Option<Duration> {
        self.watchdog.map(|w| w / 2)
    }

    fn send(&self, states: &[NotifyState]) {
        if let Err(e) = sd_notify::notify(states) {
            tracing::warn!("systemd notification failed: {e}");
        }
    }

    pub(crate) fn ready(&mut self, status: &str) {
        self.send(&[NotifyState::Ready, NotifyState::Status(status)]);
        self.last_status = status.to_string();
    }

    /// Send STATUS when it changed.
    pub fn status(&mut self, status: &str) {
        if status != self.last_status {
            self.send(&[NotifyState::Status(status)]);
            self.last_status = status.to_string();
        }
    }

    /// Feed the watchdog if half its interval has passed; call from the main loop.
    pub(crate) fn ping_if_due(&mut self) {
        let Some(interval) = self.ping_interval() else {
            return;
        };
        if self.last_ping.is_none_or(|t| t.elapsed() >= interval) {
            self.send(&[NotifyState::Watchdog]);
            self.last_ping = Some(Instant::now());
        }
    }

    pub fn stopping(&mut self, status: &str) {
        self.send(&[NotifyState::Stopping, NotifyState::Status(status)]);
    }

    /// Ask systemd for more time to stop (workers are checkpointing).
    pub(crate) fn extend_stop_timeout(&mut self, by: Duration) {
        self.send(&[NotifyState::ExtendTimeoutUsec(
            by.as_micros().min(u32::MAX as u128) as u32,
        )]);
    }
}

impl Default for Notifier {
    fn default() -> Self {
        Self::new()
    }
}
