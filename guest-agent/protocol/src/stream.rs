//! Byte streams multiplexed over the agent link, for brokered egress: the guest's proxy
//! opens one per connection a task makes (`GuestMessage::StreamOpen`), and both sides send
//! `StreamData` and `StreamCredit` and end with `StreamClose`.
//!
//! Flow control is by credit, per stream and direction: a side sends at most the bytes the
//! other granted (`WINDOW_BYTES` at the start, then what each `StreamCredit` adds), so one
//! large download never fills the link's buffers ahead of task output, prompts or other
//! streams, and a receiver never holds more than one window per stream. A side that sends
//! past its credit has broken the protocol: the stream is closed (`FlowError`).
//!
//! Streams do not survive a reconnect of the link (they are not in the outbox): both sides
//! drop them when the link goes, and the task's client sees its connection reset.

/// Where the guest's proxy listens; tasks of brokered VMs find it in `HTTPS_PROXY` and
/// `HTTP_PROXY`.
pub const PROXY_ADDRESS: &str = "127.0.0.1:3128";

/// Bytes each side may send on a stream before the other grants more.
pub const WINDOW_BYTES: u64 = 256 * 1024;
/// The most bytes one `StreamData` carries (before base64).
pub const CHUNK_BYTES: usize = 32 * 1024;
/// The most streams one link holds open at once; more are refused.
pub const MAX_STREAMS: usize = 64;

/// A peer broke the stream's flow control.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FlowError {
    /// It sent more bytes than it was granted.
    Overrun { granted: u64, sent: u64 },
    /// It granted credit beyond one window (it cannot have consumed what was never sent).
    OverGranted { credit: u64 },
}

impl std::fmt::Display for FlowError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FlowError::Overrun { granted, sent } => {
                write!(f, "sent {sent} bytes with {granted} granted")
            }
            FlowError::OverGranted { credit } => write!(
                f,
                "granted credit up to {credit} bytes, more than one window ({WINDOW_BYTES})"
            ),
        }
    }
}

/// The sending half of a stream's flow control: how much may be sent now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SendWindow {
    credit: u64,
}

impl Default for SendWindow {
    fn default() -> SendWindow {
        SendWindow {
            credit: WINDOW_BYTES,
        }
    }
}

impl SendWindow {
    /// How many of `want` bytes may go now (at most one chunk).
    pub fn allowance(&self, want: usize) -> usize {
        want.min(CHUNK_BYTES)
            .min(usize::try_from(self.credit).unwrap_or(usize::MAX))
    }

    /// `n` bytes were sent.
    pub fn sent(&mut self, n: usize) {
        self.credit = self.credit.saturating_sub(n as u64);
    }

    /// The peer granted `n` more bytes.
    pub fn granted(&mut self, n: u64) -> Result<(), FlowError> {
        let credit = self.credit.saturating_add(n);
        if credit > WINDOW_BYTES {
            return Err(FlowError::OverGranted { credit });
        }
        self.credit = credit;
        Ok(())
    }
}

/// The receiving half: checks the peer keeps to its credit, and says when to grant more.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecvWindow {
    /// Bytes the peer may still send.
    allowed: u64,
    /// Bytes consumed (passed on) and not yet granted back.
    consumed: u64,
}

impl Default for RecvWindow {
    fn default() -> RecvWindow {
        RecvWindow {
            allowed: WINDOW_BYTES,
            consumed: 0,
        }
    }
}

impl RecvWindow {
    /// `n` bytes arrived.
    pub fn received(&mut self, n: usize) -> Result<(), FlowError> {
        let n = n as u64;
        if n > self.allowed {
            return Err(FlowError::Overrun {
                granted: self.allowed,
                sent: n,
            });
        }
        self.allowed -= n;
        Ok(())
    }

    /// `n` bytes were passed on (written to the local socket); returns the credit to grant
    /// now, if any. Credit goes back in batches of half a window, so a busy stream costs one
    /// `StreamCredit` per half window, not one per chunk.
    pub fn consumed(&mut self, n: usize) -> Option<u64> {
        self.consumed += n as u64;
        if self.consumed < WINDOW_BYTES / 2 {
            return None;
        }
        let grant = std::mem::take(&mut self.consumed);
        self.allowed += grant;
        Some(grant)
    }
}

/// A stream's send credit, shared by whoever grants it (the thread reading the link) and
/// whoever spends it (the thread copying bytes to the link), and whether the stream is over:
/// closing wakes a sender waiting for credit at once.
#[derive(Default)]
pub struct Credit {
    state: std::sync::Mutex<(SendWindow, bool)>,
    changed: std::sync::Condvar,
}

/// What a sender may do now (`Credit::take`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Take {
    /// Send this many bytes (at least one; the credit is spent).
    Bytes(usize),
    /// The stream is over.
    Closed,
    /// No credit came within the wait: the peer stopped reading.
    Stalled,
}

impl Credit {
    fn state(&self) -> std::sync::MutexGuard<'_, (SendWindow, bool)> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The peer granted `n` more bytes.
    pub fn grant(&self, n: u64) -> Result<(), FlowError> {
        let granted = self.state().0.granted(n);
        self.changed.notify_all();
        granted
    }

    /// The stream is over: every wait ends.
    pub fn close(&self) {
        self.state().1 = true;
        self.changed.notify_all();
    }

    /// Spends credit for up to `want` bytes, waiting at most `patience` for some.
    pub fn take(&self, want: usize, patience: std::time::Duration) -> Take {
        let deadline = std::time::Instant::now() + patience;
        let mut state = self.state();
        loop {
            if state.1 {
                return Take::Closed;
            }
            let allowed = state.0.allowance(want);
            if allowed > 0 {
                state.0.sent(allowed);
                return Take::Bytes(allowed);
            }
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return Take::Stalled;
            }
            state = self
                .changed
                .wait_timeout(state, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Both sides of a link must agree on these: an agent built with another window closes
    /// streams mid-transfer when the host sends past what it expects. They belong to the
    /// protocol's `VERSION`, which the host checks on every message: change one, bump it.
    #[test]
    fn the_window_and_the_chunk_belong_to_the_protocol_version() {
        assert_eq!(
            (crate::VERSION, WINDOW_BYTES, CHUNK_BYTES),
            (1, 256 * 1024, 32 * 1024),
            "a stream's window or chunk changed: bump fleet_agent_protocol::VERSION with it"
        );
    }

    #[test]
    fn a_sender_stops_at_its_credit_and_goes_on_when_granted() {
        let mut send = SendWindow::default();
        let mut recv = RecvWindow::default();
        let mut sent = 0u64;
        // Send as much as allowed, never consuming: exactly one window goes.
        loop {
            let n = send.allowance(1 << 20);
            if n == 0 {
                break;
            }
            assert!(n <= CHUNK_BYTES);
            recv.received(n).expect("within credit");
            send.sent(n);
            sent += n as u64;
        }
        assert_eq!(sent, WINDOW_BYTES);
        // The receiver passes half a window on and grants it back.
        assert_eq!(recv.consumed(CHUNK_BYTES), None, "not yet half a window");
        let grant = recv
            .consumed((WINDOW_BYTES / 2) as usize - CHUNK_BYTES)
            .expect("half a window");
        assert_eq!(grant, WINDOW_BYTES / 2);
        send.granted(grant).expect("a fair grant");
        assert_eq!(send.allowance(1 << 20), CHUNK_BYTES);
    }

    #[test]
    fn a_peer_that_breaks_the_credit_is_caught() {
        let mut recv = RecvWindow::default();
        recv.received(WINDOW_BYTES as usize).expect("one window");
        assert_eq!(
            recv.received(1),
            Err(FlowError::Overrun {
                granted: 0,
                sent: 1
            })
        );
        let mut send = SendWindow::default();
        assert!(matches!(
            send.granted(1),
            Err(FlowError::OverGranted { .. })
        ));
        send.sent(100);
        send.granted(100)
            .expect("what was sent may be granted back");
    }

    #[test]
    fn a_sender_waits_for_credit_and_a_close_ends_the_wait() {
        let credit = std::sync::Arc::new(Credit::default());
        assert_eq!(
            credit.take(usize::MAX, std::time::Duration::ZERO),
            Take::Bytes(CHUNK_BYTES)
        );
        while let Take::Bytes(_) = credit.take(CHUNK_BYTES, std::time::Duration::ZERO) {}
        assert_eq!(
            credit.take(1, std::time::Duration::from_millis(10)),
            Take::Stalled
        );
        let closer = credit.clone();
        let waiter = std::thread::spawn(move || {
            let started = std::time::Instant::now();
            let taken = closer.take(1, std::time::Duration::from_secs(60));
            (taken, started.elapsed())
        });
        std::thread::sleep(std::time::Duration::from_millis(50));
        credit.close();
        let (taken, waited) = waiter.join().expect("the waiter");
        assert_eq!(taken, Take::Closed);
        assert!(waited < std::time::Duration::from_secs(10), "{waited:?}");
    }
}
