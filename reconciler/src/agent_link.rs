//! The host side of the agent link: a connection to a VM's virtio-serial port (a unix
//! socket libvirt binds), speaking `fleet-agent-protocol`.
//!
//! QEMU accepts one client per port at a time; the guest's writes wait while no client is
//! connected, so nothing the agent sent before the host connected is lost.

use std::io::{BufRead, BufReader, Read};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use fleet_agent_protocol::{GuestMessage, HostMessage, VERSION};

use crate::driver::AgentEndpoint;

#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("cannot connect to the agent link at {path}: {source}")]
    Connect {
        path: String,
        source: std::io::Error,
    },
    #[error("the agent link closed")]
    Closed,
    #[error("no hello from the agent within {0:?}")]
    Timeout(Duration),
    #[error("the agent speaks protocol version {0}, this fleet speaks {VERSION}")]
    Version(u32),
    #[error("agent link: {0}")]
    Protocol(String),
    #[error("agent link: {0}")]
    Io(#[from] std::io::Error),
}

/// An open link to one VM's agent.
pub struct AgentLink {
    reader: BufReader<UnixStream>,
    /// The start of a line whose end has not arrived yet (a read timed out in its middle).
    partial: Vec<u8>,
}

impl AgentLink {
    pub fn connect(endpoint: &AgentEndpoint) -> Result<AgentLink, LinkError> {
        let AgentEndpoint::UnixSocket(path) = endpoint;
        let stream = UnixStream::connect(path).map_err(|source| LinkError::Connect {
            path: path.display().to_string(),
            source,
        })?;
        Ok(AgentLink {
            reader: BufReader::new(stream),
            partial: Vec::new(),
        })
    }

    /// Greets the agent, which answers with its hello (also after either side restarted).
    pub fn greet(&mut self) -> Result<(), LinkError> {
        self.send(&HostMessage::Hello { v: VERSION })
    }

    pub fn send(&mut self, message: &HostMessage) -> Result<(), LinkError> {
        use std::io::Write;
        let mut stream = self.reader.get_ref();
        stream.write_all(message.to_line().as_bytes())?;
        Ok(stream.flush()?)
    }

    /// The next message, waiting at most `timeout`. A line cut by the timeout is kept and
    /// completed by the next call.
    pub fn next(&mut self, timeout: Duration) -> Result<GuestMessage, LinkError> {
        self.reader.get_ref().set_read_timeout(Some(timeout))?;
        let limit = fleet_agent_protocol::MAX_LINE_BYTES as u64 + 1;
        let room = limit.saturating_sub(self.partial.len() as u64);
        let read = (&mut self.reader)
            .take(room)
            .read_until(b'\n', &mut self.partial);
        match read {
            Ok(0) if self.partial.is_empty() => Err(LinkError::Closed),
            Ok(_) if !self.partial.ends_with(b"\n") => {
                if self.partial.len() as u64 >= limit {
                    return Err(LinkError::Protocol(format!(
                        "a line longer than {} bytes",
                        fleet_agent_protocol::MAX_LINE_BYTES
                    )));
                }
                Err(LinkError::Closed)
            }
            Ok(_) => {
                let line = std::mem::take(&mut self.partial);
                let line = String::from_utf8(line)
                    .map_err(|_| LinkError::Protocol("a line that is not UTF-8".into()))?;
                let message = GuestMessage::from_line(&line).map_err(LinkError::Protocol)?;
                if message.version() != VERSION {
                    return Err(LinkError::Version(message.version()));
                }
                Ok(message)
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                Err(LinkError::Timeout(timeout))
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Waits for the agent's hello (skipping heartbeats), at most `timeout` in all.
    pub fn hello(&mut self, timeout: Duration) -> Result<GuestMessage, LinkError> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(LinkError::Timeout(timeout));
            }
            let message = self.next(left)?;
            if matches!(message, GuestMessage::Hello { .. }) {
                return Ok(message);
            }
        }
    }
}
