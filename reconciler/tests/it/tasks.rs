//! Tasks and prompts on a real VM (real libvirtd, the micro image, the real agent):
//! exit codes, output and artifacts, a repository shipped from the host, prompts answered
//! by a commit and from the host (once each), timeouts that leave no process behind,
//! cancellation by deleting the file and from the host (`fleet task cancel`), and a fleet
//! killed mid-task that re-attaches.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::daemon::{Daemon, read, wait_until};
use crate::libvirt::{Cleanup, enabled, fleet_yaml_with_policy, vm_yaml};
use crate::support::Repo;

pub fn task_yaml(name: &str, vm: &str, spec: &str) -> String {
    format!(
        "apiVersion: fleet/v1\nkind: Task\nmetadata: {{name: {name}}}\nspec:\n  vm: {vm}\n{spec}"
    )
}

/// A field of a status YAML file (top-level, scalar).
pub fn field(text: &str, key: &str) -> Option<String> {
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{key}: ")))
        .map(|v| v.trim().trim_matches('\'').trim_matches('"').to_owned())
}

pub struct Status(pub PathBuf);

impl Status {
    pub fn task(&self, name: &str) -> String {
        read(&self.0.join("tasks").join(format!("{name}.yaml")))
    }
    pub fn phase(&self, name: &str) -> Option<String> {
        field(&self.task(name), "phase")
    }
    pub fn output(&self, name: &str) -> String {
        read(&self.0.join("tasks").join(name).join("output.log"))
    }
    /// Waits for the task's record to show `phase`; a timeout shows the record as it is.
    pub fn wait_phase(&self, name: &str, phase: &str, timeout: Duration) {
        let deadline = std::time::Instant::now() + timeout;
        while self.phase(name).as_deref() != Some(phase) {
            assert!(
                std::time::Instant::now() < deadline,
                "timed out waiting until task {name} is {phase}; its record:\n{}",
                self.task(name)
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    /// The ids of the prompts of a task, in order.
    pub fn prompts(&self, task: &str) -> Vec<String> {
        let mut ids: Vec<String> = std::fs::read_dir(self.0.join("hitl"))
            .map(|d| {
                d.flatten()
                    .filter_map(|e| e.file_name().to_str().map(str::to_owned))
                    .filter_map(|n| n.strip_suffix(".yaml").map(str::to_owned))
                    .filter(|n| n.starts_with(&format!("{task}-")))
                    .collect()
            })
            .unwrap_or_default();
        ids.sort_by_key(|id| id.rsplit('-').next().and_then(|n| n.parse::<u32>().ok()));
        ids
    }
    pub fn prompt(&self, id: &str) -> String {
        read(&self.0.join("hitl").join(format!("{id}.yaml")))
    }
}

pub fn app_repository(dir: &Path) {
    git_repository(dir, &[("README", b"the app's readme\n")]);
}

/// A git repository in `dir` with `files` committed on `main`.
pub fn git_repository(dir: &Path, files: &[(&str, &[u8])]) {
    std::fs::create_dir_all(dir).expect("mkdir");
    for (name, content) in files {
        std::fs::write(dir.join(name), content).expect("write");
    }
    for args in [
        &["init", "-q", "-b", "main"][..],
        &["add", "."],
        &[
            "-c",
            "user.name=t",
            "-c",
            "user.email=t@fleet.invalid",
            "commit",
            "-qm",
            "app",
        ],
    ] {
        let ok = std::process::Command::new("git")
            .args(args)
            .current_dir(dir)
            .status()
            .expect("git")
            .success();
        assert!(ok, "git {args:?}");
    }
}

#[test]
fn tasks_run_ask_for_answers_and_survive_a_restart_of_fleet() {
    if !enabled() {
        return;
    }
    let prefix = format!("it{}-task-", std::process::id());
    let _cleanup = Cleanup {
        prefix: prefix.clone(),
    };
    let vm = format!("{prefix}a");
    let repo = Repo::new();
    let app = tempfile::tempdir().expect("tempdir");
    app_repository(app.path());
    // Where the run's commits are pushed for review (libgit2 pushes to bare repositories).
    let review = tempfile::tempdir().expect("tempdir");
    let init = std::process::Command::new("git")
        .args(["init", "-q", "--bare"])
        .arg(review.path())
        .status()
        .expect("git");
    assert!(init.success());
    repo.write(
        "fleet/fleet.yaml",
        fleet_yaml_with_policy(
            &format!("it{}task", std::process::id()),
            "{shutdownTimeout: 10s, reconcileInterval: 30s}",
        ),
    );
    repo.write(&format!("fleet/vms/{vm}.yaml"), vm_yaml(&vm, "256Mi"));
    // Results go back to the task's repository, which the host lets them be pushed to.
    repo.add_host_config("  pushes: ['file:///**']\n");
    repo.write(
        "fleet/tasks/fail.yaml",
        task_yaml(
            "fail",
            &vm,
            &format!(
                "  repository: {{url: 'file://{}', branch: main}}\n  results: {{push: {{url: 'file://{}'}}}}\n  command: [sh, -c, 'cat README; cat .git/HEAD .git/shallow; echo hello; mkdir -p out; echo result > out/r.txt; exit 3']\n  artifacts: ['out/*']\n",
                app.path().display(),
                review.path().display()
            ),
        ),
    );
    repo.write(
        "fleet/tasks/ask.yaml",
        task_yaml(
            "ask",
            &vm,
            "  command: [sh, -c, \"printf 'Continue? (y/n) '; read a; echo answer=$a; printf 'Again? (y/n) '; read b; echo second=$b\"]\n",
        ),
    );
    repo.write(
        "fleet/tasks/slow.yaml",
        task_yaml(
            "slow",
            &vm,
            "  command: [sh, -c, 'sleep 1001 & sleep 1001']\n  timeout: 3s\n",
        ),
    );
    repo.write(
        "fleet/tasks/forever.yaml",
        task_yaml("forever", &vm, "  command: [sleep, '1002']\n"),
    );
    repo.write(
        "fleet/tasks/count.yaml",
        task_yaml(
            "count",
            &vm,
            "  command: [sh, -c, 'echo start >> $HOME/starts; echo starts=$(wc -l < $HOME/starts); for i in $(seq 1 16); do echo line-$i; sleep 0.5; done']\n",
        ),
    );
    repo.commit("a VM and its tasks");
    crate::support::Run(repo.fleet(&["validate"]).0).expect_code(0);
    let mut daemon = Daemon::start(&repo);
    let status = Status(repo.path().join(".fleet/status"));

    // The question shows as a prompt file within 5 s of appearing on the terminal.
    wait_until("ask prints its question", Duration::from_secs(120), || {
        status.output("ask").contains("Continue? (y/n)")
    });
    let asked = Instant::now();
    wait_until("the prompt file appears", Duration::from_secs(5), || {
        !status.prompts("ask").is_empty()
    });
    eprintln!("prompt file {:?} after the question", asked.elapsed());
    let first = status.prompts("ask")[0].clone();
    let prompt = status.prompt(&first);
    assert!(prompt.contains("text: Continue? (y/n)"), "{prompt}");
    assert!(prompt.contains("state: pending"), "{prompt}");
    assert_eq!(status.phase("ask").as_deref(), Some("WaitingForInput"));

    // A failing task: exit code, output, the repository's files, artifacts.
    status.wait_phase("fail", "Failed", Duration::from_secs(60));
    let fail = status.task("fail");
    assert_eq!(field(&fail, "exitCode").as_deref(), Some("3"), "{fail}");
    let output = status.output("fail");
    assert!(output.contains("the app's readme"), "{output}");
    assert!(output.contains("hello"), "{output}");
    // A checkout of the fetched commit, on the task's branch.
    assert!(
        output.contains("ref: refs/heads/fleet/fail"),
        "the checkout is on the task's branch: {output}"
    );
    let commit = fail
        .lines()
        .find_map(|l| l.trim().strip_prefix("commit: "))
        .unwrap_or_else(|| panic!("the repository's commit is recorded: {fail}"));
    assert!(
        output.contains(commit.trim_matches('"')),
        "the checkout holds the recorded commit: {output}"
    );
    assert_eq!(
        read(&status.0.join("tasks/fail/artifacts/out/r.txt")),
        "result\n"
    );
    // What the run left in its checkout came back as a commit on its branch, checked on
    // the host, with the change as a patch.
    wait_until(
        "the run's results are checked",
        Duration::from_secs(30),
        || status.task("fail").contains("results:"),
    );
    let fail = status.task("fail");
    assert!(fail.contains("commits: 1"), "{fail}");
    assert!(fail.contains("filesChanged: 1"), "{fail}");
    assert!(!fail.contains("refused"), "{fail}");
    let patch = read(&status.0.join("tasks/fail/changes.patch"));
    assert!(patch.contains("+++ b/out/r.txt"), "{patch}");
    assert!(patch.contains("\n+result\n"), "{patch}");
    // Pushed to the review repository, on the run's own branch, as the guest committed it.
    let field = |name: &str| {
        fail.lines()
            .find_map(|l| l.trim().strip_prefix(&format!("{name}: ")))
            .map(|v| v.trim_matches('"').to_owned())
            .unwrap_or_else(|| panic!("{name} in {fail}"))
    };
    let (run, head) = (field("run"), field("head"));
    assert!(fail.contains("pushed: "), "{fail}");
    let pushed = std::process::Command::new("git")
        .args(["rev-parse", &format!("refs/heads/fleet/fail/{run}")])
        .current_dir(review.path())
        .output()
        .expect("git");
    assert_eq!(String::from_utf8_lossy(&pushed.stdout).trim(), head);
    let author = std::process::Command::new("git")
        .args(["log", "-1", "--format=%an <%ae>", &head])
        .current_dir(review.path())
        .output()
        .expect("git");
    assert_eq!(
        String::from_utf8_lossy(&author.stdout).trim(),
        "fleet task fail <fail@fleet.invalid>"
    );

    // Kill fleet while `count` runs; a new fleet re-attaches: complete output, one start.
    wait_until("count is under way", Duration::from_secs(30), || {
        status.output("count").contains("line-3")
    });
    daemon.child.kill().expect("SIGKILL fleet");
    daemon.child.wait().expect("reaped");
    std::thread::sleep(Duration::from_secs(2));
    let daemon = Daemon::start(&repo);
    status.wait_phase("count", "Succeeded", Duration::from_secs(60));
    let output = status.output("count");
    assert_eq!(output.matches("starts=").count(), 1, "{output}");
    assert!(output.contains("starts=1"), "{output}");
    let lines: Vec<&str> = output
        .lines()
        .map(str::trim)
        .filter(|l| l.starts_with("line-"))
        .collect();
    let expected: Vec<String> = (1..=16).map(|i| format!("line-{i}")).collect();
    assert_eq!(lines, expected, "complete, in order, no repeats");

    // The timeout kills the whole tree; a later task finds no survivor.
    status.wait_phase("slow", "TimedOut", Duration::from_secs(30));
    repo.remove("fleet/tasks/forever.yaml");
    repo.write(
        "fleet/tasks/check.yaml",
        task_yaml(
            "check",
            &vm,
            "  command: [sh, -c, 'if ps | grep -q \"[s]leep 100[12]\"; then ps; exit 1; fi; echo clean']\n",
        ),
    );
    // The first prompt, still pending across the restart, answered by a commit.
    repo.write(
        &format!("fleet/hitl/{first}.yaml"),
        format!("apiVersion: fleet/v1\nkind: Answer\nmetadata: {{name: {first}}}\nspec: {{response: 'yes'}}\n"),
    );
    let answer_commit = repo.commit("forever goes, check comes, the first answer");
    status.wait_phase("forever", "Cancelled", Duration::from_secs(30));
    status.wait_phase("check", "Succeeded", Duration::from_secs(30));
    assert!(status.output("check").contains("clean"));

    // Cancelled from the host: the run stops, says who stopped it, and is not run again.
    repo.write(
        "fleet/tasks/stopme.yaml",
        task_yaml(
            "stopme",
            &vm,
            "  command: [sh, -c, 'echo started; sleep 1003']\n",
        ),
    );
    repo.commit("stopme");
    wait_until("stopme is under way", Duration::from_secs(30), || {
        status.output("stopme").contains("started")
    });
    let cancelled = repo.fleet(&["task", "cancel", "stopme"]);
    cancelled.expect_code(0);
    status.wait_phase("stopme", "Cancelled", Duration::from_secs(30));
    let record = status.task("stopme");
    assert!(record.contains("cancelled from the host by"), "{record}");
    let again = repo.fleet(&["task", "cancel", "stopme"]);
    again.expect_code(1);
    assert!(
        again.stderr().contains("already ended"),
        "{}",
        again.stderr()
    );
    wait_until(
        "the committed answer arrives",
        Duration::from_secs(20),
        || status.output("ask").contains("answer=yes"),
    );
    let prompt = status.prompt(&first);
    assert!(prompt.contains("state: answered"), "{prompt}");
    assert!(
        prompt.contains(&format!("commit {}", &answer_commit[..12])),
        "{prompt}"
    );
    assert!(prompt.contains("delivered: true"), "{prompt}");

    // The second prompt, answered on the host.
    wait_until("the second prompt", Duration::from_secs(10), || {
        status.prompts("ask").len() == 2
    });
    let second = status.prompts("ask")[1].clone();
    let run = repo.fleet(&["hitl", "list"]);
    assert!(run.stdout().contains(&second), "{}", run.stdout());
    assert!(run.stdout().contains("Again? (y/n)"), "{}", run.stdout());
    // An answer carrying an escape sequence is refused (from the CLI and as a file) and
    // never typed; the prompt stays pending.
    repo.fleet(&["hitl", "answer", &second, "y\u{1b}[2J"])
        .expect_code(1);
    let smuggled = status.0.join("hitl").join(format!("{second}.answer"));
    std::fs::write(&smuggled, "y\u{1b}[2J\n").expect("write");
    wait_until(
        "the smuggling answer is refused",
        Duration::from_secs(10),
        || smuggled.with_extension("answer.refused").exists(),
    );
    assert!(status.prompt(&second).contains("control character U+001B"));
    assert!(status.prompt(&second).contains("state: pending"));
    repo.fleet(&["hitl", "answer", &second, "no"])
        .expect_code(0);
    status.wait_phase("ask", "Succeeded", Duration::from_secs(20));
    let output = status.output("ask");
    assert!(output.contains("second=no"), "{output}");
    assert!(
        !output.contains('\u{1b}'),
        "the escape never reached the terminal"
    );
    assert_eq!(output.matches("answer=").count(), 1, "{output}");
    assert!(
        status.prompt(&second).contains("(host file "),
        "who answered, from the host"
    );

    // A second answer to the same prompt is refused, from the CLI and as a file.
    let again = repo.fleet(&["hitl", "answer", &first, "no"]);
    again.expect_code(1);
    assert!(
        again.stderr().contains("already answered"),
        "{}",
        again.stderr()
    );
    std::fs::write(
        status.0.join("hitl").join(format!("{first}.answer")),
        "no\n",
    )
    .expect("write");
    wait_until(
        "the stray answer is refused",
        Duration::from_secs(10),
        || {
            status
                .0
                .join("hitl")
                .join(format!("{first}.answer.refused"))
                .exists()
        },
    );
    assert!(status.prompt(&first).contains("already answered by commit"));
    drop(daemon);
}
