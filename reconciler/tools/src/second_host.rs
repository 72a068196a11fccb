//! A second libvirt host on this machine, reached as a remote one: a libvirtd (and its
//! virtlogd) in a mount namespace of its own (private `/run`, `/var/lib/libvirt`,
//! `/etc/libvirt`, `/var/cache/libvirt`, `/var/log/libvirt`), and an `sshd` on loopback in
//! the same namespace, so `qemu+ssh://` reaches that libvirtd and no other. The host shares
//! the rest of the filesystem with this one (as shared storage would).
//!
//! Shared by the integration tests (`tests/it/remote.rs`), `fleet-bench` and `fleet-crash`
//! (each includes this file), so it needs nothing but `anyhow`, `tempfile` and std.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The host's storage directory: a path only its mount namespace has.
pub const SECOND_HOST_STORAGE: &str = "/var/lib/libvirt/fleet-storage";

pub struct SecondHost {
    dir: tempfile::TempDir,
    /// The process `unshare` became: the namespace lives while it does, whatever became of
    /// its daemons, so they can always be entered and stopped.
    holder: Child,
    pub uri: String,
}

impl SecondHost {
    /// Starts the namespace, its daemons and its sshd; returns once libvirtd answers over
    /// ssh (at most 30 s).
    pub fn start() -> anyhow::Result<SecondHost> {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::Builder::new().prefix("fleet-remote-").tempdir()?;
        // QEMU (another user) reaches the pool's directory under it.
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))?;
        let at = |p: &str| dir.path().join(p);
        for sub in [
            "lib",
            "etc/qemu/networks",
            "etc/storage",
            "etc/nwfilter",
            "etc/secrets",
            "cache",
            "log",
            "sshd",
        ] {
            std::fs::create_dir_all(at(sub))?;
        }
        // The daemons' own settings, never this host's domains, networks or pools.
        for entry in std::fs::read_dir("/etc/libvirt")?.flatten() {
            let path = entry.path();
            if path.extension().is_some_and(|e| e == "conf") {
                std::fs::copy(&path, at("etc").join(entry.file_name()))?;
            }
        }
        let client_key = at("client_key");
        keygen(&client_key)?;
        let authorized = std::fs::read_to_string(at("client_key.pub"))?;
        let (port, sshd_config) = sshd_config(&at("sshd"), &authorized)?;
        let script = format!(
            "set -e
mount -t tmpfs -o mode=0755 tmpfs /run
mkdir -p /run/sshd /run/libvirt /run/lock
mount --bind {dir}/lib /var/lib/libvirt
mount --bind {dir}/etc /etc/libvirt
mount --bind {dir}/cache /var/cache/libvirt
mount --bind {dir}/log /var/log/libvirt
virtlogd -d
libvirtd -d
/usr/sbin/sshd -D -e -f {config} &
echo $! > /run/sshd.pid
exec sleep infinity
",
            dir = dir.path().display(),
            config = sshd_config.display()
        );
        let holder = Command::new("unshare")
            .args(["--mount", "--propagation", "private", "--", "sh", "-c"])
            .arg(script)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(at("ns.log"))?)
            .spawn()?;
        let uri = format!(
            "qemu+ssh://root@127.0.0.1:{port}/system?keyfile={}&no_verify=1&no_tty=1",
            client_key.display()
        );
        let host = SecondHost { dir, holder, uri };
        host.wait_until("its libvirtd answers over ssh", || {
            host.virsh(&["list", "--all"])
                .is_ok_and(|o| o.status.success())
        })?;
        Ok(host)
    }

    /// Where the host's `SECOND_HOST_STORAGE` is, seen from this machine.
    pub fn storage(&self) -> PathBuf {
        self.dir.path().join("lib/fleet-storage")
    }

    pub fn virsh(&self, args: &[&str]) -> std::io::Result<std::process::Output> {
        Command::new("virsh")
            .arg("-c")
            .arg(&self.uri)
            .args(args)
            .output()
    }

    /// Runs `command` in the host's mount namespace.
    fn inside(&self, command: &str) -> anyhow::Result<()> {
        let out = Command::new("nsenter")
            .arg(format!("--mount=/proc/{}/ns/mnt", self.holder.id()))
            .args(["--", "sh", "-c", command])
            .output()?;
        anyhow::ensure!(
            out.status.success(),
            "`{command}` in the second host's namespace failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
        Ok(())
    }

    /// Kills the host's libvirtd at once (SIGKILL when `hard`); its VMs' QEMU processes go
    /// on running. Returns once it no longer answers.
    pub fn kill_libvirtd(&self, hard: bool) -> anyhow::Result<()> {
        let signal = if hard { "-KILL" } else { "-TERM" };
        self.inside(&format!(
            "kill {signal} $(cat /run/libvirtd.pid) && rm -f /run/libvirtd.pid"
        ))?;
        self.wait_until("its libvirtd is gone", || {
            !self.virsh(&["list"]).is_ok_and(|o| o.status.success())
        })
    }

    pub fn start_libvirtd(&self) -> anyhow::Result<()> {
        self.inside("libvirtd -d")?;
        self.wait_until("its libvirtd answers again", || {
            self.virsh(&["list"]).is_ok_and(|o| o.status.success())
        })
    }

    /// Starts libvirtd again if it is down (a crash trial's kill can leave it so).
    pub fn start_libvirtd_if_down(&self) -> anyhow::Result<()> {
        if self.virsh(&["list"]).is_ok_and(|o| o.status.success()) {
            return Ok(());
        }
        self.start_libvirtd()
    }

    fn wait_until(&self, what: &str, mut done: impl FnMut() -> bool) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !done() {
            if Instant::now() > deadline {
                let log =
                    std::fs::read_to_string(self.dir.path().join("ns.log")).unwrap_or_default();
                anyhow::bail!("the second libvirt host: timed out waiting until {what}: {log}");
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        Ok(())
    }
}

impl Drop for SecondHost {
    fn drop(&mut self) {
        // Its domains go first: their QEMU processes would outlive the daemons.
        let _ = self.start_libvirtd_if_down();
        if let Ok(names) = self.virsh(&["list", "--all", "--name"]) {
            for name in String::from_utf8_lossy(&names.stdout).lines() {
                let name = name.trim();
                if !name.is_empty() {
                    let _ = self.virsh(&["destroy", name]);
                    let _ = self.virsh(&["undefine", name]);
                }
            }
        }
        // (The pid files end without a newline.)
        let _ = self
            .inside("kill $(cat /run/libvirtd.pid) $(cat /run/virtlogd.pid) $(cat /run/sshd.pid)");
        let _ = self.holder.kill();
        let _ = self.holder.wait();
    }
}

/// A new ed25519 key pair at `path` (and `path.pub`), without a passphrase.
pub fn keygen(path: &Path) -> anyhow::Result<()> {
    let ok = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", "fleet-test", "-f"])
        .arg(path)
        .status()?
        .success();
    anyhow::ensure!(ok, "ssh-keygen failed");
    Ok(())
}

/// An sshd configuration in `dir` (with a new host key) on a free loopback port that lets
/// in the holder of `authorized`: the port and the configuration file.
pub fn sshd_config(dir: &Path, authorized: &str) -> anyhow::Result<(u16, PathBuf)> {
    let host_key = dir.join("host_key");
    keygen(&host_key)?;
    let authorized_keys = dir.join("authorized_keys");
    std::fs::write(&authorized_keys, authorized)?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let config = dir.join("sshd_config");
    std::fs::write(
        &config,
        format!(
            "Port {port}\nListenAddress 127.0.0.1\nHostKey {}\nAuthorizedKeysFile {}\nPasswordAuthentication no\nKbdInteractiveAuthentication no\nPubkeyAuthentication yes\nPermitRootLogin prohibit-password\nStrictModes no\nUsePAM no\nPidFile none\n",
            host_key.display(),
            authorized_keys.display()
        ),
    )?;
    Ok((port, config))
}
