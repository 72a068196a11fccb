//! Cloud-init snippets on the snippet storage's directory: `fleet.<fleet>.<vm>.yaml`, each
//! starting with `# fleet: <fleet>/<vm>`. fleet writes, replaces and removes only files that
//! carry its marker; a file of another name or without the marker is never touched.
//! Snippets hold rendered user-data and never a secret.

use super::*;

pub(super) fn needs_user_data(vm: &DesiredVm) -> bool {
    let c = &vm.config;
    !(c.packages.is_empty() && c.files.is_empty() && c.runcmd.is_empty() && c.users.is_empty())
}

impl ProxmoxDriver {
    /// `fleet.<fleet>.<vm>.yaml`: fleet and VM names never hold a dot, so no two fleets'
    /// VMs share a snippet, even in one snippet directory.
    pub(super) fn snippet_name(&self, vm: &str) -> String {
        format!("{}{vm}.yaml", self.snippet_prefix())
    }

    pub(super) fn snippet_prefix(&self) -> String {
        format!("fleet.{}.", self.fleet)
    }

    /// Where releases before the dotted names put the VM's snippet. Not unique: fleet `a`
    /// with VM `b-c` and fleet `a-b` with VM `c` both got `fleet-a-b-c.yaml`, so such a file
    /// is only ever removed when its marker names this fleet and VM.
    pub(super) fn legacy_snippet_name(&self, vm: &str) -> String {
        format!("{}{vm}.yaml", self.legacy_snippet_prefix())
    }

    pub(super) fn legacy_snippet_prefix(&self) -> String {
        format!("fleet-{}-", self.fleet)
    }

    /// Writes the VM's cloud-init user-data snippet. It holds no secret: secret values only
    /// travel over the agent link.
    pub(super) fn write_snippet(&self, vm: &DesiredVm) -> Result<(), DriverError> {
        let Some((_, dir)) = &self.snippets else {
            return Ok(());
        };
        let seed = crate::seed::render(vm, &format!("{}-{}", self.fleet, vm.name));
        // cloud-init wants `#cloud-config` on the first line; fleet's marker follows it.
        let body = seed
            .user_data
            .strip_prefix("#cloud-config")
            .unwrap_or(&seed.user_data);
        let text = format!(
            "#cloud-config\n{}\n{}",
            stamp::snippet_marker(&self.fleet, &vm.name),
            body.trim_start_matches('\n')
        );
        let path = dir.join(self.snippet_name(&vm.name));
        // Never overwrite a file that is not this VM's snippet: it is someone else's.
        if let Ok(existing) = std::fs::read_to_string(&path)
            && !stamp::snippet_is(&existing, &self.fleet, &vm.name)
        {
            return Err(DriverError::new(
                ErrorKind::Conflict,
                format!(
                    "{} exists and is not fleet's snippet for {}/{} (its second line is not `{}`); fleet will not overwrite it: move it out of the snippet directory",
                    path.display(),
                    self.fleet,
                    vm.name,
                    stamp::snippet_marker(&self.fleet, &vm.name)
                ),
            ));
        }
        crate::atomic_file::write_atomic(&path, text.as_bytes()).map_err(|e| {
            DriverError::new(
                ErrorKind::Transient,
                format!("write snippet {}: {e}", path.display()),
            )
        })
    }

    /// Removes the VM's snippet, under its name and under its legacy name, where the file's
    /// marker line says it is this fleet's snippet for this VM.
    pub(super) fn remove_snippet(&self, name: &str) -> Result<(), DriverError> {
        let Some((_, dir)) = &self.snippets else {
            return Ok(());
        };
        for file in [self.snippet_name(name), self.legacy_snippet_name(name)] {
            self.remove_if_marked(&dir.join(file), name)?;
        }
        Ok(())
    }

    /// Removes the VM's snippet under its legacy name, once its config points at the new
    /// one.
    pub(super) fn drop_legacy_snippet(&self, name: &str) -> Result<(), DriverError> {
        if let Some((_, dir)) = &self.snippets {
            self.remove_if_marked(&dir.join(self.legacy_snippet_name(name)), name)?;
        }
        Ok(())
    }

    /// Removes `path` if its marker says it is this fleet's snippet for `vm`; says whether
    /// it did.
    pub(super) fn remove_if_marked(
        &self,
        path: &std::path::Path,
        vm: &str,
    ) -> Result<bool, DriverError> {
        match std::fs::read_to_string(path) {
            Ok(text) if stamp::snippet_is(&text, &self.fleet, vm) => {
                std::fs::remove_file(path).map(|()| true).map_err(|e| {
                    DriverError::new(
                        ErrorKind::Transient,
                        format!("remove snippet {}: {e}", path.display()),
                    )
                })
            }
            _ => Ok(false),
        }
    }

    /// Removes fleet's snippets whose VM no longer exists (a crash between a destroy and
    /// its cleanup, or a VM deleted by hand), and the temp files of snippet writes a kill
    /// interrupted. Works from what is on disk and in the cluster, not from memory.
    pub(super) fn sweep_snippets(&self, host: &ObservedHost) -> Vec<String> {
        let Some((_, dir)) = &self.snippets else {
            return Vec::new();
        };
        let mut removed: Vec<String> =
            crate::atomic_file::remove_left_temp_files_at(dir, &self.snippet_prefix(), |_| false)
                .iter()
                .map(|p| {
                    format!(
                        "removed {}, a snippet write that was interrupted",
                        p.display()
                    )
                })
                .collect();
        let Ok(entries) = std::fs::read_dir(dir) else {
            return removed;
        };
        let prefixes = [self.snippet_prefix(), self.legacy_snippet_prefix()];
        for entry in entries.flatten() {
            let file = entry.file_name().to_string_lossy().into_owned();
            let Some(vm) = prefixes.iter().find_map(|prefix| {
                file.strip_prefix(prefix.as_str())
                    .and_then(|rest| rest.strip_suffix(".yaml"))
            }) else {
                continue;
            };
            let alive = host
                .vms
                .iter()
                .any(|o| o.name == vm && o.owned_by(&self.fleet));
            if alive {
                continue;
            }
            // A file without this fleet's marker for `vm` is not its snippet, and stays.
            match self.remove_if_marked(&entry.path(), vm) {
                Ok(true) => removed.push(format!(
                    "removed the snippet of {vm}, whose VM no longer exists"
                )),
                Ok(false) => {}
                Err(e) => tracing::warn!("snippet sweep: {e}"),
            }
        }
        removed
    }
}
