//! What bringing a run's work back costs, for a 10 MiB change (goal: under 2 s):
//!
//! - on the host alone: the bundle checked in its child process (`fleet __check-bundle`:
//!   header, indexed pack, descent, diff and patch) and pushed to a bare repository;
//! - end to end on a real VM (libvirt, the micro image, QEMU under TCG): from the task's
//!   last line of output to the pushed branch in its record, which covers the guest's
//!   commit and bundle, the bundle's trip over the agent link, the check and the push.

use std::path::Path;
use std::time::{Duration, Instant};

use crate::ScratchFleet;

const CHANGE_BYTES: usize = 10 * 1024 * 1024;

pub fn bench_results() -> anyhow::Result<()> {
    let host = host_side()?;
    println!(
        "results: a 10 MiB change checked in its child process and pushed to a bare repository: {:.0} ms on the host (goal for the whole path: < 2 s)",
        host.as_secs_f64() * 1000.0
    );
    let (total, boot) = on_a_vm()?;
    println!(
        "results on libvirt (TCG): from a run's last output line to its 10 MiB change pushed: {:.2} s (goal < 2 s; the guest's commit and bundle run under emulation), next to {:.1} s from commit to the task's first output (VM boot included)",
        total.as_secs_f64(),
        boot.as_secs_f64()
    );
    Ok(())
}

fn git(dir: &Path, args: &[&str]) -> anyhow::Result<String> {
    let out = std::process::Command::new("git")
        .args(args)
        .current_dir(dir)
        .output()?;
    anyhow::ensure!(
        out.status.success(),
        "git {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// Bytes that do not compress, as a run's binary output would be.
fn noise(bytes: usize) -> Vec<u8> {
    let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
    (0..bytes)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect()
}

/// A repository with one commit, its bare clone (the cache), and a bundle of a second
/// commit adding `CHANGE_BYTES`, as a guest sends it: the time to check and push it.
fn host_side() -> anyhow::Result<Duration> {
    let dir = tempfile::tempdir()?;
    let work = dir.path().join("work");
    std::fs::create_dir_all(&work)?;
    std::fs::write(work.join("README"), "base\n")?;
    git(&work, &["init", "-q", "-b", "fleet/t"])?;
    git(&work, &["add", "."])?;
    let id = ["-c", "user.name=b", "-c", "user.email=b@fleet.invalid"];
    git(&work, &[&id[..], &["commit", "-qm", "base"]].concat())?;
    let base = git(&work, &["rev-parse", "HEAD"])?;
    git(dir.path(), &["clone", "-q", "--bare", "work", "cache.git"])?;
    std::fs::write(work.join("big.bin"), noise(CHANGE_BYTES))?;
    git(&work, &["add", "."])?;
    git(&work, &[&id[..], &["commit", "-qm", "a run"]].concat())?;
    let bundle_path = dir.path().join("run.bundle");
    git(
        &work,
        &[
            "bundle",
            "create",
            &bundle_path.to_string_lossy(),
            &format!("{base}..fleet/t"),
        ],
    )?;
    let bundle = std::fs::read(&bundle_path)?;
    let target = dir.path().join("review.git");
    git(dir.path(), &["init", "-q", "--bare", "review.git"])?;
    let request = fleet::tasks::results::CheckRequest {
        cache_dir: dir.path().join("cache.git"),
        base,
        branch: "fleet/t".into(),
        push: Some(fleet::tasks::results::PushTo {
            url: format!("file://{}", target.display()),
            branch: "fleet/t/r1".into(),
            credential: None,
        }),
        git: fleet::spec::HostGit::default(),
    };
    let fleet = std::env::current_exe()?.with_file_name("fleet");
    let started = Instant::now();
    let checked = fleet::tasks::results::check_isolated(&fleet, &request, &bundle)
        .map_err(|e| anyhow::anyhow!(e))?;
    let took = started.elapsed();
    anyhow::ensure!(
        checked.changes.pushed.is_some(),
        "the bench's change was not pushed: {:?}",
        checked.changes
    );
    Ok(took)
}

/// A task on a micro VM that writes `CHANGE_BYTES` into its checkout: from its last line
/// of output to the pushed branch, and from the commit to its first line.
fn on_a_vm() -> anyhow::Result<(Duration, Duration)> {
    let scratch = ScratchFleet::new(&format!("benchresults{}", std::process::id()))?;
    let app = tempfile::tempdir()?;
    std::fs::write(app.path().join("README"), "base\n")?;
    git(app.path(), &["init", "-q", "-b", "main"])?;
    git(app.path(), &["add", "."])?;
    git(
        app.path(),
        &[
            "-c",
            "user.name=b",
            "-c",
            "user.email=b@fleet.invalid",
            "commit",
            "-qm",
            "base",
        ],
    )?;
    let review = tempfile::tempdir()?;
    git(review.path(), &["init", "-q", "--bare"])?;
    let host = std::fs::read_to_string(scratch.host_config())?;
    std::fs::write(
        scratch.host_config(),
        format!("{host}  repositories: ['file:///**']\n  pushes: ['file:///**']\n"),
    )?;
    scratch.write(
        "fleet/vms/results.yaml",
        "apiVersion: fleet/v1\nkind: VM\nmetadata: {name: results}\nspec: {provider: local, image: micro, resources: {memory: 512Mi, cpus: 2}}\n",
    )?;
    // /dev/urandom, so the change does not compress; the last line marks the end.
    scratch.write(
        "fleet/tasks/change.yaml",
        &format!(
            "apiVersion: fleet/v1\nkind: Task\nmetadata: {{name: change}}\nspec:\n  vm: results\n  timeout: 10m\n  repository: {{url: 'file://{}', branch: main}}\n  results: {{push: {{url: 'file://{}'}}}}\n  command: [sh, -c, 'echo started; head -c {CHANGE_BYTES} /dev/urandom > big.bin; echo results-bench-end']\n",
            app.path().display(),
            review.path().display()
        ),
    )?;
    scratch.commit("a task with a 10 MiB change")?;
    let committed = Instant::now();
    let _daemon = scratch.serve()?;
    let tasks = scratch.path().join(".fleet/status/tasks");
    let deadline = Instant::now() + Duration::from_secs(600);
    let (mut first, mut last) = (None, None);
    loop {
        let output = std::fs::read_to_string(tasks.join("change/output.log")).unwrap_or_default();
        if first.is_none() && output.contains("started") {
            first = Some(committed.elapsed());
        }
        if last.is_none() && output.contains("results-bench-end") {
            last = Some(Instant::now());
        }
        let record = std::fs::read_to_string(tasks.join("change.yaml")).unwrap_or_default();
        if record.contains("pushed: ") {
            let (Some(first), Some(last)) = (first, last) else {
                anyhow::bail!("pushed before its output was seen: {record}");
            };
            return Ok((last.elapsed(), first));
        }
        if record.contains("refused: ") || record.contains("pushError: ") {
            anyhow::bail!("the change did not come back: {record}");
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the change never came back: {record}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}
