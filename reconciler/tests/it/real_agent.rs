//! A real coding agent, end to end: the Claude Code CLI from the agent image (`make
//! image-agent`), in a real VM under TCG with brokered egress, works on a checkout of a
//! repository on the host and its commit comes back as a pushed branch. The model is a
//! scripted Anthropic Messages API on the host's loopback (TLS from a test authority, the
//! name pinned by the host configuration), so no traffic leaves the machine; the key it
//! checks exists only on the host.
//!
//! Needs the agent image: `FLEET_TEST_AGENT=1` makes its absence a failure (CI), otherwise
//! the test is skipped without it.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::path::PathBuf;
use std::sync::mpsc::Receiver;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::daemon::{Daemon, read, wait_until};
use crate::libvirt::{Cleanup, enabled};
use crate::support::{Repo, host_yaml, local_provider};
use crate::tasks::{Status, task_yaml};

/// The agent image's directory when it was built (`build/image-agent`).
fn agent_image() -> Option<PathBuf> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../build/image-agent");
    let built = dir.join("debian.qcow2").is_file();
    if !built && std::env::var_os("FLEET_TEST_AGENT").is_some_and(|v| v == "1") {
        panic!("FLEET_TEST_AGENT=1 but the agent image is missing: run `make image-agent`");
    }
    built.then(|| dir.canonicalize().expect("the agent image's directory"))
}

/// A request the model API received.
#[derive(Debug)]
struct ModelRequest {
    /// Method and path.
    line: String,
    /// Whether `x-api-key` was the real key.
    real_key: bool,
    body: String,
    /// When its head arrived.
    at: Instant,
}

/// The marker in the task's prompt that makes the scripted model act.
const MARKER: &str = "fleet-e2e";

/// A scripted Anthropic Messages API serving `api.anthropic.com` over TLS on loopback: its
/// port, the test authority's PEM, and the requests it received. Asked with the marker
/// and tools, it answers with a Bash tool call that writes `hello.txt`; given that call's
/// result, with a final message; anything else (a title, a quota check), with "ok". Streamed
/// (server-sent events) or not, as asked.
fn fake_anthropic(key: String) -> (u16, String, Receiver<ModelRequest>) {
    let (config, ca_pem) = crate::egress::test_tls("api.anthropic.com");
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let (tx, requests) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for tcp in listener.incoming().flatten() {
            let (config, key, tx) = (config.clone(), key.clone(), tx.clone());
            std::thread::spawn(move || {
                let Ok(conn) = rustls::ServerConnection::new(config) else {
                    return;
                };
                let mut tls = BufReader::new(rustls::StreamOwned::new(conn, tcp));
                let Some(request) = read_request(&mut tls, &key) else {
                    return;
                };
                let (status, content_type, body) = answer(&request);
                let _ = tx.send(request);
                let tls = tls.get_mut();
                let _ = tls.write_all(
                    format!(
                        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                        body.len()
                    )
                    .as_bytes(),
                );
                tls.conn.send_close_notify();
                let _ = tls.flush();
            });
        }
    });
    (port, ca_pem, requests)
}

/// One request to the model API, and whether it carried `key`.
fn read_request(conn: &mut impl BufRead, key: &str) -> Option<ModelRequest> {
    let request = crate::support::HttpRequest::read(conn)?;
    let at = Instant::now();
    Some(ModelRequest {
        at,
        real_key: request.header("x-api-key").as_deref() == Some(key),
        line: request.line.rsplit_once(' ')?.0.to_owned(),
        body: String::from_utf8_lossy(&request.body).into_owned(),
    })
}

/// The scripted model's answer: status, content type, body.
fn answer(request: &ModelRequest) -> (&'static str, &'static str, String) {
    if !request.line.starts_with("POST /v1/messages") {
        return ("404 Not Found", "application/json", "{}".into());
    }
    if request.line.starts_with("POST /v1/messages/count_tokens") {
        return ("200 OK", "application/json", "{\"input_tokens\":12}".into());
    }
    let asked: Value = serde_json::from_str(&request.body).unwrap_or(Value::Null);
    let stream = asked["stream"].as_bool().unwrap_or(false);
    let model = asked["model"].as_str().unwrap_or("claude-fake").to_owned();
    let has_tools = asked["tools"].as_array().is_some_and(|t| !t.is_empty());
    let content = if request.body.contains("tool_result") {
        json!({"type": "text", "text": "Wrote hello.txt."})
    } else if has_tools && request.body.contains(MARKER) {
        json!({
            "type": "tool_use",
            "id": "toolu_fleet_1",
            "name": "Bash",
            "input": {
                "command": "printf 'hello from claude\\n' > hello.txt",
                "description": "Write hello.txt"
            }
        })
    } else {
        json!({"type": "text", "text": "ok"})
    };
    let stop = if content["type"] == "tool_use" {
        "tool_use"
    } else {
        "end_turn"
    };
    let usage = json!({"input_tokens": 40, "output_tokens": 25});
    if !stream {
        let message = json!({
            "id": "msg_fleet", "type": "message", "role": "assistant", "model": model,
            "content": [content], "stop_reason": stop, "stop_sequence": null, "usage": usage
        });
        return ("200 OK", "application/json", message.to_string());
    }
    let start_block = if content["type"] == "tool_use" {
        json!({"type": "tool_use", "id": content["id"], "name": content["name"], "input": {}})
    } else {
        json!({"type": "text", "text": ""})
    };
    let delta = if content["type"] == "tool_use" {
        json!({"type": "input_json_delta", "partial_json": content["input"].to_string()})
    } else {
        json!({"type": "text_delta", "text": content["text"]})
    };
    let events = [
        (
            "message_start",
            json!({"type": "message_start", "message": {
                "id": "msg_fleet", "type": "message", "role": "assistant", "model": model,
                "content": [], "stop_reason": null, "stop_sequence": null,
                "usage": {"input_tokens": 40, "output_tokens": 1}
            }}),
        ),
        (
            "content_block_start",
            json!({"type": "content_block_start", "index": 0, "content_block": start_block}),
        ),
        (
            "content_block_delta",
            json!({"type": "content_block_delta", "index": 0, "delta": delta}),
        ),
        (
            "content_block_stop",
            json!({"type": "content_block_stop", "index": 0}),
        ),
        (
            "message_delta",
            json!({"type": "message_delta", "delta": {"stop_reason": stop, "stop_sequence": null},
                   "usage": {"output_tokens": 25}}),
        ),
        ("message_stop", json!({"type": "message_stop"})),
    ];
    let body = events
        .iter()
        .map(|(name, data)| format!("event: {name}\ndata: {data}\n\n"))
        .collect();
    ("200 OK", "text/event-stream", body)
}

fn git(dir: &std::path::Path, args: &[&str]) -> String {
    let out = std::process::Command::new("git")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("git");
    assert!(
        out.status.success(),
        "git {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A fleet with one VM booted from the agent image, brokered, whose loadout injects the
/// key of the scripted model API, and the task `hello` (its `agent` spec given) on a
/// checkout of a repository on the host, its results pushed to a bare repository.
struct AgentFleet {
    repo: Repo,
    daemon: Daemon,
    status: Status,
    requests: Receiver<ModelRequest>,
    canary: String,
    review: tempfile::TempDir,
    _keys: tempfile::TempDir,
    _app: tempfile::TempDir,
    _cleanup: Cleanup,
}

impl AgentFleet {
    /// `None` when the test cannot run here (no libvirt, or no agent image).
    fn start(name: &str, agent: &str) -> Option<AgentFleet> {
        if !enabled() {
            return None;
        }
        let Some(image) = agent_image() else {
            eprintln!(
                "skipped: no agent image (make image-agent, or FLEET_TEST_AGENT=1 to require it)"
            );
            return None;
        };
        use crate::secrets::{age_identity, random_hex, secret_set};
        let prefix = format!("it{}-{name}-", std::process::id());
        let cleanup = Cleanup {
            prefix: prefix.clone(),
        };
        let vm = format!("{prefix}a");
        let keys = tempfile::tempdir().expect("tempdir");
        let (identity, recipient) = age_identity(keys.path(), "age.key");
        let canary = format!("fleetcanary{}", random_hex(12));
        let (port, ca_pem, requests) = fake_anthropic(canary.clone());
        let ca_file = keys.path().join("test-ca.pem");
        std::fs::write(&ca_file, ca_pem).expect("write CA");

        // The repository the agent works on, and the bare one its branch is pushed to.
        let app = tempfile::tempdir().expect("tempdir");
        crate::tasks::app_repository(app.path());
        let review = tempfile::tempdir().expect("tempdir");
        git(review.path(), &["init", "-q", "--bare"]);

        let repo = Repo::new();
        repo.host_config(&host_yaml(
            &[local_provider(repo.path())],
            &format!(
                "  imageRoot: '{}'\n  pushes: ['file:///**']\n  recipients: [{recipient}]\n  egress:\n    hosts: {{api.anthropic.com: 127.0.0.1}}\n    caFiles: [{}]\n    allowInternal: ['127.0.0.1']\n",
                image.parent().expect("build").display(),
                ca_file.display()
            ),
        ));
        repo.write(
            "fleet/fleet.yaml",
            format!(
                "apiVersion: fleet/v1\nkind: Fleet\nmetadata: {{name: it{}{name}}}\nspec:\n  providers:\n    - {{name: local, type: libvirt, domainType: qemu}}\n  images:\n    - {{name: agent, disk: image-agent/debian.qcow2, kernel: image-agent/vmlinuz, initrd: image-agent/initrd.img, cmdline: 'root=/dev/vda rw console=ttyS0'}}\n  policy: {{shutdownTimeout: 10s, reconcileInterval: 30s, stepTimeout: 5m}}\n",
                std::process::id()
            ),
        );
        secret_set(&repo, "anthropic", "api_key", &canary);
        repo.allow_secret(
            "anthropic",
            &format!("{{hosts: ['api.anthropic.com:{port}'], loadouts: [coder]}}"),
        );
        repo.write(
            "fleet/loadouts/coder.yaml",
            format!(
                "apiVersion: fleet/v1\nkind: Loadout\nmetadata: {{name: coder}}\nspec:\n  network: {{mode: brokered}}\n  egress:\n    credentials:\n      - {{host: api.anthropic.com, port: {port}, header: x-api-key, secret: {{secret: anthropic, key: api_key}}}}\n"
            ),
        );
        repo.write(
            &format!("fleet/vms/{vm}.yaml"),
            format!(
                "apiVersion: fleet/v1\nkind: VM\nmetadata: {{name: {vm}}}\nspec: {{provider: local, image: agent, loadout: coder, resources: {{memory: 2Gi, cpus: 2}}}}\n"
            ),
        );
        repo.write(
            "fleet/tasks/hello.yaml",
            task_yaml(
                "hello",
                &vm,
                &format!(
                    "  agent: {agent}\n  repository: {{url: 'file://{}', branch: main}}\n  git: {{author: {{name: Fleet Coder, email: coder@fleet.invalid}}}}\n  results: {{push: {{url: 'file://{}'}}}}\n  timeout: 20m\n",
                    app.path().display(),
                    review.path().display()
                ),
            ),
        );
        repo.commit("a coding agent with its key on the host");
        crate::support::Run(repo.fleet(&["validate"]).0).expect_code(0);
        let identity_env = identity.to_str().expect("utf8").to_owned();
        let daemon = Daemon::start_with(&repo, &[("FLEET_AGE_IDENTITY", &identity_env)], &["-v"]);
        let status = Status(repo.path().join(".fleet/status"));
        Some(AgentFleet {
            repo,
            daemon,
            status,
            requests,
            canary,
            review,
            _keys: keys,
            _app: app,
            _cleanup: cleanup,
        })
    }

    /// What the run's results brought back: the branch's `hello.txt` and author.
    fn pushed(&self) -> (String, String) {
        wait_until(
            "the run's results are pushed",
            Duration::from_secs(90),
            || self.status.task("hello").contains("pushed: "),
        );
        let record = self.status.task("hello");
        let run = crate::tasks::field(&record, "run").expect("a run");
        let branch = format!("fleet/hello/{run}");
        (
            git(
                self.review.path(),
                &["show", &format!("{branch}:hello.txt")],
            ),
            git(
                self.review.path(),
                &["log", "-1", "--format=%an <%ae>", &branch],
            )
            .trim()
            .to_owned(),
        )
    }

    /// Neither fleet's log nor anything under `.fleet` holds the key.
    fn key_stayed_in_memory(self) {
        let log = self
            .daemon
            .log
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let dot_fleet = self.repo.path().join(".fleet");
        drop(self.daemon);
        assert!(!log.contains(&self.canary), "the key is in fleet's logs");
        assert_eq!(
            crate::secrets::files_containing(&dot_fleet, self.canary.as_bytes()),
            Vec::<PathBuf>::new()
        );
    }
}

#[test]
fn claude_code_edits_a_checkout_in_a_vm_and_its_commit_comes_back_as_a_branch() {
    let Some(fleet) = AgentFleet::start(
        "agent",
        &format!("{{kind: claude, prompt: 'Write hello.txt ({MARKER}).'}}"),
    ) else {
        return;
    };
    let status = &fleet.status;
    // A Debian boot and Claude Code's start, both under emulation: minutes.
    wait_until("the agent's task ends", Duration::from_secs(900), || {
        status.task("hello").contains("exitCode:")
    });
    let record = status.task("hello");
    let output = status.output("hello");
    let seen: Vec<ModelRequest> = fleet.requests.try_iter().collect();
    eprintln!(
        "the model was asked: {:?}\nthe agent printed: {output}",
        seen.iter().map(|r| &r.line).collect::<Vec<_>>()
    );
    assert!(
        record.contains("phase: Succeeded"),
        "{record}\noutput: {output}\nrequests: {seen:#?}\nevents: {}",
        read(&status.0.join("events.jsonl"))
    );
    // The CLI asked the model, acted on its tool call, and reported the final answer.
    assert!(
        seen.iter().any(|r| r.body.contains(MARKER)),
        "the prompt reached the model: {seen:#?}"
    );
    assert!(
        seen.iter().any(|r| r.body.contains("tool_result")),
        "the tool call's result went back: {seen:#?}"
    );
    assert!(output.contains("Wrote hello.txt."), "{output}");
    // Every request carried the real key, written by the broker: the guest held only the
    // placeholder.
    assert!(seen.iter().all(|r| r.real_key), "{seen:#?}");
    assert!(
        !output.contains(&fleet.canary),
        "the key reached the guest: {output}"
    );

    // The edit came back as a commit on the run's branch, by the task's author.
    let (hello, author) = fleet.pushed();
    assert_eq!(hello, "hello from claude\n");
    assert_eq!(author, "Fleet Coder <coder@fleet.invalid>");
    // Only the agent's edit: what the CLI keeps in its home stays out of the checkout.
    let record = status.task("hello");
    assert!(record.contains("filesChanged: 1"), "{record}");
    let patch = read(&status.0.join("tasks/hello/changes.patch"));
    assert!(patch.contains("+hello from claude"), "{patch}");
    fleet.key_stayed_in_memory();
}

/// A terminal interface's output as text, without escape sequences or white space (it
/// moves the cursor between words rather than printing spaces).
fn squeezed(raw: &str) -> String {
    let mut out = String::new();
    let mut chars = raw.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\u{1b}' => match chars.next() {
                // CSI: parameters, then one final byte.
                Some('[') => {
                    for c in chars.by_ref() {
                        if ('@'..='~').contains(&c) {
                            break;
                        }
                    }
                }
                // OSC: to BEL or ESC \.
                Some(']') => {
                    while let Some(c) = chars.next() {
                        if c == '\u{7}' || (c == '\u{1b}' && chars.next_if_eq(&'\\').is_some()) {
                            break;
                        }
                    }
                }
                Some('(' | ')') => {
                    chars.next();
                }
                _ => {}
            },
            c if c.is_whitespace() || c.is_control() => {}
            c => out.push(c),
        }
    }
    out
}

#[test]
fn claude_codes_own_interface_asks_and_a_committed_answer_lets_it_act() {
    let Some(fleet) = AgentFleet::start(
        "tui",
        &format!("{{kind: claude, interactive: true, prompt: 'Write hello.txt ({MARKER}).'}}"),
    ) else {
        return;
    };
    let status = &fleet.status;
    let dump = || {
        format!(
            "record: {}\noutput: {}\nevents: {}",
            status.task("hello"),
            status.output("hello"),
            read(&status.0.join("events.jsonl"))
        )
    };
    // Its permission question for the tool call, as a prompt with the menu's choices.
    let deadline = std::time::Instant::now() + Duration::from_secs(900);
    let asked = loop {
        let found = status
            .prompts("hello")
            .into_iter()
            .find(|id| status.prompt(id).contains("Do you want to proceed?"));
        if let Some(id) = found {
            break id;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no permission prompt: {}",
            dump()
        );
        std::thread::sleep(Duration::from_millis(500));
    };
    let prompt = status.prompt(&asked);
    assert!(prompt.contains("options:"), "{prompt}");
    assert!(
        prompt.contains("- 'Yes'") || prompt.contains("- Yes"),
        "{prompt}"
    );
    assert!(
        !squeezed(&status.output("hello")).contains("Wrotehello.txt."),
        "it acted before it was answered: {}",
        dump()
    );
    // A committed Answer choosing yes lets it run the command.
    fleet.repo.write(
        &format!("fleet/hitl/{asked}.yaml"),
        format!(
            "apiVersion: fleet/v1\nkind: Answer\nmetadata: {{name: {asked}}}\nspec: {{response: 'yes'}}\n"
        ),
    );
    fleet.repo.commit("yes, write hello.txt");
    let went_on = std::time::Instant::now() + Duration::from_secs(300);
    while !squeezed(&status.output("hello")).contains("Wrotehello.txt.") {
        assert!(
            std::time::Instant::now() < went_on,
            "the agent did not go on: {}\nthe prompt: {}",
            dump(),
            status.prompt(&asked)
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    // The prompt took its answer; a second one is refused.
    let again = crate::support::Run(fleet.repo.fleet(&["hitl", "answer", &asked, "no"]).0);
    assert_ne!(again.code(), 0, "a second answer was taken");
    assert!(
        again.stderr().contains("already answered"),
        "{}",
        again.stderr()
    );
    // Its interface waits for the next instruction: told to exit, it ends, and the edit
    // comes back as a branch.
    let idle = loop {
        let found = status
            .prompts("hello")
            .into_iter()
            .find(|id| id != &asked && status.prompt(id).contains("state: pending"));
        if let Some(id) = found {
            break id;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no idle prompt: {}",
            dump()
        );
        std::thread::sleep(Duration::from_millis(500));
    };
    crate::support::Run(fleet.repo.fleet(&["hitl", "answer", &idle, "/exit"]).0).expect_code(0);
    wait_until("the agent exits", Duration::from_secs(120), || {
        status.task("hello").contains("exitCode:")
    });
    let (hello, _) = fleet.pushed();
    assert_eq!(hello, "hello from claude\n");
    let seen: Vec<ModelRequest> = fleet.requests.try_iter().collect();
    assert!(seen.iter().all(|r| r.real_key), "{seen:#?}");
    fleet.key_stayed_in_memory();
}

/// Not a test: `make bench-agent` runs it to print where the time goes between a commit and
/// the real agent's branch (the daemon and tests are debug builds; the guest's side runs
/// under emulation, which dominates).
#[test]
#[ignore = "a benchmark: make bench-agent"]
fn bench_dispatch_to_first_request_and_exit_to_pushed_branch() {
    let started = Instant::now();
    let Some(fleet) = AgentFleet::start(
        "bench",
        &format!("{{kind: claude, prompt: 'Write hello.txt ({MARKER}).'}}"),
    ) else {
        return;
    };
    let status = &fleet.status;
    let phase = || status.phase("hello").unwrap_or_default();
    let moment = |what: &str, done: &dyn Fn() -> bool| {
        let deadline = Instant::now() + Duration::from_secs(900);
        while !done() {
            assert!(Instant::now() < deadline, "timed out waiting until {what}");
            std::thread::sleep(Duration::from_millis(20));
        }
        Instant::now()
    };
    // Staging: the VM's agent is up and the checkout is on its way.
    let dispatched = moment("the task is dispatched", &|| {
        !matches!(phase().as_str(), "" | "Pending")
    });
    let first = fleet
        .requests
        .recv_timeout(Duration::from_secs(600))
        .expect("the agent asks the model");
    // Its last line: the record's exit code is written with the results, not before.
    let exited = moment("the agent's last line", &|| {
        status.output("hello").contains("Wrote hello.txt.")
    });
    let pushed = moment("its branch is pushed", &|| {
        status.task("hello").contains("pushed: ")
    });
    assert!(status.task("hello").contains("phase: Succeeded"));
    let s = |d: Duration| d.as_secs_f64();
    println!(
        "real agent on libvirt (TCG, agent image): commit to dispatch (VM created and booted) {:.1} s; dispatch to Claude Code's first API request {:.1} s; its last line to its pushed branch {:.2} s (status files polled every 20 ms)",
        s(dispatched - started),
        s(first.at.saturating_duration_since(dispatched)),
        s(pushed - exited),
    );
    fleet.key_stayed_in_memory();
}
