//! fleet's pure core: everything that decides, nothing that does.
//!
//! The pipeline's pure half lives here: `spec` (the fleet format), `load` (bytes of a
//! revision to typed objects or located diagnostics), `resolve` (the desired state),
//! `seed` (cloud-init documents), `observe` (what a driver reports, as data) and `plan`
//! (what to do, and why). `snapshot`, `digest`, `ids` and `answer` are the leaves they share.
//!
//! This crate depends on no I/O crate (no tokio, virt, git2, reqwest, axum) and its modules
//! read no files, clocks or environment: the shell (`fleet`) gathers inputs and passes them
//! in. The tidy test (`reconciler/tests/it/tidy.rs`) keeps it that way.

pub mod answer;
pub mod digest;
pub mod egress;
pub mod idle;
pub mod ids;
pub mod lease;
pub mod lifecycle;
pub mod load;
pub mod observe;
pub mod placement;
pub mod plan;
pub mod reset;
pub mod resolve;
pub mod schema_doc;
pub mod seed;
pub mod snapshot;
pub mod spec;
pub mod time;
pub mod tokens;
