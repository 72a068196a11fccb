//! One task's messages until the host has them. Every output chunk, prompt, artifact part and
//! the exit gets the task's next sequence number (from 1) and stays here until the host
//! acknowledges it or a later one; after a reconnect everything still here is sent again in
//! order, and the host drops repeats by `seq`. Above `CAP_BYTES` of unacknowledged output
//! the task is made to wait (back-pressure), so a host that stops reading cannot make the
//! agent hold unbounded memory.
//!
//! Pure bookkeeping: no I/O, no clock, no lock (the caller holds `Tasks`' lock).

use std::collections::VecDeque;

use fleet_agent_protocol::GuestMessage;

/// Unacknowledged output above this makes the task wait.
pub const CAP_BYTES: usize = 8 * 1024 * 1024;

#[derive(Debug)]
pub struct Outbox {
    next_seq: u64,
    pending: VecDeque<(u64, GuestMessage)>,
    bytes: usize,
}

impl Default for Outbox {
    fn default() -> Outbox {
        Outbox {
            next_seq: 1,
            pending: VecDeque::new(),
            bytes: 0,
        }
    }
}

impl Outbox {
    /// Numbers the next message (`make` gets its sequence number), keeps it until it is
    /// acknowledged, and returns it to be sent now.
    pub fn push(&mut self, make: impl FnOnce(u64) -> GuestMessage) -> GuestMessage {
        let seq = self.next_seq;
        self.next_seq += 1;
        let message = make(seq);
        self.bytes += weight(&message);
        self.pending.push_back((seq, message.clone()));
        message
    }

    /// The host has every message up to `seq`; an old or repeated acknowledgement changes
    /// nothing, and one beyond what was sent empties the outbox.
    pub fn ack(&mut self, seq: u64) {
        while self.pending.front().is_some_and(|(s, _)| *s <= seq) {
            if let Some((_, m)) = self.pending.pop_front() {
                self.bytes -= weight(&m);
            }
        }
    }

    /// What is still unacknowledged, oldest first: what a resend sends.
    pub fn pending(&self) -> impl Iterator<Item = &GuestMessage> {
        self.pending.iter().map(|(_, m)| m)
    }

    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }

    /// Whether the task must wait for the host before it may produce more.
    pub fn is_full(&self) -> bool {
        self.bytes > CAP_BYTES
    }
}

/// What a message counts for against the cap: its text for output, a little for others.
fn weight(message: &GuestMessage) -> usize {
    match message {
        GuestMessage::Output { data, .. } => data.len(),
        _ => 64,
    }
}

#[cfg(test)]
mod tests {
    use fleet_agent_protocol::{ExitReason, VERSION};

    use super::*;

    fn output(seq: u64, data: &str) -> GuestMessage {
        GuestMessage::Output {
            v: VERSION,
            task: "t".into(),
            seq,
            data: data.into(),
        }
    }

    fn seqs(outbox: &Outbox) -> Vec<u64> {
        outbox
            .pending()
            .map(|m| match m {
                GuestMessage::Output { seq, .. } | GuestMessage::Exit { seq, .. } => *seq,
                other => panic!("unexpected {other:?}"),
            })
            .collect()
    }

    #[test]
    fn messages_are_numbered_from_one_and_kept_until_acknowledged() {
        let mut outbox = Outbox::default();
        let first = outbox.push(|seq| output(seq, "a"));
        assert_eq!(first, output(1, "a"));
        outbox.push(|seq| output(seq, "bb"));
        outbox.push(|seq| output(seq, "ccc"));
        assert_eq!(seqs(&outbox), [1, 2, 3]);
        assert_eq!(outbox.bytes, 6);

        outbox.ack(2);
        assert_eq!(seqs(&outbox), [3], "a partial ack keeps the rest");
        assert_eq!(outbox.bytes, 3);
        outbox.ack(1);
        assert_eq!(seqs(&outbox), [3], "an old ack changes nothing");

        outbox.push(|seq| GuestMessage::Exit {
            v: VERSION,
            task: "t".into(),
            seq,
            code: Some(0),
            reason: ExitReason::Completed,
        });
        assert_eq!(seqs(&outbox), [3, 4], "what a resend sends, in order");
        outbox.ack(99);
        assert!(outbox.is_empty());
        assert_eq!(outbox.bytes, 0);
    }

    #[test]
    fn a_host_that_does_not_acknowledge_makes_the_task_wait() {
        let mut outbox = Outbox::default();
        let chunk = "x".repeat(1024 * 1024);
        for _ in 0..8 {
            outbox.push(|seq| output(seq, &chunk));
        }
        assert!(!outbox.is_full(), "8 MiB is still allowed");
        outbox.push(|seq| output(seq, "y"));
        assert!(outbox.is_full());
        outbox.ack(1);
        assert!(!outbox.is_full(), "an acknowledgement lets it go on");
    }
}
