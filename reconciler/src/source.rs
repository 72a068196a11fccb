//! Where a fleet revision comes from: the `fleet/` tree of a git commit, read from git
//! objects (never half-written working-tree files), or the working directory for
//! `--worktree`. With `tasks::repo`, the only module that uses git2.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use fleet_core::digest::hex;
pub use fleet_core::snapshot::{Revision, Snapshot, SourceFile};
use sha2::{Digest, Sha256};

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error(
        "{root} is not a git repository (or it has no commits yet): {source}; use --worktree to read files that are not committed"
    )]
    NotARepository { root: PathBuf, source: git2::Error },
    #[error("revision {rev:?} not found: {source}")]
    UnknownRevision { rev: String, source: git2::Error },
    #[error("reading {path} from git: {source}")]
    Git { path: String, source: git2::Error },
    #[error("reading {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error(
        "{path} holds more than {MAX_ENTRIES} entries or {} MiB; a fleet is a few hundred small files, remove what does not belong",
        MAX_SNAPSHOT_BYTES / (1024 * 1024)
    )]
    TooLarge { path: String },
    #[error("pushing to {url}: {source}")]
    Push { url: String, source: git2::Error },
    #[error("{path}: {why}; git fsck shows such objects, which git itself never writes")]
    Malformed { path: String, why: String },
    #[error("HEAD is detached; pass --branch to say which branch to follow")]
    Detached,
    #[error("{} has no commits yet; commit fleet/ first", .0.display())]
    NoCommits(PathBuf),
    #[error("the current branch's name is not UTF-8")]
    BranchName,
}

/// The branch HEAD names (what `fleet serve` follows unless told otherwise).
pub fn current_branch(root: &Path) -> Result<String, SourceError> {
    let repo = open(root)?;
    let head = repo
        .head()
        .map_err(|_| SourceError::NoCommits(root.to_owned()))?;
    if !head.is_branch() {
        return Err(SourceError::Detached);
    }
    head.shorthand()
        .map(str::to_owned)
        .map_err(|_| SourceError::BranchName)
}

/// The repository's git directory (the common one, for a worktree): what changes when a
/// commit moves a ref.
pub fn git_dir(root: &Path) -> Result<PathBuf, SourceError> {
    Ok(open(root)?.commondir().to_owned())
}

fn open(root: &Path) -> Result<git2::Repository, SourceError> {
    git2::Repository::open(root).map_err(|source| SourceError::NotARepository {
        root: root.to_owned(),
        source,
    })
}

/// Files bigger than this are not read at all (the loader reports them); bounds memory.
const READ_CAP: usize = super::load::yaml::MAX_FILE_BYTES + 1;
/// The most entries (files and directories) and bytes a revision's fleet directory may hold.
pub const MAX_ENTRIES: usize = 20_000;
pub const MAX_SNAPSHOT_BYTES: usize = 64 * 1024 * 1024;

/// Reads `fleet_dir` at `rev` (default `HEAD`) from the repository at `root`.
pub fn from_git(root: &Path, fleet_dir: &str, rev: Option<&str>) -> Result<Snapshot, SourceError> {
    let repo = git2::Repository::open(root).map_err(|source| SourceError::NotARepository {
        root: root.to_owned(),
        source,
    })?;
    let spec = rev.unwrap_or("HEAD");
    let commit = repo
        .revparse_single(spec)
        .and_then(|o| o.peel_to_commit())
        .map_err(|source| {
            if rev.is_none() {
                SourceError::NotARepository {
                    root: root.to_owned(),
                    source,
                }
            } else {
                SourceError::UnknownRevision {
                    rev: spec.to_owned(),
                    source,
                }
            }
        })?;
    let id = commit.id().to_string();
    let branch = if rev.is_none() {
        repo.head()
            .ok()
            .and_then(|h| h.shorthand().ok().map(str::to_owned))
            .unwrap_or_else(|| "HEAD".to_owned())
    } else {
        // `refs/heads/main` is the branch `main` to whoever reads the label.
        spec.strip_prefix("refs/heads/").unwrap_or(spec).to_owned()
    };
    let label = format!("{branch}@{}", &id[..12]);
    let tree = commit.tree().map_err(|source| SourceError::Git {
        path: fleet_dir.to_owned(),
        source,
    })?;
    let mut files = Vec::new();
    let dir_entry = tree.get_path(Path::new(fleet_dir));
    if let Ok(entry) = dir_entry {
        let subtree = repo
            .find_tree(entry.id())
            .map_err(|source| SourceError::Git {
                path: fleet_dir.to_owned(),
                source,
            })?;
        let mut walk_err = None;
        let (mut entries, mut bytes) = (0usize, 0usize);
        let walked = subtree.walk(git2::TreeWalkMode::PreOrder, |parent, entry| {
            // A tree naming one subtree many times over, nested, would make a snapshot
            // without end: entries and bytes are bounded (trees count too).
            entries += 1;
            if entries > MAX_ENTRIES || bytes > MAX_SNAPSHOT_BYTES {
                walk_err = Some(SourceError::TooLarge {
                    path: fleet_dir.to_owned(),
                });
                return git2::TreeWalkResult::Abort;
            }
            if entry.kind() != Some(git2::ObjectType::Blob) {
                return git2::TreeWalkResult::Ok;
            }
            let Ok(name) = entry.name() else {
                return git2::TreeWalkResult::Ok;
            };
            let path = format!("{fleet_dir}/{parent}{name}");
            // A crafted tree may name an entry `a/b` or `..`: it would stand for a file
            // that is not where its path says.
            if name.is_empty() || name == "." || name == ".." || name.contains('/') {
                walk_err = Some(SourceError::Malformed {
                    path,
                    why: "a tree entry whose name is no file name".into(),
                });
                return git2::TreeWalkResult::Abort;
            }
            // The size from the object's header first: a blob that inflates past the
            // cap is never inflated (a few KiB of zeros can compress a gigabyte). Its
            // stand-in is as long as the cap, so the loader reports it as too large.
            match repo.odb().and_then(|odb| odb.read_header(entry.id())) {
                Ok((size, _)) if size > READ_CAP => {
                    bytes += READ_CAP;
                    files.push(SourceFile {
                        path,
                        bytes: vec![0; READ_CAP],
                    });
                    return git2::TreeWalkResult::Ok;
                }
                Ok(_) => {}
                Err(source) => {
                    walk_err = Some(SourceError::Git { path, source });
                    return git2::TreeWalkResult::Abort;
                }
            }
            match repo.find_blob(entry.id()) {
                Ok(blob) => {
                    let content = blob.content();
                    let kept = content[..content.len().min(READ_CAP)].to_vec();
                    bytes += kept.len();
                    files.push(SourceFile { path, bytes: kept });
                }
                Err(source) => {
                    walk_err = Some(SourceError::Git { path, source });
                    return git2::TreeWalkResult::Abort;
                }
            }
            git2::TreeWalkResult::Ok
        });
        // A walk the callback ended says why in `walk_err`, before git's own "user abort".
        if let Some(e) = walk_err {
            return Err(e);
        }
        walked.map_err(|source| SourceError::Git {
            path: fleet_dir.to_owned(),
            source,
        })?;
    }
    files.sort_by(|a, b| a.path.cmp(&b.path));
    // A crafted tree may hold two entries of one name: one file for the loader, another
    // for whoever looks the path up.
    if let Some(twice) = files.windows(2).find(|w| w[0].path == w[1].path) {
        return Err(SourceError::Malformed {
            path: twice[0].path.clone(),
            why: "a tree holds two entries of this name".into(),
        });
    }
    Ok(Snapshot {
        revision: Revision {
            id,
            label,
            signed_by: None,
        },
        fleet_dir: fleet_dir.to_owned(),
        files,
        signers: Default::default(),
    })
}

/// Reads `fleet_dir` from the working directory. The revision id is a digest of the files,
/// so a saved plan made from the worktree goes stale when any file changes.
pub fn from_worktree(root: &Path, fleet_dir: &str) -> Result<Snapshot, SourceError> {
    let mut files = Vec::new();
    let base = root.join(fleet_dir);
    // A symlinked fleet directory would have fleet walk (and name in diagnostics) whatever
    // directory of the host it points at.
    if std::fs::symlink_metadata(&base).is_ok_and(|m| m.file_type().is_symlink()) {
        return Err(SourceError::Io {
            path: base.display().to_string(),
            source: std::io::Error::other(
                "the fleet directory is a symlink; fleet reads only a real directory",
            ),
        });
    }
    if base.is_dir() {
        walk_dir(root, &base, &mut files)?;
    }
    files.sort_by(|a, b| a.path.cmp(&b.path));
    let mut hasher = Sha256::new();
    for f in &files {
        hasher.update(f.path.as_bytes());
        hasher.update([0]);
        hasher.update((f.bytes.len() as u64).to_le_bytes());
        hasher.update(&f.bytes);
    }
    let digest = hex(&hasher.finalize());
    Ok(Snapshot {
        revision: Revision {
            id: format!("worktree:{digest}"),
            label: "worktree".to_owned(),
            signed_by: None,
        },
        fleet_dir: fleet_dir.to_owned(),
        files,
        signers: Default::default(),
    })
}

fn walk_dir(root: &Path, dir: &Path, out: &mut Vec<SourceFile>) -> Result<(), SourceError> {
    let io_err = |path: &Path, source| SourceError::Io {
        path: path.display().to_string(),
        source,
    };
    let entries = std::fs::read_dir(dir).map_err(|e| io_err(dir, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| io_err(dir, e))?;
        let path = entry.path();
        let file_type = entry.file_type().map_err(|e| io_err(&path, e))?;
        if file_type.is_dir() {
            walk_dir(root, &path, out)?;
        } else if file_type.is_file() {
            use std::io::Read;
            let mut bytes = Vec::new();
            std::fs::File::open(&path)
                .and_then(|f| f.take(READ_CAP as u64).read_to_end(&mut bytes))
                .map_err(|e| io_err(&path, e))?;
            let rel = path
                .strip_prefix(root)
                .unwrap_or(&path)
                .components()
                .map(|c| c.as_os_str().to_string_lossy())
                .collect::<Vec<_>>()
                .join("/");
            out.push(SourceFile { path: rel, bytes });
        }
    }
    Ok(())
}

/// A commit's signature (`gpgsig`) and the bytes it signs.
#[derive(Clone, Debug)]
pub struct CommitSignature {
    pub signature: Vec<u8>,
    pub signed: Vec<u8>,
}

/// The signature `commit` carries, if any.
pub fn commit_signature(root: &Path, commit: &str) -> Result<Option<CommitSignature>, SourceError> {
    let repo = open(root)?;
    let oid = git2::Oid::from_str(commit).map_err(|source| SourceError::UnknownRevision {
        rev: commit.to_owned(),
        source,
    })?;
    match repo.extract_signature(&oid, None) {
        Ok((signature, signed)) => Ok(Some(CommitSignature {
            signature: signature.to_vec(),
            signed: signed.to_vec(),
        })),
        Err(e) if e.code() == git2::ErrorCode::NotFound => Ok(None),
        Err(source) => Err(SourceError::Git {
            path: commit.to_owned(),
            source,
        }),
    }
}

/// How many commits `last_changes` walks back before it gives up.
const MAX_WALK: usize = 10_000;

/// For each of `paths` (all under `dir`), the commit that last changed it as seen from
/// `tip`, along first parents only: the newest commit whose content of the path differs
/// from its first parent's (so a file a merge brought in is the merge's, never the side
/// branch's, whose commits a merge can pick freely). A path the walk does not settle within
/// `MAX_WALK` commits, or in a shallow repository (whose oldest commit looks like a root),
/// is missing from the answer.
pub fn last_changes(
    root: &Path,
    tip: &str,
    dir: &str,
    paths: &[String],
) -> Result<BTreeMap<String, String>, SourceError> {
    let repo = open(root)?;
    let git = |source| SourceError::Git {
        path: dir.to_owned(),
        source,
    };
    let mut found = BTreeMap::new();
    if repo.is_shallow() {
        return Ok(found);
    }
    let subtree = |commit: &git2::Commit| -> Option<git2::Oid> {
        commit
            .tree()
            .ok()?
            .get_path(Path::new(dir))
            .ok()
            .map(|e| e.id())
    };
    let entry = |commit: &git2::Commit, path: &str| -> Option<git2::Oid> {
        commit
            .tree()
            .ok()?
            .get_path(Path::new(path))
            .ok()
            .map(|e| e.id())
    };
    let mut open: Vec<&String> = paths.iter().collect();
    let mut commit = repo
        .find_commit(git2::Oid::from_str(tip).map_err(git)?)
        .map_err(git)?;
    for _ in 0..MAX_WALK {
        if open.is_empty() {
            break;
        }
        let parent = commit.parent(0).ok();
        // Most commits leave the whole directory as it was: nothing to look at.
        let unchanged = parent
            .as_ref()
            .is_some_and(|p| subtree(p).is_some() && subtree(p) == subtree(&commit));
        if !unchanged {
            open.retain(|path| {
                let here = entry(&commit, path);
                let settled =
                    here.is_none() || parent.as_ref().is_none_or(|p| entry(p, path) != here);
                if settled && here.is_some() {
                    found.insert((*path).clone(), commit.id().to_string());
                }
                !settled
            });
        }
        match parent {
            Some(p) => commit = p,
            None => break,
        }
    }
    Ok(found)
}

/// Opens the bare repository at `path`, making it first when it does not exist (the mirror
/// `fleet serve` keeps of a remote source).
pub fn open_mirror(path: &Path) -> Result<(), SourceError> {
    if git2::Repository::open_bare(path).is_ok() {
        return Ok(());
    }
    git2::Repository::init_bare(path)
        .map(|_| ())
        .map_err(|source| SourceError::NotARepository {
            root: path.to_owned(),
            source,
        })
}

/// The commit `refs/heads/<branch>` points to, if the branch exists.
pub fn branch_tip(root: &Path, branch: &str) -> Result<Option<String>, SourceError> {
    let repo = open(root)?;
    let tip = repo
        .find_reference(&format!("refs/heads/{branch}"))
        .and_then(|r| r.peel_to_commit());
    Ok(tip.ok().map(|c| c.id().to_string()))
}

/// Fetches `refspec` from the repository at the local `url` (a path or `file://`) into
/// `root`, with libgit2 (no process, no hook).
pub fn fetch_local(root: &Path, url: &str, refspecs: &[String]) -> Result<(), SourceError> {
    let repo = open(root)?;
    let git = |source| SourceError::Git {
        path: url.to_owned(),
        source,
    };
    let mut remote = repo.remote_anonymous(url).map_err(git)?;
    remote.fetch(refspecs, None, None).map_err(git)
}

/// The refs of the repository at `root` matching `patterns` (`refs/pull/*/head`), with
/// the commit each points to, by name.
pub fn refs_matching(root: &Path, patterns: &[String]) -> BTreeMap<String, String> {
    let Ok(repo) = open(root) else {
        return BTreeMap::new();
    };
    let mut found = BTreeMap::new();
    for pattern in patterns {
        let Ok(refs) = repo.references_glob(pattern) else {
            continue;
        };
        for r in refs.flatten() {
            if let (Ok(name), Ok(commit)) = (r.name().map(str::to_owned), r.peel_to_commit()) {
                found.insert(name, commit.id().to_string());
            }
        }
    }
    found
}

/// Whether `commit` is `ancestor` or descends from it (false when either is unknown).
pub fn descends(root: &Path, commit: &str, ancestor: &str) -> bool {
    let (Ok(repo), Ok(commit), Ok(ancestor)) = (
        open(root),
        git2::Oid::from_str(commit),
        git2::Oid::from_str(ancestor),
    ) else {
        return false;
    };
    commit == ancestor || repo.graph_descendant_of(commit, ancestor).unwrap_or(false)
}

/// The notes ref fleet writes what became of each applied commit to.
pub const NOTES_REF: &str = "refs/notes/fleet";

/// Writes (or replaces) `text` as the `NOTES_REF` note on `commit`.
pub fn write_note(root: &Path, commit: &str, text: &str) -> Result<(), SourceError> {
    let repo = open(root)?;
    let git = |source| SourceError::Git {
        path: NOTES_REF.to_owned(),
        source,
    };
    let oid = git2::Oid::from_str(commit).map_err(git)?;
    let signature = git2::Signature::now("fleet", "fleet@localhost").map_err(git)?;
    repo.note(&signature, &signature, Some(NOTES_REF), oid, text, true)
        .map(|_| ())
        .map_err(git)
}

/// Pushes `refspec` from `root` to the local repository at `url` (a path or `file://`),
/// with libgit2 (no hook of the target runs).
pub fn push_local(root: &Path, url: &str, refspec: &str) -> Result<(), SourceError> {
    let repo = open(root)?;
    let git = |source| SourceError::Push {
        url: url.to_owned(),
        source,
    };
    let mut remote = repo.remote_anonymous(url).map_err(git)?;
    remote.push(&[refspec], None).map_err(git)
}
