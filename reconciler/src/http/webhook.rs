//! The webhook listener (`fleet serve --webhook-listen`): a push notification from GitHub,
//! Gitea/Forgejo or GitLab makes fleet fetch its source now instead of at the next poll.
//!
//! It listens on its own address, apart from the read-only page, and only ever triggers a
//! fetch: nothing in a payload is read, so a payload cannot name a branch, a commit or a
//! URL. A request counts only when it proves the shared secret (a host file): GitHub's
//! `X-Hub-Signature-256: sha256=<HMAC-SHA256 of the body>`, Gitea's `X-Gitea-Signature`
//! (the same HMAC, bare hex), or GitLab's `X-Gitlab-Token` (the secret itself), compared in
//! constant time. Anything else gets 401 and an event (one a minute at most); a body over
//! 1 MiB gets 413, one that takes over 10 s to arrive 408, and once `MAX_FAILURES_PER_MINUTE`
//! requests failed in a minute, further ones get 429 until it ends (valid ones too: a
//! flood of guesses must not buy time for guessing). Valid requests only ask for a fetch,
//! and the daemon starts at most four a second, however many arrive.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use hmac::{Hmac, Mac};
use secrecy::{ExposeSecret, SecretString};
use subtle::ConstantTimeEq;

use crate::status::{Event, EventKind, StatusDir};

/// The largest body read (push payloads of big pushes are a few hundred KiB).
pub const MAX_BODY_BYTES: usize = 1024 * 1024;
/// Failed requests a minute before every request gets 429 for the rest of it.
pub const MAX_FAILURES_PER_MINUTE: u32 = 60;
/// How long a body may take to arrive.
const BODY_TIMEOUT: Duration = Duration::from_secs(10);

/// What a valid notification does: tell the daemon to fetch now.
pub type Notify = Arc<dyn Fn() + Send + Sync>;

struct Hook {
    secret: SecretString,
    notify: Notify,
    status: StatusDir,
    /// The current minute's start and how many requests failed in it.
    window: Mutex<(Instant, u32)>,
    /// When a refusal was last written as an event (at most one a minute).
    reported: Mutex<Option<Instant>>,
}

/// The listener's routes: `POST /` and `POST /hooks/git`.
pub fn app(secret: SecretString, status: StatusDir, notify: Notify) -> Router {
    let hook = Arc::new(Hook {
        secret,
        notify,
        status,
        window: Mutex::new((Instant::now(), 0)),
        reported: Mutex::new(None),
    });
    Router::new()
        .route("/", post(receive))
        .route("/hooks/git", post(receive))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(hook)
}

async fn receive(State(hook): State<Arc<Hook>>, headers: HeaderMap, body: Body) -> StatusCode {
    let failed = || {
        let mut window = hook.window.lock().unwrap_or_else(|p| p.into_inner());
        window.1 += 1;
    };
    {
        let mut window = hook.window.lock().unwrap_or_else(|p| p.into_inner());
        if window.0.elapsed() >= Duration::from_secs(60) {
            *window = (Instant::now(), 0);
        }
        if window.1 >= MAX_FAILURES_PER_MINUTE {
            return StatusCode::TOO_MANY_REQUESTS;
        }
    }
    let body = match tokio::time::timeout(BODY_TIMEOUT, axum::body::to_bytes(body, MAX_BODY_BYTES))
        .await
    {
        Ok(Ok(bytes)) => bytes,
        Ok(Err(_)) => {
            failed();
            return StatusCode::PAYLOAD_TOO_LARGE;
        }
        Err(_) => {
            failed();
            return StatusCode::REQUEST_TIMEOUT;
        }
    };
    if proves_secret(hook.secret.expose_secret().as_bytes(), &headers, &body) {
        (hook.notify)();
        return StatusCode::ACCEPTED;
    }
    failed();
    let report = {
        let mut last = hook.reported.lock().unwrap_or_else(|p| p.into_inner());
        let due = last.is_none_or(|t| t.elapsed() >= Duration::from_secs(60));
        if due {
            *last = Some(Instant::now());
        }
        due
    };
    if report {
        tracing::warn!("webhook: a request without a valid signature was refused");
        let _ = hook.status.append_event(&Event::fleet(
            EventKind::WebhookRefused,
            None,
            "a webhook request without a valid signature or token was refused (401); later ones this minute are not reported".into(),
        ));
    }
    StatusCode::UNAUTHORIZED
}

/// Whether the request carries a signature of `body` (or the token) made with `secret`.
fn proves_secret(secret: &[u8], headers: &HeaderMap, body: &[u8]) -> bool {
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let mac = || {
        let mut mac = Hmac::<sha2::Sha256>::new_from_slice(secret).expect("HMAC takes any key");
        mac.update(body);
        fleet_core::digest::hex(&mac.finalize().into_bytes())
    };
    let same = |a: &str, b: &str| bool::from(a.as_bytes().ct_eq(b.as_bytes()));
    if let Some(signature) = header("x-hub-signature-256") {
        return signature
            .strip_prefix("sha256=")
            .is_some_and(|hex| same(&hex.to_ascii_lowercase(), &mac()));
    }
    if let Some(signature) = header("x-gitea-signature").or(header("x-forgejo-signature")) {
        return same(&signature.to_ascii_lowercase(), &mac());
    }
    if let Some(token) = header("x-gitlab-token") {
        // Digests, so the comparison's time says nothing about the secret's length either.
        use sha2::Digest;
        let digest = |b: &[u8]| fleet_core::digest::hex(&sha2::Sha256::digest(b));
        return same(&digest(token.as_bytes()), &digest(secret));
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, String)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.insert(*name, value.parse().expect("header"));
        }
        map
    }

    fn github_signature(secret: &[u8], body: &[u8]) -> String {
        let mut mac = Hmac::<sha2::Sha256>::new_from_slice(secret).expect("key");
        mac.update(body);
        format!(
            "sha256={}",
            fleet_core::digest::hex(&mac.finalize().into_bytes())
        )
    }

    #[test]
    fn each_forges_proof_is_checked_and_anything_else_refused() {
        let (secret, body) = (
            b"0123456789abcdef".as_slice(),
            br#"{"ref":"refs/heads/main"}"#,
        );
        let signed = github_signature(secret, body);
        assert!(proves_secret(
            secret,
            &headers(&[("x-hub-signature-256", signed.clone())]),
            body
        ));
        let bare = signed.trim_start_matches("sha256=").to_owned();
        assert!(proves_secret(
            secret,
            &headers(&[("x-gitea-signature", bare.clone())]),
            body
        ));
        assert!(proves_secret(
            secret,
            &headers(&[("x-gitlab-token", "0123456789abcdef".into())]),
            body
        ));
        // Another body, another secret, a missing prefix, no header at all: refused.
        assert!(!proves_secret(
            secret,
            &headers(&[("x-hub-signature-256", signed.clone())]),
            b"{}"
        ));
        assert!(!proves_secret(
            b"another secret!!",
            &headers(&[("x-hub-signature-256", signed)]),
            body
        ));
        assert!(!proves_secret(
            secret,
            &headers(&[("x-hub-signature-256", bare)]),
            body
        ));
        assert!(!proves_secret(
            secret,
            &headers(&[("x-gitlab-token", "guess".into())]),
            body
        ));
        assert!(!proves_secret(secret, &HeaderMap::new(), body));
    }
}
