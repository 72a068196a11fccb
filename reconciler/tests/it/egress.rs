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
pub fn shouting_upstream() -> u16 {
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
    // The upstreams play the outside on loopback: the host's administrator lets rules
    // naming it through (no rule reaches inside otherwise).
    repo.add_host_config("  egress:\n    allowInternal: ['127.0.0.1']\n");
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
    // The guest's proxy named the task (its user), so the connection is in its log and
    // its totals (written when the broker lets the connection go, maybe after the exit).
    crate::daemon::wait_until(
        "the connection's egress line",
        Duration::from_secs(20),
        || {
            std::fs::read_to_string(status.0.join("tasks/allowed/egress.jsonl"))
                .is_ok_and(|log| log.contains("\"status\":200"))
        },
    );
    let log = read(&status.0.join("tasks/allowed/egress.jsonl"));
    assert!(
        log.contains(&format!("\"destination\":\"CONNECT 127.0.0.1:{allowed}\""))
            && log.contains("\"status\":200")
            && log.contains("\"rule\":\"loadout agent egress.allow[0]\""),
        "{log}"
    );
    let record = status.task("allowed");
    assert!(record.contains("connections: 1"), "{record}");

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
    let log = read(&status.0.join("tasks/refused/egress.jsonl"));
    assert!(
        log.contains("\"status\":403") && !log.contains("\"rule\""),
        "{log}"
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

/// A server configuration for `name` with a certificate signed by a test authority made
/// for it, and that authority's PEM (for the host configuration's `caFiles`).
pub fn test_tls(name: &str) -> (std::sync::Arc<rustls::ServerConfig>, String) {
    use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
    let ca_key = rcgen::KeyPair::generate().expect("key");
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = rcgen::CertifiedIssuer::self_signed(ca_params, ca_key).expect("ca");
    let server_key = rcgen::KeyPair::generate().expect("key");
    let cert = rcgen::CertificateParams::new(vec![name.to_owned()])
        .expect("params")
        .signed_by(&server_key, &ca)
        .expect("cert");
    let config = rustls::ServerConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_no_client_auth()
    .with_single_cert(
        vec![cert.der().clone()],
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(server_key.serialize_der())),
    )
    .expect("server config");
    (std::sync::Arc::new(config), ca.pem())
}

/// A test authority (its PEM) and an API on loopback serving `name` over TLS with a
/// certificate it signed. Each request's head goes to `seen`; the answer is a stream of
/// server-sent events, as a model API's, that reports 30 input and 20 output tokens and
/// says only whether `x-api-key` was `key`, never the key.
pub fn tls_api(name: &str, key: String) -> (u16, String, std::sync::mpsc::Receiver<String>) {
    let (config, ca_pem) = test_tls(name);
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let (tx, seen) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for tcp in listener.incoming().flatten() {
            let Ok(conn) = rustls::ServerConnection::new(config.clone()) else {
                continue;
            };
            let mut tls = rustls::StreamOwned::new(conn, tcp);
            let mut got = Vec::new();
            let mut buf = [0u8; 4096];
            while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                match tls.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => got.extend_from_slice(&buf[..n]),
                }
            }
            let head = String::from_utf8_lossy(&got).into_owned();
            let real = head
                .lines()
                .any(|l| l.eq_ignore_ascii_case(&format!("x-api-key: {key}")));
            let verdict = if real {
                "api: the real key"
            } else {
                "api: a wrong key"
            };
            let body = format!(
                "event: message_start\ndata: {{\"type\":\"message_start\",\"message\":{{\"usage\":{{\"input_tokens\":30,\"output_tokens\":1}}}}}}\n\nevent: content_block_delta\ndata: {{\"type\":\"content_block_delta\",\"delta\":{{\"text\":\"{verdict}\"}}}}\n\nevent: message_delta\ndata: {{\"type\":\"message_delta\",\"usage\":{{\"output_tokens\":20}}}}\n\n"
            );
            let _ = tx.send(head);
            let _ = tls.write_all(
                format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                )
                .as_bytes(),
            );
            tls.conn.send_close_notify();
            let _ = tls.flush();
        }
    });
    (port, ca_pem, seen)
}

#[test]
fn a_brokered_api_gets_the_real_key_and_the_guest_only_a_placeholder() {
    if !enabled() {
        return;
    }
    use crate::secrets::{age_identity, files_containing, random_hex, secret_set};
    let prefix = format!("it{}-cred-", std::process::id());
    let _cleanup = Cleanup {
        prefix: prefix.clone(),
    };
    let vm = format!("{prefix}a");
    let keys = tempfile::tempdir().expect("tempdir");
    let (identity, recipient) = age_identity(keys.path(), "age.key");
    let canary = format!("fleetcanary{}", random_hex(12));
    // The API plays api.anthropic.com on loopback: the host configuration pins the name
    // there and trusts the test authority, so nothing leaves the machine.
    let (port, ca_pem, seen) = tls_api("api.anthropic.com", canary.clone());
    let ca_file = keys.path().join("test-ca.pem");
    std::fs::write(&ca_file, ca_pem).expect("write CA");

    let repo = Repo::new();
    repo.write(
        "fleet/fleet.yaml",
        fleet_yaml_with_policy(
            &format!("it{}cred", std::process::id()),
            "{shutdownTimeout: 10s, reconcileInterval: 30s}",
        ),
    );
    repo.add_host_config(&format!(
        "  recipients: [{recipient}]\n  egress:\n    hosts: {{api.anthropic.com: 127.0.0.1}}\n    caFiles: [{}]\n    allowInternal: ['127.0.0.1']\n",
        ca_file.display()
    ));
    secret_set(&repo, "anthropic", "api_key", &canary);
    repo.allow_secret(
        "anthropic",
        &format!("{{hosts: ['api.anthropic.com:{port}'], loadouts: [agent]}}"),
    );
    repo.write(
        "fleet/loadouts/agent.yaml",
        format!(
            "apiVersion: fleet/v1\nkind: Loadout\nmetadata: {{name: agent}}\nspec:\n  network: {{mode: brokered}}\n  egress:\n    budget: {{tokens: 50}}\n    credentials:\n      - {{host: api.anthropic.com, port: {port}, header: x-api-key, secret: {{secret: anthropic, key: api_key}}}}\n"
        ),
    );
    repo.write(
        &format!("fleet/vms/{vm}.yaml"),
        format!(
            "apiVersion: fleet/v1\nkind: VM\nmetadata: {{name: {vm}}}\nspec: {{provider: local, image: micro, loadout: agent, resources: {{memory: 256Mi}}}}\n"
        ),
    );
    // The task calls the API the way an agent would (base URL and key from its
    // environment): the first answer spends the run's 50 tokens, so the second gets a 429
    // and a budget prompt, and the third goes through once a human allows more. Then it
    // looks for the key everywhere a process in the VM could: every
    // process's environment and arguments, and the files under /run, /tmp, /etc and
    // /root. It is given the key rot13'd, so its own command line never holds it.
    let rot13: String = canary
        .chars()
        .map(|c| match c {
            'a'..='m' => (c as u8 + 13) as char,
            'n'..='z' => (c as u8 - 13) as char,
            other => other,
        })
        .collect();
    let script = format!(
        "call() {{ busybox wget -q -O- --header 'x-api-key: from-the-guest' \"$ANTHROPIC_BASE_URL/v1/models\"; }}\ncall\ncall 2>&1 | head -1\ni=0\nuntil call > /tmp/third 2>&1; do i=$((i+1)); [ $i -gt 120 ] && break; sleep 1; done\ncat /tmp/third\necho \"tries=$i\"\necho \"base=$ANTHROPIC_BASE_URL key=$ANTHROPIC_API_KEY\"\nc=$(echo {rot13} | tr a-z n-za-m)\nn=0\nfor f in /proc/[0-9]*/environ /proc/[0-9]*/cmdline; do (tr '\\0' '\\n' < $f | grep -qF \"$c\" && echo \"FOUND in $f\") 2>/dev/null; [ -r $f ] && n=$((n+1)); done\necho \"read=$n\"\nbusybox find /run /tmp /etc /root -type f 2>/dev/null | while read -r f; do grep -qF \"$c\" \"$f\" 2>/dev/null && echo \"FOUND in $f\"; done\necho scanned\n"
    );
    let indented: String = script.lines().map(|l| format!("      {l}\n")).collect();
    repo.write(
        "fleet/tasks/call.yaml",
        task_yaml(
            "call",
            &vm,
            &format!("  command:\n    - sh\n    - -c\n    - |\n{indented}"),
        ),
    );
    repo.commit("a brokered API with its key on the host");
    let identity_env = identity.to_str().expect("utf8").to_owned();
    let daemon = Daemon::start_with(&repo, &[("FLEET_AGE_IDENTITY", &identity_env)], &["-vv"]);
    let status = Status(repo.path().join(".fleet/status"));
    crate::daemon::wait_until("a budget prompt", Duration::from_secs(180), || {
        status
            .prompts("call")
            .iter()
            .any(|id| status.prompt(id).contains("kind: budget"))
    });
    let prompt = status.prompts("call")[0].clone();
    let text = status.prompt(&prompt);
    assert!(
        text.contains(
            "task call has used 50 tokens of its budget of 50; allow 50 more tokens? (yes/no)"
        ),
        "{text}"
    );
    crate::support::Run(repo.fleet(&["hitl", "answer", &prompt, "yes"]).0).expect_code(0);
    status.wait_phase("call", "Succeeded", Duration::from_secs(120));
    let output = status.output("call");
    assert!(
        output.contains("api: the real key"),
        "{output}\nevents: {}",
        read(&status.0.join("events.jsonl"))
    );
    // Of its own processes (the others' are not its to read) at least the shell's.
    let scanned: u32 = output
        .lines()
        .find_map(|l| l.trim().strip_prefix("read="))
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    assert!(scanned >= 2, "{output}");
    assert!(
        output.contains(&format!(
            "base=http://127.0.0.1:3128/api.anthropic.com key={}",
            fleet::egress::PLACEHOLDER_KEY
        )),
        "{output}"
    );
    assert!(output.contains("scanned"), "{output}");
    assert!(output.contains("429 Too Many Requests"), "{output}");
    assert_eq!(output.matches("api: the real key").count(), 2, "{output}");
    // Counted exactly, from the API's own figures: two answers of 30 in and 20 out; the
    // refused one counts for nothing.
    let record = status.task("call");
    for line in ["tokensIn: 60", "tokensOut: 40", "grants: 1"] {
        assert!(record.contains(line), "{line}: {record}");
    }
    // The task asks again while the prompt waits: each of those is refused too.
    let count = |key: &str| {
        crate::tasks::field(&record.replace("  ", ""), key)
            .and_then(|v| v.parse::<u32>().ok())
            .unwrap_or(0)
    };
    assert!(count("refused") >= 1, "{record}");
    assert_eq!(count("connections"), 2 + count("refused"), "{record}");
    assert!(
        !output.contains("FOUND"),
        "the key is in the guest: {output}"
    );
    let head = seen
        .recv_timeout(Duration::from_secs(5))
        .expect("a request");
    assert!(head.starts_with("GET /v1/models HTTP/1.1\r\n"), "{head}");
    assert!(!head.contains("from-the-guest"), "{head}");

    // The key in the clear is nowhere on the host side but the broker's memory: status,
    // journal, events, the daemon's logs.
    let log = daemon.log.lock().unwrap_or_else(|p| p.into_inner()).clone();
    drop(daemon);
    assert!(!log.contains(&canary), "the key is in fleet's logs");
    assert_eq!(
        files_containing(&repo.path().join(".fleet"), canary.as_bytes()),
        Vec::<std::path::PathBuf>::new()
    );
}

/// An HTTP upstream on 127.0.0.1 that answers every request with `bytes` bytes.
pub fn bulk_upstream(bytes: u64) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    std::thread::spawn(move || {
        let block = vec![b'z'; 64 * 1024];
        for conn in listener.incoming().flatten() {
            std::thread::spawn({
                let block = block.clone();
                move || {
                    let mut conn = conn;
                    let mut got = Vec::new();
                    let mut buf = [0u8; 4096];
                    while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                        match conn.read(&mut buf) {
                            Ok(0) | Err(_) => return,
                            Ok(n) => got.extend_from_slice(&buf[..n]),
                        }
                    }
                    let head = format!("HTTP/1.1 200 OK\r\nContent-Length: {bytes}\r\n\r\n");
                    if conn.write_all(head.as_bytes()).is_err() {
                        return;
                    }
                    let mut left = bytes;
                    while left > 0 {
                        let n = left.min(block.len() as u64) as usize;
                        if conn.write_all(&block[..n]).is_err() {
                            return;
                        }
                        left -= n as u64;
                    }
                }
            });
        }
    });
    port
}

/// Flow control on a real VM: a large download through the broker while another task of
/// the same VM streams a line every 100 ms. The download cannot starve the output: the
/// largest gap between output arrivals on the host is measured (and printed) and stays
/// bounded, and every line arrives, in order. `FLEET_TEST_DOWNLOAD_MIB` sets the size (the
/// issue's 200 MB; CI uses less under TCG).
#[test]
fn a_large_download_does_not_starve_another_tasks_output() {
    if !enabled() {
        return;
    }
    let mib: u64 = std::env::var("FLEET_TEST_DOWNLOAD_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(32);
    let prefix = format!("it{}-flow-", std::process::id());
    let _cleanup = Cleanup {
        prefix: prefix.clone(),
    };
    let vm = format!("{prefix}a");
    let port = bulk_upstream(mib * 1024 * 1024);
    let repo = Repo::new();
    repo.write(
        "fleet/fleet.yaml",
        fleet_yaml_with_policy(
            &format!("it{}flow", std::process::id()),
            "{shutdownTimeout: 10s, reconcileInterval: 30s}",
        ),
    );
    repo.write(
        "fleet/loadouts/agent.yaml",
        format!(
            "apiVersion: fleet/v1\nkind: Loadout\nmetadata: {{name: agent}}\nspec:\n  network: {{mode: brokered}}\n  egress:\n    allow:\n      - {{host: '127.0.0.1', ports: [{port}]}}\n"
        ),
    );
    repo.add_host_config("  egress:\n    allowInternal: ['127.0.0.1']\n");
    repo.write(
        &format!("fleet/vms/{vm}.yaml"),
        format!(
            "apiVersion: fleet/v1\nkind: VM\nmetadata: {{name: {vm}}}\nspec: {{provider: local, image: micro, loadout: agent, resources: {{memory: 256Mi}}}}\n"
        ),
    );
    repo.write(
        "fleet/tasks/download.yaml",
        task_yaml(
            "download",
            &vm,
            &format!(
                "  timeout: 20m\n  command: [sh, -c, \"sleep 5; unset NO_PROXY no_proxy; busybox wget -q -O - http://127.0.0.1:{port}/big | busybox wc -c\"]\n"
            ),
        ),
    );
    repo.write(
        "fleet/tasks/ticks.yaml",
        task_yaml(
            "ticks",
            &vm,
            "  timeout: 20m\n  command: [sh, -c, 'i=0; while [ ! -e /tmp/stop ] && [ $i -lt 6000 ]; do i=$((i+1)); echo tick-$i; sleep 0.1; done']\n",
        ),
    );
    repo.commit("a download and a ticking task");
    let _daemon = Daemon::start(&repo);
    let status = Status(repo.path().join(".fleet/status"));
    crate::daemon::wait_until("both tasks run", Duration::from_secs(180), || {
        status.phase("download").as_deref() == Some("Running")
            && status.output("ticks").contains("tick-")
    });
    // While the download runs (it waits 5 s for the ticks to begin), note when the tick
    // log grows.
    let started = std::time::Instant::now();
    let mut last_growth = std::time::Instant::now();
    let mut last_len = status.output("ticks").len();
    let mut worst = Duration::ZERO;
    let mut growths = 0;
    while status.phase("download").as_deref() == Some("Running") {
        assert!(
            started.elapsed() < Duration::from_secs(1200),
            "the download never ended"
        );
        let len = status.output("ticks").len();
        if len != last_len {
            growths += 1;
            worst = worst.max(last_growth.elapsed());
            last_growth = std::time::Instant::now();
            last_len = len;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    // Roughly: the task waited 5 s before it began.
    let took = started.elapsed().saturating_sub(Duration::from_secs(5));
    status.wait_phase("download", "Succeeded", Duration::from_secs(30));
    let output = status.output("download");
    assert!(
        output.contains(&(mib * 1024 * 1024).to_string()),
        "every byte arrived: {output}"
    );
    eprintln!(
        "flow: {mib} MiB through the broker in about {:.1} s ({:.1} MiB/s over virtio-serial under TCG); the ticking task's output never waited more than {} ms (a line every 100 ms)",
        took.as_secs_f64(),
        mib as f64 / took.as_secs_f64(),
        worst.as_millis()
    );
    assert!(
        growths >= 20,
        "the ticks ran alongside the download: {growths}"
    );
    assert!(
        worst < Duration::from_secs(3),
        "the download starved the other task's output for {} ms",
        worst.as_millis()
    );
    let ticks: Vec<u32> = status
        .output("ticks")
        .lines()
        .filter_map(|l| l.trim().strip_prefix("tick-")?.parse().ok())
        .collect();
    let expected: Vec<u32> = (1..=ticks.len() as u32).collect();
    assert_eq!(ticks, expected, "every line, in order, once");
}
