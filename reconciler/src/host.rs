//! The host configuration: what the host's administrator allows a revision (see
//! `spec::HostDocument`). Read only from a file nobody but its owner (root, or the user fleet
//! runs as) can change, so a committer, a pull request or a local user cannot widen it.

use std::path::{Path, PathBuf};

use crate::load::Diagnostic;
use crate::spec::HostSpec;

/// Where fleet looks when neither `--host-config` nor `FLEET_HOST_CONFIG` names a file.
pub const DEFAULT_PATH: &str = "/etc/fleet/host.yaml";

/// The host configuration is small; anything bigger is not one.
const MAX_BYTES: u64 = 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum HostError {
    #[error(
        "no host configuration at {0}: write one (docs/security.md shows the format; `make run` installs the example's) or pass --host-config FILE"
    )]
    Missing(PathBuf),
    #[error("host configuration {path}: {why}")]
    Untrusted { path: PathBuf, why: String },
    #[error("host configuration {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n"))]
    Invalid(Vec<Diagnostic>),
}

/// Reads and checks the host configuration at `path`.
pub fn read(path: &Path) -> Result<HostSpec, HostError> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(HostError::Missing(path.to_owned()));
        }
        Err(source) => {
            return Err(HostError::Io {
                path: path.to_owned(),
                source,
            });
        }
    };
    let untrusted = |why: String| HostError::Untrusted {
        path: path.to_owned(),
        why,
    };
    if !meta.is_file() {
        return Err(untrusted(
            "not a regular file (a symlink or something else); point at the file itself".into(),
        ));
    }
    crate::fsguard::check_owned_chain(path).map_err(|e| untrusted(e.to_string()))?;
    if meta.len() > MAX_BYTES {
        return Err(untrusted(format!(
            "larger than {} KiB; a host configuration is small",
            MAX_BYTES / 1024
        )));
    }
    let bytes = std::fs::read(path).map_err(|source| HostError::Io {
        path: path.to_owned(),
        source,
    })?;
    crate::load::load_host(&path.display().to_string(), &bytes).map_err(HostError::Invalid)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    const HOST: &str = "apiVersion: fleet/v1\nkind: Host\nspec:\n  providers: [{name: local, type: libvirt, uri: 'test:///default'}]\n";

    fn chmod(path: &Path, mode: u32) {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod");
    }

    #[test]
    fn only_a_file_its_owner_alone_can_write_is_read() {
        let dir = tempfile::tempdir().expect("tempdir");
        chmod(dir.path(), 0o755);
        let path = dir.path().join("host.yaml");
        assert!(matches!(read(&path), Err(HostError::Missing(_))));
        std::fs::write(&path, HOST).expect("write");
        chmod(&path, 0o644);
        let spec = read(&path).expect("a private host configuration reads");
        assert_eq!(spec.providers.len(), 1);

        chmod(&path, 0o666);
        let err = read(&path).expect_err("world-writable").to_string();
        assert!(err.contains("chmod go-w"), "{err}");
        chmod(&path, 0o644);

        chmod(dir.path(), 0o777);
        let err = read(&path)
            .expect_err("in a directory others write")
            .to_string();
        assert!(err.contains(&dir.path().display().to_string()), "{err}");
        chmod(dir.path(), 0o1777);
        read(&path).expect("a sticky directory like /tmp is fine");
        chmod(dir.path(), 0o755);

        let link = dir.path().join("link.yaml");
        std::os::unix::fs::symlink(&path, &link).expect("symlink");
        let err = read(&link).expect_err("a symlink").to_string();
        assert!(err.contains("not a regular file"), "{err}");
    }

    #[test]
    fn a_host_configuration_is_checked_with_positions() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("host.yaml");
        std::fs::write(&path, HOST.replace("uri:", "url:")).expect("write");
        let err = read(&path).expect_err("invalid").to_string();
        assert!(err.contains("host.yaml:4:"), "{err}");
        assert!(err.contains("url"), "{err}");
    }
}
