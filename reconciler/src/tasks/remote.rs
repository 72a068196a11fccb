//! Fetching a task repository over `https://` or `ssh://` with the system's git (fleet's
//! libgit2 is built without network transports), into the same bare cache `tasks::repo`
//! archives from.
//!
//! A credential leaves no copy behind: it is never in an argument, an environment
//! variable or a file.
//! - https: git asks a credential helper, `fleet __credential`, which asks this process
//!   over a socket in a private directory; the answer names the user and the secret only
//!   for the repository's own host and port.
//! - ssh: the key is fed on stdin to a private `ssh-agent`, which holds it in memory for
//!   the fetch and is killed after it; ssh checks the server's key against the host's
//!   `git.knownHosts` alone, and never trusts one on first use.
//!
//! The git process runs with a clean environment: no user or system configuration, hooks
//! pointed at nothing, no terminal prompts, no redirects, and only the https and ssh
//! protocols (never `ext::`, which runs commands).

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use zeroize::Zeroizing;

use crate::load::Endpoint;

/// How long one fetch or push may take.
const FETCH_TIMEOUT: Duration = Duration::from_secs(600);
/// The environment variable naming the socket the credential helper asks.
const SOCKET_VAR: &str = "FLEET_CREDENTIAL_SOCKET";

/// A credential for one fetch: the Secret's value, and the https user.
pub struct Credential {
    pub username: Option<String>,
    pub secret: Zeroizing<Vec<u8>>,
}

/// Fetches `refspecs` from `url` into the bare repository `cache`. The error is git's own
/// last lines (which never hold the credential) or what fleet could not set up.
pub fn fetch(
    cache: &Path,
    url: &str,
    refspecs: &[String],
    access: &super::repo::Access,
) -> Result<(), String> {
    let mut args: Vec<String> = [
        "fetch",
        "--quiet",
        "--no-tags",
        "--no-write-fetch-head",
        "--no-recurse-submodules",
        "--",
        url,
    ]
    .map(str::to_owned)
    .to_vec();
    args.extend_from_slice(refspecs);
    run_git(cache, url, &args, access)
}

/// Pushes the commit `tip` of the repository at `git_dir` to the branch `branch` of `url`,
/// never forced: a branch that moved elsewhere is refused, and the same commit again is a
/// no-op, so a retry never pushes twice.
pub fn push(
    git_dir: &Path,
    url: &str,
    tip: &str,
    branch: &str,
    access: &super::repo::Access,
) -> Result<(), String> {
    push_refspec(git_dir, url, &format!("{tip}:refs/heads/{branch}"), access)
}

/// Pushes `refspec` (never forced unless it says `+`) from the repository at `git_dir`
/// to `url`.
pub fn push_refspec(
    git_dir: &Path,
    url: &str,
    refspec: &str,
    access: &super::repo::Access,
) -> Result<(), String> {
    let args = [
        "push".to_owned(),
        "--quiet".to_owned(),
        "--no-verify".to_owned(),
        "--".to_owned(),
        url.to_owned(),
        refspec.to_owned(),
    ];
    run_git(git_dir, url, &args, access)
}

/// Runs `git --git-dir GIT_DIR ARGS` for `url` with the access it needs.
fn run_git(
    git_dir: &Path,
    url: &str,
    args: &[String],
    access: &super::repo::Access,
) -> Result<(), String> {
    let (credential, host) = (access.credential, access.git);
    let endpoint = Endpoint::parse(url)
        .filter(|e| e.scheme == "https" || e.scheme == "ssh")
        .ok_or_else(|| format!("{url:?} is not an https:// or ssh:// URL"))?;
    let scratch = tempfile::Builder::new()
        .prefix("fleet-fetch-")
        .tempdir()
        .map_err(|e| format!("cannot make a scratch directory: {e}"))?;
    let mut git = Command::new("git");
    git.env_clear()
        .env("PATH", "/usr/local/bin:/usr/bin:/bin")
        .env("HOME", scratch.path())
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .env("GIT_TERMINAL_PROMPT", "0")
        .env("GIT_PROTOCOL_FROM_USER", "0")
        .env("LC_ALL", "C")
        .arg("--git-dir")
        .arg(git_dir)
        .args([
            "-c",
            "core.hooksPath=/dev/null",
            "-c",
            "protocol.allow=never",
            "-c",
            "protocol.https.allow=always",
            "-c",
            "protocol.ssh.allow=always",
            "-c",
            "http.followRedirects=false",
            "-c",
            "credential.helper=",
            "-c",
            "fetch.recurseSubmodules=false",
            "-c",
            "gc.auto=0",
            "-c",
            "maintenance.auto=false",
            "-c",
            "transfer.fsckObjects=true",
            // A server that trickles is dropped rather than holding the VM's link.
            "-c",
            "http.lowSpeedLimit=1024",
            "-c",
            "http.lowSpeedTime=60",
        ])
        // Its own process group: a timeout stops git's helpers too (remote-https,
        // index-pack, ssh), not git alone.
        .process_group(0);
    // Held until git is done: the helper's socket, or the agent holding the key.
    let mut _helper = None;
    let mut _agent = None;
    match endpoint.scheme.as_str() {
        "https" => {
            if let Some(ca) = &host.ca_file {
                git.arg("-c").arg(format!("http.sslCAInfo={}", ca.0));
            }
            if let Some(credential) = credential {
                let helper = CredentialServer::start(scratch.path(), &endpoint, credential)?;
                git.arg("-c")
                    .arg(format!(
                        "credential.helper=!{} __credential",
                        shell_quote(access.fleet)?
                    ))
                    .env(SOCKET_VAR, &helper.socket);
                _helper = Some(helper);
            }
        }
        _ => {
            let known = host.known_hosts.as_ref().ok_or_else(|| {
                "the host configuration names no git.knownHosts: fleet never trusts an ssh server's key on first use; put the server's key (ssh-keyscan) in a file and name it in git.knownHosts".to_owned()
            })?;
            let mut ssh = format!(
                "ssh -F /dev/null -o BatchMode=yes -o StrictHostKeyChecking=yes -o UserKnownHostsFile={} -o GlobalKnownHostsFile=/dev/null -o IdentityFile=none -o ProxyCommand=none -o ProxyJump=none -o ControlMaster=no -o PermitLocalCommand=no -o ConnectTimeout=30 -o ServerAliveInterval=15 -o ServerAliveCountMax=4",
                shell_quote(Path::new(&known.0))?
            );
            match credential {
                Some(credential) => {
                    let agent = Agent::start(scratch.path(), &credential.secret)?;
                    ssh.push_str(&format!(
                        " -o IdentitiesOnly=no -o IdentityAgent={}",
                        shell_quote(&agent.socket)?
                    ));
                    _agent = Some(agent);
                }
                None => ssh.push_str(" -o IdentityAgent=none"),
            }
            git.env("GIT_SSH_COMMAND", ssh);
        }
    }
    git.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let child = git
        .spawn()
        .map_err(|e| format!("cannot run git (is it installed?): {e}"))?;
    let (status, stderr) = wait_bounded(child, FETCH_TIMEOUT)?;
    if status {
        return Ok(());
    }
    // git's last lines say why; its hints and its advice after an ssh refusal say
    // nothing more.
    let said: Vec<&str> = stderr
        .lines()
        .filter(|l| {
            let l = l.trim();
            !l.is_empty()
                && !l.starts_with("hint:")
                && !l.starts_with("Please make sure you have the correct access rights")
                && l != "and the repository exists."
        })
        .collect();
    let tail = said[said.len().saturating_sub(3)..].join("; ");
    Err(if tail.is_empty() {
        format!("git {} failed", args.first().map_or("", String::as_str))
    } else {
        crate::terminal::one_line(&tail, 500)
    })
}

/// Waits for `child` at most `timeout` (then kills it); its success and what it wrote to
/// stderr (the first 64 KiB).
fn wait_bounded(mut child: Child, timeout: Duration) -> Result<(bool, String), String> {
    let mut stderr = child.stderr.take().ok_or("no stderr")?;
    let reader = std::thread::spawn(move || {
        let mut text = Vec::new();
        let _ = (&mut stderr).take(64 * 1024).read_to_end(&mut text);
        // Drain the rest so git never blocks on a full pipe.
        let _ = std::io::copy(&mut stderr, &mut std::io::sink());
        String::from_utf8_lossy(&text).into_owned()
    });
    let deadline = Instant::now() + timeout;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() >= deadline => {
                if let Ok(group) = i32::try_from(child.id()) {
                    let _ = nix::sys::signal::killpg(
                        nix::unistd::Pid::from_raw(group),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                }
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("git took longer than {} s", timeout.as_secs()));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => return Err(format!("waiting for git: {e}")),
        }
    };
    let stderr = reader.join().unwrap_or_default();
    Ok((status.success(), stderr))
}

/// A path as one word of a shell command (git runs helpers and `GIT_SSH_COMMAND` through
/// `sh`).
fn shell_quote(path: &Path) -> Result<String, String> {
    let text = path
        .to_str()
        .filter(|t| !t.contains('\''))
        .ok_or_else(|| format!("{} cannot be quoted for a shell", path.display()))?;
    Ok(format!("'{text}'"))
}

/// Answers the credential helper of one fetch, for one host.
struct CredentialServer {
    socket: PathBuf,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl CredentialServer {
    fn start(
        dir: &Path,
        endpoint: &Endpoint,
        credential: &Credential,
    ) -> Result<CredentialServer, String> {
        let socket = dir.join("credential.sock");
        let listener = UnixListener::bind(&socket)
            .map_err(|e| format!("cannot listen on {}: {e}", socket.display()))?;
        listener
            .set_nonblocking(true)
            .map_err(|e| format!("credential socket: {e}"))?;
        let user = credential
            .username
            .clone()
            .or_else(|| endpoint.user.clone())
            .unwrap_or_else(|| "git".to_owned());
        // The helper answers for this server alone, named as git names it (a git that
        // asked for another gets nothing).
        let host = endpoint.written.clone();
        // git's credential protocol is lines: a value with a line break would be read in
        // part and the rest printed in a warning, which ends up in the task's record.
        if !crate::egress::value_fits_header(&credential.secret) {
            return Err(
                "an https credential must be one line of visible characters (a token or password)"
                    .into(),
            );
        }
        let prefix = format!("username={user}\npassword=");
        // Sized once: a buffer that grew would leave copies of the value behind.
        let mut answer = Zeroizing::new(Vec::with_capacity(
            prefix.len() + credential.secret.len() + 1,
        ));
        answer.extend_from_slice(prefix.as_bytes());
        answer.extend_from_slice(&credential.secret);
        answer.extend_from_slice(b"\n");
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stopped = stop.clone();
        std::thread::spawn(move || {
            while !stopped.load(std::sync::atomic::Ordering::Relaxed) {
                match listener.accept() {
                    Ok((conn, _)) => serve_helper(conn, &host, &answer),
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(10));
                    }
                    Err(_) => return,
                }
            }
        });
        Ok(CredentialServer { socket, stop })
    }
}

impl Drop for CredentialServer {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

/// One question of the helper: git's request (`protocol=`, `host=` lines), forwarded as it
/// came; the answer only when it asks for https on the repository's host.
fn serve_helper(conn: UnixStream, host: &str, answer: &[u8]) {
    let _ = conn.set_nonblocking(false);
    let _ = conn.set_read_timeout(Some(Duration::from_secs(5)));
    let mut reader = BufReader::new(&conn);
    let (mut protocol, mut asked) = (String::new(), String::new());
    let mut line = String::new();
    while reader.read_line(&mut line).is_ok_and(|n| n > 0) && line.len() < 4096 {
        let trimmed = line.trim_end();
        if trimmed.is_empty() {
            break;
        }
        if let Some(v) = trimmed.strip_prefix("protocol=") {
            protocol = v.to_owned();
        } else if let Some(v) = trimmed.strip_prefix("host=") {
            asked = v.to_ascii_lowercase();
        }
        line.clear();
    }
    if protocol == "https" && asked == host {
        let _ = (&conn).write_all(answer);
    }
}

/// `fleet __credential ACTION`, run by git as its credential helper: for `get`, passes
/// git's request to the fetching fleet (`FLEET_CREDENTIAL_SOCKET`) and prints its answer;
/// `store` and `erase` are ignored (nothing is kept).
pub fn credential_helper_command() -> std::process::ExitCode {
    let action = std::env::args_os().nth(2).unwrap_or_default();
    let mut request = String::new();
    let _ = std::io::stdin()
        .take(64 * 1024)
        .read_to_string(&mut request);
    if action != "get" {
        return std::process::ExitCode::SUCCESS;
    }
    let Some(socket) = std::env::var_os(SOCKET_VAR) else {
        return std::process::ExitCode::FAILURE;
    };
    let Ok(mut conn) = UnixStream::connect(socket) else {
        return std::process::ExitCode::FAILURE;
    };
    let _ = conn.set_read_timeout(Some(Duration::from_secs(5)));
    if conn.write_all(request.as_bytes()).is_err() || conn.write_all(b"\n").is_err() {
        return std::process::ExitCode::FAILURE;
    }
    let mut answer = Zeroizing::new(Vec::with_capacity(64 * 1024 + 1));
    let _ = (&mut conn).take(64 * 1024).read_to_end(&mut answer);
    if std::io::stdout().write_all(&answer).is_err() {
        return std::process::ExitCode::FAILURE;
    }
    std::process::ExitCode::SUCCESS
}

/// A private `ssh-agent` holding one key, for one fetch.
struct Agent {
    socket: PathBuf,
    child: Child,
}

impl Agent {
    fn start(dir: &Path, key: &[u8]) -> Result<Agent, String> {
        let socket = dir.join("agent.sock");
        let child = Command::new("ssh-agent")
            .env_clear()
            .arg("-D")
            .arg("-a")
            .arg(&socket)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("cannot run ssh-agent (is openssh-client installed?): {e}"))?;
        let agent = Agent { socket, child };
        let deadline = Instant::now() + Duration::from_secs(5);
        while !agent.socket.exists() {
            if Instant::now() > deadline {
                return Err("ssh-agent did not start".into());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let mut add = Command::new("ssh-add")
            .env_clear()
            .env("SSH_AUTH_SOCK", &agent.socket)
            // A key with a passphrase fails at once instead of asking a terminal.
            .env("SSH_ASKPASS", "/bin/false")
            .env("SSH_ASKPASS_REQUIRE", "force")
            // A lifetime, so the key goes even if this process is killed before it can
            // stop the agent (the results check's child is, after 2 minutes).
            .args(["-q", "-t", "660", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("cannot run ssh-add: {e}"))?;
        if let Some(mut stdin) = add.stdin.take() {
            let _ = stdin.write_all(key);
            if !key.ends_with(b"\n") {
                let _ = stdin.write_all(b"\n");
            }
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        let added = loop {
            match add.try_wait() {
                Ok(Some(status)) => break status.success(),
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(10));
                }
                _ => {
                    let _ = add.kill();
                    let _ = add.wait();
                    break false;
                }
            }
        };
        if !added {
            return Err(
                "the credential is not an OpenSSH private key without a passphrase (ssh-add refused it)"
                    .into(),
            );
        }
        Ok(agent)
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
