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

/// How many restarts of a VM that stopped on its own, within `LOOP_WINDOW`, make a crash
/// loop.
pub const LOOP_RESTARTS: usize = 3;
pub const LOOP_WINDOW: Duration = Duration::from_secs(600);
/// The first wait before restarting a crash-looping VM, doubling to `LOOP_MAX`.
const LOOP_FIRST: Duration = Duration::from_secs(10);
const LOOP_MAX: Duration = Duration::from_secs(600);

/// VMs that keep stopping on their own (a guest that crashes or powers itself off): fleet
/// heals such drift by starting them again, but the `LOOP_RESTARTS`th restart within
/// `LOOP_WINDOW` makes the next one wait 10 s, then 20 s, … up to 10 min, instead of
/// restarting on every pass. A VM that stays up for the window after its last wait ended
/// is forgiven.
#[derive(Debug, Default)]
pub struct CrashLoops {
    vms: HashMap<String, CrashState>,
}

#[derive(Debug, Default)]
struct CrashState {
    /// Restarts before a loop was found, within the window.
    restarts: std::collections::VecDeque<Instant>,
    /// When fleet last started it (a create or a start).
    started: Option<Instant>,
    /// Waits imposed since the loop was found, and when the next restart may be made.
    level: u32,
    until: Option<Instant>,
}

impl CrashState {
    /// In a loop: a wait was imposed, and the VM has not stayed up for the window since it
    /// ended.
    fn looping(&self, now: Instant) -> bool {
        self.level > 0 && self.until.is_some_and(|u| now < u + LOOP_WINDOW)
    }
}

impl CrashLoops {
    /// fleet started `vm` (created running, or started it): a stop soon after is its own.
    pub fn started(&mut self, vm: &str, now: Instant) {
        self.vms.entry(vm.to_owned()).or_default().started = Some(now);
    }

    /// fleet restarted `vm`, which had stopped on its own; how long its next restart waits,
    /// when it is now in a crash loop.
    pub fn restarted(&mut self, vm: &str, now: Instant) -> Option<Duration> {
        let state = self.vms.entry(vm.to_owned()).or_default();
        if state.level > 0 && !state.looping(now) {
            // Up for the window after its last wait: forgiven.
            state.level = 0;
            state.until = None;
            state.restarts.clear();
        }
        state
            .restarts
            .retain(|t| now.saturating_duration_since(*t) < LOOP_WINDOW);
        state.restarts.push_back(now);
        if state.level == 0 && state.restarts.len() < LOOP_RESTARTS {
            return None;
        }
        let delay = LOOP_FIRST
            .saturating_mul(1 << state.level.min(16))
            .min(LOOP_MAX);
        state.level += 1;
        state.until = Some(now + delay);
        Some(delay)
    }

    /// Whether a stop of `vm` now follows fleet's own start (or restart) of it within the
    /// window, or falls in a loop: then a start that heals it is a restart.
    pub fn recent(&self, vm: &str, now: Instant) -> bool {
        self.vms.get(vm).is_some_and(|s| {
            s.looping(now)
                || s.started
                    .is_some_and(|t| now.saturating_duration_since(t) < LOOP_WINDOW)
        })
    }

    /// The VMs in a crash loop at `now`, with the evidence in words.
    pub fn looping(&self, now: Instant) -> std::collections::BTreeMap<String, String> {
        self.vms
            .iter()
            .filter(|(_, s)| s.looping(now))
            .map(|(vm, s)| {
                (
                    vm.clone(),
                    format!(
                        "it keeps stopping on its own: started again {} times within {} min of each other; restarts back off (10 s doubling to 10 min)",
                        s.restarts.len(),
                        LOOP_WINDOW.as_secs() / 60
                    ),
                )
            })
            .collect()
    }

    /// The crash-looping VMs whose next restart must wait at `now`.
    pub fn deferred(&self, now: Instant) -> std::collections::BTreeMap<String, String> {
        self.vms
            .iter()
            .filter(|(_, s)| s.until.is_some_and(|until| until > now))
            .map(|(vm, _)| {
                (
                    vm.clone(),
                    "it is in a crash loop; started again when its backoff ends".to_owned(),
                )
            })
            .collect()
    }

    /// When the first waiting restart is due.
    pub fn next_due(&self, now: Instant) -> Option<Instant> {
        self.vms
            .values()
            .filter_map(|s| s.until.filter(|until| *until > now))
            .min()
    }

    /// Forgets VMs no longer desired.
    pub fn retain(&mut self, keep: impl Fn(&str) -> bool) {
        self.vms.retain(|vm, _| keep(vm));
    }
}

#[cfg(test)]
mod crash_loop_tests {
    use super::*;

    #[test]
    fn the_third_restart_in_ten_minutes_backs_off_and_only_staying_up_forgives() {
        let mut c = CrashLoops::default();
        let t = Instant::now();
        let at = |s: u64| t + Duration::from_secs(s);
        assert_eq!(c.restarted("a", at(0)), None);
        assert_eq!(c.restarted("a", at(5)), None);
        assert!(c.looping(at(6)).is_empty());
        assert_eq!(c.restarted("a", at(10)), Some(Duration::from_secs(10)));
        assert!(c.looping(at(11)).contains_key("a"));
        assert!(c.deferred(at(19)).contains_key("a"));
        assert!(c.deferred(at(20)).is_empty(), "the wait is over");
        assert_eq!(c.next_due(at(11)), Some(at(20)));
        // Waits double to 10 min, and a 10-minute wait does not forgive the loop.
        let mut now = 21;
        let mut waits = Vec::new();
        for _ in 0..8 {
            let wait = c.restarted("a", at(now)).expect("still looping");
            waits.push(wait.as_secs());
            now += wait.as_secs() + 1;
        }
        assert_eq!(waits, [20, 40, 80, 160, 320, 600, 600, 600]);
        assert!(
            c.looping(at(now)).contains_key("a"),
            "still a loop after long waits"
        );
        assert!(c.deferred(at(now)).is_empty());
        // Up for the window after its last wait ended: forgiven; a stop restarts at once.
        let later = now + 601 + 600;
        assert!(c.looping(at(later)).is_empty());
        assert_eq!(c.restarted("a", at(later)), None);
        assert!(c.deferred(at(later)).keys().all(|vm| vm == "a"));
    }

    #[test]
    fn a_stop_soon_after_fleet_started_it_counts() {
        let mut c = CrashLoops::default();
        let t = Instant::now();
        assert!(!c.recent("a", t));
        c.started("a", t);
        assert!(c.recent("a", t + Duration::from_secs(30)));
        assert!(!c.recent("a", t + Duration::from_secs(601)));
        c.retain(|vm| vm != "a");
        assert!(!c.recent("a", t));
    }
}
