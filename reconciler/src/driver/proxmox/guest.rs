//! The agent link on Proxmox: relayed exchanges run through qemu-guest-agent
//! (`agent/exec` with the request as `input-data`, then `agent/exec-status` for the answer).
//!
//! qemu-guest-agent was chosen over SSH because it needs nothing fleet does not already
//! trust. There is no network path into the guest, no key to inject, keep or rotate, and no
//! host key to pin. The link runs over the same authenticated, verified API connection that
//! owns the VM, and is pinned to the VM fleet checked the stamp of.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::client::PveClient;
use crate::driver::{DriverError, ErrorKind, GuestExchange};

/// The guest's half, found on `PATH` by qemu-guest-agent.
const EXCHANGE_COMMAND: [&str; 2] = ["fleet-agent", "exchange"];
/// How long one exchange may take in the guest.
const EXCHANGE_DEADLINE: Duration = Duration::from_secs(15);

/// Exchanges with one VM (by node and VMID, checked to be fleet's when the link opened).
pub struct QemuGuestAgent {
    pub client: Arc<PveClient>,
    pub node: String,
    pub vmid: u64,
    pub name: String,
}

#[derive(serde::Deserialize)]
struct Started {
    pid: i64,
}

#[derive(serde::Deserialize)]
struct ExecStatus {
    exited: serde_json::Value,
    #[serde(default)]
    exitcode: Option<i64>,
    #[serde(default, rename = "out-data")]
    out_data: Option<String>,
    #[serde(default, rename = "err-data")]
    err_data: Option<String>,
    #[serde(default, rename = "out-truncated")]
    out_truncated: Option<serde_json::Value>,
}

fn truthy(v: &serde_json::Value) -> bool {
    match v {
        serde_json::Value::Bool(b) => *b,
        serde_json::Value::Number(n) => n.as_i64() == Some(1),
        serde_json::Value::String(s) => s == "1" || s == "true",
        _ => false,
    }
}

impl GuestExchange for QemuGuestAgent {
    fn exchange(&self, request: &str) -> Result<String, DriverError> {
        let base = format!("/nodes/{}/qemu/{}/agent", self.node, self.vmid);
        let mut form: Vec<(&str, String)> = EXCHANGE_COMMAND
            .iter()
            .map(|part| ("command", (*part).to_owned()))
            .collect();
        form.push(("input-data", request.to_owned()));
        let started: Started = self.client.post(&format!("{base}/exec"), &form)?;
        let until = Instant::now() + EXCHANGE_DEADLINE;
        let mut pause = Duration::from_millis(10);
        loop {
            std::thread::sleep(pause);
            // The process runs on whether or not this read gets through: ask again.
            let status: ExecStatus = match self.client.get(
                &format!("{base}/exec-status"),
                &[("pid", started.pid.to_string())],
            ) {
                Ok(status) => status,
                Err(e) if e.kind == ErrorKind::Transient && Instant::now() < until => {
                    pause = (pause * 2).min(Duration::from_millis(200));
                    continue;
                }
                Err(e) => return Err(e.into()),
            };
            if truthy(&status.exited) {
                if status.exitcode != Some(0) {
                    let err = status.err_data.unwrap_or_default();
                    return Err(DriverError::new(
                        ErrorKind::Transient,
                        format!(
                            "`fleet-agent exchange` in {} exited with {:?}: {}",
                            self.name,
                            status.exitcode,
                            err.trim()
                        ),
                    ));
                }
                if status.out_truncated.as_ref().is_some_and(truthy) {
                    return Err(DriverError::new(
                        ErrorKind::Permanent,
                        format!("the guest agent of {} cut an exchange's answer", self.name),
                    ));
                }
                return Ok(status.out_data.unwrap_or_default());
            }
            if Instant::now() >= until {
                return Err(DriverError::new(
                    ErrorKind::Transient,
                    format!(
                        "`fleet-agent exchange` in {} still running after {}s",
                        self.name,
                        EXCHANGE_DEADLINE.as_secs()
                    ),
                ));
            }
            pause = (pause * 2).min(Duration::from_millis(200));
        }
    }

    fn describe(&self) -> String {
        format!(
            "qemu-guest-agent of {} (VMID {} on {})",
            self.name, self.vmid, self.node
        )
    }
}
