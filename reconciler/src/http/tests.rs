//! The router with `oneshot`: read-only, no path traversal, pages carry the status.

use axum::body::Body;
use axum::http::{Request, StatusCode};
use tower::ServiceExt;

use super::*;
use crate::source::Revision;
use crate::spec::PowerState;
use crate::status::{Condition, ObservedResources, Phase, Summary, VmStatus};

fn view_with_status() -> (tempfile::TempDir, Arc<View>) {
    let dir = tempfile::tempdir().expect("tempdir");
    let status = StatusDir::new(dir.path().join("status"));
    status.ensure().expect("ensure");
    status
        .write_summary(&Summary {
            fleet: "lab".into(),
            revision_applied: Some(Revision {
                id: "abc".into(),
                label: "main@abc123".into(),
                signed_by: None,
            }),
            ..Summary::default()
        })
        .expect("summary");
    let vm = VmStatus {
        name: "web-01".into(),
        provider: "local".into(),
        phase: Phase::Running,
        desired_state: PowerState::Running,
        observed: Some(ObservedResources {
            uuid: "u".into(),
            running: true,
            cpus: 2,
            memory_mib: 512,
        }),
        spec_hash: "h".into(),
        applied_revision: Some("abc".into()),
        source: "fleet/vms/web-01.yaml".into(),
        agent: None,
        lease: None,
        started: None,
        conditions: vec![Condition {
            kind: crate::status::ConditionKind::Drifted,
            status: false,
            reason: "Healed".into(),
            message: "<script>alert(1)</script>".into(),
        }],
        last_error: None,
        updated: None,
    };
    status
        .write_vms(&[("web-01".to_owned(), vm)].into())
        .expect("vms");
    // A file outside the status directory that traversal would try to reach.
    std::fs::write(dir.path().join("secret.yaml"), "name: leaked\n").expect("write");
    let view = Arc::new(View::new(status, Arc::new(Metrics::default())));
    (dir, view)
}

async fn send(view: &Arc<View>, method: &str, uri: &str) -> (StatusCode, String) {
    let response = app(view.clone())
        .oneshot(
            Request::builder()
                .method(method)
                .uri(uri)
                .body(Body::empty())
                .expect("request"),
        )
        .await
        .expect("response");
    let status = response.status();
    let body = axum::body::to_bytes(response.into_body(), 1 << 20)
        .await
        .expect("body");
    (status, String::from_utf8_lossy(&body).into_owned())
}

#[tokio::test]
async fn the_overview_shows_vms_and_the_revision_escaped() {
    let (_dir, view) = view_with_status();
    let (status, body) = send(&view, "GET", "/").await;
    assert_eq!(status, StatusCode::OK);
    assert!(body.contains("main@abc123"), "{body}");
    assert!(body.contains("href=\"/vms/web-01\""), "{body}");
    assert!(body.contains("http-equiv=\"refresh\""));
    let (_, vm) = send(&view, "GET", "/vms/web-01").await;
    assert!(vm.contains("&lt;script&gt;"), "values are escaped: {vm}");
    assert!(!vm.contains("<script>"));
}

#[tokio::test]
async fn the_overview_says_when_fleet_is_suspended_and_where_it_fetches_from() {
    let (dir, view) = view_with_status();
    let status = StatusDir::new(dir.path().join("status"));
    let mut summary = status.read_summary().expect("summary");
    summary.suspended = Some("suspended from the host (by alice: <incident>)".into());
    summary.source = Some(crate::status::SourceState {
        url: "https://git.example.org/ops/fleet.git".into(),
        branch: "main".into(),
        tip: Some("0123456789abcdef".into()),
        fetched: None,
        error: Some("fetching main: HTTP 401".into()),
    });
    status.write_summary(&summary).expect("summary");
    let (_, body) = send(&view, "GET", "/").await;
    assert!(body.contains("Suspended"), "{body}");
    assert!(body.contains("&lt;incident&gt;"), "escaped: {body}");
    assert!(
        body.contains("https://git.example.org/ops/fleet.git main at 0123456789ab"),
        "{body}"
    );
    assert!(
        body.contains("fetch failing: fetching main: HTTP 401"),
        "{body}"
    );
}

#[tokio::test]
async fn every_method_but_get_and_head_is_refused() {
    let (_dir, view) = view_with_status();
    for method in ["POST", "PUT", "DELETE", "PATCH"] {
        for uri in ["/", "/vms/web-01", "/api/v1/status", "/nowhere"] {
            assert_eq!(
                send(&view, method, uri).await.0,
                StatusCode::METHOD_NOT_ALLOWED,
                "{method} {uri}"
            );
        }
    }
    assert_eq!(send(&view, "HEAD", "/").await.0, StatusCode::OK);
}

#[tokio::test]
async fn nothing_outside_the_status_directory_is_reachable() {
    let (_dir, view) = view_with_status();
    for uri in [
        "/vms/..%2Fsecret",
        "/vms/../secret",
        "/vms/%2e%2e%2fsecret",
        "/vms/web-01.yaml",
        "/vms/UPPER",
        "/../secret.yaml",
        "/status/summary.yaml",
    ] {
        let (status, body) = send(&view, "GET", uri).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{uri}: {body}");
        assert!(!body.contains("leaked"));
    }
}

#[tokio::test]
async fn api_metrics_and_probes() {
    let (_dir, view) = view_with_status();
    let (status, body) = send(&view, "GET", "/api/v1/status").await;
    assert_eq!(status, StatusCode::OK);
    let json: serde_json::Value = serde_json::from_str(&body).expect("json");
    assert_eq!(json["vms"]["web-01"]["phase"], "Running");
    assert_eq!(json["summary"]["revisionApplied"]["label"], "main@abc123");

    view.metrics.observe_reconcile(0.2);
    view.metrics.count_step("create", true);
    view.metrics.count_egress(
        "vm-1",
        &crate::broker::Used {
            task: None,
            destination: "POST https://api.anthropic.com/v1/messages".into(),
            rule: Some("loadout agent egress.credentials[0]".into()),
            status: Some(200),
            bytes_up: 100,
            bytes_down: 900,
            tokens: Some(crate::tokens::Metered {
                tokens: crate::tokens::Tokens {
                    input: 40,
                    output: 2,
                },
                unreadable: None,
            }),
            admitted: true,
            started: std::time::SystemTime::UNIX_EPOCH,
            duration: std::time::Duration::from_millis(3),
        },
    );
    let (_, metrics) = send(&view, "GET", "/metrics").await;
    assert!(
        metrics.contains("fleet_reconcile_duration_seconds_count 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("fleet_apply_steps_total{action=\"create\",outcome=\"succeeded\"} 1"),
        "{metrics}"
    );
    for line in [
        "fleet_egress_connections_total{vm=\"vm-1\",outcome=\"allowed\"} 1",
        "fleet_egress_bytes_total{vm=\"vm-1\",direction=\"down\"} 900",
        "fleet_egress_tokens_total{vm=\"vm-1\",token=\"input\"} 40",
    ] {
        assert!(metrics.contains(line), "{line}: {metrics}");
    }
}

/// Every kind of series, filled in, passes `promtool check metrics` (HELP and TYPE for
/// each, counters named by their samples); the status-file ones follow the files.
#[tokio::test]
async fn metrics_pass_promtool_and_follow_the_status_files() {
    let (_dir, view) = view_with_status();
    let mut summary = view.status.read_summary().expect("summary");
    summary.last_applied = Some(crate::time::Timestamp::from(
        std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_700_000_000),
    ));
    view.status.write_summary(&summary).expect("summary");
    view.metrics.observe_reconcile(0.2);
    view.metrics.observe_fetch(0.1);
    view.metrics.count_step("create", false);
    view.metrics.count_refused_revision();
    view.metrics.count_delivery("ops", "delivered");
    view.metrics
        .set_phases(&crate::status::counts(&view.status.read_vms()));
    let (status, metrics) = send(&view, "GET", "/metrics").await;
    assert_eq!(status, StatusCode::OK);
    for line in [
        "fleet_last_applied_revision_timestamp_seconds 1700000000",
        "fleet_vm_info{vm=\"web-01\",phase=\"Running\",provider=\"local\",revision=\"abc\"} 1",
        "fleet_revisions_refused_total 1",
        "fleet_notification_deliveries_total{sink=\"ops\",outcome=\"delivered\"} 1",
        "fleet_task_runs{phase=\"Running\"} 0",
        "fleet_agent_links_connected 0",
        "fleet_revision_refused 0",
    ] {
        assert!(metrics.contains(line), "{line}: {metrics}");
    }
    assert!(metrics.contains("fleet_build_info{version=\""), "{metrics}");
    let mut promtool = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run promtool (make deps installs it)");
    {
        use std::io::Write as _;
        let mut stdin = promtool.stdin.take().expect("stdin");
        stdin.write_all(metrics.as_bytes()).expect("write");
    }
    let out = promtool.wait_with_output().expect("promtool");
    assert!(
        out.status.success(),
        "promtool check metrics: {}{}\n{metrics}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // A VM gone from the status files leaves no series behind.
    view.status
        .write_vms(&std::collections::BTreeMap::new())
        .expect("vms");
    *view.cache.lock().await = None;
    let (_, metrics) = send(&view, "GET", "/metrics").await;
    assert!(!metrics.contains("fleet_vm_info{"), "{metrics}");
    // A scraper that asks for OpenMetrics gets it.
    let response = app(view.clone())
        .oneshot(
            Request::get("/metrics")
                .header("accept", "application/openmetrics-text; version=1.0.0")
                .body(Body::empty())
                .expect("request"),
        )
        .await
        .expect("response");
    let body = axum::body::to_bytes(response.into_body(), usize::MAX)
        .await
        .expect("body");
    assert!(String::from_utf8_lossy(&body).ends_with("# EOF\n"));

    assert_eq!(send(&view, "GET", "/healthz").await.0, StatusCode::OK);
    assert_eq!(
        send(&view, "GET", "/readyz").await.0,
        StatusCode::SERVICE_UNAVAILABLE
    );
    view.ready.store(true, Ordering::Relaxed);
    assert_eq!(send(&view, "GET", "/readyz").await.0, StatusCode::OK);
}

#[tokio::test]
async fn tasks_and_pending_prompts_show_with_the_output_tail() {
    use crate::status::tasks::{PromptKind, PromptRecord, PromptState, TaskPhase, TaskRecord};
    let (_dir, view) = view_with_status();
    let record = TaskRecord {
        name: "build".into(),
        vm: "web-01".into(),
        generation: 1,
        run: "0123abcd".into(),
        spec_hash: "h".into(),
        task_hash: None,
        rerun: 0,
        phase: TaskPhase::WaitingForInput,
        message: None,
        source: "fleet/tasks/build.yaml".into(),
        revision: None,
        created: None,
        started: Some(std::time::SystemTime::UNIX_EPOCH.into()),
        finished: None,
        boot_id: Some("b".into()),
        exit_code: None,
        repository: None,
        results: Some(crate::status::tasks::RunChanges {
            head: Some("1a2b3c4d5e6f7a8b9c0d".into()),
            commits: 2,
            files_changed: 1,
            insertions: 10,
            deletions: 2,
            pushed: Some("https://git.example.org/app fleet/build/0123abcd".into()),
            ..Default::default()
        }),
        seq: 2,
        output_bytes: 0,
        output_truncated: false,
        artifact_bytes: 0,
        artifact_files: 0,
        refused: Vec::new(),
        egress: Some(crate::status::tasks::EgressUse {
            connections: 12,
            refused: 1,
            bytes_up: 3200,
            bytes_down: 2 * 1024 * 1024,
            tokens_in: 1200,
            tokens_out: 300,
            ..Default::default()
        }),
        prompts: 1,
        pending_prompt: Some("build-0123abcd-1".into()),
        artifacts: Vec::new(),
        fail_on_cancel: None,
        cancelled_by: None,
        host_timeout: false,
        updated: None,
        fresh: None,
        earlier_members: Vec::new(),
    };
    view.status.reset_task_files("build").expect("reset");
    let output = b"\x1b[32mcompiling\x1b[0m\r\n<b>Deploy? (y/n)</b> ";
    view.status
        .write_task_output("build", 0, output)
        .expect("output");
    let end = output.len() as u64;
    view.status
        .write_task_record(&TaskRecord {
            output_bytes: end,
            ..record
        })
        .expect("record");
    view.status
        .write_prompt(&PromptRecord {
            id: "build-0123abcd-1".into(),
            allow_control: false,
            kind: PromptKind::Input,
            task: "build".into(),
            vm: "web-01".into(),
            text: "<b>Deploy? (y/n)</b>".into(),
            context: vec!["compiling".into()],
            options: Vec::new(),
            guest_seq: None,
            created: std::time::SystemTime::UNIX_EPOCH.into(),
            deadline: std::time::SystemTime::UNIX_EPOCH.into(),
            state: PromptState::Pending,
            overdue: false,
            response: None,
            answered_by: None,
            answered_at: None,
            delivered: false,
            refused: Vec::new(),
        })
        .expect("prompt");

    let (_, overview) = send(&view, "GET", "/").await;
    assert!(overview.contains("Waiting for a human (1)"), "{overview}");
    assert!(overview.contains("build-0123abcd-1"), "{overview}");
    assert!(overview.contains("href=\"/tasks/build\""), "{overview}");
    assert!(overview.contains("WaitingForInput"), "{overview}");
    assert!(!overview.contains("<b>Deploy"), "escaped: {overview}");

    let (status, page) = send(&view, "GET", "/tasks/build").await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        page.contains("compiling\n&lt;b&gt;Deploy? (y/n)&lt;/b&gt;"),
        "{page}"
    );
    assert!(!page.contains('\u{1b}'), "terminal codes are dropped");
    assert!(
        page.contains(
            "12 connections (1 refused), 3.1 KiB up, 2.0 MiB down, 1200 tokens in, 300 out"
        ),
        "{page}"
    );
    assert!(
        page.contains(
            "2 commits, 1 file changed, +10 -2, head 1a2b3c4d5e6f; pushed to https://git.example.org/app fleet/build/0123abcd"
        ),
        "{page}"
    );
    assert_eq!(
        send(&view, "GET", "/tasks/nope").await.0,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        send(&view, "GET", "/tasks/..%2Fsecret").await.0,
        StatusCode::NOT_FOUND
    );

    let (_, api) = send(&view, "GET", "/api/v1/status").await;
    let json: serde_json::Value = serde_json::from_str(&api).expect("json");
    assert_eq!(json["tasks"]["build"]["phase"], "WaitingForInput");
    assert_eq!(json["prompts"]["build-0123abcd-1"]["state"], "pending");
}

#[tokio::test]
async fn pending_approvals_show_their_steps_and_how_to_approve() {
    use crate::approvals::{ApprovalRecord, ApprovalState};
    let (dir, view) = view_with_status();
    let record = |id: &str, state| ApprovalRecord {
        id: id.into(),
        kind: "approval".into(),
        plan_digest: "ab".repeat(32),
        revision: "abc".into(),
        state,
        steps: vec!["destroy <db-01> on local: db-01 is protected".into()],
        plan: String::new(),
        created: None,
        approved_by: None,
        approved_at: None,
        refused: Vec::new(),
    };
    let hitl = dir.path().join("status/hitl");
    std::fs::create_dir_all(&hitl).expect("mkdir");
    for (id, state) in [
        ("approval-abababababab", ApprovalState::Pending),
        ("approval-cdcdcdcdcdcd", ApprovalState::Approved),
    ] {
        let text = serde_saphyr::to_string(&record(id, state)).expect("yaml");
        std::fs::write(hitl.join(format!("{id}.yaml")), text).expect("write");
    }
    let (_, page) = send(&view, "GET", "/").await;
    assert!(page.contains("approval-abababababab"), "{page}");
    assert!(
        page.contains("destroy &lt;db-01&gt; on local"),
        "escaped: {page}"
    );
    assert!(page.contains(&format!(
        "fleet hitl answer approval-abababababab {}",
        "ab".repeat(32)
    )));
    assert!(!page.contains("approval-cdcdcdcdcdcd"), "only pending ones");
}

#[tokio::test]
async fn the_overview_flags_a_provider_that_skips_tls_verification() {
    let (dir, view) = view_with_status();
    let (_, body) = send(&view, "GET", "/").await;
    assert!(!body.contains("Warning:"), "{body}");
    std::fs::write(
        dir.path().join("status/plan.json"),
        r#"{"warnings": ["provider pve accepts any TLS certificate (insecureSkipVerify: true)"]}"#,
    )
    .expect("plan.json");
    let (_, body) = send(&view, "GET", "/").await;
    assert!(
        body.contains("Warning: </strong>provider pve accepts any TLS certificate"),
        "{body}"
    );
}

async fn send_with(
    view: &Arc<View>,
    uri: &str,
    headers: &[(&str, &str)],
) -> (StatusCode, axum::http::HeaderMap) {
    let mut request = Request::builder().method("GET").uri(uri);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let response = app(view.clone())
        .oneshot(request.body(Body::empty()).expect("request"))
        .await
        .expect("response");
    (response.status(), response.headers().clone())
}

#[tokio::test]
async fn only_its_own_host_names_and_with_a_token_its_holders_are_answered() {
    let (_dir, plain) = view_with_status();
    let listen: std::net::SocketAddr = "127.0.0.1:7070".parse().expect("addr");
    let view = Arc::new(View::with_access(
        plain.status.clone(),
        plain.metrics.clone(),
        Access::for_listen(listen, &["fleet.internal".to_owned()], None),
    ));
    for host in ["localhost:7070", "127.0.0.1:7070", "fleet.internal:7070"] {
        let (code, headers) = send_with(&view, "/api/v1/status", &[("host", host)]).await;
        assert_eq!(code, StatusCode::OK, "{host}");
        assert_eq!(headers["x-frame-options"], "DENY");
        assert!(
            headers["content-security-policy"]
                .to_str()
                .expect("ascii")
                .contains("default-src 'none'")
        );
    }
    for host in [
        "attacker.example",
        "attacker.example:7070",
        "localhost:7071",
    ] {
        let (code, _) = send_with(&view, "/api/v1/status", &[("host", host)]).await;
        assert_eq!(code, StatusCode::MISDIRECTED_REQUEST, "{host}");
    }

    let token = "s3cret-token-for-the-page";
    let guarded = Arc::new(View::with_access(
        plain.status.clone(),
        plain.metrics.clone(),
        Access::for_listen(
            "0.0.0.0:7070".parse().expect("addr"),
            &[],
            Some(secrecy::SecretString::from(token.to_owned())),
        ),
    ));
    let host = ("host", "0.0.0.0:7070");
    let (code, _) = send_with(&guarded, "/api/v1/status", &[host]).await;
    assert_eq!(code, StatusCode::UNAUTHORIZED);
    let wrong = format!("Bearer {token}x");
    let (code, _) = send_with(
        &guarded,
        "/api/v1/status",
        &[host, ("authorization", &wrong)],
    )
    .await;
    assert_eq!(code, StatusCode::UNAUTHORIZED);
    let right = format!("Bearer {token}");
    let (code, _) = send_with(
        &guarded,
        "/api/v1/status",
        &[host, ("authorization", &right)],
    )
    .await;
    assert_eq!(code, StatusCode::OK);
    let (code, _) = send_with(&guarded, "/healthz", &[host]).await;
    assert_eq!(code, StatusCode::OK, "probes need no token");
}
