//! A task's repository, fetched on the host with git2 into a bare cache and shipped to the
//! guest as a tar archive of one commit's tree and a shallow `.git` holding that commit on
//! the branch `fleet/<task>`, so the guest needs neither network nor git credentials, and an
//! agent in it can commit as it would on a laptop.

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::digest::hex;
use crate::spec::Repository;

/// Archives larger than this are refused (the guest unpacks into a tmpfs).
pub const MAX_ARCHIVE_BYTES: usize = 256 * 1024 * 1024;
/// And trees with more files than this: a tree can name one subtree many times over.
pub const MAX_ARCHIVE_ENTRIES: usize = 200_000;

/// Why a task's repository cannot be shipped: what fleet was doing, with which repository
/// or file, and the cause.
#[derive(Debug, thiserror::Error)]
pub enum RepoError {
    #[error("repository {url:?}: {problem}; use a path inside the fleet's repository")]
    NotAPath { url: String, problem: String },
    #[error("repository root {}: {source}", path.display())]
    Root {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("repository {url:?}: {source}")]
    Missing { url: String, source: std::io::Error },
    #[error(
        "repository {url:?} resolves to {}, outside the fleet's repository; only paths inside it are fetched",
        real.display()
    )]
    Outside { url: String, real: PathBuf },
    #[error(
        "results push {url:?} resolves to {}, inside the fleet's own repository; results go elsewhere",
        real.display()
    )]
    PushInside { url: String, real: PathBuf },
    #[error("repository {url:?}: its git directory reaches {}, outside the fleet's repository", reaches.display())]
    GitDirOutside { url: String, reaches: PathBuf },
    #[error("repository {url:?}: it borrows objects from elsewhere (objects/info/alternates)")]
    Alternates { url: String },
    #[error("repository {url:?}: {source}")]
    Open { url: String, source: git2::Error },
    #[error("cannot make the repository cache {}: {source}", path.display())]
    Cache { path: PathBuf, source: git2::Error },
    #[error("repository cache {}: cannot {doing}: {source}", path.display())]
    CacheUse {
        path: PathBuf,
        doing: &'static str,
        source: git2::Error,
    },
    #[error("cannot fetch {reference} from {url}: {source}")]
    Fetch {
        reference: String,
        url: String,
        source: git2::Error,
    },
    #[error("repository {url:?}: its credential cannot be read: {problem}")]
    Credential { url: String, problem: String },
    #[error("cannot fetch {reference} from {url}: {message}")]
    Remote {
        reference: String,
        url: String,
        message: String,
    },
    #[error(
        "{url}: rev {rev} is not on {reference}; pin a commit of that branch, or name the branch it is on"
    )]
    NotOnBranch {
        rev: String,
        reference: String,
        url: String,
    },
    #[error("{url} has no {reference}: {source}")]
    NoReference {
        reference: String,
        url: String,
        source: git2::Error,
    },
    #[error("the repository's tree has more than {MAX_ARCHIVE_ENTRIES} entries")]
    TooManyEntries,
    #[error("archiving {path}: the repository's tree is larger than {MAX_ARCHIVE_BYTES} bytes")]
    TooLarge { path: String },
    #[error("archiving {path}: {source}")]
    Git { path: String, source: git2::Error },
    #[error("archiving {path}: {source}")]
    Tar {
        path: String,
        source: std::io::Error,
    },
}

type Result<T> = std::result::Result<T, RepoError>;

pub struct Archive {
    pub commit: String,
    pub url: String,
    pub tar: Vec<u8>,
}

/// The guest's checkout: the branch its `.git` is on, and who commits there.
#[derive(Clone, Debug)]
pub struct Checkout {
    pub branch: String,
    pub author: crate::spec::GitIdentity,
}

/// A URL as git2 takes it: URLs as written (the loader checked them against the host's
/// allowed patterns), paths resolved inside `repo_root` (through symlinks, and refused if
/// they lead outside it).
fn resolved_url(repo_root: &Path, url: &str) -> Result<String> {
    let is_url = url.contains("://") || (url.contains('@') && url.contains(':'));
    if is_url {
        return Ok(url.to_owned());
    }
    if let Some(problem) = crate::load::relative_path_problem(url) {
        return Err(RepoError::NotAPath {
            url: url.to_owned(),
            problem: problem.to_string(),
        });
    }
    let root = std::fs::canonicalize(repo_root).map_err(|source| RepoError::Root {
        path: repo_root.to_owned(),
        source,
    })?;
    let real = std::fs::canonicalize(root.join(url)).map_err(|source| RepoError::Missing {
        url: url.to_owned(),
        source,
    })?;
    if !real.starts_with(&root) {
        return Err(RepoError::Outside {
            url: url.to_owned(),
            real,
        });
    }
    confined_git_dir(url, &real, &root)?;
    Ok(real.display().to_string())
}

/// A repository's own files can point elsewhere: a `commondir` or `gitdir` file, `objects`
/// or `refs` as symlinks, or `objects/info/alternates` would have git read another
/// repository of the host (the host's `/etc/.git`, say) while the path looks inside. Every
/// such place must resolve under `root`, and alternates are refused.
fn confined_git_dir(url: &str, path: &Path, root: &Path) -> Result<()> {
    let repo = git2::Repository::open(path).map_err(|source| RepoError::Open {
        url: url.to_owned(),
        source,
    })?;
    let git_dir = repo.path().to_owned();
    let mut places = vec![git_dir.clone(), repo.commondir().to_owned()];
    for sub in ["objects", "refs"] {
        places.push(repo.commondir().join(sub));
    }
    for place in places {
        if let Ok(real) = std::fs::canonicalize(&place)
            && !real.starts_with(root)
        {
            return Err(RepoError::GitDirOutside {
                url: url.to_owned(),
                reaches: real,
            });
        }
    }
    for alternates in [
        git_dir.join("objects/info/alternates"),
        repo.commondir().join("objects/info/alternates"),
    ] {
        if std::fs::symlink_metadata(&alternates).is_ok() {
            return Err(RepoError::Alternates {
                url: url.to_owned(),
            });
        }
    }
    Ok(())
}

/// The bare repository under `cache_dir` that caches `url` (as `resolved_url` gives it).
fn cache_of(cache_dir: &Path, url: &str) -> PathBuf {
    cache_dir.join(format!(
        "{}.git",
        &hex(&Sha256::digest(url.as_bytes()))[..16]
    ))
}

/// The bare repository a task's repository was fetched into (whose objects its results'
/// check borrows).
pub fn open_cache(cache_dir: &Path, repo_root: &Path, url: &str) -> Result<PathBuf> {
    let path = cache_of(cache_dir, &resolved_url(repo_root, url)?);
    git2::Repository::open_bare(&path).map_err(|source| RepoError::Cache {
        path: path.clone(),
        source,
    })?;
    Ok(path)
}

/// Where a results push may go: a URL (the loader checked it against the host's
/// `pushes`), and for `file://` never into the fleet's own repository (its work tree, its
/// `.git`, the caches and status under `.fleet`), whatever a pattern allows.
pub fn push_url(repo_root: &Path, url: &str) -> Result<String> {
    if !url.contains("://") {
        return Err(RepoError::NotAPath {
            url: url.to_owned(),
            problem: "results are pushed to a URL, never to a path".into(),
        });
    }
    if let Some(path) = url.strip_prefix("file://") {
        let root = std::fs::canonicalize(repo_root).map_err(|source| RepoError::Root {
            path: repo_root.to_owned(),
            source,
        })?;
        let real = std::fs::canonicalize(path).map_err(|source| RepoError::Missing {
            url: url.to_owned(),
            source,
        })?;
        if real.starts_with(&root) {
            return Err(RepoError::PushInside {
                url: url.to_owned(),
                real,
            });
        }
    }
    Ok(url.to_owned())
}

/// How a repository is reached: its credential (already read from the vault) and the
/// host's settings for https and ssh.
pub struct Access<'a> {
    pub credential: Option<&'a super::remote::Credential>,
    pub git: &'a crate::spec::HostGit,
    /// The `fleet` binary, which git runs as its credential helper (`fleet __credential`).
    pub fleet: &'a Path,
}

/// Fetches `repository` (its branch, or the remote's HEAD; every branch when only `rev`
/// pins it) into a bare cache under `cache_dir` and archives the commit (the tip, or
/// `rev`, which must be on what was fetched) with a `.git` for `checkout`. Paths and
/// `file://` URLs are fetched by git2; `https://` and `ssh://` by `tasks::remote`.
pub fn fetch_archive(
    cache_dir: &Path,
    repo_root: &Path,
    repository: &Repository,
    checkout: &Checkout,
    access: &Access,
) -> Result<Archive> {
    let url = resolved_url(repo_root, &repository.url)?;
    let cache = cache_of(cache_dir, &url);
    // One fetch of a cache at a time (VMs stage on threads of their own): the refs a
    // fetch writes are the ones it reads back, never another task's branch.
    let _one_at_a_time = lock_cache(&cache)?;
    let repo = match git2::Repository::open_bare(&cache) {
        Ok(r) => r,
        Err(_) => git2::Repository::init_bare(&cache).map_err(|source| RepoError::Cache {
            path: cache.clone(),
            source,
        })?,
    };
    let (source, target) = match (&repository.branch, &repository.rev) {
        (Some(b), _) => (format!("refs/heads/{b}"), "refs/fleet/fetched".to_owned()),
        (None, Some(_)) => ("refs/heads/*".to_owned(), "refs/fleet/heads/*".to_owned()),
        (None, None) => ("HEAD".to_owned(), "refs/fleet/fetched".to_owned()),
    };
    let cache_error = |doing| {
        let path = cache.clone();
        move |source| RepoError::CacheUse {
            path,
            doing,
            source,
        }
    };
    // A fetch that finds no such branch updates nothing, and a branch gone from the
    // remote must not pin a rev: drop what the previous fetch left first.
    let previous: Vec<String> = repo
        .references_glob("refs/fleet/*")
        .map_err(cache_error("list the previous fetch"))?
        .names()
        .filter_map(|n| n.ok().map(str::to_owned))
        .collect();
    for name in previous {
        if let Ok(mut r) = repo.find_reference(&name) {
            r.delete().map_err(cache_error("drop the previous fetch"))?;
        }
    }
    let refspec = format!("+{source}:{target}");
    let network = ["https://", "ssh://", "git://"]
        .iter()
        .any(|scheme| url.starts_with(scheme));
    if network {
        super::remote::fetch(&cache, &url, &[refspec], access).map_err(|message| {
            RepoError::Remote {
                reference: source.clone(),
                url: url.clone(),
                message,
            }
        })?;
    } else {
        let mut remote = repo
            .remote_anonymous(&url)
            .map_err(|source| RepoError::Open {
                url: url.clone(),
                source,
            })?;
        remote
            .fetch(&[refspec], None, None)
            .map_err(|e| RepoError::Fetch {
                reference: source.clone(),
                url: url.clone(),
                source: e,
            })?;
    }
    let commit = match &repository.rev {
        None => repo
            .find_reference(&target)
            .and_then(|r| r.peel_to_commit())
            .map_err(|e| RepoError::NoReference {
                reference: source.clone(),
                url: url.clone(),
                source: e,
            })?,
        Some(rev) => pinned(&repo, rev, &url, &source)?,
    };
    let tree = commit
        .tree()
        .map_err(cache_error("read the fetched commit's tree"))?;
    // The tree first: its walk is what bounds the work (entries, sizes from object
    // headers) before git2 packs and indexes the same tree for the `.git`, and the `.git`
    // written last in the archive is the one the guest unpacks, whatever the tree holds.
    let mut builder = tar::Builder::new(Vec::new());
    let size = archive_tree(&mut builder, &repo, &tree, 0)?;
    add_git_dir(&mut builder, &repo, &commit, checkout, size)?;
    let tar = builder.into_inner().map_err(|source| RepoError::Tar {
        path: "the end of the archive".into(),
        source,
    })?;
    Ok(Archive {
        commit: commit.id().to_string(),
        url: repository.url.clone(),
        tar,
    })
}

/// Holds `<cache>.lock` exclusively until dropped (the kernel releases it if fleet dies).
fn lock_cache(cache: &Path) -> Result<std::fs::File> {
    let path = cache.with_extension("lock");
    let failed = |source| RepoError::Root {
        path: path.clone(),
        source,
    };
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(failed)?;
    }
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(failed)?;
    file.lock().map_err(failed)?;
    Ok(file)
}

/// The commit `rev` names, when what was just fetched (`refs/fleet/`) reaches it.
fn pinned<'r>(
    repo: &'r git2::Repository,
    rev: &str,
    url: &str,
    source: &str,
) -> Result<git2::Commit<'r>> {
    let not_on = || RepoError::NotOnBranch {
        rev: rev.to_owned(),
        reference: source.to_owned(),
        url: url.to_owned(),
    };
    let id = git2::Oid::from_str(rev).map_err(|_| not_on())?;
    let tips: Vec<git2::Oid> = repo
        .references_glob("refs/fleet/*")
        .map_err(|_| not_on())?
        .filter_map(|r| r.ok()?.peel_to_commit().ok().map(|c| c.id()))
        .collect();
    let reached = tips
        .iter()
        .any(|&tip| tip == id || repo.graph_descendant_of(tip, id).unwrap_or(false));
    if !reached {
        return Err(not_on());
    }
    repo.find_commit(id).map_err(|_| not_on())
}

/// Adds a `.git` to the archive: a shallow repository whose one commit (with its tree, in one
/// pack) is the tip of `checkout.branch`, checked out (an index of the tree), with
/// `checkout.author` as `user.name` and `user.email`. Built in a scratch directory with
/// git2, without the host's templates; `size` bytes are in the archive already (the tree,
/// whose walk bounded what packing it costs).
fn add_git_dir(
    builder: &mut tar::Builder<Vec<u8>>,
    cache: &git2::Repository,
    commit: &git2::Commit<'_>,
    checkout: &Checkout,
    mut size: usize,
) -> Result<()> {
    let failed = |doing: &'static str| {
        move |source| RepoError::CacheUse {
            path: cache.path().to_owned(),
            doing,
            source,
        }
    };
    let scratch = tempfile::tempdir().map_err(|source| RepoError::Tar {
        path: ".git".into(),
        source,
    })?;
    // No template directory: nothing of the host's (its hooks, its `info/exclude`) is shipped.
    let repo = git2::Repository::init_opts(
        scratch.path(),
        git2::RepositoryInitOptions::new().external_template(false),
    )
    .map_err(failed("make the checkout's .git"))?;
    // The identity first: the branch's reflog names who made it, and that is the task's
    // author, never the host user's.
    let mut config = repo
        .config()
        .map_err(failed("write the checkout's config"))?;
    config
        .set_str("user.name", &checkout.author.name)
        .and_then(|()| config.set_str("user.email", &checkout.author.email))
        .map_err(failed("write the checkout's config"))?;
    let mut pack = git2::Buf::new();
    {
        let mut builder = cache
            .packbuilder()
            .map_err(failed("pack the fetched commit"))?;
        builder
            .insert_commit(commit.id())
            .map_err(failed("pack the fetched commit"))?;
        builder
            .write_buf(&mut pack)
            .map_err(failed("pack the fetched commit"))?;
    }
    if size + pack.len() > MAX_ARCHIVE_BYTES {
        return Err(RepoError::TooLarge {
            path: ".git".into(),
        });
    }
    {
        use std::io::Write;
        let odb = repo.odb().map_err(failed("store the checkout's pack"))?;
        let mut writer = odb
            .packwriter()
            .map_err(failed("store the checkout's pack"))?;
        writer.write_all(&pack).map_err(|source| RepoError::Tar {
            path: ".git/objects/pack".into(),
            source,
        })?;
        writer
            .commit()
            .map_err(failed("store the checkout's pack"))?;
    }
    let git_dir = repo.path().to_owned();
    #[expect(
        clippy::disallowed_methods,
        reason = "a scratch directory, archived and removed"
    )]
    std::fs::write(git_dir.join("shallow"), format!("{}\n", commit.id())).map_err(|source| {
        RepoError::Tar {
            path: ".git/shallow".into(),
            source,
        }
    })?;
    let reference = format!("refs/heads/{}", checkout.branch);
    repo.reference(&reference, commit.id(), true, "fleet: the fetched commit")
        .map_err(failed("name the checkout's branch"))?;
    repo.set_head(&reference)
        .map_err(failed("name the checkout's branch"))?;
    let tree = repo
        .find_commit(commit.id())
        .and_then(|c| c.tree())
        .map_err(failed("read the checkout's tree"))?;
    let mut index = repo.index().map_err(failed("write the checkout's index"))?;
    index
        .read_tree(&tree)
        .and_then(|()| index.write())
        .map_err(failed("write the checkout's index"))?;
    for entry in walkdir_files(&git_dir)? {
        let relative = entry
            .strip_prefix(&git_dir)
            .expect("under the git directory");
        let path = Path::new(".git").join(relative);
        let tar = |source| RepoError::Tar {
            path: path.display().to_string(),
            source,
        };
        let data = std::fs::read(&entry).map_err(tar)?;
        size += 512 + data.len();
        if size > MAX_ARCHIVE_BYTES {
            return Err(RepoError::TooLarge {
                path: path.display().to_string(),
            });
        }
        let mut header = tar::Header::new_gnu();
        header.set_mtime(0);
        header.set_size(data.len() as u64);
        header.set_mode(0o644);
        builder
            .append_data(&mut header, &path, data.as_slice())
            .map_err(tar)?;
    }
    Ok(())
}

/// Every regular file under `dir`, depth first (a scratch `.git`: no links).
fn walkdir_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    let mut pending = vec![dir.to_owned()];
    while let Some(at) = pending.pop() {
        let entries = std::fs::read_dir(&at).map_err(|source| RepoError::Tar {
            path: at.display().to_string(),
            source,
        })?;
        for entry in entries.flatten() {
            match entry.file_type() {
                Ok(t) if t.is_dir() => pending.push(entry.path()),
                Ok(t) if t.is_file() => files.push(entry.path()),
                _ => {}
            }
        }
    }
    files.sort();
    Ok(files)
}

/// Adds the tree to the archive: regular files (executables keep their bit) and symlinks;
/// `size` bytes are in it already. Returns the bytes in it after.
fn archive_tree(
    builder: &mut tar::Builder<Vec<u8>>,
    repo: &git2::Repository,
    tree: &git2::Tree<'_>,
    mut size: usize,
) -> Result<usize> {
    let mut failure: Option<RepoError> = None;
    let mut entries = 0usize;
    tree.walk(git2::TreeWalkMode::PreOrder, |root, entry| {
        // Trees count too: one subtree named many times over, nested, is a walk without end.
        entries += 1;
        if entries > MAX_ARCHIVE_ENTRIES {
            failure = Some(RepoError::TooManyEntries);
            return git2::TreeWalkResult::Abort;
        }
        // A tree may name a `.git` of its own (git refuses to check one out): it would
        // replace the checkout's, so it is left out, as git leaves it.
        let name = entry.name().unwrap_or_default();
        if name.eq_ignore_ascii_case(".git") {
            return git2::TreeWalkResult::Skip;
        }
        if entry.kind() != Some(git2::ObjectType::Blob) {
            return git2::TreeWalkResult::Ok;
        }
        let path = format!("{root}{name}");
        // Each entry costs its tar header too, however small the file.
        size += 512;
        let git = |source| RepoError::Git {
            path: path.clone(),
            source,
        };
        let tar = |source| RepoError::Tar {
            path: path.clone(),
            source,
        };
        let added = (|| -> Result<()> {
            // The size from the object's header first: a small compressed blob can inflate
            // to gigabytes, and `find_blob` inflates it whole.
            let (declared, _) = repo
                .odb()
                .and_then(|odb| odb.read_header(entry.id()))
                .map_err(git)?;
            if size + declared > MAX_ARCHIVE_BYTES {
                return Err(RepoError::TooLarge { path: path.clone() });
            }
            let blob = repo.find_blob(entry.id()).map_err(git)?;
            size += blob.content().len();
            let mut header = tar::Header::new_gnu();
            header.set_mtime(0);
            if entry.filemode() == 0o120000 {
                header.set_entry_type(tar::EntryType::Symlink);
                header.set_size(0);
                header.set_mode(0o777);
                let target = String::from_utf8_lossy(blob.content()).into_owned();
                builder
                    .append_link(&mut header, &path, target)
                    .map_err(tar)?;
            } else {
                header.set_size(blob.content().len() as u64);
                header.set_mode(if entry.filemode() == 0o100755 {
                    0o755
                } else {
                    0o644
                });
                builder
                    .append_data(&mut header, &path, blob.content())
                    .map_err(tar)?;
            }
            Ok(())
        })();
        match added {
            Ok(()) => git2::TreeWalkResult::Ok,
            Err(e) => {
                failure = Some(e);
                git2::TreeWalkResult::Abort
            }
        }
    })
    .ok();
    match failure {
        Some(e) => Err(e),
        None => Ok(size),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// git as the source repositories' author.
    fn git(dir: &Path, args: &[&str]) {
        super::super::run_git(dir, &["user.name=t", "user.email=t@example.org"], args);
    }

    /// Paths and `file://` URLs need no credential, host settings or helper.
    fn local() -> Access<'static> {
        const NONE: crate::spec::HostGit = crate::spec::HostGit {
            known_hosts: None,
            ca_file: None,
        };
        Access {
            credential: None,
            git: &NONE,
            fleet: Path::new("fleet"),
        }
    }

    fn checkout() -> Checkout {
        Checkout {
            branch: "fleet/fix".into(),
            author: crate::spec::GitIdentity {
                name: "Ada Agent".into(),
                email: "ada@example.org".into(),
            },
        }
    }

    /// git with nothing but the repository's own configuration (the checkout's identity
    /// is under test).
    fn git_out(dir: &Path, args: &[&str]) -> String {
        super::super::run_git(dir, &[], args)
    }

    #[test]
    fn the_guest_gets_a_shallow_checkout_on_the_tasks_branch_that_commits_as_its_author() {
        let dir = tempfile::tempdir().expect("tempdir");
        let src = dir.path().join("app");
        std::fs::create_dir_all(&src).expect("mkdir");
        std::fs::write(src.join("README"), "one\n").expect("write");
        git(&src, &["init", "-q", "-b", "main"]);
        git(&src, &["add", "."]);
        git(&src, &["commit", "-qm", "one"]);
        std::fs::write(src.join("README"), "two\n").expect("write");
        git(&src, &["commit", "-qam", "two"]);
        let repository = Repository {
            url: "app".into(),
            branch: Some("main".into()),
            rev: None,
            credentials: None,
        };
        let archive = fetch_archive(
            &dir.path().join("cache"),
            dir.path(),
            &repository,
            &checkout(),
            &local(),
        )
        .expect("fetched");
        // Unpacked as the guest's agent unpacks it, the real git sees a clean checkout.
        let guest = dir.path().join("guest");
        tar::Archive::new(archive.tar.as_slice())
            .unpack(&guest)
            .expect("unpack");
        assert_eq!(git_out(&guest, &["rev-parse", "HEAD"]), archive.commit);
        assert_eq!(
            git_out(&guest, &["rev-parse", "--abbrev-ref", "HEAD"]),
            "fleet/fix"
        );
        assert_eq!(
            git_out(&guest, &["rev-parse", "--is-shallow-repository"]),
            "true"
        );
        assert_eq!(git_out(&guest, &["status", "--porcelain"]), "");
        assert_eq!(git_out(&guest, &["log", "--format=%s"]), "two");
        git_out(&guest, &["fsck", "--no-progress"]);
        // Nothing of the host's templates came along: no hook but libgit2's own README.
        let hooks: Vec<String> = std::fs::read_dir(guest.join(".git/hooks"))
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        assert!(hooks.iter().all(|h| h == "README.sample"), "{hooks:?}");
        // A commit there is by the task's author, on top of the fetched commit.
        std::fs::write(guest.join("README"), "three\n").expect("write");
        git_out(&guest, &["commit", "-qam", "three"]);
        assert_eq!(
            git_out(&guest, &["log", "-1", "--format=%an <%ae> / %cn <%ce>"]),
            "Ada Agent <ada@example.org> / Ada Agent <ada@example.org>"
        );
        assert_eq!(git_out(&guest, &["rev-parse", "HEAD~1"]), archive.commit);
    }

    #[test]
    fn a_local_repository_is_archived_at_its_branch() {
        let dir = tempfile::tempdir().expect("tempdir");
        let src = dir.path().join("app");
        std::fs::create_dir_all(src.join("bin")).expect("mkdir");
        std::fs::write(src.join("README"), "hello\n").expect("write");
        std::fs::write(src.join("bin/run"), "#!/bin/sh\necho run\n").expect("write");
        git(&src, &["init", "-q", "-b", "main"]);
        git(&src, &["add", "."]);
        git(&src, &["update-index", "--chmod=+x", "bin/run"]);
        git(&src, &["commit", "-qm", "one"]);
        let cache = dir.path().join("cache");
        let repository = Repository {
            url: "app".into(),
            branch: Some("main".into()),
            rev: None,
            credentials: None,
        };
        let archive =
            fetch_archive(&cache, dir.path(), &repository, &checkout(), &local()).expect("fetched");
        assert_eq!(archive.commit.len(), 40);
        let mut entries = Vec::new();
        for entry in tar::Archive::new(archive.tar.as_slice())
            .entries()
            .expect("tar")
        {
            let mut entry = entry.expect("entry");
            if entry.path().expect("path").starts_with(".git") {
                continue; // The checkout's own test looks at it.
            }
            let mut text = String::new();
            std::io::Read::read_to_string(&mut entry, &mut text).expect("read");
            let mode = entry.header().mode().expect("mode");
            entries.push((
                entry.path().expect("path").display().to_string(),
                mode,
                text,
            ));
        }
        assert_eq!(
            entries,
            vec![
                ("README".into(), 0o644, "hello\n".into()),
                ("bin/run".into(), 0o755, "#!/bin/sh\necho run\n".into()),
            ]
        );
        // The default branch (HEAD) works too, and a second fetch reuses the cache.
        let head = Repository {
            url: "app".into(),
            branch: None,
            rev: None,
            credentials: None,
        };
        assert_eq!(
            fetch_archive(&cache, dir.path(), &head, &checkout(), &local())
                .expect("fetched")
                .commit,
            archive.commit
        );
        let missing = Repository {
            url: "app".into(),
            branch: Some("nope".into()),
            rev: None,
            credentials: None,
        };
        assert!(fetch_archive(&cache, dir.path(), &missing, &checkout(), &local()).is_err());
    }

    #[test]
    fn a_pinned_rev_is_checked_out_only_when_a_branch_reaches_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let src = dir.path().join("app");
        std::fs::create_dir_all(&src).expect("mkdir");
        std::fs::write(src.join("README"), "one\n").expect("write");
        git(&src, &["init", "-q", "-b", "main"]);
        git(&src, &["add", "."]);
        git(&src, &["commit", "-qm", "one"]);
        let first = git_out(&src, &["rev-parse", "HEAD"]);
        std::fs::write(src.join("README"), "two\n").expect("write");
        git(&src, &["commit", "-qam", "two"]);
        // A commit on a branch of its own, and one no branch reaches.
        git(&src, &["checkout", "-q", "-b", "side", &first]);
        std::fs::write(src.join("README"), "side\n").expect("write");
        git(&src, &["commit", "-qam", "side"]);
        let side = git_out(&src, &["rev-parse", "HEAD"]);
        git(&src, &["checkout", "-q", "--detach", &first]);
        std::fs::write(src.join("README"), "loose\n").expect("write");
        git(&src, &["commit", "-qam", "loose"]);
        let loose = git_out(&src, &["rev-parse", "HEAD"]);
        let cache = dir.path().join("cache");
        let at = |branch: Option<&str>, rev: &str| Repository {
            url: "app".into(),
            branch: branch.map(str::to_owned),
            rev: Some(rev.to_owned()),
            credentials: None,
        };
        let fetch = |r: &Repository| fetch_archive(&cache, dir.path(), r, &checkout(), &local());
        // An older commit of main, pinned: exactly it, not the tip.
        assert_eq!(
            fetch(&at(Some("main"), &first)).expect("fetched").commit,
            first
        );
        // Without a branch, any branch that reaches it will do.
        assert_eq!(fetch(&at(None, &side)).expect("fetched").commit, side);
        // Not on the branch named, or on no branch at all: refused, with the fix.
        let refused = fetch(&at(Some("main"), &side))
            .err()
            .expect("refused")
            .to_string();
        assert!(refused.contains("is not on refs/heads/main"), "{refused}");
        assert!(fetch(&at(None, &loose)).is_err());
    }

    #[test]
    fn a_committed_bare_repository_cannot_borrow_another_of_the_host() {
        let dir = tempfile::tempdir().expect("tempdir");
        // Another repository of the host, outside the fleet's (etckeeper's /etc, say).
        let host_repo = dir.path().join("host-etc");
        std::fs::create_dir_all(&host_repo).expect("mkdir");
        std::fs::write(host_repo.join("shadow"), "root:secret\n").expect("write");
        git(&host_repo, &["init", "-q", "-b", "master"]);
        git(&host_repo, &["add", "."]);
        git(&host_repo, &["commit", "-qm", "etc"]);
        // The fleet's repository, holding a bare-looking layout whose objects live elsewhere.
        let root = dir.path().join("fleet-repo");
        let fake = root.join("fleet/vendor/r");
        std::fs::create_dir_all(&fake).expect("mkdir");
        std::fs::write(fake.join("HEAD"), "ref: refs/heads/master\n").expect("HEAD");
        std::fs::write(
            fake.join("commondir"),
            format!("{}\n", host_repo.join(".git").display()),
        )
        .expect("commondir");
        let repository = Repository {
            url: "fleet/vendor/r".into(),
            branch: None,
            rev: None,
            credentials: None,
        };
        let refused = fetch_archive(
            &dir.path().join("cache"),
            &root,
            &repository,
            &checkout(),
            &local(),
        )
        .err()
        .map(|e| format!("{e:#}"));
        let refused = refused.expect("refused");
        assert!(
            refused.contains("outside the fleet's repository"),
            "{refused}"
        );

        // The same with the objects as a link.
        std::fs::remove_file(fake.join("commondir")).expect("rm");
        std::os::unix::fs::symlink(host_repo.join(".git/objects"), fake.join("objects"))
            .expect("link");
        std::os::unix::fs::symlink(host_repo.join(".git/refs"), fake.join("refs")).expect("link");
        let refused = fetch_archive(
            &dir.path().join("cache"),
            &root,
            &repository,
            &checkout(),
            &local(),
        )
        .err()
        .map(|e| format!("{e:#}"))
        .expect("refused");
        assert!(
            refused.contains("outside the fleet's repository"),
            "{refused}"
        );
    }
}
