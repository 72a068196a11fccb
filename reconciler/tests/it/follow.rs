//! `fleet serve` following a remote (host `source`): a push is applied within the poll
//! interval, `fleet reconcile` makes it immediate, a force-push that rewrites the revision
//! in force is refused unless that revision allows it, and `fleet suspend` / `policy.suspend`
//! stop every change while drift is still reported. On libvirt's in-process test driver: the
//! subject is the source, not the hypervisor.

use std::time::{Duration, Instant};

use crate::daemon::{Daemon, wait_until};
use crate::support::{Repo, host_yaml, test_driver_provider};

fn fleet_yaml(policy: &str) -> String {
    format!(
        "apiVersion: fleet/v1\nkind: Fleet\nmetadata: {{name: follow}}\nspec:\n  providers: [{{name: local, type: libvirt}}]\n  images: [{{name: micro, kernel: vmlinuz, initrd: initrd.img}}]\n  policy: {{reconcileInterval: 1h{policy}}}\n"
    )
}

fn vm(name: &str) -> String {
    format!(
        "apiVersion: fleet/v1\nkind: VM\nmetadata: {{name: {name}}}\nspec: {{provider: local, image: micro}}\n"
    )
}

/// The team's repository (`origin`) and the host fleet serve runs on (`host`), whose
/// configuration follows `origin` every `poll`.
fn remote_and_host(poll: &str) -> (Repo, Repo) {
    let origin = Repo::new();
    origin
        .write("fleet/fleet.yaml", fleet_yaml(""))
        .write("fleet/vms/a.yaml", vm("a"));
    origin.commit("one VM");
    let host = Repo::new();
    host.host_config(&host_yaml(
        &[test_driver_provider(&host)],
        &format!(
            "  source: {{url: 'file://{}', branch: main, pollInterval: {poll}}}\n",
            origin.path().display()
        ),
    ));
    (origin, host)
}

fn summary(host: &Repo) -> String {
    std::fs::read_to_string(host.path().join(".fleet/status/summary.yaml")).unwrap_or_default()
}

/// The summary's `revisionApplied` block alone (the source's tip is a commit id too).
fn applied(host: &Repo) -> String {
    let text = summary(host);
    let mut lines = text
        .lines()
        .skip_while(|l| !l.starts_with("revisionApplied:"));
    let head = lines.next().unwrap_or_default().to_owned();
    lines
        .take_while(|l| l.starts_with(' '))
        .fold(head, |all, l| all + "\n" + l)
}

fn events(host: &Repo) -> String {
    std::fs::read_to_string(host.path().join(".fleet/status/events.jsonl")).unwrap_or_default()
}

fn vm_record(host: &Repo, name: &str) -> bool {
    host.path()
        .join(format!(".fleet/status/vms/{name}.yaml"))
        .exists()
}

#[test]
fn a_push_to_the_followed_remote_is_applied_within_the_poll_interval() {
    let (origin, host) = remote_and_host("1s");
    let _daemon = Daemon::start(&host);
    let first = origin.head();
    wait_until(
        "the remote's tip is applied",
        Duration::from_secs(20),
        || applied(&host).contains(&first),
    );
    assert!(
        host.path().join(".fleet/source/mirror.git").is_dir(),
        "fleet keeps a mirror of its own"
    );
    // The fetch's outcome is recorded in the summary once it is handled, which may come
    // just after the apply of what it found.
    wait_until(
        "the summary shows the source",
        Duration::from_secs(10),
        || summary(&host).contains("source:"),
    );

    origin.write("fleet/vms/b.yaml", vm("b"));
    let pushed = origin.commit("a second VM");
    let at = Instant::now();
    wait_until("the push is applied", Duration::from_secs(10), || {
        applied(&host).contains(&pushed)
    });
    let took = at.elapsed();
    assert!(vm_record(&host, "b"), "VM b was created");
    // Within the poll interval and a second (the issue's bound), with room for a slow CI.
    assert!(took < Duration::from_secs(5), "took {took:?}");
    assert!(
        events(&host).contains("source.fetched"),
        "{}",
        events(&host)
    );
}

#[test]
fn fleet_reconcile_fetches_now_and_a_rewritten_branch_is_refused() {
    let (origin, host) = remote_and_host("1h");
    let _daemon = Daemon::start(&host);
    let first = origin.head();
    wait_until(
        "the remote's tip is applied",
        Duration::from_secs(20),
        || applied(&host).contains(&first),
    );

    // An hour's poll interval: only `fleet reconcile` brings the push in.
    origin.write("fleet/vms/b.yaml", vm("b"));
    let second = origin.commit("a second VM");
    std::thread::sleep(Duration::from_millis(1500));
    assert!(
        !applied(&host).contains(&second),
        "fetched before being told"
    );
    let run = host.fleet(&["reconcile"]);
    run.expect_code(0);
    assert!(
        run.stdout().contains("told fleet serve"),
        "{}",
        run.stdout()
    );
    wait_until("the push is applied", Duration::from_secs(10), || {
        applied(&host).contains(&second)
    });

    // A force-push that drops the second VM's commit: the revision in force does not
    // allow a rollback, so it stays, and the summary says why.
    origin.git(&["reset", "-q", "--hard", &first]);
    origin.write("fleet/vms/c.yaml", vm("c"));
    let rewritten = origin.commit("history rewritten");
    host.fleet(&["reconcile"]).expect_code(0);
    wait_until("the rewrite is refused", Duration::from_secs(10), || {
        summary(&host).contains("moved backwards")
    });
    assert!(applied(&host).contains(&second), "{}", summary(&host));
    assert!(!vm_record(&host, "c"));
    assert!(
        events(&host).contains("source.rewound"),
        "{}",
        events(&host)
    );

    // Once the revision in force allows it (a descendant of it says so), a rewrite applies.
    origin.git(&["reset", "-q", "--hard", &second]);
    origin.write("fleet/fleet.yaml", fleet_yaml(", allowRollback: true"));
    let allowing = origin.commit("allow rollbacks");
    host.fleet(&["reconcile"]).expect_code(0);
    wait_until(
        "the allowing revision is applied",
        Duration::from_secs(10),
        || applied(&host).contains(&allowing),
    );
    origin.git(&["reset", "-q", "--hard", &rewritten]);
    origin.write("fleet/fleet.yaml", fleet_yaml(", allowRollback: true"));
    let rolled = origin.commit("rewritten again, now allowed");
    host.fleet(&["reconcile"]).expect_code(0);
    wait_until("the rollback is applied", Duration::from_secs(10), || {
        applied(&host).contains(&rolled)
    });
    assert!(vm_record(&host, "c"));
}

#[test]
fn nothing_changes_while_suspended_from_the_host_or_by_policy() {
    let (origin, host) = remote_and_host("1h");
    let _daemon = Daemon::start(&host);
    let first = origin.head();
    wait_until(
        "the remote's tip is applied",
        Duration::from_secs(20),
        || applied(&host).contains(&first),
    );

    let run = host.fleet(&["suspend", "--reason", "incident 42"]);
    run.expect_code(0);
    origin.write("fleet/vms/b.yaml", vm("b"));
    origin.commit("a second VM, while suspended");
    host.fleet(&["reconcile"]).expect_code(0);
    wait_until(
        "the summary says suspended",
        Duration::from_secs(10),
        || summary(&host).contains("suspended from the host"),
    );
    std::thread::sleep(Duration::from_millis(1000));
    assert!(!vm_record(&host, "b"), "nothing is created while suspended");
    let plan =
        std::fs::read_to_string(host.path().join(".fleet/status/plan.txt")).unwrap_or_default();
    assert!(plan.contains("create"), "the plan is still made: {plan}");
    // `fleet apply` refuses too.
    let run = host.fleet(&["apply", "--auto-approve"]);
    run.expect_code(1);
    assert!(run.stderr().contains("incident 42"), "{}", run.stderr());

    host.fleet(&["resume"]).expect_code(0);
    wait_until("resumed, VM b is created", Duration::from_secs(10), || {
        vm_record(&host, "b")
    });
    assert!(!summary(&host).contains("suspended:"), "{}", summary(&host));
    let log = events(&host);
    assert!(
        log.contains("fleet.suspended") && log.contains("by ") && log.contains("fleet.resumed"),
        "{log}"
    );

    // policy.suspend in git does the same, and a revision without it lifts it.
    origin.write("fleet/fleet.yaml", fleet_yaml(", suspend: true"));
    origin.write("fleet/vms/c.yaml", vm("c"));
    origin.commit("suspend in git");
    host.fleet(&["reconcile"]).expect_code(0);
    wait_until("suspended by policy", Duration::from_secs(10), || {
        summary(&host).contains("policy.suspend in")
    });
    std::thread::sleep(Duration::from_millis(1000));
    assert!(!vm_record(&host, "c"));
    origin.write("fleet/fleet.yaml", fleet_yaml(""));
    origin.commit("resume in git");
    host.fleet(&["reconcile"]).expect_code(0);
    wait_until(
        "resumed by policy, VM c is created",
        Duration::from_secs(10),
        || vm_record(&host, "c"),
    );
}

/// The team's repository as a server holds it: `origin`'s history in a bare repository
/// under `dir`, which `push` updates.
fn bare_of(origin: &Repo, dir: &std::path::Path) -> std::path::PathBuf {
    let bare = dir.join("fleet.git");
    let out = std::process::Command::new("git")
        .args(["clone", "-q", "--bare"])
        .arg(origin.path())
        .arg(&bare)
        .output()
        .expect("git clone");
    assert!(out.status.success(), "{out:?}");
    bare
}

fn push(origin: &Repo, bare: &std::path::Path) {
    origin.git(&["push", "-q", "--force", &bare.display().to_string(), "main"]);
}

/// A private file (mode 0600) holding `bytes`.
fn private_file(path: &std::path::Path, bytes: &[u8]) {
    std::fs::write(path, bytes).expect("write");
    crate::support::set_mode(path, 0o600);
}

#[test]
fn a_remote_over_ssh_is_followed_with_a_deploy_key_from_a_host_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (origin, host) = remote_and_host("1s");
    let bare = bare_of(&origin, dir.path());
    let key = dir.path().join("deploy_key");
    crate::git_remote::keygen(&key);
    let authorized = std::fs::read_to_string(dir.path().join("deploy_key.pub")).expect("pub");
    let sshd_dir = dir.path().join("sshd");
    std::fs::create_dir_all(&sshd_dir).expect("mkdir");
    let (port, known, child) = crate::git_remote::sshd(&sshd_dir, &authorized);
    let _sshd = crate::git_remote::Killed(child);
    let known_hosts = dir.path().join("known_hosts");
    std::fs::write(&known_hosts, known).expect("write");
    crate::support::set_mode(&key, 0o600);
    host.host_config(&host_yaml(
        &[test_driver_provider(&host)],
        &format!(
            "  git: {{knownHosts: '{}'}}\n  source: {{url: 'ssh://root@127.0.0.1:{port}{}', branch: main, pollInterval: 1s, credentialFile: '{}'}}\n",
            known_hosts.display(),
            bare.display(),
            key.display()
        ),
    ));
    let _daemon = Daemon::start(&host);
    let first = origin.head();
    wait_until(
        "the remote's tip is applied over ssh",
        Duration::from_secs(30),
        || applied(&host).contains(&first),
    );
    origin.write("fleet/vms/b.yaml", vm("b"));
    let pushed = origin.commit("a second VM");
    push(&origin, &bare);
    wait_until(
        "the push is applied over ssh",
        Duration::from_secs(15),
        || applied(&host).contains(&pushed),
    );
    assert!(vm_record(&host, "b"));
}

#[test]
fn a_remote_over_https_is_followed_with_a_token_and_a_wrong_one_is_reported() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (origin, host) = remote_and_host("1s");
    let bare = bare_of(&origin, dir.path());
    let (port, ca_pem) =
        crate::git_remote::https_git_server(dir.path().to_owned(), "deploy", "s3cret-token");
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, ca_pem).expect("write");
    let token = dir.path().join("token");
    private_file(&token, b"wrong-token\n");
    host.host_config(&host_yaml(
        &[test_driver_provider(&host)],
        &format!(
            "  git: {{caFile: '{}'}}\n  source: {{url: 'https://localhost:{port}/fleet.git', branch: main, pollInterval: 1s, credentialFile: '{}', username: deploy}}\n",
            ca.display(),
            token.display()
        ),
    ));
    let _ = bare;
    let _daemon = Daemon::start(&host);
    // A wrong token: the fetch fails, once in the events, and the summary says why.
    wait_until(
        "the failed fetch is reported",
        Duration::from_secs(20),
        || summary(&host).contains("error:"),
    );
    assert!(
        events(&host).contains("source.fetch_failed"),
        "{}",
        events(&host)
    );
    assert!(!summary(&host).contains("s3cret-token"));
    // The right one, read at the next fetch: applied.
    private_file(&token, b"s3cret-token\n");
    let first = origin.head();
    wait_until(
        "the remote's tip is applied over https",
        Duration::from_secs(20),
        || applied(&host).contains(&first),
    );
    // The summary is written at the end of the pass that applied it.
    wait_until(
        "the summary no longer reports the fetch error",
        Duration::from_secs(10),
        || !summary(&host).contains("error:"),
    );
}

/// POSTs `body` with `headers` to the webhook at `port`; the status code.
fn post(port: u16, headers: &[(&str, String)], body: &str) -> u16 {
    use std::io::{Read, Write};
    let mut conn = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    let mut request = format!(
        "POST /hooks/git HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n",
        body.len()
    );
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("\r\n");
    request.push_str(body);
    conn.write_all(request.as_bytes()).expect("write");
    let mut reply = String::new();
    let _ = conn.read_to_string(&mut reply);
    reply
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or(0)
}

#[test]
fn a_signed_webhook_fetches_now_and_a_bad_signature_gets_401() {
    use hmac::Mac;
    let (origin, host) = remote_and_host("1h");
    let secret_file = host.host.path().join("webhook.secret");
    private_file(&secret_file, b"a-webhook-secret-of-32-characters\n");
    let daemon = Daemon::start_serving(
        &host,
        &[],
        &[],
        &[
            "--webhook-listen",
            "127.0.0.1:0",
            "--webhook-secret-file",
            &secret_file.display().to_string(),
        ],
    );
    let first = origin.head();
    wait_until(
        "the remote's tip is applied",
        Duration::from_secs(20),
        || applied(&host).contains(&first),
    );
    let port: u16 = {
        let log = daemon.log.lock().unwrap_or_else(|p| p.into_inner()).clone();
        log.split_once("webhook on http://127.0.0.1:")
            .and_then(|(_, rest)| rest.split('/').next()?.parse().ok())
            .unwrap_or_else(|| panic!("no webhook address in:\n{log}"))
    };
    origin.write("fleet/vms/b.yaml", vm("b"));
    let pushed = origin.commit("a second VM");
    // The payload is never read: it may say anything.
    let body = r#"{"ref":"refs/heads/evil","after":"0000000000000000000000000000000000000000"}"#;

    // A wrong signature: 401, an event, no fetch.
    let code = post(
        port,
        &[("X-Hub-Signature-256", format!("sha256={}", "0".repeat(64)))],
        body,
    );
    assert_eq!(code, 401);
    std::thread::sleep(Duration::from_millis(1500));
    assert!(!applied(&host).contains(&pushed), "a forged hook fetched");
    assert!(
        events(&host).contains("webhook.refused"),
        "{}",
        events(&host)
    );

    // GitHub's signature of the body with the shared secret: 202, fetched and applied now.
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(b"a-webhook-secret-of-32-characters")
        .expect("key");
    mac.update(body.as_bytes());
    let hex: String = mac
        .finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let at = Instant::now();
    let code = post(
        port,
        &[("X-Hub-Signature-256", format!("sha256={hex}"))],
        body,
    );
    assert_eq!(code, 202);
    wait_until("the push is applied", Duration::from_secs(10), || {
        applied(&host).contains(&pushed)
    });
    eprintln!("webhook to applied: {:?}", at.elapsed());
    // GitLab's token works too (and a body too large is refused unread).
    assert_eq!(
        post(
            port,
            &[("X-Gitlab-Token", "a-webhook-secret-of-32-characters".into())],
            "{}"
        ),
        202
    );
    assert_eq!(post(port, &[], &"x".repeat(2 * 1024 * 1024)), 413);
}

#[test]
fn a_proposed_branch_is_planned_read_only_and_published() {
    let (origin, host) = remote_and_host("1h");
    let text = std::fs::read_to_string(host.host_config_path()).expect("host config");
    host.host_config(&text.replace(
        "pollInterval: 1h}",
        "pollInterval: 1h, previewRefs: ['refs/heads/proposed/*']}",
    ));
    let _daemon = Daemon::start(&host);
    let first = origin.head();
    wait_until(
        "the remote's tip is applied",
        Duration::from_secs(20),
        || applied(&host).contains(&first),
    );
    // A proposal adds VM p and destroys a: planned, never applied.
    origin.git(&["checkout", "-q", "-b", "proposed/more"]);
    origin.remove("fleet/vms/a.yaml");
    origin.write("fleet/vms/p.yaml", vm("p"));
    origin.commit("a proposal");
    origin.git(&["checkout", "-q", "main"]);
    host.fleet(&["reconcile"]).expect_code(0);
    let previews = host.path().join(".fleet/status/previews");
    let dir = || {
        std::fs::read_dir(&previews)
            .ok()?
            .flatten()
            .map(|e| e.path())
            .find(|p| {
                p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with("refs-heads-proposed-more-"))
            })
    };
    wait_until("the preview is published", Duration::from_secs(10), || {
        dir().is_some_and(|d| d.join("commit").exists())
    });
    let published = dir().expect("the preview's directory");
    let markdown = std::fs::read_to_string(published.join("plan.md")).expect("plan.md");
    assert!(markdown.contains("1 to create, 1 to destroy"), "{markdown}");
    assert!(markdown.contains("| create | p |"), "{markdown}");
    assert!(published.join("plan.json").exists());
    std::thread::sleep(Duration::from_millis(1000));
    assert!(!vm_record(&host, "p"), "a preview created a VM");
    assert!(vm_record(&host, "a"), "a preview destroyed a VM");
    assert!(applied(&host).contains(&first), "{}", summary(&host));
    assert!(
        events(&host).contains("preview.planned"),
        "{}",
        events(&host)
    );
}

#[test]
fn each_applied_commit_gets_a_git_note_pushed_back_to_the_source() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (origin, host) = remote_and_host("1s");
    let bare = bare_of(&origin, dir.path());
    let text = std::fs::read_to_string(host.host_config_path()).expect("host config");
    host.host_config(&text.replace(
        &format!("file://{}", origin.path().display()),
        &format!("file://{}", bare.display()),
    ));
    let _daemon = Daemon::start(&host);
    origin.write("fleet/vms/b.yaml", vm("b"));
    let pushed = origin.commit("a second VM");
    push(&origin, &bare);
    wait_until("the push is applied", Duration::from_secs(15), || {
        applied(&host).contains(&pushed)
    });
    let note = || {
        std::process::Command::new("git")
            .args(["--git-dir", &bare.display().to_string()])
            .args(["notes", "--ref=fleet", "show", &pushed])
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
    };
    wait_until(
        "the note reaches the source",
        Duration::from_secs(10),
        || note().is_some(),
    );
    let note = note().expect("a note");
    assert!(
        note.contains("outcome: converged") && note.contains("steps: 1 done, 0 failed, 0 held"),
        "{note}"
    );
}

#[test]
fn a_task_cannot_push_its_results_onto_the_followed_branch() {
    let (origin, host) = remote_and_host("1h");
    let url = format!("file://{}", origin.path().display());
    host.add_host_config("  pushes: ['file:///**']\n");
    host.write("fleet/fleet.yaml", fleet_yaml(""))
        .write("fleet/vms/a.yaml", vm("a"));
    for (branch, refused) in [("main", true), ("fleet/agent/out", false)] {
        host.write(
            "fleet/tasks/t.yaml",
            format!(
                "apiVersion: fleet/v1\nkind: Task\nmetadata: {{name: t}}\nspec:\n  vm: a\n  command: ['true']\n  repository: {{url: '{url}', branch: main}}\n  results: {{push: {{url: '{url}/', branch: {branch}}}}}\n"
            ),
        );
        host.commit("a task pushing to the followed repository");
        let run = host.fleet(&["validate"]);
        assert_eq!(run.code() != 0, refused, "{branch}: {}", run.stderr());
        if refused {
            assert!(
                run.stderr().contains("is the repository"),
                "{}",
                run.stderr()
            );
        }
    }
}

#[test]
fn after_a_restart_the_revision_in_force_is_the_last_loaded_not_the_last_applied() {
    let (origin, host) = remote_and_host("1h");
    let initial = origin.head();
    origin.write("fleet/fleet.yaml", fleet_yaml(", allowRollback: true"));
    let allowing = origin.commit("A: rollbacks allowed");
    let daemon = Daemon::start(&host);
    wait_until("A is applied", Duration::from_secs(20), || {
        applied(&host).contains(&allowing)
    });
    // B takes the permission away; suspended, it is loaded but never applied.
    host.fleet(&["suspend", "--reason", "maintenance"])
        .expect_code(0);
    origin.write("fleet/fleet.yaml", fleet_yaml(""));
    let forbidding = origin.commit("B: no rollbacks");
    host.fleet(&["reconcile"]).expect_code(0);
    wait_until("B is in force", Duration::from_secs(10), || {
        std::fs::read_to_string(host.path().join(".fleet/status/in-force.json"))
            .is_ok_and(|t| t.contains(&forbidding))
    });
    drop(daemon);
    // History rewritten from before A: B, in force, forbids it, even after a restart.
    origin.git(&["reset", "-q", "--hard", &initial]);
    origin.write("fleet/vms/c.yaml", vm("c"));
    origin.commit("C: history rewritten");
    let _daemon = Daemon::start(&host);
    wait_until("the rewrite is refused", Duration::from_secs(20), || {
        summary(&host).contains("moved backwards")
    });
}
