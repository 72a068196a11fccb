//! Serving the page: connections accepted by hand so each is bounded (axum's `serve` sets no
//! timeout and no limit). A client that sends half a header is dropped after
//! `HEADER_READ_TIMEOUT`, no connection lives longer than `CONNECTION_LIFETIME`, at most
//! `MAX_CONNECTIONS` are served at once (more are closed at accept, so fleet never runs out
//! of file descriptors for its own work), and a shutdown gives open connections
//! `SHUTDOWN_GRACE` before it leaves them.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, oneshot};

pub const MAX_CONNECTIONS: usize = 512;
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
pub const CONNECTION_LIFETIME: Duration = Duration::from_secs(120);
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

/// Raises the soft limit on open files to the hard one (at most 65536): the page's
/// connections must never starve fleet's own files and links of descriptors, and the
/// distribution's soft default (1024) is meant for programs that did not ask.
pub fn raise_open_file_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        let wanted = hard.min(65536);
        if soft < wanted
            && let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, wanted, hard)
        {
            tracing::warn!("cannot raise the open-file limit to {wanted}: {e}");
        }
    }
}

/// Serves `app` on `listener` until `stop` fires, then returns within `SHUTDOWN_GRACE`
/// whatever the clients do.
pub async fn serve(listener: TcpListener, app: Router, mut stop: oneshot::Receiver<()>) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    loop {
        let accepted = tokio::select! {
            _ = &mut stop => break,
            accepted = listener.accept() => accepted,
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // Out of file descriptors, most likely: wait rather than spin.
                tracing::warn!("status page: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tracing::debug!(%peer, "status page: {MAX_CONNECTIONS} connections open; closing a new one");
            continue;
        };
        serve_connection(&graceful, stream, peer, app.clone(), slot);
    }
    tokio::select! {
        () = graceful.shutdown() => {}
        () = tokio::time::sleep(SHUTDOWN_GRACE) => {
            tracing::debug!("status page: left connections still open at shutdown");
        }
    }
}

fn serve_connection(
    graceful: &hyper_util::server::graceful::GracefulShutdown,
    stream: tokio::net::TcpStream,
    peer: SocketAddr,
    app: Router,
    slot: tokio::sync::OwnedSemaphorePermit,
) {
    let service = hyper_util::service::TowerToHyperService::new(app);
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .keep_alive(true);
    let connection = graceful.watch(builder.serve_connection(TokioIo::new(stream), service));
    tokio::spawn(async move {
        let _slot = slot;
        match tokio::time::timeout(CONNECTION_LIFETIME, connection).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::debug!(%peer, "status page connection: {e}"),
            Err(_) => tracing::debug!(%peer, "status page connection outlived its lifetime"),
        }
    });
}
