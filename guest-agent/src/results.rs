//! A run's results: what the task left in its checkout, committed and bundled by the real
//! git when the run ends. git runs as the run's own user, with no system or global
//! configuration: the hooks and filters the checkout may name run as the task could run
//! them itself, never as the agent.

use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};

use fleet_agent_protocol::RunResults;

/// The largest bundle sent (the host refuses larger ones too).
pub const MAX_BUNDLE_BYTES: u64 = 64 * 1024 * 1024;

fn git(dir: &Path, uid: Option<u32>, args: &[&str]) -> Command {
    let mut command = Command::new("git");
    command
        .args(args)
        .current_dir(dir)
        .env_clear()
        .env("PATH", "/usr/local/bin:/usr/bin:/bin")
        .env("HOME", dir)
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .env("GIT_TERMINAL_PROMPT", "0")
        .stdin(Stdio::null());
    if let Some(uid) = uid {
        command.uid(uid).gid(uid);
    }
    command
}

fn run(dir: &Path, uid: Option<u32>, args: &[&str]) -> Result<std::process::Output, String> {
    git(dir, uid, args)
        .output()
        .map_err(|e| format!("cannot run git {}: {e}", args.join(" ")))
}

fn ok(output: &std::process::Output, what: &str) -> Result<String, String> {
    if output.status.success() {
        Ok(String::from_utf8_lossy(&output.stdout).trim().to_owned())
    } else {
        Err(format!(
            "git {what} failed: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        ))
    }
}

/// Commits what is uncommitted in `dir` on the results' branch and returns the bundle of
/// the commits after the base, or `None` when the run changed nothing.
pub fn bundle(
    dir: &Path,
    results: &RunResults,
    uid: Option<u32>,
) -> Result<Option<Vec<u8>>, String> {
    if !dir.join(".git").is_dir() {
        return Err("the task's directory has no .git any more".into());
    }
    let branch = format!("refs/heads/{}", results.branch);
    ok(&run(dir, uid, &["add", "-A"])?, "add")?;
    // `diff --cached --quiet` exits 1 when something is staged.
    let staged = run(dir, uid, &["diff", "--cached", "--quiet"])?;
    if staged.status.code() == Some(1) {
        ok(
            &run(
                dir,
                uid,
                &["commit", "-q", "--no-verify", "-m", &results.message],
            )?,
            "commit",
        )?;
    }
    let tip = ok(
        &run(dir, uid, &["rev-parse", "--verify", &branch])?,
        "rev-parse",
    )?;
    if tip == results.base {
        return Ok(None);
    }
    let range = format!("{}..{branch}", results.base);
    let mut child = git(dir, uid, &["bundle", "create", "-q", "-", &range])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run git bundle: {e}"))?;
    let mut bytes = Vec::new();
    let stdout = child.stdout.take().expect("piped");
    let read = stdout
        .take(MAX_BUNDLE_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| format!("reading the bundle: {e}"));
    if bytes.len() as u64 > MAX_BUNDLE_BYTES {
        let _ = child.kill();
        let _ = child.wait();
        return Err(format!(
            "the run's commits make a bundle larger than {MAX_BUNDLE_BYTES} bytes"
        ));
    }
    let output = child
        .wait_with_output()
        .map_err(|e| format!("git bundle: {e}"))?;
    read?;
    if !output.status.success() {
        return Err(format!(
            "git bundle failed: {}",
            String::from_utf8_lossy(&output.stderr).trim()
        ));
    }
    Ok(Some(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn git_ok(dir: &Path, args: &[&str]) -> String {
        ok(&run(dir, None, args).expect("git"), args[0]).expect("git succeeds")
    }

    #[test]
    fn what_a_run_leaves_is_committed_and_bundled_after_the_base() {
        let dir = std::env::temp_dir().join(format!("fleet-agent-results-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("mkdir");
        let repo = dir.as_path();
        git_ok(repo, &["init", "-q", "-b", "fleet/t"]);
        git_ok(repo, &["config", "user.name", "Ada"]);
        git_ok(repo, &["config", "user.email", "ada@example.org"]);
        std::fs::write(repo.join("a"), "one\n").expect("write");
        git_ok(repo, &["add", "a"]);
        git_ok(repo, &["commit", "-qm", "base"]);
        let base = git_ok(repo, &["rev-parse", "HEAD"]);
        let results = RunResults {
            base: base.clone(),
            branch: "fleet/t".into(),
            message: "fleet: what task t left".into(),
        };
        // Nothing changed: nothing to send.
        assert_eq!(bundle(repo, &results, None), Ok(None));
        // A change left uncommitted is committed, and the bundle carries it.
        std::fs::write(repo.join("b"), "two\n").expect("write");
        let bytes = bundle(repo, &results, None)
            .expect("bundled")
            .expect("some");
        assert!(
            bytes.starts_with(b"# v2 git bundle\n"),
            "{:?}",
            &bytes[..20]
        );
        assert!(
            String::from_utf8_lossy(&bytes).contains(&format!("-{base}")),
            "the base is its prerequisite"
        );
        assert_eq!(
            git_ok(repo, &["log", "-1", "--format=%s"]),
            "fleet: what task t left"
        );
        assert_eq!(git_ok(repo, &["status", "--porcelain"]), "");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
