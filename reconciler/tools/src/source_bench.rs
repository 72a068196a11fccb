//! Following a remote (`--source`): push-to-apply latency with polling (1 s interval) next
//! to the same push with `fleet reconcile` (the webhook's path: both ask for a fetch now),
//! and what an idle poll costs (one fetch that finds nothing new). On libvirt's in-process
//! test driver: the subject is the source, not the hypervisor.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use fleet::daemon::follow::Follow;

use crate::{ms, percentile};

fn git(dir: &Path, args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("git").args(args).current_dir(dir).output()?;
    anyhow::ensure!(
        out.status.success(),
        "git {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

struct Remote {
    _dir: tempfile::TempDir,
    work: PathBuf,
    bare: PathBuf,
    host: PathBuf,
}

impl Remote {
    fn new(poll: &str) -> anyhow::Result<Remote> {
        let dir = tempfile::Builder::new()
            .prefix("fleet-bench-source-")
            .tempdir()?;
        let (work, bare, host) = (
            dir.path().join("work"),
            dir.path().join("fleet.git"),
            dir.path().join("host"),
        );
        std::fs::create_dir_all(work.join("fleet/vms"))?;
        std::fs::create_dir_all(&host)?;
        std::fs::write(
            work.join("fleet/fleet.yaml"),
            "apiVersion: fleet/v1\nkind: Fleet\nmetadata: {name: benchsource}\nspec:\n  providers: [{name: local, type: libvirt}]\n  images: [{name: micro, kernel: vmlinuz, initrd: initrd.img}]\n  policy: {reconcileInterval: 1h}\n",
        )?;
        git(&work, &["init", "-q", "-b", "main"])?;
        git(&work, &["add", "-A"])?;
        git(
            &work,
            &[
                "-c",
                "user.name=b",
                "-c",
                "user.email=b@fleet.invalid",
                "commit",
                "-qm",
                "start",
            ],
        )?;
        git(dir.path(), &["clone", "-q", "--bare", "work", "fleet.git"])?;
        let images = std::env::current_dir()?.join("build/image");
        std::fs::write(
            host.join("host.yaml"),
            format!(
                "apiVersion: fleet/v1\nkind: Host\nspec:\n  providers:\n    - {{name: local, type: libvirt, uri: 'test:///default', storageDir: '{}'}}\n  imageRoot: '{}'\n  limits: {{minInterval: 1s}}\n  source: {{url: 'file://{}', branch: main, pollInterval: {poll}}}\n",
                host.join("storage").display(),
                images.display(),
                bare.display()
            ),
        )?;
        Ok(Remote {
            _dir: dir,
            work,
            bare,
            host,
        })
    }

    /// Commits VM `name` and pushes it to the bare repository fleet follows.
    fn push_vm(&self, name: &str) -> anyhow::Result<()> {
        std::fs::write(
            self.work.join(format!("fleet/vms/{name}.yaml")),
            format!(
                "apiVersion: fleet/v1\nkind: VM\nmetadata: {{name: {name}}}\nspec: {{provider: local, image: micro}}\n"
            ),
        )?;
        git(&self.work, &["add", "-A"])?;
        git(
            &self.work,
            &[
                "-c",
                "user.name=b",
                "-c",
                "user.email=b@fleet.invalid",
                "commit",
                "-qm",
                name,
            ],
        )?;
        git(
            &self.work,
            &["push", "-q", &self.bare.display().to_string(), "main"],
        )
    }

    fn fleet(&self) -> anyhow::Result<Command> {
        let mut command = Command::new(std::env::current_exe()?.with_file_name("fleet"));
        command
            .arg("-C")
            .arg(&self.host)
            .env("FLEET_HOST_CONFIG", self.host.join("host.yaml"));
        Ok(command)
    }

    fn events(&self) -> String {
        std::fs::read_to_string(self.host.join(".fleet/status/events.jsonl")).unwrap_or_default()
    }

    /// Pushes `pushes` VMs one by one; from each push to its first apply step, after
    /// `nudge` (nothing, or `fleet reconcile`).
    fn latencies(&self, pushes: usize, nudge: bool) -> anyhow::Result<Vec<Duration>> {
        let mut daemon = self
            .fleet()?
            .args(["serve", "--listen", "127.0.0.1:0"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()?;
        let result = (|| {
            let mut seen = Vec::new();
            for i in 0..pushes {
                let name = format!("{}{i:02}", if nudge { "t" } else { "p" });
                self.push_vm(&name)?;
                let pushed = Instant::now();
                if nudge {
                    let out = self.fleet()?.arg("reconcile").output()?;
                    anyhow::ensure!(out.status.success(), "fleet reconcile failed");
                }
                let marker = format!("\"type\":\"step.started\",\"vm\":\"{name}\"");
                while !self.events().contains(&marker) {
                    anyhow::ensure!(
                        pushed.elapsed() < Duration::from_secs(30),
                        "{name} was not applied within 30 s"
                    );
                    std::thread::sleep(Duration::from_millis(2));
                }
                seen.push(pushed.elapsed());
                // Pushes a second or more apart (fetches start at least 250 ms apart),
                // landing at spread-out points of the poll interval.
                std::thread::sleep(Duration::from_millis(1000 + 137 * (i as u64 % 7)));
            }
            Ok(seen)
        })();
        let _ = daemon.kill();
        let _ = daemon.wait();
        result
    }
}

pub fn bench_source(pushes: usize) -> anyhow::Result<()> {
    let polled = Remote::new("1s")?;
    let mut poll = polled.latencies(pushes, false)?;
    let told = Remote::new("1h")?;
    let mut nudged = told.latencies(pushes, true)?;
    poll.sort();
    nudged.sort();
    // An idle poll: one fetch that finds the branch where it was.
    let follow_dir = tempfile::tempdir()?;
    let source = fleet::spec::HostSource {
        url: format!("file://{}", told.bare.display()),
        branch: Some("main".into()),
        poll_interval: None,
        credential_file: None,
        username: None,
        preview_refs: Vec::new(),
    };
    let follow = Follow::open(&source, follow_dir.path(), &Default::default())?;
    follow.fetch()?;
    let mut idle = Vec::new();
    for _ in 0..50 {
        let started = Instant::now();
        follow.fetch()?;
        idle.push(started.elapsed());
    }
    idle.sort();
    println!(
        "source: push to first apply step over {pushes} pushes: polling every 1 s median {:.0} ms, p95 {:.0} ms; with fleet reconcile (the webhook's path) median {:.0} ms, p95 {:.0} ms (ratio {:.2}); an idle poll (file://, nothing new) {:.1} ms (Flux polls every 1-10 min, Argo CD every 3 min)",
        ms(percentile(&poll, 0.5)),
        ms(percentile(&poll, 0.95)),
        ms(percentile(&nudged, 0.5)),
        ms(percentile(&nudged, 0.95)),
        ms(percentile(&nudged, 0.5)) / ms(percentile(&poll, 0.5)).max(0.001),
        ms(percentile(&idle, 0.5)),
    );
    Ok(())
}
