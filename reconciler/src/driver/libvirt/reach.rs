//! Whether QEMU, running as its own user, can reach the files fleet hands it.
//!
//! libvirt relabels the files it passes to QEMU (disks, kernels, the console log) but never
//! their parent directories. A storage or image directory under a mode-0700 directory (a
//! checkout under `/root`, any `mktemp -d`) therefore makes every start fail with QEMU's raw
//! "Permission denied". fleet checks the path up front and says which directory, which user
//! and what to change.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// A path QEMU's user cannot reach: which directory stops it, and the fix.
#[derive(Debug, thiserror::Error)]
#[error(
    "QEMU runs as {user} and cannot {verb} {} (mode {mode:04o}, owner uid {owner}), so {} is out of its reach; \
     move it somewhere QEMU's user can reach (such as under /var/lib/fleet) or run `{fix}`",
    blocked.display(),
    path.display()
)]
pub struct OutOfReach {
    user: String,
    verb: &'static str,
    blocked: PathBuf,
    mode: u32,
    owner: u32,
    path: PathBuf,
    fix: String,
}

/// The user and groups QEMU runs as, from libvirt's DAC security model.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QemuUser {
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups (libvirt gives QEMU those of its user).
    pub groups: Vec<u32>,
    /// For messages: the user's name, or `uid N`.
    pub name: String,
}

/// What QEMU must be able to do with the last component of a path.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Need {
    /// Enter a directory (and reach what fleet makes inside it).
    Enter,
    /// Read a file.
    Read,
}

impl QemuUser {
    /// The DAC base label for `domain_type` (`qemu` or `kvm`) in libvirt's capabilities
    /// XML: `<secmodel><model>dac</model><baselabel type='kvm'>+64055:+994</baselabel>`.
    /// `None` when the host has no DAC model (QEMU runs as the connecting user).
    pub fn from_capabilities(xml: &str, domain_type: &str) -> Option<QemuUser> {
        let doc = roxmltree::Document::parse(xml).ok()?;
        let dac = doc.descendants().find(|n| {
            n.has_tag_name("secmodel")
                && n.children()
                    .any(|c| c.has_tag_name("model") && c.text() == Some("dac"))
        })?;
        let label = dac
            .children()
            .find(|c| c.has_tag_name("baselabel") && c.attribute("type") == Some(domain_type))?
            .text()?;
        let (uid, gid) = label.split_once(':')?;
        let uid: u32 = uid.trim_start_matches('+').parse().ok()?;
        let gid: u32 = gid.trim_start_matches('+').parse().ok()?;
        let user = nix::unistd::User::from_uid(uid.into()).ok().flatten();
        let groups = user
            .as_ref()
            .and_then(|u| {
                let name = std::ffi::CString::new(u.name.as_bytes()).ok()?;
                nix::unistd::getgrouplist(&name, gid.into()).ok()
            })
            .map(|gs| gs.into_iter().map(|g| g.as_raw()).collect())
            .unwrap_or_else(|| vec![gid]);
        Some(QemuUser {
            uid,
            gid,
            groups,
            name: user.map_or_else(
                || format!("uid {uid}"),
                |u| format!("{} (uid {uid})", u.name),
            ),
        })
    }

    /// Checks every existing directory from `/` down to `path`, and `path` itself for
    /// `need`. A part that does not exist yet is fleet's to make, and is not checked.
    pub fn check(&self, path: &Path, need: Need) -> Result<(), OutOfReach> {
        if self.uid == 0 {
            return Ok(());
        }
        let ancestors: Vec<&Path> = path.ancestors().skip(1).collect();
        for dir in ancestors.into_iter().rev() {
            let Ok(meta) = std::fs::metadata(dir) else {
                return Ok(());
            };
            if !self.allowed(meta.uid(), meta.gid(), meta.mode(), 0o1) {
                return Err(self.refusal(path, dir, &meta, "enter"));
            }
        }
        let Ok(meta) = std::fs::metadata(path) else {
            return Ok(());
        };
        let (bit, verb) = match need {
            Need::Enter => (0o1, "enter"),
            Need::Read => (0o4, "read"),
        };
        if self.allowed(meta.uid(), meta.gid(), meta.mode(), bit) {
            Ok(())
        } else {
            Err(self.refusal(path, path, &meta, verb))
        }
    }

    /// The owner, group or other bit `bit` (1 = x, 4 = r) that applies to QEMU's user.
    fn allowed(&self, owner: u32, group: u32, mode: u32, bit: u32) -> bool {
        let shift = if owner == self.uid {
            6
        } else if self.groups.contains(&group) || group == self.gid {
            3
        } else {
            0
        };
        mode & (bit << shift) != 0
    }

    fn refusal(
        &self,
        path: &Path,
        blocked: &Path,
        meta: &std::fs::Metadata,
        verb: &'static str,
    ) -> OutOfReach {
        let fix = if blocked == path {
            format!(
                "chmod o+{} {}",
                if verb == "read" { "r" } else { "x" },
                blocked.display()
            )
        } else {
            format!("chmod o+x {}", blocked.display())
        };
        OutOfReach {
            user: self.name.clone(),
            verb,
            blocked: blocked.to_owned(),
            mode: meta.mode() & 0o7777,
            owner: meta.uid(),
            path: path.to_owned(),
            fix,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    const CAPS: &str = "<capabilities><host><secmodel><model>none</model><doi>0</doi></secmodel>\
        <secmodel><model>dac</model><doi>0</doi><baselabel type='kvm'>+64055:+994</baselabel>\
        <baselabel type='qemu'>+64056:+995</baselabel></secmodel></host></capabilities>";

    fn user(uid: u32) -> QemuUser {
        QemuUser {
            uid,
            gid: 60000,
            groups: vec![60000],
            name: format!("uid {uid}"),
        }
    }

    #[test]
    fn the_dac_label_of_the_domain_type_names_qemus_user() {
        let kvm = QemuUser::from_capabilities(CAPS, "kvm").expect("kvm label");
        assert_eq!((kvm.uid, kvm.gid), (64055, 994));
        let qemu = QemuUser::from_capabilities(CAPS, "qemu").expect("qemu label");
        assert_eq!((qemu.uid, qemu.gid), (64056, 995));
        assert_eq!(QemuUser::from_capabilities("<capabilities/>", "qemu"), None);
    }

    #[test]
    fn a_private_parent_is_named_with_the_fix() {
        let top = tempfile::tempdir().expect("tempdir");
        std::fs::set_permissions(top.path(), std::fs::Permissions::from_mode(0o700))
            .expect("chmod");
        let storage = top.path().join("repo/.fleet/storage");
        let qemu = user(64055);
        if std::fs::metadata(top.path()).expect("meta").uid() == qemu.uid {
            return;
        }
        let why = qemu
            .check(&storage, Need::Enter)
            .expect_err("0700 parent")
            .to_string();
        assert!(
            why.contains(&format!("cannot enter {}", top.path().display())),
            "{why}"
        );
        assert!(why.contains("mode 0700"), "{why}");
        assert!(
            why.contains(&format!("chmod o+x {}", top.path().display())),
            "{why}"
        );

        std::fs::set_permissions(top.path(), std::fs::Permissions::from_mode(0o711))
            .expect("chmod");
        qemu.check(&storage, Need::Enter)
            .expect("reachable once others may enter");
        let file = top.path().join("kernel");
        std::fs::write(&file, b"k").expect("write");
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        let why = qemu
            .check(&file, Need::Read)
            .expect_err("unreadable file")
            .to_string();
        assert!(why.contains("cannot read"), "{why}");
        assert!(
            user(0).check(&file, Need::Read).is_ok(),
            "root reaches everything"
        );
    }
}
