//! Prometheus metrics: reconcile duration, VMs by phase, drifted VMs, apply steps by
//! outcome, when the last revision was applied, and brokered egress by VM (connections by
//! outcome, bytes by direction, model tokens by kind).

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
    last_applied: Gauge,
    egress_connections: Family<OutcomeLabel, Counter>,
    egress_bytes: Family<DirectionLabel, Counter>,
    egress_tokens: Family<TokenLabel, Counter>,
}

impl Default for Metrics {
    fn default() -> Metrics {
        let mut registry = Registry::with_prefix("fleet");
        let reconcile_seconds = Histogram::new([
            0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
        ]);
        let fetch_seconds = Histogram::new([
            0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
        ]);
        registry.register(
            "source_fetch_duration_seconds",
            "Time one fetch of the followed remote took",
            fetch_seconds.clone(),
        );
        let vms = Family::<PhaseLabel, Gauge>::default();
        let drifted = Gauge::default();
        let steps = Family::<StepLabel, Counter>::default();
        let last_applied = Gauge::default();
        registry.register(
            "reconcile_duration_seconds",
            "Time one reconcile pass took",
            reconcile_seconds.clone(),
        );
        registry.register("vms", "VMs by phase", vms.clone());
        registry.register(
            "vms_drifted",
            "VMs whose reality differs from the applied spec",
            drifted.clone(),
        );
        registry.register(
            "apply_steps",
            "Apply steps by action and outcome",
            steps.clone(),
        );
        registry.register(
            "last_applied_revision_timestamp_seconds",
            "Unix time at which the last revision was applied",
            last_applied.clone(),
        );
        let egress_connections = Family::<OutcomeLabel, Counter>::default();
        let egress_bytes = Family::<DirectionLabel, Counter>::default();
        let egress_tokens = Family::<TokenLabel, Counter>::default();
        registry.register(
            "egress_connections",
            "Brokered connections by VM, allowed or refused",
            egress_connections.clone(),
        );
        registry.register(
            "egress_bytes",
            "Bytes brokered connections moved by VM, up or down",
            egress_bytes.clone(),
        );
        registry.register(
            "egress_tokens",
            "Model tokens brokered APIs reported by VM, input or output",
            egress_tokens.clone(),
        );
        Metrics {
            registry: Mutex::new(registry),
            egress_connections,
            egress_bytes,
            egress_tokens,
            reconcile_seconds,
            fetch_seconds,
            vms,
            drifted,
            steps,
            last_applied,
        }
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

    pub fn set_last_applied(&self, unix_seconds: i64) {
        self.last_applied.set(unix_seconds);
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

    /// The Prometheus (OpenMetrics) text form.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        let registry = self.registry.lock().unwrap_or_else(|p| p.into_inner());
        let _ = prometheus_client::encoding::text::encode(&mut out, &registry);
        out
    }
}
