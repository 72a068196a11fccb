//! Stamps the build with the git revision it was made from, for `fleet --version`: the
//! `FLEET_REVISION` environment variable when a packager sets it (a tarball has no .git),
//! otherwise `git rev-parse` of this checkout (never of a repository around it), with
//! `-dirty` when tracked files have changes.

use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=FLEET_REVISION");
    let revision = std::env::var("FLEET_REVISION")
        .ok()
        .filter(|r| !r.is_empty())
        .or_else(git_revision)
        .unwrap_or_else(|| "unknown revision".to_owned());
    println!("cargo:rustc-env=FLEET_REVISION={revision}");
}

fn git_revision() -> Option<String> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent()?;
    let run = |args: &[&str]| {
        Command::new("git")
            .arg("--no-optional-locks")
            .args(args)
            .current_dir(root)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
    };
    // Only this checkout: not a repository that happens to hold an unpacked tarball.
    let top = PathBuf::from(run(&["rev-parse", "--show-toplevel"])?);
    if top.canonicalize().ok()? != root.canonicalize().ok()? {
        return None;
    }
    // A new commit or checkout changes these; watching only files that exist, since a
    // missing one would rerun this script on every build.
    for watched in ["HEAD", "index", "packed-refs"] {
        watch(run(&["rev-parse", "--git-path", watched]), root);
    }
    if let Some(reference) = run(&["symbolic-ref", "-q", "HEAD"]) {
        watch(run(&["rev-parse", "--git-path", &reference]), root);
    }
    let id = run(&["rev-parse", "--short=12", "HEAD"])?;
    let dirty = run(&["status", "--porcelain", "--untracked-files=no"])
        .is_some_and(|changes| !changes.is_empty());
    Some(if dirty { format!("{id}-dirty") } else { id })
}

fn watch(path: Option<String>, root: &Path) {
    if let Some(path) = path {
        let path = root.join(path);
        if path.exists() {
            println!("cargo:rerun-if-changed={}", path.display());
        }
    }
}
