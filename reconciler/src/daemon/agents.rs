//! Agent presence: one link per running VM, held by a thread that greets the agent, records
//! its hello (version, boot id) and heartbeats, and reconnects after either side restarts.
//! A change (connected, disconnected, a new boot) wakes the daemon, whose next pass writes
//! it into the VM's status.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use fleet_agent_protocol::GuestMessage;
use tokio::sync::mpsc::UnboundedSender;

use super::Trigger;
use crate::agent_link::AgentLink;
use crate::driver::Driver;
use crate::status::{AgentStatus, timestamp};

const RETRY: Duration = Duration::from_secs(2);
/// Heartbeats come every 10 s; silence this long means the link is gone.
const SILENCE: Duration = Duration::from_secs(35);

struct Tracked {
    stop: Arc<AtomicBool>,
}

#[derive(Default)]
pub struct Agents {
    threads: HashMap<String, Tracked>,
    status: Arc<Mutex<BTreeMap<String, AgentStatus>>>,
}

impl Agents {
    /// Follows exactly the VMs in `running` (name → its driver).
    pub fn sync(&mut self, running: Vec<(String, Arc<dyn Driver>)>, tx: &UnboundedSender<Trigger>) {
        let wanted: std::collections::HashSet<&str> =
            running.iter().map(|(n, _)| n.as_str()).collect();
        self.threads.retain(|name, tracked| {
            let keep = wanted.contains(name.as_str());
            if !keep {
                tracked.stop.store(true, Ordering::Relaxed);
            }
            keep
        });
        self.status
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|name, _| wanted.contains(name.as_str()));
        for (name, driver) in running {
            if self.threads.contains_key(&name) {
                continue;
            }
            let stop = Arc::new(AtomicBool::new(false));
            let (status, tx, thread_stop, vm) =
                (self.status.clone(), tx.clone(), stop.clone(), name.clone());
            let spawned = std::thread::Builder::new()
                .name(format!("agent-{name}"))
                .spawn(move || follow(&vm, driver.as_ref(), &status, &tx, &thread_stop));
            if spawned.is_ok() {
                self.threads.insert(name, Tracked { stop });
            }
        }
    }

    pub fn snapshot(&self) -> BTreeMap<String, AgentStatus> {
        self.status
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

fn follow(
    vm: &str,
    driver: &dyn Driver,
    status: &Mutex<BTreeMap<String, AgentStatus>>,
    tx: &UnboundedSender<Trigger>,
    stop: &AtomicBool,
) {
    let set = |new: Option<AgentStatus>| {
        let mut all = status.lock().unwrap_or_else(|p| p.into_inner());
        let changed = match &new {
            Some(s) => all
                .insert(vm.to_owned(), s.clone())
                .is_none_or(|old| old.connected != s.connected || old.boot_id != s.boot_id),
            None => all
                .get_mut(vm)
                .is_some_and(|s| std::mem::replace(&mut s.connected, false)),
        };
        if changed {
            let _ = tx.send(Trigger::Agent);
        }
    };
    while !stop.load(Ordering::Relaxed) {
        let link = driver
            .agent_endpoint(vm)
            .ok()
            .flatten()
            .and_then(|endpoint| AgentLink::connect(&endpoint).ok());
        if let Some(mut link) = link
            && link.greet().is_ok()
        {
            loop {
                if stop.load(Ordering::Relaxed) {
                    return;
                }
                match link.next(SILENCE) {
                    Ok(GuestMessage::Hello {
                        agent_version,
                        boot_id,
                        ..
                    }) => set(Some(AgentStatus {
                        connected: true,
                        agent_version,
                        boot_id,
                        since: timestamp(SystemTime::now()),
                    })),
                    Ok(GuestMessage::Heartbeat { .. }) => {}
                    // The host does not dispatch tasks yet, so no task output can arrive;
                    // task dispatch will route these to the task's status and output log.
                    Ok(GuestMessage::Output { .. } | GuestMessage::Exit { .. }) => {}
                    Err(e) => {
                        tracing::debug!(vm, "agent link lost: {e}");
                        break;
                    }
                }
            }
            set(None);
        }
        std::thread::sleep(RETRY);
    }
}
