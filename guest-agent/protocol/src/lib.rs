//! The agent link's protocol: newline-delimited JSON, one message a line, every message
//! carrying the protocol version `v`. Shared by the host (`fleet`) and the guest
//! (`fleet-agent`) so both sides read one definition.
//!
//! Task output and exits carry sequence numbers; the guest keeps them until the host
//! acknowledges them (`Ack`) and sends the rest again after each host greeting, so a link that
//! drops loses nothing, and the host drops what it has already seen by `seq`.
//!
//! The host greets when it connects (`HostMessage::Hello`), the guest says who it is
//! (`GuestMessage::Hello`, when its port opens and whenever the host greets, so a host that
//! reconnects learns it again) and that it is alive (`heartbeat`). Tasks, output, prompts
//! and files extend these enums.

use serde::{Deserialize, Serialize};

pub mod exec;
pub mod relay;
pub mod stream;

/// The protocol version this build speaks.
pub const VERSION: u32 = 1;

/// The name of the virtio-serial port (libvirt channel target) the link runs over.
pub const PORT_NAME: &str = "org.fleet.agent.0";

/// Where the guest keeps secret values: a tmpfs, files mode 0400. Nothing else in the guest
/// holds them (the seed, the disk and the task's argv never do).
pub const SECRETS_DIR: &str = "/run/fleet/secrets";

/// The artifact name a run's results travel under: the git bundle of the commits the run
/// added to its checkout's branch (`RunTask::results`).
pub const RESULTS_ARTIFACT: &str = ".fleet/results.bundle";

/// Longest line either side accepts; longer input is a protocol error, not an allocation.
pub const MAX_LINE_BYTES: usize = 1024 * 1024;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(
    tag = "type",
    rename_all = "camelCase",
    rename_all_fields = "camelCase"
)]
pub enum GuestMessage {
    /// Sent first on every connection.
    Hello {
        v: u32,
        agent_version: String,
        /// Changes at every boot of the guest (`/proc/sys/kernel/random/boot_id`).
        boot_id: String,
        /// The digest of the secret set the guest holds (from `Secrets`), if any: the host
        /// sends the set again only when its own digest differs.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        secrets: Option<String>,
        /// Changes each time the agent starts: a hello with another one (or another boot)
        /// on an open link means the agent's exec sessions are gone.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        instance: Option<String>,
    },
    Heartbeat {
        v: u32,
        unix_time: u64,
    },
    /// The guest's network interfaces and their addresses, loopback left out: sent after
    /// each hello and whenever they change. The host shows them (a VM with a NIC gets its
    /// address by DHCP, which only the guest knows); it bounds and checks what it keeps.
    Addresses {
        v: u32,
        interfaces: Vec<Interface>,
    },
    /// Terminal output of a task; `seq` counts chunks from 1 so the host can tell a gap or
    /// a repeat.
    Output {
        v: u32,
        task: String,
        seq: u64,
        data: String,
    },
    /// The task's terminal went quiet on what looks like a question for a human: `text` is
    /// the line that scored as a prompt, `screen` the last lines of the screen.
    Prompt {
        v: u32,
        task: String,
        seq: u64,
        text: String,
        screen: Vec<String>,
        /// The choices of a menu under the question, in order (answered by number).
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        options: Vec<String>,
    },
    /// The question of the task's last `Prompt` is no longer on its screen: the task went
    /// on without an answer (a program that gave up waiting, an agent's dialog closed), so
    /// the prompt is withdrawn. Output alone never withdraws one: an agent's interface
    /// redraws while it waits.
    PromptGone {
        v: u32,
        task: String,
        seq: u64,
    },
    /// Part of a file the task left that matches one of its artifact globs (`path` relative
    /// to the task's directory; `data` base64, written at `offset`; `last` on the final
    /// part). Sent after the process ended and before the exit.
    Artifact {
        v: u32,
        task: String,
        seq: u64,
        path: String,
        offset: u64,
        data: String,
        last: bool,
    },
    /// The answer to the final part of a `PutFile`: the file is complete and matches its
    /// digest (and is unpacked), or `error` says why not.
    Stored {
        v: u32,
        path: String,
        error: Option<String>,
    },
    /// The answer to `Mounts`: the set with `digest` is mounted, but for `errors`.
    Mounted {
        v: u32,
        digest: String,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        errors: Vec<String>,
    },
    /// The answer to `Secrets`: the set with `digest` is in place (or `error` says why not).
    SecretsStored {
        v: u32,
        digest: String,
        error: Option<String>,
    },
    /// A task ended. `code` is the exit code when it exited on its own; `seq` follows the
    /// task's last output chunk, so the exit is acknowledged like output.
    Exit {
        v: u32,
        task: String,
        seq: u64,
        code: Option<i32>,
        reason: ExitReason,
    },
    /// A task's connection to the guest's egress proxy: its bytes follow as `StreamData`
    /// (see `stream`). The guest names the stream; the host refuses an id in use.
    StreamOpen {
        v: u32,
        stream: u32,
        /// The task whose process opened the connection (the guest task name), when the
        /// agent can tell: it says, and the host believes it only as far as the task is one
        /// of this VM's (accounting, not a security boundary).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        task: Option<String>,
    },
    /// Bytes of a stream, base64, at most `stream::CHUNK_BYTES` before encoding, within
    /// the credit the other side granted.
    StreamData {
        v: u32,
        stream: u32,
        data: String,
    },
    /// The sender passed `bytes` more of the stream on: that many more may come.
    StreamCredit {
        v: u32,
        stream: u32,
        bytes: u64,
    },
    /// The stream is over (with why, when it failed).
    StreamClose {
        v: u32,
        stream: u32,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        error: Option<String>,
    },
    /// Output of an exec session (see `exec`): base64, at most `stream::CHUNK_BYTES`
    /// before encoding, within the host's credit. A terminal session's output is all
    /// `stdout`.
    ExecOutput {
        v: u32,
        exec: u32,
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        stderr: bool,
        data: String,
    },
    /// The command read `bytes` more of what the host typed: that many more may come.
    ExecCredit {
        v: u32,
        exec: u32,
        bytes: u64,
    },
    /// The session is over: its command exited with `code`, was killed by `signal`, or
    /// could not run (`error`). Nothing of the session follows it.
    ExecExit {
        v: u32,
        exec: u32,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        code: Option<i32>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        signal: Option<i32>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        error: Option<String>,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum ExitReason {
    Completed,
    TimedOut,
    Cancelled,
    /// It could not be started (no such program, bad directory).
    FailedToStart,
    /// The agent restarted while it ran, so its end is unknown.
    Lost,
}

impl GuestMessage {
    /// A message of brokered egress's streams (the broker's, not the task book's).
    pub fn is_stream(&self) -> bool {
        matches!(
            self,
            GuestMessage::StreamOpen { .. }
                | GuestMessage::StreamData { .. }
                | GuestMessage::StreamCredit { .. }
                | GuestMessage::StreamClose { .. }
        )
    }

    /// A message of an exec session (see `exec`).
    pub fn is_exec(&self) -> bool {
        matches!(
            self,
            GuestMessage::ExecOutput { .. }
                | GuestMessage::ExecCredit { .. }
                | GuestMessage::ExecExit { .. }
        )
    }

    pub fn version(&self) -> u32 {
        match self {
            GuestMessage::Hello { v, .. }
            | GuestMessage::Heartbeat { v, .. }
            | GuestMessage::Addresses { v, .. }
            | GuestMessage::Output { v, .. }
            | GuestMessage::Prompt { v, .. }
            | GuestMessage::PromptGone { v, .. }
            | GuestMessage::Artifact { v, .. }
            | GuestMessage::Stored { v, .. }
            | GuestMessage::SecretsStored { v, .. }
            | GuestMessage::Mounted { v, .. }
            | GuestMessage::Exit { v, .. }
            | GuestMessage::StreamOpen { v, .. }
            | GuestMessage::StreamData { v, .. }
            | GuestMessage::StreamCredit { v, .. }
            | GuestMessage::StreamClose { v, .. }
            | GuestMessage::ExecOutput { v, .. }
            | GuestMessage::ExecCredit { v, .. }
            | GuestMessage::ExecExit { v, .. } => *v,
        }
    }

    /// One line of the wire format, newline included.
    pub fn to_line(&self) -> String {
        write_line(self)
    }

    /// Parses one line (without or with its newline).
    pub fn from_line(line: &str) -> Result<GuestMessage, String> {
        parse_line(line)
    }
}

/// A network interface of the guest (`GuestMessage::Addresses`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Interface {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
    /// Each as `address/prefix` (`192.168.150.23/24`, `fe80::1/64`).
    #[serde(default)]
    pub addresses: Vec<String>,
}

/// What `RunTask::results` asks of the guest.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunResults {
    /// The commit the checkout was shipped at.
    pub base: String,
    /// The checkout's branch (`fleet/<task>`).
    pub branch: String,
    /// The message of the commit of what the run left uncommitted.
    pub message: String,
}

/// What the host sends.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(
    tag = "type",
    rename_all = "camelCase",
    rename_all_fields = "camelCase"
)]
pub enum HostMessage {
    /// Sent when the host connects; the guest answers with its own hello.
    Hello {
        v: u32,
    },
    /// Run `argv` in a pseudo-terminal, killing its process group after `timeout_secs`.
    /// A task the agent already knows is not started again (the host re-attaches by asking
    /// again after a reconnect).
    RunTask {
        v: u32,
        task: String,
        argv: Vec<String>,
        /// The guest boot the host believes it talks to: a guest that booted since ignores
        /// the message (the host learns of the new boot from its hello), so a run is never
        /// started in a boot the host does not know about.
        #[serde(default)]
        boot_id: Option<String>,
        #[serde(default)]
        env: std::collections::BTreeMap<String, String>,
        /// Made if missing.
        #[serde(default)]
        cwd: Option<String>,
        #[serde(default)]
        timeout_secs: Option<u64>,
        /// Globs, relative to `cwd`, of files to send back as artifacts when it ends.
        #[serde(default)]
        artifacts: Vec<String>,
        /// Extra regular expressions that mark a line as a prompt waiting for a human.
        #[serde(default)]
        prompt_patterns: Vec<String>,
        /// Environment variables whose values the agent reads from the secret set: each
        /// variable and a path relative to `SECRETS_DIR`. Values never travel in `RunTask`.
        #[serde(default)]
        secret_env: std::collections::BTreeMap<String, String>,
        /// The secret files (relative to `SECRETS_DIR`) this run may read: its own and its
        /// VM's loadout's. An agent running as root runs each task as a user of its own and
        /// shows it only these, at the same paths.
        #[serde(default)]
        secret_files: Vec<String>,
        /// Send what the run changes in its checkout back: when it ends, what is left
        /// uncommitted is committed, and the commits after `base` on `branch` come back as
        /// the artifact `RESULTS_ARTIFACT` (a git bundle).
        #[serde(default)]
        results: Option<RunResults>,
    },
    /// Type into a task's terminal. With `prompt`, the answer to that prompt: delivered at
    /// most once however often the host sends it.
    Input {
        v: u32,
        task: String,
        data: String,
        #[serde(default)]
        prompt: Option<String>,
        /// The `seq` of the guest's `Prompt` this answers: the guest types it only while
        /// that question is still the one asked, so an answer in flight never reaches a
        /// dialog that replaced it (another command, the same "Do you want to proceed?").
        #[serde(default, skip_serializing_if = "Option::is_none")]
        prompt_seq: Option<u64>,
    },
    /// Part of a file to write in the guest (`data` base64, at `offset`). The final part
    /// carries the whole file's SHA-256 and, for a tar archive, the directory to unpack it
    /// into; the guest answers it with `Stored`.
    PutFile {
        v: u32,
        path: String,
        offset: u64,
        data: String,
        #[serde(default)]
        sha256: Option<String>,
        #[serde(default)]
        unpack_into: Option<String>,
    },
    /// The whole secret set the guest should hold, replacing the previous one: files under
    /// `SECRETS_DIR` (a path in `files` not listed any more is removed). Answered with
    /// `SecretsStored`.
    Secrets {
        v: u32,
        digest: String,
        files: Vec<SecretFile>,
    },
    /// The workspaces to mount (each a disk known by its serial), as a set with `digest`:
    /// a disk with no filesystem gets one (ext, with the label), then it is mounted at its
    /// path. Mounting one already mounted there is nothing. Answered with `Mounted`.
    Mounts {
        v: u32,
        digest: String,
        mounts: Vec<Mount>,
    },
    /// Stop a task (its whole process group).
    Cancel {
        v: u32,
        task: String,
    },
    /// The host has stored a task's messages up to and including `seq`; the guest may forget
    /// them. Everything after it is sent again when the host greets after a reconnect.
    Ack {
        v: u32,
        task: String,
        seq: u64,
    },
    /// Bytes of a stream the guest opened (see `GuestMessage::StreamOpen`).
    StreamData {
        v: u32,
        stream: u32,
        data: String,
    },
    StreamCredit {
        v: u32,
        stream: u32,
        bytes: u64,
    },
    StreamClose {
        v: u32,
        stream: u32,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        error: Option<String>,
    },
    /// Start a command for an operator (`fleet exec`, see `exec`): as root, in `/root`,
    /// with a clean environment; with `tty`, in a pseudo-terminal of that size (its own
    /// session and process group either way). `exec` names the session; the guest refuses
    /// an id in use or more than `exec::MAX_SESSIONS`, with an `ExecExit` carrying the error.
    Exec {
        v: u32,
        exec: u32,
        argv: Vec<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        tty: Option<exec::TermSize>,
        /// The operator's `TERM`, for a terminal session (see `exec::term_name`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        term: Option<String>,
    },
    /// Bytes for the session's standard input (base64, at most `stream::CHUNK_BYTES`
    /// before encoding, within the guest's credit); `eof` closes it after them.
    ExecInput {
        v: u32,
        exec: u32,
        data: String,
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        eof: bool,
    },
    /// The operator's terminal changed size.
    ExecResize {
        v: u32,
        exec: u32,
        size: exec::TermSize,
    },
    /// The host passed `bytes` more of the session's output on.
    ExecCredit {
        v: u32,
        exec: u32,
        bytes: u64,
    },
    /// End the session: its process group is killed.
    ExecKill {
        v: u32,
        exec: u32,
    },
}

/// A workspace to mount (`HostMessage::Mounts`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Mount {
    /// The disk's serial (`/sys/block/*/serial`).
    pub serial: String,
    /// An absolute path in the guest.
    pub path: String,
    /// The filesystem's label when one is made.
    pub label: String,
}

/// One secret file: `path` relative to `SECRETS_DIR`, `data` base64. Its `Debug` never shows
/// the value.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SecretFile {
    pub path: String,
    pub data: String,
}

impl std::fmt::Debug for SecretFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SecretFile")
            .field("path", &self.path)
            .field("data", &"[REDACTED]")
            .finish()
    }
}

impl HostMessage {
    pub fn to_line(&self) -> String {
        write_line(self)
    }

    pub fn from_line(line: &str) -> Result<HostMessage, String> {
        parse_line(line)
    }
}

/// A message as one line of the wire format, newline included.
fn write_line<T: Serialize>(message: &T) -> String {
    let mut line = serde_json::to_string(message).expect("messages serialise to JSON");
    line.push('\n');
    line
}

/// One line of either side, size-checked before it is parsed.
fn parse_line<T: serde::de::DeserializeOwned>(line: &str) -> Result<T, String> {
    if line.len() > MAX_LINE_BYTES {
        return Err(format!(
            "line of {} bytes exceeds the limit of {MAX_LINE_BYTES}",
            line.len()
        ));
    }
    serde_json::from_str(line.trim_end()).map_err(|e| format!("not a protocol message: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_round_trip_as_single_lines() {
        let hello = GuestMessage::Hello {
            v: VERSION,
            agent_version: "0.1.0".into(),
            boot_id: "b-1".into(),
            secrets: None,
            instance: None,
        };
        let line = hello.to_line();
        assert_eq!(
            line,
            "{\"type\":\"hello\",\"v\":1,\"agentVersion\":\"0.1.0\",\"bootId\":\"b-1\"}\n"
        );
        assert_eq!(GuestMessage::from_line(&line), Ok(hello));
        assert!(GuestMessage::from_line("{\"type\":\"reboot\",\"v\":1}").is_err());
        assert!(GuestMessage::from_line(&"x".repeat(MAX_LINE_BYTES + 1)).is_err());
        let greet = HostMessage::Hello { v: VERSION };
        assert_eq!(greet.to_line(), "{\"type\":\"hello\",\"v\":1}\n");
        assert_eq!(HostMessage::from_line(&greet.to_line()), Ok(greet));
    }
}
