//! File notifications as hints. The repository's git directory: any change there (a commit
//! moves a ref, a fetch rewrites packed-refs) makes the daemon reread the branch tip from git
//! objects, so a missed or spurious event costs nothing but a cheap comparison; working-tree
//! edits are never watched, so uncommitted files never trigger an apply. And `status/hitl/`,
//! where host answer files appear.
//!
//! The watchers are inotify callbacks, with no timer thread of their own: bursts (a commit
//! writes several files) are coalesced by whoever receives the hints (the daemon drains its
//! trigger channel before a pass; a link looks once per wake).

use std::path::Path;

use anyhow::{Context, Result};
use notify::{EventKind, RecommendedWatcher, RecursiveMode, Watcher};
use tokio::sync::mpsc::UnboundedSender;

use super::Trigger;

/// Keeps watching the repository's git directory while the returned value lives.
pub fn watch_git(repo_root: &Path, tx: UnboundedSender<Trigger>) -> Result<RecommendedWatcher> {
    let git_dir = crate::source::git_dir(repo_root)?;
    let mut watcher = watcher(move || {
        let _ = tx.send(Trigger::Git);
    })?;
    // HEAD and packed-refs live at the top; branch refs below refs/ (written by rename).
    watcher
        .watch(&git_dir, RecursiveMode::NonRecursive)
        .with_context(|| format!("cannot watch {}", git_dir.display()))?;
    let refs = git_dir.join("refs");
    watcher
        .watch(&refs, RecursiveMode::Recursive)
        .with_context(|| format!("cannot watch {}", refs.display()))?;
    Ok(watcher)
}

/// Calls `on_change` when anything in `dir` is written, created, renamed or removed (not
/// read); keeps watching while the returned value lives.
pub fn watch_dir(dir: &Path, on_change: impl Fn() + Send + 'static) -> Result<RecommendedWatcher> {
    let mut watcher = watcher(on_change)?;
    watcher
        .watch(dir, RecursiveMode::NonRecursive)
        .with_context(|| format!("cannot watch {}", dir.display()))?;
    Ok(watcher)
}

/// A watcher that calls `on_change` for every event but a read. Reading the repository
/// (which every reconcile does) shows up as access events, and reacting to those would
/// loop. An error from the watcher counts as a change: look again rather than miss one.
fn watcher(on_change: impl Fn() + Send + 'static) -> Result<RecommendedWatcher> {
    notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        let wrote = event.map_or(true, |e| !matches!(e.kind, EventKind::Access(_)));
        if wrote {
            on_change();
        }
    })
    .context("cannot start the file watcher")
}
