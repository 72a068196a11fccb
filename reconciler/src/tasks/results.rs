//! A task's work coming back: the guest's agent commits what the task left in its checkout
//! and sends the new commits as a git bundle; the host checks the bundle before anything of
//! it is used, then writes the change as a patch and pushes it.
//!
//! What a bundle must be: version 2 (or 3 with SHA-1 only); its one prerequisite the
//! fetched commit, its one ref the task's branch; a pack that indexes (every object's hash
//! and every link checked) within `MAX_BUNDLE_BYTES`; a tip that descends from the fetched
//! commit.
//!
//! Where it is checked: in a scratch repository that borrows the repository cache's objects
//! (the cache itself is never written, so a refused bundle leaves nothing and two tasks
//! never share a ref), with git2 only (no git process, hook or filter runs on the host), and
//! in a child process of its own (`fleet __check-bundle`) that caps its own memory and CPU
//! and is killed after `CHECK_TIMEOUT`: a small pack can inflate to far more than it weighs.

use std::path::Path;

use crate::status::tasks::RunChanges;

/// The largest bundle the host takes.
pub const MAX_BUNDLE_BYTES: usize = 64 * 1024 * 1024;
/// How long the check of one bundle (and its push) may take before its process is killed.
pub const CHECK_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(120);
/// The address space and CPU seconds the checking process allows itself.
const CHECK_MEMORY_BYTES: u64 = 2 * 1024 * 1024 * 1024;
const CHECK_CPU_SECONDS: u64 = 60;
/// Blobs larger than this are summed up as binary in the patch, not diffed.
const DIFF_MAX_BLOB_BYTES: i64 = 1024 * 1024;
/// The largest `changes.patch` written; a larger change is summed up, not shown.
pub const MAX_PATCH_BYTES: usize = 8 * 1024 * 1024;

/// Why a guest's bundle was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BundleRefused {
    #[error("the bundle is {0} bytes, more than {MAX_BUNDLE_BYTES}")]
    TooLarge(usize),
    #[error("not a git bundle this host reads: {0}")]
    Malformed(String),
    #[error(
        "the bundle needs {0}, not the fetched commit: its history was rewritten, and only commits on top of the fetched one are taken"
    )]
    ForeignBase(String),
    #[error("the bundle carries {0}; only the task's branch {1} is taken")]
    OtherRef(String, String),
    #[error("the bundle's pack does not index: {0}")]
    BadPack(String),
    #[error("the bundle's tip {0} does not descend from the fetched commit {1}")]
    NotDescendant(String, String),
}

/// A bundle's header.
#[derive(Debug, PartialEq, Eq)]
struct Header {
    prerequisites: Vec<git2::Oid>,
    refs: Vec<(git2::Oid, String)>,
    pack_at: usize,
}

fn parse_header(bundle: &[u8]) -> Result<Header, BundleRefused> {
    let malformed = |why: &str| BundleRefused::Malformed(why.to_owned());
    let mut at = 0;
    let mut line = || -> Result<&[u8], BundleRefused> {
        let rest = &bundle[at..];
        let end = rest
            .iter()
            .take(1024)
            .position(|&b| b == b'\n')
            .ok_or_else(|| malformed("a header line without its end"))?;
        at += end + 1;
        Ok(&rest[..end])
    };
    let version = line()?;
    let v3 = match version {
        b"# v2 git bundle" => false,
        b"# v3 git bundle" => true,
        _ => return Err(malformed("no `# v2 git bundle` line")),
    };
    let mut header = Header {
        prerequisites: Vec::new(),
        refs: Vec::new(),
        pack_at: 0,
    };
    let oid = |hex: &[u8]| {
        std::str::from_utf8(hex)
            .ok()
            .filter(|h| h.len() == 40)
            .and_then(|h| git2::Oid::from_str(h).ok())
            .ok_or_else(|| malformed("an object name that is not 40 hex digits"))
    };
    loop {
        let l = line()?;
        if l.is_empty() {
            break;
        }
        if header.prerequisites.len() + header.refs.len() > 64 {
            return Err(malformed("more than 64 header lines"));
        }
        match l {
            [b'@', capability @ ..] if v3 => {
                if capability != b"object-format=sha1" {
                    return Err(malformed("a capability other than object-format=sha1"));
                }
            }
            [b'-', rest @ ..] => {
                let hex = rest.split(|&b| b == b' ').next().unwrap_or_default();
                header.prerequisites.push(oid(hex)?);
            }
            _ => {
                let (hex, name) = l
                    .split_at_checked(40)
                    .ok_or_else(|| malformed("a ref line too short"))?;
                let name = name
                    .strip_prefix(b" ")
                    .and_then(|n| std::str::from_utf8(n).ok())
                    .ok_or_else(|| malformed("a ref line without its name"))?;
                header.refs.push((oid(hex)?, name.to_owned()));
            }
        }
    }
    header.pack_at = at;
    Ok(header)
}

/// What a checked bundle brought.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Accepted {
    /// The branch's new tip (the fetched commit when the task changed nothing).
    pub tip: git2::Oid,
    pub commits: usize,
}

/// Checks `bundle` and, when it is sound, stores its objects in `repo` (a scratch repository
/// that borrows the cache's objects, `check`) and returns the tip.
pub fn accept_bundle(
    cache: &git2::Repository,
    bundle: &[u8],
    base: git2::Oid,
    branch: &str,
) -> Result<Accepted, BundleRefused> {
    if bundle.len() > MAX_BUNDLE_BYTES {
        return Err(BundleRefused::TooLarge(bundle.len()));
    }
    let header = parse_header(bundle)?;
    if let Some(other) = header.prerequisites.iter().find(|p| **p != base) {
        return Err(BundleRefused::ForeignBase(other.to_string()));
    }
    let wanted = format!("refs/heads/{branch}");
    let tip = match header.refs.as_slice() {
        [(tip, name)] if *name == wanted => *tip,
        [(_, name)] => return Err(BundleRefused::OtherRef(name.clone(), wanted)),
        [] => return Err(BundleRefused::Malformed("no ref".into())),
        [_, (_, name), ..] => return Err(BundleRefused::OtherRef(name.clone(), wanted)),
    };
    let pack = &bundle[header.pack_at..];
    if !pack.starts_with(b"PACK") {
        return Err(BundleRefused::Malformed("no pack after the header".into()));
    }
    let bad_pack = |e: git2::Error| BundleRefused::BadPack(e.message().to_owned());
    {
        use std::io::Write;
        let odb = cache.odb().map_err(bad_pack)?;
        // Verified: every object a tree or commit of the pack names must exist.
        let mut indexer =
            git2::Indexer::new(Some(&odb), &cache.path().join("objects/pack"), 0o444, true)
                .map_err(bad_pack)?;
        indexer
            .write_all(pack)
            .map_err(|e| BundleRefused::BadPack(e.to_string()))?;
        indexer.commit().map_err(bad_pack)?;
        odb.refresh().map_err(bad_pack)?;
    }
    if tip != base {
        let descends =
            cache.find_commit(tip).is_ok() && cache.graph_descendant_of(tip, base).unwrap_or(false);
        if !descends {
            return Err(BundleRefused::NotDescendant(
                tip.to_string(),
                base.to_string(),
            ));
        }
    }
    let commits = if tip == base {
        0
    } else {
        let mut walk = cache.revwalk().map_err(bad_pack)?;
        walk.push(tip).map_err(bad_pack)?;
        walk.hide(base).map_err(bad_pack)?;
        walk.count()
    };
    Ok(Accepted { tip, commits })
}

/// The change from `base` to `tip`: its size, and a patch of it up to `MAX_PATCH_BYTES`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Change {
    pub files_changed: usize,
    pub insertions: usize,
    pub deletions: usize,
    pub patch: Vec<u8>,
    pub patch_truncated: bool,
}

pub fn change(
    cache: &git2::Repository,
    base: git2::Oid,
    tip: git2::Oid,
) -> Result<Change, git2::Error> {
    let tree = |oid| cache.find_commit(oid).and_then(|c| c.tree());
    let mut options = git2::DiffOptions::new();
    options.max_size(DIFF_MAX_BLOB_BYTES);
    let diff =
        cache.diff_tree_to_tree(Some(&tree(base)?), Some(&tree(tip)?), Some(&mut options))?;
    let stats = diff.stats()?;
    let mut change = Change {
        files_changed: stats.files_changed(),
        insertions: stats.insertions(),
        deletions: stats.deletions(),
        ..Change::default()
    };
    diff.print(git2::DiffFormat::Patch, |_, _, line| {
        let origin = line.origin();
        let needed = line.content().len() + 1;
        if change.patch.len() + needed > MAX_PATCH_BYTES {
            change.patch_truncated = true;
            return false;
        }
        if matches!(origin, '+' | '-' | ' ') {
            change.patch.push(origin as u8);
        }
        change.patch.extend_from_slice(line.content());
        true
    })
    .or_else(|e| {
        if change.patch_truncated {
            Ok(())
        } else {
            Err(e)
        }
    })?;
    Ok(change)
}

/// Pushes `tip` to `branch` of `url`, without force: a branch already at `tip` is left as
/// it is (a retry pushes nothing twice), one elsewhere is an error.
pub fn push(
    repo: &git2::Repository,
    url: &str,
    tip: git2::Oid,
    branch: &str,
) -> Result<(), String> {
    push_ref(repo, url, tip, branch).map_err(|e| e.message().to_owned())
}

fn push_ref(
    repo: &git2::Repository,
    url: &str,
    tip: git2::Oid,
    branch: &str,
) -> Result<(), git2::Error> {
    let local = "refs/fleet/results";
    repo.reference(local, tip, true, "fleet: a task's results")?;
    let mut remote = repo.remote_anonymous(url)?;
    let mut rejected: Option<String> = None;
    let mut callbacks = git2::RemoteCallbacks::new();
    callbacks.push_update_reference(|name, status| {
        if let Some(why) = status {
            rejected = Some(format!("{name}: {why}"));
        }
        Ok(())
    });
    let mut options = git2::PushOptions::new();
    options.remote_callbacks(callbacks);
    remote.push(
        &[format!("{local}:refs/heads/{branch}")],
        Some(&mut options),
    )?;
    drop(options);
    match rejected {
        Some(why) => Err(git2::Error::from_str(&format!(
            "the push was refused: {why}"
        ))),
        None => Ok(()),
    }
}

/// Where a checked run's commits go.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PushTo {
    pub url: String,
    pub branch: String,
    /// For an `https://` or `ssh://` URL.
    pub credential: Option<PushCredential>,
}

/// A push's credential on its way to the check's child process (on its stdin, never in
/// its arguments or environment): the value base64, wiped on drop, never in `Debug`.
#[derive(Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PushCredential {
    pub username: Option<String>,
    pub secret: String,
}

impl PushCredential {
    pub fn new(username: Option<String>, secret: &[u8]) -> PushCredential {
        use base64::Engine;
        PushCredential {
            username,
            secret: base64::engine::general_purpose::STANDARD.encode(secret),
        }
    }

    fn credential(&self) -> Result<super::remote::Credential, String> {
        use base64::Engine;
        let secret = base64::engine::general_purpose::STANDARD
            .decode(&self.secret)
            .map_err(|_| "the push credential is not base64".to_owned())?;
        Ok(super::remote::Credential {
            username: self.username.clone(),
            secret: zeroize::Zeroizing::new(secret),
        })
    }
}

impl Drop for PushCredential {
    fn drop(&mut self) {
        zeroize::Zeroize::zeroize(&mut self.secret);
    }
}

impl std::fmt::Debug for PushCredential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PushCredential")
            .field("username", &self.username)
            .finish_non_exhaustive()
    }
}

/// What the check of a bundle found: what the run's record keeps, and the patch.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Checked {
    pub changes: RunChanges,
    pub patch: String,
}

impl Checked {
    fn refused(why: String) -> Checked {
        Checked {
            changes: RunChanges {
                refused: Some(why),
                ..RunChanges::default()
            },
            patch: String::new(),
        }
    }
}

/// Checks `bundle` in a scratch repository borrowing the objects of the cache at
/// `cache_dir` (a bare repository), against `base` for `branch`, and pushes it to `push`.
pub fn check(
    cache_dir: &Path,
    bundle: &[u8],
    base: &str,
    branch: &str,
    push_to: Option<&PushTo>,
    git: &crate::spec::HostGit,
) -> Result<Checked, String> {
    let scratch = tempfile::Builder::new()
        .prefix("fleet-bundle-")
        .tempdir()
        .map_err(|e| format!("a scratch repository: {e}"))?;
    let repo = git2::Repository::init_opts(
        scratch.path(),
        git2::RepositoryInitOptions::new()
            .bare(true)
            .external_template(false),
    )
    .map_err(|e| format!("a scratch repository: {e}"))?;
    let objects = std::fs::canonicalize(cache_dir.join("objects"))
        .map_err(|e| format!("the repository cache {}: {e}", cache_dir.display()))?;
    let info = repo.path().join("objects/info");
    std::fs::create_dir_all(&info).map_err(|e| format!("a scratch repository: {e}"))?;
    #[expect(
        clippy::disallowed_methods,
        reason = "a scratch repository, removed after"
    )]
    std::fs::write(info.join("alternates"), format!("{}\n", objects.display()))
        .map_err(|e| format!("a scratch repository: {e}"))?;
    let repo = git2::Repository::open_bare(repo.path()).map_err(|e| e.message().to_owned())?;
    let base = git2::Oid::from_str(base).map_err(|e| format!("the fetched commit: {e}"))?;
    let accepted = match accept_bundle(&repo, bundle, base, branch) {
        Ok(a) => a,
        Err(refused) => return Ok(Checked::refused(refused.to_string())),
    };
    let change =
        change(&repo, base, accepted.tip).map_err(|e| format!("cannot read the change: {e}"))?;
    let mut checked = Checked {
        changes: RunChanges {
            head: Some(accepted.tip.to_string()),
            commits: accepted.commits,
            files_changed: change.files_changed,
            insertions: change.insertions,
            deletions: change.deletions,
            patch_truncated: change.patch_truncated,
            ..RunChanges::default()
        },
        patch: String::from_utf8_lossy(&change.patch).into_owned(),
    };
    if let Some(to) = push_to.filter(|_| accepted.commits > 0) {
        let pushed = if crate::load::Endpoint::parse(&to.url).is_some() {
            // Over the network: the system's git, as for fetching (`tasks::remote`).
            let credential = to.credential.as_ref().map(PushCredential::credential);
            let credential = credential.transpose()?;
            let fleet = std::env::current_exe().map_err(|e| format!("fleet's own path: {e}"))?;
            super::remote::push(
                repo.path(),
                &to.url,
                &accepted.tip.to_string(),
                &to.branch,
                &super::repo::Access {
                    credential: credential.as_ref(),
                    git,
                    fleet: &fleet,
                },
            )
        } else {
            push(&repo, &to.url, accepted.tip, &to.branch)
        };
        match pushed {
            Ok(()) => checked.changes.pushed = Some(format!("{} {}", to.url, to.branch)),
            Err(why) => {
                checked.changes.push_error = Some(format!(
                    "cannot push to {} {}: {why}; the bundle stays in the run's artifacts",
                    to.url, to.branch
                ))
            }
        }
    }
    Ok(checked)
}

/// What `fleet __check-bundle` is asked: a JSON line on its stdin, the bundle after it.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct CheckRequest {
    pub cache_dir: std::path::PathBuf,
    pub base: String,
    pub branch: String,
    pub push: Option<PushTo>,
    /// The host's settings for pushing over https and ssh.
    #[serde(default)]
    pub git: crate::spec::HostGit,
}

/// `check` in a child process of this same binary (`program`), killed after
/// `CHECK_TIMEOUT`: the request as a JSON line, then the bundle, on its stdin; `Checked`
/// as JSON on its stdout.
pub fn check_isolated(
    program: &Path,
    request: &CheckRequest,
    bundle: &[u8],
) -> Result<Checked, String> {
    use std::io::{Read, Write};
    use std::process::{Command, Stdio};
    let mut child = Command::new(program)
        .arg("__check-bundle")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot start the bundle check: {e}"))?;
    let mut stdin = child.stdin.take().expect("piped");
    // It may carry a push credential: wiped once written.
    let line = zeroize::Zeroizing::new(serde_json::to_string(request).map_err(|e| e.to_string())?);
    let feed = {
        let bundle = bundle.to_vec();
        std::thread::spawn(move || {
            let _ = stdin.write_all(line.as_bytes());
            let _ = stdin.write_all(b"\n");
            let _ = stdin.write_all(&bundle);
        })
    };
    let mut stdout = child.stdout.take().expect("piped");
    let reader = std::thread::spawn(move || {
        let mut out = Vec::new();
        let _ = (&mut stdout).take(64 * 1024 * 1024).read_to_end(&mut out);
        out
    });
    let started = std::time::Instant::now();
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if started.elapsed() < CHECK_TIMEOUT => {
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "the bundle's check took longer than {} s and was stopped",
                    CHECK_TIMEOUT.as_secs()
                ));
            }
        }
    };
    let _ = feed.join();
    let out = reader.join().unwrap_or_default();
    if !status.success() {
        return Err(format!(
            "the bundle's check failed ({status}): it took more memory or CPU than it may, or could not run"
        ));
    }
    serde_json::from_slice(&out).map_err(|e| format!("the bundle's check answered nonsense: {e}"))
}

/// `fleet __check-bundle`: the child side of `check_isolated`. It caps its own address
/// space and CPU time first.
pub fn check_bundle_command() -> std::process::ExitCode {
    use nix::sys::resource::{Resource, setrlimit};
    use std::io::{BufRead, Read, Write};
    let limited = setrlimit(Resource::RLIMIT_AS, CHECK_MEMORY_BYTES, CHECK_MEMORY_BYTES)
        .and_then(|()| setrlimit(Resource::RLIMIT_CPU, CHECK_CPU_SECONDS, CHECK_CPU_SECONDS));
    if limited.is_err() {
        return std::process::ExitCode::from(3);
    }
    let mut input = std::io::stdin().lock();
    let mut line = zeroize::Zeroizing::new(String::new());
    if input.read_line(&mut line).is_err() {
        return std::process::ExitCode::from(2);
    }
    let Ok(request) = serde_json::from_str::<CheckRequest>(&line) else {
        return std::process::ExitCode::from(2);
    };
    let mut bundle = Vec::new();
    if input
        .take(MAX_BUNDLE_BYTES as u64 + 1)
        .read_to_end(&mut bundle)
        .is_err()
    {
        return std::process::ExitCode::from(2);
    }
    let checked = check(
        &request.cache_dir,
        &bundle,
        &request.base,
        &request.branch,
        request.push.as_ref(),
        &request.git,
    )
    .unwrap_or_else(Checked::refused);
    let Ok(json) = serde_json::to_vec(&checked) else {
        return std::process::ExitCode::from(2);
    };
    let mut out = std::io::stdout().lock();
    if out.write_all(&json).and_then(|()| out.flush()).is_err() {
        return std::process::ExitCode::from(2);
    }
    std::process::ExitCode::SUCCESS
}

#[cfg(test)]
mod tests;
