//! Per-VM exponential backoff: a VM whose step failed waits 1 s, then 2 s, 4 s … up to
//! 5 min before it is tried again; one success resets it. Other VMs never wait for it.

use std::collections::HashMap;
use std::time::{Duration, Instant};

const FIRST: Duration = Duration::from_secs(1);
const MAX: Duration = Duration::from_secs(300);

#[derive(Debug, Default)]
pub struct Backoff {
    /// VM → (failures in a row, when it may be tried again).
    waiting: HashMap<String, (u32, Instant)>,
}

impl Backoff {
    /// Records a failure; returns how long the VM now waits.
    pub fn failed(&mut self, vm: &str, now: Instant) -> Duration {
        let failures = self.waiting.get(vm).map_or(0, |(n, _)| *n) + 1;
        let delay = FIRST.saturating_mul(1 << (failures - 1).min(16)).min(MAX);
        self.waiting.insert(vm.to_owned(), (failures, now + delay));
        delay
    }

    pub fn succeeded(&mut self, vm: &str) {
        self.waiting.remove(vm);
    }

    /// The VMs that must wait at `now`, each with why and for how long, in words.
    pub fn deferred(&self, now: Instant) -> std::collections::BTreeMap<String, String> {
        self.waiting
            .iter()
            .filter(|(_, (_, until))| *until > now)
            .map(|(vm, (failures, _))| {
                // No countdown: the plan (and its digest) stays the same while the VM waits.
                let why = format!(
                    "its step failed {failures} time(s) in a row; tried again when its backoff ends"
                );
                (vm.clone(), why)
            })
            .collect()
    }

    /// When the first waiting VM may be tried again.
    pub fn next_due(&self) -> Option<Instant> {
        self.waiting.values().map(|(_, until)| *until).min()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_up_to_five_minutes_and_resets_on_success() {
        let mut b = Backoff::default();
        let t = Instant::now();
        let delays: Vec<u64> = (0..12).map(|_| b.failed("a", t).as_secs()).collect();
        assert_eq!(delays, [1, 2, 4, 8, 16, 32, 64, 128, 256, 300, 300, 300]);
        assert!(b.deferred(t + Duration::from_secs(299)).contains_key("a"));
        assert!(b.deferred(t + Duration::from_secs(300)).is_empty());
        assert!(!b.deferred(t).contains_key("b"), "other VMs never wait");
        let deferred = b.deferred(t + Duration::from_secs(290));
        assert_eq!(deferred.keys().collect::<Vec<_>>(), ["a"]);
        assert_eq!(
            deferred["a"],
            "its step failed 12 time(s) in a row; tried again when its backoff ends"
        );
        assert!(b.deferred(t + Duration::from_secs(300)).is_empty());
        b.succeeded("a");
        assert!(b.deferred(t).is_empty());
        assert_eq!(
            b.failed("a", t),
            Duration::from_secs(1),
            "a success resets the count"
        );
    }

    #[test]
    fn the_next_wake_is_the_soonest_retry() {
        let mut b = Backoff::default();
        let t = Instant::now();
        assert_eq!(b.next_due(), None);
        b.failed("slow", t);
        b.failed("slow", t);
        b.failed("fast", t);
        assert_eq!(b.next_due(), Some(t + Duration::from_secs(1)));
    }
}
