//! Watches the repository's git directory. Any change there (a commit moves a ref, a fetch
//! rewrites packed-refs) is only a hint: the daemon rereads the branch tip from git objects,
//! so a missed or spurious event costs nothing but a cheap comparison. Working-tree edits
//! are never watched: uncommitted files never trigger an apply.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};
use notify_debouncer_full::notify::{EventKind, RecommendedWatcher, RecursiveMode};
use notify_debouncer_full::{DebounceEventResult, Debouncer, RecommendedCache, new_debouncer};
use tokio::sync::mpsc::UnboundedSender;

use super::Trigger;

/// Short enough that a commit starts a reconcile well within a second.
const DEBOUNCE: Duration = Duration::from_millis(100);

/// Keeps watching while the returned value lives.
pub fn watch_git(
    repo_root: &Path,
    tx: UnboundedSender<Trigger>,
) -> Result<Debouncer<RecommendedWatcher, RecommendedCache>> {
    let git_dir = crate::source::git_dir(repo_root)?;
    let mut debouncer = new_debouncer(
        DEBOUNCE,
        Some(Duration::from_millis(50)),
        move |result: DebounceEventResult| {
            // Reading the repository (which every reconcile does) shows up as access
            // events; only a write can mean a new commit, and reacting to reads would loop.
            let wrote = result.is_ok_and(|events| {
                events
                    .iter()
                    .any(|e| !matches!(e.event.kind, EventKind::Access(_)))
            });
            if wrote {
                let _ = tx.send(Trigger::Git);
            }
        },
    )
    .context("cannot start the file watcher")?;
    // HEAD and packed-refs live at the top; branch refs below refs/ (written by rename).
    debouncer
        .watch(&git_dir, RecursiveMode::NonRecursive)
        .with_context(|| format!("cannot watch {}", git_dir.display()))?;
    let refs = git_dir.join("refs");
    debouncer
        .watch(&refs, RecursiveMode::Recursive)
        .with_context(|| format!("cannot watch {}", refs.display()))?;
    Ok(debouncer)
}

/// Calls `on_change` when anything in `dir` is written, created, renamed or removed (not
/// read), debounced; keeps watching while the returned value lives. What the callback
/// learns is only a hint to look again.
pub fn watch_dir(
    dir: &Path,
    on_change: impl Fn() + Send + 'static,
) -> Result<Debouncer<RecommendedWatcher, RecommendedCache>> {
    let mut debouncer = new_debouncer(
        Duration::from_millis(50),
        None,
        move |result: DebounceEventResult| {
            let wrote = result.is_ok_and(|events| {
                events
                    .iter()
                    .any(|e| !matches!(e.event.kind, EventKind::Access(_)))
            });
            if wrote {
                on_change();
            }
        },
    )
    .context("cannot start the file watcher")?;
    debouncer
        .watch(dir, RecursiveMode::NonRecursive)
        .with_context(|| format!("cannot watch {}", dir.display()))?;
    Ok(debouncer)
}
