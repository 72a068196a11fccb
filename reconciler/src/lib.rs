//! fleet: GitOps for agent-sandbox VMs.
pub mod load;
pub mod source;
pub mod spec;
