//! Following a remote repository (host `source`): fleet keeps a bare mirror of its own under
//! the status directory's parent and fetches the branch into it, on the poll interval or
//! when told (`fleet reconcile`, a webhook). The mirror is then read like any repository;
//! no working tree is ever made.
//!
//! `https://` and `ssh://` are fetched by the system's git with `tasks::remote` (clean
//! environment, no hooks, the credential in memory only), `file://` by libgit2. The
//! credential comes from a host file, never from the repository.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use zeroize::Zeroizing;

use crate::spec::{HostGit, HostSource};
use crate::tasks::remote::Credential;

/// The default poll interval.
pub const DEFAULT_POLL: Duration = Duration::from_secs(15);

/// What a fetch found on the followed branch.
#[derive(Debug, PartialEq, Eq)]
pub enum Fetched {
    /// The branch's tip is what the mirror had.
    Same(String),
    /// It moved (or appeared): its new tip, and the mirror's old one.
    Moved { from: Option<String>, to: String },
}

pub struct Follow {
    pub url: String,
    pub branch: String,
    pub mirror: PathBuf,
    pub interval: Duration,
    credential_file: Option<PathBuf>,
    username: Option<String>,
    git: HostGit,
    /// Refs fetched and planned read-only (`source.previewRefs`).
    pub preview_refs: Vec<String>,
}

impl Follow {
    /// The mirror is `<dir>/mirror.git`; it is made when missing.
    pub fn open(source: &HostSource, dir: &Path, git: &HostGit) -> Result<Follow> {
        let mirror = dir.join("mirror.git");
        crate::fsguard::create_private_dirs(dir)
            .with_context(|| format!("making {}", dir.display()))?;
        crate::source::open_mirror(&mirror)?;
        Ok(Follow {
            url: source.url.clone(),
            branch: source.branch.clone().unwrap_or_else(|| "main".to_owned()),
            mirror,
            interval: source
                .poll_interval
                .as_ref()
                .map_or(DEFAULT_POLL, |d| d.to_std()),
            credential_file: source.credential_file.as_ref().map(|p| PathBuf::from(&p.0)),
            username: source.username.clone(),
            git: git.clone(),
            preview_refs: source.preview_refs.clone(),
        })
    }

    /// Fetches the branch into the mirror (forced: a force-push is seen, and judged by the
    /// daemon against the revision in force). Blocking: run it off the async threads.
    pub fn fetch(&self) -> Result<Fetched> {
        let before = crate::source::branch_tip(&self.mirror, &self.branch)?;
        let mut refspecs = vec![
            format!("+refs/heads/{b}:refs/heads/{b}", b = self.branch),
            // Notes others pushed (another host following the same repository) are built
            // on, so fleet's next notes push is a fast-forward.
            // (a glob: a remote without notes is no error)
            "+refs/notes/*:refs/notes/*".to_owned(),
        ];
        refspecs.extend(self.preview_refs.iter().map(|p| format!("+{p}:{p}")));
        if self.url.starts_with("file://") {
            crate::source::fetch_local(&self.mirror, &self.url, &refspecs)?;
        } else {
            let credential = self.credential()?;
            let fleet = std::env::current_exe().context("locating the fleet binary")?;
            let access = crate::tasks::repo::Access {
                credential: credential.as_ref(),
                git: &self.git,
                fleet: &fleet,
            };
            crate::tasks::remote::fetch(&self.mirror, &self.url, &refspecs, &access).map_err(
                |why| anyhow::anyhow!("fetching {} from {}: {why}", self.branch, self.url),
            )?;
        }
        let after = crate::source::branch_tip(&self.mirror, &self.branch)?
            .with_context(|| format!("{} has no branch {}", self.url, self.branch))?;
        Ok(if before.as_deref() == Some(after.as_str()) {
            Fetched::Same(after)
        } else {
            Fetched::Moved {
                from: before,
                to: after,
            }
        })
    }

    /// Pushes fleet's notes (`source::NOTES_REF`) to the source, never forced: notes
    /// another writer added first make it fail, and the next push tries again.
    pub fn push_notes(&self) -> Result<()> {
        let refspec = format!("{r}:{r}", r = crate::source::NOTES_REF);
        if self.url.starts_with("file://") {
            crate::source::push_local(&self.mirror, &self.url, &refspec)?;
            return Ok(());
        }
        let credential = self.credential()?;
        let fleet = std::env::current_exe().context("locating the fleet binary")?;
        let access = crate::tasks::repo::Access {
            credential: credential.as_ref(),
            git: &self.git,
            fleet: &fleet,
        };
        crate::tasks::remote::push_refspec(&self.mirror, &self.url, &refspec, &access)
            .map_err(|why| anyhow::anyhow!("pushing fleet's notes to {}: {why}", self.url))
    }

    /// The credential file's contents, read for each fetch (a rotated key is used at once).
    fn credential(&self) -> Result<Option<Credential>> {
        let Some(path) = &self.credential_file else {
            return Ok(None);
        };
        crate::secrets::check_private_file(path).map_err(anyhow::Error::msg)?;
        let bytes = Zeroizing::new(
            std::fs::read(path).with_context(|| format!("reading {}", path.display()))?,
        );
        // A token is one line; a key keeps its own line breaks.
        let secret = if self.url.starts_with("https://") {
            Zeroizing::new(bytes.trim_ascii().to_vec())
        } else {
            bytes
        };
        Ok(Some(Credential {
            username: Some(self.username.clone().unwrap_or_else(|| "fleet".to_owned())),
            secret,
        }))
    }
}
