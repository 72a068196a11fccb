//! A Proxmox VM's serial console (`fleet console`): `termproxy` issues a ticket for
//! `serial0`, `vncwebsocket` opens the terminal through the API's own connection, trust
//! and token, and the termproxy protocol runs over it, as PVE's xterm.js speaks it: the
//! client says `user:ticket`, the server answers `OK`; typed bytes go as `0:LEN:DATA`,
//! a window size as `1:COLS:ROWS:`, a keepalive as `2`; output comes as binary frames.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use tokio_tungstenite::tungstenite::Message;

use super::client::{PveClient, WebSocket};
use crate::driver::{Console, DriverError, ErrorKind};

/// How often the console says it is still there (xterm.js: every 30 s).
const KEEPALIVE: Duration = Duration::from_secs(30);

pub struct PveConsole {
    runtime: tokio::runtime::Handle,
    sink: Mutex<SplitSink<WebSocket, Message>>,
    stream: Mutex<SplitStream<WebSocket>>,
    /// Output received and not yet taken (a frame larger than the reader's buffer).
    pending: Mutex<Vec<u8>>,
    /// Typed bytes that end in the middle of a UTF-8 character, kept for the next send
    /// (the protocol carries text).
    typed: Mutex<Vec<u8>>,
    closed: AtomicBool,
}

fn lost(e: impl std::fmt::Display) -> DriverError {
    DriverError::new(ErrorKind::Transient, format!("the console: {e}"))
}

/// Opens `vm_path`'s (`/nodes/N/qemu/ID`) serial console.
pub fn open(client: &PveClient, vm_path: &str) -> Result<Arc<PveConsole>, DriverError> {
    let proxy: Value = client.post(
        &format!("{vm_path}/termproxy"),
        &[("serial", "serial0".to_owned())],
    )?;
    let text = |key: &str| match &proxy[key] {
        Value::String(s) => s.clone(),
        Value::Number(n) => n.to_string(),
        _ => String::new(),
    };
    let (ticket, port, user) = (text("ticket"), text("port"), text("user"));
    if ticket.is_empty() || port.is_empty() {
        return Err(DriverError::new(
            ErrorKind::Permanent,
            "termproxy gave no ticket or port",
        ));
    }
    let (socket, runtime) = client.websocket(
        &format!("{vm_path}/vncwebsocket"),
        &[("port", port), ("vncticket", ticket.clone())],
    )?;
    let (mut sink, mut stream) = socket.split();
    runtime.block_on(async {
        sink.send(Message::text(format!("{user}:{ticket}\n")))
            .await
            .map_err(lost)?;
        match stream.next().await {
            Some(Ok(Message::Binary(b))) if b.starts_with(b"OK") => Ok(()),
            Some(Ok(Message::Text(t))) if t.starts_with("OK") => Ok(()),
            _ => Err(DriverError::new(
                ErrorKind::Permanent,
                "the console refused fleet's ticket",
            )),
        }
    })?;
    let console = Arc::new(PveConsole {
        runtime,
        sink: Mutex::new(sink),
        stream: Mutex::new(stream),
        pending: Mutex::default(),
        typed: Mutex::default(),
        closed: AtomicBool::new(false),
    });
    {
        let console = Arc::downgrade(&console);
        std::thread::spawn(move || {
            loop {
                std::thread::sleep(KEEPALIVE);
                let Some(console) = console.upgrade() else {
                    return;
                };
                if console.closed.load(Ordering::Relaxed) || console.frame("2".into()).is_err() {
                    return;
                }
            }
        });
    }
    Ok(console)
}

impl PveConsole {
    fn frame(&self, text: String) -> Result<(), DriverError> {
        let mut sink = self.sink.lock().unwrap_or_else(|p| p.into_inner());
        self.runtime
            .block_on(sink.send(Message::text(text)))
            .map_err(lost)
    }
}

impl Console for PveConsole {
    /// The terminal's size is now `cols` by `rows`.
    fn resize(&self, cols: u16, rows: u16) -> Result<(), DriverError> {
        self.frame(format!("1:{cols}:{rows}:"))
    }

    fn recv(&self, buf: &mut [u8]) -> Result<usize, DriverError> {
        let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        while pending.is_empty() {
            let next = {
                let mut stream = self.stream.lock().unwrap_or_else(|p| p.into_inner());
                self.runtime.block_on(stream.next())
            };
            match next {
                Some(Ok(Message::Binary(b))) => pending.extend_from_slice(&b),
                Some(Ok(Message::Text(t))) => pending.extend_from_slice(t.as_bytes()),
                Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => {}
                Some(Ok(Message::Close(_))) | None => {
                    self.closed.store(true, Ordering::Relaxed);
                    return Ok(0);
                }
                Some(Err(e)) => {
                    self.closed.store(true, Ordering::Relaxed);
                    return Err(lost(e));
                }
            }
        }
        let n = buf.len().min(pending.len());
        buf[..n].copy_from_slice(&pending[..n]);
        pending.drain(..n);
        Ok(n)
    }

    fn send(&self, data: &[u8]) -> Result<(), DriverError> {
        // The protocol carries text (its length in bytes of UTF-8): a character split
        // across two reads waits for its rest; bytes that are no UTF-8 at all go as U+FFFD.
        let text = {
            let mut typed = self.typed.lock().unwrap_or_else(|p| p.into_inner());
            typed.extend_from_slice(data);
            let whole = match std::str::from_utf8(&typed) {
                Ok(s) => s.len(),
                Err(e) if e.error_len().is_none() => e.valid_up_to(),
                Err(_) => typed.len(),
            };
            let text = String::from_utf8_lossy(&typed[..whole]).into_owned();
            typed.drain(..whole);
            text
        };
        if text.is_empty() {
            return Ok(());
        }
        self.frame(format!("0:{}:{text}", text.len()))
    }
}
