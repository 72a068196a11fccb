//! The read-only status page: `app(View) -> Router`.
//!
//! Routes: `/` (HTML overview), `/vms/{name}`, `/tasks/{name}` (a task and the tail of its
//! output), `/api/v1/status` (JSON of the status files),
//! `/metrics` (Prometheus text), `/healthz`, `/readyz`.
//!
//! Architecture invariant: read-only by construction. Every method but GET and HEAD gets
//! 405 before any route runs; handlers only read files of the status directory, by names
//! they build themselves from validated VM names (anything else is 404); status files hold
//! no secrets.

pub mod metrics;
mod pages;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

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
}

impl View {
    pub fn new(status: StatusDir, metrics: Arc<Metrics>) -> View {
        View {
            status,
            metrics,
            ready: AtomicBool::new(false),
        }
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
        .with_state(view)
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
    Html(pages::overview(&pages::Snapshot::read(&view.status)))
}

async fn vm_page(State(view): State<Arc<View>>, Path(name): Path<String>) -> Response {
    // Only names fleet could have written: nothing else reaches the file system.
    if !is_vm_name(&name) {
        return not_found().await;
    }
    let snapshot = pages::Snapshot::read(&view.status);
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
    let snapshot = pages::Snapshot::read(&view.status);
    match snapshot.tasks.get(&name) {
        Some(task) => {
            let output = view
                .status
                .task_output_tail(&name, pages::OUTPUT_TAIL_BYTES);
            Html(pages::task(&snapshot, task, output.as_deref())).into_response()
        }
        None => not_found().await,
    }
}

async fn api_status(State(view): State<Arc<View>>) -> Json<serde_json::Value> {
    let s = pages::Snapshot::read(&view.status);
    Json(serde_json::json!({
        "summary": s.summary,
        "vms": s.vms,
        "plan": s.plan_json,
        "tasks": s.tasks,
        "prompts": s.prompts,
    }))
}

async fn metrics_text(State(view): State<Arc<View>>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        view.metrics.encode(),
    )
        .into_response()
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
