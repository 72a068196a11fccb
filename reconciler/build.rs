//! Stamps the build with the git revision it was made from, for `fleet --version`: the
//! `FLEET_REVISION` environment variable when a packager sets it (a tarball has no .git),
//! otherwise `git rev-parse` of this checkout (never of a repository around it), with
//! `-dirty` when tracked files have changes. And with its build date (UTC): that of
//! `SOURCE_DATE_EPOCH` when a packager sets it (reproducible builds), otherwise the day this
//! script last ran (it runs again at each commit or checkout, not at every build).

use std::path::PathBuf;
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
    println!("cargo:rerun-if-env-changed=SOURCE_DATE_EPOCH");
    let built = std::env::var("SOURCE_DATE_EPOCH")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .map_or_else(std::time::SystemTime::now, |secs| {
            std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs)
        });
    let date = humantime::format_rfc3339_seconds(built).to_string();
    println!("cargo:rustc-env=FLEET_BUILD_DATE={}", &date[..10]);
}

fn git_revision() -> Option<String> {
    // Read when the script runs, not when it was compiled: cargo reuses one compiled
    // script for every checkout that shares a target directory (its hash does not depend
    // on where the checkout is).
    let manifest_dir = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR")?);
    let root = manifest_dir.parent()?;
    // Watched before anything can fail, so a stamp that could not be made (git missing or
    // busy) is made again at the next commit or checkout. Only files that exist: a missing
    // one would rerun this script on every build.
    let git_dir = root.join(".git");
    for watched in ["HEAD", "index", "packed-refs"] {
        watch(git_dir.join(watched));
    }
    if let Ok(head) = std::fs::read_to_string(git_dir.join("HEAD"))
        && let Some(reference) = head.trim().strip_prefix("ref: ")
    {
        watch(git_dir.join(reference));
    }
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
    let id = run(&["rev-parse", "--short=12", "HEAD"])?;
    let dirty = run(&["status", "--porcelain", "--untracked-files=no"])
        .is_some_and(|changes| !changes.is_empty());
    Some(if dirty { format!("{id}-dirty") } else { id })
}

fn watch(path: PathBuf) {
    if path.exists() {
        println!("cargo:rerun-if-changed={}", path.display());
    }
}
