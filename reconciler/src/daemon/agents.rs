//! Agent links: one per running VM, held by a thread that greets the agent, records its
//! hello (version, boot id) and heartbeats, drives the VM's tasks through the task book
//! (dispatch, output, prompts, answers), and reconnects after either side restarts.
//! A change of presence (connected, disconnected, a new boot) wakes the daemon, whose next
//! pass writes it into the VM's status.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use fleet_agent_protocol::{GuestMessage, HostMessage};
use tokio::sync::mpsc::UnboundedSender;

use super::Trigger;
use crate::agent_link::{AgentLink, LinkError, Waker};
use crate::driver::Driver;
use crate::status::AgentStatus;
use crate::tasks::TaskBook;
use crate::tasks::runner::Connection;

const RETRY: Duration = Duration::from_secs(2);
const RETRY_MAX: Duration = Duration::from_secs(10);
/// How often tasks are looked at while the link is quiet and nothing wakes it: only for
/// deadlines (run timeouts, prompt deadlines, staging), which are seconds or more. News from
/// the host (a revision's tasks, an answer) wakes the link at once (`LinkWakers`).
const TICK: Duration = Duration::from_secs(1);
/// Messages recorded in one go at most.
const BATCH: usize = 256;
/// Heartbeats come every 10 s; silence this long means the link is gone.
const SILENCE: Duration = Duration::from_secs(35);

struct Tracked {
    stop: Arc<AtomicBool>,
}

pub struct Agents {
    threads: HashMap<String, Tracked>,
    shared: Shared,
}

/// What every link thread shares with the daemon.
#[derive(Clone)]
struct Shared {
    status: Arc<Mutex<BTreeMap<String, AgentStatus>>>,
    book: Arc<TaskBook>,
    wakers: LinkWakers,
    /// How the links' brokers reach upstreams.
    upstreams: crate::broker::Upstreams,
    metrics: Arc<crate::http::metrics::Metrics>,
    /// Where `fleet exec` finds each open link.
    exec: crate::exec::link::Routes,
}

/// The wakers of every open link: the host's news reaches each at once.
#[derive(Clone, Default)]
pub struct LinkWakers(Arc<Mutex<HashMap<String, Waker>>>);

impl LinkWakers {
    /// Every link looks at its tasks now.
    pub fn wake_all(&self) {
        for waker in self.lock().values() {
            waker.wake();
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Waker>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Agents {
    pub fn new(
        book: Arc<TaskBook>,
        wakers: LinkWakers,
        upstreams: crate::broker::Upstreams,
        metrics: Arc<crate::http::metrics::Metrics>,
        exec: crate::exec::link::Routes,
    ) -> Agents {
        Agents {
            threads: HashMap::new(),
            shared: Shared {
                status: Arc::default(),
                book,
                wakers,
                upstreams,
                metrics,
                exec,
            },
        }
    }

    /// Every link looks at its tasks now (after a pass changed what they should run).
    pub fn wake_all(&self) {
        self.shared.wakers.wake_all();
    }

    /// Follows exactly the VMs in `running` (name → its driver).
    pub fn sync(&mut self, running: Vec<(String, Arc<dyn Driver>)>, tx: &UnboundedSender<Trigger>) {
        let wanted: std::collections::HashSet<&str> =
            running.iter().map(|(n, _)| n.as_str()).collect();
        self.threads.retain(|name, tracked| {
            let keep = wanted.contains(name.as_str());
            if !keep {
                tracked.stop.store(true, Ordering::Relaxed);
                if let Some(waker) = self.shared.wakers.lock().get(name) {
                    waker.wake();
                }
            }
            keep
        });
        self.shared
            .status
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|name, _| wanted.contains(name.as_str()));
        for (name, driver) in running {
            if self.threads.contains_key(&name) {
                continue;
            }
            let stop = Arc::new(AtomicBool::new(false));
            let (shared, tx, thread_stop, vm) =
                (self.shared.clone(), tx.clone(), stop.clone(), name.clone());
            let spawned = std::thread::Builder::new()
                .name(format!("agent-{name}"))
                .spawn(move || follow(&vm, driver.as_ref(), &shared, &tx, &thread_stop));
            if spawned.is_ok() {
                self.threads.insert(name, Tracked { stop });
            }
        }
    }

    pub fn snapshot(&self) -> BTreeMap<String, AgentStatus> {
        self.shared
            .status
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

impl Drop for Agents {
    fn drop(&mut self) {
        for tracked in self.threads.values() {
            tracked.stop.store(true, Ordering::Relaxed);
        }
    }
}

/// Boot id changes a guest may make in a minute before it counts as misbehaving.
const BOOT_CHURN_PER_MINUTE: usize = 3;

#[derive(Default)]
struct Presence {
    /// When the boot id changed, over the last minute.
    boots: std::collections::VecDeque<Instant>,
    warned: bool,
}

impl Presence {
    /// Records a boot id change; true the first time they come too often.
    fn boot_changed(&mut self) -> bool {
        let now = Instant::now();
        self.boots.push_back(now);
        while self
            .boots
            .front()
            .is_some_and(|at| now.duration_since(*at) > Duration::from_secs(60))
        {
            self.boots.pop_front();
        }
        let churning = self.boots.len() > BOOT_CHURN_PER_MINUTE;
        let first = churning && !self.warned;
        self.warned |= churning;
        first
    }
}

fn follow(
    vm: &str,
    driver: &dyn Driver,
    shared: &Shared,
    tx: &UnboundedSender<Trigger>,
    stop: &AtomicBool,
) {
    let Shared {
        status,
        book,
        wakers,
        upstreams,
        metrics,
        exec,
    } = shared;
    // A guest decides when it says hello and with which boot id: one that changes it in
    // every hello would keep fleet reconciling back to back. The daemon acts on presence
    // triggers at most once per `AGENT_TRIGGER_GAP` (see `serve`), and a boot id that keeps
    // changing is reported as misbehaviour.
    let presence = std::cell::RefCell::new(Presence::default());
    let set = |new: Option<AgentStatus>| {
        let mut all = status.lock().unwrap_or_else(|p| p.into_inner());
        let (changed, new_boot) = match &new {
            Some(s) => {
                let old = all.insert(vm.to_owned(), s.clone());
                let new_boot = old.as_ref().is_some_and(|o| o.boot_id != s.boot_id);
                let changed = old.is_none_or(|o| {
                    o.connected != s.connected
                        || o.boot_id != s.boot_id
                        || o.interfaces != s.interfaces
                });
                (changed, new_boot)
            }
            None => (
                all.get_mut(vm)
                    .is_some_and(|s| std::mem::replace(&mut s.connected, false)),
                false,
            ),
        };
        drop(all);
        let mut presence = presence.borrow_mut();
        if new_boot && presence.boot_changed() {
            tracing::warn!(
                vm,
                "the guest changed its boot id {} times in a minute without fleet restarting it; treating it as misbehaving",
                presence.boots.len()
            );
        }
        if changed {
            let _ = tx.send(Trigger::Agent);
        }
    };
    // The pause before the next try: RETRY after a link that worked, doubling while none
    // can be opened (a guest without an agent yet; on Proxmox each try costs API calls).
    let mut retry = RETRY / 2;
    while !stop.load(Ordering::Relaxed) {
        let link = driver
            .agent_endpoint(vm)
            .ok()
            .flatten()
            .and_then(|endpoint| AgentLink::connect(&endpoint).ok());
        let linked = if let Some(mut link) = link
            && link.greet().is_ok()
        {
            let mine = Waker::pair().ok().map(|(waker, signal)| {
                link.wake_on(signal);
                wakers.lock().insert(vm.to_owned(), waker.clone());
                waker
            });
            let mut conn = Connection::new(vm);
            // This link's streams (brokered egress): the VM's policy as it is when each
            // opens; a refusal is an event.
            let mut broker = {
                crate::broker::Broker::new(
                    Arc::new(crate::tasks::VmEgress {
                        book: book.clone(),
                        vm: vm.to_owned(),
                        metrics: Some(metrics.clone()),
                    }),
                    upstreams.clone(),
                    crate::broker::Outbox::new(mine.clone()),
                )
            };
            // This link's exec sessions (`fleet exec`), which end with it.
            let mut sessions = exec.open(vm, mine.clone());
            if let Err(e) = converse(
                &mut link,
                &mut conn,
                book,
                &mut broker,
                &mut sessions,
                &set,
                stop,
            ) {
                tracing::debug!(vm, "agent link lost: {e}");
            }
            // Only this link's waker: a newer link of the same VM may have replaced it.
            if let Some(mine) = mine {
                let mut all = wakers.lock();
                if all.get(vm).is_some_and(|w| w.same(&mine)) {
                    all.remove(vm);
                }
            }
            set(None);
            true
        } else {
            false
        };
        if stop.load(Ordering::Relaxed) {
            return;
        }
        retry = if linked {
            RETRY
        } else {
            (retry * 2).min(RETRY_MAX)
        };
        std::thread::sleep(retry);
    }
}

/// The most messages one VM's link records per second.
const MESSAGES_PER_SECOND: usize = 2000;

/// Messages counted over the current second of one link.
#[derive(Default)]
struct Rate {
    since: Option<Instant>,
    count: usize,
}

impl Rate {
    /// Counts `n` more; the pause that keeps the link under `MESSAGES_PER_SECOND`, if any.
    fn count(&mut self, n: usize) -> Option<Duration> {
        let now = Instant::now();
        let since = *self.since.get_or_insert(now);
        if now.duration_since(since) >= Duration::from_secs(1) {
            self.since = Some(now);
            self.count = 0;
        }
        self.count += n;
        (self.count > MESSAGES_PER_SECOND)
            .then(|| Duration::from_secs(1).saturating_sub(now.duration_since(since)))
    }
}

/// One connection: tasks are dispatched and answered between reads; what the guest sends
/// is recorded in batches and acknowledged.
fn converse(
    link: &mut AgentLink,
    conn: &mut Connection,
    book: &TaskBook,
    broker: &mut crate::broker::Broker,
    sessions: &mut crate::exec::link::LinkSessions,
    set: &dyn Fn(Option<AgentStatus>),
    stop: &AtomicBool,
) -> Result<(), LinkError> {
    let send = |link: &mut AgentLink, messages: Vec<HostMessage>| -> Result<(), LinkError> {
        if messages.is_empty() {
            return Ok(()); // Most turns of the loop: nothing to send, no lock to take.
        }
        let sent = messages.iter().try_for_each(|m| link.send(m));
        if sent.is_ok() {
            book.sent(&messages);
        }
        // The values a `Secrets` message carried (base64) are wiped, not just freed.
        for message in messages {
            if let HostMessage::Secrets { mut files, .. } = message {
                for file in &mut files {
                    zeroize::Zeroize::zeroize(&mut file.data);
                }
            }
        }
        sent
    };
    let mut heard = Instant::now();
    let mut rate = Rate::default();
    // What the guest said of itself on this connection (its hello, then its addresses).
    let mut presence: Option<AgentStatus> = None;
    // The boot and agent start of the last hello.
    let mut last_agent: Option<(String, Option<String>)> = None;
    while !stop.load(Ordering::Relaxed) {
        let (messages, job) = book.tick(conn);
        send(link, messages)?;
        send(link, broker.outgoing())?;
        send(link, sessions.outgoing())?;
        if let Some(job) = job {
            let parts = book.stage(conn, job);
            send(link, parts)?;
        }
        let first = match link.next(TICK) {
            Ok(m) => m,
            Err(LinkError::Timeout(_)) if heard.elapsed() < SILENCE => continue,
            Err(e) => return Err(e),
        };
        heard = Instant::now();
        // Take what else has arrived, so a burst of output is recorded in one write.
        // Stream and exec messages wait for nothing: a credit that waited here would stall
        // its stream for the wait, every window, and a keystroke's echo would lag.
        let mut batch = vec![first];
        while batch.len() < BATCH {
            let wait = if batch.iter().all(|m| m.is_stream() || m.is_exec()) {
                Duration::ZERO
            } else {
                Duration::from_millis(5)
            };
            match link.next(wait) {
                Ok(m) => batch.push(m),
                Err(LinkError::Timeout(_)) => break,
                Err(e) => return Err(e),
            }
        }
        // One guest cannot keep the task book (shared by every VM) busy: past
        // MESSAGES_PER_SECOND this link waits, and only this VM's messages wait with it.
        if let Some(pause) = rate.count(batch.len()) {
            std::thread::sleep(pause);
        }
        let mut task_messages = Vec::new();
        for message in batch {
            match message {
                GuestMessage::Hello {
                    agent_version,
                    boot_id,
                    secrets,
                    instance,
                    ..
                } => {
                    // Record what came before the greeting first.
                    let replies = book.receive(conn, std::mem::take(&mut task_messages));
                    send(link, replies)?;
                    conn.greeted(&boot_id, secrets.as_deref());
                    // Another agent (or boot) than the last hello's: the exec sessions the
                    // old one ran are gone. (A hello answering a greeting is the same one.)
                    let agent = (boot_id.clone(), instance);
                    if last_agent
                        .replace(agent.clone())
                        .is_some_and(|last| last != agent)
                    {
                        sessions.guest_restarted();
                    }
                    // A guest reports its addresses after each hello; until then, those
                    // it reported in this boot stand.
                    let interfaces = presence
                        .take()
                        .filter(|p| p.boot_id == boot_id)
                        .map(|p| p.interfaces)
                        .unwrap_or_default();
                    let status = AgentStatus {
                        connected: true,
                        agent_version,
                        boot_id,
                        since: Some(SystemTime::now().into()),
                        interfaces,
                    };
                    set(Some(status.clone()));
                    presence = Some(status);
                }
                GuestMessage::Addresses { interfaces, .. } => {
                    if let Some(status) = presence.as_mut() {
                        status.interfaces = crate::status::GuestInterface::from_guest(&interfaces);
                        set(Some(status.clone()));
                    }
                }
                GuestMessage::Heartbeat { .. } => {}
                GuestMessage::StreamOpen { .. }
                | GuestMessage::StreamData { .. }
                | GuestMessage::StreamCredit { .. }
                | GuestMessage::StreamClose { .. } => broker.on_guest(&message),
                message if message.is_exec() => {
                    let replies = sessions.on_guest(message);
                    send(link, replies)?;
                }
                other => task_messages.push(other),
            }
        }
        let replies = book.receive(conn, task_messages);
        send(link, replies)?;
    }
    Ok(())
}
