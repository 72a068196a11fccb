//! `fleet serve` on real git and real libvirtd: commits apply themselves, drift heals, bad
//! commits are refused, one writer only, a clean stop; the page checked in headless Chromium.

use std::io::{BufRead, BufReader, Read, Write};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::libvirt::{Cleanup, enabled, fleet_yaml_with_policy, virsh, virsh_ok, vm_yaml};
use crate::support::{Repo, fleet_bin};

/// A running `fleet serve`, killed on drop if the test did not stop it.
pub struct Daemon {
    pub child: Child,
    pub port: u16,
    /// Everything it wrote to stderr (its logs).
    pub log: std::sync::Arc<std::sync::Mutex<String>>,
}

impl Daemon {
    pub fn start(repo: &Repo) -> Daemon {
        Daemon::start_with(repo, &[], &[])
    }

    /// With extra environment variables and global arguments (before `serve`).
    pub fn start_with(repo: &Repo, env: &[(&str, &str)], args: &[&str]) -> Daemon {
        Daemon::start_serving(repo, env, args, &[])
    }

    /// With `serve_args` after `serve`, too.
    pub fn start_serving(
        repo: &Repo,
        env: &[(&str, &str)],
        args: &[&str],
        serve_args: &[&str],
    ) -> Daemon {
        let mut child = Command::new(fleet_bin())
            .arg("-C")
            .arg(repo.path())
            .args(args)
            .args(["serve", "--listen", "127.0.0.1:0"])
            .args(serve_args)
            .env("FLEET_HOST_CONFIG", repo.host_config_path())
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start fleet serve");
        let stderr = child.stderr.take().expect("stderr");
        let mut lines = BufReader::new(stderr).lines();
        let log = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let keep = |line: &str| {
            let mut log = log.lock().unwrap_or_else(|p| p.into_inner());
            log.push_str(line);
            log.push('\n');
        };
        let port = loop {
            let line = lines
                .next()
                .expect("fleet serve printed its address")
                .expect("utf8");
            keep(&line);
            if let Some(rest) = line.split_once("status page on http://127.0.0.1:") {
                break rest.1.trim_end_matches('/').parse().expect("port");
            }
        };
        // Keep draining stderr so the daemon never blocks on a full pipe.
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in lines.map_while(Result::ok) {
                let mut log = sink.lock().unwrap_or_else(|p| p.into_inner());
                log.push_str(&line);
                log.push('\n');
            }
        });
        Daemon { child, port, log }
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn wait_until(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

pub fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// Sends `request` as it is; returns the response head and body.
fn raw_request(port: u16, request: &str) -> (String, String) {
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    stream.write_all(request.as_bytes()).expect("send");
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("read");
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    (head.to_owned(), body.to_owned())
}

/// A raw HTTP request (no client library needed): returns the status code and body.
pub fn http(port: u16, method: &str, path: &str) -> (u16, String) {
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    write!(stream, "{method} {path} HTTP/1.1\r\nHost: localhost:{port}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n").expect("send");
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("read");
    let code = response
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (code, body)
}

#[test]
fn the_daemon_applies_commits_heals_drift_and_stops_cleanly() {
    if !enabled() {
        return;
    }
    let prefix = format!("it{}-serve-", std::process::id());
    let _cleanup = Cleanup {
        prefix: prefix.clone(),
    };
    let vm = format!("{prefix}a");
    let repo = Repo::new();
    repo.write(
        "fleet/fleet.yaml",
        fleet_yaml_with_policy(
            &format!("it{}serve", std::process::id()),
            "{shutdownTimeout: 10s, reconcileInterval: 30s, resyncInterval: 2s}",
        ),
    );
    repo.commit("no VMs yet");
    let daemon = Daemon::start(&repo);
    let status = repo.path().join(".fleet/status");

    // A commit makes the VM exist, and summary.yaml shows the new revision.
    repo.write(&format!("fleet/vms/{vm}.yaml"), vm_yaml(&vm, "192Mi"));
    let rev = repo.commit("one VM");
    wait_until("the committed VM runs", Duration::from_secs(30), || {
        String::from_utf8_lossy(&virsh(&["domstate", &vm]).stdout).trim() == "running"
    });
    wait_until(
        "summary.yaml shows the revision",
        Duration::from_secs(10),
        || read(&status.join("summary.yaml")).contains(&rev[..12]),
    );

    // The daemon follows the guest agent: connected, with a boot id.
    let vm_status = status.join("vms").join(format!("{vm}.yaml"));
    let boot_id = |text: &str| {
        text.lines()
            .find_map(|l| l.trim().strip_prefix("bootId: ").map(str::to_owned))
    };
    wait_until(
        "the agent's hello shows in the VM's status",
        Duration::from_secs(60),
        || {
            let text = read(&vm_status);
            text.contains("connected: true") && boot_id(&text).is_some()
        },
    );
    let first_boot = boot_id(&read(&vm_status));

    // Uncommitted edits never trigger an apply.
    repo.write(
        &format!("fleet/vms/{prefix}uncommitted.yaml"),
        vm_yaml(&format!("{prefix}uncommitted"), "192Mi"),
    );
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        !virsh(&["domstate", &format!("{prefix}uncommitted")])
            .status
            .success()
    );
    repo.remove(&format!("fleet/vms/{prefix}uncommitted.yaml"));

    // virsh destroy behind fleet's back: the VM runs again and a drift event is recorded.
    virsh_ok(&["destroy", &vm]);
    wait_until(
        "the destroyed VM runs again",
        Duration::from_secs(20),
        || String::from_utf8_lossy(&virsh(&["domstate", &vm]).stdout).trim() == "running",
    );
    let events = read(&status.join("events.jsonl"));
    assert!(
        events.contains(&format!("\"type\":\"vm.drifted\",\"vm\":\"{vm}\"")),
        "{events}"
    );
    // The link follows the new boot: the agent said hello again with a new boot id.
    wait_until(
        "the agent of the new boot says hello",
        Duration::from_secs(60),
        || {
            let text = read(&vm_status);
            text.contains("connected: true")
                && boot_id(&text).is_some_and(|b| Some(b) != first_boot)
        },
    );
    assert!(
        events.contains("the VM was stopped outside fleet"),
        "{events}"
    );

    // virsh setmem: the drift is reported and healed.
    virsh_ok(&["setmem", &vm, "150M", "--config"]);
    wait_until(
        "the memory drift is healed",
        Duration::from_secs(20),
        || {
            virsh_ok(&["dumpxml", "--inactive", &vm])
                .contains("<currentMemory unit='KiB'>196608</currentMemory>")
        },
    );
    let events = read(&status.join("events.jsonl"));
    assert!(
        events.contains("memory is 150 MiB, the applied spec says 192 MiB"),
        "{events}"
    );

    // A bad commit is refused; the previous revision stays applied.
    repo.write(
        &format!("fleet/vms/{prefix}bad.yaml"),
        "apiVersion: fleet/v1\nkind: VM\nmetadata: {name: Bad}\n",
    );
    let bad = repo.commit("a broken VM file");
    wait_until(
        "the bad revision is refused",
        Duration::from_secs(10),
        || read(&status.join("summary.yaml")).contains(&bad[..12]),
    );
    let summary = read(&status.join("summary.yaml"));
    assert!(summary.contains("revisionRefused"), "{summary}");
    assert!(
        summary.contains("metadata.name: string \\\"Bad\\\" is not valid")
            || summary.contains("metadata.name: string \"Bad\" is not valid"),
        "{summary}"
    );
    let applied = summary.split("revisionRefused").next().unwrap_or_default();
    assert!(
        applied.contains(&rev[..12]),
        "the good revision stays applied: {summary}"
    );
    assert!(read(&status.join("events.jsonl")).contains("\"type\":\"revision.refused\""));

    // A second daemon (or an apply) refuses to start, naming the holder.
    let second = repo.fleet(&["serve", "--listen", "127.0.0.1:0"]);
    second.expect_code(1);
    assert!(
        second
            .stderr()
            .contains(&format!("held by PID {}", daemon.child.id())),
        "{}",
        second.stderr()
    );

    // The page, in a real browser: VMs and revision; and it is read-only.
    let dom = Command::new("chromium")
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
        ])
        .arg(format!(
            "--user-data-dir={}",
            repo.path().join(".chromium").display()
        ))
        .args(["--dump-dom", &daemon.url("/")])
        .output()
        .expect("run chromium (apt-get install chromium)");
    let dom = String::from_utf8_lossy(&dom.stdout);
    assert!(dom.contains(&vm), "{dom}");
    assert!(dom.contains(&format!("main@{}", &rev[..12])), "{dom}");
    assert!(dom.contains("Revision refused"), "{dom}");
    assert_eq!(http(daemon.port, "POST", "/").0, 405);
    let (code, metrics) = http(daemon.port, "GET", "/metrics");
    assert_eq!(code, 200);
    assert!(
        metrics.contains("fleet_reconcile_duration_seconds_count"),
        "{metrics}"
    );
    assert!(
        metrics.contains("fleet_apply_steps_total{action=\"start\",outcome=\"succeeded\"}"),
        "{metrics}"
    );

    // DNS rebinding: a request naming a host the page does not serve is refused; every
    // answer forbids scripts and framing.
    let (code, _) = raw_request(
        daemon.port,
        "GET /api/v1/status HTTP/1.1\r\nHost: attacker.example\r\nConnection: close\r\n\r\n",
    );
    assert!(code.starts_with("HTTP/1.1 421"), "{code}");
    let (head, _) = raw_request(
        daemon.port,
        &format!(
            "GET / HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nConnection: close\r\n\r\n",
            daemon.port
        ),
    );
    let head = head.to_ascii_lowercase();
    assert!(
        head.contains("content-security-policy: default-src 'none'"),
        "{head}"
    );
    assert!(head.contains("x-frame-options: deny"), "{head}");
    assert!(head.contains("x-content-type-options: nosniff"), "{head}");

    // 500 clients that send half a header and wait: a normal request and a reconcile still
    // go through, and SIGTERM below still ends the daemon within 5 s.
    let hung: Vec<std::net::TcpStream> = (0..500)
        .map(|_| {
            let mut s = std::net::TcpStream::connect(("127.0.0.1", daemon.port)).expect("connect");
            s.write_all(b"GET / HTTP/1.1\r\nHost: loc")
                .expect("half a header");
            s
        })
        .collect();
    let asked = Instant::now();
    assert_eq!(http(daemon.port, "GET", "/healthz").0, 200);
    assert!(
        asked.elapsed() < Duration::from_secs(5),
        "{:?}",
        asked.elapsed()
    );
    repo.git(&["commit", "-q", "--allow-empty", "-m", "during the flood"]);
    let flood_rev = String::from_utf8(repo.git(&["rev-parse", "HEAD"]).stdout).expect("utf8");
    let summary = repo.path().join(".fleet/status/summary.yaml");
    wait_until(
        "the commit made during the flood is applied",
        Duration::from_secs(30),
        || read(&summary).contains(flood_rev.trim()),
    );

    // SIGTERM: exit 0 within 5 s (the half-open clients still connected), lock released,
    // and no process of its left behind.
    let mut daemon = daemon;
    let pid = daemon.child.id();
    // Children are listed per thread that spawned them.
    let children: Vec<u32> = std::fs::read_dir(format!("/proc/{pid}/task"))
        .expect("tasks")
        .flatten()
        .flat_map(|task| {
            std::fs::read_to_string(task.path().join("children"))
                .unwrap_or_default()
                .split_whitespace()
                .map(str::to_owned)
                .collect::<Vec<_>>()
        })
        .filter_map(|p| p.parse().ok())
        .collect();
    assert!(
        !children.is_empty(),
        "the daemon runs its virsh event follower"
    );
    let killed = Command::new("kill")
        .args(["-TERM", &daemon.child.id().to_string()])
        .status()
        .expect("kill");
    assert!(killed.success());
    let deadline = Instant::now() + Duration::from_secs(5);
    let code = loop {
        if let Some(status) = daemon.child.try_wait().expect("wait") {
            break status.code();
        }
        assert!(
            Instant::now() < deadline,
            "fleet serve did not stop within 5 s of SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(code, Some(0));
    drop(hung);
    for child in children {
        let stat = std::fs::read_to_string(format!("/proc/{child}/stat")).unwrap_or_default();
        assert!(
            stat.is_empty() || stat.contains(") Z "),
            "child {child} outlived the daemon: {stat}"
        );
    }
    // The lock is free: an apply can run (and removes the VM with the broken file fixed).
    repo.remove(&format!("fleet/vms/{prefix}bad.yaml"));
    repo.remove(&format!("fleet/vms/{vm}.yaml"));
    repo.commit("clean up");
    crate::approvals::apply_emptying(&repo);
}

/// A VM whose step keeps failing waits out its backoff, and meanwhile the plan the daemon
/// writes lists its step as deferred, with why; the digest in `plan.json` is the digest of
/// the file's own content (nothing is dropped from a plan after it is made).
#[test]
fn a_vm_in_backoff_is_deferred_in_the_written_plan() {
    use crate::support::{host_yaml, test_driver_provider};
    let repo = Repo::new();
    repo.host_config(&host_yaml(&[test_driver_provider(&repo)], ""));
    repo.write(
        "fleet/fleet.yaml",
        "apiVersion: fleet/v1\nkind: Fleet\nmetadata: {name: backoff}\nspec:\n  providers:\n    - {name: local, type: libvirt, domainType: qemu}\n  images:\n    - {name: broken, kernel: no-such-vmlinuz, initrd: no-such-initrd.img}\n  policy: {reconcileInterval: 1s}\n",
    )
    .write(
        "fleet/vms/a.yaml",
        "apiVersion: fleet/v1\nkind: VM\nmetadata: {name: a}\nspec: {provider: local, image: broken}\n",
    );
    repo.commit("a VM whose image is missing");
    let daemon = Daemon::start(&repo);
    let plan_file = repo.path().join(".fleet/status/plan.json");
    wait_until(
        "plan.json defers the failing VM",
        Duration::from_secs(30),
        || read(&plan_file).contains("\"deferred\""),
    );
    let text = read(&plan_file);
    let plan = fleet::plan::Plan::read_saved(&text)
        .unwrap_or_else(|e| panic!("plan.json is a whole plan ({e}):\n{text}"));
    assert!(plan.steps().is_empty(), "{text}");
    assert_eq!(plan.deferred().len(), 1, "{text}");
    let deferred = &plan.deferred()[0];
    assert_eq!(
        (deferred.step.vm.as_str(), deferred.step.action()),
        ("a", fleet::plan::Action::Create)
    );
    assert!(deferred.why.contains("backoff ends"), "{}", deferred.why);
    drop(daemon);
}

/// A guest that keeps stopping (here `virsh destroy` whenever it runs, as a guest powering
/// itself off would look): after three restarts in ten minutes fleet backs off instead of
/// restarting it on every pass, and says so.
#[test]
fn a_vm_that_keeps_stopping_is_a_crash_loop_and_its_restarts_back_off() {
    if !enabled() {
        return;
    }
    let prefix = format!("it{}-loop-", std::process::id());
    let _cleanup = Cleanup {
        prefix: prefix.clone(),
    };
    let vm = format!("{prefix}a");
    let repo = Repo::new();
    repo.write(
        "fleet/fleet.yaml",
        fleet_yaml_with_policy(
            &format!("it{}loop", std::process::id()),
            "{shutdownTimeout: 5s, reconcileInterval: 30s, resyncInterval: 2s}",
        ),
    )
    .write(&format!("fleet/vms/{vm}.yaml"), vm_yaml(&vm, "192Mi"));
    repo.commit("one VM");
    let _daemon = Daemon::start(&repo);
    let running = || String::from_utf8_lossy(&virsh(&["domstate", &vm]).stdout).trim() == "running";
    wait_until("the VM runs", Duration::from_secs(30), running);
    let status = repo.path().join(".fleet/status");
    let starts = || {
        read(&status.join("events.jsonl"))
            .lines()
            .filter(|l| {
                l.contains("\"type\":\"step.started\"")
                    && l.contains("\"action\":\"start\"")
                    && l.contains(&vm)
            })
            .count()
    };
    // 40 s of a guest that stops as soon as it runs.
    let until = Instant::now() + Duration::from_secs(40);
    while Instant::now() < until {
        if running() {
            let _ = virsh(&["destroy", &vm]);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let restarts = starts();
    eprintln!("restarts in 40 s of a crash loop: {restarts}");
    // Without the backoff it was restarted about every four seconds (ten in 40 s); with it,
    // three at once, then after 10 s and 20 s more.
    assert!((3..=6).contains(&restarts), "{restarts} restarts");
    let events = read(&status.join("events.jsonl"));
    assert!(events.contains("vm.crash_looping"), "{events}");
    wait_until(
        "the VM's status says it is crash looping",
        Duration::from_secs(30),
        || read(&status.join("vms").join(format!("{vm}.yaml"))).contains("CrashLooping"),
    );
}
