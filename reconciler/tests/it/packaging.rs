//! What an operator installs beside the binary: shell completions that work in a real bash,
//! man pages that render without warnings, and the example alert rules, checked by
//! promtool.

use std::path::Path;
use std::process::Command;

use crate::support::{Repo, fleet_bin, host_yaml, test_driver_provider};

/// Completes `line` (the cursor at its end) as bash would on TAB, in `dir`, with fleet's
/// own completion script loaded; returns the candidates.
fn bash_complete(dir: &Path, line: &str) -> Vec<String> {
    let bin_dir = fleet_bin().parent().expect("bin dir").to_path_buf();
    let script = format!(
        r#"source <(fleet completion bash) || exit 9
COMP_LINE={line:?}
COMP_POINT=${{#COMP_LINE}}
read -ra COMP_WORDS <<< "$COMP_LINE"
[[ "$COMP_LINE" == *" " ]] && COMP_WORDS+=("")
COMP_CWORD=$(( ${{#COMP_WORDS[@]}} - 1 ))
COMP_TYPE=9
_clap_complete_fleet fleet "${{COMP_WORDS[COMP_CWORD]}}" "${{COMP_WORDS[COMP_CWORD-1]}}"
printf '%s\n' "${{COMPREPLY[@]}}""#
    );
    let out = Command::new("bash")
        .args(["--norc", "--noprofile", "-c", &script])
        .current_dir(dir)
        .env(
            "PATH",
            format!(
                "{}:{}",
                bin_dir.display(),
                std::env::var("PATH").unwrap_or_default()
            ),
        )
        .output()
        .expect("run bash");
    assert!(
        out.status.success(),
        "bash: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| l.trim().to_owned())
        .filter(|l| !l.is_empty())
        .collect()
}

#[test]
fn bash_completes_subcommands_and_vm_names() {
    let repo = Repo::new();
    repo.host_config(&host_yaml(&[test_driver_provider(&repo)], ""));
    repo.write(
        "fleet/fleet.yaml",
        "apiVersion: fleet/v1\nkind: Fleet\nmetadata: {name: comptest}\nspec:\n  providers:\n    - {name: local, type: libvirt, domainType: qemu}\n  images:\n    - {name: micro, kernel: vmlinuz, initrd: initrd.img}\n",
    );
    for vm in ["web-01", "web-02"] {
        repo.write(
            &format!("fleet/vms/{vm}.yaml"),
            format!("apiVersion: fleet/v1\nkind: VM\nmetadata: {{name: {vm}}}\nspec: {{provider: local, image: micro, resources: {{memory: 256Mi}}}}\n"),
        );
    }
    repo.commit("two VMs");
    // Creates may fail without the micro image; the VMs have a status either way.
    repo.fleet(&["apply", "--auto-approve"]);

    assert_eq!(bash_complete(repo.path(), "fleet ta"), ["task"]);
    let task = bash_complete(repo.path(), "fleet task ");
    for sub in ["list", "cancel", "logs"] {
        assert!(task.contains(&sub.to_owned()), "{sub} in {task:?}");
    }
    assert!(
        !task.contains(&"status".to_owned()),
        "only task's: {task:?}"
    );
    assert_eq!(
        bash_complete(repo.path(), "fleet status web-0"),
        ["web-01", "web-02"]
    );
    let renew = bash_complete(repo.path(), "fleet lease renew ");
    assert_eq!(renew[..2], ["web-01", "web-02"], "{renew:?}");
    // Flags come from the same definition.
    assert!(
        bash_complete(repo.path(), "fleet plan --det").contains(&"--detailed-exitcode".to_owned())
    );
}

#[test]
fn man_pages_render_without_warnings() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = Command::new(fleet_bin())
        .args(["man"])
        .arg(dir.path())
        .output()
        .expect("fleet man");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut pages: Vec<String> = std::fs::read_dir(dir.path())
        .expect("read")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    pages.sort();
    for expected in [
        "fleet.1",
        "fleet-plan.1",
        "fleet-task-logs.1",
        "fleet-completion.1",
    ] {
        assert!(
            pages.iter().any(|p| p == expected),
            "{expected} in {pages:?}"
        );
    }
    assert!(
        !pages.iter().any(|p| p == "fleet-man.1"),
        "the hidden command has no page"
    );
    for page in &pages {
        let rendered = Command::new("man")
            .args(["--warnings", "-E", "UTF-8", "-l"])
            .arg(dir.path().join(page))
            .env("MANWIDTH", "80")
            .env("MAN_KEEP_FORMATTING", "0")
            .output()
            .expect("run man (apt-get install man-db)");
        let warnings = String::from_utf8_lossy(&rendered.stderr);
        assert!(
            rendered.status.success() && warnings.trim().is_empty(),
            "{page}: {warnings}"
        );
        assert!(!rendered.stdout.is_empty(), "{page} renders to nothing");
    }
}

#[test]
fn the_example_alert_rules_pass_promtool() {
    let rules = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/alerts.yaml");
    let out = Command::new("promtool")
        .args(["check", "rules"])
        .arg(&rules)
        .output()
        .expect("run promtool (make deps installs it)");
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Under systemd's `Type=notify`: READY=1 once serving, then a status line per pass;
/// watchdog pings at half of `WATCHDOG_USEC`; STOPPING=1 on SIGTERM.
#[test]
fn fleet_serve_speaks_the_systemd_notify_protocol() {
    let repo = Repo::new();
    repo.host_config(&host_yaml(&[test_driver_provider(&repo)], ""));
    repo.write(
        "fleet/fleet.yaml",
        "apiVersion: fleet/v1\nkind: Fleet\nmetadata: {name: notifytest}\nspec:\n  providers:\n    - {name: local, type: libvirt, domainType: qemu}\n",
    );
    repo.commit("an empty fleet");
    let socket_dir = tempfile::tempdir().expect("tempdir");
    let socket_path = socket_dir.path().join("notify");
    let socket = std::os::unix::net::UnixDatagram::bind(&socket_path).expect("bind");
    socket
        .set_read_timeout(Some(std::time::Duration::from_secs(30)))
        .expect("timeout");
    let mut daemon = crate::daemon::Daemon::start_with(
        &repo,
        &[
            ("NOTIFY_SOCKET", socket_path.to_str().expect("utf8")),
            ("WATCHDOG_USEC", "400000"),
        ],
        &[],
    );
    let mut received = Vec::new();
    let next = || {
        let mut buf = [0u8; 4096];
        let n = socket.recv(&mut buf).expect("a notification within 30 s");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    };
    while !received.iter().any(|m: &String| m.contains("STATUS=main@")) {
        received.push(next());
    }
    assert!(
        received[0].contains("READY=1"),
        "ready first, then each pass's status: {received:?}"
    );
    let pings = (0..20)
        .map(|_| next())
        .filter(|m| m.contains("WATCHDOG=1"))
        .count();
    assert!(pings >= 2, "watchdog pings: {pings}");
    let killed = Command::new("kill")
        .args(["-TERM", &daemon.child.id().to_string()])
        .status()
        .expect("kill");
    assert!(killed.success());
    let mut stopping = false;
    for _ in 0..50 {
        if next().contains("STOPPING=1") {
            stopping = true;
            break;
        }
    }
    assert!(stopping, "STOPPING=1 on SIGTERM");
    assert_eq!(daemon.child.wait().expect("wait").code(), Some(0));
}

/// `fleet events --follow` in a real terminal (tmux) shows an event within a second of it
/// being written.
#[test]
fn events_follow_shows_a_new_event_within_a_second() {
    let repo = Repo::new();
    let status = repo.path().join(".fleet/status");
    std::fs::create_dir_all(&status).expect("status");
    let line = |message: &str| {
        format!(
            "{{\"time\":\"2026-12-04T00:00:00Z\",\"type\":\"apply.finished\",\"revision\":\"0\",\"message\":\"{message}\"}}\n"
        )
    };
    std::fs::write(status.join("events.jsonl"), line("the first event")).expect("events");
    let session = format!("fleet-events-{}", std::process::id());
    let tmux = |args: &[&str]| {
        Command::new("tmux")
            .args(["-L", &session])
            .args(args)
            .output()
            .expect("run tmux (apt-get install tmux)")
    };
    let command = format!(
        "{} -C {} events --follow",
        fleet_bin().display(),
        repo.path().display()
    );
    assert!(
        tmux(&[
            "new-session",
            "-d",
            "-s",
            &session,
            "-x",
            "160",
            "-y",
            "20",
            &command
        ])
        .status
        .success()
    );
    struct Kill<'a>(&'a dyn Fn(&[&str]) -> std::process::Output);
    impl Drop for Kill<'_> {
        fn drop(&mut self) {
            (self.0)(&["kill-server"]);
        }
    }
    let _kill = Kill(&tmux);
    let screen = || String::from_utf8_lossy(&tmux(&["capture-pane", "-p"]).stdout).into_owned();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !screen().contains("the first event") {
        assert!(std::time::Instant::now() < deadline, "{}", screen());
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let mut log = std::fs::OpenOptions::new()
        .append(true)
        .open(status.join("events.jsonl"))
        .expect("open");
    std::io::Write::write_all(&mut log, line("a new event").as_bytes()).expect("append");
    let written = std::time::Instant::now();
    while !screen().contains("a new event") {
        assert!(
            written.elapsed() < std::time::Duration::from_secs(1),
            "not shown within 1 s:\n{}",
            screen()
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// `.pre-commit-hooks.yaml` names a hook whose command works on a fleet repository, and
/// fails on a broken one.
#[test]
fn the_pre_commit_hook_runs_fleet_validate() {
    let hooks: serde_json::Value = serde_saphyr::from_str(
        &std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../.pre-commit-hooks.yaml"),
        )
        .expect("read"),
    )
    .expect("yaml");
    let hook = &hooks[0];
    assert_eq!(hook["id"], "fleet-validate");
    assert_eq!(hook["language"], "system");
    let entry: Vec<&str> = hook["entry"]
        .as_str()
        .expect("entry")
        .split_whitespace()
        .collect();
    assert_eq!(entry[0], "fleet");
    let repo = Repo::new();
    repo.write(
        "fleet/fleet.yaml",
        "apiVersion: fleet/v1\nkind: Fleet\nmetadata: {name: hooked}\nspec:\n  providers:\n    - {name: local, type: libvirt}\n",
    );
    let run = || {
        Command::new(fleet_bin())
            .args(&entry[1..])
            .current_dir(repo.path())
            .env("FLEET_HOST_CONFIG", repo.path().join("no-host.yaml"))
            .output()
            .expect("the hook's command")
    };
    assert!(
        run().status.success(),
        "{}",
        String::from_utf8_lossy(&run().stderr)
    );
    repo.write(
        "fleet/vms/bad.yaml",
        "apiVersion: fleet/v1\nkind: VM\nmetadata: {name: Bad}\n",
    );
    let refused = run();
    assert_eq!(refused.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&refused.stderr).contains("fleet/vms/bad.yaml:"));
}
