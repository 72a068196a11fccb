//! The daemon's exec socket, `<status>/exec/exec.sock`: one thread accepts; each client gets a
//! thread that reads its request and then writes what the guest sends, and one that
//! passes what the client sends to the link.
//!
//! Who may connect: the socket is in a 0700 directory of the status directory
//! (`<status>/exec/exec.sock`), and a peer whose user is neither the daemon's nor root is
//! refused on its credentials, whatever the file's mode.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::time::Duration;

use std::os::unix::fs::DirBuilderExt;

use anyhow::Context;
use fleet_agent_protocol::exec::MAX_ARGV_BYTES;
use fleet_agent_protocol::{GuestMessage, HostMessage, MAX_LINE_BYTES, VERSION};

use super::link::{Routes, ToLink};
use super::{Request, SOCKET, shell_words};
use crate::status::{Event, EventKind, StatusDir};

/// Clients served at once; more wait for the accept thread.
const MAX_CLIENTS: usize = 64;

/// How long a client has to send its request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Binds `<status>/exec/exec.sock` and serves it on threads of its own for the life of the
/// process. A socket file left there is stale (this process holds the status lock).
pub fn start(status: &StatusDir, routes: Routes) -> anyhow::Result<PathBuf> {
    let path = socket_path(status.root());
    let dir = path.parent().unwrap_or(status.root());
    match std::fs::DirBuilder::new().mode(0o700).create(dir) {
        Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => {
            return Err(e).with_context(|| format!("cannot make {}", dir.display()));
        }
        _ => {}
    }
    // Only this user reaches the socket, whatever mode it is bound with.
    std::fs::set_permissions(dir, std::os::unix::fs::PermissionsExt::from_mode(0o700))
        .with_context(|| format!("cannot make {} private", dir.display()))?;
    match std::fs::symlink_metadata(&path) {
        Ok(meta) if std::os::unix::fs::FileTypeExt::is_socket(&meta.file_type()) => {
            std::fs::remove_file(&path)
                .with_context(|| format!("cannot remove the stale {}", path.display()))?;
        }
        Ok(_) => anyhow::bail!(
            "{} exists and is not a socket; remove it so fleet serve can take exec requests",
            path.display()
        ),
        Err(_) => {}
    }
    let listener = UnixListener::bind(&path).with_context(|| {
        format!(
            "cannot listen for exec requests on {} (a unix socket path is at most 107 bytes)",
            path.display()
        )
    })?;
    std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600))
        .with_context(|| format!("cannot make {} private", path.display()))?;
    let status = status.clone();
    std::thread::Builder::new()
        .name("exec-accept".into())
        .spawn(move || accept(&listener, &status, &routes))?;
    Ok(path)
}

fn accept(listener: &UnixListener, status: &StatusDir, routes: &Routes) {
    let clients = Arc::new(AtomicUsize::new(0));
    // Session ids start anywhere: a guest session left from an earlier daemon never
    // shares one with a new session (and the link forwards only its own sessions').
    let first = uuid::Uuid::new_v4().as_u128() as u32;
    let next = Arc::new(AtomicU32::new(first));
    for conn in listener.incoming() {
        let Ok(conn) = conn else { continue };
        while clients.load(Ordering::Relaxed) >= MAX_CLIENTS {
            std::thread::sleep(Duration::from_millis(100));
        }
        clients.fetch_add(1, Ordering::Relaxed);
        let (status, routes, served, next) = (
            status.clone(),
            routes.clone(),
            clients.clone(),
            next.clone(),
        );
        let spawned = std::thread::Builder::new()
            .name("exec-session".into())
            .spawn(move || {
                if let Err(e) = serve_client(conn, &status, &routes, &next) {
                    tracing::debug!("exec client: {e}");
                }
                served.fetch_sub(1, Ordering::Relaxed);
            });
        if spawned.is_err() {
            clients.fetch_sub(1, Ordering::Relaxed);
            tracing::warn!("cannot start a thread for an exec client");
        }
    }
}

/// Who the peer is: its uid, if it may use the socket.
fn peer_allowed(conn: &UnixStream) -> Result<u32, String> {
    let cred = rustix::net::sockopt::socket_peercred(conn)
        .map_err(|e| format!("cannot read the peer's credentials: {e}"))?;
    let (peer, me) = (cred.uid.as_raw(), rustix::process::geteuid().as_raw());
    if peer == me || peer == 0 {
        Ok(peer)
    } else {
        Err(format!(
            "uid {peer} may not exec into VMs: only the status directory's owner (uid {me}) and root may"
        ))
    }
}

fn user_name(uid: u32) -> String {
    nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid))
        .ok()
        .flatten()
        .map_or_else(|| format!("uid {uid}"), |u| u.name)
}

/// Writes one line to the client.
fn write_line(conn: &mut UnixStream, message: &GuestMessage) -> std::io::Result<()> {
    conn.write_all(message.to_line().as_bytes())
}

fn refuse(conn: &mut UnixStream, error: String) -> anyhow::Result<()> {
    let _ = write_line(
        conn,
        &GuestMessage::ExecExit {
            v: VERSION,
            exec: 0,
            code: None,
            signal: None,
            error: Some(error.clone()),
        },
    );
    anyhow::bail!(error)
}

/// Reads one line of at most `MAX_LINE_BYTES`.
fn read_line(reader: &mut impl BufRead) -> std::io::Result<Option<String>> {
    let mut line = String::new();
    let n = reader
        .by_ref()
        .take(MAX_LINE_BYTES as u64 + 1)
        .read_line(&mut line)?;
    if n == 0 {
        return Ok(None);
    }
    if n > MAX_LINE_BYTES {
        return Err(std::io::Error::other("a line longer than the limit"));
    }
    Ok(Some(line))
}

fn serve_client(
    mut conn: UnixStream,
    status: &StatusDir,
    routes: &Routes,
    next: &AtomicU32,
) -> anyhow::Result<()> {
    let uid = match peer_allowed(&conn) {
        Ok(uid) => uid,
        Err(e) => return refuse(&mut conn, e),
    };
    conn.set_read_timeout(Some(REQUEST_TIMEOUT))?;
    let mut reader = BufReader::new(conn.try_clone()?);
    let request: Request = match read_line(&mut reader)
        .map_err(|e| e.to_string())
        .and_then(|l| l.ok_or_else(|| "no request".to_owned()))
        .and_then(|l| serde_json::from_str(&l).map_err(|e| format!("not a request: {e}")))
    {
        Ok(r) => r,
        Err(e) => return refuse(&mut conn, e),
    };
    conn.set_read_timeout(None)?;
    if request.argv.is_empty() {
        return refuse(&mut conn, "no command to run".into());
    }
    if request.argv.iter().map(String::len).sum::<usize>() > MAX_ARGV_BYTES {
        return refuse(
            &mut conn,
            format!("a command line longer than {MAX_ARGV_BYTES} bytes"),
        );
    }
    let Some(route) = routes.get(&request.vm) else {
        return refuse(
            &mut conn,
            format!(
                "fleet serve has no agent link to {} now: it is not one of this fleet's running VMs, or its agent has not said hello yet (`fleet status` shows the link)",
                request.vm
            ),
        );
    };
    let exec = next.fetch_add(1, Ordering::Relaxed);
    let by = match &request.operator {
        Some(op) => format!("{} for {op}", user_name(uid)),
        None => user_name(uid),
    };
    let command = shell_words(&request.argv);
    let log = |kind: EventKind, message: String| {
        let event = Event::by_operator(kind, &request.vm, &by, message);
        if let Err(e) = status.append_event(&event) {
            tracing::warn!("cannot record an exec event: {e}");
        }
    };
    let (to_client, from_link) = std::sync::mpsc::channel();
    let queued = Arc::new(AtomicUsize::new(0));
    if !route.send(ToLink::Open {
        exec,
        argv: request.argv.clone(),
        tty: request.tty,
        term: request.term.clone(),
        to_client,
        queued: queued.clone(),
    }) {
        return refuse(
            &mut conn,
            format!("the agent link to {} just dropped", request.vm),
        );
    }
    log(
        EventKind::ExecStarted,
        format!(
            "{by} runs `{command}` in {}{}",
            request.vm,
            if request.tty.is_some() {
                " (terminal)"
            } else {
                ""
            }
        ),
    );
    // The client's messages, to the guest; its going away ends the session.
    {
        let route = route.clone();
        std::thread::spawn(move || {
            while let Ok(Some(line)) = read_line(&mut reader) {
                let Ok(message) = HostMessage::from_line(&line) else {
                    break;
                };
                let message = match message {
                    HostMessage::ExecInput { data, eof, .. } => HostMessage::ExecInput {
                        v: VERSION,
                        exec,
                        data,
                        eof,
                    },
                    HostMessage::ExecResize { size, .. } => HostMessage::ExecResize {
                        v: VERSION,
                        exec,
                        size,
                    },
                    HostMessage::ExecCredit { bytes, .. } => HostMessage::ExecCredit {
                        v: VERSION,
                        exec,
                        bytes,
                    },
                    HostMessage::ExecKill { .. } => HostMessage::ExecKill { v: VERSION, exec },
                    _ => break,
                };
                if !route.send(ToLink::Message(Box::new(message))) {
                    return;
                }
            }
            route.send(ToLink::Gone { exec });
        });
    }
    let mut ended = None;
    for message in from_link {
        queued.fetch_sub(1, Ordering::Relaxed);
        let last = match &message {
            GuestMessage::ExecExit {
                code,
                signal,
                error,
                ..
            } => Some(match (code, signal, error) {
                // The guest's words: one short line in the events.
                (_, _, Some(e)) => format!("failed: {}", crate::terminal::one_line(e, 200)),
                (_, Some(s), _) => format!("killed by signal {s}"),
                (Some(c), _, _) => format!("exited {c}"),
                _ => "ended".to_owned(),
            }),
            _ => None,
        };
        if write_line(&mut conn, &message).is_err() {
            route.send(ToLink::Gone { exec });
            ended = Some("the client went away".to_owned());
            break;
        }
        if last.is_some() {
            ended = last;
            break;
        }
    }
    log(
        EventKind::ExecEnded,
        format!(
            "`{command}` in {}: {}",
            request.vm,
            ended.as_deref().unwrap_or("the link went away")
        ),
    );
    let _ = conn.shutdown(std::net::Shutdown::Both);
    Ok(())
}

/// The socket of the status directory at `root`.
pub fn socket_path(root: &Path) -> PathBuf {
    root.join("exec").join(SOCKET)
}
