//! What `fleet apply` shows while steps run. On a terminal: a spinner per step in flight
//! (its action, VM and time so far), and each step's outcome printed above them. Without
//! one (CI, a pipe): the outcomes, and every 10 s a heartbeat line for each step still
//! going ("still stopping web-1 (30 s)"), so a slow step is never mistaken for a hang.

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use crate::plan::{Action, Step};

/// How often a step still in flight is reported without a terminal;
/// `FLEET_HEARTBEAT_INTERVAL` (such as 2s) changes it, for tests and impatient CI logs.
pub const HEARTBEAT: Duration = Duration::from_secs(10);

fn heartbeat_interval() -> Duration {
    std::env::var("FLEET_HEARTBEAT_INTERVAL")
        .ok()
        .and_then(|v| humantime::parse_duration(&v).ok())
        .filter(|d| d.as_secs() >= 1)
        .unwrap_or(HEARTBEAT)
}

pub struct Progress {
    bars: Option<indicatif::MultiProgress>,
    every: Duration,
    in_flight: Mutex<BTreeMap<(String, &'static str), InFlight>>,
}

struct InFlight {
    action: Action,
    started: Instant,
    /// Heartbeats printed so far.
    beats: u32,
    bar: Option<indicatif::ProgressBar>,
}

/// "creating", "stopping", …: what a heartbeat says a step is doing.
pub fn doing(action: Action) -> &'static str {
    match action {
        Action::Create => "creating",
        Action::Start => "starting",
        Action::Stop => "stopping",
        Action::Update => "updating",
        Action::Replace => "replacing",
        Action::Destroy => "destroying",
        Action::Reset => "resetting",
        Action::Revert => "reverting",
        Action::DestroyWorkspace => "destroying",
    }
}

impl Progress {
    /// Spinners when stderr is a terminal; otherwise heartbeats, from a thread that ends
    /// with the last reference to the returned value.
    pub fn on_stderr() -> Arc<Progress> {
        let terminal = std::io::stderr().is_terminal();
        let progress = Arc::new(Progress {
            bars: terminal.then(|| {
                indicatif::MultiProgress::with_draw_target(indicatif::ProgressDrawTarget::stderr())
            }),
            every: heartbeat_interval(),
            in_flight: Mutex::new(BTreeMap::new()),
        });
        if !terminal {
            let weak = Arc::downgrade(&progress);
            std::thread::spawn(move || heartbeats(&weak));
        }
        progress
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<(String, &'static str), InFlight>> {
        self.in_flight.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn started(&self, step: &Step) {
        let action = step.action();
        let bar = self.bars.as_ref().map(|bars| {
            let bar = bars.add(indicatif::ProgressBar::new_spinner());
            bar.set_style(
                indicatif::ProgressStyle::with_template("{spinner} {msg} ({elapsed})")
                    .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner()),
            );
            bar.set_message(format!("{} {}", doing(action), step.vm));
            bar.enable_steady_tick(Duration::from_millis(120));
            bar
        });
        self.lock().insert(
            (step.vm.clone(), action.as_str()),
            InFlight {
                action,
                started: Instant::now(),
                beats: 0,
                bar,
            },
        );
    }

    /// The step is done: its spinner goes and `outcome` is printed.
    pub fn finished(&self, step: &Step, outcome: &str) {
        let gone = self
            .lock()
            .remove(&(step.vm.clone(), step.action().as_str()));
        if let Some(bar) = gone.and_then(|f| f.bar) {
            bar.finish_and_clear();
        }
        match &self.bars {
            Some(bars) => {
                let _ = bars.println(outcome);
            }
            None => eprintln!("{outcome}"),
        }
    }

    /// The heartbeat lines due now (each step's next multiple of the interval).
    fn due(&self, now: Instant) -> Vec<String> {
        let every = self.every.as_secs().max(1);
        let mut lines = Vec::new();
        for ((vm, _), step) in self.lock().iter_mut() {
            let elapsed = now.saturating_duration_since(step.started);
            let due = u32::try_from(elapsed.as_secs() / every).unwrap_or(u32::MAX);
            if due > step.beats {
                step.beats = due;
                lines.push(format!(
                    "still {} {vm} ({} s)",
                    doing(step.action),
                    u64::from(due) * every
                ));
            }
        }
        lines
    }
}

fn heartbeats(progress: &Weak<Progress>) {
    loop {
        std::thread::sleep(Duration::from_millis(500));
        let Some(progress) = progress.upgrade() else {
            return;
        };
        for line in progress.due(Instant::now()) {
            eprintln!("{line}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_step_in_flight_gets_one_heartbeat_per_interval() {
        let progress = Progress {
            bars: None,
            every: HEARTBEAT,
            in_flight: Mutex::new(BTreeMap::new()),
        };
        let start = Instant::now();
        progress.lock().insert(
            ("web-1".into(), "stop"),
            InFlight {
                action: Action::Stop,
                started: start,
                beats: 0,
                bar: None,
            },
        );
        assert!(progress.due(start + Duration::from_secs(9)).is_empty());
        assert_eq!(
            progress.due(start + Duration::from_secs(10)),
            ["still stopping web-1 (10 s)"]
        );
        assert!(progress.due(start + Duration::from_secs(15)).is_empty());
        // A late look reports the interval reached, once.
        assert_eq!(
            progress.due(start + Duration::from_secs(31)),
            ["still stopping web-1 (30 s)"]
        );
    }
}
