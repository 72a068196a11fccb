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

fn applied(host: &Repo) -> String {
    summary(host)
        .split("revisionRefused:")
        .next()
        .unwrap_or_default()
        .to_owned()
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
    let first = origin.git(&["rev-parse", "HEAD"]).stdout;
    let first = String::from_utf8_lossy(&first).trim().to_owned();
    wait_until(
        "the remote's tip is applied",
        Duration::from_secs(20),
        || applied(&host).contains(&first),
    );
    assert!(
        host.path().join(".fleet/source/mirror.git").is_dir(),
        "fleet keeps a mirror of its own"
    );
    assert!(summary(&host).contains("source:"), "{}", summary(&host));

    origin.write("fleet/vms/b.yaml", vm("b"));
    let pushed = origin.commit("a second VM");
    let at = Instant::now();
    wait_until("the push is applied", Duration::from_secs(10), || {
        applied(&host).contains(&pushed)
    });
    let took = at.elapsed();
    assert!(vm_record(&host, "b"), "VM b was created");
    // Within the poll interval and a second (the bound), with room for a slow CI.
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
    let first = String::from_utf8_lossy(&origin.git(&["rev-parse", "HEAD"]).stdout)
        .trim()
        .to_owned();
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
    let first = String::from_utf8_lossy(&origin.git(&["rev-parse", "HEAD"]).stdout)
        .trim()
        .to_owned();
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
    let first = String::from_utf8_lossy(&origin.git(&["rev-parse", "HEAD"]).stdout)
        .trim()
        .to_owned();
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
    let first = String::from_utf8_lossy(&origin.git(&["rev-parse", "HEAD"]).stdout)
        .trim()
        .to_owned();
    wait_until(
        "the remote's tip is applied over https",
        Duration::from_secs(20),
        || applied(&host).contains(&first),
    );
    assert!(!summary(&host).contains("error:"), "{}", summary(&host));
}
