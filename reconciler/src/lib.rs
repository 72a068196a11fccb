//! fleet: GitOps for agent-sandbox VMs.
//!
//! The modules follow the pipeline: `source` reads a revision of `fleet/` from git,
//! `load` turns it into typed objects or located diagnostics, `resolve` computes the
//! desired state, drivers (`driver`) `observe` what runs, `plan` decides what to do
//! (pure), `apply` does it (journaled), and `status` writes what happened.
//! `reconcile` wires the stages together for `cli`.

// Tests write fixtures however they like; `clippy.toml`'s bans are for fleet's own files.
#![cfg_attr(test, allow(clippy::disallowed_methods))]

// The pure core, re-exported so the shell and its users name one path (`fleet::plan`).
pub use fleet_core::{
    answer, digest, egress, idle, ids, lease, lifecycle, load, observe, placement, plan, reset,
    resolve, seed, snapshot, spec, time, tokens,
};

pub mod adopt;
pub mod agent_link;
pub mod apply;
pub mod approvals;
pub mod atomic_file;
pub mod broker;
pub mod cli;
pub mod completion;
pub mod console;
pub mod daemon;
pub mod doctor;
pub mod driver;
pub mod events;
pub mod exec;
pub mod fsguard;
pub mod hitl;
pub mod host;
pub mod http;
pub mod image_content;
pub mod leases;
pub mod notify;
pub mod output;
pub mod progress;
pub mod reconcile;
pub mod secrets;
pub mod snapshots;
pub mod source;
pub mod status;
pub mod task_view;
pub mod tasks;
pub mod terminal;
pub mod trust;
pub mod tty;
pub mod wait;
