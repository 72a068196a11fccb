//! Signed commits: whose revisions fleet applies, and who wrote each committed Answer.
//!
//! With trust roots in the host configuration (`trust.allowedSigners`, an OpenSSH
//! allowed-signers file; `trust.openpgpKeyring`, an OpenPGP keyring), a revision is applied
//! only when its commit carries a signature they verify, and each committed Answer is
//! attributed to the principal whose verified signature is on the commit that last changed
//! it (`resolve::Approvers` decides whether that principal may answer). Verification is
//! done by the tools git itself uses: `ssh-keygen -Y` (namespace `git`) and `gpgv`, run
//! with an empty environment and a time limit, the signature in a private scratch file and
//! the signed bytes on stdin.
//!
//! Invariant: a revision's `signed_by` and a snapshot's `signers` are only ever set from
//! a signature one of the host's trust roots verified.

use std::collections::{BTreeMap, HashMap};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::source::{self, CommitSignature, Snapshot};
use crate::spec::HostTrust;

/// How long one verification may take.
const TOOL_TIMEOUT: Duration = Duration::from_secs(10);
/// The largest signature verified (an OpenPGP or SSH signature is well under 8 KiB).
const MAX_SIGNATURE_BYTES: usize = 64 * 1024;

/// Why a commit does not count as signed by a trusted principal.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Unverified {
    #[error(
        "commit {commit} is not signed; the host applies only signed commits (trust): sign it with git commit -S"
    )]
    Unsigned { commit: String },
    #[error("commit {commit} is signed, but {why}")]
    Untrusted { commit: String, why: String },
    #[error("cannot verify commit {commit}: {why}")]
    Failed { commit: String, why: String },
    #[error(
        "the working tree is no commit, and the host applies only signed commits (trust): commit, sign and apply the commit"
    )]
    Worktree,
}

/// The host's trust roots, with what was verified already (by commit id: a commit's
/// signature never changes).
pub struct Verifier {
    allowed_signers: Option<PathBuf>,
    openpgp_keyring: Option<PathBuf>,
    /// Verdicts by commit and the digest of the trust roots they were reached under, so
    /// a key removed from a root stops counting at once.
    verified: Mutex<VerdictCache>,
}

type VerdictCache = HashMap<(String, String), Result<String, Unverified>>;

impl Verifier {
    /// `None` when the host verifies no signatures.
    pub fn new(trust: &HostTrust) -> Option<Verifier> {
        trust.verifies().then(|| Verifier {
            allowed_signers: trust.allowed_signers.as_ref().map(|p| PathBuf::from(&p.0)),
            openpgp_keyring: trust.openpgp_keyring.as_ref().map(|p| PathBuf::from(&p.0)),
            verified: Mutex::default(),
        })
    }

    /// The trusted principal who signed `commit` in the repository at `root`.
    pub fn signer(&self, root: &Path, commit: &str) -> Result<String, Unverified> {
        let key = (commit.to_owned(), self.roots_digest());
        if let Some(known) = self.lock().get(&key) {
            return known.clone();
        }
        let verdict = match source::commit_signature(root, commit) {
            Ok(Some(signature)) => self.verify(commit, &signature),
            Ok(None) => Err(Unverified::Unsigned {
                commit: commit.to_owned(),
            }),
            Err(e) => Err(Unverified::Failed {
                commit: commit.to_owned(),
                why: e.to_string(),
            }),
        };
        // A tool that failed is asked again next time; a verdict is kept.
        if !matches!(verdict, Err(Unverified::Failed { .. })) {
            let mut cache = self.lock();
            // Bounded: a long-lived daemon sees new commits for ever.
            if cache.len() >= 4096 {
                cache.clear();
            }
            cache.insert(key, verdict.clone());
        }
        verdict
    }

    /// What the trust roots hold now (files missing or unreadable digest as such).
    fn roots_digest(&self) -> String {
        use sha2::Digest;
        let mut hash = sha2::Sha256::new();
        for root in [&self.allowed_signers, &self.openpgp_keyring] {
            match root.as_ref().map(std::fs::read) {
                Some(Ok(bytes)) => {
                    hash.update((bytes.len() as u64).to_le_bytes());
                    hash.update(&bytes);
                }
                Some(Err(_)) => hash.update(b"unreadable"),
                None => hash.update(b"none"),
            }
        }
        fleet_core::digest::hex(&hash.finalize())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VerdictCache> {
        self.verified.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Checks `snapshot`'s commit (refused unless a trusted principal signed it) and
    /// attributes each committed Answer to the signer of the commit that last changed it.
    pub fn sign_snapshot(&self, root: &Path, snapshot: &mut Snapshot) -> Result<(), Unverified> {
        let tip = snapshot.revision.id.clone();
        if tip.starts_with("worktree:") {
            return Err(Unverified::Worktree);
        }
        snapshot.revision.signed_by = Some(self.signer(root, &tip)?);
        let dir = format!("{}/hitl", snapshot.fleet_dir);
        let answers: Vec<String> = snapshot
            .files
            .iter()
            .filter(|f| f.path.starts_with(&format!("{dir}/")))
            .map(|f| f.path.clone())
            .collect();
        let changed_by = match source::last_changes(root, &tip, &dir, &answers) {
            Ok(found) => found,
            Err(e) => {
                tracing::warn!("committed answers are credited to no one: {e}");
                BTreeMap::new()
            }
        };
        snapshot.signers = changed_by
            .into_iter()
            .filter_map(|(path, commit)| Some((path, self.signer(root, &commit).ok()?)))
            .collect();
        Ok(())
    }

    fn verify(&self, commit: &str, signature: &CommitSignature) -> Result<String, Unverified> {
        let untrusted = |why: String| Unverified::Untrusted {
            commit: commit.to_owned(),
            why,
        };
        let failed = |why: String| Unverified::Failed {
            commit: commit.to_owned(),
            why,
        };
        // A trust root others could write would let them add themselves.
        for root in [&self.allowed_signers, &self.openpgp_keyring]
            .into_iter()
            .flatten()
        {
            if !root.is_file() {
                return Err(failed(format!(
                    "the trust root {} is not a file fleet can read",
                    root.display()
                )));
            }
            crate::fsguard::check_owned_chain(root)
                .map_err(|e| failed(format!("trust root {}: {e}", root.display())))?;
        }
        if signature.signature.len() > MAX_SIGNATURE_BYTES {
            return Err(untrusted(
                "its signature is larger than any real one".into(),
            ));
        }
        let scratch = tempfile::Builder::new()
            .prefix("fleet-verify-")
            .tempdir()
            .map_err(|e| failed(format!("a scratch directory: {e}")))?;
        let sig_path = scratch.path().join("signature");
        std::fs::File::create(&sig_path)
            .and_then(|mut f| f.write_all(&signature.signature))
            .map_err(|e| failed(format!("writing the signature: {e}")))?;
        if signature
            .signature
            .starts_with(b"-----BEGIN SSH SIGNATURE-----")
        {
            let Some(allowed) = &self.allowed_signers else {
                return Err(untrusted(
                    "with an SSH key, and the host has no trust.allowedSigners".into(),
                ));
            };
            ssh_signer(allowed, &sig_path, &signature.signed).map_err(|e| match e {
                ToolError::Refused(why) => untrusted(why),
                ToolError::Failed(why) => failed(why),
            })
        } else if signature
            .signature
            .starts_with(b"-----BEGIN PGP SIGNATURE-----")
        {
            let Some(keyring) = &self.openpgp_keyring else {
                return Err(untrusted(
                    "with an OpenPGP key, and the host has no trust.openpgpKeyring".into(),
                ));
            };
            openpgp_signer(keyring, scratch.path(), &sig_path, &signature.signed).map_err(|e| {
                match e {
                    ToolError::Refused(why) => untrusted(why),
                    ToolError::Failed(why) => failed(why),
                }
            })
        } else {
            Err(untrusted(
                "in a format fleet does not verify (SSH and OpenPGP signatures are)".into(),
            ))
        }
    }
}

enum ToolError {
    /// The tool ran and did not accept the signature.
    Refused(String),
    /// The tool could not be run.
    Failed(String),
}

/// `ssh-keygen -Y find-principals`, then `-Y verify` for each principal it names: the
/// first that verifies.
fn ssh_signer(allowed: &Path, sig: &Path, signed: &[u8]) -> Result<String, ToolError> {
    let found = run_tool(
        Command::new("ssh-keygen")
            .args(["-Y", "find-principals", "-s"])
            .arg(sig)
            .arg("-f")
            .arg(allowed),
        &[],
    )?;
    if !found.ok {
        return Err(ToolError::Refused(
            "by a key no principal of trust.allowedSigners has".into(),
        ));
    }
    let mut said = String::new();
    for principal in found
        .stdout
        .lines()
        .map(str::trim)
        .filter(|p| !p.is_empty())
    {
        let verified = run_tool(
            Command::new("ssh-keygen")
                .args(["-Y", "verify", "-n", "git", "-f"])
                .arg(allowed)
                .arg("-I")
                .arg(principal)
                .arg("-s")
                .arg(sig),
            signed,
        )?;
        if verified.ok {
            return Ok(principal.to_owned());
        }
        said = verified.stderr;
    }
    Err(ToolError::Refused(format!(
        "the signature does not verify for the principal its key belongs to (trust.allowedSigners){}",
        match crate::terminal::one_line(said.trim(), 200) {
            s if s.is_empty() => String::new(),
            s => format!(": ssh-keygen says {s}"),
        }
    )))
}

/// `gpgv` against the host's keyring; the principal is the primary key's fingerprint
/// (`openpgp:<FINGERPRINT>`): a user id is whatever the key's owner wrote, and two keys
/// may claim the same email. Exactly one signature, good and valid.
fn openpgp_signer(
    keyring: &Path,
    home: &Path,
    sig: &Path,
    signed: &[u8],
) -> Result<String, ToolError> {
    let keyring = std::fs::canonicalize(keyring).map_err(|e| {
        ToolError::Failed(format!("trust.openpgpKeyring {}: {e}", keyring.display()))
    })?;
    let out = run_tool(
        Command::new("gpgv")
            .arg("--homedir")
            .arg(home)
            .arg("--keyring")
            .arg(&keyring)
            .args(["--status-fd", "1"])
            .arg(sig)
            .arg("-"),
        signed,
    )?;
    let status: Vec<&str> = out
        .stdout
        .lines()
        .filter_map(|l| l.strip_prefix("[GNUPG:] "))
        .collect();
    let count = |word: &str| {
        status
            .iter()
            .filter(|l| l.split(' ').next() == Some(word))
            .count()
    };
    // VALIDSIG <fpr> <date> <time> <expire> <ver> <reserved> <pubalgo> <hashalgo> <class>
    // <primary key's fpr>
    let primary = status
        .iter()
        .find_map(|l| l.strip_prefix("VALIDSIG "))
        .and_then(|rest| rest.split(' ').nth(9))
        .filter(|fpr| fpr.len() >= 40 && fpr.chars().all(|c| c.is_ascii_hexdigit()));
    match (
        out.ok,
        count("NEWSIG"),
        count("GOODSIG"),
        count("VALIDSIG"),
        primary,
    ) {
        (true, 1, 1, 1, Some(fpr)) => Ok(format!("openpgp:{}", fpr.to_ascii_uppercase())),
        _ => Err(ToolError::Refused(
            "not by a key of trust.openpgpKeyring, or the signature does not verify".into(),
        )),
    }
}

struct ToolOutput {
    ok: bool,
    stdout: String,
    stderr: String,
}

/// Runs a verifier with an empty environment, `input` on stdin, within `TOOL_TIMEOUT`.
fn run_tool(command: &mut Command, input: &[u8]) -> Result<ToolOutput, ToolError> {
    let program = command.get_program().to_string_lossy().into_owned();
    let mut child = command
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| ToolError::Failed(format!("cannot run {program}: {e}")))?;
    let mut stdin = child.stdin.take().expect("piped");
    let input = input.to_vec();
    let writer = std::thread::spawn(move || {
        let _ = stdin.write_all(&input);
    });
    let drain = |mut pipe: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut text = Vec::new();
            let _ = (&mut pipe).take(64 * 1024).read_to_end(&mut text);
            let _ = std::io::copy(&mut pipe, &mut std::io::sink());
            String::from_utf8_lossy(&text).into_owned()
        })
    };
    let reader = drain(Box::new(child.stdout.take().expect("piped")));
    let errors = drain(Box::new(child.stderr.take().expect("piped")));
    let deadline = Instant::now() + TOOL_TIMEOUT;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(5)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(ToolError::Failed(format!(
                    "{program} took longer than {} s",
                    TOOL_TIMEOUT.as_secs()
                )));
            }
        }
    };
    let _ = writer.join();
    Ok(ToolOutput {
        ok: status.success(),
        stdout: reader.join().unwrap_or_default(),
        stderr: errors.join().unwrap_or_default(),
    })
}
