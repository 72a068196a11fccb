//! `fleet-agent`: runs inside each VM and talks to the host over a virtio-serial port, or
//! (`fleet-agent relay`, on Proxmox) through exchanges that qemu-guest-agent runs as
//! `fleet-agent exchange` (see `relay`).
//!
//! It finds the port named `org.fleet.agent.0` (through `/sys/class/virtio-ports`, since the
//! micro image has no udev), says hello with its version and boot id, and sends a heartbeat
//! every 10 s, as newline-delimited JSON (`fleet-agent-protocol`); it answers each host
//! greeting with a hello. If the port goes away or a write fails, it reopens the port and says
//! hello again. The port stays open all the time: data the host sends while the guest side is
//! closed is dropped.

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fleet_agent_protocol::{GuestMessage, HostMessage, PORT_NAME, SECRETS_DIR, VERSION};

mod addresses;
mod exec;
mod files;
mod isolate;
mod mounts;
mod outbox;
mod prompt;
mod proxy;
mod relay;
mod results;
mod secrets;
mod task;

const HEARTBEAT: Duration = Duration::from_secs(10);
/// How often the interfaces are looked at (a DHCP lease comes seconds after boot).
const ADDRESS_CHECK: Duration = Duration::from_secs(2);
/// What one read from the link takes at most: a stream's chunk (base64) in a few reads, not
/// one per 8 KiB (a read is a costly exit of the VM under TCG).
const LINK_READ_BYTES: usize = 256 * 1024;

/// The egress proxy, one per agent, whatever link is open (see `proxy`).
static PROXY: std::sync::OnceLock<proxy::Proxy> = std::sync::OnceLock::new();

fn main() {
    if std::env::args().any(|a| a == "--version" || a == "-V") {
        println!("fleet-agent {}", env!("CARGO_PKG_VERSION"));
        return;
    }
    let mode = std::env::args().nth(1);
    if mode.as_deref() == Some("launch") {
        // The first moments of an isolated task (see `isolate`): returns only on failure.
        let args: Vec<String> = std::env::args().skip(2).collect();
        eprintln!("fleet-agent launch: {}", isolate::launch(&args));
        std::process::exit(126);
    }
    if mode.as_deref() == Some("reap") {
        let args: Vec<String> = std::env::args().skip(2).collect();
        if let Err(e) = isolate::reap_as(&args) {
            eprintln!("fleet-agent reap: {e}");
            std::process::exit(1);
        }
        return;
    }
    if mode.as_deref() == Some("exchange") {
        // One relayed exchange, run by the hypervisor's guest agent: stdin to the relay,
        // its answer to stdout.
        if let Err(e) = relay::exchange(Path::new(fleet_agent_protocol::relay::RELAY_SOCKET)) {
            eprintln!("fleet-agent exchange: {e}");
            std::process::exit(1);
        }
        return;
    }
    let boot_id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default();
    // Tasks keep running while the link is down and the port is reopened.
    let mut tasks = task::Tasks::with_state_dir(PathBuf::from("/run/fleet-agent"));
    if isolate::enabled() {
        match std::env::current_exe() {
            Ok(agent) => {
                tasks = tasks.isolated(task::Isolation {
                    agent,
                    store: PathBuf::from(SECRETS_DIR),
                });
            }
            Err(e) => eprintln!("fleet-agent: tasks run as the agent's user: {e}"),
        }
    }
    let tasks = Arc::new(tasks);
    let secrets = Arc::new(secrets::Store::new(PathBuf::from(SECRETS_DIR), true));
    let owner: proxy::Owner = {
        let tasks = tasks.clone();
        Arc::new(move |uid| tasks.task_of_uid(uid))
    };
    match proxy::Proxy::start(fleet_agent_protocol::stream::PROXY_ADDRESS, Some(owner)) {
        Ok(proxy) => {
            let _ = PROXY.set(proxy);
        }
        Err(e) => eprintln!(
            "fleet-agent: no egress proxy on {}: {e}",
            fleet_agent_protocol::stream::PROXY_ADDRESS
        ),
    }
    match mode.as_deref() {
        None => {}
        Some("relay") => {
            let error = relay_link(&boot_id, &tasks, &secrets);
            eprintln!("fleet-agent relay: {error}");
            std::process::exit(1);
        }
        Some(other) => {
            eprintln!(
                "fleet-agent: unknown mode {other:?}; use no argument (virtio-serial), \
                 `relay` (links relayed by qemu-guest-agent) or `exchange`"
            );
            std::process::exit(2);
        }
    }
    let mut warned = false;
    loop {
        match find_port(Path::new("/sys/class/virtio-ports")) {
            Some(dev) => {
                warned = false;
                if let Err(e) = serve(&dev, &boot_id, &tasks, &secrets) {
                    eprintln!("fleet-agent: link on {}: {e}; reopening", dev.display());
                }
            }
            None if !warned => {
                eprintln!("fleet-agent: no virtio port named {PORT_NAME} yet; waiting for it");
                warned = true;
            }
            None => {}
        }
        std::thread::sleep(Duration::from_secs(1));
    }
}

/// The link relayed through qemu-guest-agent (Proxmox): the relay listens on its socket and
/// moves bytes between exchanges and two pipes, which stand in for the port. Returns only
/// when the link can no longer run.
fn relay_link(
    boot_id: &str,
    tasks: &Arc<task::Tasks>,
    secrets: &Arc<secrets::Store>,
) -> std::io::Error {
    let socket = Path::new(fleet_agent_protocol::relay::RELAY_SOCKET);
    let listener = match relay::listen(socket) {
        Ok(l) => l,
        Err(e) => return std::io::Error::other(format!("{}: {e}", socket.display())),
    };
    let (pipes_in, pipes_out) = match (std::io::pipe(), std::io::pipe()) {
        (Ok(a), Ok(b)) => (a, b),
        (Err(e), _) | (_, Err(e)) => return e,
    };
    let (from_host, to_agent) = pipes_in;
    let (from_agent, to_host) = pipes_out;
    let relay = Arc::new(relay::Relay::new(boot_id.to_owned()));
    {
        let relay = relay.clone();
        std::thread::spawn(move || relay.pump(from_agent));
    }
    {
        let relay = relay.clone();
        std::thread::spawn(move || {
            let e = relay.serve(&listener, to_agent);
            eprintln!("fleet-agent relay: the relay stopped: {e}");
            std::process::exit(1);
        });
    }
    match serve_link(from_host, Box::new(to_host), boot_id, tasks, secrets) {
        Ok(()) => std::io::Error::other("the link ended"),
        Err(e) => e,
    }
}

/// The `/dev` node of the virtio-serial port named `PORT_NAME`.
fn find_port(sysfs: &Path) -> Option<PathBuf> {
    let entries = std::fs::read_dir(sysfs).ok()?;
    for entry in entries.flatten() {
        let name = std::fs::read_to_string(entry.path().join("name")).unwrap_or_default();
        if name.trim() == PORT_NAME {
            return Some(Path::new("/dev").join(entry.file_name()));
        }
    }
    None
}

/// Serves one opening of the port: hello first, then a heartbeat every 10 s; a reader
/// thread answers each host greeting with a hello (a host that reconnected learns who we
/// are again). Returns when a read or write fails.
fn serve(
    dev: &Path,
    boot_id: &str,
    tasks: &Arc<task::Tasks>,
    secrets: &Arc<secrets::Store>,
) -> std::io::Result<()> {
    let port = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(dev)?;
    let reader = port.try_clone()?;
    serve_link(reader, Box::new(port), boot_id, tasks, secrets)
}

/// What the agent serves the host with: its tasks, its secret set, and the boot it is in.
struct Link {
    tasks: Arc<task::Tasks>,
    /// The operator's sessions on this opening of the link.
    execs: Arc<exec::Execs>,
    secrets: Arc<secrets::Store>,
    boot_id: String,
}

/// What one host message leaves to do on the link.
#[derive(Debug, PartialEq)]
enum Answer {
    Nothing,
    Reply(GuestMessage),
    /// The host (re)connected: greet it, then send it what it has not acknowledged.
    Greet(GuestMessage),
    /// Work that may take a while (making a filesystem): done on a thread of its own,
    /// whose answer goes to the host when it is done.
    Later(Work),
}

/// A piece of `Answer::Later` work.
struct Work(Box<dyn FnOnce() -> GuestMessage + Send>);

impl std::fmt::Debug for Work {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Work(..)")
    }
}

impl PartialEq for Work {
    fn eq(&self, _: &Work) -> bool {
        false
    }
}

impl Link {
    fn hello(&self) -> GuestMessage {
        GuestMessage::Hello {
            v: VERSION,
            agent_version: env!("CARGO_PKG_VERSION").to_owned(),
            boot_id: self.boot_id.clone(),
            secrets: self.secrets.digest(),
            instance: Some(instance().to_owned()),
        }
    }

    /// Serves one message from the host.
    fn handle(&self, message: HostMessage) -> Answer {
        match message {
            HostMessage::Hello { .. } => {
                // A host that greets has (re)connected: it holds none of the sessions
                // before, so they end rather than run on unseen.
                self.execs.end_all();
                Answer::Greet(self.hello())
            }
            HostMessage::RunTask {
                task,
                argv,
                mut env,
                cwd,
                timeout_secs,
                artifacts,
                prompt_patterns,
                secret_env,
                secret_files,
                results,
                boot_id: for_boot,
                ..
            } => {
                if for_boot.as_deref().is_some_and(|b| b != self.boot_id) {
                    eprintln!("fleet-agent: ignoring {task}: it was sent for an earlier boot");
                    return Answer::Nothing;
                }
                // Values come from the secret set, never from the message.
                let mut missing = None;
                for (var, path) in secret_env {
                    match self.secrets.read(&path) {
                        Ok(value) => {
                            env.insert(var, value.as_str().to_owned());
                        }
                        Err(e) => missing = Some(e),
                    }
                }
                self.tasks.start(task::RunSpec {
                    start_error: missing,
                    task,
                    argv,
                    env,
                    cwd,
                    timeout: timeout_secs.map(Duration::from_secs),
                    artifacts,
                    prompt_patterns,
                    secret_files,
                    results,
                });
                Answer::Nothing
            }
            HostMessage::Input {
                task,
                data,
                prompt,
                prompt_seq,
                ..
            } => {
                self.tasks
                    .input(&task, &data, prompt.as_deref(), prompt_seq);
                Answer::Nothing
            }
            HostMessage::PutFile {
                path,
                offset,
                data,
                sha256,
                unpack_into,
                ..
            } => {
                let put = files::put(
                    &path,
                    offset,
                    &data,
                    sha256.as_deref(),
                    unpack_into.as_deref(),
                );
                // A part that is not the last is answered by the next; the last, or a
                // failure, is answered now.
                let error = match put {
                    Ok(false) => return Answer::Nothing,
                    Ok(true) => None,
                    Err(e) => Some(e),
                };
                Answer::Reply(GuestMessage::Stored {
                    v: VERSION,
                    path,
                    error,
                })
            }
            HostMessage::Secrets {
                digest, mut files, ..
            } => {
                let error = self.secrets.replace(&digest, &files).err();
                // The values (base64) are wiped, not just freed, once they are stored.
                for file in &mut files {
                    zeroize::Zeroize::zeroize(&mut file.data);
                }
                Answer::Reply(GuestMessage::SecretsStored {
                    v: VERSION,
                    digest,
                    error,
                })
            }
            HostMessage::Mounts { digest, mounts, .. } => {
                Answer::Later(Work(Box::new(move || {
                    let errors = mounts::apply(&mounts);
                    for e in &errors {
                        eprintln!("fleet-agent: workspace {e}");
                    }
                    GuestMessage::Mounted {
                        v: VERSION,
                        digest,
                        errors,
                    }
                })))
            }
            HostMessage::Cancel { task, .. } => {
                self.tasks.cancel(&task);
                Answer::Nothing
            }
            HostMessage::Ack { task, seq, .. } => {
                self.tasks.ack(&task, seq);
                Answer::Nothing
            }
            HostMessage::StreamData { .. }
            | HostMessage::StreamCredit { .. }
            | HostMessage::StreamClose { .. } => {
                if let Some(proxy) = PROXY.get() {
                    proxy.handle(&message);
                }
                Answer::Nothing
            }
            HostMessage::Exec { .. }
            | HostMessage::ExecInput { .. }
            | HostMessage::ExecResize { .. }
            | HostMessage::ExecCredit { .. }
            | HostMessage::ExecKill { .. } => {
                self.execs.handle(message);
                Answer::Nothing
            }
        }
    }
}

/// Serves one opening of the link, whatever carries it (the virtio port, or the relay's
/// pipes): hello first, then a heartbeat every 10 s while a reader thread serves what the
/// host sends (`Link::handle`). Returns when a read or write fails.
fn serve_link(
    reader: impl Read + Send + 'static,
    writer: Box<dyn Write + Send>,
    boot_id: &str,
    tasks: &Arc<task::Tasks>,
    secrets: &Arc<secrets::Store>,
) -> std::io::Result<()> {
    let writer = Arc::new(Mutex::new(writer));
    let execs = {
        let writer = writer.clone();
        exec::Execs::new(Arc::new(move |m| {
            let _ = send(&writer, &m);
        }))
    };
    // The operator's sessions end with this opening of the link.
    struct EndSessions(Arc<exec::Execs>);
    impl Drop for EndSessions {
        fn drop(&mut self) {
            self.0.end_all();
        }
    }
    let _sessions = EndSessions(execs.clone());
    let link = Link {
        execs,
        tasks: tasks.clone(),
        secrets: secrets.clone(),
        boot_id: boot_id.to_owned(),
    };
    send(&writer, &link.hello())?;
    // Task messages go out on this opening of the port (a failed write is resent after the
    // host's next greeting).
    {
        let writer = writer.clone();
        tasks.set_sink(Arc::new(move |m| {
            let _ = send(&writer, &m);
        }));
    }
    // The proxy's streams go out on this opening too, and end with it.
    struct Streams;
    impl Drop for Streams {
        fn drop(&mut self) {
            if let Some(proxy) = PROXY.get() {
                proxy.set_sink(None);
            }
        }
    }
    let _streams = PROXY.get().map(|proxy| {
        let writer = writer.clone();
        proxy.set_sink(Some(Arc::new(move |m| {
            let _ = send(&writer, &m);
        })));
        Streams
    });
    let failed = Arc::new(AtomicBool::new(false));
    {
        let (writer, failed) = (writer.clone(), failed.clone());
        std::thread::spawn(move || {
            let mut lines = BufReader::with_capacity(LINK_READ_BYTES, reader).lines();
            loop {
                // A `Secrets` line carries values: wiped when it is dropped.
                let line = match lines.next() {
                    Some(Ok(line)) => zeroize::Zeroizing::new(line),
                    // No host connected yet reads as end of file: wait and read on.
                    None => {
                        std::thread::sleep(Duration::from_millis(200));
                        continue;
                    }
                    Some(Err(_)) => break,
                };
                let message = match HostMessage::from_line(&line) {
                    Ok(message) => message,
                    Err(e) => {
                        eprintln!("fleet-agent: ignoring a line from the host: {e}");
                        continue;
                    }
                };
                let sent = match link.handle(message) {
                    Answer::Nothing => Ok(()),
                    Answer::Reply(reply) => send(&writer, &reply),
                    Answer::Later(work) => {
                        let writer = writer.clone();
                        std::thread::spawn(move || {
                            let _ = send(&writer, &(work.0)());
                        });
                        Ok(())
                    }
                    Answer::Greet(hello) => send(&writer, &hello)
                        .and_then(|()| send(&writer, &addresses_message(addresses::read())))
                        .map(|()| link.tasks.resend()),
                };
                if sent.is_err() {
                    break;
                }
            }
            failed.store(true, Ordering::Relaxed);
        });
    }
    let mut interfaces = addresses::read();
    send(&writer, &addresses_message(interfaces.clone()))?;
    let mut last_heartbeat = std::time::Instant::now();
    while !failed.load(Ordering::Relaxed) {
        std::thread::sleep(ADDRESS_CHECK);
        let now = addresses::read();
        if now != interfaces {
            send(&writer, &addresses_message(now.clone()))?;
            interfaces = now;
        }
        if last_heartbeat.elapsed() < HEARTBEAT {
            continue;
        }
        last_heartbeat = std::time::Instant::now();
        let unix_time = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        send(
            &writer,
            &GuestMessage::Heartbeat {
                v: VERSION,
                unix_time,
            },
        )?;
    }
    Err(std::io::Error::other("reading from the host failed"))
}

/// This start of the agent (a random id, read once).
fn instance() -> &'static str {
    static ID: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    ID.get_or_init(|| {
        std::fs::read_to_string("/proc/sys/kernel/random/uuid")
            .map(|s| s.trim().to_owned())
            .unwrap_or_else(|_| format!("pid-{}", std::process::id()))
    })
}

fn addresses_message(interfaces: Vec<fleet_agent_protocol::Interface>) -> GuestMessage {
    GuestMessage::Addresses {
        v: VERSION,
        interfaces,
    }
}

fn send(port: &Mutex<impl Write + ?Sized>, message: &GuestMessage) -> std::io::Result<()> {
    let mut port = port.lock().unwrap_or_else(|p| p.into_inner());
    port.write_all(message.to_line().as_bytes())?;
    port.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_port_by_name() {
        let dir = std::env::temp_dir().join(format!("fleet-agent-test-{}", std::process::id()));
        for (port, name) in [
            ("vport1p1", "org.qemu.guest_agent.0"),
            ("vport1p2", PORT_NAME),
        ] {
            std::fs::create_dir_all(dir.join(port)).expect("mkdir");
            std::fs::write(dir.join(port).join("name"), format!("{name}\n")).expect("write");
        }
        assert_eq!(find_port(&dir), Some(PathBuf::from("/dev/vport1p2")));
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }

    fn link() -> Link {
        Link {
            execs: exec::Execs::new(Arc::new(|_| {})),
            tasks: Arc::new(task::Tasks::default()),
            secrets: Arc::new(secrets::Store::new(PathBuf::from("/nonexistent"), false)),
            boot_id: "boot-2".into(),
        }
    }

    /// A host that greets gets a hello back, and then what it has not acknowledged.
    #[test]
    fn a_greeting_is_answered_with_who_we_are() {
        let answer = link().handle(HostMessage::Hello { v: VERSION });
        let Answer::Greet(GuestMessage::Hello { boot_id, .. }) = answer else {
            panic!("{answer:?}");
        };
        assert_eq!(boot_id, "boot-2");
    }

    /// A run sent for another boot is never started in this one, and nothing is answered.
    #[test]
    fn a_run_for_an_earlier_boot_is_ignored() {
        let link = link();
        let answer = link.handle(HostMessage::RunTask {
            v: VERSION,
            task: "t-1".into(),
            argv: vec!["true".into()],
            env: Default::default(),
            cwd: None,
            timeout_secs: None,
            artifacts: Vec::new(),
            prompt_patterns: Vec::new(),
            secret_env: Default::default(),
            secret_files: Vec::new(),
            results: None,
            boot_id: Some("boot-1".into()),
        });
        assert_eq!(answer, Answer::Nothing);
        assert!(!link.tasks.cancel("t-1"), "no such task was started");
    }
}
