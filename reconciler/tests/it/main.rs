//! One integration-test binary: the bad-input corpus, CLI behaviour, real libvirt, and fakepve.

#![allow(clippy::disallowed_methods)] // fixtures are written however a test likes

mod approvals;
mod behaviour;
mod cli;
mod daemon;
mod fuzz;
mod hostile;
mod libvirt;
mod load_corpus;
mod netguard;
mod proxmox;
mod proxmox_guest;
mod pve;
mod secrets;
mod seed;
mod support;
mod tasks;
mod trust;
