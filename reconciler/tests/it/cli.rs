//! The CLI on real git repositories. Planning uses libvirt's in-process `test:///default`
//! driver, so no daemon is needed here (the real-libvirt story is in `libvirt.rs`).

use crate::support::{Repo, host_yaml, test_driver_provider};

const FLEET_YAML: &str = "apiVersion: fleet/v1\nkind: Fleet\nmetadata: {name: clitest}\nspec:\n  providers:\n    - {name: local, type: libvirt, domainType: qemu}\n  images:\n    - {name: micro, kernel: vmlinuz, initrd: initrd.img}\n";

fn vm_yaml(name: &str, memory: &str) -> String {
    format!(
        "apiVersion: fleet/v1\nkind: VM\nmetadata: {{name: {name}}}\nspec: {{provider: local, image: micro, resources: {{memory: {memory}}}}}\n"
    )
}

fn repo_with_fleet() -> Repo {
    let repo = Repo::new();
    repo.host_config(&host_yaml(&[test_driver_provider(&repo)], ""));
    repo.write("fleet/fleet.yaml", FLEET_YAML)
        .write("fleet/vms/a.yaml", vm_yaml("a", "256Mi"))
        .write("fleet/vms/b.yaml", vm_yaml("b", "256Mi"));
    repo.commit("two VMs");
    repo
}

#[test]
fn validate_reads_the_commit_unless_told_to_read_the_worktree() {
    let repo = repo_with_fleet();
    repo.write("fleet/vms/b.yaml", vm_yaml("b", "lots"));
    let committed = repo.fleet(&["validate"]);
    committed.expect_code(0);
    assert!(
        committed
            .stdout()
            .contains("valid (2 VM(s), 0 task(s), 0 secret(s), 1 provider(s))"),
        "{}",
        committed.stdout()
    );

    let worktree = repo.fleet(&["validate", "--worktree"]);
    worktree.expect_code(1);
    assert_eq!(
        worktree.stderr(),
        "fleet/vms/b.yaml:4:59: error: spec.resources.memory: string \"lots\" is not valid; expected a size with a binary unit: Mi, Gi or Ti (for example 512Mi or 2Gi)\n1 error(s); nothing was applied\n"
    );
}

#[test]
fn validate_an_older_revision() {
    let repo = repo_with_fleet();
    let first = String::from_utf8(repo.git(&["rev-parse", "HEAD"]).stdout).expect("utf8");
    repo.remove("fleet/fleet.yaml");
    repo.commit("oops, no fleet.yaml");
    repo.fleet(&["validate"]).expect_code(1);
    repo.fleet(&["validate", "--rev", first.trim()])
        .expect_code(0);
    let missing = repo.fleet(&["validate", "--rev", "no-such-branch"]);
    missing.expect_code(1);
    assert!(
        missing
            .stderr()
            .contains("revision \"no-such-branch\" not found"),
        "{}",
        missing.stderr()
    );
}

#[test]
fn a_directory_without_git_is_a_clear_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = crate::support::Run(
        std::process::Command::new(crate::support::fleet_bin())
            .arg("-C")
            .arg(dir.path())
            .arg("validate")
            .output()
            .expect("run"),
    );
    out.expect_code(1);
    assert!(
        out.stderr().contains("is not a git repository"),
        "{}",
        out.stderr()
    );
    assert!(
        out.stderr().contains("--worktree"),
        "the message says how to proceed: {}",
        out.stderr()
    );
}

#[test]
fn plan_exit_codes_and_json() {
    let repo = repo_with_fleet();
    let plan = repo.fleet(&["plan", "--detailed-exitcode"]);
    plan.expect_code(2);
    assert!(
        plan.stdout().contains("Plan: 2 to create."),
        "{}",
        plan.stdout()
    );
    repo.fleet(&["plan"]).expect_code(0);

    let json = repo.fleet(&["plan", "--json"]);
    let value: serde_json::Value =
        serde_json::from_str(&json.stdout()).expect("plan --json is JSON");
    assert_eq!(value["formatVersion"], 2);
    let actions: Vec<&str> = value["steps"]
        .as_array()
        .expect("steps")
        .iter()
        .map(|s| s["action"].as_str().expect("action"))
        .collect();
    assert_eq!(actions, ["create", "create"]);
}

#[test]
fn an_invalid_revision_is_never_applied() {
    let repo = repo_with_fleet();
    repo.write("fleet/vms/c.yaml", "apiVersion: fleet/v1\nkind: VM\nmetadata: {name: c}\nspec: {provider: nowhere, image: micro}\n");
    repo.commit("bad reference");
    let out = repo.fleet(&["apply", "--auto-approve"]);
    out.expect_code(1);
    assert!(out.stderr().contains("fleet/vms/c.yaml:4:18: error: spec.provider: no provider named \"nowhere\"; defined: local"), "{}", out.stderr());
    assert!(
        !out.stdout().contains("create"),
        "no step ran: {}",
        out.stdout()
    );
    let summary = std::fs::read_to_string(repo.path().join(".fleet/status/summary.yaml"))
        .expect("summary written");
    assert!(summary.contains("revisionRefused"), "{summary}");
    assert!(summary.contains("no provider named"), "{summary}");
}

#[test]
fn a_saved_plan_goes_stale_when_the_revision_moves() {
    let repo = repo_with_fleet();
    let planfile = repo.path().join("saved.json");
    repo.fleet(&["plan", "--out", planfile.to_str().expect("utf8")])
        .expect_code(0);

    repo.write("fleet/vms/c.yaml", vm_yaml("c", "256Mi"));
    repo.commit("a third VM");
    let out = repo.fleet(&["apply", "--auto-approve", planfile.to_str().expect("utf8")]);
    out.expect_code(1);
    assert!(
        out.stderr()
            .contains("stale plan: it was made from revision main@"),
        "{}",
        out.stderr()
    );

    // An edited plan is refused too.
    let text = std::fs::read_to_string(&planfile)
        .expect("read")
        .replace("\"b\"", "\"z\"");
    std::fs::write(&planfile, text).expect("write");
    let out = repo.fleet(&["apply", "--auto-approve", planfile.to_str().expect("utf8")]);
    out.expect_code(1);
    assert!(
        out.stderr().contains("was edited after it was made"),
        "{}",
        out.stderr()
    );
}

#[test]
fn apply_asks_before_acting_and_refuses_without_a_terminal() {
    let repo = repo_with_fleet();
    let out = repo.fleet(&["apply"]);
    out.expect_code(1);
    assert!(out.stderr().contains("--auto-approve"), "{}", out.stderr());
}

/// M4: a prompt's text comes from a guest; `fleet hitl list` prints it as one plain line,
/// whatever escapes and line breaks it holds.
#[test]
fn hitl_list_prints_no_escape_a_guest_sent() {
    use fleet::status::StatusDir;
    use fleet::status::tasks::{PromptKind, PromptRecord, PromptState};
    let repo = repo_with_fleet();
    let status = StatusDir::new(repo.path().join(".fleet/status"));
    status.ensure().expect("status");
    status
        .write_prompt(&PromptRecord {
            id: "build-0123abcd-1".into(),
            kind: PromptKind::Input,
            allow_control: false,
            task: "build".into(),
            vm: "a".into(),
            text: "Deploy?\u{1b}]52;c;ZXZpbA==\u{7}\u{1b}[2J\napproval-0 approve: fleet hitl answer approval-0 ffff\u{9b}31m".into(),
            context: vec!["\u{1b}[31mred".into()],
            options: Vec::new(),
            guest_seq: None,
            created: std::time::SystemTime::now().into(),
            deadline: std::time::SystemTime::now().into(),
            state: PromptState::Pending,
            overdue: false,
            response: None,
            answered_by: None,
            answered_at: None,
            delivered: false,
            refused: Vec::new(),
        })
        .expect("prompt");
    let out = repo.fleet(&["hitl", "list"]);
    out.expect_code(0);
    let printed = out.stdout();
    assert!(printed.contains("Deploy?"), "{printed}");
    assert!(
        !printed.chars().any(|c| c.is_control() && c != '\n'),
        "a control character reached the terminal: {printed:?}"
    );
    assert!(
        !printed.lines().any(|l| l.starts_with("approval-0")),
        "a forged line: {printed}"
    );
}

/// `fleet --version` names the git revision it was built from, so a bug report says which.
#[test]
fn the_version_names_the_revision_it_was_built_from() {
    let out = std::process::Command::new(crate::support::fleet_bin())
        .arg("--version")
        .output()
        .expect("fleet runs");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        text.starts_with(&format!("fleet {} (", env!("CARGO_PKG_VERSION"))),
        "{text}"
    );
    let workspace = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the workspace");
    let git = |args: &[&str]| {
        std::process::Command::new("git")
            .args(args)
            .current_dir(workspace)
            .output()
            .ok()
            .filter(|o| o.status.success())
    };
    let (revision, built) = text
        .split_once(" (")
        .and_then(|(_, r)| r.split_once(')'))
        .and_then(|(r, _)| r.split_once(", built "))
        .map(|(r, d)| (r.trim_end_matches("-dirty").to_owned(), d.to_owned()))
        .expect("a revision and a build date in parentheses");
    assert!(
        built.len() == 10 && built.as_bytes()[4] == b'-' && built[..4].parse::<u32>().is_ok(),
        "a build date: {text}"
    );
    if git(&["rev-parse", "HEAD"]).is_some() {
        // Built from this checkout: one of its commits (HEAD when it was built; a commit made
        // since is fine).
        assert!(
            revision.len() == 12 && revision.bytes().all(|b| b.is_ascii_hexdigit()),
            "{text}"
        );
        assert!(
            git(&["cat-file", "-e", &format!("{revision}^{{commit}}")]).is_some(),
            "{revision} is a commit of this repository"
        );
    } else {
        assert_eq!(revision, "unknown revision", "{text}");
    }
}

/// `fleet events`: the log filtered by kind and VM, as text made safe or as the JSON lines
/// fleet wrote; an unknown kind lists the known ones.
#[test]
fn events_are_listed_filtered_and_safe_to_print() {
    use fleet::status::{Event, EventKind, StatusDir};
    let repo = repo_with_fleet();
    let status = StatusDir::new(repo.path().join(".fleet/status"));
    status.ensure().expect("status directory");
    let mut failed = Event::fleet(
        EventKind::StepFailed,
        None,
        "create a failed: \u{1b}[2Jboom".into(),
    );
    failed.vm = Some("a".into());
    let mut other = Event::fleet(EventKind::StepSucceeded, None, "create b".into());
    other.vm = Some("b".into());
    for event in [&failed, &other] {
        status.append_event(event).expect("append");
    }

    let run = repo.fleet(&["events", "--kind", "step.failed"]);
    run.expect_code(0);
    let text = run.stdout();
    assert_eq!(text.lines().count(), 1, "{text}");
    assert!(
        text.contains("step.failed") && text.contains("create a failed: boom"),
        "{text}"
    );
    assert!(
        !text.contains('\u{1b}'),
        "no escape reaches the terminal: {text:?}"
    );

    let run = repo.fleet(&["events", "--vm", "b", "--json"]);
    run.expect_code(0);
    let back: Event = serde_json::from_str(run.stdout().trim()).expect("one JSON event");
    assert_eq!(back.message, "create b");

    let run = repo.fleet(&["events", "--kind", "step.exploded"]);
    run.expect_code(2);
    assert!(run.stderr().contains("step.failed"), "{}", run.stderr());
}

#[test]
fn the_plan_warns_of_egress_rules_that_can_have_no_effect() {
    let repo = repo_with_fleet();
    // The mode comes from the loadout it extends, so the loader cannot see the mismatch in
    // one file: the plan says it.
    repo.write(
        "fleet/loadouts/base.yaml",
        "apiVersion: fleet/v1\nkind: Loadout\nmetadata: {name: base}\nspec:\n  network: {mode: full}\n",
    );
    repo.write(
        "fleet/loadouts/agent.yaml",
        "apiVersion: fleet/v1\nkind: Loadout\nmetadata: {name: agent}\nspec:\n  extends: [base]\n  egress:\n    allow: [{host: api.example.com}]\n",
    );
    repo.write(
        "fleet/vms/a.yaml",
        vm_yaml("a", "256Mi").replace("image: micro,", "image: micro, loadout: agent,"),
    );
    repo.write(
        "fleet/tasks/t.yaml",
        "apiVersion: fleet/v1\nkind: Task\nmetadata: {name: t}\nspec:\n  vm: a\n  command: ['true']\n  egress:\n    allow: [{host: api.example.com}]\n",
    );
    repo.commit("egress on a VM that is not brokered");
    let plan = repo.fleet(&["plan"]);
    let out = plan.stdout();
    assert!(
        out.contains(
            "WARNING: VM a uses loadout agent, whose egress rules take effect only with network.mode: brokered, and its mode is full"
        ),
        "{out}\n{}",
        plan.stderr()
    );
    assert!(
        out.contains(
            "WARNING: task t (fleet/tasks/t.yaml) narrows its VM's egress, but VM a is not brokered"
        ),
        "{out}"
    );
}

#[test]
fn the_plan_shows_the_task_runs_a_revision_starts() {
    let repo = repo_with_fleet();
    repo.write("fleet/vms/a.yaml", vm_yaml("a", "256Mi"));
    repo.write(
        "fleet/tasks/fix.yaml",
        "apiVersion: fleet/v1\nkind: Task\nmetadata: {name: fix}\nspec:\n  vm: a\n  agent: {kind: claude, prompt: 'fix the failing test'}\n  repository: {url: app, branch: main}\n",
    );
    repo.commit("an agent task");
    let plan = repo.fleet(&["plan"]);
    let out = plan.stdout();
    assert!(
        out.contains("Task runs: 1 to start, 0 to run again, 0 to restart, 0 to cancel."),
        "{out}\n{}",
        plan.stderr()
    );
    assert!(out.contains("  + start task fix on VM a\n"), "{out}");
    assert!(
        out.contains("      runs: claude agent, acting without asking: \"fix the failing test\"\n"),
        "{out}"
    );
    assert!(
        out.contains("      on:   app@main (checked out as fleet/fix in the guest)"),
        "{out}"
    );
}

#[test]
fn fleet_wait_returns_when_a_vm_is_ready_and_says_what_is_missing_on_timeout() {
    let repo = repo_with_fleet();
    repo.fleet(&["apply", "--auto-approve"]).expect_code(0);
    repo.fleet(&["wait", "a", "--for", "ready", "--timeout", "5s"])
        .expect_code(0);
    repo.fleet(&["wait", "--timeout", "5s"]).expect_code(0);
    let run = repo.fleet(&["wait", "ghost", "--for", "ready", "--timeout", "1s"]);
    run.expect_code(1);
    assert!(
        run.stderr()
            .contains("timed out after 1s: VM ghost has no status yet"),
        "{}",
        run.stderr()
    );
}

/// `-o json|yaml` prints the status files' own fields, the same in both, for every command
/// that prints state.
#[test]
fn state_prints_as_json_or_yaml() {
    let repo = repo_with_fleet();
    let plan_yaml = repo.fleet(&["plan", "-o", "yaml"]).stdout();
    let plan_json = repo.fleet(&["plan", "-o", "json"]).stdout();
    let from_yaml: serde_json::Value = serde_saphyr::from_str(&plan_yaml).expect("plan yaml");
    let from_json: serde_json::Value = serde_json::from_str(&plan_json).expect("plan json");
    assert_eq!(from_yaml, from_json);
    repo.fleet(&["apply", "--auto-approve"]);
    for args in [
        &["status", "-o"][..],
        &["task", "list", "-o"],
        &["hitl", "list", "-o"],
        &["secret", "list", "-o"],
    ] {
        let json = repo.fleet(&[args, &["json"]].concat()).stdout();
        let yaml = repo.fleet(&[args, &["yaml"]].concat()).stdout();
        let json: serde_json::Value =
            serde_json::from_str(&json).unwrap_or_else(|e| panic!("{args:?} json: {e}: {json}"));
        let yaml: serde_json::Value =
            serde_saphyr::from_str(&yaml).unwrap_or_else(|e| panic!("{args:?} yaml: {e}: {yaml}"));
        assert_eq!(json, yaml, "{args:?}");
    }
    let status: serde_json::Value =
        serde_json::from_str(&repo.fleet(&["status", "-o", "json"]).stdout()).expect("json");
    assert_eq!(status["summary"]["fleet"], "clitest");
    assert!(status["vms"]["a"].is_object(), "{status}");
    // Events: a JSON line or a YAML document each.
    let events = repo.fleet(&["events", "-o", "yaml"]).stdout();
    let docs: Vec<&str> = events
        .split("---\n")
        .filter(|d| !d.trim().is_empty())
        .collect();
    assert!(!docs.is_empty(), "{events}");
    for doc in docs {
        let event: serde_json::Value = serde_saphyr::from_str(doc).expect("an event");
        assert!(event["type"].is_string(), "{doc}");
    }
}

/// A provider fleet cannot reach leaves its VMs unknown, planned for nothing (never made
/// again elsewhere or twice), while the other provider's VMs converge; `fleet status`
/// says which and why.
#[test]
fn an_unreachable_provider_leaves_its_vms_unknown_and_the_others_converge() {
    let repo = Repo::new();
    // Port 1 on loopback: refused at once.
    let far = format!(
        "{{name: far, type: libvirt, uri: 'qemu+tcp://127.0.0.1:1/system', storageDir: '{}'}}",
        repo.path().join(".fleet/far").display()
    );
    repo.host_config(&host_yaml(&[test_driver_provider(&repo), far], ""));
    repo.write(
        "fleet/fleet.yaml",
        FLEET_YAML.replace(
            "    - {name: local, type: libvirt, domainType: qemu}\n",
            "    - {name: local, type: libvirt, domainType: qemu}\n    - {name: far, type: libvirt, domainType: qemu}\n",
        ),
    )
    .write("fleet/vms/a.yaml", vm_yaml("a", "256Mi"))
    .write(
        "fleet/vms/b.yaml",
        vm_yaml("b", "256Mi").replace("provider: local", "provider: far"),
    );
    repo.commit("a VM on each provider");

    let plan = repo.fleet(&["plan"]);
    assert!(plan.stdout().contains("create   a"), "{}", plan.stdout());
    assert!(!plan.stdout().contains("create   b"), "{}", plan.stdout());
    assert!(
        plan.stdout()
            .contains("provider far cannot be used: cannot connect to far"),
        "{}",
        plan.stdout()
    );

    let applied = repo.fleet(&["apply", "--auto-approve"]);
    assert!(
        applied.stdout().contains("create   a"),
        "{}{}",
        applied.stdout(),
        applied.stderr()
    );
    let status = repo.fleet(&["status"]).stdout();
    let line = |vm: &str| {
        status
            .lines()
            .find(|l| l.starts_with(&format!("{vm} ")))
            .unwrap_or_else(|| panic!("{vm} in {status}"))
            .to_owned()
    };
    assert!(line("a").contains("Running"), "{status}");
    assert!(
        line("b").contains("Unknown") && line("b").contains("provider far: cannot connect"),
        "{status}"
    );
    let b =
        std::fs::read_to_string(repo.path().join(".fleet/status/vms/b.yaml")).expect("b's status");
    assert!(b.contains("phase: Unknown"), "{b}");
    assert!(
        b.contains("type: ProviderObserved") && b.contains("reason: ObserveFailed"),
        "{b}"
    );
}
