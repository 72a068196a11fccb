//! A thin typed client for the few Proxmox VE API calls fleet makes.
//!
//! Authentication is an API token (`Authorization: PVEAPIToken=<id>=<secret>`): no ticket to
//! renew, no CSRF token, and the token's privileges can be limited to fleet's needs. TLS is
//! always verified (against the system store or a given CA file) unless the provider says
//! `insecureSkipVerify: true`, which plans and the status page then show.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use secrecy::{ExposeSecret, SecretString};
use serde::de::DeserializeOwned;

use crate::driver::{DriverError, ErrorKind};

/// How long one HTTP request may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// The largest API answer read (a cluster of thousands of VMs lists in a few MiB).
const MAX_BODY_BYTES: usize = 32 * 1024 * 1024;

/// What a failed call means, read from PVE's answer here and nowhere else: the driver
/// decides on these, never on PVE's wording.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PveCondition {
    /// The VM, config file or task is not there.
    NotFound,
    /// The VMID (or another name) is taken.
    AlreadyExists,
    /// The config changed since it was read (the `digest` did not match).
    DigestMismatch,
    /// A lock, timeout, missing quorum or network trouble: worth another try.
    Busy,
    AlreadyRunning,
    NotRunning,
    /// The template's storage cannot make linked clones.
    LinkedCloneUnsupported,
    /// Refused for a reason fleet does not act on (validation, privileges, …).
    Other,
}

impl PveCondition {
    /// PVE's wording of a failure, classified. The conditions that decide what apply may do
    /// (missing, taken, changed, busy) are read first, so a message that also mentions a
    /// power state keeps the kind it always had.
    pub fn of_message(message: &str) -> PveCondition {
        let m = message.to_ascii_lowercase();
        if m.contains("does not exist") || m.contains("no such vm") {
            PveCondition::NotFound
        } else if m.contains("checksum mismatch") {
            PveCondition::DigestMismatch
        } else if m.contains("already exists") {
            PveCondition::AlreadyExists
        } else if m.contains("can't lock file")
            || m.contains("got timeout")
            || m.contains("is locked")
            || m.contains("no quorum")
            || m.contains("cluster not ready")
            || m.contains("temporarily")
            || m.contains("connection")
        {
            PveCondition::Busy
        } else if m.contains("linked clone feature is not supported") {
            PveCondition::LinkedCloneUnsupported
        } else if m.contains("already running") {
            PveCondition::AlreadyRunning
        } else if m.contains("not running") {
            PveCondition::NotRunning
        } else {
            PveCondition::Other
        }
    }

    /// What apply may do about it.
    pub fn kind(self) -> ErrorKind {
        match self {
            PveCondition::NotFound => ErrorKind::NotFound,
            PveCondition::AlreadyExists | PveCondition::DigestMismatch => ErrorKind::Conflict,
            PveCondition::Busy => ErrorKind::Transient,
            PveCondition::AlreadyRunning
            | PveCondition::NotRunning
            | PveCondition::LinkedCloneUnsupported
            | PveCondition::Other => ErrorKind::Permanent,
        }
    }
}

/// A failed API call: what it means, what apply may do about it, and the words for people.
#[derive(Debug)]
pub struct PveError {
    pub condition: PveCondition,
    pub kind: ErrorKind,
    pub message: String,
}

impl PveError {
    fn new(condition: PveCondition, kind: ErrorKind, message: String) -> PveError {
        PveError {
            condition,
            kind,
            message,
        }
    }

    /// A failure that is not PVE's answer (the network, a refused or unreadable answer).
    fn local(kind: ErrorKind, message: String) -> PveError {
        PveError::new(PveCondition::Other, kind, message)
    }
}

impl std::fmt::Display for PveError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl From<PveError> for DriverError {
    fn from(e: PveError) -> DriverError {
        DriverError::new(e.kind, e.message)
    }
}

/// A websocket upgraded from an API request (a console).
pub type WebSocket = tokio_tungstenite::WebSocketStream<reqwest::Upgraded>;

/// Random bytes for a websocket key (it need not be secret, only fresh).
fn rand_bytes() -> [u8; 16] {
    let id = uuid::Uuid::new_v4();
    *id.as_bytes()
}

/// A Proxmox VE API endpoint with its credentials.
pub struct PveClient {
    /// `https://host:port/api2/json`.
    base: String,
    /// The whole `Authorization` header value.
    auth: SecretString,
    http: reqwest::Client,
    /// The runtime requests run on: the caller's (driver methods run on blocking threads,
    /// which may wait on it), or a private one when there is none.
    runtime: tokio::runtime::Handle,
    _own_runtime: Option<tokio::runtime::Runtime>,
    calls: AtomicU64,
}

/// How the client trusts the API's certificate.
pub enum Trust {
    /// The system's trust store.
    System,
    /// Only the certificates in this PEM bundle.
    CaPem(Vec<u8>),
    /// Anything (`insecureSkipVerify: true`).
    Insecure,
}

/// A task (UPID) as `GET /nodes/{node}/tasks/{upid}/status` shows it.
#[derive(Debug, serde::Deserialize)]
struct TaskStatus {
    status: String,
    #[serde(default)]
    exitstatus: Option<String>,
}

/// Why fleet has no client for a Proxmox provider (before any request is made).
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("API token: {0}")]
    Token(#[from] TokenError),
    #[error("read CA file {}: {source}", path.display())]
    CaFile {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("CA file is not a PEM bundle: {0}")]
    CaPem(reqwest::Error),
    #[error("CA file holds no certificate")]
    NoCertificate,
    #[error("HTTP client for {endpoint}: {source}")]
    Http {
        endpoint: String,
        source: reqwest::Error,
    },
    #[error("runtime for the API client: {0}")]
    Runtime(std::io::Error),
}

/// Why the API token's secret could not be had from where the host configuration says.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("{0}")]
    Secret(String),
    #[error("secret {secret}/{key} is not in this revision")]
    NotInRevision { secret: String, key: String },
    #[error("the secret's value is not UTF-8")]
    NotUtf8,
    #[error(transparent)]
    File(#[from] crate::secrets::SecretError),
    #[error("read {}: {source}", path.display())]
    Read {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("environment variable {0} is not set")]
    Env(String),
    #[error("set one of secret, file and env")]
    Unset,
    #[error("the secret is empty")]
    Empty,
}

impl PveClient {
    pub fn new(
        endpoint: &str,
        token_id: &str,
        token_secret: &SecretString,
        trust: Trust,
    ) -> Result<PveClient, ClientError> {
        // reqwest is built without a default crypto provider (ring is lighter to build than
        // aws-lc); installing it twice is harmless.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let mut builder = reqwest::Client::builder()
            .timeout(REQUEST_TIMEOUT)
            .connect_timeout(Duration::from_secs(10))
            .user_agent(concat!("fleet/", env!("CARGO_PKG_VERSION")))
            // A proxy from the environment must not see the API token.
            .no_proxy();
        builder = match trust {
            Trust::System => builder,
            Trust::CaPem(pem) => {
                let certs =
                    reqwest::Certificate::from_pem_bundle(&pem).map_err(ClientError::CaPem)?;
                if certs.is_empty() {
                    return Err(ClientError::NoCertificate);
                }
                builder.tls_certs_only(certs)
            }
            Trust::Insecure => builder.tls_danger_accept_invalid_certs(true),
        };
        let http = builder.build().map_err(|source| ClientError::Http {
            endpoint: endpoint.to_owned(),
            source,
        })?;
        let (runtime, own_runtime) = match tokio::runtime::Handle::try_current() {
            Ok(handle) => (handle, None),
            Err(_) => {
                let rt = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(1)
                    .enable_all()
                    .build()
                    .map_err(ClientError::Runtime)?;
                (rt.handle().clone(), Some(rt))
            }
        };
        Ok(PveClient {
            runtime,
            _own_runtime: own_runtime,
            base: format!("{}/api2/json", endpoint.trim_end_matches('/')),
            auth: SecretString::from(format!(
                "PVEAPIToken={token_id}={}",
                token_secret.expose_secret()
            )),
            http,
            calls: AtomicU64::new(0),
        })
    }

    pub fn calls(&self) -> u64 {
        self.calls.load(Ordering::Relaxed)
    }

    pub fn get<T: DeserializeOwned>(
        &self,
        path: &str,
        query: &[(&str, String)],
    ) -> Result<T, PveError> {
        self.send(reqwest::Method::GET, path, query, &[])
    }

    pub fn post<T: DeserializeOwned>(
        &self,
        path: &str,
        form: &[(&str, String)],
    ) -> Result<T, PveError> {
        self.send(reqwest::Method::POST, path, &[], form)
    }

    pub fn put<T: DeserializeOwned>(
        &self,
        path: &str,
        form: &[(&str, String)],
    ) -> Result<T, PveError> {
        self.send(reqwest::Method::PUT, path, &[], form)
    }

    pub fn delete<T: DeserializeOwned>(
        &self,
        path: &str,
        query: &[(&str, String)],
    ) -> Result<T, PveError> {
        self.send(reqwest::Method::DELETE, path, query, &[])
    }

    /// The token as a header value marked sensitive (kept out of debug output and HTTP/2
    /// header tables).
    fn auth_header(&self) -> Result<reqwest::header::HeaderValue, PveError> {
        let mut value =
            reqwest::header::HeaderValue::from_str(self.auth.expose_secret()).map_err(|_| {
                PveError::local(
                    ErrorKind::Permanent,
                    "the API token holds characters a header cannot carry".into(),
                )
            })?;
        value.set_sensitive(true);
        Ok(value)
    }

    fn send<T: DeserializeOwned>(
        &self,
        method: reqwest::Method,
        path: &str,
        query: &[(&str, String)],
        form: &[(&str, String)],
    ) -> Result<T, PveError> {
        self.calls.fetch_add(1, Ordering::Relaxed);
        let what = format!("{method} {path}");
        let mut request = self
            .http
            .request(method, format!("{}{path}", self.base))
            .header(reqwest::header::AUTHORIZATION, self.auth_header()?);
        if !query.is_empty() {
            request = request.query(query);
        }
        if !form.is_empty() {
            request = request.form(form);
        }
        // Driver methods run on blocking threads, never on the runtime's own workers.
        let (status, body) = self.runtime.block_on(async {
            let response = request.send().await.map_err(|e| {
                // Connection refused or reset, timeouts: the node or the network, worth retrying.
                PveError::local(ErrorKind::Transient, format!("{what}: {}", error_chain(&e)))
            })?;
            let status = response.status();
            // Read by chunks and capped: a guest with a replaced qemu-guest-agent decides
            // how much `exec-status` returns, and nothing is kept past `MAX_BODY_BYTES`.
            let mut response = response;
            let mut body = Vec::new();
            while let Some(chunk) = response.chunk().await.map_err(|e| {
                PveError::local(
                    ErrorKind::Transient,
                    format!("{what}: reading the answer: {e}"),
                )
            })? {
                if body.len() + chunk.len() > MAX_BODY_BYTES {
                    return Err(PveError::local(
                        ErrorKind::Permanent,
                        format!(
                            "{what}: the answer is larger than {} MiB; refused",
                            MAX_BODY_BYTES / (1024 * 1024)
                        ),
                    ));
                }
                body.extend_from_slice(&chunk);
            }
            Ok::<_, PveError>((status, body))
        })?;
        if !status.is_success() {
            return Err(api_error(&what, status.as_u16(), &body[..]));
        }
        #[derive(serde::Deserialize)]
        struct Envelope<T> {
            data: T,
        }
        serde_json::from_slice::<Envelope<T>>(&body)
            .map(|e| e.data)
            .map_err(|e| {
                PveError::local(
                    ErrorKind::Permanent,
                    format!("{what}: unexpected answer: {e}"),
                )
            })
    }

    /// Opens a websocket at `path` (`vncwebsocket`), through the same client, trust and
    /// token as every request; the upgraded connection and the runtime it runs on.
    pub fn websocket(
        &self,
        path: &str,
        query: &[(&str, String)],
    ) -> Result<(WebSocket, tokio::runtime::Handle), PveError> {
        use base64::Engine;
        use reqwest::header;
        self.calls.fetch_add(1, Ordering::Relaxed);
        let what = format!("websocket {path}");
        let key: [u8; 16] = rand_bytes();
        let request = self
            .http
            .get(format!("{}{path}", self.base))
            .query(query)
            .header(header::AUTHORIZATION, self.auth_header()?)
            .header(header::CONNECTION, "Upgrade")
            .header(header::UPGRADE, "websocket")
            .header(header::SEC_WEBSOCKET_VERSION, "13")
            .header(
                header::SEC_WEBSOCKET_KEY,
                base64::engine::general_purpose::STANDARD.encode(key),
            )
            .header(header::SEC_WEBSOCKET_PROTOCOL, "binary");
        let socket = self.runtime.block_on(async {
            let response = request.send().await.map_err(|e| {
                PveError::local(ErrorKind::Transient, format!("{what}: {}", error_chain(&e)))
            })?;
            let status = response.status();
            if status != reqwest::StatusCode::SWITCHING_PROTOCOLS {
                let body = response.bytes().await.unwrap_or_default();
                return Err(api_error(&what, status.as_u16(), &body[..]));
            }
            let upgraded = response.upgrade().await.map_err(|e| {
                PveError::local(ErrorKind::Transient, format!("{what}: {}", error_chain(&e)))
            })?;
            Ok(tokio_tungstenite::WebSocketStream::from_raw_socket(
                upgraded,
                tokio_tungstenite::tungstenite::protocol::Role::Client,
                None,
            )
            .await)
        })?;
        Ok((socket, self.runtime.clone()))
    }

    /// Waits for a task to end and checks its exit status; a task still running at
    /// `deadline` is an error (it keeps running on the node; the next attempt finds what it did).
    pub fn await_task(&self, node: &str, upid: &str, deadline: Duration) -> Result<(), PveError> {
        let until = Instant::now() + deadline;
        let path = format!("/nodes/{node}/tasks/{}/status", encode_segment(upid));
        let mut pause = Duration::from_millis(50);
        loop {
            let task: TaskStatus = self.get(&path, &[])?;
            if task.status == "stopped" {
                let exit = task.exitstatus.unwrap_or_default();
                return if exit == "OK" || exit.starts_with("WARNINGS") {
                    Ok(())
                } else {
                    let condition = PveCondition::of_message(&exit);
                    Err(PveError::new(
                        condition,
                        condition.kind(),
                        format!("task {} failed: {exit}", task_kind(upid)),
                    ))
                };
            }
            if Instant::now() >= until {
                return Err(PveError::new(
                    PveCondition::Busy,
                    ErrorKind::Transient,
                    format!(
                        "task {} still running after {}s",
                        task_kind(upid),
                        deadline.as_secs()
                    ),
                ));
            }
            std::thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_secs(1));
        }
    }
}

/// The task type of a UPID (`UPID:node:pid:pstart:start:type:id:user:`), for messages.
fn task_kind(upid: &str) -> String {
    let parts: Vec<&str> = upid.split(':').collect();
    match (parts.get(5), parts.get(6)) {
        (Some(kind), Some(id)) if !id.is_empty() => format!("{kind} {id}"),
        (Some(kind), _) => (*kind).to_owned(),
        _ => upid.to_owned(),
    }
}

/// A UPID as one path segment (it holds `!` and `@` from the token id).
pub fn encode_segment(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~:".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// An error answer: PVE's message (and per-field errors) with a kind apply can act on.
fn api_error(what: &str, status: u16, body: &[u8]) -> PveError {
    #[derive(serde::Deserialize, Default)]
    struct ErrorBody {
        #[serde(default)]
        message: Option<String>,
        #[serde(default)]
        errors: Option<std::collections::BTreeMap<String, String>>,
    }
    let parsed: ErrorBody = serde_json::from_slice(body).unwrap_or_default();
    let mut message = parsed
        .message
        .unwrap_or_else(|| String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned())
        .trim()
        .to_owned();
    if let Some(errors) = parsed.errors {
        for (field, why) in errors {
            message.push_str(&format!("; {field}: {}", why.trim()));
        }
    }
    let condition = PveCondition::of_message(&message);
    let kind = match status {
        401 => ErrorKind::Permanent,
        403 => ErrorKind::Permanent,
        400 => ErrorKind::Permanent,
        // 502/503/504 from a proxy, 595/596: the node cannot be reached.
        502..=504 | 595 | 596 | 408 | 429 => ErrorKind::Transient,
        _ => condition.kind(),
    };
    let hint = match status {
        401 => " (check the provider's token id and secret)",
        403 => " (the token lacks a privilege; see docs/proxmox.md)",
        _ => "",
    };
    PveError::new(
        condition,
        kind,
        format!("{what}: HTTP {status}: {message}{hint}"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pve_wordings_map_to_kinds() {
        for (message, kind) in [
            (
                "can't lock file '/var/lock/qemu-server/lock-100.conf' - got timeout",
                ErrorKind::Transient,
            ),
            ("VM is locked (backup)", ErrorKind::Transient),
            (
                "unable to create VM 100: config file already exists",
                ErrorKind::Conflict,
            ),
            (
                "checksum mismatch (file change by other user?)",
                ErrorKind::Conflict,
            ),
            (
                "Configuration file 'nodes/pve1/qemu-server/100.conf' does not exist",
                ErrorKind::NotFound,
            ),
            (
                "storage 'nope' does not support vm images",
                ErrorKind::Permanent,
            ),
        ] {
            assert_eq!(PveCondition::of_message(message).kind(), kind, "{message}");
        }
    }

    #[test]
    fn the_conditions_the_driver_acts_on_are_recognised() {
        for (message, condition) in [
            ("VM 100 already running", PveCondition::AlreadyRunning),
            ("VM 100 not running", PveCondition::NotRunning),
            (
                "Linked clone feature is not supported for drive 'scsi0'",
                PveCondition::LinkedCloneUnsupported,
            ),
            (
                "checksum mismatch (file change by other user?)",
                PveCondition::DigestMismatch,
            ),
            (
                "unable to create VM 100: config file already exists",
                PveCondition::AlreadyExists,
            ),
        ] {
            assert_eq!(PveCondition::of_message(message), condition, "{message}");
        }
    }

    #[test]
    fn errors_carry_field_messages_and_hints() {
        let e = api_error(
            "PUT /x",
            400,
            br#"{"data":null,"message":"Parameter verification failed.\n","errors":{"cores":"value must be at least 1"}}"#,
        );
        assert_eq!(e.kind, ErrorKind::Permanent);
        assert!(
            e.message.contains("cores: value must be at least 1"),
            "{}",
            e.message
        );
        let e = api_error(
            "GET /x",
            401,
            br#"{"data":null,"message":"authentication failure\n"}"#,
        );
        assert!(e.message.contains("token id and secret"), "{}", e.message);
        assert_eq!(api_error("GET /x", 595, b"").kind, ErrorKind::Transient);
    }

    #[test]
    fn upids_are_one_path_segment() {
        let upid = "UPID:pve1:000003E8:00001B58:6B044E13:qmclone:9000:fleet@pve!ci:";
        let enc = encode_segment(upid);
        assert!(!enc.contains('!') && !enc.contains('@') && !enc.contains('/'));
        assert_eq!(task_kind(upid), "qmclone 9000");
    }
}
