//! The guest link on Proxmox, end to end: `fleet serve` against fakepve, whose
//! qemu-guest-agent `exec` runs for real in a guest running the real `fleet-agent relay`
//! (a private mount namespace per VM; see `tests/fakepve/harness.py`). Tasks with a
//! repository, artifacts, a prompt answered from the host, a secret as a variable and a file,
//! fleet killed mid-task and re-attaching, a guest reboot, and the API token itself read
//! from a Secret. Every request fleet sent is checked against the PVE schema.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::json;

use crate::daemon::{Daemon, read, wait_until};
use crate::proxmox::{PveFleet, checked_wire, vm_yaml};
use crate::pve::{FakePve, enabled};
use crate::secrets::{age_identity, files_containing, random_hex, secret_set, shouted};
use crate::tasks::{Status, field, git_repository, task_yaml};

/// The guest agent the fake guests run: `make agent` builds it (`make test` does).
fn agent_bin() -> PathBuf {
    let path = std::env::var_os("FLEET_AGENT_BIN").map_or_else(
        || Path::new(env!("CARGO_MANIFEST_DIR")).join("../build/fleet-agent"),
        PathBuf::from,
    );
    assert!(
        path.exists(),
        "{} is missing: run `make agent` (or set FLEET_AGENT_BIN)",
        path.display()
    );
    path
}

/// A repository with a file larger than many relayed exchanges carry; returns the file's
/// SHA-256.
fn big_repository(dir: &Path) -> String {
    let big = random_hex(150 * 1024);
    git_repository(dir, &[("big.txt", big.as_bytes())]);
    let digest = <sha2::Sha256 as sha2::Digest>::digest(big.as_bytes());
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

#[test]
fn tasks_prompts_and_secrets_reach_a_proxmox_vm_through_its_guest_agent() {
    if !enabled() {
        return;
    }
    let mut pve = FakePve::start();
    let schema = pve.schema();
    pve.control(json!({"op": "guests", "agentBin": agent_bin()}));
    let keys = tempfile::tempdir().expect("tempdir");
    let (identity, recipient) = age_identity(keys.path(), "age.key");
    let canary = format!("fleetcanary{}", random_hex(12));
    let app = tempfile::tempdir().expect("tempdir");
    let big_sha = big_repository(app.path());

    let f = PveFleet::new(
        &pve,
        "relay",
        "{shutdownTimeout: 5s, reconcileInterval: 30s}",
    );
    // The API token from a Secret, not the host file: the host configuration names it.
    f.repo.host_config(&format!(
        "{}  recipients: [{recipient}]\n",
        PveFleet::host_config(
            &pve,
            &f.host,
            &format!(
                ", token: {{id: '{}', secret: {{secret: pve, key: token}}}}",
                pve.token_id
            )
        )
    ));
    std::fs::remove_file(f.host.path().join("token")).expect("no token file");
    secret_set(&f.repo, "pve", "token", &pve.token);
    secret_set(&f.repo, "canary", "token", &canary);
    f.repo.allow_secret("canary", "{vms: [box]}");
    f.repo.write("fleet/vms/box.yaml", vm_yaml("box", ""));
    f.repo.write(
        "fleet/tasks/build.yaml",
        task_yaml(
            "build",
            "box",
            &format!(
                "  repository: {{url: 'file://{}', branch: main}}\n  command: [sh, -c, 'sha256sum big.txt; mkdir -p out; echo made > out/r.txt; exit 3']\n  artifacts: ['out/*']\n",
                app.path().display()
            ),
        ),
    );
    f.repo.write(
        "fleet/tasks/ask.yaml",
        task_yaml(
            "ask",
            "box",
            "  command: [sh, -c, \"printf 'Deploy now? (y/n) '; read a; echo answer=$a\"]\n",
        ),
    );
    f.repo.write(
        "fleet/tasks/uses.yaml",
        task_yaml(
            "uses",
            "box",
            "  secrets:\n    - {secret: canary, key: token, env: TOKEN}\n    - {secret: canary, key: token, file: app/token}\n  command: [sh, -c, 'echo \"env=$(echo \"$TOKEN\" | tr a-f A-F)\"; echo \"file=$(tr a-f A-F < /run/fleet/secrets/app/token)\"']\n",
        ),
    );
    f.repo.write(
        "fleet/tasks/count.yaml",
        task_yaml(
            "count",
            "box",
            "  command: [sh, -c, 'echo start >> $HOME/starts; echo starts=$(wc -l < $HOME/starts); for i in $(seq 1 12); do echo line-$i; sleep 0.5; done']\n",
        ),
    );
    f.repo
        .commit("a Proxmox VM and its tasks; the token in a Secret");
    let identity_env = identity.to_str().expect("utf8").to_owned();
    let env = [("FLEET_AGE_IDENTITY", identity_env.as_str())];
    let mut daemon = Daemon::start_with(&f.repo, &env, &["-vv"]);
    let status = Status(f.repo.path().join(".fleet/status"));

    // The agent's hello arrives through the relay and shows in the VM's status.
    let vm_status = f.repo.path().join(".fleet/status/vms/box.yaml");
    wait_until("the agent connects", Duration::from_secs(60), || {
        read(&vm_status).contains("connected: true")
    });

    // fleet exec over the relayed link: output, errors and the exit code.
    let exec = f.repo.fleet(&[
        "exec",
        "box",
        "--",
        "sh",
        "-c",
        "echo hi; echo oops >&2; exit 3",
    ]);
    assert_eq!(exec.code(), 3, "{}", exec.stderr());
    assert_eq!(exec.stdout(), "hi\n");
    assert!(exec.stderr().contains("oops"), "{}", exec.stderr());

    // A repository shipped in many exchanges, an exit code, output and artifacts.
    status.wait_phase("build", "Failed", Duration::from_secs(60));
    let build = status.task("build");
    assert_eq!(field(&build, "exitCode").as_deref(), Some("3"), "{build}");
    let output = status.output("build");
    assert!(
        output.contains(&big_sha),
        "the repository arrived whole: {output}"
    );
    assert_eq!(
        read(&status.0.join("tasks/build/artifacts/out/r.txt")),
        "made\n"
    );

    // The secret reaches the task as a variable and as a file.
    status.wait_phase("uses", "Succeeded", Duration::from_secs(30));
    let output = status.output("uses");
    let expected = shouted(&canary);
    assert!(output.contains(&format!("env={expected}")), "{output}");
    assert!(output.contains(&format!("file={expected}")), "{output}");

    // A question becomes a prompt; the host's answer is typed once.
    wait_until("the prompt file appears", Duration::from_secs(30), || {
        !status.prompts("ask").is_empty()
    });
    let prompt_id = status.prompts("ask")[0].clone();
    assert!(
        status
            .prompt(&prompt_id)
            .contains("text: Deploy now? (y/n)")
    );
    f.repo
        .fleet(&["hitl", "answer", &prompt_id, "yes"])
        .expect_code(0);
    status.wait_phase("ask", "Succeeded", Duration::from_secs(30));
    let output = status.output("ask");
    assert_eq!(output.matches("answer=yes").count(), 1, "{output}");

    // fleet killed mid-task: a new fleet opens a new relay session and re-attaches; the
    // output is complete, in order, and the task ran once.
    wait_until("count is under way", Duration::from_secs(30), || {
        status.output("count").contains("line-3")
    });
    daemon.child.kill().expect("SIGKILL fleet");
    daemon.child.wait().expect("reaped");
    let daemon = Daemon::start_with(&f.repo, &env, &["-vv"]);
    status.wait_phase("count", "Succeeded", Duration::from_secs(60));
    let output = status.output("count");
    assert_eq!(output.matches("starts=1").count(), 1, "{output}");
    let lines: Vec<&str> = output
        .lines()
        .map(str::trim)
        .filter(|l| l.starts_with("line-"))
        .collect();
    let expected_lines: Vec<String> = (1..=12).map(|i| format!("line-{i}")).collect();
    assert_eq!(lines, expected_lines, "complete, in order, no repeats");

    // A reboot is a new boot: the link follows it, and the secrets are delivered again
    // (the guest's tmpfs lost them).
    let boot_id = |text: String| {
        text.lines()
            .find_map(|l| l.trim().strip_prefix("bootId: ").map(str::to_owned))
    };
    let boot_before = boot_id(read(&vm_status));
    assert!(boot_before.is_some());
    let vmid = pve.vm_named("box").expect("box")["vmid"].clone();
    pve.control(json!({"op": "set", "vmid": vmid, "attrs": {"started_at": 1.0}}));
    // The link notices the new boot at its next exchange and reconnects after its pause. A
    // task committed before that would be started on the boot that is gone, and failed as
    // interrupted by the restart when the link sees the new one (see `BookState::tick`).
    wait_until("the new boot shows", Duration::from_secs(60), || {
        boot_id(read(&vm_status)).is_some_and(|b| Some(&b) != boot_before.as_ref())
    });
    f.repo.write(
        "fleet/tasks/again.yaml",
        task_yaml(
            "again",
            "box",
            "  secrets: [{secret: canary, key: token, env: TOKEN}]\n  command: [sh, -c, 'echo \"again=$(echo \"$TOKEN\" | tr a-f A-F)\"']\n",
        ),
    );
    f.repo.commit("a task after the reboot");
    // The secrets went to the new boot again (its tmpfs lost them) before the task ran.
    status.wait_phase("again", "Succeeded", Duration::from_secs(60));
    assert!(
        status
            .output("again")
            .contains(&format!("again={expected}"))
    );

    // A network that drops a fifth of the requests: exchanges are sent again (their
    // offsets make that safe), and the output arrives complete, in order, once. Which
    // requests the drops hit depends on timing, so two exchanges are also answered by a
    // failing proxy for certain.
    pve.control(json!({"op": "flaky", "drop_rate": 0.2, "seed": 11}));
    pve.control(
        json!({"op": "fail", "method": "POST", "suffix": "/agent/exec",
                       "status": 503, "message": "Service Unavailable", "times": 2}),
    );
    f.repo.write(
        "fleet/tasks/noisy.yaml",
        task_yaml(
            "noisy",
            "box",
            "  command: [sh, -c, 'for i in $(seq 1 40); do echo n-$i; sleep 0.05; done']\n",
        ),
    );
    f.repo.commit("output through a flaky network");
    status.wait_phase("noisy", "Succeeded", Duration::from_secs(90));
    pve.control(json!({"op": "clear_faults"}));
    let output = status.output("noisy");
    let noisy: Vec<&str> = output
        .lines()
        .map(str::trim)
        .filter(|l| l.starts_with("n-"))
        .collect();
    let expected_noisy: Vec<String> = (1..=40).map(|i| format!("n-{i}")).collect();
    assert_eq!(noisy, expected_noisy, "complete, in order, no repeats");

    // Every request was one the PVE API takes; the guest link used only the agent's
    // exec and exec-status.
    let wire = checked_wire(&mut pve, &schema);
    let agent_calls: Vec<&str> = wire
        .iter()
        .filter(|r| r.path.contains("/agent/"))
        .map(|r| r.path.rsplit('/').next().unwrap_or_default())
        .collect();
    assert!(agent_calls.contains(&"exec"), "{agent_calls:?}");
    eprintln!(
        "{} API requests, {} of them to the guest agent ({} exchanges)",
        wire.len(),
        agent_calls.len(),
        agent_calls.iter().filter(|c| **c == "exec").count()
    );
    assert!(
        agent_calls
            .iter()
            .all(|c| ["exec", "exec-status"].contains(c)),
        "{agent_calls:?}"
    );
    let execs: Vec<_> = wire
        .iter()
        .filter(|r| r.path.ends_with("/agent/exec"))
        .collect();
    assert!(
        execs
            .iter()
            .all(|r| r.param_lists()["command"] == ["fleet-agent", "exchange"]),
        "only `fleet-agent exchange` runs in the guest"
    );

    // The canary in the clear is nowhere on the host side: status, journal, events, logs,
    // snippets, the VM's config.
    let log = daemon.log.lock().unwrap_or_else(|p| p.into_inner()).clone();
    assert!(log.contains("agent"), "debug logs were kept");
    assert!(!log.contains(&canary), "the value is in fleet's logs");
    let resent = log.matches("sending it again").count();
    eprintln!(
        "exchanges sent again: {resent}; links lost: {}",
        log.matches("agent link lost").count()
    );
    assert!(resent >= 2, "the failing proxy made exchanges fail");
    drop(daemon);
    let needle = canary.as_bytes();
    assert_eq!(
        files_containing(&f.repo.path().join(".fleet"), needle),
        Vec::<PathBuf>::new()
    );
    assert_eq!(
        files_containing(f.host.path(), needle),
        Vec::<PathBuf>::new()
    );
    let vm = pve.vm_named("box").expect("box");
    assert!(!vm.to_string().contains(&canary));
}

/// Brokered egress on Proxmox: the streams ride the guest-agent relay. The fake guest has
/// a network namespace of its own with loopback only (a VM without a NIC): a tunnel the
/// loadout allows and a brokered API reach the host's upstreams through the broker, and
/// nothing reaches them directly.
#[test]
fn brokered_egress_and_a_brokered_api_work_over_the_relay() {
    if !enabled() {
        return;
    }
    use crate::egress::{bulk_upstream, shouting_upstream, tls_api};
    // The relay's throughput, printed: `FLEET_TEST_RELAY_MIB` (make bench) sets the size.
    let relay_mib: u64 = std::env::var("FLEET_TEST_RELAY_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    let bulk = bulk_upstream(relay_mib * 1024 * 1024);
    let mut pve = FakePve::start();
    let schema = pve.schema();
    pve.control(json!({"op": "guests", "agentBin": agent_bin()}));
    let keys = tempfile::tempdir().expect("tempdir");
    let (identity, recipient) = age_identity(keys.path(), "age.key");
    let canary = format!("fleetcanary{}", random_hex(12));
    let allowed = shouting_upstream();
    let (api_port, ca_pem, seen) = tls_api("api.anthropic.com", canary.clone());
    let ca_file = keys.path().join("test-ca.pem");
    std::fs::write(&ca_file, ca_pem).expect("write CA");

    let f = PveFleet::new(
        &pve,
        "brokered",
        "{shutdownTimeout: 5s, reconcileInterval: 30s}",
    );
    f.repo.add_host_config(&format!(
        "  recipients: [{recipient}]\n  egress:\n    hosts: {{api.anthropic.com: 127.0.0.1}}\n    caFiles: [{}]\n    allowInternal: ['127.0.0.1']\n",
        ca_file.display()
    ));
    secret_set(&f.repo, "anthropic", "api_key", &canary);
    f.repo.allow_secret(
        "anthropic",
        &format!("{{hosts: ['api.anthropic.com:{api_port}'], loadouts: [agent]}}"),
    );
    f.repo.write(
        "fleet/loadouts/agent.yaml",
        format!(
            "apiVersion: fleet/v1\nkind: Loadout\nmetadata: {{name: agent}}\nspec:\n  network: {{mode: brokered}}\n  egress:\n    allow:\n      - {{host: '127.0.0.1', ports: [{allowed}, {bulk}]}}\n    credentials:\n      - {{host: api.anthropic.com, port: {api_port}, header: x-api-key, secret: {{secret: anthropic, key: api_key}}}}\n"
        ),
    );
    f.repo
        .write("fleet/vms/box.yaml", vm_yaml("box", ", loadout: agent"));
    f.repo.write(
        "fleet/tasks/tunnel.yaml",
        task_yaml(
            "tunnel",
            "box",
            &format!(
                "  command: [sh, -c, \"(printf 'CONNECT 127.0.0.1:{allowed} HTTP/1.1\\\\r\\\\n\\\\r\\\\nping\\\\n'; sleep 3) | busybox nc 127.0.0.1 3128; busybox nc -w 2 127.0.0.1 {allowed} < /dev/null && echo direct-reached || echo direct-refused\"]\n"
            ),
        ),
    );
    f.repo.write(
        "fleet/tasks/call.yaml",
        task_yaml(
            "call",
            "box",
            "  command: [sh, -c, \"busybox wget -q -O- --header 'x-api-key: guest' $ANTHROPIC_BASE_URL/v1/models; echo key=$ANTHROPIC_API_KEY\"]\n",
        ),
    );
    f.repo.write(
        "fleet/tasks/bulk.yaml",
        task_yaml(
            "bulk",
            "box",
            &format!(
                "  timeout: 20m\n  command: [sh, -c, \"unset NO_PROXY no_proxy; a=$(cut -d' ' -f1 /proc/uptime); busybox wget -q -O - http://127.0.0.1:{bulk}/big | busybox wc -c; echo took $a $(cut -d' ' -f1 /proc/uptime)\"]\n"
            ),
        ),
    );
    f.repo.commit("a brokered VM on Proxmox");
    let identity_env = identity.to_str().expect("utf8").to_owned();
    let daemon = Daemon::start_with(&f.repo, &[("FLEET_AGE_IDENTITY", &identity_env)], &[]);
    let status = Status(f.repo.path().join(".fleet/status"));

    status.wait_phase("tunnel", "Succeeded", Duration::from_secs(120));
    let output = status.output("tunnel");
    assert!(output.contains("200 Connection established"), "{output}");
    assert!(output.contains("PING"), "{output}");
    assert!(output.contains("direct-refused"), "{output}");
    // The connection's line is written when the broker lets it go, which may come just
    // after the task's exit.
    let egress_log = f
        .repo
        .path()
        .join(".fleet/status/tasks/tunnel/egress.jsonl");
    crate::daemon::wait_until("the tunnel's egress line", Duration::from_secs(20), || {
        std::fs::read_to_string(&egress_log)
            .is_ok_and(|log| log.contains(&format!("CONNECT 127.0.0.1:{allowed}")))
    });
    status.wait_phase("call", "Succeeded", Duration::from_secs(60));
    let output = status.output("call");
    assert!(output.contains("api: the real key"), "{output}");
    assert!(
        output.contains(&format!("key={}", fleet::egress::PLACEHOLDER_KEY)),
        "{output}"
    );
    let head = seen
        .recv_timeout(Duration::from_secs(5))
        .expect("a request");
    assert!(!head.contains("x-api-key: guest"), "{head}");

    status.wait_phase("bulk", "Succeeded", Duration::from_secs(1200));
    let output = status.output("bulk");
    assert!(
        output.contains(&(relay_mib * 1024 * 1024).to_string()),
        "every byte came over the relay: {output}"
    );
    if let Some((a, b)) = output
        .lines()
        .find_map(|l| l.trim().strip_prefix("took "))
        .and_then(|t| t.split_once(' '))
        .and_then(|(a, b)| Some((a.parse::<f64>().ok()?, b.parse::<f64>().ok()?)))
    {
        eprintln!(
            "egress on the Proxmox relay (fakepve): {relay_mib} MiB brokered at {:.2} MiB/s",
            relay_mib as f64 / (b - a).max(0.01)
        );
    }

    // The VM has no network device, and every request was one the PVE API takes.
    let vm = pve.vm_named("box").expect("box");
    assert!(
        vm["config"]
            .as_object()
            .is_some_and(|c| !c.keys().any(|k| k.starts_with("net"))),
        "{vm}"
    );
    checked_wire(&mut pve, &schema);
    drop(daemon);
    assert_eq!(
        files_containing(&f.repo.path().join(".fleet"), canary.as_bytes()),
        Vec::<PathBuf>::new()
    );
}
