//! Notifications (host `notify`): a webhook receiver on loopback checks each signature and
//! sees each event once and in order, after a failure it is retried; a receiver that never
//! answers delays nothing; a host command gets each event's JSON on stdin.

use std::io::{BufReader, Write};
use std::net::TcpListener;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hmac::Mac;

use crate::daemon::{Daemon, wait_until};
use crate::support::{HttpRequest, Repo, host_yaml, set_mode, test_driver_provider};

const SECRET: &str = "a-notification-key-for-tests";

/// What a receiver took: each event's kind, and whether its signature was right.
type Taken = Arc<Mutex<Vec<(String, bool)>>>;

/// A webhook receiver: fails its first request with 500, then takes each; what it took
/// (event kind, whether the signature was right), in order.
fn receiver() -> (u16, Taken) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let taken = seen.clone();
    std::thread::spawn(move || {
        let mut first = true;
        for tcp in listener.incoming().flatten() {
            let mut reader = BufReader::new(tcp.try_clone().expect("clone"));
            let Some(request) = HttpRequest::read(&mut reader) else {
                continue;
            };
            let status = if first {
                first = false;
                "500 Internal Server Error"
            } else {
                let mut mac =
                    hmac::Hmac::<sha2::Sha256>::new_from_slice(SECRET.as_bytes()).expect("key");
                mac.update(&request.body);
                let want: String = mac
                    .finalize()
                    .into_bytes()
                    .iter()
                    .map(|b| format!("{b:02x}"))
                    .collect();
                let signed =
                    request.header("x-fleet-signature-256") == Some(format!("sha256={want}"));
                let body: serde_json::Value = serde_json::from_slice(&request.body).expect("JSON");
                taken
                    .lock()
                    .expect("lock")
                    .push((body["type"].as_str().unwrap_or_default().to_owned(), signed));
                "200 OK"
            };
            let mut tcp = tcp;
            let _ = tcp.write_all(
                format!("HTTP/1.1 {status}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                    .as_bytes(),
            );
        }
    });
    (port, seen)
}

#[test]
fn events_reach_each_sink_once_in_order_and_a_dead_one_delays_nothing() {
    let (port, seen) = receiver();
    // A receiver that takes connections and never answers.
    let silent = TcpListener::bind("127.0.0.1:0").expect("bind");
    let silent_port = silent.local_addr().expect("addr").port();
    let _held = std::thread::spawn(move || {
        let mut open = Vec::new();
        for tcp in silent.incoming().flatten() {
            open.push(tcp);
        }
    });
    let repo = Repo::new();
    let key = repo.host.path().join("notify.key");
    std::fs::write(&key, SECRET).expect("key");
    set_mode(&key, 0o600);
    let exec_out = repo.host.path().join("exec.jsonl");
    repo.host_config(&host_yaml(
        &[test_driver_provider(&repo)],
        &format!(
            "  notify:\n    - {{name: hook, url: 'http://127.0.0.1:{port}/', secretFile: '{}', events: [apply.finished, revision.refused]}}\n    - {{name: silent, url: 'http://127.0.0.1:{silent_port}/', events: [apply.finished]}}\n    - {{name: script, exec: [/bin/sh, -c, 'cat >> {}; echo >> {}'], events: [revision.refused]}}\n",
            key.display(),
            exec_out.display(),
            exec_out.display()
        ),
    ));
    repo.write(
        "fleet/fleet.yaml",
        "apiVersion: fleet/v1\nkind: Fleet\nmetadata: {name: notified}\nspec:\n  providers: [{name: local, type: libvirt}]\n  images: [{name: micro, kernel: vmlinuz, initrd: initrd.img}]\n  policy: {reconcileInterval: 1h}\n",
    )
    .write(
        "fleet/vms/a.yaml",
        "apiVersion: fleet/v1\nkind: VM\nmetadata: {name: a}\nspec: {provider: local, image: micro}\n",
    );
    let good = repo.commit("one VM");
    let started = Instant::now();
    let _daemon = Daemon::start(&repo);
    let summary = || {
        std::fs::read_to_string(repo.path().join(".fleet/status/summary.yaml")).unwrap_or_default()
    };
    wait_until("applied", Duration::from_secs(20), || {
        summary().contains(&good)
    });
    // The silent sink holds its delivery for 15 s a try; the apply did not wait for it.
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );

    repo.write("fleet/vms/b.yaml", "kind: VM\n");
    repo.commit("a broken VM file");
    wait_until(
        "the webhook took both events (the first after a retry)",
        Duration::from_secs(20),
        || seen.lock().expect("lock").len() >= 2,
    );
    let taken = seen.lock().expect("lock").clone();
    assert_eq!(
        taken,
        [
            ("apply.finished".to_owned(), true),
            ("revision.refused".to_owned(), true)
        ],
        "each once, in order, signed"
    );
    wait_until(
        "the command got the refusal",
        Duration::from_secs(10),
        || std::fs::read_to_string(&exec_out).is_ok_and(|t| t.contains("revision.refused")),
    );
    let line = std::fs::read_to_string(&exec_out).expect("exec output");
    let event: serde_json::Value =
        serde_json::from_str(line.lines().next().expect("a line")).expect("JSON on stdin");
    assert_eq!(event["type"], "revision.refused");
    assert_eq!(event["fleet"], "notified");
    let log = std::fs::read_to_string(repo.path().join(".fleet/status/notifications.jsonl"))
        .expect("delivery log");
    assert!(log.contains("\"outcome\":\"retrying\""), "{log}");
    assert!(log.contains("\"outcome\":\"delivered\""), "{log}");
}
