//! Prometheus metrics. Counted as they happen: reconcile and fetch durations, apply steps
//! by outcome, refused revisions, notification deliveries, brokered egress by VM
//! (connections by outcome, bytes by direction, model tokens by kind). Read from the status
//! files at each scrape, so they survive a restart: VMs (by phase, and one info series per
//! VM), task runs by phase, prompts and approvals waiting, agent links connected, when a
//! change was last applied, whether the newest revision is refused. And `fleet_build_info`.
//!
//! Served as the Prometheus text format (what `promtool check metrics` reads), or as
//! OpenMetrics to a scraper that asks for it.

use std::sync::Mutex;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PhaseLabel {
    phase: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StepLabel {
    action: String,
    outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabel {
    vm: String,
    /// `allowed` or `refused`.
    outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DirectionLabel {
    vm: String,
    /// `up` (to the upstream) or `down` (to the guest).
    direction: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabel {
    version: String,
    revision: String,
}

/// One series per VM: its labels change with it, never multiply (the family is rebuilt at
/// each scrape).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VmInfoLabel {
    vm: String,
    phase: String,
    provider: String,
    /// The short id of the revision last applied to it.
    revision: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DeliveryLabel {
    /// The host configuration's sink name.
    sink: String,
    /// `delivered`, `retrying`, `failed` or `dropped`.
    outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TokenLabel {
    vm: String,
    /// `input` or `output`.
    token: String,
}

pub struct Metrics {
    registry: Mutex<Registry>,
    reconcile_seconds: Histogram,
    fetch_seconds: Histogram,
    vms: Family<PhaseLabel, Gauge>,
    drifted: Gauge,
    steps: Family<StepLabel, Counter>,
    refused_revisions: Counter,
    deliveries: Family<DeliveryLabel, Counter>,
    egress_connections: Family<OutcomeLabel, Counter>,
    egress_bytes: Family<DirectionLabel, Counter>,
    egress_tokens: Family<TokenLabel, Counter>,
    // Read from the status files (`observe_status`).
    last_applied: Gauge,
    revision_refused: Gauge,
    vm_info: Family<VmInfoLabel, Gauge>,
    task_runs: Family<PhaseLabel, Gauge>,
    prompts_waiting: Gauge,
    approvals_waiting: Gauge,
    agent_links: Gauge,
}

/// The reconcile histogram's buckets (seconds): a no-op pass takes milliseconds, a create
/// under TCG minutes.
const RECONCILE_BUCKETS: [f64; 14] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
];
const FETCH_BUCKETS: [f64; 13] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

impl Default for Metrics {
    fn default() -> Metrics {
        let mut registry = Registry::with_prefix("fleet");
        let build = Family::<BuildLabel, Gauge>::default();
        build
            .get_or_create(&BuildLabel {
                version: env!("CARGO_PKG_VERSION").into(),
                revision: env!("FLEET_REVISION").into(),
            })
            .set(1);
        registry.register(
            "build_info",
            "The fleet binary serving these metrics: its version and git revision (always 1)",
            build,
        );
        let metrics = Metrics {
            registry: Mutex::new(Registry::default()),
            reconcile_seconds: Histogram::new(RECONCILE_BUCKETS),
            fetch_seconds: Histogram::new(FETCH_BUCKETS),
            vms: Family::default(),
            drifted: Gauge::default(),
            steps: Family::default(),
            refused_revisions: Counter::default(),
            deliveries: Family::default(),
            egress_connections: Family::default(),
            egress_bytes: Family::default(),
            egress_tokens: Family::default(),
            last_applied: Gauge::default(),
            revision_refused: Gauge::default(),
            vm_info: Family::default(),
            task_runs: Family::default(),
            prompts_waiting: Gauge::default(),
            approvals_waiting: Gauge::default(),
            agent_links: Gauge::default(),
        };
        let m = &metrics;
        let r = &mut registry;
        r.register(
            "reconcile_duration_seconds",
            "Time one reconcile pass took",
            m.reconcile_seconds.clone(),
        );
        r.register(
            "source_fetch_duration_seconds",
            "Time one fetch of the followed remote took",
            m.fetch_seconds.clone(),
        );
        r.register("vms", "VMs by phase", m.vms.clone());
        r.register(
            "vms_drifted",
            "VMs whose reality differs from the applied spec",
            m.drifted.clone(),
        );
        r.register(
            "apply_steps",
            "Apply steps by action and outcome",
            m.steps.clone(),
        );
        r.register(
            "revisions_refused",
            "Revisions refused (invalid, unsigned, rewound or over capacity) since fleet serve started",
            m.refused_revisions.clone(),
        );
        r.register(
            "notification_deliveries",
            "Notification attempts by sink and outcome",
            m.deliveries.clone(),
        );
        r.register(
            "egress_connections",
            "Brokered connections by VM, allowed or refused",
            m.egress_connections.clone(),
        );
        r.register(
            "egress_bytes",
            "Bytes brokered connections moved by VM, up or down",
            m.egress_bytes.clone(),
        );
        r.register(
            "egress_tokens",
            "Model tokens brokered APIs reported by VM, input or output",
            m.egress_tokens.clone(),
        );
        r.register(
            "last_applied_revision_timestamp_seconds",
            "Unix time at which a reconcile last applied a change",
            m.last_applied.clone(),
        );
        r.register(
            "revision_refused",
            "1 while the newest revision of the branch is refused and an older one stays in force",
            m.revision_refused.clone(),
        );
        r.register(
            "vm_info",
            "One series per VM with its phase, provider and applied revision as labels (always 1)",
            m.vm_info.clone(),
        );
        r.register(
            "task_runs",
            "Task runs (each task's latest) by phase",
            m.task_runs.clone(),
        );
        r.register(
            "prompts_waiting",
            "Prompts from tasks waiting for a human answer",
            m.prompts_waiting.clone(),
        );
        r.register(
            "approvals_waiting",
            "Held plan steps waiting for an approval",
            m.approvals_waiting.clone(),
        );
        r.register(
            "agent_links_connected",
            "VMs whose guest agent is connected",
            m.agent_links.clone(),
        );
        *metrics.registry.lock().unwrap_or_else(|p| p.into_inner()) = registry;
        metrics
    }
}

impl Metrics {
    pub fn observe_reconcile(&self, seconds: f64) {
        self.reconcile_seconds.observe(seconds);
    }

    pub fn observe_fetch(&self, seconds: f64) {
        self.fetch_seconds.observe(seconds);
    }

    pub fn set_phases(&self, counts: &crate::status::Counts) {
        for (phase, n) in [
            ("Running", counts.running),
            ("Stopped", counts.stopped),
            ("Pending", counts.pending),
            ("Failed", counts.failed),
            ("Unknown", counts.unknown),
        ] {
            self.vms
                .get_or_create(&PhaseLabel {
                    phase: phase.into(),
                })
                .set(n as i64);
        }
        self.drifted.set(counts.drifted as i64);
    }

    pub fn count_step(&self, action: &str, ok: bool) {
        let outcome = if ok { "succeeded" } else { "failed" };
        self.steps
            .get_or_create(&StepLabel {
                action: action.into(),
                outcome: outcome.into(),
            })
            .inc();
    }

    pub fn count_refused_revision(&self) {
        self.refused_revisions.inc();
    }

    /// One attempt to deliver an event to a notification sink.
    pub fn count_delivery(&self, sink: &str, outcome: &str) {
        self.deliveries
            .get_or_create(&DeliveryLabel {
                sink: sink.into(),
                outcome: outcome.into(),
            })
            .inc();
    }

    /// What the status files say, then every series, under one lock: two scrapes at once
    /// never see a family half rebuilt. OpenMetrics, or the Prometheus text format.
    pub fn encode_observed(&self, snapshot: &super::pages::Snapshot, openmetrics: bool) -> String {
        let registry = self.registry.lock().unwrap_or_else(|p| p.into_inner());
        self.observe_status(snapshot);
        let mut out = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut out, &registry);
        if openmetrics {
            out
        } else {
            prometheus_text(&out)
        }
    }

    /// Sets what the status files say: read at each scrape, so it survives a restart and
    /// a VM that went away leaves no series behind.
    fn observe_status(&self, snapshot: &super::pages::Snapshot) {
        let summary = snapshot.summary.as_ref();
        let applied = summary
            .and_then(|s| s.last_applied)
            .and_then(|t| t.system_time().duration_since(std::time::UNIX_EPOCH).ok())
            .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
        self.last_applied.set(applied);
        let refused = summary.is_some_and(|s| s.revision_refused.is_some());
        self.revision_refused.set(i64::from(refused));
        self.vm_info.clear();
        for vm in snapshot.vms.values() {
            self.vm_info
                .get_or_create(&VmInfoLabel {
                    vm: vm.name.clone(),
                    phase: vm.phase.as_str().into(),
                    provider: vm.provider.clone(),
                    revision: vm
                        .applied_revision
                        .as_deref()
                        .map(|r| r.chars().take(12).collect())
                        .unwrap_or_default(),
                })
                .set(1);
        }
        let connected = snapshot
            .vms
            .values()
            .filter(|vm| vm.agent.as_ref().is_some_and(|a| a.connected))
            .count();
        self.agent_links
            .set(i64::try_from(connected).unwrap_or(i64::MAX));
        self.task_runs.clear();
        for phase in crate::status::tasks::TaskPhase::ALL {
            let n = snapshot.tasks.values().filter(|t| t.phase == phase).count();
            self.task_runs
                .get_or_create(&PhaseLabel {
                    phase: phase.as_str().into(),
                })
                .set(i64::try_from(n).unwrap_or(i64::MAX));
        }
        let prompts = snapshot.pending_prompts().count();
        self.prompts_waiting
            .set(i64::try_from(prompts).unwrap_or(i64::MAX));
        let approvals = snapshot.approvals.len();
        self.approvals_waiting
            .set(i64::try_from(approvals).unwrap_or(i64::MAX));
    }

    /// One brokered connection of `vm` ended. A refused one is counted, not its bytes
    /// (as in the task's totals: it moved only the broker's answer).
    pub fn count_egress(&self, vm: &str, used: &crate::broker::Used) {
        let vm = vm.to_owned();
        let outcome = if used.allowed() { "allowed" } else { "refused" };
        self.egress_connections
            .get_or_create(&OutcomeLabel {
                vm: vm.clone(),
                outcome: outcome.into(),
            })
            .inc();
        if !used.allowed() {
            return;
        }
        for (direction, bytes) in [("up", used.bytes_up), ("down", used.bytes_down)] {
            self.egress_bytes
                .get_or_create(&DirectionLabel {
                    vm: vm.clone(),
                    direction: direction.into(),
                })
                .inc_by(bytes);
        }
        if let Some(crate::tokens::Metered { tokens, .. }) = &used.tokens {
            for (token, count) in [("input", tokens.input), ("output", tokens.output)] {
                self.egress_tokens
                    .get_or_create(&TokenLabel {
                        vm: vm.clone(),
                        token: token.into(),
                    })
                    .inc_by(count);
            }
        }
    }
}

/// OpenMetrics → the Prometheus text format. They differ, for what fleet exports, in two
/// places: a counter's HELP and TYPE name its samples' name (`x_total`, where OpenMetrics
/// names the family `x`), and there is no `# EOF`. Without the first, `promtool check
/// metrics` sees counters with no help and no type.
fn prometheus_text(openmetrics: &str) -> String {
    let counters: std::collections::HashSet<&str> = openmetrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE ")?.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(openmetrics.len() + 64 * counters.len());
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let renamed = ["# HELP ", "# TYPE "].iter().find_map(|prefix| {
            let rest = line.strip_prefix(prefix)?;
            let (name, tail) = rest.split_once(' ')?;
            counters
                .contains(name)
                .then(|| format!("{prefix}{name}_total {tail}"))
        });
        match renamed {
            Some(line) => out.push_str(&line),
            None => out.push_str(line),
        }
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_are_named_by_their_samples_in_the_prometheus_format() {
        let metrics = Metrics::default();
        metrics.count_step("create", true);
        let snapshot = crate::http::pages::Snapshot::empty();
        let text = metrics.encode_observed(&snapshot, false);
        assert!(
            text.contains("# HELP fleet_apply_steps_total Apply steps"),
            "{text}"
        );
        assert!(
            text.contains("# TYPE fleet_apply_steps_total counter"),
            "{text}"
        );
        assert!(
            text.contains("fleet_apply_steps_total{action=\"create\",outcome=\"succeeded\"} 1")
        );
        assert!(!text.contains("# EOF"));
        // Histograms and gauges keep their names.
        assert!(text.contains("# TYPE fleet_reconcile_duration_seconds histogram"));
        assert!(text.contains("# TYPE fleet_vms_drifted gauge"));
        assert!(
            metrics
                .encode_observed(&snapshot, true)
                .contains("# TYPE fleet_apply_steps counter")
        );
    }
}
