//! fleet: GitOps for agent-sandbox VMs.
pub mod load;
pub mod observe;
pub mod plan;
pub mod resolve;
pub mod source;
pub mod spec;
