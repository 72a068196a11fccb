//! `fleet serve`: one loop that keeps the fleet converged.
//!
//! Triggers — a new commit on the tracked branch (the `.git` directory is watched and the
//! branch tip reread from git objects), a hypervisor event, the periodic tick, a VM's backoff
//! running out — are coalesced: the loop drains every pending trigger, then runs one
//! reconcile of the newest revision. A revision that fails to load is refused (recorded in
//! summary.yaml and events) and the last good one stays in force. A VM whose step failed
//! is skipped until its backoff (1 s doubling to 5 min) runs out, and reset on success.
//! SIGTERM or SIGINT end the loop after the reconcile in flight; the lock is released.

mod agents;
mod backoff;
pub mod follow;
mod systemd;
mod watch;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Instant, SystemTime};

use anyhow::{Context, Result};
use tokio::sync::mpsc;

use crate::apply::Drivers;
use crate::http::{Metrics, View};
use crate::reconcile::{self, Workspace};
use crate::resolve::Desired;
use crate::source::Revision;
use crate::status::lock::StatusLock;
use crate::tasks::TaskBook;

#[derive(Clone, Debug)]
pub struct ServeOptions {
    /// The branch to follow; default: the branch HEAD points to (or, following a remote,
    /// the host `source`'s branch).
    pub branch: Option<String>,
    /// A remote to follow instead of the local repository (host `source.url` otherwise).
    pub source: Option<String>,
    pub listen: SocketAddr,
    /// Host names the page answers to besides its own address (and, on loopback,
    /// `localhost`).
    pub allow_hosts: Vec<String>,
    /// A file (mode 0600) holding the bearer token the page requires; needed when it
    /// listens beyond loopback.
    pub token_file: Option<std::path::PathBuf>,
    /// Where the webhook listener listens, if anywhere, and its shared secret's file.
    pub webhook: Option<(SocketAddr, std::path::PathBuf)>,
}

/// The webhook's shared secret: a host file (mode 0600) of at least 16 characters.
fn webhook_secret(path: &std::path::Path) -> Result<secrecy::SecretString> {
    crate::secrets::check_private_file(path).map_err(anyhow::Error::msg)?;
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading the webhook secret {}", path.display()))?;
    let secret = text.trim();
    anyhow::ensure!(
        secret.len() >= 16,
        "the webhook secret in {} is shorter than 16 characters",
        path.display()
    );
    Ok(secrecy::SecretString::from(secret.to_owned()))
}

/// The page's bearer token, if it has one. A page beyond loopback without one is refused:
/// every task's output and prompt would be open to the network.
fn page_token(options: &ServeOptions) -> Result<Option<secrecy::SecretString>> {
    let Some(path) = &options.token_file else {
        if !options.listen.ip().is_loopback() {
            anyhow::bail!(
                "the status page would listen on {} without a token: pass --token-file FILE (mode 0600), or listen on 127.0.0.1",
                options.listen
            );
        }
        return Ok(None);
    };
    crate::secrets::check_private_file(path).map_err(anyhow::Error::msg)?;
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading the page token {}", path.display()))?;
    let token = text.trim();
    anyhow::ensure!(
        token.len() >= 16,
        "the page token in {} is shorter than 16 characters",
        path.display()
    );
    crate::secrets::no_core_dumps();
    Ok(Some(secrecy::SecretString::from(token.to_owned())))
}

/// The most preview refs considered, and planned in one pass.
const MAX_PREVIEW_REFS: usize = 200;
const PREVIEWS_PER_PASS: usize = 4;

/// A preview's directory under `status/previews/`: the ref's name made safe (`/` and
/// anything unusual become `-`), then a digest of the whole name, so two refs never
/// share one.
fn preview_slug(name: &str) -> String {
    use sha2::Digest;
    let readable: String = name
        .chars()
        .take(80)
        .map(|c| {
            if c.is_ascii_alphanumeric() || "._-".contains(c) {
                c
            } else {
                '-'
            }
        })
        .collect();
    let digest = fleet_core::digest::hex(&sha2::Sha256::digest(name.as_bytes()));
    format!("{readable}-{}", &digest[..8])
}

/// The least time between the starts of two fetches of the followed remote.
const MIN_FETCH_GAP: std::time::Duration = std::time::Duration::from_millis(250);

/// The least time between the end of a pass and one that only agents' presence starts.
const AGENT_TRIGGER_GAP: std::time::Duration = std::time::Duration::from_secs(1);

/// What woke the loop, drained from the trigger channel.
#[derive(Default)]
struct Woken {
    shutdown: bool,
    /// Woken by something other than an agent's presence.
    by_other: bool,
    /// Told to fetch the followed remote now.
    fetch: bool,
    /// Fetches that finished.
    fetched: Vec<FetchOutcome>,
}

/// What a background fetch of the followed remote found, and how long it took.
#[derive(Debug)]
pub struct FetchOutcome {
    result: std::result::Result<follow::Fetched, String>,
    took: std::time::Duration,
}

impl Woken {
    fn note(&mut self, trigger: Option<Trigger>) {
        match trigger {
            Some(Trigger::Shutdown) | None => self.shutdown = true,
            Some(Trigger::Agent) => {}
            Some(Trigger::Members) => self.by_other = true,
            Some(Trigger::Fetch) => {
                self.fetch = true;
                self.by_other = true;
            }
            Some(Trigger::Fetched(outcome)) => {
                self.fetched.push(*outcome);
                self.by_other = true;
            }
            Some(t) => {
                tracing::debug!(?t, "woken");
                self.by_other = true;
            }
        }
    }
}

/// Why the loop woke up. The reconcile does not care which: it converges from any state.
#[derive(Debug)]
pub enum Trigger {
    /// Something under `.git` changed.
    Git,
    /// A VM changed on a host (`None`: anything may have).
    Host {
        provider: String,
    },
    /// A guest agent connected, disconnected or rebooted.
    Agent,
    /// `fleet reconcile` (SIGUSR1) or a webhook: fetch the followed remote and reconcile now.
    Fetch,
    /// A fetch of the followed remote finished.
    Fetched(Box<FetchOutcome>),
    /// A fresh task run was given a member or let its member go.
    Members,
    Shutdown,
}

/// The remote `fleet serve` follows, if any: `--source`, else the host's `source`; the
/// branch from `--branch`, else the source's.
fn followed_source(
    options: &ServeOptions,
    host: &crate::spec::HostSpec,
) -> Result<Option<crate::spec::HostSource>> {
    let mut source = match (&options.source, &host.source) {
        (None, None) => return Ok(None),
        (Some(url), configured) => {
            anyhow::ensure!(
                ["https://", "ssh://", "file://"]
                    .iter()
                    .any(|scheme| url.starts_with(scheme)),
                "--source {url:?}: follow an https://, ssh:// or file:// URL"
            );
            anyhow::ensure!(
                !crate::load::url_has_password(url),
                "--source: a password in the URL would be shown in logs and status files; put the token in the host source's credentialFile"
            );
            let mut source = configured.clone().unwrap_or(crate::spec::HostSource {
                url: String::new(),
                branch: None,
                poll_interval: None,
                credential_file: None,
                username: None,
                preview_refs: Vec::new(),
            });
            source.url = url.clone();
            source
        }
        (None, Some(configured)) => configured.clone(),
    };
    if let Some(branch) = &options.branch {
        source.branch = Some(branch.clone());
    }
    Ok(Some(source))
}

/// Runs the daemon until SIGTERM or SIGINT.
pub async fn serve(ws: Workspace, options: ServeOptions) -> Result<()> {
    // Signals are handled before the lock names this process: `fleet reconcile` signals
    // the lock's holder, and SIGUSR1's default would end it.
    let (tx, mut rx) = mpsc::unbounded_channel::<Trigger>();
    spawn_signal_handler(tx.clone())?;
    let lock = StatusLock::acquire(ws.status.root(), "fleet serve")?;
    if let Some(dead) = &lock.stale {
        tracing::warn!(
            "took over a stale lock left by PID {} ({})",
            dead.pid,
            dead.command
        );
    }
    ws.status.ensure()?;
    // Read once: a changed host configuration takes effect when fleet serve restarts.
    let host = ws.host()?;
    let mut ws = ws;
    // Every event written from here on (by any clone of the status directory) is also
    // sent to the host's notification sinks.
    let metrics = Arc::new(Metrics::default());
    if let Some(listener) = crate::notify::start(&host.notify, &ws.status, &metrics)? {
        ws.status = ws.status.with_listener(listener);
    }
    // Following a remote, the repository read is fleet's own mirror of it.
    let follow = match followed_source(&options, &host)? {
        Some(source) => {
            let dir = ws
                .status
                .root()
                .parent()
                .unwrap_or(ws.status.root())
                .join("source");
            let follow = follow::Follow::open(&source, &dir, &host.git)?;
            ws.repo_root = follow.mirror.clone();
            Some(Arc::new(follow))
        }
        None => None,
    };
    let branch = match (&follow, &options.branch) {
        (Some(f), _) => f.branch.clone(),
        (None, Some(b)) => b.clone(),
        (None, None) => crate::source::current_branch(&ws.repo_root)?,
    };
    match &follow {
        Some(f) => tracing::info!(branch, url = %f.url, "following a remote"),
        None => tracing::info!(branch, "following branch"),
    }

    let _git_watcher = watch::watch_git(&ws.repo_root, tx.clone())?;

    let token = page_token(&options)?;
    crate::http::server::raise_open_file_limit();
    let listener = tokio::net::TcpListener::bind(options.listen)
        .await
        .with_context(|| format!("cannot listen on {}", options.listen))?;
    let local = listener.local_addr()?;
    let access = crate::http::Access::for_listen(local, &options.allow_hosts, token);
    let view = Arc::new(View::with_access(
        ws.status.clone(),
        metrics.clone(),
        access,
    ));
    eprintln!("fleet serve: following {branch}, status page on http://{local}/");
    let (stop_http, http_stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(crate::http::server::serve(
        listener,
        crate::http::app(view.clone()),
        http_stopped,
    ));
    // The webhook listener: its own address, and it only ever asks for a fetch.
    let (stop_hook, hook_stopped) = tokio::sync::oneshot::channel::<()>();
    let hook_server = match &options.webhook {
        Some((address, secret_file)) => {
            anyhow::ensure!(
                follow.is_some(),
                "--webhook-listen needs a remote to follow (host source, or --source)"
            );
            let secret = webhook_secret(secret_file)?;
            let hook_listener = tokio::net::TcpListener::bind(address)
                .await
                .with_context(|| format!("cannot listen for webhooks on {address}"))?;
            eprintln!(
                "fleet serve: webhook on http://{}/",
                hook_listener.local_addr()?
            );
            let trigger = tx.clone();
            let notify: crate::http::webhook::Notify = Arc::new(move || {
                let _ = trigger.send(Trigger::Fetch);
            });
            Some(tokio::spawn(crate::http::server::serve(
                hook_listener,
                crate::http::webhook::app(secret, ws.status.clone(), notify),
                hook_stopped,
            )))
        }
        None => None,
    };

    let upstreams = crate::broker::Upstreams::from_host(&host.egress)?;
    let tasks = Arc::new(
        TaskBook::open(ws.status.clone(), ws.repo_root.clone()).with_git(host.git.clone()),
    );
    // A fresh run that got or let go of a member, or a run made or ended on a VM that
    // resets before each run, is planned for at once.
    let trigger = tx.clone();
    tasks.on_plan_again(move || {
        let _ = trigger.send(Trigger::Members);
    });
    // Host answer files appear in status/hitl/: one watcher tells every link, instead of
    // each link listing the directory twice a second.
    let hitl = ws.status.hitl_dir();
    let wakers = agents::LinkWakers::default();
    let hitl_watcher = crate::fsguard::create_private_dirs(&hitl)
        .map_err(anyhow::Error::from)
        .and_then(|()| {
            let (book, wakers) = (tasks.clone(), wakers.clone());
            watch::watch_dir(&hitl, move || {
                book.answer_files_changed();
                wakers.wake_all();
            })
        });
    match &hitl_watcher {
        Ok(_) => tasks.watching_answer_files(),
        Err(e) => tracing::warn!("{e:#}; looking for host answer files every 500 ms instead"),
    }
    // `fleet exec` reaches the guests through the links this process holds.
    let exec_routes = crate::exec::link::Routes::default();
    match crate::exec::server::start(&ws.status, exec_routes.clone()) {
        Ok(socket) => tracing::info!(socket = %socket.display(), "taking exec requests"),
        // Everything else works without it: fleet exec says it cannot reach the daemon.
        Err(e) => tracing::warn!("no fleet exec: {e:#}"),
    }
    let agents = agents::Agents::new(
        tasks.clone(),
        wakers,
        upstreams,
        metrics.clone(),
        exec_routes,
    );
    let verifier = crate::trust::Verifier::new(&host.trust);
    let baseline = baseline(&ws, &host);
    let mut daemon = Daemon {
        ws,
        host,
        branch,
        tx,
        metrics,
        view,
        drivers: BTreeMap::new(),
        providers: Vec::new(),
        credentials: String::new(),
        journal: None,
        last_good: None,
        refused: None,
        backoff: backoff::Backoff::default(),
        crash: backoff::CrashLoops::default(),
        agents,
        tasks,
        vault: Arc::default(),
        verifier,
        next_resync: Instant::now(),
        next_deadline: None,
        follow,
        next_fetch: Instant::now(),
        fetching: false,
        fetch_again: false,
        fetch_started: None,
        fetch_error: None,
        baseline,
        suspended: None,
        suspended_plan: None,
        noted: None,
    };
    let mut shutdown = false;
    let mut fetch_now = true;
    // Ready once it holds the lock and serves the page: the first pass may take as long as
    // its applies (creates under TCG, stops waiting out their grace), far past a start
    // timeout. `systemctl status` follows each pass's outcome.
    systemd::ready("starting: the first reconcile is under way");
    systemd::spawn_watchdog();
    while !shutdown {
        if fetch_now || Instant::now() >= daemon.next_fetch {
            daemon.start_fetch(fetch_now);
        }
        daemon.reconcile().await;
        daemon.previews().await;
        systemd::status(&daemon.status_line());
        let finished = Instant::now();
        let wake = daemon.next_wake();
        // Wait for a trigger or the next deadline, then drain what else is queued.
        let mut woken = Woken::default();
        tokio::select! {
            trigger = rx.recv() => woken.note(trigger),
            () = tokio::time::sleep_until(wake.into()) => woken.by_other = true,
        }
        while let Ok(t) = rx.try_recv() {
            woken.note(Some(t));
        }
        // Presence (an agent saying hello) is the one trigger a guest controls: a pass it
        // alone starts waits until AGENT_TRIGGER_GAP after the last one, so a guest that
        // keeps changing its boot id cannot keep fleet reconciling back to back. A commit,
        // a host event or a deadline is served at once (and by the same pass).
        if !woken.shutdown && !woken.by_other && finished.elapsed() < AGENT_TRIGGER_GAP {
            tokio::time::sleep(AGENT_TRIGGER_GAP - finished.elapsed()).await;
            while let Ok(t) = rx.try_recv() {
                woken.note(Some(t));
            }
        }
        shutdown = woken.shutdown;
        fetch_now = woken.fetch;
        for outcome in woken.fetched {
            fetch_now |= daemon.record_fetch(outcome);
        }
    }
    eprintln!("fleet serve: stopping");
    systemd::stopping();
    for driver in daemon.drivers.values() {
        driver.unwatch();
    }
    let _ = stop_http.send(());
    let _ = server.await;
    let _ = stop_hook.send(());
    if let Some(hook) = hook_server {
        let _ = hook.await;
    }
    drop(lock);
    Ok(())
}

struct Daemon {
    ws: Workspace,
    host: crate::spec::HostSpec,
    branch: String,
    tx: mpsc::UnboundedSender<Trigger>,
    metrics: Arc<Metrics>,
    view: Arc<View>,
    drivers: Drivers,
    /// The provider definitions the drivers were made from (rebuilt when they change).
    providers: Vec<crate::resolve::DesiredProvider>,
    /// What `reconcile::credentials_digest` said when the drivers were made.
    credentials: String,
    journal: Option<Arc<crate::apply::Journal>>,
    last_good: Option<Desired>,
    /// The revision last refused, so it is reported once.
    refused: Option<Revision>,
    backoff: backoff::Backoff,
    /// VMs that keep stopping on their own.
    crash: backoff::CrashLoops,
    agents: agents::Agents,
    tasks: Arc<TaskBook>,
    /// The secret values of `last_good`, opened when it was loaded.
    vault: Arc<crate::secrets::Vault>,
    /// The host's trust roots, when it applies only signed commits.
    verifier: Option<crate::trust::Verifier>,
    next_resync: Instant,
    /// When the soonest lease ends or VM may become idle (a pass decides then).
    next_deadline: Option<SystemTime>,
    /// The remote followed, if any, and when it is fetched next.
    follow: Option<Arc<follow::Follow>>,
    next_fetch: Instant,
    /// A fetch runs (in the background: a slow remote never holds a pass back), and
    /// whether another was asked for meanwhile.
    fetching: bool,
    fetch_again: bool,
    fetch_started: Option<Instant>,
    /// The last fetch's error, reported once while it repeats.
    fetch_error: Option<String>,
    /// The revision in force, and whether it lets a tip that does not descend from it be
    /// applied (`policy.allowRollback`).
    baseline: Option<(String, bool)>,
    /// Why nothing is applied, as last written to the summary.
    suspended: Option<String>,
    /// The commit last given a git note, and what the note said but its time.
    noted: Option<(String, String)>,
    /// The digest of the plan last reported while suspended.
    suspended_plan: Option<String>,
}

/// The revision the status directory says is in force, for judging the first tip after a
/// restart: its id and its `policy.allowRollback` (false when it cannot be read).
fn baseline(ws: &Workspace, host: &crate::spec::HostSpec) -> Option<(String, bool)> {
    if let Some(recorded) = ws.status.read_in_force() {
        return Some(recorded);
    }
    // A status directory from before in-force.json: the revision last applied.
    let applied = ws.status.read_summary()?.revision_applied?;
    if applied.id.starts_with("worktree:") {
        return None;
    }
    let allow = crate::source::from_git(&ws.repo_root, &ws.fleet_dir, Some(&applied.id))
        .ok()
        .and_then(|snapshot| reconcile::desired(&snapshot, host).ok())
        .is_some_and(|d| d.policy.allow_rollback);
    Some((applied.id, allow))
}

/// When the next pass must run for a lease's end or a VM becoming idle (`lease`, `idle`).
fn lease_or_idle_deadline(planned: &reconcile::Planned, desired: &Desired) -> Option<SystemTime> {
    let now = crate::time::Timestamp::from(SystemTime::now());
    let leases = crate::lease::states(desired, &planned.observed, &planned.inputs.leases);
    let lease_end = crate::lease::next_end(leases.values(), now);
    // A lease not started yet starts with a create in this pass: look again within its ttl.
    let unstarted = desired
        .leases
        .iter()
        .filter(|(vm, _)| !leases.contains_key(*vm))
        .map(|(_, lease)| crate::time::Timestamp::from(now.system_time() + lease.ttl))
        .min();
    let idle = desired
        .idle
        .iter()
        .filter_map(|(vm, after)| Some((*after, planned.inputs.activity.get(vm)?)));
    let idle_at = crate::idle::next_idle(idle, now);
    lease_end
        .into_iter()
        .chain(unstarted)
        .chain(idle_at)
        .min()
        .map(|t| t.system_time())
}

impl Daemon {
    /// When to wake without a trigger: the periodic tick, or a backoff running out.
    fn next_wake(&self) -> Instant {
        let interval = self
            .last_good
            .as_ref()
            .map_or(crate::resolve::DEFAULT_RECONCILE_INTERVAL, |d| {
                d.policy.reconcile_interval
            });
        let tick = Instant::now() + interval;
        let soonest_retry = match (self.backoff.next_due(), self.crash.next_due(Instant::now())) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let wake = soonest_retry
            .map_or(tick, |r| r.min(tick))
            .min(self.next_resync)
            .min(self.members_released_at().unwrap_or(tick))
            .min(
                // One already past (a pass that failed since) waits for the tick: never a
                // tight loop.
                self.next_deadline
                    .and_then(|end| end.duration_since(SystemTime::now()).ok())
                    .map_or(tick, |left| Instant::now() + left),
            );
        match &self.follow {
            Some(_) => wake.min(self.next_fetch),
            None => wake,
        }
    }

    /// When the next kept fresh member's `keepFor` is over (its destroy is planned then).
    fn members_released_at(&self) -> Option<Instant> {
        let now = SystemTime::now();
        self.tasks
            .fresh_runs()
            .iter()
            .filter_map(|r| Some(r.finished?.system_time() + r.keep_for))
            .filter(|until| *until > now)
            .min()
            .map(|until| Instant::now() + until.duration_since(now).unwrap_or_default())
    }

    /// Writes what became of the applied commit as a git note (`refs/notes/fleet`), when
    /// its revision is new or the pass changed something, and pushes the notes to the
    /// followed remote in the background.
    fn note(&mut self, desired: &Desired, plan: &crate::plan::Plan, applied: &reconcile::Applied) {
        let commit = &desired.revision.id;
        if commit.starts_with("worktree:") || (self.noted.is_some() && !plan.has_changes()) {
            return;
        }
        let Some(outcome) = &applied.summary.last_reconcile else {
            return;
        };
        let what = format!(
            "fleet: {}\noutcome: {:?}\nplan: {}\nsteps: {} done, {} failed, {} held\n",
            desired.fleet,
            outcome.outcome,
            plan.digest(),
            outcome.succeeded,
            outcome.failed,
            plan.held().len(),
        )
        .to_lowercase();
        // The same outcome again (a step that keeps failing) is no new note, nor a push.
        let noted = (commit.clone(), what.clone());
        if self.noted.as_ref() == Some(&noted) {
            return;
        }
        let text = format!(
            "{what}at: {}\nby: fleet {}\n",
            crate::time::Timestamp::from(SystemTime::now()),
            env!("CARGO_PKG_VERSION")
        );
        if let Err(e) = crate::source::write_note(&self.ws.repo_root, commit, &text) {
            tracing::warn!("cannot write the git note on {commit}: {e}");
            return;
        }
        self.noted = Some(noted);
        if let Some(follow) = self.follow.clone() {
            tokio::task::spawn_blocking(move || {
                if let Err(e) = follow.push_notes() {
                    tracing::warn!("{e:#}");
                }
            });
        }
    }

    /// Plans each preview ref (`source.previewRefs`) whose commit changed, read-only, and
    /// publishes the plan under `status/previews/<ref>/`. Nothing is applied, recorded as
    /// approved, or decrypted: a preview is a pull request's `fleet plan`, made where the
    /// hypervisors can be seen. Anyone may open a pull request, so a pass plans at most
    /// `PREVIEWS_PER_PASS` (the rest wait for the next), of at most `MAX_PREVIEW_REFS`
    /// refs, and the commit each was planned at is kept with its plan, so a restart plans
    /// (and announces) nothing again.
    async fn previews(&mut self) {
        let Some(follow) = self.follow.clone() else {
            return;
        };
        if follow.preview_refs.is_empty() {
            return;
        }
        let refs = crate::source::refs_matching(&self.ws.repo_root, &follow.preview_refs);
        if refs.len() > MAX_PREVIEW_REFS {
            tracing::warn!(
                "{} refs match source.previewRefs; only the first {MAX_PREVIEW_REFS} (by name) are planned",
                refs.len()
            );
        }
        let mut planned = 0;
        for (name, commit) in refs.into_iter().take(MAX_PREVIEW_REFS) {
            let slug = preview_slug(&name);
            if self.ws.status.preview_commit(&slug).as_deref() == Some(commit.as_str()) {
                continue;
            }
            if planned == PREVIEWS_PER_PASS {
                // The rest at the next pass, which comes soon.
                self.next_fetch = self.next_fetch.min(Instant::now() + MIN_FETCH_GAP);
                break;
            }
            planned += 1;
            let (markdown, json, summary) = self.preview(&name).await;
            if let Err(e) = self
                .ws
                .status
                .write_preview(&slug, &commit, &markdown, &json)
            {
                tracing::warn!("cannot publish the preview of {name}: {e}");
                continue;
            }
            let _ = self.ws.status.append_event(&crate::status::Event::fleet(
                crate::status::EventKind::PreviewPlanned,
                Some(commit.clone()),
                format!(
                    "{name} at {} planned: {summary} (status/previews/{slug}/plan.md)",
                    &commit[..commit.len().min(12)]
                ),
            ));
        }
    }

    /// The preview of `reference`: Markdown, JSON and a one-line summary. What a pull
    /// request wrote is escaped; what only the host knows (paths, errors of its own) is
    /// not published.
    async fn preview(&self, reference: &str) -> (String, String, String) {
        use crate::plan::render::md;
        let title = format!("### fleet plan: {}\n\n", md(reference));
        let refused = |why: &str, summary: &str| {
            (
                format!("{title}**{}**\n", md(why)),
                serde_json::json!({ "refused": why }).to_string(),
                summary.to_owned(),
            )
        };
        let Ok(mut snapshot) =
            crate::source::from_git(&self.ws.repo_root, &self.ws.fleet_dir, Some(reference))
        else {
            return refused(
                "its fleet directory cannot be read (see fleet serve's log)",
                "not readable",
            );
        };
        let unsigned = reconcile::verify(&self.ws, self.verifier.as_ref(), &mut snapshot).is_err();
        let desired = match reconcile::desired(&snapshot, &self.host) {
            Ok(d) => d,
            Err(diags) => {
                let lines: Vec<String> = diags.iter().map(ToString::to_string).collect();
                let text = lines.join("\n");
                let fence = "`".repeat(
                    text.split(|c| c != '`')
                        .map(str::len)
                        .max()
                        .unwrap_or(0)
                        .max(2)
                        + 1,
                );
                return (
                    format!(
                        "{title}**{} diagnostic(s): fleet would refuse this revision**\n\n{fence}\n{text}\n{fence}\n",
                        lines.len()
                    ),
                    serde_json::json!({ "diagnostics": lines }).to_string(),
                    format!("{} diagnostic(s)", lines.len()),
                );
            }
        };
        // Ownership is decided by the fleet's name: a preview under another name would
        // read that fleet's VMs and publish their configuration.
        if let Some(current) = &self.last_good
            && current.fleet != desired.fleet
        {
            return refused(
                &format!(
                    "it names the fleet {:?}, not {:?}, the fleet this host runs; not planned",
                    desired.fleet, current.fleet
                ),
                "another fleet's name",
            );
        }
        let planned = reconcile::plan_pass(
            &self.ws,
            &desired,
            &self.drivers,
            &crate::secrets::Vault::default(),
            BTreeMap::new(),
            &self.tasks.fresh_runs(),
        )
        .await;
        let runs = reconcile::task_runs(&self.ws, &desired);
        let mut markdown = crate::plan::render::markdown(&planned.plan, &runs);
        if unsigned {
            markdown = format!(
                "> [!WARNING]\n> fleet serve would refuse this revision: its commit is not signed by a key the host trusts\n\n{markdown}"
            );
        }
        let summary = markdown
            .lines()
            .find_map(|l| l.strip_prefix("**").and_then(|l| l.strip_suffix("**")))
            .unwrap_or("planned")
            .to_owned();
        (markdown, crate::plan::render::json(&planned.plan), summary)
    }

    /// Writes a change of suspension to the summary and as an event (the daemon's, so the
    /// notification sinks hear of `fleet suspend` and `fleet resume` too).
    fn note_suspension(&mut self, now: &Option<String>, revision: &crate::source::Revision) {
        let mut summary = self.ws.status.read_summary().unwrap_or_default();
        if summary.suspended != *now {
            summary.suspended = now.clone();
            let _ = self.ws.status.write_summary(&summary);
        }
        if self.suspended == *now {
            return;
        }
        let (kind, message) = match now {
            Some(why) => (
                crate::status::EventKind::Suspended,
                format!("suspended: {why}"),
            ),
            None => (
                crate::status::EventKind::Resumed,
                format!(
                    "resumed; it was {}",
                    self.suspended.as_deref().unwrap_or("suspended")
                ),
            ),
        };
        let _ = self.ws.status.append_event(&crate::status::Event::fleet(
            kind,
            Some(revision.id.clone()),
            message,
        ));
        match now {
            Some(why) => tracing::warn!("{why}"),
            None => tracing::info!("resumed"),
        }
        self.suspended = now.clone();
    }

    /// Starts a fetch of the followed remote in the background, unless one runs (then,
    /// when `asked` by `fleet reconcile` or a webhook, it runs again when that one ends). Fetches start at least `MIN_FETCH_GAP` apart, so a
    /// flood of triggers (a replayed webhook) costs at most four fetches a second.
    fn start_fetch(&mut self, asked: bool) {
        let Some(follow) = self.follow.clone() else {
            return;
        };
        if self.fetching {
            // A poll that comes due meanwhile is the fetch under way.
            self.fetch_again |= asked;
            return;
        }
        if let Some(last) = self.fetch_started
            && last.elapsed() < MIN_FETCH_GAP
        {
            self.next_fetch = last + MIN_FETCH_GAP;
            return;
        }
        self.fetching = true;
        self.fetch_started = Some(Instant::now());
        self.next_fetch = Instant::now() + follow.interval;
        let tx = self.tx.clone();
        tokio::spawn(async move {
            let started = Instant::now();
            let result = tokio::task::spawn_blocking(move || follow.fetch())
                .await
                .map_err(|e| anyhow::anyhow!("the fetch panicked: {e}"))
                .and_then(|r| r)
                .map_err(|e| format!("{e:#}"));
            let _ = tx.send(Trigger::Fetched(Box::new(FetchOutcome {
                result,
                took: started.elapsed(),
            })));
        });
    }

    /// Records what a fetch found in the summary (a failure reported once while it
    /// repeats; the last good revision stays). True when another fetch was asked for
    /// while it ran.
    fn record_fetch(&mut self, outcome: FetchOutcome) -> bool {
        self.fetching = false;
        let again = std::mem::take(&mut self.fetch_again);
        let Some(follow) = self.follow.clone() else {
            return again;
        };
        self.metrics.observe_fetch(outcome.took.as_secs_f64());
        let mut summary = self.ws.status.read_summary().unwrap_or_default();
        let state = summary.source.get_or_insert_with(Default::default);
        state.url = follow.url.clone();
        state.branch = follow.branch.clone();
        match outcome.result {
            Ok(found) => {
                let tip = match &found {
                    follow::Fetched::Same(tip) | follow::Fetched::Moved { to: tip, .. } => tip,
                };
                state.tip = Some(tip.clone());
                state.fetched = Some(SystemTime::now().into());
                state.error = None;
                self.fetch_error = None;
                if let follow::Fetched::Moved { from, to } = &found {
                    let message = match from {
                        Some(from) => format!(
                            "{} moved from {} to {}",
                            follow.branch,
                            &from[..from.len().min(12)],
                            &to[..to.len().min(12)]
                        ),
                        None => format!("{} is at {}", follow.branch, &to[..to.len().min(12)]),
                    };
                    tracing::info!("{message}");
                    let _ = self.ws.status.append_event(&crate::status::Event::fleet(
                        crate::status::EventKind::SourceFetched,
                        Some(to.clone()),
                        message,
                    ));
                }
            }
            Err(why) => {
                state.error = Some(why.clone());
                if self.fetch_error.as_ref() != Some(&why) {
                    tracing::warn!("{why}");
                    let _ = self.ws.status.append_event(&crate::status::Event::fleet(
                        crate::status::EventKind::SourceFetchFailed,
                        None,
                        why.clone(),
                    ));
                    self.fetch_error = Some(why);
                }
            }
        }
        let _ = self.ws.status.write_summary(&summary);
        again
    }

    /// One line for `systemctl status`: the revision in force and how the last pass ended.
    fn status_line(&self) -> String {
        let summary = self.ws.status.read_summary().unwrap_or_default();
        let revision = self
            .last_good
            .as_ref()
            .map_or("no revision yet", |d| d.revision.label.as_str());
        match summary.last_reconcile {
            Some(r) => format!(
                "{revision}: {}, {} VM(s) running",
                r.outcome.as_str(),
                summary.counts.running
            ),
            None => revision.to_owned(),
        }
    }

    async fn reconcile(&mut self) {
        let started = Instant::now();
        if let Err(e) = self.reconcile_inner().await {
            tracing::error!("reconcile failed: {e:#}");
        }
        self.metrics
            .observe_reconcile(started.elapsed().as_secs_f64());
        self.view.ready.store(true, Ordering::Relaxed);
    }

    async fn reconcile_inner(&mut self) -> Result<()> {
        self.load_revision()?;
        let Some(mut desired) = self.last_good.clone() else {
            return Ok(());
        };
        // Image files change without a commit: read again each pass (a stat per file while
        // it is the version hashed).
        crate::image_content::fill(&mut desired, &self.host);
        let suspended = self
            .ws
            .status
            .host_suspension()
            .map(|why| format!("suspended from the host ({why}); fleet resume lifts it"))
            .or_else(|| {
                desired.policy.suspend.then(|| {
                    format!(
                        "policy.suspend in {}; a revision without it lifts it",
                        desired.revision.label
                    )
                })
            });
        self.tasks.set_suspended(suspended.is_some());
        // Suspended, the journal is not opened: recovering it would change VMs.
        self.ensure_drivers(&desired, suspended.is_some()).await?;
        if Instant::now() >= self.next_resync {
            for driver in self.drivers.values() {
                driver.resync();
            }
            self.next_resync = Instant::now() + desired.policy.resync_interval;
        }
        // A VM in backoff keeps its steps in the plan, as deferred, until its wait is over;
        // so does a crash-looping one until its next restart is due.
        let now = Instant::now();
        let mut deferred = self.backoff.deferred(now);
        for (vm, why) in self.crash.deferred(now) {
            deferred.entry(vm).or_insert(why);
        }
        let crash_loops = self.crash.looping(now);
        let runs = self.tasks.fresh_runs();
        let planned = reconcile::plan_pass(
            &self.ws,
            &desired,
            &self.drivers,
            &self.vault,
            deferred,
            &runs,
        )
        .await;
        self.next_deadline = lease_or_idle_deadline(&planned, planned.desired(&desired));
        self.note_suspension(&suspended, &desired.revision);
        if suspended.is_some() {
            // Observed and planned, drift reported; nothing applied, no task started. A
            // renewal is still counted when it is seen.
            if let Err(e) = self.ws.status.write_leases(&planned.inputs.leases) {
                tracing::error!("cannot record leases: {e}");
            }
            let plan = planned.plan;
            if self.suspended_plan.as_deref() != Some(plan.digest()) {
                self.ws.status.write_plan(&plan)?;
                for d in plan.drift() {
                    self.ws.status.append_event(&crate::status::Event::vm(
                        crate::status::EventKind::VmDrifted,
                        &d.vm,
                        &d.provider,
                        &plan.revision().id,
                        format!("{}: {}; not healed while suspended", d.vm, d.what),
                    ))?;
                }
                self.suspended_plan = Some(plan.digest().to_owned());
            }
            return Ok(());
        }
        self.suspended_plan = None;
        let journal = self.journal.clone().context("journal not open")?;
        reconcile::record_decisions(&self.ws, &desired, &planned);
        let reconcile::Planned {
            observed,
            plan,
            members,
            effective,
            inputs,
            ..
        } = planned;
        // From here on, the fresh members and placed pool members are what fleet wants.
        let desired = effective.unwrap_or(desired);
        if !plan.deferred().is_empty() {
            tracing::info!(
                "{} step(s) wait for their VM's backoff",
                plan.deferred().len()
            );
        }
        let applied = reconcile::apply_and_record(
            &self.ws,
            reconcile::Pass {
                desired: &desired,
                plan: &plan,
                observed: &observed,
                agents: &self.agents.snapshot(),
                crash_loops: &crash_loops,
                leases: &inputs.leases,
            },
            &self.drivers,
            journal,
            false,
        )
        .await?;
        // Follow the agent of every VM that runs now (and only those). A VM on a provider
        // the last look could not reach is not known to have stopped: its link and its
        // runs go on (a flaky API must not fail every task under way).
        let running: Vec<(String, Arc<dyn crate::driver::Driver>)> = applied
            .vms
            .values()
            .filter(|vm| {
                vm.phase == crate::status::Phase::Running
                    || applied.unreachable.contains(&vm.provider)
            })
            .filter_map(|vm| Some((vm.name.clone(), self.drivers.get(&vm.provider)?.clone())))
            .collect();
        let running_names = running.iter().map(|(n, _)| n.clone()).collect();
        self.agents.sync(running, &self.tx);
        self.tasks.set_members(&members);
        self.tasks
            .sync(&desired, self.vault.clone(), &running_names);
        // What the links should run may have changed: each looks now, not at its next tick.
        self.agents.wake_all();
        let retention = desired.policy.retention;
        self.ws
            .status
            .set_log_rotation(retention.log_bytes, retention.log_files);
        let pruned = self.tasks.prune(retention, SystemTime::now());
        if !pruned.is_empty() {
            tracing::info!(
                "pruned the finished runs of {} task(s) no longer in the revision (policy.retention): {}",
                pruned.len(),
                pruned.join(", ")
            );
        }
        // Fingerprints only: what the next plan's secret changes are measured against.
        self.ws
            .status
            .write_secrets_seen(&self.vault.seen(&desired))?;
        // Starts that healed a VM stopping on its own: counted, and the third within the
        // window makes a crash loop. A stop soon after fleet itself started the VM is the
        // guest's too, whatever the plan calls the start (drift, or the spec wanting it
        // running when the VM stopped before fleet saw it run).
        let now = Instant::now();
        let restarts: Vec<&str> = plan
            .steps()
            .iter()
            .filter(|s| {
                // A start for a run due on a VM fleet stopped itself (idle) is no restart.
                s.action() == crate::plan::Action::Start
                    && !matches!(s.reason, crate::plan::Reason::Woken { .. })
                    && (matches!(s.reason, crate::plan::Reason::Drifted { .. })
                        || self.crash.recent(&s.vm, now))
            })
            .map(|s| s.vm.as_str())
            .collect();
        for result in applied.report.results.iter().filter(|r| r.ok) {
            if matches!(
                result.action,
                crate::plan::Action::Create | crate::plan::Action::Start
            ) {
                self.crash.started(&result.vm, now);
            }
            if !restarts.contains(&result.vm.as_str()) {
                continue;
            }
            if let Some(wait) = self.crash.restarted(&result.vm, now) {
                let message = format!(
                    "{} keeps stopping on its own (started again {} times within {} min): its next restart waits {} s",
                    result.vm,
                    backoff::LOOP_RESTARTS,
                    backoff::LOOP_WINDOW.as_secs() / 60,
                    wait.as_secs()
                );
                tracing::warn!("{message}");
                let _ = self.ws.status.append_event(&crate::status::Event::vm(
                    crate::status::EventKind::VmCrashLooping,
                    &result.vm,
                    &result.provider,
                    &desired.revision.id,
                    message,
                ));
            }
        }
        self.crash.retain(|vm| desired.vms.contains_key(vm));
        for result in &applied.report.results {
            self.metrics.count_step(result.action.as_str(), result.ok);
            if result.ok {
                self.backoff.succeeded(&result.vm);
            } else {
                let delay = self.backoff.failed(&result.vm, Instant::now());
                tracing::warn!(vm = %result.vm, "step failed; next try in {delay:?}");
            }
        }
        self.note(&desired, &plan, &applied);
        self.metrics.set_phases(&applied.summary.counts);
        Ok(())
    }

    /// Reads the branch tip; keeps the last good revision when the new one does not load.
    fn load_revision(&mut self) -> Result<()> {
        let rev = format!("refs/heads/{}", self.branch);
        // Following a remote, the mirror has no branch until the first fetch ends.
        if self.follow.is_some()
            && crate::source::branch_tip(&self.ws.repo_root, &self.branch)?.is_none()
        {
            return Ok(());
        }
        let mut snapshot =
            crate::source::from_git(&self.ws.repo_root, &self.ws.fleet_dir, Some(&rev))?;
        if self
            .last_good
            .as_ref()
            .is_some_and(|d| d.revision.id == snapshot.revision.id)
        {
            return Ok(());
        }
        if self
            .refused
            .as_ref()
            .is_some_and(|r| r.id == snapshot.revision.id)
        {
            return Ok(());
        }
        let fleet = self
            .last_good
            .as_ref()
            .map(|d| d.fleet.clone())
            .unwrap_or_default();
        if let Err(e) = reconcile::verify(&self.ws, self.verifier.as_ref(), &mut snapshot) {
            tracing::warn!(revision = %snapshot.revision.label, "revision refused: {e}");
            self.refuse(&fleet, &snapshot.revision, &[e.to_string()])?;
            // A verifier that could not run is asked again at the next pass.
            if !matches!(e, crate::trust::Unverified::Failed { .. }) {
                self.refused = Some(snapshot.revision);
            }
            return Ok(());
        }
        // A tip that does not descend from the revision in force (a force-push, a reset)
        // is applied only when that revision allows it.
        if let Some((base, allow)) = &self.baseline
            && !crate::source::descends(&self.ws.repo_root, &snapshot.revision.id, base)
        {
            let message = format!(
                "the branch moved backwards: {} does not descend from {}, the revision in force",
                snapshot.revision.label,
                &base[..base.len().min(12)]
            );
            let _ = self.ws.status.append_event(&crate::status::Event::fleet(
                crate::status::EventKind::SourceRewound,
                Some(snapshot.revision.id.clone()),
                message.clone(),
            ));
            if !allow {
                let why = format!(
                    "{message}; the revision in force sets no policy.allowRollback: true, so it stays (push a descendant of it, or allow rollback in it first)"
                );
                tracing::warn!("{why}");
                self.refuse(&fleet, &snapshot.revision, &[why])?;
                self.refused = Some(snapshot.revision);
                return Ok(());
            }
            tracing::warn!("{message}; applied, as policy.allowRollback allows");
        }
        let loaded = reconcile::desired(&snapshot, &self.host)
            .map_err(|diags| diags.iter().map(ToString::to_string).collect::<Vec<_>>())
            .and_then(|desired| {
                // A revision whose running VMs would not fit their hosts is refused like
                // an invalid one, before anything of it is applied. Not the revision in
                // force (a restart must not leave fleet managing nothing), nor one that
                // follows a revision already over (it may be what brings the fleet back).
                let in_force = self
                    .baseline
                    .as_ref()
                    .is_some_and(|(id, _)| *id == desired.revision.id);
                // Values are opened once per revision (a Proxmox token kept as a Secret
                // is asked for the capacity too).
                let values = self.ws.open_vault(&desired);
                let record = self.ws.status.read_placement();
                let over = reconcile::capacity_problems(&desired, &self.host, &values, &record);
                let already_over = self.last_good.as_ref().is_some_and(|d| {
                    !reconcile::capacity_problems(d, &self.host, &self.vault, &record).is_empty()
                });
                if over.is_empty() || in_force || already_over {
                    for why in &over {
                        tracing::warn!("over capacity, applied anyway: {why}");
                    }
                    Ok((desired, values))
                } else {
                    Err(over)
                }
            });
        match loaded {
            Ok((desired, vault)) => {
                tracing::info!(revision = %desired.revision.label, "new revision");
                self.baseline = Some((desired.revision.id.clone(), desired.policy.allow_rollback));
                if !desired.revision.id.starts_with("worktree:") {
                    self.ws
                        .status
                        .write_in_force(&desired.revision.id, desired.policy.allow_rollback)?;
                }
                // What cannot be opened holds only the tasks that use it (the task book
                // binds its tasks to the values).
                for problem in vault.problems() {
                    tracing::warn!("secret: {problem}");
                    let _ = self.ws.status.append_event(&crate::status::Event::fleet(
                        crate::status::EventKind::SecretError,
                        Some(desired.revision.id.clone()),
                        problem.to_owned(),
                    ));
                }
                self.vault = Arc::new(vault);
                self.last_good = Some(desired);
                self.refused = None;
            }
            Err(reasons) => {
                tracing::warn!(revision = %snapshot.revision.label, "revision refused: {}", reasons.join("; "));
                self.refuse(&fleet, &snapshot.revision, &reasons)?;
                self.refused = Some(snapshot.revision);
            }
        }
        Ok(())
    }

    /// Records a refused revision (the last good one stays in force) and counts it.
    fn refuse(&self, fleet: &str, revision: &Revision, reasons: &[String]) -> Result<()> {
        self.metrics.count_refused_revision();
        self.ws
            .status
            .record_refused(fleet, revision, reasons, SystemTime::now())?;
        Ok(())
    }

    /// Drivers live as long as their provider's definition is unchanged, so their caches
    /// and event watchers survive from one reconcile to the next.
    async fn ensure_drivers(&mut self, desired: &Desired, suspended: bool) -> Result<()> {
        let credentials = reconcile::credentials_digest(desired, &self.vault);
        let unchanged = self.providers == desired.providers && self.credentials == credentials;
        if unchanged && (self.journal.is_some() || suspended) {
            return Ok(());
        }
        if unchanged && !self.drivers.is_empty() {
            return self.open_journal().await;
        }
        for driver in self.drivers.values() {
            driver.unwatch();
        }
        self.drivers = reconcile::drivers_for(desired, &self.host, &self.vault);
        self.providers = desired.providers.clone();
        self.credentials = credentials;
        for (name, driver) in &self.drivers {
            let (tx, provider) = (self.tx.clone(), name.clone());
            let on_change: crate::driver::ChangeCallback = Arc::new(move |_vm: Option<&str>| {
                let _ = tx.send(Trigger::Host {
                    provider: provider.clone(),
                });
            });
            if let Err(e) = driver.watch(on_change) {
                tracing::warn!(provider = %name, "no event stream ({e}); relying on periodic reconciles");
            }
        }
        self.journal = None;
        if suspended {
            return Ok(());
        }
        self.open_journal().await
    }

    /// Opens the journal: what an interrupted apply left open is finished, and each driver
    /// tidies its host.
    async fn open_journal(&mut self) -> Result<()> {
        let (journal, recovered) = reconcile::open_journal(&self.ws, &self.drivers).await?;
        for line in recovered {
            tracing::warn!("{line}");
        }
        self.journal = Some(journal);
        Ok(())
    }
}

fn spawn_signal_handler(tx: mpsc::UnboundedSender<Trigger>) -> Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    // `fleet reconcile`: fetch and reconcile now.
    let mut usr1 = signal(SignalKind::user_defined1())?;
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = term.recv() => break,
                _ = int.recv() => break,
                _ = usr1.recv() => {
                    let _ = tx.send(Trigger::Fetch);
                }
            }
        }
        let _ = tx.send(Trigger::Shutdown);
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_refs_never_share_a_preview_directory() {
        let (a, b) = (
            preview_slug("refs/heads/proposed/a/b"),
            preview_slug("refs/heads/proposed/a-b"),
        );
        assert_ne!(a, b);
        assert!(a.starts_with("refs-heads-proposed-a-b-"), "{a}");
        let odd = preview_slug("refs/heads/../<img src=x>/é");
        assert!(
            odd.chars()
                .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c)),
            "{odd}"
        );
        assert!(!odd.starts_with('.'), "{odd}");
    }
}
