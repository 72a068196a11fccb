//! The CLI on real git repositories, without a hypervisor.
