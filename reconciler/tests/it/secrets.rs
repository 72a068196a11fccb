//! Secrets end to end: the `age` CLI and fleet read each other's ciphertext; a canary value
//! reaches a task in a real VM (as a variable and as a 0400 file on a tmpfs) and nowhere else
//! (status, journal, logs, domain XML, seed ISOs, HTTP, argv); it is delivered again after a
//! guest reset and removed with its last reference; a tampered value and a wrong identity
//! hold only the tasks that need them.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::daemon::{Daemon, http, read, wait_until};
use crate::libvirt::{Cleanup, enabled, fleet_yaml_with_policy, virsh, vm_yaml};
use crate::support::Repo;
use crate::tasks::{Status, field, task_yaml};

/// A new age identity in `dir` (mode 0600); returns its path and recipient.
pub fn age_identity(dir: &Path, name: &str) -> (PathBuf, String) {
    let path = dir.join(name);
    let out = Command::new("age-keygen")
        .arg("-o")
        .arg(&path)
        .output()
        .expect("run age-keygen (apt-get install age)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    crate::support::set_mode(&path, 0o600);
    let out = Command::new("age-keygen")
        .arg("-y")
        .arg(&path)
        .output()
        .expect("age-keygen -y");
    (
        path,
        String::from_utf8(out.stdout)
            .expect("utf8")
            .trim()
            .to_owned(),
    )
}

/// `fleet secret set NAME KEY` with the value on stdin.
pub fn secret_set(repo: &Repo, name: &str, key: &str, value: &str) {
    use std::io::Write;
    let mut child = Command::new(crate::support::fleet_bin())
        .arg("-C")
        .arg(repo.path())
        .args(["secret", "set", name, key])
        .env("FLEET_HOST_CONFIG", repo.host_config_path())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run fleet secret set");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(format!("{value}\n").as_bytes())
        .expect("write the value");
    let out = child.wait_with_output().expect("wait");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains(value),
        "the value is not printed"
    );
}

/// The armored block of `key` in a Secret file, as the age CLI reads it.
fn armored(secret_file: &str) -> String {
    let start = secret_file
        .find("-----BEGIN AGE ENCRYPTED FILE-----")
        .expect("armor");
    let end = secret_file[start..]
        .find("-----END AGE ENCRYPTED FILE-----")
        .expect("armor end")
        + start;
    let block = &secret_file[start..end + "-----END AGE ENCRYPTED FILE-----".len()];
    block.lines().map(str::trim).collect::<Vec<_>>().join("\n") + "\n"
}

pub fn random_hex(bytes: usize) -> String {
    use std::io::Read;
    let mut buf = vec![0u8; bytes];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut buf))
        .expect("urandom");
    buf.iter().map(|b| format!("{b:02x}")).collect()
}

#[test]
fn the_age_cli_and_fleet_read_each_others_ciphertext() {
    if !enabled() {
        return;
    }
    let keys = tempfile::tempdir().expect("tempdir");
    let (identity, recipient) = age_identity(keys.path(), "age.key");

    // age encrypts, fleet decrypts.
    let mut age = Command::new("age")
        .args(["--encrypt", "--armor", "-r", &recipient])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("run age");
    {
        use std::io::Write;
        let mut stdin = age.stdin.take().expect("stdin");
        stdin.write_all(b"from the age cli").expect("write");
    }
    let out = age.wait_with_output().expect("age");
    assert!(out.status.success());
    let keyring = fleet::secrets::Keyring::load(&identity).expect("keyring");
    let opened = fleet::secrets::decrypt(&String::from_utf8(out.stdout).expect("utf8"), &keyring)
        .expect("fleet decrypts what age encrypted");
    use secrecy::ExposeSecret;
    assert_eq!(opened.expose_secret(), b"from the age cli");

    // fleet encrypts (`fleet secret set`), age decrypts.
    let repo = Repo::new();
    repo.write("fleet/fleet.yaml", fleet_yaml_with_policy("interop", "{}"));
    repo.add_host_config(&format!("  recipients: [{recipient}]\n"));
    secret_set(&repo, "api", "token", "from fleet");
    let file = read(&repo.path().join("fleet/secrets/api.yaml"));
    let block = repo.path().join("token.age");
    std::fs::write(&block, armored(&file)).expect("write");
    let out = Command::new("age")
        .arg("--decrypt")
        .arg("-i")
        .arg(&identity)
        .arg(&block)
        .output()
        .expect("age -d");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        out.stdout, b"from fleet",
        "one trailing newline of stdin is dropped"
    );

    // list shows names and keys, never values; validate counts the secret.
    let list = repo.fleet(&["secret", "list"]);
    list.expect_code(0);
    assert!(
        list.stdout().starts_with("api\ttoken\t"),
        "{}",
        list.stdout()
    );
    let valid = repo.fleet(&["validate", "--worktree"]);
    valid.expect_code(0);
    assert!(valid.stdout().contains("1 secret(s)"), "{}", valid.stdout());

    // rotate needs an identity, and a key file others can read is refused.
    crate::support::set_mode(&identity, 0o644);
    let refused = repo.fleet(&[
        "--age-identity",
        identity.to_str().expect("utf8"),
        "secret",
        "rotate",
    ]);
    refused.expect_code(1);
    assert!(
        refused.stderr().contains("readable by others") && refused.stderr().contains("chmod 600"),
        "{}",
        refused.stderr()
    );
    crate::support::set_mode(&identity, 0o600);
    repo.fleet(&[
        "--age-identity",
        identity.to_str().expect("utf8"),
        "secret",
        "rotate",
    ])
    .expect_code(0);
    let rotated = read(&repo.path().join("fleet/secrets/api.yaml"));
    assert_ne!(armored(&rotated), armored(&file), "re-encrypted");
}

/// Every file under `dir` (recursively) that contains `needle`.
pub fn files_containing(dir: &Path, needle: &[u8]) -> Vec<PathBuf> {
    let mut hits = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return hits;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let Ok(kind) = entry.file_type() else {
            continue;
        };
        if kind.is_dir() {
            hits.extend(files_containing(&path, needle));
        } else if kind.is_file()
            && let Ok(bytes) = std::fs::read(&path)
            && bytes.windows(needle.len()).any(|w| w == needle)
        {
            hits.push(path);
        }
    }
    hits
}

/// The uppercase the guest's `tr a-f A-F` makes of a value.
pub fn shouted(value: &str) -> String {
    value
        .chars()
        .map(|c| {
            if ('a'..='f').contains(&c) {
                c.to_ascii_uppercase()
            } else {
                c
            }
        })
        .collect()
}

#[test]
fn a_canary_secret_reaches_the_task_and_nothing_else() {
    if !enabled() {
        return;
    }
    let prefix = format!("it{}-sec-", std::process::id());
    let _cleanup = Cleanup {
        prefix: prefix.clone(),
    };
    let vm = format!("{prefix}a");
    let keys = tempfile::tempdir().expect("tempdir");
    let (identity, recipient) = age_identity(keys.path(), "age.key");
    let (stranger, _) = age_identity(keys.path(), "other.key");
    let canary = format!("fleetcanary{}", random_hex(12));

    let repo = Repo::new();
    repo.write(
        "fleet/fleet.yaml",
        fleet_yaml_with_policy(
            &format!("it{}sec", std::process::id()),
            "{shutdownTimeout: 10s, reconcileInterval: 30s}",
        ),
    );
    repo.add_host_config(&format!("  recipients: [{recipient}]\n"));
    // The VM's loadout hands the value to every task as a file too.
    repo.write(
        &format!("fleet/vms/{vm}.yaml"),
        vm_yaml(&vm, "256Mi").replace("image: micro,", "image: micro, loadout: keyed,"),
    );
    repo.write(
        "fleet/loadouts/keyed.yaml",
        "apiVersion: fleet/v1\nkind: Loadout\nmetadata: {name: keyed}\nspec:\n  secrets: [{secret: canary, key: token, file: loadout/token}]\n",
    );
    secret_set(&repo, "canary", "token", &canary);
    repo.allow_secret("canary", "{loadouts: [keyed], tasks: [uses, later]}");
    secret_set(&repo, "broken", "k", "never seen");
    repo.allow_secret("broken", &format!("{{vms: [{vm}]}}"));
    // Tamper with the broken value: one character in the middle of its armor.
    let broken_path = repo.path().join("fleet/secrets/broken.yaml");
    let text = read(&broken_path);
    let lines: Vec<&str> = text.lines().collect();
    let body = lines
        .iter()
        .position(|l| l.contains("-----BEGIN AGE"))
        .expect("armor")
        + 2;
    let mut tampered: Vec<String> = lines.iter().map(|l| (*l).to_owned()).collect();
    let line = &tampered[body];
    let at = line.len() - 5;
    let flipped = if &line[at..=at] == "A" { "B" } else { "A" };
    tampered[body] = format!("{}{flipped}{}", &line[..at], &line[at + 1..]);
    std::fs::write(&broken_path, tampered.join("\n") + "\n").expect("tamper");

    let uses = "  secrets:\n    - {secret: canary, key: token, env: TOKEN}\n    - {secret: canary, key: token, file: git/token}\n  command:\n    - sh\n    - -c\n    - |\n      echo \"env=$(echo \"$TOKEN\" | tr a-f A-F)\"\n      echo \"file=$(tr a-f A-F < /run/fleet/secrets/git/token)\"\n      echo \"loadout=$(tr a-f A-F < /run/fleet/secrets/loadout/token)\"\n      ls -l /run/fleet/secrets/git/token\n      echo \"tmpfs=$(grep -c ' /run/fleet/secrets tmpfs ' /proc/mounts)\"\n";
    repo.write("fleet/tasks/uses.yaml", task_yaml("uses", &vm, uses));
    repo.write(
        "fleet/tasks/plain.yaml",
        // Another task of the same VM: its own user, and of the VM's secret files it sees
        // the loadout's only, never the other task's.
        task_yaml(
            "plain",
            &vm,
            "  command: [sh, -c, 'echo plain-ok; echo \"sees: $(ls -R /run/fleet/secrets | tr \"\\n\" \" \")\"; grep ^Uid: /proc/self/status']\n",
        ),
    );
    repo.write(
        "fleet/tasks/needs-broken.yaml",
        task_yaml(
            "needs-broken",
            &vm,
            "  secrets: [{secret: broken, key: k, env: B}]\n  command: [sh, -c, 'echo never']\n",
        ),
    );
    repo.commit("a VM, a canary secret, a tampered one");
    let identity_env = identity.to_str().expect("utf8").to_owned();
    let daemon = Daemon::start_with(&repo, &[("FLEET_AGE_IDENTITY", &identity_env)], &["-vv"]);
    let status = Status(repo.path().join(".fleet/status"));

    status.wait_phase("uses", "Succeeded", Duration::from_secs(120));
    status.wait_phase("plain", "Succeeded", Duration::from_secs(30));
    let output = status.output("uses");
    let expected = shouted(&canary);
    assert_ne!(expected, canary);
    assert!(output.contains(&format!("env={expected}")), "{output}");
    assert!(output.contains(&format!("file={expected}")), "{output}");
    assert!(output.contains(&format!("loadout={expected}")), "{output}");
    assert!(output.contains("-r-------- "), "mode 0400: {output}");
    assert!(!output.contains("tmpfs=0"), "on a tmpfs: {output}");
    let plain = status.output("plain");
    assert!(
        plain.contains("sees: ") && plain.contains("loadout"),
        "{plain}"
    );
    assert!(
        !plain.contains("git"),
        "another task's secret file is not in its view: {plain}"
    );
    assert!(
        !plain.contains("Uid:\t0\t"),
        "tasks do not run as root: {plain}"
    );

    // The task that needs the tampered value waits and says why; the rest went on.
    let held = status.task("needs-broken");
    assert_eq!(field(&held, "phase").as_deref(), Some("Pending"), "{held}");
    assert!(
        held.contains(
            "fleet/secrets/broken.yaml key k: the ciphertext is damaged or was tampered with"
        ),
        "{held}"
    );

    // Nowhere else: every file fleet wrote (status, journal, events, seed ISOs, console
    // logs, caches), its logs, the domain XML, the HTTP view, the argv of its processes.
    let needle = canary.as_bytes();
    let hits = files_containing(&repo.path().join(".fleet"), needle);
    assert!(hits.is_empty(), "the canary is in {hits:?}");
    let log = daemon.log.lock().expect("log").clone();
    assert!(log.contains("secret"), "the logs are captured (-vv)");
    assert!(!log.contains(&canary), "the canary is in fleet's logs");
    let xml = virsh(&["dumpxml", &vm]);
    assert!(xml.status.success());
    assert!(!String::from_utf8_lossy(&xml.stdout).contains(&canary));
    for path in [
        "/",
        "/api/v1/status",
        "/tasks/uses",
        "/tasks/needs-broken",
        "/metrics",
    ] {
        let (code, body) = http(daemon.port, "GET", path);
        assert_eq!(code, 200, "{path}");
        assert!(!body.contains(&canary), "the canary is in {path}");
    }
    for entry in std::fs::read_dir("/proc").expect("proc").flatten() {
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        assert!(
            !cmdline.windows(needle.len()).any(|w| w == needle),
            "the canary is in the argv of {:?}",
            entry.path()
        );
    }

    // A new value shows in the plan as changed, with what it forces, and never as a value.
    let committed = read(&repo.path().join("fleet/secrets/canary.yaml"));
    secret_set(&repo, "canary", "token", "a-new-value-for-the-plan");
    let plan = repo.fleet(&["--age-identity", &identity_env, "plan", "--worktree"]);
    assert!(
        plan.stdout()
            .contains("~   canary/token: secret value changed → task uses runs again"),
        "{}",
        plan.stdout()
    );
    assert!(
        plan.stdout().contains("!   broken/k: cannot be opened"),
        "{}",
        plan.stdout()
    );
    assert!(!plan.stdout().contains("a-new-value-for-the-plan"));
    let unchanged = repo.fleet(&["--age-identity", &identity_env, "plan"]);
    assert!(
        !unchanged.stdout().contains("canary/token"),
        "{}",
        unchanged.stdout()
    );
    repo.write("fleet/secrets/canary.yaml", &committed);

    // A reset guest gets its secrets again: the rerun reads the file in a new boot.
    let old_boot = field(&status.task("uses"), "bootId").expect("boot id");
    assert!(virsh(&["reset", &vm]).status.success());
    let vm_status = status.0.join("vms").join(format!("{vm}.yaml"));
    wait_until(
        "the agent greets from its new boot",
        Duration::from_secs(60),
        || {
            let text = read(&vm_status);
            text.contains("bootId: ") && !text.contains(&old_boot)
        },
    );
    repo.write(
        "fleet/tasks/uses.yaml",
        task_yaml("uses", &vm, &format!("{uses}  rerun: 1\n")),
    );
    repo.commit("run it again after the reset");
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    loop {
        let record = status.task("uses");
        if field(&record, "generation").as_deref() == Some("2")
            && field(&record, "phase").as_deref() == Some("Succeeded")
        {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the rerun did not succeed: {record}\n{}\nlog:\n{}",
            status.output("uses"),
            daemon.log.lock().expect("log")
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    assert!(
        status.output("uses").contains(&format!("file={expected}")),
        "{}",
        status.output("uses")
    );

    // Without its last reference, the value leaves the guest.
    repo.remove("fleet/tasks/uses.yaml");
    repo.write(
        "fleet/loadouts/keyed.yaml",
        "apiVersion: fleet/v1\nkind: Loadout\nmetadata: {name: keyed}\nspec: {}\n",
    );
    repo.write(
        "fleet/tasks/gone.yaml",
        task_yaml(
            "gone",
            &vm,
            "  command: [sh, -c, 'ls /run/fleet/secrets/git/token 2>&1; ls -A /run/fleet/secrets']\n",
        ),
    );
    repo.commit("no task uses the canary any more");
    status.wait_phase("gone", "Succeeded", Duration::from_secs(60));
    let gone = status.output("gone");
    assert!(gone.contains("No such file"), "{gone}");
    drop(daemon);

    // With a stranger's identity: a new task needing the canary waits and says why; a
    // plain one runs; finished runs are left alone.
    repo.write("fleet/tasks/later.yaml", task_yaml("later", &vm, uses));
    repo.write(
        "fleet/tasks/plain2.yaml",
        task_yaml("plain2", &vm, "  command: [sh, -c, 'echo plain2-ok']\n"),
    );
    repo.commit("more tasks");
    let stranger_env = stranger.to_str().expect("utf8").to_owned();
    let daemon = Daemon::start_with(&repo, &[("FLEET_AGE_IDENTITY", &stranger_env)], &[]);
    status.wait_phase("plain2", "Succeeded", Duration::from_secs(60));
    let later = status.task("later");
    assert_eq!(
        field(&later, "phase").as_deref(),
        Some("Pending"),
        "{later}"
    );
    assert!(
        later
            .contains("fleet/secrets/canary.yaml key token: not encrypted to this host's identity"),
        "{later}"
    );
    assert_eq!(status.phase("plain").as_deref(), Some("Succeeded"));
    let hits = files_containing(&repo.path().join(".fleet"), needle);
    assert!(hits.is_empty(), "the canary is in {hits:?}");
    drop(daemon);
}
