//! The read-only status page: `app(View) -> Router`.
//!
//! Routes: `/` (HTML overview), `/vms/{name}`, `/tasks/{name}` (a task and the tail of its
//! output), `/api/v1/status` (JSON of the status files),
//! `/metrics` (Prometheus text), `/healthz`, `/readyz`.
//!
//! Architecture invariant: read-only by construction. Every method but GET and HEAD gets
//! 405 before any route runs; handlers only read files of the status directory, by names
//! they build themselves from validated VM names (anything else is 404); status files hold
//! no secrets. A request naming a `Host` the page does not serve is refused (no DNS
//! rebinding), a page listening beyond loopback needs its bearer token, and every response
//! carries headers that forbid scripts, framing and sniffing. Connections are bounded in
//! number and time (`server`).

pub mod metrics;
mod pages;
pub mod server;
pub mod webhook;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{Path, Request, State};
use axum::http::{Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{Html, IntoResponse, Json, Response};
use axum::routing::get;

use crate::status::StatusDir;
pub use metrics::Metrics;

/// What the handlers may read.
pub struct View {
    pub status: StatusDir,
    pub metrics: Arc<Metrics>,
    /// Set once the daemon has completed a reconcile.
    pub ready: AtomicBool,
    pub access: Access,
    /// The last status snapshot, when it was read and the directories' modification times
    /// then: requests share it until the status changes (fleet writes every status file by
    /// renaming it into its directory) or `SNAPSHOT_TTL` passes, so a flood of requests
    /// costs a few `stat`s each, not a read of the whole directory (which runs off the
    /// async workers).
    cache: tokio::sync::Mutex<Option<CachedSnapshot>>,
}

struct CachedSnapshot {
    read_at: Instant,
    stamp: Vec<Option<std::time::SystemTime>>,
    snapshot: Arc<pages::Snapshot>,
}

/// The longest a snapshot serves requests, changes or not (a write in the same clock tick
/// as the read leaves the modification times as they were).
pub const SNAPSHOT_TTL: Duration = Duration::from_secs(1);

/// Who may ask: the `Host` names the page answers to, and the bearer token a request must
/// carry when the page listens beyond loopback.
#[derive(Default)]
pub struct Access {
    /// Lower-case `host` and `host:port` forms; empty accepts any (tests).
    pub hosts: BTreeSet<String>,
    pub token: Option<secrecy::SecretString>,
}

impl Access {
    /// The names a page listening on `listen` answers to: its own address, the loopback
    /// names when it is on loopback, and `extra` (each with and without the port).
    pub fn for_listen(
        listen: SocketAddr,
        extra: &[String],
        token: Option<secrecy::SecretString>,
    ) -> Access {
        let port = listen.port();
        let mut names: Vec<String> = extra.iter().map(|n| n.to_ascii_lowercase()).collect();
        names.push(match listen {
            SocketAddr::V4(a) => a.ip().to_string(),
            SocketAddr::V6(a) => format!("[{}]", a.ip()),
        });
        if listen.ip().is_loopback() {
            names.extend(["localhost", "127.0.0.1", "[::1]"].map(str::to_owned));
        }
        let mut hosts = BTreeSet::new();
        for name in names {
            hosts.insert(format!("{name}:{port}"));
            if port == 80 {
                hosts.insert(name);
            }
        }
        Access { hosts, token }
    }
}

impl View {
    pub fn new(status: StatusDir, metrics: Arc<Metrics>) -> View {
        View::with_access(status, metrics, Access::default())
    }

    pub fn with_access(status: StatusDir, metrics: Arc<Metrics>, access: Access) -> View {
        View {
            status,
            metrics,
            ready: AtomicBool::new(false),
            access,
            cache: tokio::sync::Mutex::new(None),
        }
    }

    /// When the directories the snapshot is read from last changed.
    fn stamp(&self) -> Vec<Option<std::time::SystemTime>> {
        let root = self.status.root();
        [
            root.to_owned(),
            root.join("vms"),
            root.join("tasks"),
            root.join("hitl"),
        ]
        .iter()
        .map(|d| std::fs::metadata(d).and_then(|m| m.modified()).ok())
        .collect()
    }

    async fn snapshot(&self) -> Arc<pages::Snapshot> {
        let mut cache = self.cache.lock().await;
        let stamp = self.stamp();
        if let Some(c) = cache.as_ref()
            && c.read_at.elapsed() < SNAPSHOT_TTL
            && c.stamp == stamp
        {
            return c.snapshot.clone();
        }
        let status = self.status.clone();
        let snapshot = tokio::task::spawn_blocking(move || pages::Snapshot::read(&status))
            .await
            .map(Arc::new)
            .unwrap_or_else(|_| Arc::new(pages::Snapshot::empty()));
        *cache = Some(CachedSnapshot {
            read_at: Instant::now(),
            stamp,
            snapshot: snapshot.clone(),
        });
        snapshot
    }
}

pub fn app(view: Arc<View>) -> Router {
    Router::new()
        .route("/", get(overview))
        .route("/vms/{name}", get(vm_page))
        .route("/tasks/{name}", get(task_page))
        .route("/api/v1/status", get(api_status))
        .route("/metrics", get(metrics_text))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .fallback(not_found)
        .layer(middleware::from_fn(read_only))
        .layer(middleware::from_fn_with_state(view.clone(), guard))
        .with_state(view)
}

/// What any answer carries: no scripts, no framing, no sniffing, no referrer.
const SECURITY_HEADERS: [(header::HeaderName, &str); 4] = [
    (
        header::CONTENT_SECURITY_POLICY,
        "default-src 'none'; style-src 'unsafe-inline'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    ),
    (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
    (header::X_FRAME_OPTIONS, "DENY"),
    (header::REFERRER_POLICY, "no-referrer"),
];

/// The `Host` must be one the page serves (a page reached through a rebound DNS name is
/// not), and beyond loopback the bearer token must match; health probes need no token.
async fn guard(State(view): State<Arc<View>>, request: Request, next: Next) -> Response {
    let access = &view.access;
    let host = request
        .headers()
        .get(header::HOST)
        .map(|h| h.to_str().unwrap_or("").to_ascii_lowercase());
    // A request without a Host (HTTP/1.0) is refused too when the page checks names.
    let named_elsewhere =
        !access.hosts.is_empty() && host.as_ref().is_none_or(|h| !access.hosts.contains(h));
    let mut response = match host {
        _ if named_elsewhere => (
            StatusCode::MISDIRECTED_REQUEST,
            "this page does not answer to that host name\n",
        )
            .into_response(),
        _ if !authorised(access, &request) => (
            StatusCode::UNAUTHORIZED,
            [(header::WWW_AUTHENTICATE, "Bearer")],
            "a bearer token is needed\n",
        )
            .into_response(),
        _ => next.run(request).await,
    };
    for (name, value) in SECURITY_HEADERS {
        response
            .headers_mut()
            .insert(name, header::HeaderValue::from_static(value));
    }
    response
}

fn authorised(access: &Access, request: &Request) -> bool {
    use secrecy::ExposeSecret;
    use subtle::ConstantTimeEq;
    let Some(token) = &access.token else {
        return true;
    };
    if matches!(request.uri().path(), "/healthz" | "/readyz") {
        return true;
    }
    let offered = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|h| h.to_str().ok())
        .and_then(|h| h.strip_prefix("Bearer "))
        .unwrap_or("");
    bool::from(offered.as_bytes().ct_eq(token.expose_secret().as_bytes()))
}

/// Every method but GET and HEAD is refused, on every path.
async fn read_only(request: Request, next: Next) -> Response {
    if request.method() == Method::GET || request.method() == Method::HEAD {
        next.run(request).await
    } else {
        (
            StatusCode::METHOD_NOT_ALLOWED,
            [(header::ALLOW, "GET, HEAD")],
            "this page is read-only\n",
        )
            .into_response()
    }
}

async fn not_found() -> Response {
    (StatusCode::NOT_FOUND, "not found\n").into_response()
}

async fn overview(State(view): State<Arc<View>>) -> Html<String> {
    Html(pages::overview(&*view.snapshot().await))
}

async fn vm_page(State(view): State<Arc<View>>, Path(name): Path<String>) -> Response {
    // Only names fleet could have written: nothing else reaches the file system.
    if !is_vm_name(&name) {
        return not_found().await;
    }
    let snapshot = view.snapshot().await;
    match snapshot.vms.get(&name) {
        Some(vm) => Html(pages::vm(&snapshot, vm)).into_response(),
        None => not_found().await,
    }
}

async fn task_page(State(view): State<Arc<View>>, Path(name): Path<String>) -> Response {
    // Task names are names too: nothing else reaches the file system.
    if !is_vm_name(&name) {
        return not_found().await;
    }
    let snapshot = view.snapshot().await;
    match snapshot.tasks.get(&name) {
        Some(task) => {
            let status = view.status.clone();
            let output = tokio::task::spawn_blocking(move || {
                status.task_output_tail(&name, pages::OUTPUT_TAIL_BYTES)
            })
            .await
            .ok()
            .flatten();
            Html(pages::task(&snapshot, task, output.as_deref())).into_response()
        }
        None => not_found().await,
    }
}

async fn api_status(State(view): State<Arc<View>>) -> Json<serde_json::Value> {
    let s = view.snapshot().await;
    Json(serde_json::json!({
        "summary": s.summary,
        "vms": s.vms,
        "plan": s.plan_json,
        "tasks": s.tasks,
        "prompts": s.prompts,
    }))
}

/// The Prometheus text format, or OpenMetrics when the scraper asks for it.
async fn metrics_text(State(view): State<Arc<View>>, headers: header::HeaderMap) -> Response {
    let snapshot = view.snapshot().await;
    let openmetrics = headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.contains("application/openmetrics-text"));
    let body = view.metrics.encode_observed(&snapshot, openmetrics);
    let content_type = if openmetrics {
        "application/openmetrics-text; version=1.0.0; charset=utf-8"
    } else {
        "text/plain; version=0.0.4; charset=utf-8"
    };
    ([(header::CONTENT_TYPE, content_type)], body).into_response()
}

async fn readyz(State(view): State<Arc<View>>) -> Response {
    if view.ready.load(Ordering::Relaxed) {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: no reconcile has finished yet\n",
        )
            .into_response()
    }
}

fn is_vm_name(name: &str) -> bool {
    let bytes = name.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= 63
        && bytes
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-')
        && bytes[0] != b'-'
        && bytes[bytes.len() - 1] != b'-'
}

#[cfg(test)]
mod tests;
