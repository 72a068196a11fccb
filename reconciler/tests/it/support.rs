//! Shared test helpers: temporary git repositories and running the `fleet` binary.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// A git repository in a temporary directory, with a host configuration of its own beside
/// it (the libvirt provider `local` on qemu:///system, storage under the repository's
/// `.fleet/storage`, the micro image's directory as image root).
pub struct Repo {
    pub dir: tempfile::TempDir,
    /// Holds `host.yaml`, outside the repository as on a real host.
    pub host: tempfile::TempDir,
}

/// A host configuration for tests: `providers` (YAML flow list entries, one per line) and
/// extra top-level `spec` lines.
pub fn host_yaml(providers: &[String], extra: &str) -> String {
    let (kernel, _) = micro_image_or_default();
    let image_root = kernel.parent().expect("image dir").display().to_string();
    let mut text = String::from("apiVersion: fleet/v1\nkind: Host\nspec:\n  providers:\n");
    for p in providers {
        text.push_str(&format!("    - {p}\n"));
    }
    if !extra.contains("imageRoot:") {
        text.push_str(&format!("  imageRoot: '{image_root}'\n"));
    }
    text.push_str(&format!(
        "  repositories: ['file:///**']\n  limits: {{minInterval: 1s}}\n{extra}"
    ));
    text
}

/// A libvirt provider `local` on libvirt's in-process test driver, storing under the
/// repository (never the host's default storage root).
pub fn test_driver_provider(repo: &Repo) -> String {
    format!(
        "{{name: local, type: libvirt, uri: 'test:///default', storageDir: '{}'}}",
        repo.path().join(".fleet/storage").display()
    )
}

/// The default libvirt provider of a test repository.
pub fn local_provider(repo: &Path) -> String {
    format!(
        "{{name: local, type: libvirt, uri: 'qemu:///system', storageDir: '{}'}}",
        repo.join(".fleet/storage").display()
    )
}

impl Repo {
    pub fn new() -> Repo {
        let dir = tempfile::Builder::new()
            .prefix("fleet-it-")
            .tempdir()
            .expect("tempdir");
        // qemu runs as its own user and must reach console logs under the repository.
        set_mode(dir.path(), 0o755);
        let host = tempfile::Builder::new()
            .prefix("fleet-it-host-")
            .tempdir()
            .expect("tempdir");
        let repo = Repo { dir, host };
        repo.host_config(&host_yaml(&[local_provider(repo.path())], ""));
        repo.git(&["init", "-q", "-b", "main"]);
        repo.git(&["config", "user.name", "fleet tests"]);
        repo.git(&["config", "user.email", "tests@fleet.invalid"]);
        repo
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// The host configuration fleet is run with.
    pub fn host_config_path(&self) -> PathBuf {
        self.host.path().join("host.yaml")
    }

    /// Replaces the host configuration.
    pub fn host_config(&self, yaml: &str) -> &Repo {
        std::fs::write(self.host_config_path(), yaml).expect("write host config");
        set_mode(&self.host_config_path(), 0o644);
        self
    }

    /// Adds top-level `spec` lines to the host configuration (`  recipients: [age1…]\n`).
    pub fn add_host_config(&self, lines: &str) -> &Repo {
        let text = std::fs::read_to_string(self.host_config_path()).expect("host config");
        self.host_config(&format!("{text}{lines}"))
    }

    /// Lets Secret `name` go where `allowed` (a YAML flow mapping) says.
    pub fn allow_secret(&self, name: &str, allowed: &str) -> &Repo {
        let path = self.path().join(format!("fleet/secrets/{name}.yaml"));
        let text = std::fs::read_to_string(&path).expect("secret file");
        let text: String = text
            .lines()
            .filter(|l| !l.starts_with("  allowed:"))
            .map(|l| {
                if l == "spec:" {
                    format!("spec:\n  allowed: {allowed}\n")
                } else {
                    format!("{l}\n")
                }
            })
            .collect();
        std::fs::write(&path, text).expect("write secret file");
        self
    }

    /// Where fleet kept the files of VM `vm` of fleet `fleet` before storage went through
    /// libvirt (the default provider): VMs made then keep this directory.
    pub fn vm_dir(&self, fleet: &str, vm: &str) -> PathBuf {
        self.path().join(".fleet/storage").join(fleet).join(vm)
    }

    /// The directory of fleet `fleet`'s default storage pool on the default provider.
    pub fn volumes_dir(&self, fleet: &str) -> PathBuf {
        self.path()
            .join(".fleet/storage")
            .join(fleet)
            .join(".volumes")
    }

    /// Volume `part` (`console.log`, `disk.qcow2`, `seed.iso`) of VM `vm` of fleet `fleet`.
    pub fn vm_volume(&self, fleet: &str, vm: &str, part: &str) -> PathBuf {
        self.volumes_dir(fleet).join(format!(
            "{}.{part}",
            fleet::driver::libvirt::volumes::vm_prefix(fleet, vm)
        ))
    }

    /// The console log of VM `vm` of fleet `fleet` (in the pool directory's `logs/`).
    pub fn console_log(&self, fleet: &str, vm: &str) -> PathBuf {
        fleet::driver::libvirt::volumes::console_log_in(&self.volumes_dir(fleet), fleet, vm)
    }

    /// The files of VM `vm`'s volumes in the pool's directory.
    pub fn vm_volumes(&self, fleet: &str, vm: &str) -> Vec<String> {
        let prefix = format!("{}.", fleet::driver::libvirt::volumes::vm_prefix(fleet, vm));
        files_in(&self.volumes_dir(fleet))
            .into_iter()
            .filter(|f| f.starts_with(&prefix))
            .collect()
    }

    pub fn write(&self, rel: &str, content: impl AsRef<[u8]>) -> &Repo {
        let path = self.path().join(rel);
        std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
        std::fs::write(path, content).expect("write");
        self
    }

    pub fn remove(&self, rel: &str) -> &Repo {
        std::fs::remove_file(self.path().join(rel)).expect("remove");
        self
    }

    pub fn commit(&self, message: &str) -> String {
        self.git(&["add", "-A"]);
        self.git(&["commit", "-q", "--allow-empty", "-m", message]);
        String::from_utf8(self.git(&["rev-parse", "HEAD"]).stdout)
            .expect("utf8")
            .trim()
            .to_owned()
    }

    /// The commit HEAD points to.
    pub fn head(&self) -> String {
        String::from_utf8(self.git(&["rev-parse", "HEAD"]).stdout)
            .expect("utf8")
            .trim()
            .to_owned()
    }

    pub fn git(&self, args: &[&str]) -> Output {
        let out = Command::new("git")
            .args(args)
            .current_dir(self.path())
            .output()
            .expect("run git");
        assert!(
            out.status.success(),
            "git {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    /// Runs `fleet -C <repo> ARGS`.
    pub fn fleet(&self, args: &[&str]) -> Run {
        let out = Command::new(fleet_bin())
            .arg("-C")
            .arg(self.path())
            .args(args)
            .env_remove("FLEET_LOG")
            .env("FLEET_HOST_CONFIG", self.host_config_path())
            .output()
            .expect("run fleet");
        Run(out)
    }
}

pub struct Run(pub Output);

impl Run {
    pub fn code(&self) -> i32 {
        self.0.status.code().unwrap_or(-1)
    }
    pub fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.0.stdout).into_owned()
    }
    pub fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.0.stderr).into_owned()
    }
    /// Asserts the exit code, showing the output when it differs.
    pub fn expect_code(&self, code: i32) -> &Run {
        assert_eq!(
            self.code(),
            code,
            "exit code\n--- stdout\n{}\n--- stderr\n{}",
            self.stdout(),
            self.stderr()
        );
        self
    }
}

pub fn fleet_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_fleet"))
}

pub fn set_mode(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod");
}

/// The micro image's files, whether or not `make image` built them (for tests that only
/// plan).
pub fn micro_image_or_default() -> (PathBuf, PathBuf) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../build/image");
    let dir = std::fs::canonicalize(&dir).unwrap_or(dir);
    (dir.join("vmlinuz"), dir.join("initrd.img"))
}

/// The micro image built by `make image`, as absolute paths.
pub fn micro_image() -> (PathBuf, PathBuf) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../build/image");
    let dir = std::fs::canonicalize(&dir)
        .unwrap_or_else(|_| panic!("{} is missing: run `make image`", dir.display()));
    (dir.join("vmlinuz"), dir.join("initrd.img"))
}

/// One HTTP/1.1 request as a test server reads it: the request line, the headers, and the
/// body (by `Content-Length`, or chunked).
pub struct HttpRequest {
    /// `METHOD TARGET VERSION`.
    pub line: String,
    headers: Vec<String>,
    pub body: Vec<u8>,
}

impl HttpRequest {
    /// `None` when the connection ends or breaks before a whole request.
    pub fn read(conn: &mut impl std::io::BufRead) -> Option<HttpRequest> {
        let mut head = Vec::new();
        loop {
            let mut line = String::new();
            if conn.read_line(&mut line).ok()? == 0 {
                return None;
            }
            if line == "\r\n" {
                break;
            }
            head.push(line.trim_end().to_owned());
        }
        let mut request = HttpRequest {
            line: head.first()?.clone(),
            headers: head.split_off(1),
            body: Vec::new(),
        };
        let chunked = request
            .header("transfer-encoding")
            .is_some_and(|v| v.eq_ignore_ascii_case("chunked"));
        if chunked {
            loop {
                let mut size = String::new();
                conn.read_line(&mut size).ok()?;
                let size = usize::from_str_radix(size.trim().split(';').next()?, 16).ok()?;
                let mut chunk = vec![0u8; size + 2];
                conn.read_exact(&mut chunk).ok()?;
                if size == 0 {
                    break;
                }
                request.body.extend_from_slice(&chunk[..size]);
            }
        } else if let Some(len) = request
            .header("content-length")
            .and_then(|v| v.parse::<usize>().ok())
        {
            request.body.resize(len, 0);
            conn.read_exact(&mut request.body).ok()?;
        }
        Some(request)
    }

    /// A header's value, its name in any case.
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers.iter().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case(name).then(|| v.trim().to_owned())
        })
    }
}

/// The names of the entries of `dir`, sorted (none when it does not exist).
pub fn files_in(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}
