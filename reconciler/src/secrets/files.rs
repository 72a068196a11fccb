//! `fleet secret set | rotate | list`: the Secret files in the working tree. These commands
//! write files for the operator to review and commit; they never commit, and never print a
//! value.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use secrecy::{ExposeSecret, SecretSlice};

use super::{Keyring, decrypt, encrypt};
use crate::spec::{
    ApiVersion, ArmoredValue, Metadata, Name, SecretDocument, SecretKey, SecretKind, SecretSpec,
};

/// The fleet directory of the working tree.
pub struct SecretFiles {
    pub fleet_dir: PathBuf,
}

impl SecretFiles {
    fn path(&self, name: &str) -> PathBuf {
        self.fleet_dir.join("secrets").join(format!("{name}.yaml"))
    }

    fn read(&self, name: &str) -> Result<Option<SecretDocument>> {
        let path = self.path(name);
        match std::fs::read_to_string(&path) {
            Ok(text) => serde_saphyr::from_str(&text).map(Some).map_err(|e| {
                anyhow::anyhow!(
                    "{}: {e}; fix it (fleet validate --worktree shows where)",
                    path.display()
                )
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).with_context(|| path.display().to_string()),
        }
    }

    fn write(&self, doc: &SecretDocument) -> Result<PathBuf> {
        let path = self.path(&doc.metadata.name.0);
        let dir = path.parent().context("secret path has a parent")?;
        std::fs::create_dir_all(dir).with_context(|| dir.display().to_string())?;
        let text = serde_saphyr::to_string(doc).context("serialise the Secret")?;
        let header =
            "# Values are age-encrypted (fleet secret set / rotate); keys are in the clear.\n";
        let tmp = path.with_extension("yaml.tmp");
        // A file of the operator's repository, with the repository's modes (write_atomic's
        // 0640 is for the status directory).
        #[expect(
            clippy::disallowed_methods,
            reason = "a repository file, not a status file"
        )]
        std::fs::write(&tmp, format!("{header}{text}"))
            .with_context(|| tmp.display().to_string())?;
        std::fs::rename(&tmp, &path).with_context(|| path.display().to_string())?;
        Ok(path)
    }

    /// Encrypts `value` under `name`/`key` to `recipients` (the host's, never the
    /// repository's), creating the Secret or replacing that key.
    pub fn set(
        &self,
        name: &str,
        key: &str,
        value: &SecretSlice<u8>,
        recipients: &[String],
    ) -> Result<PathBuf> {
        check_name(name)?;
        if !key_is_valid(key) {
            bail!("key {key:?} is not valid: use letters, digits, `_`, `.` and `-`, at most 64");
        }
        if value.expose_secret().len() > super::MAX_VALUE_BYTES {
            bail!(
                "the value is larger than {} KiB",
                super::MAX_VALUE_BYTES / 1024
            );
        }
        let existing = self.read(name)?;
        let armored = encrypt(value.expose_secret(), recipients).map_err(anyhow::Error::msg)?;
        let mut doc = existing.unwrap_or_else(|| SecretDocument {
            api_version: ApiVersion::V1,
            kind: SecretKind::Kind,
            metadata: Metadata {
                name: Name(name.to_owned()),
                labels: BTreeMap::new(),
            },
            spec: SecretSpec {
                allowed: None,
                data: BTreeMap::new(),
            },
        });
        doc.spec
            .data
            .insert(SecretKey(key.to_owned()), ArmoredValue(armored));
        self.write(&doc)
    }

    /// Re-encrypts every value of the named Secrets (all when `names` is empty) to
    /// `recipients`. Returns each file written and how many values it holds.
    pub fn rotate(
        &self,
        keyring: &Keyring,
        names: &[String],
        recipients: &[String],
    ) -> Result<Vec<(PathBuf, usize)>> {
        let names = if names.is_empty() {
            self.names()?
        } else {
            names.to_vec()
        };
        // Everything is decrypted first: a value that cannot be opened stops the rotation
        // before any file changes.
        let mut rotated = Vec::new();
        for name in &names {
            let Some(mut doc) = self.read(name)? else {
                bail!(
                    "no Secret named {name:?} in {}",
                    self.fleet_dir.join("secrets").display()
                );
            };
            for (key, value) in doc.spec.data.iter_mut() {
                let plain = decrypt(&value.0, keyring).map_err(|e| {
                    anyhow::anyhow!("{} key {}: {e}", self.path(name).display(), key.0)
                })?;
                *value = ArmoredValue(
                    encrypt(plain.expose_secret(), recipients).map_err(anyhow::Error::msg)?,
                );
            }
            rotated.push(doc);
        }
        rotated
            .iter()
            .map(|doc| Ok((self.write(doc)?, doc.spec.data.len())))
            .collect()
    }

    fn names(&self) -> Result<Vec<String>> {
        let dir = self.fleet_dir.join("secrets");
        let mut names = Vec::new();
        match std::fs::read_dir(&dir) {
            Ok(entries) => {
                for entry in entries.flatten() {
                    let file = entry.file_name();
                    if let Some(name) = file.to_str().and_then(|f| f.strip_suffix(".yaml")) {
                        names.push(name.to_owned());
                    }
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| dir.display().to_string()),
        }
        names.sort();
        Ok(names)
    }

    /// For `-o json|yaml`: each Secret's name, keys and who may receive it; never values.
    pub fn summaries(&self) -> Result<Vec<serde_json::Value>> {
        let mut out = Vec::new();
        for name in self.names()? {
            let Some(doc) = self.read(&name)? else {
                continue;
            };
            let keys: Vec<&str> = doc.spec.data.keys().map(|k| k.0.as_str()).collect();
            out.push(serde_json::json!({
                "name": name,
                "keys": keys,
                "allowed": doc.spec.allowed,
            }));
        }
        Ok(out)
    }

    /// Names, keys and who may receive them; never values (nothing is decrypted).
    pub fn list(&self) -> Result<String> {
        let mut out = String::new();
        for name in self.names()? {
            let Some(doc) = self.read(&name)? else {
                continue;
            };
            let keys: Vec<&str> = doc.spec.data.keys().map(|k| k.0.as_str()).collect();
            let allowed = match &doc.spec.allowed {
                None => "allowed: nothing (no guest receives it)".to_owned(),
                Some(a) => {
                    let names = |what: &str, list: &[Name]| {
                        (!list.is_empty()).then(|| {
                            format!(
                                "{what} {}",
                                list.iter()
                                    .map(|n| n.0.as_str())
                                    .collect::<Vec<_>>()
                                    .join(" ")
                            )
                        })
                    };
                    let parts: Vec<String> = [
                        names("loadouts", &a.loadouts),
                        names("vms", &a.vms),
                        names("tasks", &a.tasks),
                    ]
                    .into_iter()
                    .flatten()
                    .collect();
                    format!("allowed: {}", parts.join("; "))
                }
            };
            out.push_str(&format!("{name}\t{}\t{allowed}\n", keys.join(", ")));
        }
        if out.is_empty() {
            out.push_str("no secrets (create one with `fleet secret set NAME KEY`)\n");
        }
        Ok(out)
    }
}

fn check_name(name: &str) -> Result<()> {
    let re = regex::Regex::new(crate::spec::NAME_PATTERN).expect("the name pattern compiles");
    if re.is_match(name) {
        Ok(())
    } else {
        bail!(
            "secret name {name:?} is not valid: lower-case letters, digits and '-', at most 63 characters"
        )
    }
}

fn key_is_valid(key: &str) -> bool {
    (1..=64).contains(&key.len())
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
}

/// Reads a value for `fleet secret set`: from the terminal without echo, or all of stdin
/// when it is a pipe (one trailing newline removed, as `echo` and editors add one).
pub fn read_value() -> Result<SecretSlice<u8>> {
    use std::io::{IsTerminal, Read};
    let stdin = std::io::stdin();
    if stdin.is_terminal() {
        let value = zeroize::Zeroizing::new(
            rpassword::prompt_password("value (not echoed): ").context("read the value")?,
        );
        return Ok(SecretSlice::from(value.as_bytes().to_vec()));
    }
    let mut buf = zeroize::Zeroizing::new(Vec::new());
    stdin
        .lock()
        .take(super::MAX_VALUE_BYTES as u64 + 2)
        .read_to_end(&mut buf)
        .context("read the value from stdin")?;
    if buf.last() == Some(&b'\n') {
        buf.pop();
        if buf.last() == Some(&b'\r') {
            buf.pop();
        }
    }
    if buf.is_empty() {
        bail!(
            "no value on stdin: pipe it in (`fleet secret set NAME KEY < file`) or run from a terminal"
        );
    }
    Ok(SecretSlice::from(std::mem::take(&mut *buf)))
}

/// The fleet directory of a workspace's working tree.
pub fn in_worktree(repo_root: &Path, fleet_dir: &str) -> SecretFiles {
    SecretFiles {
        fleet_dir: repo_root.join(fleet_dir),
    }
}
