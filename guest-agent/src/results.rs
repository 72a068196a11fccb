//! A run's results: what the task left in its checkout, committed and bundled by the real
//! git when the run ends. git runs as the run's own user, with no system or global
//! configuration: the hooks and filters the checkout may name run as the task could run
//! them itself, never as the agent.

use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};

use std::time::{Duration, Instant};

use fleet_agent_protocol::RunResults;

/// The largest bundle sent (the host refuses larger ones too).
pub const MAX_BUNDLE_BYTES: u64 = 64 * 1024 * 1024;
/// How long each git command may take: a run's exit (and its user's clean-up) waits for
/// them, so a filter that never ends must not hold it back.
const GIT_TIMEOUT: Duration = Duration::from_secs(60);

fn git(dir: &Path, uid: Option<u32>, args: &[&str]) -> Command {
    let mut command = Command::new("git");
    // No hooks and no file-system monitor: the commit is the agent's, not the task's
    // (filters the checkout names still run, as the task's user, within the timeout).
    command
        .args([
            "-c",
            "core.hooksPath=/dev/null",
            "-c",
            "core.fsmonitor=false",
            // The guest's CPU is the slow part of bringing a run back (under emulation
            // more so): the fastest compression, which the host does not pay for again,
            // and files over 1 MiB streamed into a pack by `add`, which `bundle` then
            // copies as they are instead of inflating and deflating them again (such a
            // file travels whole, not as a delta of its last version). Measured with
            // `fleet-bench --results`: a 10 MiB change comes back in 2.2 s, not 5.6 s.
            "-c",
            "core.compression=1",
            "-c",
            "core.bigFileThreshold=1m",
        ])
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

/// Runs git to its end, or kills it at `GIT_TIMEOUT`; its output is small (the commands
/// here print little), read after it ends.
fn run(dir: &Path, uid: Option<u32>, args: &[&str]) -> Result<std::process::Output, String> {
    let mut child = git(dir, uid, args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run git {}: {e}", args.join(" ")))?;
    let started = Instant::now();
    loop {
        match child.try_wait() {
            Ok(Some(_)) => break,
            Ok(None) if started.elapsed() < GIT_TIMEOUT => {
                std::thread::sleep(Duration::from_millis(5))
            }
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "git {} took longer than {} s",
                    args.join(" "),
                    GIT_TIMEOUT.as_secs()
                ));
            }
        }
    }
    child
        .wait_with_output()
        .map_err(|e| format!("git {}: {e}", args.join(" ")))
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
    // Its stdout is read as it comes (a bundle is larger than a pipe holds), its stderr
    // dropped (unread, it could fill and stall git), and the whole within `GIT_TIMEOUT`.
    let mut child = git(dir, uid, &["bundle", "create", "-q", "-", &range])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot run git bundle: {e}"))?;
    let stdout = child.stdout.take().expect("piped");
    let reader = std::thread::spawn(move || {
        let mut bytes = Vec::new();
        let read = stdout.take(MAX_BUNDLE_BYTES + 1).read_to_end(&mut bytes);
        (bytes, read)
    });
    let over = |bytes: &Vec<u8>| bytes.len() as u64 > MAX_BUNDLE_BYTES;
    let started = Instant::now();
    let mut reader = Some(reader);
    let mut read: Option<(Vec<u8>, std::io::Result<usize>)> = None;
    let status = loop {
        if reader.as_ref().is_some_and(|r| r.is_finished()) {
            let done = reader
                .take()
                .expect("checked")
                .join()
                .map_err(|_| "reading the bundle failed".to_owned())?;
            // Over its cap, git waits on a full pipe: it is stopped, not waited for.
            if over(&done.0) {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "the run's commits make a bundle larger than {MAX_BUNDLE_BYTES} bytes"
                ));
            }
            read = Some(done);
        }
        match child.try_wait() {
            Ok(Some(status)) if reader.is_none() => break status,
            Ok(_) if started.elapsed() < GIT_TIMEOUT => {
                std::thread::sleep(Duration::from_millis(5))
            }
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "git bundle took longer than {} s",
                    GIT_TIMEOUT.as_secs()
                ));
            }
        }
    };
    let (bytes, result) = read.expect("read before the loop ends");
    result.map_err(|e| format!("reading the bundle: {e}"))?;
    if !status.success() {
        return Err(format!("git bundle failed ({status})"));
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
