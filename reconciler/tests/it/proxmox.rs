//! The Proxmox driver against fakepve: the whole life of a fleet, drift and self-heal,
//! faults, and foreign VMs. Every request fleet sends is checked against the PVE schema.

use serde_json::json;

use crate::pve::{FakePve, WireRequest, enabled};
use crate::support::{Repo, set_mode};

/// A fleet repository pointed at `pve`, with the token in a host file.
pub struct PveFleet {
    pub repo: Repo,
    pub host: tempfile::TempDir,
}

impl PveFleet {
    pub fn new(pve: &FakePve, fleet: &str, policy: &str) -> PveFleet {
        let host = tempfile::Builder::new()
            .prefix("fleet-pve-host-")
            .tempdir()
            .expect("tempdir");
        let token = host.path().join("token");
        std::fs::write(&token, format!("{}\n", pve.token)).expect("token");
        set_mode(&token, 0o600);
        std::fs::create_dir(host.path().join("snippets")).expect("snippets");
        let repo = Repo::new();
        repo.host_config(&Self::host_config(pve, &host, ""));
        repo.write(
            "fleet/fleet.yaml",
            format!(
                "apiVersion: fleet/v1
kind: Fleet
metadata: {{name: {fleet}}}
spec:
  providers:
    - {{name: host, type: proxmox}}
  images:
    - {{name: micro, template: debian-tmpl}}
  policy: {policy}
"
            ),
        );
        PveFleet { repo, host }
    }

    /// The host configuration with the fake cluster as provider `host`: the token in a host
    /// file, the fake's CA, the snippet directory; `extra` goes into the provider's mapping
    /// (`, insecureSkipVerify: true`), or replaces the token with `token: …` when it starts
    /// with `token:`.
    pub fn host_config(pve: &FakePve, host: &tempfile::TempDir, extra: &str) -> String {
        let token = if extra.trim_start_matches([',', ' ']).starts_with("token:") {
            String::new()
        } else {
            format!(
                ", token: {{id: '{}', file: '{}'}}",
                pve.token_id,
                host.path().join("token").display()
            )
        };
        let ca = if extra.contains("insecureSkipVerify") || extra.contains("noCa") {
            String::new()
        } else {
            format!(", caFile: '{}'", pve.ca_file.display())
        };
        crate::support::host_yaml(
            &[format!(
                "{{name: host, type: proxmox, endpoint: '{}', node: pve1{token}{ca}, snippets: {{storage: local, dir: '{}'}}{}}}",
                pve.url,
                host.path().join("snippets").display(),
                extra.replace("noCa", "")
            )],
            "",
        )
    }

    pub fn snippet(&self, fleet: &str, vm: &str) -> std::path::PathBuf {
        self.host
            .path()
            .join("snippets")
            .join(format!("fleet.{fleet}.{vm}.yaml"))
    }
}

pub fn vm_yaml(name: &str, extra: &str) -> String {
    format!(
        "apiVersion: fleet/v1\nkind: VM\nmetadata: {{name: {name}}}\nspec: {{provider: host, image: micro{extra}}}\n"
    )
}

/// Checks every request since the last call against the schema; returns them.
pub fn checked_wire(pve: &mut FakePve, schema: &crate::pve::ApiSchema) -> Vec<WireRequest> {
    let wire = pve.wire();
    let refused: Vec<String> = wire.iter().filter_map(|r| schema.check(r).err()).collect();
    assert!(
        refused.is_empty(),
        "requests the PVE schema refuses:\n{}",
        refused.join("\n")
    );
    wire
}

fn config_of(vm: &serde_json::Value, key: &str) -> String {
    match &vm["config"][key] {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Null => String::new(),
        other => other.to_string(),
    }
}

#[test]
fn a_fleet_on_proxmox_lives_its_whole_life_through_the_api() {
    if !enabled() {
        return;
    }
    let mut pve = FakePve::start();
    let schema = pve.schema();
    // Foreign VMs: one fleet never heard of, one holding a name the fleet will claim, and
    // one wearing fleet's tag without a stamp.
    for (vmid, name, tags) in [
        (150, "db", ""),
        (151, "clash", ""),
        (152, "impostor", "fleet-demo"),
    ] {
        pve.control(
            json!({"op": "add_vm", "vmid": vmid, "name": name, "status": "running",
            "config": {"cores": 1, "memory": 512, "tags": tags, "description": "not fleet's"}}),
        );
    }
    let foreign_before: Vec<_> = pve
        .vms()
        .into_iter()
        .filter(|v| v["vmid"].as_u64() < Some(200) && v["vmid"].as_u64() >= Some(150))
        .collect();
    let f = PveFleet::new(&pve, "demo", "{shutdownTimeout: 5s, stepTimeout: 1m}");
    f.repo.write(
        "fleet/vms/web-1.yaml",
        vm_yaml(
            "web-1",
            ", resources: {cpus: 2, memory: 1Gi, disk: 8Gi}, network: {mode: full}",
        ),
    );
    f.repo.write(
        "fleet/vms/web-2.yaml",
        vm_yaml("web-2", ", node: pve2, state: stopped"),
    );
    f.repo.commit("two VMs");

    let plan = f.repo.fleet(&["plan", "--detailed-exitcode"]);
    plan.expect_code(2);
    assert!(
        plan.stdout().contains("Plan: 2 to create."),
        "{}",
        plan.stdout()
    );
    checked_wire(&mut pve, &schema);

    f.repo.fleet(&["apply", "--auto-approve"]).expect_code(0);
    let wire = checked_wire(&mut pve, &schema);
    let web1 = pve.vm_named("web-1").expect("web-1 made");
    assert_eq!(web1["status"], "running");
    assert_eq!(web1["node"], "pve1");
    assert_eq!(config_of(&web1, "cores"), "2");
    assert_eq!(config_of(&web1, "memory"), "1024");
    assert_eq!(config_of(&web1, "tags"), "fleet-demo");
    assert!(config_of(&web1, "description").contains("fleet-stamp: "));
    assert!(config_of(&web1, "net0").contains("bridge=vmbr0"));
    assert!(config_of(&web1, "cicustom").contains("local:snippets/fleet.demo.web-1.yaml"));
    let web2 = pve.vm_named("web-2").expect("web-2 made");
    assert_eq!(web2["status"], "stopped");
    assert_eq!(web2["node"], "pve2", "placed on its own node");
    assert_eq!(config_of(&web2, "net0"), "", "isolated: no network card");
    // Cloned (linked: no `full`), stamped by the clone itself, the disk grown to 8 GiB.
    let clones: Vec<&WireRequest> = wire
        .iter()
        .filter(|r| r.path.ends_with("/qemu/9000/clone"))
        .collect();
    assert_eq!(clones.len(), 2);
    for c in &clones {
        let p = c.params();
        assert!(!p.contains_key("full"), "linked clone: {p:?}");
        assert!(p["description"].contains("fleet-stamp: "), "{p:?}");
    }
    assert_eq!(
        clones
            .iter()
            .filter(|c| c.params().get("target").map(String::as_str) == Some("pve2"))
            .count(),
        1
    );
    let resize = wire
        .iter()
        .find(|r| r.path.ends_with(&format!("/qemu/{}/resize", web1["vmid"])))
        .expect("resize");
    assert_eq!(resize.params()["size"], "8192M");
    // Every asynchronous call's task was awaited.
    assert!(
        wire.iter()
            .any(|r| r.path.contains("/tasks/") && r.path.ends_with("/status"))
    );
    let snippet = std::fs::read_to_string(f.snippet("demo", "web-1")).expect("snippet");
    assert!(
        snippet.starts_with("#cloud-config\n# fleet: demo/web-1"),
        "{snippet}"
    );

    // Converged: nothing to do, and the pass is one listing (the stamps are cached... in a
    // new process they are read once per fleet VM).
    let plan = f.repo.fleet(&["plan", "--detailed-exitcode"]);
    plan.expect_code(0);
    assert!(plan.stdout().contains("No changes"), "{}", plan.stdout());
    checked_wire(&mut pve, &schema);

    // The claimed name is a conflict, never touched.
    f.repo.write("fleet/vms/clash.yaml", vm_yaml("clash", ""));
    f.repo.commit("claim a foreign name");
    let plan = f.repo.fleet(&["plan"]);
    assert!(plan.stdout().contains("clash on host"), "{}", plan.stdout());
    f.repo.fleet(&["apply", "--auto-approve"]);
    f.repo.remove("fleet/vms/clash.yaml");

    // An update that needs a restart: more CPUs.
    f.repo.write(
        "fleet/vms/web-1.yaml",
        vm_yaml(
            "web-1",
            ", resources: {cpus: 4, memory: 1Gi, disk: 8Gi}, network: {mode: full}",
        ),
    );
    f.repo.commit("web-1: 4 CPUs");
    // Releases before the dotted snippet names wrote `fleet-<fleet>-<vm>.yaml`; a VM's
    // update moves it to the new name and removes the old file.
    let legacy = f.host.path().join("snippets/fleet-demo-web-1.yaml");
    std::fs::write(
        &legacy,
        "#cloud-config\n# fleet: demo/web-1 (written by fleet; holds no secret)\n",
    )
    .expect("write");
    let plan = f.repo.fleet(&["plan"]);
    assert!(
        plan.stdout().contains("Plan: 1 to update."),
        "{}",
        plan.stdout()
    );
    f.repo.fleet(&["apply", "--auto-approve"]).expect_code(0);
    let wire = checked_wire(&mut pve, &schema);
    let web1 = pve.vm_named("web-1").expect("web-1");
    assert_eq!(config_of(&web1, "cores"), "4");
    assert_eq!(web1["status"], "running");
    assert!(config_of(&web1, "cicustom").ends_with("snippets/fleet.demo.web-1.yaml"));
    assert!(!legacy.exists(), "the legacy snippet went with the update");
    let put = wire
        .iter()
        .find(|r| r.method == "PUT" && r.path.ends_with("/config"))
        .expect("config write");
    assert!(
        put.params().contains_key("digest"),
        "config writes carry the digest: {:?}",
        put.params()
    );
    assert!(
        wire.iter().any(|r| r.path.ends_with("/status/shutdown")),
        "restarted gracefully"
    );

    // Drift: memory changed behind fleet's back, then the VM stopped, then web-2 deleted.
    let vmid = web1["vmid"].as_u64().expect("vmid");
    pve.control(json!({"op": "config", "vmid": vmid, "set": {"memory": 4096}}));
    let plan = f.repo.fleet(&["plan"]);
    assert!(plan.stdout().contains("Drift"), "{}", plan.stdout());
    f.repo.fleet(&["apply", "--auto-approve"]).expect_code(0);
    assert_eq!(
        config_of(&pve.vm_named("web-1").expect("web-1"), "memory"),
        "1024",
        "healed"
    );
    pve.control(
        json!({"op": "set", "vmid": vmid, "attrs": {"status": "stopped", "qmpstatus": "stopped"}}),
    );
    let web2_id = pve.vm_named("web-2").expect("web-2")["vmid"]
        .as_u64()
        .expect("vmid");
    pve.control(json!({"op": "remove_vm", "vmid": web2_id}));
    let plan = f.repo.fleet(&["plan"]);
    assert!(
        plan.stdout().contains("1 to create") && plan.stdout().contains("1 to start"),
        "{}",
        plan.stdout()
    );
    f.repo.fleet(&["apply", "--auto-approve"]).expect_code(0);
    assert_eq!(pve.vm_named("web-1").expect("web-1")["status"], "running");
    assert!(pve.vm_named("web-2").is_some(), "made again");
    checked_wire(&mut pve, &schema);

    // Destroy: purged, its snippet removed.
    f.repo.remove("fleet/vms/web-2.yaml");
    f.repo.commit("drop web-2");
    f.repo.fleet(&["apply", "--auto-approve"]).expect_code(0);
    let wire = checked_wire(&mut pve, &schema);
    assert!(pve.vm_named("web-2").is_none());
    let delete = wire.iter().find(|r| r.method == "DELETE").expect("delete");
    assert_eq!(delete.params()["purge"], "1");
    assert!(
        !f.snippet("demo", "web-2").exists(),
        "snippet removed with its VM"
    );

    // A leftover snippet (a destroy cut short) and a snippet write's temp file (a kill
    // before its rename) are swept by the next process that holds the status lock; `plan`,
    // which may run beside a working daemon, leaves them.
    let leftover = f.snippet("demo", "gone");
    std::fs::write(
        &leftover,
        "#cloud-config\n# fleet: demo/gone (written by fleet; holds no secret)\n",
    )
    .expect("write");
    let half_written = f
        .host
        .path()
        .join("snippets/.fleet.demo.web-1.yaml.tmp-Ab12Cd");
    std::fs::write(&half_written, "#cloud-config\n").expect("write");
    // A legacy-named leftover of this fleet goes too; a legacy name this fleet's could be
    // read into (fleet `demo-x`'s VM `y`) stays: its marker names another fleet.
    let snippets = f.host.path().join("snippets");
    let legacy_leftover = snippets.join("fleet-demo-old.yaml");
    let other_fleets = snippets.join("fleet-demo-x-y.yaml");
    for (file, owner) in [(&legacy_leftover, "demo/old"), (&other_fleets, "demo-x/y")] {
        std::fs::write(
            file,
            format!("#cloud-config\n# fleet: {owner} (written by fleet; holds no secret)\n"),
        )
        .expect("write");
    }
    let unrelated = snippets.join("operator.yaml");
    let unrelated_temp = snippets.join(".operator.yaml.tmp-Ab12Cd");
    for file in [&unrelated, &unrelated_temp] {
        std::fs::write(file, "#cloud-config\n").expect("write");
    }
    f.repo.fleet(&["plan"]);
    assert!(
        leftover.exists() && half_written.exists(),
        "plan changes nothing"
    );
    let tidied = f.repo.fleet(&["apply", "--auto-approve"]);
    tidied.expect_code(0);
    assert!(
        tidied
            .stderr()
            .contains("removed the snippet of gone, whose VM no longer exists")
            && tidied
                .stderr()
                .contains(".fleet.demo.web-1.yaml.tmp-Ab12Cd"),
        "{}",
        tidied.stderr()
    );
    assert!(!leftover.exists(), "swept");
    assert!(!half_written.exists(), "swept");
    assert!(!legacy_leftover.exists(), "swept");
    assert!(
        f.snippet("demo", "web-1").exists(),
        "a live VM's snippet stays"
    );
    assert!(
        unrelated.exists() && unrelated_temp.exists() && other_fleets.exists(),
        "not this fleet's: kept"
    );

    // A file that is not fleet's where a new VM's snippet goes is never overwritten: the
    // create fails before its clone, with the file named, and the VM's neighbours go on.
    let squatter = f.snippet("demo", "web-9");
    std::fs::write(&squatter, "#cloud-config\n# the operator's own\n").expect("write");
    f.repo.write("fleet/vms/web-9.yaml", vm_yaml("web-9", ""));
    f.repo.commit("web-9, whose snippet name is taken");
    let refused = f.repo.fleet(&["apply", "--auto-approve"]);
    assert_ne!(refused.code(), 0);
    let said = refused.stdout() + &refused.stderr();
    assert!(
        said.contains("fleet.demo.web-9.yaml exists and is not fleet's snippet for demo/web-9"),
        "{said}"
    );
    assert_eq!(
        std::fs::read_to_string(&squatter).expect("read"),
        "#cloud-config\n# the operator's own\n"
    );
    assert!(pve.vm_named("web-9").is_none(), "no VM without its snippet");
    f.repo.remove("fleet/vms/web-9.yaml");
    f.repo.commit("no web-9");
    f.repo.fleet(&["apply", "--auto-approve"]).expect_code(0);

    // Foreign VMs: never modified, never destroyed; fleet only ever read them in listings.
    let foreign_after: Vec<_> = pve
        .vms()
        .into_iter()
        .filter(|v| v["vmid"].as_u64() < Some(200) && v["vmid"].as_u64() >= Some(150))
        .collect();
    assert_eq!(foreign_before, foreign_after);
    checked_wire(&mut pve, &schema);
}

#[test]
fn proxmox_faults_are_retried_and_stay_with_their_vm() {
    if !enabled() {
        return;
    }
    let mut pve = FakePve::start();
    let schema = pve.schema();
    let f = PveFleet::new(&pve, "faults", "{shutdownTimeout: 2s, stepTimeout: 1m}");
    for vm in ["a", "b", "c"] {
        f.repo
            .write(&format!("fleet/vms/{vm}.yaml"), vm_yaml(vm, ""));
    }
    f.repo.commit("three VMs");

    // Another creator takes the first VMID fleet is offered: the clone tries the next.
    pve.control(
        json!({"op": "fail", "method": "POST", "suffix": "/qemu/9000/clone", "status": 500,
        "message": "unable to create VM 100: config file already exists", "times": 1}),
    );
    // The config lock is busy twice (a backup, a concurrent task): retried.
    pve.control(json!({"op": "fail", "method": "PUT", "suffix": "/config", "status": 500,
        "message": "can't lock file '/var/lock/qemu-server/lock-101.conf' - got timeout", "times": 2}));
    // One VM cannot start at all: its failure is its own.
    pve.control(
        json!({"op": "fail", "method": "POST", "suffix": "/status/start", "status": 500,
        "message": "start failed: QEMU exited with code 1", "times": 1}),
    );
    let apply = f.repo.fleet(&["apply", "--auto-approve"]);
    assert_ne!(apply.code(), 0, "one start failed: {}", apply.stdout());
    let wire = checked_wire(&mut pve, &schema);
    let clone_ids: Vec<String> = wire
        .iter()
        .filter(|r| r.path.ends_with("/clone"))
        .map(|r| r.params()["newid"].clone())
        .collect();
    assert_eq!(
        clone_ids.len(),
        4,
        "one clone refused, three made: {clone_ids:?}"
    );
    let vms = pve.vms();
    let ours: Vec<_> = vms
        .iter()
        .filter(|v| ["a", "b", "c"].contains(&v["name"].as_str().unwrap_or("")))
        .collect();
    assert_eq!(ours.len(), 3, "no VM twice: {ours:?}");
    let running = ours.iter().filter(|v| v["status"] == "running").count();
    assert_eq!(running, 2, "the other two started: {ours:?}");
    let status = f.repo.fleet(&["status"]).stdout();
    assert!(status.contains("QEMU exited with code 1"), "{status}");
    // The next apply finishes the job.
    f.repo.fleet(&["apply", "--auto-approve"]).expect_code(0);
    assert!(
        pve.vms()
            .iter()
            .filter(|v| v["name"] != "debian-tmpl")
            .all(|v| v["status"] == "running")
    );

    // A concurrent edit between fleet's read and its write: refused by the digest, not
    // overwritten; the next pass plans again.
    f.repo.write(
        "fleet/vms/a.yaml",
        vm_yaml("a", ", state: running, resources: {memory: 1Gi}"),
    );
    f.repo.commit("a: more memory");
    pve.control(
        json!({"op": "fail", "method": "PUT", "suffix": "/config", "status": 500,
        "message": "checksum mismatch (file change by other user?)", "times": 1}),
    );
    let apply = f.repo.fleet(&["apply", "--auto-approve"]);
    assert_ne!(apply.code(), 0);
    assert!(
        apply
            .stdout()
            .contains("changed on host while fleet was updating it")
            || apply
                .stderr()
                .contains("changed on host while fleet was updating it"),
        "{}\n{}",
        apply.stdout(),
        apply.stderr()
    );
    f.repo.fleet(&["apply", "--auto-approve"]).expect_code(0);
    let a = pve.vm_named("a").expect("a");
    assert_eq!(config_of(&a, "memory"), "1024");

    // A guest that ignores the shutdown request: stopped hard once the grace is over.
    let b = pve.vm_named("b").expect("b");
    pve.control(json!({"op": "set", "vmid": b["vmid"], "attrs": {"acpi": false}}));
    f.repo
        .write("fleet/vms/b.yaml", vm_yaml("b", ", state: stopped"));
    f.repo.commit("stop b");
    checked_wire(&mut pve, &schema);
    f.repo.fleet(&["apply", "--auto-approve"]).expect_code(0);
    let wire = checked_wire(&mut pve, &schema);
    assert!(
        wire.iter().any(|r| r.path.ends_with("/status/shutdown")),
        "asked first"
    );
    assert!(
        wire.iter().any(|r| r.path.ends_with("/status/stop")),
        "then stopped hard"
    );
    assert_eq!(pve.vm_named("b").expect("b")["status"], "stopped");

    // A flaky network (a fifth of the requests dropped): the plan converges anyway.
    pve.control(json!({"op": "flaky", "drop_rate": 0.2, "seed": 7}));
    f.repo.write("fleet/vms/d.yaml", vm_yaml("d", ""));
    f.repo.commit("add d");
    let mut converged = false;
    for _ in 0..5 {
        let apply = f.repo.fleet(&["apply", "--auto-approve"]);
        if apply.code() == 0 {
            converged = true;
            break;
        }
        eprintln!("{}{}", apply.stdout(), apply.stderr());
    }
    pve.control(json!({"op": "clear_faults"}));
    assert!(converged, "did not converge through a flaky network");
    let ds: Vec<_> = pve.vms().into_iter().filter(|v| v["name"] == "d").collect();
    assert_eq!(ds.len(), 1, "made once: {ds:?}");
    f.repo
        .fleet(&["plan", "--detailed-exitcode"])
        .expect_code(0);
    checked_wire(&mut pve, &schema);
}

#[test]
fn tls_is_verified_unless_the_provider_says_otherwise_and_then_plans_say_so() {
    if !enabled() {
        return;
    }
    let mut pve = FakePve::start();
    let schema = pve.schema();
    let f = PveFleet::new(&pve, "tls", "{}");
    f.repo.write("fleet/vms/a.yaml", vm_yaml("a", ""));

    // No CA file: the fake's self-signed certificate is refused, nothing is planned.
    f.repo
        .host_config(&PveFleet::host_config(&pve, &f.host, "noCa"));
    f.repo.commit("system trust");
    let plan = f.repo.fleet(&["plan"]);
    assert!(
        plan.stdout().contains("certificate") || plan.stderr().contains("certificate"),
        "{}\n{}",
        plan.stdout(),
        plan.stderr()
    );
    assert!(!plan.stdout().contains("to create"), "{}", plan.stdout());
    assert!(pve.wire().is_empty() || pve.vms().len() == 1);

    // Explicitly insecure: it works, and every plan says what it costs.
    f.repo.host_config(&PveFleet::host_config(
        &pve,
        &f.host,
        ", insecureSkipVerify: true",
    ));
    let plan = f.repo.fleet(&["plan"]);
    assert!(
        plan.stdout()
            .contains("WARNING: provider host accepts any TLS certificate"),
        "{}",
        plan.stdout()
    );
    assert!(plan.stdout().contains("1 to create"), "{}", plan.stdout());
    checked_wire(&mut pve, &schema);

    // Both at once is refused as a contradiction, naming the field of the host
    // configuration.
    f.repo.host_config(&PveFleet::host_config(
        &pve,
        &f.host,
        &format!(
            ", caFile: '{}', insecureSkipVerify: true",
            pve.ca_file.display()
        ),
    ));
    let plan = f.repo.fleet(&["validate"]);
    assert!(
        plan.stderr()
            .contains("insecureSkipVerify: contradicts caFile"),
        "{}\n{}",
        plan.stdout(),
        plan.stderr()
    );
}

/// A VM on the fake cluster: its VMID, its name, and the (fleet, VM name) of its stamp.
struct OnCluster {
    vmid: u64,
    name: String,
    stamp: Option<(String, String)>,
}

fn stamps_on(pve: &mut FakePve) -> Vec<OnCluster> {
    use base64::Engine as _;
    pve.vms()
        .iter()
        .filter(|v| v["template"] != true)
        .map(|v| {
            let description = config_of(v, "description");
            let stamp = description
                .lines()
                .find_map(|l| l.trim().strip_prefix("fleet-stamp: "))
                .and_then(|b| base64::engine::general_purpose::STANDARD.decode(b).ok())
                .and_then(|j| serde_json::from_slice::<serde_json::Value>(&j).ok())
                .map(|s| {
                    (
                        s["fleet"].as_str().unwrap_or_default().to_owned(),
                        s["name"].as_str().unwrap_or_default().to_owned(),
                    )
                });
            OnCluster {
                vmid: v["vmid"].as_u64().unwrap_or_default(),
                name: v["name"].as_str().unwrap_or_default().to_owned(),
                stamp,
            }
        })
        .collect()
}

/// `fleet apply` killed with SIGKILL at random points (VMID allocation, a clone task under
/// way, the config write, a resize, a start, a destroy), then run to completion: no VM is
/// made twice, none is left behind, no snippet outlives its VM, nothing is left half-done in
/// the journal, and the foreign VM is untouched.
#[test]
fn a_killed_apply_on_proxmox_leaves_no_duplicate_and_no_orphan() {
    if !enabled() {
        return;
    }
    let mut pve = FakePve::start();
    let schema = pve.schema();
    // Every request takes 20 ms: an apply lasts long enough for kills to land inside it.
    pve.control(json!({"op": "time_scale", "scale": 1.0}));
    pve.control(json!({"op": "latency", "secs": 0.02}));
    pve.control(
        json!({"op": "add_vm", "vmid": 150, "name": "vm-03", "status": "running",
        "config": {"cores": 1, "memory": 512, "description": "someone else's"}}),
    );
    let foreign_before = pve.vms().into_iter().find(|v| v["vmid"] == 150);
    let f = PveFleet::new(&pve, "crash", "{shutdownTimeout: 2s, stepTimeout: 1m}");
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(1, |d| d.as_nanos() as u64)
        | 1;
    eprintln!("seed {seed}");
    let mut rng = seed;
    let mut next = move |n: u64| {
        rng ^= rng >> 12;
        rng ^= rng << 25;
        rng ^= rng >> 27;
        rng.wrapping_mul(0x2545_F491_4F6C_DD1D) % n
    };
    // vm-03 stays out of the fleet: its name belongs to the foreign VM.
    let names: Vec<String> = (1..=6)
        .filter(|i| *i != 3)
        .map(|i| format!("vm-{i:02}"))
        .collect();
    let mut fleet: std::collections::BTreeMap<String, u64> = Default::default();
    let mut mid_apply = 0;
    // `make crash-test-proxmox TRIALS=N` runs more; `make test` runs 10.
    let trials: u32 = std::env::var("FLEET_CRASH_TRIALS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(10);
    for trial in 1..=trials {
        // A random mix: new VMs, removed ones, and resized ones (an update with a restart).
        for name in &names {
            match next(4) {
                0 => {
                    fleet.remove(name);
                }
                1 | 2 => {
                    fleet.insert(name.clone(), 1 + next(2));
                }
                _ => {}
            }
        }
        // Never empty: a revision that leaves the provider without VMs waits for approval.
        if fleet.is_empty() {
            fleet.insert(names[next(names.len() as u64) as usize].clone(), 1);
        }
        let _ = std::fs::remove_dir_all(f.repo.path().join("fleet/vms"));
        for (name, cpus) in &fleet {
            f.repo.write(
                &format!("fleet/vms/{name}.yaml"),
                vm_yaml(name, &format!(", resources: {{cpus: {cpus}}}")),
            );
        }
        f.repo.write("fleet/trial", trial.to_string());
        f.repo.commit(&format!("trial {trial}"));

        let mut apply = std::process::Command::new(crate::support::fleet_bin())
            .arg("-C")
            .arg(f.repo.path())
            .args(["apply", "--auto-approve"])
            .env("FLEET_HOST_CONFIG", f.repo.host_config_path())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("fleet apply");
        // Kill it once it has started on the cluster (its first journaled intent), a random
        // while later.
        let journal_path = f.repo.path().join(".fleet/status/journal.jsonl");
        let started = std::time::Instant::now();
        while apply.try_wait().expect("try_wait").is_none()
            && std::fs::metadata(&journal_path).map_or(true, |m| m.len() == 0)
            && started.elapsed() < std::time::Duration::from_secs(10)
        {
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        std::thread::sleep(std::time::Duration::from_millis(next(250)));
        if apply.try_wait().expect("try_wait").is_none() {
            mid_apply += 1;
        }
        let _ = apply.kill();
        let _ = apply.wait();

        let recovering = std::time::Instant::now();
        let recovered = f.repo.fleet(&["apply", "--auto-approve"]);
        eprintln!("trial {trial}: recovered in {:?}", recovering.elapsed());
        assert_eq!(
            recovered.code(),
            0,
            "trial {trial} (seed {seed}): {}{}",
            recovered.stdout(),
            recovered.stderr()
        );
        let stamps = stamps_on(&mut pve);
        let mut ours: std::collections::BTreeMap<String, Vec<u64>> = Default::default();
        for OnCluster { vmid, name, stamp } in &stamps {
            if let Some((stamped_fleet, stamped_name)) = stamp
                && stamped_fleet == "crash"
            {
                assert_eq!(name, stamped_name, "trial {trial}: VMID {vmid}");
                ours.entry(name.clone()).or_default().push(*vmid);
            }
        }
        for (name, vmids) in &ours {
            assert_eq!(
                vmids.len(),
                1,
                "trial {trial} (seed {seed}): {name} made twice: {vmids:?}"
            );
        }
        let made: Vec<&String> = ours.keys().collect();
        let wanted: Vec<&String> = fleet.keys().collect();
        assert_eq!(
            made, wanted,
            "trial {trial} (seed {seed}): the VMs are the fleet's"
        );
        for vm in pve.vms() {
            assert!(vm["lock"].is_null(), "trial {trial}: a lock is left: {vm}");
            let name = vm["name"].as_str().unwrap_or_default();
            if fleet.contains_key(name) {
                assert_eq!(config_of(&vm, "cores"), fleet[name].to_string(), "{vm}");
                assert!(config_of(&vm, "tags").contains("fleet-crash"), "{vm}");
            }
        }
        let mut snippets: Vec<String> = std::fs::read_dir(f.host.path().join("snippets"))
            .expect("snippets")
            .flatten()
            .filter_map(|e| e.file_name().to_str().map(str::to_owned))
            .collect();
        snippets.sort();
        let expected_snippets: Vec<String> = fleet
            .keys()
            .map(|n| format!("fleet.crash.{n}.yaml"))
            .collect();
        assert_eq!(
            snippets, expected_snippets,
            "trial {trial}: no snippet outlives its VM"
        );
        f.repo
            .fleet(&["plan", "--detailed-exitcode"])
            .expect_code(0);
        let journal = std::fs::read_to_string(f.repo.path().join(".fleet/status/journal.jsonl"))
            .unwrap_or_default();
        assert_eq!(journal, "", "trial {trial}: no open intents");
    }
    assert_eq!(
        pve.vms().into_iter().find(|v| v["vmid"] == 150),
        foreign_before
    );
    checked_wire(&mut pve, &schema);
    eprintln!("{trials} trials, {mid_apply} killed mid-apply");
    assert!(
        mid_apply >= trials / 2,
        "the kills landed mid-apply ({mid_apply} of {trials})"
    );
}

/// The privileges `docs/proxmox.md` tells operators to give fleet's role.
fn documented_privileges() -> Vec<String> {
    let docs = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/proxmox.md"),
    )
    .expect("docs/proxmox.md");
    let line = docs
        .lines()
        .find(|l| l.starts_with("pveum role add Fleet -privs "))
        .expect("the pveum role add line");
    line.split('"')
        .nth(1)
        .expect("quoted privileges")
        .split_whitespace()
        .map(str::to_owned)
        .collect()
}

#[test]
fn a_token_with_exactly_the_documented_privileges_makes_runs_and_removes_a_vm() {
    if !enabled() {
        return;
    }
    let privileges = documented_privileges();
    assert!(privileges.contains(&"VM.Config.HWType".to_owned()));
    let mut pve = FakePve::start();
    let schema = pve.schema();
    let f = PveFleet::new(&pve, "least", "{shutdownTimeout: 5s, stepTimeout: 1m}");
    // domainType qemu sends `kvm: 0`; a full network sends net0 on the template's bridge;
    // the disk is grown: every privilege-guarded key fleet ever writes.
    let fleet_yaml = std::fs::read_to_string(f.repo.path().join("fleet/fleet.yaml")).expect("read");
    f.repo.write(
        "fleet/fleet.yaml",
        fleet_yaml.replace(
            "{name: host, type: proxmox}",
            "{name: host, type: proxmox, domainType: qemu}",
        ),
    );
    f.repo.write(
        "fleet/vms/a.yaml",
        vm_yaml(
            "a",
            ", resources: {disk: 8Gi}, network: {mode: full}, loadout: l",
        ),
    );
    // A second VM stays, so removing `a` does not empty the provider (held for approval).
    f.repo.write("fleet/vms/b.yaml", vm_yaml("b", ""));
    f.repo.write(
        "fleet/loadouts/l.yaml",
        "apiVersion: fleet/v1\nkind: Loadout\nmetadata: {name: l}\nspec: {runcmd: ['true']}\n",
    );
    f.repo.commit("one VM");

    // The role as documented before this test existed (no HWType): PVE refuses the config
    // write, and says which privilege is missing.
    let without: Vec<&String> = privileges
        .iter()
        .filter(|p| *p != "VM.Config.HWType")
        .collect();
    pve.control(json!({"op": "grant", "privs": without}));
    let refused = f.repo.fleet(&["apply", "--auto-approve"]);
    assert_ne!(refused.code(), 0, "{}", refused.stdout());
    assert!(
        format!("{}{}", refused.stdout(), refused.stderr()).contains("VM.Config.HWType"),
        "{}\n{}",
        refused.stdout(),
        refused.stderr()
    );

    // Exactly the documented privileges: the create is finished, the VM runs, and it is
    // destroyed when its file goes.
    pve.control(json!({"op": "grant", "privs": ["VM.Config.HWType"]}));
    f.repo.fleet(&["apply", "--auto-approve"]).expect_code(0);
    let vm = pve.vm_named("a").expect("VM a");
    assert_eq!(vm["status"], "running", "{vm}");
    assert_eq!(config_of(&vm, "kvm"), "0", "{vm}");
    assert!(config_of(&vm, "net0").contains("bridge=vmbr0"), "{vm}");
    f.repo
        .fleet(&["plan", "--detailed-exitcode"])
        .expect_code(0);
    f.repo.remove("fleet/vms/a.yaml");
    f.repo.commit("gone");
    f.repo.fleet(&["apply", "--auto-approve"]).expect_code(0);
    assert!(pve.vm_named("a").is_none(), "destroyed");
    checked_wire(&mut pve, &schema);
}

/// A task record for `vm` as the task book writes it, with only what resets look at.
fn task_record(name: &str, vm: &str, phase: &str, started: Option<&str>) -> String {
    let started = started
        .map(|t| format!("started: {t}\n"))
        .unwrap_or_default();
    format!(
        "name: {name}\nvm: {vm}\ngeneration: 1\nrun: 0000000{}\nspecHash: h\nrerun: 0\nphase: {phase}\nsource: fleet/tasks/{name}.yaml\ncreated: 2026-01-01T00:00:00Z\n{started}",
        name.len()
    )
}

#[test]
fn a_proxmox_vm_that_resets_before_each_run_rolls_back_to_the_snapshot_taken_when_made() {
    if !enabled() {
        return;
    }
    let mut pve = FakePve::start();
    let schema = pve.schema();
    let f = PveFleet::new(&pve, "clean", "{shutdownTimeout: 5s, stepTimeout: 1m}");
    f.repo.write(
        "fleet/vms/box.yaml",
        "apiVersion: fleet/v1\nkind: VM\nmetadata: {name: box}\nspec: {provider: host, image: micro, reset: beforeEachTask, resources: {memory: 1Gi}}\n",
    );
    f.repo.commit("a VM that resets before each run");
    f.repo.fleet(&["apply", "--auto-approve"]).expect_code(0);
    let wire = checked_wire(&mut pve, &schema);
    let snapshot = wire
        .iter()
        .position(|r| r.method == "POST" && r.path.ends_with("/snapshot"))
        .expect("a snapshot is taken when the VM is made");
    assert_eq!(wire[snapshot].params()["snapname"], "fleet-clean");
    let start = wire
        .iter()
        .position(|r| r.path.ends_with("/status/start"))
        .expect("started");
    assert!(
        snapshot < start,
        "the snapshot is of the VM before its first boot"
    );
    // Resized since: the snapshot still holds 1 GiB.
    f.repo.write(
        "fleet/vms/box.yaml",
        "apiVersion: fleet/v1\nkind: VM\nmetadata: {name: box}\nspec: {provider: host, image: micro, reset: beforeEachTask, resources: {memory: 2Gi}}\n",
    );
    f.repo.commit("more memory");
    f.repo.fleet(&["apply", "--auto-approve"]).expect_code(0);
    checked_wire(&mut pve, &schema);

    // A run ended on it and another waits: the plan resets it first.
    let tasks = f.repo.path().join(".fleet/status/tasks");
    std::fs::create_dir_all(&tasks).expect("tasks dir");
    std::fs::write(
        tasks.join("done.yaml"),
        task_record("done", "box", "Succeeded", Some("2026-01-01T00:00:01Z")),
    )
    .expect("record");
    std::fs::write(
        tasks.join("next.yaml"),
        task_record("next", "box", "Pending", None),
    )
    .expect("record");
    // As the task book marks a VM it dispatched a run to.
    let used = f.repo.path().join(".fleet/status/used");
    std::fs::create_dir_all(&used).expect("used dir");
    std::fs::write(
        used.join("box"),
        "a run was dispatched since its last reset\n",
    )
    .expect("mark");
    let plan = f.repo.fleet(&["plan"]);
    assert!(
        plan.stdout().contains("reset    box")
            && plan.stdout().contains("a run of task next waits"),
        "{}",
        plan.stdout()
    );
    // The rollback brings back the snapshot's config too; the config of now goes back on.
    f.repo.fleet(&["apply", "--auto-approve"]).expect_code(0);
    let wire = checked_wire(&mut pve, &schema);
    let rollback = wire
        .iter()
        .position(|r| r.method == "POST" && r.path.ends_with("/snapshot/fleet-clean/rollback"))
        .expect("rolled back");
    let rewrite = wire
        .iter()
        .position(|r| r.method == "PUT" && r.path.ends_with("/config"))
        .expect("config written back");
    let boot = wire
        .iter()
        .rposition(|r| r.path.ends_with("/status/start"))
        .expect("booted again");
    assert!(rollback < rewrite && rewrite < boot, "{wire:#?}");
    let vm = pve.vm_named("box").expect("box");
    assert_eq!(vm["status"], "running");
    assert_eq!(config_of(&vm, "memory"), "2048");
    assert!(!used.join("box").exists(), "the reset cleared the mark");
    // Recorded: the waiting run now finds the VM clean, and nothing more is planned.
    let again = f.repo.fleet(&["plan", "--detailed-exitcode"]);
    again.expect_code(0);
}

/// `fleet snapshot` through the snapshot API: taken, listed, a revert planned and run by
/// `fleet apply` as a step (stop, rollback, boot again), deleted; every request checked
/// against the PVE schema.
#[test]
fn snapshots_on_proxmox_go_through_the_snapshot_api() {
    if !enabled() {
        return;
    }
    let mut pve = FakePve::start();
    let schema = pve.schema();
    let f = PveFleet::new(&pve, "snaps", "{shutdownTimeout: 5s, stepTimeout: 1m}");
    f.repo.write("fleet/vms/box.yaml", vm_yaml("box", ""));
    f.repo.commit("a VM");
    f.repo.fleet(&["apply", "--auto-approve"]).expect_code(0);
    checked_wire(&mut pve, &schema);

    f.repo
        .fleet(&[
            "snapshot",
            "create",
            "box",
            "s1",
            "--description",
            "the first",
        ])
        .expect_code(0);
    let wire = checked_wire(&mut pve, &schema);
    let taken = wire
        .iter()
        .find(|r| r.method == "POST" && r.path.ends_with("/snapshot"))
        .expect("a snapshot is taken");
    assert_eq!(taken.params()["snapname"], "s1");
    let listed = f.repo.fleet(&["snapshot", "list", "box"]).stdout();
    assert!(
        listed
            .lines()
            .any(|l| l.starts_with("s1") && l.contains("the first")),
        "{listed}"
    );
    assert!(
        !listed.contains("current"),
        "PVE's 'current' is not a snapshot: {listed}"
    );

    // No fleet serve: the revert waits for the next apply, which plans and runs it.
    let asked = f.repo.fleet(&["snapshot", "revert", "box", "s1"]);
    asked.expect_code(0);
    assert!(
        asked.stdout().contains("the next fleet apply runs it"),
        "{}",
        asked.stdout()
    );
    let plan = f.repo.fleet(&["plan"]).stdout();
    assert!(plan.contains("revert   box"), "{plan}");
    f.repo.fleet(&["apply", "--auto-approve"]).expect_code(0);
    let wire = checked_wire(&mut pve, &schema);
    let at = |what: &str| {
        wire.iter()
            .position(|r| r.method == "POST" && r.path.ends_with(what))
            .unwrap_or_else(|| panic!("no {what} in {wire:#?}"))
    };
    assert!(at("/status/stop") < at("/snapshot/s1/rollback"));
    assert!(at("/snapshot/s1/rollback") < at("/status/start"));
    assert_eq!(pve.vm_named("box").expect("box")["status"], "running");
    assert!(
        !f.repo
            .path()
            .join(".fleet/status/snapshot-reverts/box.yaml")
            .exists(),
        "a revert that ran is not asked for again"
    );
    f.repo
        .fleet(&["plan", "--detailed-exitcode"])
        .expect_code(0);

    f.repo
        .fleet(&["snapshot", "delete", "box", "s1"])
        .expect_code(0);
    let wire = checked_wire(&mut pve, &schema);
    assert!(
        wire.iter()
            .any(|r| r.method == "DELETE" && r.path.ends_with("/snapshot/s1")),
        "{wire:#?}"
    );
    assert_eq!(
        f.repo.fleet(&["snapshot", "list", "box"]).stdout(),
        "no snapshots\n"
    );
}

/// `fleet console` on Proxmox: a termproxy ticket for serial0, the API's websocket, the
/// termproxy protocol (typed text comes back from the fake's echo), Ctrl-] to leave.
#[test]
fn the_console_of_a_proxmox_vm_goes_through_termproxy() {
    use std::io::{Read, Write};
    if !enabled() {
        return;
    }
    let mut pve = FakePve::start();
    let schema = pve.schema();
    let f = PveFleet::new(&pve, "console", "{shutdownTimeout: 5s, stepTimeout: 1m}");
    f.repo.write("fleet/vms/box.yaml", vm_yaml("box", ""));
    f.repo.commit("a VM");
    f.repo.fleet(&["apply", "--auto-approve"]).expect_code(0);
    checked_wire(&mut pve, &schema);
    let mut console = std::process::Command::new(crate::support::fleet_bin())
        .arg("-C")
        .arg(f.repo.path())
        .args(["console", "box"])
        .env("FLEET_HOST_CONFIG", f.repo.host_config_path())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("fleet console");
    let mut input = console.stdin.take().expect("stdin");
    let mut output = console.stdout.take().expect("stdout");
    let reader = std::thread::spawn(move || {
        let mut seen = Vec::new();
        let mut buf = [0u8; 1024];
        while let Ok(n) = output.read(&mut buf) {
            if n == 0 {
                break;
            }
            seen.extend_from_slice(&buf[..n]);
        }
        String::from_utf8_lossy(&seen).into_owned()
    });
    std::thread::sleep(std::time::Duration::from_millis(500));
    input.write_all("echo héllo\n".as_bytes()).expect("type");
    std::thread::sleep(std::time::Duration::from_millis(500));
    input.write_all(&[0x1d]).expect("escape");
    let status = console.wait().expect("wait");
    let seen = reader.join().expect("reader");
    let mut stderr = String::new();
    console
        .stderr
        .take()
        .expect("stderr")
        .read_to_string(&mut stderr)
        .expect("stderr");
    assert!(status.success(), "{stderr}");
    assert!(seen.contains("starting serial terminal"), "{seen:?}");
    assert!(
        seen.contains("echo héllo"),
        "the fake echoes what was typed: {seen:?}"
    );
    assert!(stderr.contains("left the console of box"), "{stderr}");
    let wire = checked_wire(&mut pve, &schema);
    let proxy = wire
        .iter()
        .find(|r| r.method == "POST" && r.path.ends_with("/termproxy"))
        .expect("a termproxy ticket");
    assert_eq!(proxy.params()["serial"], "serial0");
    assert!(
        wire.iter().any(|r| r.path.ends_with("/vncwebsocket")),
        "{wire:#?}"
    );
}

#[test]
fn a_revision_over_the_clusters_memory_is_refused_by_plan() {
    if !enabled() {
        return;
    }
    let mut pve = FakePve::start();
    let schema = pve.schema();
    let f = PveFleet::new(&pve, "big", "{shutdownTimeout: 5s}");
    f.repo.write(
        "fleet/vms/pool.yaml",
        "apiVersion: fleet/v1\nkind: VMPool\nmetadata: {name: w}\nspec:\n  replicas: 40\n  template:\n    spec: {provider: host, image: micro, resources: {memory: 1Gi}}\n",
    );
    f.repo.commit("more VMs than the cluster holds");
    let plan = f.repo.fleet(&["plan"]);
    assert_eq!(plan.code(), 1, "{}{}", plan.stdout(), plan.stderr());
    assert!(
        plan.stderr()
            .contains("provider host: its 40 running VMs ask for 40960 MiB of memory"),
        "{}",
        plan.stderr()
    );
    checked_wire(&mut pve, &schema);
    // Within the cluster's memory (overcommitted on purpose), it plans.
    f.repo.write(
        "fleet/fleet.yaml",
        std::fs::read_to_string(f.repo.path().join("fleet/fleet.yaml"))
            .expect("fleet.yaml")
            .replace(
                "{shutdownTimeout: 5s}",
                "{shutdownTimeout: 5s, overcommit: {memory: 10, cpu: 20}}",
            ),
    );
    f.repo.commit("overcommit");
    f.repo.fleet(&["plan"]).expect_code(0);
}

/// `fleet doctor`: with libvirtd out of reach, a world-readable age identity and a token
/// lacking a privilege it names each problem with its fix and exits 1; fixed, it exits 0.
#[test]
fn fleet_doctor_names_each_problem_and_its_fix() {
    if !enabled() || !crate::libvirt::enabled() {
        return;
    }
    let mut pve = FakePve::start();
    let f = PveFleet::new(&pve, "doctor", "{}");
    f.repo.write("fleet/vms/a.yaml", vm_yaml("a", ""));
    f.repo.commit("a VM");
    let identity = f.host.path().join("age.key");
    std::fs::write(
        &identity,
        "AGE-SECRET-KEY-1QQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQ\n",
    )
    .expect("identity");
    let storage = f.repo.path().join(".fleet/storage");
    let pve_provider = format!(
        "{{name: host, type: proxmox, endpoint: '{}', node: pve1, token: {{id: '{}', file: '{}'}}, caFile: '{}'}}",
        pve.url,
        pve.token_id,
        f.host.path().join("token").display(),
        pve.ca_file.display()
    );
    let with_libvirt = |uri: &str| {
        crate::support::host_yaml(
            &[
                pve_provider.clone(),
                format!(
                    "{{name: local, type: libvirt, uri: '{uri}', storageDir: '{}'}}",
                    storage.display()
                ),
            ],
            "",
        )
    };
    let doctor = || {
        let out = std::process::Command::new(crate::support::fleet_bin())
            .arg("-C")
            .arg(f.repo.path())
            .arg("doctor")
            .env("FLEET_HOST_CONFIG", f.repo.host_config_path())
            .env("FLEET_AGE_IDENTITY", &identity)
            .output()
            .expect("fleet doctor");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    };

    // Broken three ways: libvirtd not answering on that socket, the identity readable by
    // all, the token without VM.Config.HWType.
    f.repo.host_config(&with_libvirt(
        "qemu:///system?socket=/nonexistent/libvirt-sock",
    ));
    set_mode(&identity, 0o644);
    let without: Vec<String> = documented_privileges()
        .into_iter()
        .filter(|p| p != "VM.Config.HWType")
        .collect();
    pve.control(json!({"op": "grant", "privs": without}));
    let (code, report) = doctor();
    assert_eq!(code, Some(1), "{report}");
    for expected in [
        "FAIL  libvirt",
        "start libvirtd",
        "FAIL  age identity",
        &format!("chmod 600 {}", identity.display()),
        "FAIL  proxmox",
        "the token lacks VM.Config.HWType",
        "pveum role modify Fleet -append 1 -privs \"VM.Config.HWType\"",
    ] {
        assert!(report.contains(expected), "{expected:?} in:\n{report}");
    }

    // Each fixed: nothing fails.
    f.repo.host_config(&with_libvirt("qemu:///system"));
    set_mode(&identity, 0o600);
    pve.control(json!({"op": "grant", "privs": ["VM.Config.HWType"]}));
    let (code, report) = doctor();
    assert_eq!(code, Some(0), "{report}");
    for expected in [
        "ok    libvirt",
        "ok    proxmox",
        "every privilege fleet needs",
        "ok    age identity",
        "ok    revision",
    ] {
        assert!(report.contains(expected), "{expected:?} in:\n{report}");
    }
    // The same as JSON, for scripts.
    let json = std::process::Command::new(crate::support::fleet_bin())
        .arg("-C")
        .arg(f.repo.path())
        .args(["doctor", "-o", "json"])
        .env("FLEET_HOST_CONFIG", f.repo.host_config_path())
        .env("FLEET_AGE_IDENTITY", &identity)
        .output()
        .expect("fleet doctor");
    let findings: serde_json::Value = serde_json::from_slice(&json.stdout).expect("json");
    assert!(
        findings
            .as_array()
            .expect("a list")
            .iter()
            .any(|f| f["check"] == "proxmox" && f["verdict"] == "ok"),
        "{findings}"
    );
}

/// `docs/proxmox.md`'s role and the driver's list (what `fleet doctor` checks) agree.
#[test]
fn the_documented_role_is_what_the_driver_needs() {
    let mut documented = documented_privileges();
    documented.sort();
    let mut needed: Vec<String> = fleet::driver::proxmox::REQUIRED_PRIVILEGES
        .iter()
        .map(|p| (*p).to_owned())
        .collect();
    needed.sort();
    assert_eq!(documented, needed);
}
