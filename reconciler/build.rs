//! Stamps the build with the git revision it was made from, for `fleet --version`: the
//! `FLEET_REVISION` environment variable when a packager sets it (a tarball has no .git),
//! otherwise `git rev-parse` of the checkout, with `-dirty` when the tree has changes.

use std::path::Path;
use std::process::Command;

fn main() {
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
    let git = root.join(".git");
    // A new commit or checkout changes these; nothing else needs a rebuild for the stamp.
    for watched in ["HEAD", "index", "packed-refs"] {
        println!("cargo:rerun-if-changed={}", git.join(watched).display());
    }
    if let Ok(head) = std::fs::read_to_string(git.join("HEAD"))
        && let Some(reference) = head.trim().strip_prefix("ref: ")
    {
        println!("cargo:rerun-if-changed={}", git.join(reference).display());
    }
    let run = |args: &[&str]| {
        Command::new("git")
            .args(args)
            .current_dir(root)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
    };
    let id = run(&["rev-parse", "--short=12", "HEAD"])?;
    let dirty = run(&["status", "--porcelain", "--untracked-files=no"])
        .is_some_and(|changes| !changes.is_empty());
    Some(if dirty { format!("{id}-dirty") } else { id })
}
