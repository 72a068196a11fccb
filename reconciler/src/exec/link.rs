//! A link thread's exec sessions. The daemon's socket (`server`) hands each session to
//! the thread holding its VM's link through `Routes`; the thread sends the session's
//! messages to the guest between reads (`LinkSessions::outgoing`) and passes the guest's
//! back (`LinkSessions::on_guest`). A guest that sends past the output credit the host
//! granted has its session ended, so one session never holds more than a window of
//! output in the daemon, however slow the operator's terminal.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, Sender, channel};
use std::sync::{Arc, Mutex};

use fleet_agent_protocol::exec::{MAX_SESSIONS, TermSize};
use fleet_agent_protocol::stream::RecvWindow;
use fleet_agent_protocol::{GuestMessage, HostMessage, VERSION};

use crate::agent_link::Waker;

/// Messages waiting for one session's client at most: a guest that sends while the client
/// does not read is stopped here, whatever the messages' size (an empty output, a credit).
pub const MAX_QUEUED: usize = 16 * 1024;

/// What the socket's side sends a link thread.
pub enum ToLink {
    Open {
        exec: u32,
        argv: Vec<String>,
        tty: Option<TermSize>,
        term: Option<String>,
        /// Where the session's messages from the guest go.
        to_client: Sender<GuestMessage>,
        /// Messages sent to the client and not yet written to it (the socket's side
        /// takes one off for each it writes).
        queued: Arc<AtomicUsize>,
    },
    /// A message of the client's for the guest (its `exec` is the session's).
    Message(Box<HostMessage>),
    /// The client went away: the session ends.
    Gone { exec: u32 },
}

/// A link thread's inbox and the waker that makes it look.
#[derive(Clone)]
pub struct Route {
    tx: Sender<ToLink>,
    waker: Waker,
    /// Which opening of the link (`LinkSessions::id`).
    link: u64,
}

impl Route {
    /// Sends `message` to the link thread; false when the link is gone.
    pub fn send(&self, message: ToLink) -> bool {
        let sent = self.tx.send(message).is_ok();
        self.waker.wake();
        sent
    }
}

/// The links exec sessions can be opened on, by VM.
#[derive(Clone, Default)]
pub struct Routes(Arc<Mutex<HashMap<String, Route>>>);

impl Routes {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Route>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The route to `vm`'s link, if one is open.
    pub fn get(&self, vm: &str) -> Option<Route> {
        self.lock().get(vm).cloned()
    }

    /// A link to `vm` is open: sessions may go through it (until the returned value is
    /// dropped). Without a waker the link takes no sessions.
    pub fn open(&self, vm: &str, waker: Option<Waker>) -> LinkSessions {
        static OPENED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let id = OPENED.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = channel();
        if let Some(waker) = waker {
            self.lock().insert(
                vm.to_owned(),
                Route {
                    tx,
                    waker,
                    link: id,
                },
            );
        }
        LinkSessions {
            vm: vm.to_owned(),
            routes: self.clone(),
            id,
            rx,
            sessions: HashMap::new(),
        }
    }
}

struct Session {
    to_client: Sender<GuestMessage>,
    queued: Arc<AtomicUsize>,
    /// The output credit this side granted the guest.
    output: RecvWindow,
    /// Output bytes passed to the client that it has not reported written: what it may
    /// report, at most.
    unreported: u64,
}

/// One link's sessions.
pub struct LinkSessions {
    vm: String,
    routes: Routes,
    /// This opening of the link (to tell a newer link's route from ours).
    id: u64,
    rx: Receiver<ToLink>,
    sessions: HashMap<u32, Session>,
}

fn ended(exec: u32, error: String) -> GuestMessage {
    GuestMessage::ExecExit {
        v: VERSION,
        exec,
        code: None,
        signal: None,
        error: Some(error),
    }
}

/// The session a message of the client's is for.
fn session_of(message: &HostMessage) -> Option<u32> {
    match message {
        HostMessage::ExecInput { exec, .. }
        | HostMessage::ExecResize { exec, .. }
        | HostMessage::ExecCredit { exec, .. }
        | HostMessage::ExecKill { exec, .. } => Some(*exec),
        _ => None,
    }
}

impl LinkSessions {
    /// What the clients sent since the last look, for the guest. Only messages of
    /// sessions this link holds go (never one the guest might know by an older id).
    pub fn outgoing(&mut self) -> Vec<HostMessage> {
        let mut out = Vec::new();
        while let Ok(message) = self.rx.try_recv() {
            match message {
                ToLink::Open {
                    exec,
                    argv,
                    tty,
                    term,
                    to_client,
                    queued,
                } => {
                    let refused = if self.sessions.contains_key(&exec) {
                        Some(format!("session {exec} is open on {} already", self.vm))
                    } else if self.sessions.len() >= MAX_SESSIONS {
                        Some(format!(
                            "{MAX_SESSIONS} exec sessions are open on {} already; end one first",
                            self.vm
                        ))
                    } else {
                        None
                    };
                    if let Some(why) = refused {
                        let _ = to_client.send(ended(exec, why));
                        continue;
                    }
                    self.sessions.insert(
                        exec,
                        Session {
                            to_client,
                            queued,
                            output: RecvWindow::default(),
                            unreported: 0,
                        },
                    );
                    out.push(HostMessage::Exec {
                        v: VERSION,
                        exec,
                        argv,
                        tty,
                        term,
                    });
                }
                ToLink::Message(message) => {
                    let Some(session) = session_of(&message)
                        .and_then(|exec| self.sessions.get_mut(&exec).map(|s| (exec, s)))
                    else {
                        continue;
                    };
                    match (*message, session) {
                        // The client reports what it wrote (never more than it was given);
                        // credit goes back by half windows.
                        (HostMessage::ExecCredit { bytes, .. }, (exec, session)) => {
                            let bytes = bytes.min(session.unreported);
                            session.unreported -= bytes;
                            if let Some(grant) =
                                session.output.consumed(usize::try_from(bytes).unwrap_or(0))
                            {
                                out.push(HostMessage::ExecCredit {
                                    v: VERSION,
                                    exec,
                                    bytes: grant,
                                });
                            }
                        }
                        (message, _) => out.push(message),
                    }
                }
                ToLink::Gone { exec } => {
                    if self.sessions.remove(&exec).is_some() {
                        out.push(HostMessage::ExecKill { v: VERSION, exec });
                    }
                }
            }
        }
        out
    }

    /// The guest greeted again (its agent restarted, or it rebooted): the sessions it ran
    /// are gone with its old self, and their clients are told.
    pub fn guest_restarted(&mut self) {
        let why = format!("the agent in {} restarted; the session ended", self.vm);
        self.end_all(&why);
    }

    /// Every session ends, and its client hears `why`.
    fn end_all(&mut self, why: &str) {
        for (exec, session) in self.sessions.drain() {
            let _ = session.to_client.send(ended(exec, why.to_owned()));
        }
    }

    /// Passes one of the guest's exec messages to its session's client; what to tell the
    /// guest back (a session that broke its credit, or whose client is gone or not
    /// reading, is killed).
    pub fn on_guest(&mut self, message: GuestMessage) -> Vec<HostMessage> {
        let exec = match &message {
            GuestMessage::ExecOutput { exec, .. }
            | GuestMessage::ExecCredit { exec, .. }
            | GuestMessage::ExecExit { exec, .. } => *exec,
            _ => return Vec::new(),
        };
        // A message of a session this side does not hold (ended, or never opened) is
        // dropped: a guest cannot reach another session's client.
        let Some(session) = self.sessions.get_mut(&exec) else {
            return Vec::new();
        };
        let broken = match &message {
            GuestMessage::ExecOutput { data, .. } => match decoded_len(data) {
                None => Some("output that is not base64".to_owned()),
                Some(0) => Some("empty output".to_owned()),
                Some(n) => match session.output.received(n) {
                    Ok(()) => {
                        session.unreported += n as u64;
                        None
                    }
                    Err(e) => Some(e.to_string()),
                },
            },
            _ => None,
        }
        .or_else(|| {
            (session.queued.load(Ordering::Relaxed) >= MAX_QUEUED)
                .then(|| format!("{MAX_QUEUED} messages wait for a client that does not read them"))
        });
        if let Some(e) = broken {
            tracing::warn!(vm = self.vm, exec, "exec session ended: {e}");
            let _ = session
                .to_client
                .send(ended(exec, format!("the session was ended: {e}")));
            self.sessions.remove(&exec);
            return vec![HostMessage::ExecKill { v: VERSION, exec }];
        }
        let last = matches!(message, GuestMessage::ExecExit { .. });
        session.queued.fetch_add(1, Ordering::Relaxed);
        let delivered = session.to_client.send(message).is_ok();
        if last || !delivered {
            self.sessions.remove(&exec);
        }
        if delivered || last {
            Vec::new()
        } else {
            vec![HostMessage::ExecKill { v: VERSION, exec }]
        }
    }
}

/// The length of base64 `data` decoded, if it is base64.
fn decoded_len(data: &str) -> Option<usize> {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD
        .decode(data)
        .ok()
        .map(|b| b.len())
}

impl Drop for LinkSessions {
    /// The link is gone, and its sessions with it (the guest ends them too).
    fn drop(&mut self) {
        let why = format!("the agent link to {} dropped", self.vm);
        self.end_all(&why);
        // Only this link's route: a newer link of the same VM may have replaced it.
        let mut routes = self.routes.lock();
        if routes.get(&self.vm).is_some_and(|r| r.link == self.id) {
            routes.remove(&self.vm);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fleet_agent_protocol::stream::WINDOW_BYTES;

    fn output(exec: u32, bytes: usize) -> GuestMessage {
        use base64::Engine;
        GuestMessage::ExecOutput {
            v: VERSION,
            exec,
            stderr: false,
            data: base64::engine::general_purpose::STANDARD.encode(vec![b'x'; bytes]),
        }
    }

    /// Routes with one open link, `vm-1`'s (and the signal its waker raises).
    fn linked() -> (Routes, LinkSessions, crate::agent_link::WakeSignal) {
        let routes = Routes::default();
        let (waker, signal) = Waker::pair().expect("waker");
        let link = routes.open("vm-1", Some(waker));
        (routes, link, signal)
    }

    fn open(routes: &Routes, exec: u32) -> Receiver<GuestMessage> {
        let (to_client, from_link) = channel();
        assert!(routes.get("vm-1").expect("a route").send(ToLink::Open {
            exec,
            argv: vec!["true".into()],
            tty: None,
            term: None,
            to_client,
            queued: Arc::default(),
        }));
        from_link
    }

    #[test]
    fn a_session_goes_to_the_guest_and_its_output_to_its_client_only() {
        let (routes, mut link, _signal) = linked();
        let (a, b) = (open(&routes, 1), open(&routes, 2));
        let sent = link.outgoing();
        assert!(
            matches!(
                sent.as_slice(),
                [
                    HostMessage::Exec { exec: 1, .. },
                    HostMessage::Exec { exec: 2, .. }
                ]
            ),
            "{sent:?}"
        );
        assert!(link.on_guest(output(2, 10)).is_empty());
        assert!(a.try_recv().is_err(), "session 1 sees nothing of session 2");
        assert!(matches!(
            b.try_recv(),
            Ok(GuestMessage::ExecOutput { exec: 2, .. })
        ));
        // A session nobody opened reaches nobody.
        assert!(link.on_guest(output(7, 10)).is_empty());
        // The link goes: every session's client hears it.
        drop(link);
        assert!(matches!(
            a.try_recv(),
            Ok(GuestMessage::ExecExit { error: Some(_), .. })
        ));
        assert!(routes.get("vm-1").is_none(), "the route went with the link");
    }

    #[test]
    fn output_past_the_granted_credit_ends_the_session() {
        let (routes, mut link, _signal) = linked();
        let client = open(&routes, 1);
        link.outgoing();
        let mut sent = 0;
        while sent < WINDOW_BYTES as usize {
            assert!(link.on_guest(output(1, 32 * 1024)).is_empty());
            sent += 32 * 1024;
        }
        // The client wrote half a window: the guest is granted that much.
        routes
            .get("vm-1")
            .expect("route")
            .send(ToLink::Message(Box::new(HostMessage::ExecCredit {
                v: VERSION,
                exec: 1,
                bytes: WINDOW_BYTES / 2,
            })));
        let grants = link.outgoing();
        assert!(
            matches!(grants.as_slice(), [HostMessage::ExecCredit { bytes, .. }] if *bytes == WINDOW_BYTES / 2),
            "{grants:?}"
        );
        assert!(
            link.on_guest(output(1, (WINDOW_BYTES / 2) as usize))
                .is_empty()
        );
        // One byte more than granted.
        let kill = link.on_guest(output(1, 1));
        assert!(
            matches!(kill.as_slice(), [HostMessage::ExecKill { exec: 1, .. }]),
            "{kill:?}"
        );
        let last = client.try_iter().last();
        assert!(
            matches!(&last, Some(GuestMessage::ExecExit { error: Some(e), .. }) if e.contains("granted")),
            "{last:?}"
        );
    }

    #[test]
    fn a_client_that_leaves_kills_its_session() {
        let (routes, mut link, _signal) = linked();
        let client = open(&routes, 1);
        link.outgoing();
        drop(client);
        let kill = link.on_guest(output(1, 3));
        assert!(
            matches!(kill.as_slice(), [HostMessage::ExecKill { exec: 1, .. }]),
            "{kill:?}"
        );
        routes
            .get("vm-1")
            .expect("route")
            .send(ToLink::Gone { exec: 1 });
        assert!(link.outgoing().is_empty(), "killed once");
    }

    #[test]
    fn a_newer_link_keeps_its_route_when_the_older_goes() {
        let routes = Routes::default();
        let (w1, _s1) = Waker::pair().expect("waker");
        let (w2, _s2) = Waker::pair().expect("waker");
        let old = routes.open("vm-1", Some(w1));
        let _new = routes.open("vm-1", Some(w2));
        drop(old);
        assert!(routes.get("vm-1").is_some());
    }

    /// What a client sends for a session this link does not hold never reaches the guest
    /// (a guest session left over under the same id would get the keystrokes).
    #[test]
    fn only_the_links_own_sessions_get_the_clients_messages() {
        let (routes, mut link, _signal) = linked();
        let route = routes.get("vm-1").expect("route");
        route.send(ToLink::Message(Box::new(HostMessage::ExecInput {
            v: VERSION,
            exec: 5,
            data: "ZWNobyBoaQo=".into(),
            eof: false,
        })));
        assert!(link.outgoing().is_empty());
    }

    /// A guest that greets again ran its sessions in an earlier self: they end.
    #[test]
    fn a_guest_restart_ends_every_session() {
        let (routes, mut link, _signal) = linked();
        let client = open(&routes, 1);
        link.outgoing();
        link.guest_restarted();
        assert!(matches!(
            client.try_recv(),
            Ok(GuestMessage::ExecExit { error: Some(e), .. }) if e.contains("restarted")
        ));
        assert!(
            link.on_guest(output(1, 3)).is_empty(),
            "the session is gone"
        );
    }

    /// Empty outputs, or anything while the client does not read, cannot pile up.
    #[test]
    fn a_guest_cannot_queue_without_bound() {
        let (routes, mut link, _signal) = linked();
        let _client = open(&routes, 1);
        link.outgoing();
        let kill = link.on_guest(output(1, 0));
        assert!(
            matches!(kill.as_slice(), [HostMessage::ExecKill { exec: 1, .. }]),
            "{kill:?}"
        );

        let _client = open(&routes, 2);
        link.outgoing();
        let credit = |exec| GuestMessage::ExecCredit {
            v: VERSION,
            exec,
            bytes: 1,
        };
        for _ in 0..MAX_QUEUED {
            assert!(link.on_guest(credit(2)).is_empty());
        }
        let kill = link.on_guest(credit(2));
        assert!(
            matches!(kill.as_slice(), [HostMessage::ExecKill { exec: 2, .. }]),
            "{kill:?}"
        );
    }

    /// A client reports at most what it was given: a huge report grants nothing extra.
    #[test]
    fn a_clients_credit_report_is_clamped() {
        let (routes, mut link, _signal) = linked();
        let _client = open(&routes, 1);
        link.outgoing();
        assert!(link.on_guest(output(1, 10)).is_empty());
        routes
            .get("vm-1")
            .expect("route")
            .send(ToLink::Message(Box::new(HostMessage::ExecCredit {
                v: VERSION,
                exec: 1,
                bytes: u64::MAX,
            })));
        assert!(
            link.outgoing().is_empty(),
            "10 bytes are less than half a window"
        );
    }
}
