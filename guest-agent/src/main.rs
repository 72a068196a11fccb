//! `fleet-agent`: runs inside each VM and talks to the host over a virtio-serial port.
//!
//! This is the foundation's minimal agent: it finds the port named `org.fleet.agent.0`
//! (through `/sys/class/virtio-ports`, since the micro image has no udev), says hello with
//! its version and boot id, and sends a heartbeat every 10 s, as newline-delimited JSON.
//! Tasks, output streaming and prompts build on this link (see the guest-agent issue).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;

const PORT_NAME: &str = "org.fleet.agent.0";
const PROTOCOL_VERSION: u32 = 1;
const HEARTBEAT: Duration = Duration::from_secs(10);

#[derive(Serialize)]
#[serde(
    tag = "type",
    rename_all = "camelCase",
    rename_all_fields = "camelCase"
)]
enum Message<'a> {
    Hello {
        v: u32,
        agent_version: &'a str,
        boot_id: &'a str,
    },
    Heartbeat {
        v: u32,
        unix_time: u64,
    },
}

fn main() {
    if std::env::args().any(|a| a == "--version" || a == "-V") {
        println!("fleet-agent {}", env!("CARGO_PKG_VERSION"));
        return;
    }
    let boot_id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default();
    loop {
        match find_port(Path::new("/sys/class/virtio-ports")) {
            Some(dev) => {
                if let Err(e) = serve(&dev, &boot_id) {
                    eprintln!("fleet-agent: link on {}: {e}; reopening", dev.display());
                }
            }
            None => eprintln!("fleet-agent: no virtio port named {PORT_NAME} yet"),
        }
        std::thread::sleep(Duration::from_secs(2));
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

fn serve(dev: &Path, boot_id: &str) -> std::io::Result<()> {
    let mut port = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(dev)?;
    send(
        &mut port,
        &Message::Hello {
            v: PROTOCOL_VERSION,
            agent_version: env!("CARGO_PKG_VERSION"),
            boot_id,
        },
    )?;
    loop {
        std::thread::sleep(HEARTBEAT);
        let unix_time = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        send(
            &mut port,
            &Message::Heartbeat {
                v: PROTOCOL_VERSION,
                unix_time,
            },
        )?;
    }
}

fn send(port: &mut impl Write, message: &Message<'_>) -> std::io::Result<()> {
    let mut line = serde_json::to_vec(message).map_err(std::io::Error::other)?;
    line.push(b'\n');
    port.write_all(&line)?;
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

    #[test]
    fn messages_are_versioned_json_lines() {
        let mut out = Vec::new();
        send(
            &mut out,
            &Message::Hello {
                v: 1,
                agent_version: "0.1.0",
                boot_id: "b",
            },
        )
        .expect("send");
        assert_eq!(
            String::from_utf8(out).expect("utf8"),
            "{\"type\":\"hello\",\"v\":1,\"agentVersion\":\"0.1.0\",\"bootId\":\"b\"}\n"
        );
    }
}
