//! `network: full` on real libvirt: the guest reaches an address outside the host (a
//! network namespace this test makes, standing in for the outside world) and none of the
//! host's own: not its loopback services, not its interfaces' addresses, not the bridge.
//!
//! Only addresses on this machine are used: the "outside" is 198.51.100.0/24 (TEST-NET-2)
//! inside a namespace, and a fence drops anything else the guest would forward, so nothing
//! leaves the machine.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::process::Command;
use std::time::Duration;

use crate::daemon::Daemon;
use crate::libvirt::{Cleanup, enabled, fleet_yaml_with_policy, vm_yaml};
use crate::support::Repo;
use crate::tasks::{Status, task_yaml};

fn run(args: &[&str]) -> String {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .expect(args[0]);
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A TCP server answering every connection with `reply`, on its own thread.
fn serve(listener: TcpListener, reply: &'static str) {
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let mut stream = stream;
            let _ = stream.set_read_timeout(Some(Duration::from_millis(500)));
            let mut buf = [0u8; 256];
            let _ = stream.read(&mut buf);
            let _ = stream.write_all(reply.as_bytes());
        }
    });
}

/// The namespace, the fence and the veth pair, removed even when the test fails.
struct Outside {
    ns: String,
    host_if: String,
    server: Option<std::process::Child>,
}

impl Drop for Outside {
    fn drop(&mut self) {
        if let Some(mut s) = self.server.take() {
            let _ = s.kill();
            let _ = s.wait();
        }
        let _ = Command::new("nft")
            .args(["delete", "table", "inet", "fleet_test_fence"])
            .status();
        let _ = Command::new("ip")
            .args(["link", "del", &self.host_if])
            .status();
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).status();
    }
}

#[test]
fn a_full_network_guest_reaches_the_outside_and_never_the_host() {
    if !enabled() {
        return;
    }
    let pid = std::process::id();
    let prefix = format!("it{pid}-net-");
    let _cleanup = Cleanup {
        prefix: prefix.clone(),
    };
    let mut outside = Outside {
        ns: format!("fleet-out-{pid}"),
        host_if: format!("fo{}h", pid % 1_000_000),
        server: None,
    };
    let ns_if = format!("fo{}n", pid % 1_000_000);
    run(&["ip", "netns", "add", &outside.ns]);
    run(&[
        "ip",
        "link",
        "add",
        &outside.host_if,
        "type",
        "veth",
        "peer",
        "name",
        &ns_if,
        "netns",
        &outside.ns,
    ]);
    run(&[
        "ip",
        "addr",
        "add",
        "198.51.100.1/24",
        "dev",
        &outside.host_if,
    ]);
    run(&["ip", "link", "set", &outside.host_if, "up"]);
    run(&[
        "ip",
        "netns",
        "exec",
        &outside.ns,
        "ip",
        "addr",
        "add",
        "198.51.100.2/24",
        "dev",
        &ns_if,
    ]);
    run(&[
        "ip",
        "netns",
        "exec",
        &outside.ns,
        "ip",
        "link",
        "set",
        &ns_if,
        "up",
    ]);
    run(&[
        "ip",
        "netns",
        "exec",
        &outside.ns,
        "ip",
        "link",
        "set",
        "lo",
        "up",
    ]);
    // Whatever the guest forwards goes to the namespace or nowhere.
    let fence = "table inet fleet_test_fence {\n chain forward {\n  type filter hook forward priority filter - 20; policy accept;\n  iifname \"virbr-fleet\" ip daddr != 198.51.100.0/24 drop\n  iifname \"virbr-fleet\" meta nfproto ipv6 drop\n }\n}\n";
    let mut nft = Command::new("nft")
        .args(["-f", "-"])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .expect("nft (apt-get install nftables)");
    nft.stdin
        .take()
        .expect("stdin")
        .write_all(fence.as_bytes())
        .expect("fence");
    assert!(nft.wait().expect("nft").success());
    outside.server = Some(
        Command::new("ip")
            .args(["netns", "exec", &outside.ns, "python3", "-c"])
            .arg("import socket\ns=socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind(('198.51.100.2', 8080)); s.listen()\nwhile True:\n  c,_=s.accept(); c.settimeout(0.5)\n  try: c.recv(256)\n  except Exception: pass\n  c.sendall(b'HTTP/1.0 200 OK\\r\\n\\r\\noutside-reached\\n'); c.close()\n")
            .spawn()
            .expect("server in the namespace"),
    );

    // The host's own services: one on loopback, one on every address.
    let loopback = TcpListener::bind("127.0.0.1:0").expect("bind");
    let everywhere = TcpListener::bind("0.0.0.0:0").expect("bind");
    let (lo_port, any_port) = (
        loopback.local_addr().expect("addr").port(),
        everywhere.local_addr().expect("addr").port(),
    );
    serve(loopback, "HTTP/1.0 200 OK\r\n\r\nhost-reached\n");
    serve(everywhere, "HTTP/1.0 200 OK\r\n\r\nhost-reached\n");

    let repo = Repo::new();
    let fleet = format!("it{pid}net");
    let vm = format!("{prefix}a");
    repo.write(
        "fleet/fleet.yaml",
        fleet_yaml_with_policy(&fleet, "{shutdownTimeout: 10s, reconcileInterval: 30s}"),
    );
    repo.write(
        &format!("fleet/vms/{vm}.yaml"),
        vm_yaml(&vm, "256Mi").replace("image: micro,", "image: micro, network: {mode: full},"),
    );
    // Every global address of the host, the bridge's included once it exists.
    let mut host_addresses: Vec<String> =
        run(&["ip", "-4", "-o", "addr", "show", "scope", "global"])
            .lines()
            .filter_map(|l| l.split_whitespace().nth(3))
            .filter_map(|a| a.split('/').next().map(str::to_owned))
            .collect();
    host_addresses.push("192.168.150.1".into());
    host_addresses.sort();
    host_addresses.dedup();
    let mut targets = vec![
        "198.51.100.2:8080".to_owned(),
        format!("10.0.2.2:{lo_port}"),
    ];
    targets.extend(host_addresses.iter().map(|a| format!("{a}:{any_port}")));
    let probe = format!(
        "  timeout: 3m\n  command:\n    - sh\n    - -c\n    - |\n      i=0; while ! ip -4 addr show eth0 | grep -q inet; do i=$((i+1)); [ $i -gt 120 ] && break; sleep 0.5; done\n      ip -4 -o addr show eth0\n      for t in {}; do\n        h=${{t%:*}}; p=${{t#*:}}\n        if printf 'GET / HTTP/1.0\\r\\n\\r\\n' | timeout 6 nc -w 3 $h $p 2>/dev/null | grep -q reached; then echo \"reach $t yes\"; else echo \"reach $t no\"; fi\n      done\n",
        targets.join(" ")
    );
    repo.write("fleet/tasks/probe.yaml", task_yaml("probe", &vm, &probe));
    repo.commit("a VM with a full network, probing");

    // Control: the host's services answer the host itself on every address probed.
    for a in &host_addresses {
        if a == "192.168.150.1" {
            continue; // the bridge comes with the network
        }
        let mut s = std::net::TcpStream::connect((a.as_str(), any_port)).expect("host service");
        let mut reply = String::new();
        let _ = s.write_all(b"GET / HTTP/1.0\r\n\r\n");
        let _ = s.read_to_string(&mut reply);
        assert!(reply.contains("host-reached"), "{a}: {reply}");
    }

    let daemon = Daemon::start(&repo);
    let status = Status(repo.path().join(".fleet/status"));
    status.wait_phase("probe", "Succeeded", Duration::from_secs(240));
    let output = status.output("probe");
    drop(daemon);
    assert!(
        output.contains("inet 192.168.150."),
        "the guest got an address: {output}"
    );
    assert!(
        output.contains("reach 198.51.100.2:8080 yes"),
        "the outside is reachable: {output}"
    );
    for target in &targets[1..] {
        assert!(
            output.contains(&format!("reach {target} no")),
            "{target} must be out of the guest's reach: {output}"
        );
    }
    let guard = run(&["nft", "list", "table", "inet", "fleet_guard"]);
    assert!(guard.contains("iifname \"virbr-fleet\""), "{guard}");

    repo.remove(&format!("fleet/vms/{vm}.yaml"))
        .remove("fleet/tasks/probe.yaml");
    repo.commit("empty");
    crate::approvals::apply_emptying(&repo);
}
