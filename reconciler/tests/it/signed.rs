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
        repo.head()
    }
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
    let (id, digest) = crate::approvals::held_approval(&run.stdout());
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
    /// Its primary key's fingerprint.
    fn fingerprint(&self) -> String {
        let out =
            String::from_utf8(self.gpg(&["--with-colons", "--list-secret-keys"])).expect("utf8");
        out.lines()
            .find_map(|l| l.strip_prefix("fpr:"))
            .and_then(|rest| rest.trim_matches(':').rsplit(':').next())
            .expect("a fingerprint")
            .to_owned()
    }

    fn new(email: &str) -> OpenPgpSigner {
        OpenPgpSigner::with_user_id(email, &format!("Carol <{email}>"))
    }

    /// A key whose user id says anything its owner likes.
    fn with_user_id(email: &str, user_id: &str) -> OpenPgpSigner {
        let home = tempfile::Builder::new()
            .prefix("g")
            .tempdir_in("/tmp")
            .expect("tempdir");
        let signer = OpenPgpSigner {
            home,
            email: email.to_owned(),
        };
        signer.gpg(&["--quick-gen-key", user_id, "ed25519", "sign", "never"]);
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
                &format!("user.signingkey={}", self.fingerprint()),
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
    // The principal is the key, not the user id its owner chose.
    assert!(
        summary(&repo).contains(&format!("signedBy: openpgp:{}", carol.fingerprint())),
        "{}",
        summary(&repo)
    );
}

#[test]
fn an_openpgp_key_claiming_an_approvers_email_is_not_the_approver() {
    let (alice, bob) = (
        SshSigner::new("alice@example.org"),
        SshSigner::new("bob@example.org"),
    );
    // Mallory's key is trusted to sign revisions, and says it is alice's.
    let mallory = OpenPgpSigner::with_user_id("m@example.org", "Alice <alice@example.org>");
    let keyring_dir = tempfile::tempdir().expect("tempdir");
    let keyring = keyring_dir.path().join("trusted.gpg");
    std::fs::write(&keyring, mallory.gpg(&["--export"])).expect("keyring");
    let repo = trusting_repo(&[&alice, &bob], Some(&keyring), &["alice@example.org"]);
    bob.commit(&repo, "a VM, whose creation waits");
    let run = repo.fleet(&["apply", "--auto-approve"]);
    let (id, digest) = crate::approvals::held_approval(&run.stdout());
    repo.write(&format!("fleet/hitl/{id}.yaml"), answer_yaml(&id, &digest));
    mallory.commit(&repo, "approved, as 'alice'");
    let run = repo.fleet(&["apply", "--auto-approve"]);
    run.expect_code(0);
    assert!(
        run.stdout().contains("Held for approval"),
        "{}",
        run.stdout()
    );
    let record = std::fs::read_to_string(repo.path().join(format!(".fleet/status/hitl/{id}.yaml")))
        .expect("record");
    assert!(record.contains("not an approver"), "{record}");
}

fn answer_yaml(id: &str, digest: &str) -> String {
    format!(
        "apiVersion: fleet/v1\nkind: Answer\nmetadata: {{name: {id}}}\nspec: {{approve: \"{digest}\"}}\n"
    )
}

/// bob (no approver) and alice (one), and a held creation whose approval is `(id, digest)`.
fn held_repo() -> (SshSigner, SshSigner, Repo, String, String) {
    let (alice, bob) = (
        SshSigner::new("alice@example.org"),
        SshSigner::new("bob@example.org"),
    );
    let repo = trusting_repo(&[&alice, &bob], None, &["alice@example.org"]);
    bob.commit(&repo, "a VM, whose creation waits");
    let run = repo.fleet(&["apply", "--auto-approve"]);
    let (id, digest) = crate::approvals::held_approval(&run.stdout());
    (alice, bob, repo, id, digest)
}

fn still_held(repo: &Repo) -> bool {
    let run = repo.fleet(&["apply", "--auto-approve"]);
    run.stdout().contains("Held for approval")
}

#[test]
fn a_merge_cannot_borrow_an_approvers_answer_from_a_side_branch() {
    let (alice, bob, repo, id, digest) = held_repo();
    // Alice once wrote the approval on a branch she then abandoned.
    repo.git(&["checkout", "-q", "-b", "draft"]);
    repo.write(&format!("fleet/hitl/{id}.yaml"), answer_yaml(&id, &digest));
    alice.commit(&repo, "alice's draft approval, never merged");
    repo.git(&["checkout", "-q", "main"]);
    // Bob merges her draft himself: the file comes in through his merge, and is his.
    repo.git(&[
        "-c",
        "gpg.format=ssh",
        "-c",
        &format!("user.signingkey={}", bob.key.display()),
        "merge",
        "-q",
        "-S",
        "--no-ff",
        "-m",
        "bob merges alice's draft",
        "draft",
    ]);
    assert!(still_held(&repo), "bob's merge approved with alice's name");
    let record = std::fs::read_to_string(repo.path().join(format!(".fleet/status/hitl/{id}.yaml")))
        .expect("record");
    assert!(
        record.contains("bob@example.org, who is not an approver"),
        "{record}"
    );
}

#[test]
fn a_tree_with_two_entries_of_one_name_is_refused() {
    let (alice, _bob, repo, id, digest) = held_repo();
    // Alice approved; bob then crafts a tree whose hitl directory holds her file twice,
    // the second entry his own Answer for something else.
    repo.write(&format!("fleet/hitl/{id}.yaml"), answer_yaml(&id, &digest));
    alice.commit(&repo, "alice approves");
    let git_out = |args: &[&str], input: Option<&str>| -> String {
        use std::io::Write;
        let mut child = Command::new("git")
            .args(args)
            .current_dir(repo.path())
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("git");
        if let Some(input) = input {
            child
                .stdin
                .take()
                .expect("stdin")
                .write_all(input.as_bytes())
                .expect("write");
        }
        let out = child.wait_with_output().expect("git");
        assert!(out.status.success(), "git {args:?}");
        String::from_utf8(out.stdout)
            .expect("utf8")
            .trim()
            .to_owned()
    };
    let hitl = git_out(&["rev-parse", "HEAD:fleet/hitl"], None);
    let listing = git_out(&["ls-tree", &hitl], None);
    let blob = git_out(
        &["hash-object", "-w", "--stdin"],
        Some(
            "apiVersion: fleet/v1\nkind: Answer\nmetadata: {name: other}\nspec: {response: yes}\n",
        ),
    );
    let doubled = format!(
        "{listing}\n{}\n",
        listing.replace(
            &git_out(&["rev-parse", &format!("HEAD:fleet/hitl/{id}.yaml")], None),
            &blob
        )
    );
    let new_hitl = git_out(&["mktree"], Some(&doubled));
    let fleet = git_out(&["rev-parse", "HEAD:fleet"], None);
    let fleet_listing = git_out(&["ls-tree", &fleet], None).replace(&hitl, &new_hitl);
    let new_fleet = git_out(&["mktree"], Some(&format!("{fleet_listing}\n")));
    let top = git_out(&["ls-tree", "HEAD"], None).replace(&fleet, &new_fleet);
    let tree = git_out(&["mktree"], Some(&format!("{top}\n")));
    let commit = git_out(
        &["commit-tree", tree.as_str(), "-p", "HEAD", "-m", "crafted"],
        None,
    );
    repo.git(&["update-ref", "refs/heads/main", &commit]);
    let run = repo.fleet(&["apply", "--auto-approve"]);
    run.expect_code(1);
    assert!(
        run.stderr()
            .contains("a tree holds two entries of this name"),
        "{}",
        run.stderr()
    );
}

#[test]
fn a_shallow_clone_credits_no_answer_to_its_oldest_commit() {
    let (alice, _bob, repo, id, digest) = held_repo();
    repo.write(&format!("fleet/hitl/{id}.yaml"), answer_yaml(&id, &digest));
    repo.git(&["add", "-A"]);
    // Bob's (unsigned) approval, then alice's signed commit of something else on top.
    repo.git(&["commit", "-q", "-m", "bob approves, unsigned"]);
    repo.write("README.md", "alice\n");
    alice.commit(&repo, "alice commits something else");
    // A depth-1 clone makes alice's commit look like the one that added everything.
    let clone = tempfile::tempdir().expect("tempdir");
    let out = Command::new("git")
        .args(["clone", "-q", "--depth", "1"])
        .arg(format!("file://{}", repo.path().display()))
        .arg(clone.path().join("c"))
        .output()
        .expect("clone");
    assert!(out.status.success(), "{out:?}");
    let run = Command::new(crate::support::fleet_bin())
        .arg("-C")
        .arg(clone.path().join("c"))
        .args(["apply", "--auto-approve"])
        .env("FLEET_HOST_CONFIG", repo.host_config_path())
        .output()
        .expect("fleet");
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(
        stdout.contains("Held for approval"),
        "{stdout}\n{}",
        String::from_utf8_lossy(&run.stderr)
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
    // The event follows the summary.
    crate::daemon::wait_until(
        "the refusal's event",
        std::time::Duration::from_secs(10),
        || {
            let events = std::fs::read_to_string(repo.path().join(".fleet/status/events.jsonl"))
                .unwrap_or_default();
            events.contains("revision.refused") && events.contains("is not signed")
        },
    );
}
