//! A task's work coming back: the guest's agent commits what the task left in its checkout
//! and sends the new commits as a git bundle; the host checks the bundle before anything of
//! it is used, with git2 in its own cache repository (no git process, hook or filter ever
//! runs on the host), then writes the change as a patch and pushes it.
//!
//! What a bundle must be: version 2 (or 3 with SHA-1 only); its one prerequisite the
//! fetched commit, its one ref the task's branch; a pack that indexes (every object's hash
//! checked) within `MAX_BUNDLE_BYTES`; a tip that descends from the fetched commit.

/// The largest bundle the host takes.
pub const MAX_BUNDLE_BYTES: usize = 64 * 1024 * 1024;
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

/// Checks `bundle` and, when it is sound, stores its objects in `cache` (the repository the
/// task's checkout was fetched into) and returns the tip. Nothing is stored from a bundle
/// whose header is refused; a pack that indexes but whose tip is refused leaves objects
/// no ref names, which git's own maintenance removes.
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
        let mut writer = odb.packwriter().map_err(bad_pack)?;
        writer
            .write_all(pack)
            .map_err(|e| BundleRefused::BadPack(e.to_string()))?;
        writer.commit().map_err(bad_pack)?;
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
    let diff = cache.diff_tree_to_tree(Some(&tree(base)?), Some(&tree(tip)?), None)?;
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
    cache: &git2::Repository,
    url: &str,
    tip: git2::Oid,
    branch: &str,
) -> Result<(), git2::Error> {
    let local = format!("refs/fleet/results/{branch}");
    cache.reference(&local, tip, true, "fleet: a task's results")?;
    let mut remote = cache.remote_anonymous(url)?;
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

/// A run's bundle checked against `base` (hex) for `branch` and stored in `cache`, and the
/// change it makes: what the task book records. `Err` says why nothing of it was used.
pub fn collect(
    cache: &git2::Repository,
    bundle: &[u8],
    base: &str,
    branch: &str,
) -> Result<(Accepted, Change), String> {
    let base = git2::Oid::from_str(base).map_err(|e| format!("the fetched commit: {e}"))?;
    let accepted = accept_bundle(cache, bundle, base, branch).map_err(|e| e.to_string())?;
    let change =
        change(cache, base, accepted.tip).map_err(|e| format!("cannot read the change: {e}"))?;
    Ok((accepted, change))
}

#[cfg(test)]
mod tests;
