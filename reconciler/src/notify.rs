//! Notifications (host `notify`): events sent on as they happen, to webhooks (JSON signed
//! with HMAC-SHA256, or Slack's `{"text": …}`) and host commands (the event's JSON on
//! stdin).
//!
//! Each sink has its own bounded queue and its own worker, which delivers in order and
//! retries a failure with backoff (1 s doubling, `ATTEMPTS` tries), so a sink that is down
//! delays no other sink and never a reconcile: an event that finds a sink's queue full is
//! dropped for that sink and logged. Every attempt is a line of
//! `status/notifications.jsonl`. Events never hold a secret value (the status invariant),
//! so neither does a payload.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use hmac::{Hmac, Mac};
use secrecy::{ExposeSecret, SecretString};
use serde_json::json;
use tokio::sync::mpsc;

use crate::http::Metrics;
use crate::spec::{HostNotify, NotifyFormat};
use crate::status::{Event, EventKind, EventListener, StatusDir};

/// Events waiting per sink before new ones are dropped.
const QUEUE: usize = 1024;
/// Tries per event and sink.
const ATTEMPTS: u32 = 6;
/// How long one delivery may take.
const TIMEOUT: Duration = Duration::from_secs(15);

/// The kinds a sink gets when it names none: what needs a person.
pub const DEFAULT_EVENTS: &[EventKind] = &[
    EventKind::ApplyFinished,
    EventKind::RevisionRefused,
    EventKind::StepFailed,
    EventKind::VmDrifted,
    EventKind::HitlPrompt,
    EventKind::ApprovalRequested,
    EventKind::TaskFinished,
    EventKind::PreviewPlanned,
    EventKind::Suspended,
    EventKind::Resumed,
    EventKind::SourceRewound,
];

enum Target {
    Webhook {
        url: String,
        format: NotifyFormat,
        secret: Option<SecretString>,
        http: reqwest::Client,
    },
    Exec(Vec<String>),
}

struct Sink {
    name: String,
    kinds: Vec<EventKind>,
    queue: mpsc::Sender<Event>,
}

/// Starts a worker per sink and returns the listener that feeds them (`None` without
/// sinks). Errors name the sink and what is wrong with it.
pub fn start(
    sinks: &[HostNotify],
    status: &StatusDir,
    metrics: &Arc<Metrics>,
) -> Result<Option<EventListener>> {
    if sinks.is_empty() {
        return Ok(None);
    }
    let mut fed = Vec::new();
    for sink in sinks {
        let kinds = if sink.events.is_empty() {
            DEFAULT_EVENTS.to_vec()
        } else {
            sink.events
                .iter()
                .map(|name| {
                    EventKind::ALL
                        .iter()
                        .copied()
                        .find(|k| k.as_str() == name)
                        .with_context(|| {
                            format!(
                                "notify {}: no event kind {name:?} (fleet events --kind lists them)",
                                sink.name
                            )
                        })
                })
                .collect::<Result<_>>()?
        };
        let target = target(sink)?;
        let (queue, receiver) = mpsc::channel(QUEUE);
        tokio::spawn(deliver(
            sink.name.clone(),
            target,
            receiver,
            status.clone(),
            metrics.clone(),
        ));
        fed.push(Sink {
            name: sink.name.clone(),
            kinds,
            queue,
        });
    }
    let status = status.clone();
    let metrics = metrics.clone();
    Ok(Some(EventListener(Arc::new(move |event: &Event| {
        for sink in &fed {
            if !sink.kinds.contains(&event.kind) {
                continue;
            }
            if sink.queue.try_send(event.clone()).is_err() {
                metrics.count_delivery(&sink.name, "dropped");
                let _ = status.append_line(
                    "notifications.jsonl",
                    &json!({"time": event.time, "sink": sink.name, "event": event.kind.as_str(), "outcome": "dropped", "why": "its queue is full"}),
                );
            }
        }
    }))))
}

fn target(sink: &HostNotify) -> Result<Target> {
    if let Some(url) = &sink.url {
        let secret = sink
            .secret_file
            .as_ref()
            .map(|path| -> Result<SecretString> {
                let path = PathBuf::from(&path.0);
                crate::secrets::check_private_file(&path).map_err(anyhow::Error::msg)?;
                let text = std::fs::read_to_string(&path)
                    .with_context(|| format!("notify {}: reading {}", sink.name, path.display()))?;
                Ok(SecretString::from(text.trim().to_owned()))
            })
            .transpose()?;
        let _ = rustls::crypto::ring::default_provider().install_default();
        let mut builder = reqwest::Client::builder()
            .timeout(TIMEOUT)
            .connect_timeout(Duration::from_secs(10))
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("fleet/", env!("CARGO_PKG_VERSION")))
            .no_proxy();
        if let Some(ca) = &sink.ca_file {
            let pem = std::fs::read(&ca.0)
                .with_context(|| format!("notify {}: reading {}", sink.name, ca.0))?;
            let certs = reqwest::Certificate::from_pem_bundle(&pem)
                .with_context(|| format!("notify {}: {} holds no certificate", sink.name, ca.0))?;
            builder = builder.tls_certs_only(certs);
        }
        let http = builder
            .build()
            .with_context(|| format!("notify {}: an HTTP client", sink.name))?;
        Ok(Target::Webhook {
            url: url.clone(),
            format: sink.format.unwrap_or(NotifyFormat::Json),
            secret,
            http,
        })
    } else {
        Ok(Target::Exec(sink.exec.clone()))
    }
}

/// One sink's worker: its events in order, each tried until delivered or out of tries.
async fn deliver(
    name: String,
    target: Target,
    mut queue: mpsc::Receiver<Event>,
    status: StatusDir,
    metrics: Arc<Metrics>,
) {
    while let Some(event) = queue.recv().await {
        // The fleet's name as the status says now (a first revision names it).
        let fleet = status.read_summary().map(|s| s.fleet).unwrap_or_default();
        let mut payload = serde_json::to_value(&event).unwrap_or_default();
        payload["fleet"] = json!(fleet);
        let body = match &target {
            Target::Webhook {
                format: NotifyFormat::Slack,
                ..
            } => json!({ "text": slack_escaped(&format!("fleet {fleet}: [{}] {}", event.kind.as_str(), event.message)) }),
            _ => payload,
        }
        .to_string();
        let mut wait = Duration::from_secs(1);
        for attempt in 1..=ATTEMPTS {
            let outcome = match &target {
                Target::Webhook {
                    url, secret, http, ..
                } => post(http, url, secret.as_ref(), &event, &body).await,
                Target::Exec(argv) => run(argv.clone(), body.clone()).await,
            };
            let done = outcome.is_ok();
            let verdict = match (&outcome, attempt) {
                (Ok(()), _) => "delivered",
                (Err(_), a) if a < ATTEMPTS => "retrying",
                _ => "failed",
            };
            metrics.count_delivery(&name, verdict);
            let _ = status.append_line(
                "notifications.jsonl",
                &json!({
                    "time": crate::time::Timestamp::from(std::time::SystemTime::now()),
                    "sink": name,
                    "event": event.kind.as_str(),
                    "eventTime": event.time,
                    "attempt": attempt,
                    "outcome": verdict,
                    "why": outcome.err(),
                }),
            );
            if done {
                break;
            }
            if attempt < ATTEMPTS {
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_secs(60));
            }
        }
    }
}

/// Text Slack shows as written: its three control characters escaped, so an event's text
/// (a guest's prompt, a ref name) cannot mention a channel or make a link.
fn slack_escaped(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

async fn post(
    http: &reqwest::Client,
    url: &str,
    secret: Option<&SecretString>,
    event: &Event,
    body: &str,
) -> Result<(), String> {
    let mut request = http
        .post(url)
        .header("content-type", "application/json")
        .header("x-fleet-event", event.kind.as_str())
        .body(body.to_owned());
    if let Some(secret) = secret {
        let mut mac = Hmac::<sha2::Sha256>::new_from_slice(secret.expose_secret().as_bytes())
            .expect("HMAC takes any key");
        mac.update(body.as_bytes());
        request = request.header(
            "x-fleet-signature-256",
            format!(
                "sha256={}",
                fleet_core::digest::hex(&mac.finalize().into_bytes())
            ),
        );
    }
    match request.send().await {
        Ok(reply) if reply.status().is_success() => Ok(()),
        Ok(reply) => Err(format!("HTTP {}", reply.status().as_u16())),
        // Without the URL: a webhook's URL is often its secret (Slack's is).
        Err(e) => Err(format!("{}", e.without_url())),
    }
}

/// Runs a host command with the event on stdin, an empty environment and `TIMEOUT`.
async fn run(argv: Vec<String>, body: String) -> Result<(), String> {
    tokio::task::spawn_blocking(move || {
        use std::io::Write;
        use std::os::unix::process::CommandExt;
        let mut child = std::process::Command::new(&argv[0])
            .args(&argv[1..])
            .env_clear()
            .env("PATH", "/usr/bin:/bin")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            // Its own group: a timeout ends what it started too.
            .process_group(0)
            .spawn()
            .map_err(|e| format!("cannot run {}: {e}", argv[0]))?;
        // Written aside: a command that never reads its stdin must not hold the worker.
        if let Some(mut stdin) = child.stdin.take() {
            std::thread::spawn(move || {
                let _ = stdin.write_all(body.as_bytes());
            });
        }
        let started = std::time::Instant::now();
        loop {
            match child.try_wait() {
                Ok(Some(status)) if status.success() => return Ok(()),
                Ok(Some(status)) => return Err(format!("{} exited with {status}", argv[0])),
                Ok(None) if started.elapsed() < TIMEOUT => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                _ => {
                    if let Ok(group) = i32::try_from(child.id()) {
                        let _ = nix::sys::signal::killpg(
                            nix::unistd::Pid::from_raw(group),
                            nix::sys::signal::Signal::SIGKILL,
                        );
                    }
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(format!(
                        "{} took longer than {} s",
                        argv[0],
                        TIMEOUT.as_secs()
                    ));
                }
            }
        }
    })
    .await
    .map_err(|e| format!("the command panicked: {e}"))?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slack_text_cannot_mention_or_link() {
        assert_eq!(
            slack_escaped("refs/heads/<!channel> & <https://x|y>"),
            "refs/heads/&lt;!channel&gt; &amp; &lt;https://x|y&gt;"
        );
    }
}
