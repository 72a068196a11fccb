//! The task runs a revision starts, runs again or cancels, as `fleet plan` shows them: a
//! reviewer of a pull request sees that merging it starts a coding agent, where, on what.
//!
//! Pure: the revision's tasks against what the status directory records of their runs.

use std::collections::BTreeMap;
use std::fmt::Write;

use crate::resolve::DesiredTask;

/// What the status directory records of a task's latest run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecordedRun {
    pub vm: String,
    /// The spec hash of the task the run is of (`DesiredTask::spec_hash`); absent in
    /// records written before it was kept, which are then compared by `run_hash`.
    pub task_hash: Option<String>,
    /// The hash that identifies the run (the spec's, with its secret values' when it has
    /// secrets).
    pub run_hash: String,
    /// Pending, staging, running or waiting for input.
    pub active: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RunChange {
    /// A task with no run yet.
    Start,
    /// A finished run whose task changed: a new run.
    RunAgain,
    /// A run under way whose task changed: it is cancelled and a new one starts.
    Restart,
    /// A run under way whose task file is gone.
    Cancel,
}

impl RunChange {
    pub(crate) fn symbol(self) -> &'static str {
        match self {
            RunChange::Start => "+",
            RunChange::RunAgain => "~",
            RunChange::Restart => "-/+",
            RunChange::Cancel => "-",
        }
    }
}

/// One task run the revision changes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TaskRun {
    pub task: String,
    /// The VM, or for a fresh task (`fresh`) the pool whose member each run gets.
    pub vm: String,
    pub fresh: bool,
    pub change: RunChange,
    /// The command, shortened (an agent's is its CLI and prompt).
    pub command: String,
    /// `url@branch`, `url@branch@rev` when pinned (or `url`, the remote's HEAD), and the
    /// credential it is fetched with.
    pub repository: Option<String>,
    /// Where the checkout's commits are made in the guest.
    pub branch: Option<String>,
}

impl TaskRun {
    /// Where it runs, in words.
    pub fn target(&self) -> String {
        if self.fresh {
            format!("a fresh member of pool {}", self.vm)
        } else {
            format!("VM {}", self.vm)
        }
    }
}

/// The longest command shown; the file holds the rest.
const COMMAND_CHARS: usize = 100;
/// The longest agent prompt shown.
const PROMPT_CHARS: usize = 200;

/// The runs `tasks` start, run again or cancel, given the `recorded` latest runs (by task).
/// A task whose run is recorded by its run hash only, and that has secrets, is left out:
/// without reading secret values a plan cannot tell whether it changed.
pub fn task_runs(
    tasks: &BTreeMap<String, DesiredTask>,
    recorded: &BTreeMap<String, RecordedRun>,
) -> Vec<TaskRun> {
    let mut runs = Vec::new();
    for (name, task) in tasks {
        let change = match recorded.get(name) {
            None => Some(RunChange::Start),
            Some(run) => {
                let same = match &run.task_hash {
                    Some(hash) => *hash == task.spec_hash,
                    None => task.secrets.is_empty() && run.run_hash == task.spec_hash,
                } || (run.task_hash.is_none() && !task.secrets.is_empty());
                match (same, run.active) {
                    (true, _) => None,
                    (false, true) => Some(RunChange::Restart),
                    (false, false) => Some(RunChange::RunAgain),
                }
            }
        };
        if let Some(change) = change {
            runs.push(TaskRun {
                task: name.clone(),
                vm: task.vm.clone(),
                fresh: task.fresh.is_some(),
                change,
                command: match &task.agent {
                    Some(agent) => agent_line(agent),
                    None => shortened(&task.argv),
                },
                repository: task.repository.as_ref().map(|r| {
                    // `url@branch`, pinned `url@branch@rev`; a credential is named, never
                    // shown (its value is not here to show).
                    let mut at = shown(&r.url);
                    for part in [&r.branch, &r.rev].into_iter().flatten() {
                        at = format!("{at}@{}", shown(part));
                    }
                    if let Some(c) = &r.credentials {
                        at = format!("{at} (credential {}/{})", c.secret.0, c.key.0);
                    }
                    at
                }),
                branch: task.repository.as_ref().map(|_| format!("fleet/{name}")),
            });
        }
    }
    for (name, run) in recorded {
        if run.active && !tasks.contains_key(name) {
            runs.push(TaskRun {
                task: name.clone(),
                vm: run.vm.clone(),
                fresh: false,
                change: RunChange::Cancel,
                command: String::new(),
                repository: None,
                branch: None,
            });
        }
    }
    runs.sort_by(|a, b| a.task.cmp(&b.task));
    runs
}

/// A coding agent as a reviewer wants to read it: which, with which model, on what prompt
/// (cut at `PROMPT_CHARS`; the file holds the rest).
fn agent_line(agent: &crate::spec::AgentSpec) -> String {
    let kind = serde_json::to_value(agent.kind)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default();
    let model = agent
        .model
        .as_deref()
        .map(|m| format!(" (model {})", shown(m)))
        .unwrap_or_default();
    let prompt = shown(&agent.prompt);
    let prompt = match prompt.char_indices().nth(PROMPT_CHARS) {
        Some((at, _)) => format!("{}…", &prompt[..at]),
        None => prompt,
    };
    let how = if agent.interactive {
        "interactive, asking before it acts"
    } else {
        "acting without asking"
    };
    format!("{kind} agent{model}, {how}: \"{prompt}\"")
}

/// The command line as a reader would type it, cut at `COMMAND_CHARS`.
fn shortened(argv: &[String]) -> String {
    let line = argv
        .iter()
        .map(|a| {
            if !a.is_empty()
                && a.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_./=:@%+,".contains(c))
            {
                a.clone()
            } else {
                format!("'{}'", a.replace('\'', "'\\''"))
            }
        })
        .collect::<Vec<_>>()
        .join(" ");
    let line = shown(&line);
    match line.char_indices().nth(COMMAND_CHARS) {
        Some((at, _)) => format!("{}…", &line[..at]),
        None => line,
    }
}

/// `text` as a plan may print what a pull request wrote: control characters (a newline
/// would forge a plan line, an escape sequence rewrite the terminal) and the invisible
/// formatting ones (bidirectional overrides and isolates, zero-width characters, which make
/// a command read as another) are written as `\u{…}`.
fn shown(text: &str) -> String {
    let invisible = |c: char| {
        matches!(c, '\u{00AD}' | '\u{061C}' | '\u{180E}' | '\u{200B}'..='\u{200F}'
            | '\u{202A}'..='\u{202E}' | '\u{2060}'..='\u{206F}' | '\u{FEFF}'
            | '\u{FFF9}'..='\u{FFFB}')
    };
    text.chars()
        .map(|c| {
            if c.is_control() || invisible(c) {
                c.escape_unicode().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}

/// The section `fleet plan` prints after the VMs' steps; empty when no run changes.
pub fn render(runs: &[TaskRun]) -> String {
    if runs.is_empty() {
        return String::new();
    }
    let mut out = String::new();
    let count = |c: RunChange| runs.iter().filter(|r| r.change == c).count();
    let _ = writeln!(
        out,
        "\nTask runs: {} to start, {} to run again, {} to restart, {} to cancel.",
        count(RunChange::Start),
        count(RunChange::RunAgain),
        count(RunChange::Restart),
        count(RunChange::Cancel)
    );
    for run in runs {
        let (verb, why) = match run.change {
            RunChange::Start => ("start", ""),
            RunChange::RunAgain => ("run again", " (its spec changed)"),
            RunChange::Restart => (
                "restart",
                " (its spec changed: the run under way is cancelled)",
            ),
            RunChange::Cancel => ("cancel", " (its file is gone; the run under way stops)"),
        };
        let _ = writeln!(
            out,
            "  {} {verb} task {} on {}{why}",
            run.change.symbol(),
            run.task,
            run.target()
        );
        if !run.command.is_empty() {
            let _ = writeln!(out, "      runs: {}", run.command);
        }
        if let (Some(repository), Some(branch)) = (&run.repository, &run.branch) {
            let _ = writeln!(
                out,
                "      on:   {repository} (checked out as {branch} in the guest)"
            );
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::{GitIdentity, Repository};

    fn task(name: &str, argv: &[&str], hash: &str) -> DesiredTask {
        DesiredTask {
            name: name.into(),
            vm: "agent-1".into(),
            fresh: None,
            argv: argv.iter().map(|a| (*a).to_owned()).collect(),
            agent: None,
            env: BTreeMap::new(),
            repository: None,
            git_author: GitIdentity {
                name: "fleet".into(),
                email: "f@fleet.invalid".into(),
            },
            results_push: None,
            timeout: std::time::Duration::from_secs(60),
            artifacts: Vec::new(),
            prompt_patterns: Vec::new(),
            prompt_deadline: std::time::Duration::from_secs(60),
            on_deadline: Default::default(),
            allow_control: false,
            rerun: 0,
            secrets: Vec::new(),
            egress: None,
            spec_hash: hash.into(),
            source: format!("fleet/tasks/{name}.yaml"),
        }
    }

    fn recorded(hash: &str, active: bool) -> RecordedRun {
        RecordedRun {
            vm: "agent-1".into(),
            task_hash: Some(hash.into()),
            run_hash: hash.into(),
            active,
        }
    }

    #[test]
    fn a_plan_names_each_run_a_revision_starts_reruns_restarts_or_cancels() {
        let mut fix = task("fix", &["claude", "--print"], "h-fix");
        fix.agent = Some(crate::spec::AgentSpec {
            kind: crate::spec::AgentKind::Claude,
            prompt: "fix the failing test,\nthen commit".into(),
            model: Some("sonnet".into()),
            interactive: false,
        });
        fix.repository = Some(Repository {
            url: "https://git.example.org/team/app".into(),
            branch: Some("main".into()),
            rev: Some("0123456789abcdef0123456789abcdef01234567".into()),
            credentials: Some(crate::spec::RepositoryCredentials {
                secret: crate::spec::Name("gitea".into()),
                key: crate::spec::SecretKey("token".into()),
                username: None,
            }),
        });
        let tasks = BTreeMap::from([
            ("fix".to_owned(), fix),
            (
                "build".to_owned(),
                task("build", &["make", "test"], "h-build-2"),
            ),
            (
                "lint".to_owned(),
                task("lint", &["make", "lint"], "h-lint-2"),
            ),
            ("same".to_owned(), task("same", &["true"], "h-same")),
        ]);
        let records = BTreeMap::from([
            ("build".to_owned(), recorded("h-build-1", false)),
            ("lint".to_owned(), recorded("h-lint-1", true)),
            ("same".to_owned(), recorded("h-same", true)),
            ("old".to_owned(), recorded("h-old", true)),
            ("done".to_owned(), recorded("h-done", false)),
        ]);
        let text = render(&task_runs(&tasks, &records));
        expect_test::expect![[r#"

            Task runs: 1 to start, 1 to run again, 1 to restart, 1 to cancel.
              ~ run again task build on VM agent-1 (its spec changed)
                  runs: make test
              + start task fix on VM agent-1
                  runs: claude agent (model sonnet), acting without asking: "fix the failing test,\u{a}then commit"
                  on:   https://git.example.org/team/app@main@0123456789abcdef0123456789abcdef01234567 (credential gitea/token) (checked out as fleet/fix in the guest)
              -/+ restart task lint on VM agent-1 (its spec changed: the run under way is cancelled)
                  runs: make lint
              - cancel task old on VM agent-1 (its file is gone; the run under way stops)
        "#]]
        .assert_eq(&text);
    }

    #[test]
    fn nothing_changes_nothing_is_printed_and_long_commands_are_cut() {
        let tasks = BTreeMap::from([("same".to_owned(), task("same", &["true"], "h"))]);
        let records = BTreeMap::from([("same".to_owned(), recorded("h", false))]);
        assert_eq!(render(&task_runs(&tasks, &records)), "");
        let long = "x".repeat(300);
        let line = shortened(&["echo".into(), long, "a\nb".into()]);
        assert_eq!(line.chars().count(), COMMAND_CHARS + 1);
        assert!(line.ends_with('…'));
        // What a pull request writes cannot forge a line, move the cursor or hide text.
        assert_eq!(shortened(&["a\nb".into()]), "'a\\u{a}b'");
        assert_eq!(shortened(&["\u{1b}[2Kok".into()]), "'\\u{1b}[2Kok'");
        assert_eq!(shown("rm\u{202e}txt.sh"), "rm\\u{202e}txt.sh");
    }

    #[test]
    fn an_old_record_of_a_task_with_secrets_is_not_claimed_to_change() {
        let mut with_secret = task("s", &["true"], "h-spec");
        with_secret.secrets = vec![crate::spec::SecretRef {
            secret: crate::spec::Name("model".into()),
            key: crate::spec::SecretKey("api_key".into()),
            env: Some("KEY".into()),
            file: None,
        }];
        let old = RecordedRun {
            vm: "agent-1".into(),
            task_hash: None,
            run_hash: "h-run-with-secret-values".into(),
            active: false,
        };
        let tasks = BTreeMap::from([("s".to_owned(), with_secret)]);
        let records = BTreeMap::from([("s".to_owned(), old)]);
        assert!(task_runs(&tasks, &records).is_empty());
    }
}
