//! Shell completions and man pages, both generated from the CLI definition (clap).
//!
//! `fleet completion bash|zsh|fish` prints a script that asks `fleet` itself for candidates
//! at each TAB (`_FLEET_COMPLETE=<shell> fleet -- <words>`, handled first thing in `main`), so
//! subcommands and flags never drift from the binary, and VM, task and prompt names
//! complete from the status files of the repository in the current directory.

use std::io::Write;
use std::path::Path;

use clap::CommandFactory;
use clap_complete::engine::CompletionCandidate;
use clap_complete::env::EnvCompleter;

use crate::cli::Cli;
use crate::status::StatusDir;

/// The variable the script sets when it asks `fleet` for candidates: a name of fleet's own,
/// so a `COMPLETE` in some CI environment does not turn every command into a completer.
pub const VAR: &str = "_FLEET_COMPLETE";

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum Shell {
    Bash,
    Zsh,
    Fish,
}

/// Answers a completion request from a shell (and exits) when `COMPLETE` is set; returns at
/// once otherwise.
pub fn answer_shell() {
    clap_complete::CompleteEnv::with_factory(Cli::command)
        .var(VAR)
        // Through PATH: the script keeps working when the binary moves or is upgraded.
        .completer("fleet")
        .complete();
}

/// The script that registers fleet's completions with `shell`.
pub fn write_script(shell: Shell, out: &mut dyn Write) -> std::io::Result<()> {
    let completer: &dyn EnvCompleter = match shell {
        Shell::Bash => &clap_complete::env::Bash,
        Shell::Zsh => &clap_complete::env::Zsh,
        Shell::Fish => &clap_complete::env::Fish,
    };
    completer.write_registration(VAR, "fleet", "fleet", "fleet", out)
}

/// fleet(1) and a page per subcommand (fleet-plan(1), fleet-task-logs(1), …) in `dir`.
pub fn write_man_pages(dir: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    clap_mangen::generate_to(Cli::command(), dir)
}

/// What completes names: the status files under the current directory (the default
/// `--status-dir`; a shell's completion request carries no other).
fn status() -> StatusDir {
    StatusDir::new(Path::new(".fleet/status").to_path_buf())
}

/// Names as candidates; only valid names (a status file in a checkout someone else made
/// could hold anything, and the shell inserts a candidate as typed).
fn candidates(names: impl IntoIterator<Item = String>) -> Vec<CompletionCandidate> {
    names
        .into_iter()
        .filter(|n| crate::driver::check_name(n).is_ok())
        .map(CompletionCandidate::new)
        .collect()
}

/// VMs fleet has a status for.
pub fn vm_names() -> Vec<CompletionCandidate> {
    candidates(status().read_vms().into_keys())
}

/// Tasks fleet has a run of.
pub fn task_names() -> Vec<CompletionCandidate> {
    candidates(status().read_task_records().into_keys())
}

/// VMs and tasks (`fleet wait` takes either).
pub fn vm_and_task_names() -> Vec<CompletionCandidate> {
    let mut all = vm_names();
    all.extend(task_names());
    all
}

/// Prompts waiting for an answer.
pub fn prompt_ids() -> Vec<CompletionCandidate> {
    candidates(
        status()
            .read_prompts()
            .into_values()
            .filter(|p| p.state == crate::status::tasks::PromptState::Pending)
            .map(|p| p.id),
    )
}
