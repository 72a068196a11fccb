//! Signed commits (host `trust`): only a revision whose commit a trusted key signed is
//! applied, and a committed approval counts only when an approver signed the commit that
//! last changed it. Commits are signed by the real `git commit -S`, with SSH keys made by
//! `ssh-keygen` and an OpenPGP key made by `gpg`, and verified as git verifies them.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::support::{Repo, host_yaml, test_driver_provider};

/// Someone who signs commits with an SSH key.
struct SshSigner {
    _dir: tempfile::TempDir,
    key: PathBuf,
    principal: String,
}

impl SshSigner {
    fn new(principal: &str) -> SshSigner {
        let dir = tempfile::tempdir().expect("tempdir");
        let key = dir.path().join("key");
        let out = Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-C", principal, "-f"])
            .arg(&key)
            .output()
            .expect("ssh-keygen");
        assert!(out.status.success(), "{out:?}");
        SshSigner {
            _dir: dir,
            key,
            principal: principal.to_owned(),
        }
    }

    /// Its line of an allowed-signers file.
    fn allowed(&self) -> String {
        let public = std::fs::read_to_string(self.key.with_extension("pub")).expect("pub");
        let mut words = public.split_whitespace();
        let (kind, key) = (words.next().expect("kind"), words.next().expect("key"));
        format!("{} namespaces=\"git\" {kind} {key}\n", self.principal)
    }

    /// Commits everything in `repo`, signed with `git commit -S`.
    fn commit(&self, repo: &Repo, message: &str) -> String {
        repo.git(&["add", "-A"]);
        repo.git(&[
            "-c",
            "gpg.format=ssh",
            "-c",
            &format!("user.signingkey={}", self.key.display()),
            "commit",
            "-q",
            "-S",
            "--allow-empty",
            "-m",
            message,
        ]);
        head(repo)
    }
}

fn head(repo: &Repo) -> String {
    String::from_utf8(repo.git(&["rev-parse", "HEAD"]).stdout)
        .expect("utf8")
        .trim()
        .to_owned()
}

fn fleet_yaml() -> String {
    "apiVersion: fleet/v1\nkind: Fleet\nmetadata: {name: signed}\nspec:\n  providers: [{name: local, type: libvirt}]\n  images: [{name: micro, kernel: vmlinuz, initrd: initrd.img}]\n  policy: {approve: [create]}\n".into()
}

const VM: &str =
    "apiVersion: fleet/v1\nkind: VM\nmetadata: {name: a}\nspec: {provider: local, image: micro}\n";

/// A repository on libvirt's test driver whose host trusts `signers` (an allowed-signers
/// file) and the OpenPGP `keyring`, with `approvers`.
fn trusting_repo(signers: &[&SshSigner], keyring: Option<&Path>, approvers: &[&str]) -> Repo {
    let repo = Repo::new();
    let allowed = repo.host.path().join("allowed_signers");
    let lines: String = signers.iter().map(|s| s.allowed()).collect();
    std::fs::write(&allowed, lines).expect("allowed signers");
    let mut trust = format!("  trust:\n    allowedSigners: '{}'\n", allowed.display());
    if let Some(keyring) = keyring {
        trust.push_str(&format!("    openpgpKeyring: '{}'\n", keyring.display()));
    }
    if !approvers.is_empty() {
        trust.push_str(&format!("    approvers: [{}]\n", approvers.join(", ")));
    }
    repo.host_config(&host_yaml(&[test_driver_provider(&repo)], &trust));
    repo.write("fleet/fleet.yaml", fleet_yaml())
        .write("fleet/vms/a.yaml", VM);
    repo
}

fn summary(repo: &Repo) -> String {
    std::fs::read_to_string(repo.path().join(".fleet/status/summary.yaml")).unwrap_or_default()
}

/// The approval id and digest `fleet apply` printed for held steps.
fn held(stdout: &str) -> (String, String) {
    let line = stdout
        .lines()
        .find(|l| l.starts_with("Held for approval ("))
        .unwrap_or_else(|| panic!("no held steps in:\n{stdout}"));
    let id = line["Held for approval (".len()..]
        .split(';')
        .next()
        .expect("id")
        .to_owned();
    let digest = line
        .rsplit("spec.approve: ")
        .next()
        .expect("digest")
        .trim_end_matches("):")
        .trim_matches('"')
        .to_owned();
    (id, digest)
}

#[test]
fn only_a_commit_a_trusted_key_signed_is_applied() {
    let (alice, mallory) = (
        SshSigner::new("alice@example.org"),
        SshSigner::new("mallory@example.org"),
    );
    let repo = trusting_repo(&[&alice], None, &[]);

    // Unsigned: refused, and the summary says why.
    repo.commit("unsigned");
    let run = repo.fleet(&["apply", "--auto-approve"]);
    run.expect_code(1);
    assert!(run.stderr().contains("is not signed"), "{}", run.stderr());
    assert!(
        summary(&repo).contains("is not signed"),
        "{}",
        summary(&repo)
    );
    // Nor can the working tree be applied around it.
    let run = repo.fleet(&["apply", "--auto-approve", "--worktree"]);
    run.expect_code(1);
    assert!(
        run.stderr().contains("working tree is no commit"),
        "{}",
        run.stderr()
    );

    // Signed by a key the host does not trust: refused.
    mallory.commit(&repo, "signed by someone else");
    let run = repo.fleet(&["apply", "--auto-approve"]);
    run.expect_code(1);
    assert!(
        run.stderr()
            .contains("by a key no principal of trust.allowedSigners has"),
        "{}",
        run.stderr()
    );

    // A plan (what CI runs on a pull request) still plans it, with a warning.
    let run = repo.fleet(&["plan"]);
    run.expect_code(0);
    assert!(run.stderr().contains("warning: commit"), "{}", run.stderr());

    // Signed by alice: applied, and the summary names her.
    alice.commit(&repo, "signed by alice");
    let run = repo.fleet(&["apply", "--auto-approve"]);
    run.expect_code(0);
    assert!(
        summary(&repo).contains("signedBy: alice@example.org"),
        "{}",
        summary(&repo)
    );
}

#[test]
fn an_approval_counts_only_when_an_approver_signed_it() {
    let (alice, bob) = (
        SshSigner::new("alice@example.org"),
        SshSigner::new("bob@example.org"),
    );
    let repo = trusting_repo(&[&alice, &bob], None, &["alice@example.org"]);
    bob.commit(&repo, "a VM, whose creation waits for approval");
    let run = repo.fleet(&["apply", "--auto-approve"]);
    run.expect_code(0);
    let (id, digest) = held(&run.stdout());
    let answer = format!("fleet/hitl/{id}.yaml");
    let record = repo.path().join(format!(".fleet/status/hitl/{id}.yaml"));

    // Bob may commit, but may not approve: the step stays held, and the record says why.
    repo.write(
        &answer,
        format!(
            "apiVersion: fleet/v1\nkind: Answer\nmetadata: {{name: {id}}}\nspec: {{approve: \"{digest}\"}}\n"
        ),
    );
    bob.commit(&repo, "bob approves his own VM");
    let run = repo.fleet(&["apply", "--auto-approve"]);
    run.expect_code(0);
    assert!(
        run.stdout().contains("Held for approval"),
        "{}",
        run.stdout()
    );
    let text = std::fs::read_to_string(&record).expect("approval record");
    assert!(text.contains("state: pending"), "{text}");
    assert!(
        text.contains("bob@example.org") && text.contains("not an approver"),
        "{text}"
    );

    // Alice signing a later commit that leaves the file as bob wrote it changes nothing:
    // the answer is still his.
    repo.write("README.md", "unrelated\n");
    alice.commit(&repo, "alice commits something else");
    let run = repo.fleet(&["apply", "--auto-approve"]);
    assert!(
        run.stdout().contains("Held for approval"),
        "{}",
        run.stdout()
    );

    // Alice's own change to the answer approves: the VM is created, and the record says
    // who approved.
    repo.write(
        &answer,
        format!(
            "# approved by alice\napiVersion: fleet/v1\nkind: Answer\nmetadata: {{name: {id}}}\nspec: {{approve: \"{digest}\"}}\n"
        ),
    );
    alice.commit(&repo, "alice approves");
    let run = repo.fleet(&["apply", "--auto-approve"]);
    run.expect_code(0);
    assert!(
        !run.stdout().contains("Held for approval"),
        "{}",
        run.stdout()
    );
    let text = std::fs::read_to_string(&record).expect("approval record");
    assert!(text.contains("state: approved"), "{text}");
    assert!(
        text.contains("approvedBy: alice@example.org (commit"),
        "{text}"
    );
}

/// A throwaway GnuPG home with one key, made by the real gpg.
struct OpenPgpSigner {
    home: tempfile::TempDir,
    email: String,
}

impl OpenPgpSigner {
    fn new(email: &str) -> OpenPgpSigner {
        let home = tempfile::Builder::new()
            .prefix("g")
            .tempdir_in("/tmp")
            .expect("tempdir");
        let signer = OpenPgpSigner {
            home,
            email: email.to_owned(),
        };
        signer.gpg(&[
            "--quick-gen-key",
            &format!("Carol <{email}>"),
            "ed25519",
            "sign",
            "never",
        ]);
        signer
    }

    fn gpg(&self, args: &[&str]) -> Vec<u8> {
        let out = Command::new("gpg")
            .args(["--batch", "--pinentry-mode", "loopback", "--passphrase", ""])
            .args(args)
            .env("GNUPGHOME", self.home.path())
            .output()
            .expect("gpg");
        assert!(out.status.success(), "gpg {args:?}: {out:?}");
        out.stdout
    }

    /// The host's keyring: this key, exported.
    fn keyring(&self, at: &Path) {
        std::fs::write(at, self.gpg(&["--export", &self.email])).expect("keyring");
    }

    fn commit(&self, repo: &Repo, message: &str) {
        repo.git(&["add", "-A"]);
        let out = Command::new("git")
            .args([
                "-c",
                "gpg.format=openpgp",
                "-c",
                &format!("user.signingkey={}", self.email),
                "commit",
                "-q",
                "-S",
                "--allow-empty",
                "-m",
                message,
            ])
            .current_dir(repo.path())
            .env("GNUPGHOME", self.home.path())
            .output()
            .expect("git commit -S");
        assert!(out.status.success(), "{out:?}");
    }
}

impl Drop for OpenPgpSigner {
    fn drop(&mut self) {
        let _ = Command::new("gpgconf")
            .args(["--kill", "all"])
            .env("GNUPGHOME", self.home.path())
            .output();
    }
}

#[test]
fn an_openpgp_signature_is_verified_against_the_hosts_keyring() {
    let carol = OpenPgpSigner::new("carol@example.org");
    let dave = OpenPgpSigner::new("dave@example.org");
    let alice = SshSigner::new("alice@example.org");
    let keyring_dir = tempfile::tempdir().expect("tempdir");
    let keyring = keyring_dir.path().join("trusted.gpg");
    carol.keyring(&keyring);
    let repo = trusting_repo(&[&alice], Some(&keyring), &[]);

    dave.commit(&repo, "signed by a key the host does not have");
    let run = repo.fleet(&["apply", "--auto-approve"]);
    run.expect_code(1);
    assert!(
        run.stderr()
            .contains("not by a key of trust.openpgpKeyring"),
        "{}",
        run.stderr()
    );

    carol.commit(&repo, "signed by carol");
    let run = repo.fleet(&["apply", "--auto-approve"]);
    run.expect_code(0);
    assert!(
        summary(&repo).contains("signedBy: carol@example.org"),
        "{}",
        summary(&repo)
    );
}

#[test]
fn fleet_serve_keeps_the_last_signed_revision_when_an_unsigned_one_follows() {
    let alice = SshSigner::new("alice@example.org");
    let repo = trusting_repo(&[&alice], None, &[]);
    repo.write(
        "fleet/fleet.yaml",
        fleet_yaml().replace(
            "policy: {approve: [create]}",
            "policy: {reconcileInterval: 1s}",
        ),
    );
    let good = alice.commit(&repo, "signed");
    let _daemon = crate::daemon::Daemon::start(&repo);
    crate::daemon::wait_until(
        "the signed revision is applied",
        std::time::Duration::from_secs(30),
        || summary(&repo).contains(&format!("id: {good}")),
    );
    repo.write("fleet/vms/b.yaml", VM.replace("name: a", "name: b"));
    let unsigned = repo.commit("unsigned, pushed around the review");
    crate::daemon::wait_until(
        "the unsigned revision is refused",
        std::time::Duration::from_secs(30),
        || summary(&repo).contains("is not signed"),
    );
    let text = summary(&repo);
    let applied = text
        .split("revisionRefused:")
        .next()
        .expect("the applied part");
    assert!(
        applied.contains(&good) && !applied.contains(&unsigned),
        "{text}"
    );
    let events =
        std::fs::read_to_string(repo.path().join(".fleet/status/events.jsonl")).unwrap_or_default();
    assert!(
        events.contains("revision.refused") && events.contains("is not signed"),
        "{events}"
    );
}
