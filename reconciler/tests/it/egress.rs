//! Brokered egress on a real VM (real libvirtd, the micro image, the real agent): a VM
//! with no network card reaches an upstream its loadout allows, through the agent's proxy
//! and the host's broker, and nothing else; a refusal says which rule to add and is an
//! event. The upstreams are on the host's loopback, named by address (an internal address
//! is reached only when a rule names it), so no traffic leaves the machine.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::time::Duration;

use crate::daemon::{Daemon, read};
use crate::libvirt::{Cleanup, enabled, fleet_yaml_with_policy};
use crate::support::Repo;
use crate::tasks::{Status, task_yaml};

/// An upstream on 127.0.0.1 that answers each connection with what it is sent,
/// upper-cased.
fn shouting_upstream() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    std::thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            std::thread::spawn(move || {
                let mut conn = conn;
                let mut buf = [0u8; 1024];
                while let Ok(n) = conn.read(&mut buf) {
                    if n == 0 || conn.write_all(&buf[..n].to_ascii_uppercase()).is_err() {
                        break;
                    }
                }
            });
        }
    });
    port
}

/// An HTTP upstream on 127.0.0.1 that answers every request with its request line.
fn http_upstream() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    std::thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            let mut conn = conn;
            let mut got = Vec::new();
            let mut buf = [0u8; 4096];
            while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                match conn.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => got.extend_from_slice(&buf[..n]),
                }
            }
            let text = String::from_utf8_lossy(&got).into_owned();
            let body = format!(
                "upstream saw: {}\n",
                text.lines().next().unwrap_or_default()
            );
            let _ = conn.write_all(
                format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                )
                .as_bytes(),
            );
        }
    });
    port
}

/// A task that opens a tunnel to 127.0.0.1:`port` through the proxy and says "ping".
fn tunnel_task(name: &str, vm: &str, port: u16) -> String {
    task_yaml(
        name,
        vm,
        &format!(
            "  command: [sh, -c, \"(printf 'CONNECT 127.0.0.1:{port} HTTP/1.1\\\\r\\\\n\\\\r\\\\nping\\\\n'; sleep 3) | nc 127.0.0.1 3128; echo proxy=$HTTPS_PROXY\"]\n"
        ),
    )
}

#[test]
fn a_brokered_vm_reaches_only_what_its_loadout_allows() {
    if !enabled() {
        return;
    }
    let prefix = format!("it{}-egress-", std::process::id());
    let _cleanup = Cleanup {
        prefix: prefix.clone(),
    };
    let vm = format!("{prefix}a");
    let allowed = shouting_upstream();
    let other = shouting_upstream();
    let web = http_upstream();
    let repo = Repo::new();
    repo.write(
        "fleet/fleet.yaml",
        fleet_yaml_with_policy(
            &format!("it{}egress", std::process::id()),
            "{shutdownTimeout: 10s, reconcileInterval: 30s}",
        ),
    );
    repo.write(
        "fleet/loadouts/agent.yaml",
        format!(
            "apiVersion: fleet/v1\nkind: Loadout\nmetadata: {{name: agent}}\nspec:\n  network: {{mode: brokered}}\n  egress:\n    allow:\n      - {{host: '127.0.0.1', ports: [{allowed}]}}\n      - {{host: '127.0.0.1', ports: [{web}], paths: [/ok/]}}\n"
        ),
    );
    repo.write(
        &format!("fleet/vms/{vm}.yaml"),
        format!(
            "apiVersion: fleet/v1\nkind: VM\nmetadata: {{name: {vm}}}\nspec: {{provider: local, image: micro, loadout: agent, resources: {{memory: 256Mi}}}}\n"
        ),
    );
    repo.write(
        "fleet/tasks/allowed.yaml",
        tunnel_task("allowed", &vm, allowed),
    );
    repo.write(
        "fleet/tasks/refused.yaml",
        tunnel_task("refused", &vm, other),
    );
    // Plain HTTP through the proxy the task's environment names (busybox wget), under the
    // rule's path and outside it.
    repo.write(
        "fleet/tasks/web.yaml",
        task_yaml(
            "web",
            &vm,
            &format!(
                "  command: [sh, -c, \"unset NO_PROXY no_proxy; busybox wget -q -O- http://127.0.0.1:{web}/ok/hello; busybox wget -q -O- http://127.0.0.1:{web}/admin 2>&1; echo done\"]\n"
            ),
        ),
    );
    repo.commit("a brokered VM and two tunnels");
    crate::support::Run(repo.fleet(&["validate"]).0).expect_code(0);
    let _daemon = Daemon::start(&repo);
    let status = Status(repo.path().join(".fleet/status"));

    status.wait_phase("allowed", "Succeeded", Duration::from_secs(180));
    let output = status.output("allowed");
    assert!(output.contains("200 Connection established"), "{output}");
    assert!(
        output.contains("PING"),
        "the upstream's answer came back: {output}"
    );
    assert!(output.contains("proxy=http://127.0.0.1:3128"), "{output}");

    status.wait_phase("refused", "Succeeded", Duration::from_secs(60));
    let output = status.output("refused");
    assert!(output.contains("403 Forbidden"), "{output}");
    assert!(
        output.contains(&format!(
            "allows port(s) [{allowed}], not {other}; to allow it, add {other} to that rule's ports"
        )),
        "the refusal names the rule and the fix: {output}"
    );
    assert!(
        !output.contains("PING"),
        "nothing reached the other upstream: {output}"
    );
    status.wait_phase("web", "Succeeded", Duration::from_secs(60));
    let output = status.output("web");
    assert!(
        output.contains("upstream saw: GET /ok/hello HTTP/1.1"),
        "the allowed path reached the upstream: {output}"
    );
    assert!(!output.contains("upstream saw: GET /admin"), "{output}");
    assert!(
        output.contains("403"),
        "the other path was refused: {output}"
    );
    let events = read(&status.0.join("events.jsonl"));
    assert!(
        events.contains("\"type\":\"egress.denied\""),
        "the refusal is an event: {events}"
    );
}
