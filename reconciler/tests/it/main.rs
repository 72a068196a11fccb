//! fleet's integration tests: one test binary (`cargo test -p fleet --test it`), one module
//! per area. Each module's own doc says more; this is the map.
//!
//! What a module needs is one of:
//! - nothing: git and the `fleet` binary cargo builds for the tests; runs in every
//!   `cargo test`;
//! - libvirt: real libvirtd and QEMU (TCG, so no KVM) on `qemu:///system` and the micro image
//!   (`make image`); runs when `FLEET_TEST_LIBVIRT=1`;
//! - fakepve: the fake Proxmox VE API in the venv `make fakepve` makes; runs when
//!   `FLEET_TEST_PROXMOX=1`.
//!
//! `make test` (and so CI) sets both variables. With a variable set, anything missing fails
//! the test rather than skipping it, so a broken host cannot pass as green. Libvirt tests name
//! their domains with a prefix of their own and remove them on drop, even when they fail.
//!
//! - `access` (libvirt, tmux): getting into a VM under `fleet serve`. `fleet exec` passes
//!   output, errors, input and exit codes (a signal as 128 + it, a missing program as 255)
//!   through the agent link, 3 MiB of output within the link's credit; `--tty` under tmux
//!   types into a guest shell and follows a resize, and Ctrl-] ends it from this side; a VM
//!   fleet does not manage is refused; events say who ran what, never its output. A VM with
//!   a NIC shows the address its agent reports (status file, `fleet status`, the page).
//!   `fleet console` under tmux reaches the guest's shell and leaves with Ctrl-]; `--follow`
//!   prints the log without escapes. Snapshots of a running VM with a disk: a revert, planned
//!   and journaled by `fleet serve`, brings back a file's earlier content; bad and reserved
//!   names, unknown snapshots and foreign VMs are refused.
//! - `approvals` (libvirt): destroy safety through `fleet apply`. A protected VM survives the
//!   deletion of its file; destroys beyond `maxDestroysPerApply` wait; `policy.approve` holds
//!   a step kind; a revision that empties a provider waits. An approval naming another digest
//!   is refused and noted; the right one (a commit or a host file) releases exactly the held
//!   steps.
//! - `behaviour` (libvirt and fakepve): the same six steps (create, converge, resize, remove,
//!   claim a foreign VM's name, empty the fleet) on both drivers must give the same plan lines
//!   and exit codes.
//! - `cli` (nothing): the binary on real git repositories, planning against libvirt's
//!   in-process `test:///default`. Committed tip versus `--worktree`, `--rev`, plan exit
//!   codes and JSON, an invalid revision never applied, a stale saved plan refused, apply
//!   asking before it acts, `hitl list` printing no escape a guest sent.
//! - `daemon` (libvirt): `fleet serve` on real git. A commit creates its VM and the agent's
//!   hello shows in its status (again with a new boot id after a heal); `virsh destroy` and
//!   `virsh setmem --config` are healed with drift events; a bad commit is refused while the
//!   last good revision stays applied; a second writer is refused; the page is read in
//!   headless Chromium and refuses other hosts; 500 half-open clients do not stall it;
//!   SIGTERM exits 0 and frees the lock. A VM in backoff is written to the plan as deferred.
//! - `fuzz` (nothing): proptest. Arbitrary bytes in every place of `fleet/` and in the host
//!   configuration, random edits of valid files of every kind, arbitrary answers as host text
//!   and as committed files: the loader never panics, every diagnostic points at a real file
//!   and position, a loaded revision resolves, and an accepted answer is one bounded line of
//!   plain text. 256 cases per property (`FLEET_FUZZ_CASES`); `make fuzz` runs 20,000.
//! - `hostile` (libvirt): a real `fleet serve` and two VMs, one running
//!   `tests/hostile/agent.sh` in place of `fleet-agent` (built into an initrd by
//!   `build-micro.sh`). It injects output, a prompt, an artifact and an exit into the other
//!   VM's run, churns its boot id, floods its own run (96 MiB of output, a 2^43 offset, 1100
//!   artifact files, 150 prompts of 200 KiB) and stops reading. The other run keeps its own
//!   output and exit, a new task on the other VM still runs meanwhile, the flooded run is cut
//!   to its bounds and says so, and `fleet serve`'s peak RSS stays under the test's bound.
//! - `libvirt` (libvirt): the foundation as one story. A 3-VM fleet boots to userspace and
//!   converges; a foreign name clash is reported and never touched; deleting a file destroys
//!   exactly that VM and its files; a memory change updates in place with a restart; each
//!   agent says hello and runs a command in a terminal. Also: disk images get qcow2 overlays
//!   and a new base disk replaces the VM (backing files outside the image root refused); an
//!   interrupted create (open intents, half-made files) is recovered without a duplicate;
//!   storage QEMU's user cannot reach is a clear error up front, not drift. Also holds the
//!   helpers other libvirt tests use (`enabled`, `Cleanup`, `virsh`).
//! - `lifecycle` (libvirt): leases and idle stop under `fleet serve`. A VM is stopped at its
//!   lease's end and another destroyed (files included), both kept so across a pass, and
//!   brought back by a renewal from the host (`fleet lease renew`) and from a commit
//!   (`lease.renewals`). An idle VM is stopped after `stopAfter` with no run, and a new
//!   task wakes it and runs.
//! - `load_corpus` (nothing): about 150 bad (and a few good) inputs, each a small `fleet/`
//!   tree with the exact diagnostics it must give, many of them the host's rules (connection
//!   fields and recipients in a revision, unknown providers, image paths, repositories,
//!   interval floors, Secret scoping, the provider token, limits). `UPDATE_EXPECT=1` rewrites
//!   the expectations; review the diff.
//! - `netguard` (libvirt): a `network: full` VM reaches a server in a network namespace the
//!   test makes (the stand-in for the outside; a fence drops anything else it forwards) and
//!   none of the host's own addresses or loopback. With the guard's rejects removed, the same
//!   test fails.
//! - `packaging` (nothing; bash, man-db, tmux and promtool): `fleet completion bash` completes
//!   subcommands, flags and VM names in a real bash; every man page renders with `man -l`
//!   without a warning; `docs/alerts.yaml` passes `promtool check rules`; `fleet serve`
//!   speaks systemd's notify protocol; `fleet events --follow` in tmux shows a new event
//!   within a second.
//! - `proxmox` (fakepve): the driver through the whole life of a fleet (create, drift and
//!   heal, restart on resize, destroy, snippet sweeping and legacy names, foreign VMs never
//!   touched), faults retried and kept to their VM, TLS verified unless the provider says
//!   otherwise, a token with exactly the privileges `docs/proxmox.md` lists, and a VM with
//!   `reset: beforeEachTask` snapshotted before its first boot, rolled back before a run
//!   with today's config written back. `fleet snapshot` through the snapshot API (a revert
//!   planned and run by `fleet apply`: stop, rollback, boot), and `fleet console` through
//!   termproxy and the API's websocket. Also the Proxmox crash test, below.
//! - `proxmox_guest` (fakepve, and `make agent`): the guest link end to end. The harness runs
//!   `agent/exec` for real (stdin, stdout, exit code, as qemu-guest-agent does) in a private
//!   mount namespace per running VM, each with its own tmpfs `/run` and boot id, running the
//!   real `fleet-agent relay`. A repository shipped over many exchanges, exit code, output and
//!   artifacts; a prompt answered from the host; a secret as a variable and as a file; fleet
//!   killed mid-task and re-attaching with complete output; output through a network that
//!   drops a fifth of the requests (complete, in order, once); a reboot, after which secrets
//!   are delivered again; the API token read from a Secret; the canary nowhere on the host;
//!   `fleet exec` over the relayed link.
//! - `workspaces` (libvirt): a task writes into a workspace; its VM is replaced, destroyed
//!   and made again, and a later task reads the file back; deleting the Workspace's file
//!   waits for an approval, and the approved destroy removes its volume only.
//! - `pve` (fakepve): the harness. fakepve runs in-process under `tests/fakepve/harness.py`
//!   (`FLEET_FAKEPVE_PYTHON` overrides the venv's Python), driven over stdin (add VMs, edit
//!   behind fleet's back, inject failures and latency, a flaky network, grant privileges) and
//!   recording every request with its query and body. Each request is checked against the PVE
//!   API schema (fakepve's bundled copy, or the file `FLEET_PVE_SCHEMA` names): path, method,
//!   parameter names (`net[n]` style included), types, enums, patterns, bounds, required
//!   ones. Its test shows the checker refusing what PVE would.
//! - `remote` (libvirt, sshd): a second libvirt host on this machine (libvirtd in a mount
//!   namespace of its own, reached over `qemu+ssh://` through an sshd in that namespace).
//!   A pool of 4 placed over both hosts is spread 2 + 2 and boots; a remote member's task
//!   asks and is answered over the agent channel opened through libvirt; the remote
//!   libvirtd killed, its members are Unknown and made nowhere else, a new member waits,
//!   and the local VM's change is applied; restarted, the members are found as they were,
//!   the new one is placed, and the plan is empty.
//! - `secrets` (libvirt, and the `age` CLI): `age` and fleet decrypt each other's values. A
//!   canary secret used by a task in a real VM reaches it as a variable and as a 0400 file on
//!   a tmpfs, and appears in none of: `.fleet` (status, journal, events, seed ISOs, console
//!   logs), fleet's debug logs, `virsh dumpxml`, the HTTP responses, any process's argv. The
//!   plan shows a changed value without it; after `virsh reset` it is delivered again;
//!   without its last reference it leaves the guest; a tampered value and a stranger's
//!   identity hold only the tasks that need them.
//! - `seed` (libvirt's variable, and cloud-init installed): every example VM's user-data
//!   passes `cloud-init schema`.
//! - `support` (nothing to run): shared helpers, temporary git repositories and running the
//!   `fleet` binary.
//! - `tasks` (libvirt): `fleet serve` with the micro image and the real agent. Exit code,
//!   output, repository files and artifacts; a `(y/n)` question becomes a prompt file,
//!   answered by a commit and from the host, each typed once, a second answer refused; a
//!   timeout leaves no process in the guest; deleting a task file cancels it; fleet killed
//!   with SIGKILL mid-task re-attaches with the output complete, in order, and the task run
//!   once.
//! - `tidy` (nothing): the rules of `docs/ARCHITECTURE.md`, checked against the sources. The
//!   core crate does no I/O; git2 stays in `source` and `tasks::repo`; an `Event` is built only
//!   by its constructors; every module is on the code map; module docs name only identifiers
//!   the code uses.
//! - `trust` (nothing, one test libvirt): the trust boundary between a commit and the host,
//!   one test per finding of the security review. Committed `qemu+ext`, `test:///FILE` and
//!   `qemu+tcp` URIs, storage directories and Proxmox endpoints are refused by `validate` and
//!   `plan` with no hook run and no connection made; a host configuration others can write is
//!   refused; an image symlink out of the root is refused; a forged saved plan (digest
//!   recomputed) changes nothing; committed recipients are never used, and a command-line one
//!   the host does not list needs a yes; a 1 GiB git blob bomb is refused with peak RSS under
//!   128 MiB; a storage directory fleet did not make is never claimed, chmodded or emptied.
//!
//! Crash tests. SIGKILL at random points, recover, and check that nothing is made twice or
//! left behind:
//! - libvirt: the `fleet-crash` binary (`make crash-test TRIALS=N`; CI runs 10, run 100 or
//!   more before a release). Up to 20 micro VMs; each trial commits random creates, replaces
//!   and destroys, kills `fleet apply` after a random delay (every fourth trial kills and
//!   restarts libvirtd instead), and recovers with `fleet apply`. It checks for duplicate
//!   stamps, storage without a domain, convergence (the domains are the fleet's VMs and
//!   `fleet plan` has no changes) and unfinished journal intents, prints
//!   `trials=N duplicates=D orphans=O converged=C`, and fails unless D=O=0 and C=N.
//! - Proxmox: `proxmox::a_killed_apply_on_proxmox_leaves_no_duplicate_and_no_orphan`, 10
//!   trials in `make test`, N with `make crash-test-proxmox TRIALS=N`. Each request takes
//!   20 ms so kills land inside applies. Random creates, removals and resizes; `fleet apply`
//!   is killed a random moment after its first journaled intent, then run to completion.
//!   Each trial checks: every VM stamped once, under its own name; the VMs are exactly the
//!   fleet's, with the spec's cores and fleet's tag; no lock left and no snippet outliving
//!   its VM; `fleet plan` has no changes and the journal is empty; the foreign VM unchanged.
//!   It found that a clone carrying the full stamp, killed before its config write, was taken
//!   as converged (hence the unfinished stamp), and, in CI under load, a snippet temp file
//!   left by a kill before its rename (hence the sweep).
//!
//! Benchmarks: the `fleet-bench` binary (`make bench`, needs libvirtd) measures planning a
//! 10,000-VM fleet (time and peak RSS next to their targets), a no-op observation of 1,000
//! VMs next to the same bare libvirt calls, and the daemon's commit-to-apply latency and
//! idle cost. Performance is measured there, not asserted: tests hold only loose safety
//! bounds (such as `hostile`'s), so a slow shared machine does not fail them.
//!
//! Beside this binary, unit tests live next to the code: the loader and its schema
//! messages, resolve's merge rules, planner snapshots (`plan/tests.rs`, expect-test),
//! committed schemas against the types (`UPDATE_EXPECT=1` rewrites), domain XML round trips,
//! journal recovery, the apply engine against a fault-injecting driver (isolation, retries,
//! deadlines), the task book driven by hand (`tasks/tests.rs`), the vault, and the agent's
//! prompt detector, task runner and secret store.

#![allow(clippy::disallowed_methods)] // fixtures are written however a test likes

mod access;
mod approvals;
mod behaviour;
mod cli;
mod daemon;
mod egress;
mod follow;
mod fresh;
mod fuzz;
mod git_remote;
mod hostile;
mod libvirt;
mod lifecycle;
mod load_corpus;
mod netguard;
mod notify;
mod packaging;
mod proxmox;
mod proxmox_guest;
mod pve;
mod real_agent;
mod remote;
mod secrets;
mod seed;
mod signed;
mod support;
mod tasks;
mod tidy;
mod trust;
mod workspaces;
