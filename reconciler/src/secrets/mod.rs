//! Secrets: committed as age ciphertext (`fleet/secrets/<name>.yaml`), opened only in memory
//! with the host's age identity, and delivered to guests only over the agent link.
//!
//! - `Keyring`: the host's age identities, from a key file no one else may read.
//! - `encrypt` / `decrypt`: one value, ASCII-armored, interoperable with the `age` CLI.
//! - `Vault`: every committed value opened, with a keyed hash (fingerprint) of each, so a
//!   changed value is seen without keeping or comparing plaintext.
//! - `redact`: the tracing writer that blanks any opened value before a log line is written.
//!
//! Invariants: a value lives only in `secrecy` boxes (zeroized when dropped) and in the
//! `Secrets` message written to the agent link; it never reaches a status file, an event,
//! a plan, a seed, domain XML, a log line or a process argument.

pub mod files;
pub mod redact;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::str::FromStr;

use age::secrecy::ExposeSecret;
use hmac::{Hmac, Mac};
use secrecy::SecretSlice;
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use crate::resolve::{Desired, DesiredSecret, DesiredTask};

/// The largest value `fleet secret set` accepts (and a decrypted value may have).
pub const MAX_VALUE_BYTES: usize = 32 * 1024;

/// Keeps opened values out of crash dumps: the process is marked not dumpable (no core
/// file, no ptrace by other users) once it holds an identity. Idempotent.
pub fn no_core_dumps() {
    if let Err(e) = nix::sys::prctl::set_dumpable(false) {
        tracing::warn!("cannot mark the process not dumpable: {e}");
    }
}

/// The host's age identities (X25519), read from one key file.
pub struct Keyring {
    identities: Vec<age::x25519::Identity>,
    path: PathBuf,
}

impl std::fmt::Debug for Keyring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Keyring")
            .field("path", &self.path)
            .field("identities", &self.identities.len())
            .finish()
    }
}

/// Where the identity comes from, in order: `--age-identity`, `FLEET_AGE_IDENTITY`,
/// `~/.config/fleet/age.key`. `None` when none is set and the default file does not exist.
pub fn identity_path(
    flag: Option<&Path>,
    env: Option<&Path>,
    home: Option<&Path>,
) -> Option<PathBuf> {
    if let Some(p) = flag.or(env) {
        return Some(p.to_path_buf());
    }
    let default = home?.join(".config/fleet/age.key");
    default.exists().then_some(default)
}

/// Why a secret file, identity or value cannot be used; each says what and the fix, and
/// none holds plaintext.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("{}: {source}", path.display())]
    Unreadable {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "{} is readable by others (mode {mode:04o}); fix it with `chmod 600 {}`",
        path.display(),
        path.display()
    )]
    Exposed { path: PathBuf, mode: u32 },
    #[error(
        "no age identity: pass --age-identity FILE, set FLEET_AGE_IDENTITY, or create ~/.config/fleet/age.key"
    )]
    NoIdentity,
    #[error("age identity {}: {source}; create one with `age-keygen -o {}`", path.display(), path.display())]
    IdentityMissing {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("age identity {source}")]
    IdentityFile { source: Box<SecretError> },
    #[error("age identity {}:{line}: not an age secret key (AGE-SECRET-KEY-1…); only X25519 keys from age-keygen are supported", path.display())]
    NotAKey { path: PathBuf, line: usize },
    #[error("age identity {} holds no key; create one with `age-keygen -o {}`", path.display(), path.display())]
    NoKey { path: PathBuf },
    #[error("recipient {recipient:?} is not an age X25519 recipient: {reason}")]
    Recipient { recipient: String, reason: String },
    #[error("no recipients to encrypt to")]
    NoRecipients,
    #[error("cannot encrypt: {0}")]
    Encryptor(#[from] age::EncryptError),
    #[error("cannot encrypt: {0}")]
    Encrypting(#[from] std::io::Error),
    #[error("not encrypted to this host's identity ({}, recipient {recipients}); someone who can decrypt it must run `fleet secret rotate` with that recipient listed", identity.display())]
    NotForThisHost {
        identity: PathBuf,
        recipients: String,
    },
    #[error(
        "the ciphertext is damaged or was tampered with ({cause}); set the value again with `fleet secret set`"
    )]
    Damaged { cause: String },
    #[error(
        "the ciphertext is damaged or was tampered with (or a newer age wrote it); set the value again with `fleet secret set`"
    )]
    UnknownFormat,
    #[error("cannot decrypt: {0}")]
    Decrypt(age::DecryptError),
    #[error("the value is larger than {} KiB", MAX_VALUE_BYTES / 1024)]
    TooLarge,
}

/// Refuses a file holding a secret that group or others may read, with the fix.
pub fn check_private_file(path: &Path) -> Result<(), SecretError> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::metadata(path).map_err(|source| SecretError::Unreadable {
        path: path.to_owned(),
        source,
    })?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(SecretError::Exposed {
            path: path.to_owned(),
            mode,
        });
    }
    Ok(())
}

impl Keyring {
    /// Reads `AGE-SECRET-KEY-1…` lines (as `age-keygen` writes them). The file must not be
    /// readable by group or others.
    pub fn load(path: &Path) -> Result<Keyring, SecretError> {
        check_private_file(path).map_err(|problem| match problem {
            SecretError::Unreadable { path, source } => {
                SecretError::IdentityMissing { path, source }
            }
            other => SecretError::IdentityFile {
                source: Box::new(other),
            },
        })?;
        let text = Zeroizing::new(std::fs::read_to_string(path).map_err(|source| {
            SecretError::IdentityFile {
                source: Box::new(SecretError::Unreadable {
                    path: path.to_owned(),
                    source,
                }),
            }
        })?);
        let mut identities = Vec::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let identity =
                age::x25519::Identity::from_str(line).map_err(|_| SecretError::NotAKey {
                    path: path.to_owned(),
                    line: n + 1,
                })?;
            identities.push(identity);
        }
        if identities.is_empty() {
            return Err(SecretError::NoKey {
                path: path.to_owned(),
            });
        }
        Ok(Keyring {
            identities,
            path: path.to_path_buf(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The public recipients of these identities (`age1…`).
    pub fn recipients(&self) -> Vec<String> {
        self.identities
            .iter()
            .map(|i| i.to_public().to_string())
            .collect()
    }

    /// The key of the fingerprint HMAC: derived from the first identity, so fingerprints are
    /// stable for a host (and any host sharing its key) but useless to anyone without it.
    fn fingerprint_key(&self) -> Zeroizing<Vec<u8>> {
        let mut h = Sha256::new();
        h.update(b"fleet secret fingerprint v1\0");
        if let Some(first) = self.identities.first() {
            h.update(first.to_string().expose_secret().as_bytes());
        }
        Zeroizing::new(h.finalize().to_vec())
    }
}

/// Encrypts `plaintext` to `recipients` as an ASCII-armored age file.
pub fn encrypt(plaintext: &[u8], recipients: &[String]) -> Result<String, SecretError> {
    let parsed: Vec<age::x25519::Recipient> = recipients
        .iter()
        .map(|r| {
            age::x25519::Recipient::from_str(r).map_err(|reason| SecretError::Recipient {
                recipient: r.clone(),
                reason: reason.to_string(),
            })
        })
        .collect::<Result<_, _>>()?;
    if parsed.is_empty() {
        return Err(SecretError::NoRecipients);
    }
    let encryptor =
        age::Encryptor::with_recipients(parsed.iter().map(|r| r as &dyn age::Recipient))?;
    let mut out = Vec::new();
    let armor = age::armor::ArmoredWriter::wrap_output(&mut out, age::armor::Format::AsciiArmor)?;
    let mut writer = encryptor.wrap_output(armor)?;
    writer.write_all(plaintext)?;
    writer.finish().and_then(|armor| armor.finish())?;
    // The armor is ASCII.
    Ok(String::from_utf8_lossy(&out).into_owned())
}

/// Decrypts one armored value. Errors say what went wrong without any plaintext.
pub fn decrypt(armored: &str, keyring: &Keyring) -> Result<SecretSlice<u8>, SecretError> {
    let reader = age::armor::ArmoredReader::new(armored.as_bytes());
    let decryptor = age::Decryptor::new(reader).map_err(|e| describe(e, keyring))?;
    let mut stream = decryptor
        .decrypt(keyring.identities.iter().map(|i| i as &dyn age::Identity))
        .map_err(|e| describe(e, keyring))?;
    let mut plain = Zeroizing::new(Vec::new());
    let mut limited = (&mut stream).take(MAX_VALUE_BYTES as u64 + 1);
    limited
        .read_to_end(&mut plain)
        .map_err(|e| SecretError::Damaged {
            cause: e.to_string(),
        })?;
    if plain.len() > MAX_VALUE_BYTES {
        return Err(SecretError::TooLarge);
    }
    Ok(SecretSlice::from(std::mem::take(&mut *plain)))
}

fn describe(e: age::DecryptError, keyring: &Keyring) -> SecretError {
    match e {
        age::DecryptError::NoMatchingKeys => SecretError::NotForThisHost {
            identity: keyring.path.clone(),
            recipients: keyring.recipients().join(", "),
        },
        age::DecryptError::InvalidMac
        | age::DecryptError::DecryptionFailed
        | age::DecryptError::KeyDecryptionFailed
        | age::DecryptError::InvalidHeader
        | age::DecryptError::Io(_) => SecretError::Damaged {
            cause: e.to_string(),
        },
        age::DecryptError::UnknownFormat => SecretError::UnknownFormat,
        other => SecretError::Decrypt(other),
    }
}

/// Every committed value, opened. Values that cannot be opened are problems, reported per
/// (secret, key); what depends on them waits, everything else proceeds.
#[derive(Default)]
pub struct Vault {
    values: BTreeMap<(String, String), SecretSlice<u8>>,
    fingerprints: BTreeMap<(String, String), String>,
    problems: BTreeMap<(String, String), String>,
}

impl std::fmt::Debug for Vault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vault")
            .field("values", &self.values.len())
            .field("problems", &self.problems)
            .finish()
    }
}

impl Vault {
    /// Opens every value of `secrets`. Without a keyring every value is a problem saying
    /// why (`no_keyring`).
    pub fn open(
        secrets: &BTreeMap<String, DesiredSecret>,
        keyring: Result<&Keyring, &SecretError>,
    ) -> Vault {
        let mut vault = Vault::default();
        let fingerprint_key = keyring.ok().map(Keyring::fingerprint_key);
        for secret in secrets.values() {
            for (key, armored) in &secret.data {
                let id = (secret.name.clone(), key.clone());
                let opened = match (keyring, &fingerprint_key) {
                    (Ok(k), Some(fk)) => decrypt(&armored.0, k)
                        .map(|v| (v, fk))
                        .map_err(|e| e.to_string()),
                    (Err(why), _) => Err(why.to_string()),
                    (Ok(_), None) => Err(SecretError::NoIdentity.to_string()),
                };
                match opened {
                    Ok((value, fingerprint_key)) => {
                        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(fingerprint_key)
                            .expect("HMAC takes any key length");
                        for part in [secret.name.as_bytes(), b"\0", key.as_bytes(), b"\0"] {
                            mac.update(part);
                        }
                        mac.update(value.expose_secret());
                        let tag = mac.finalize().into_bytes();
                        redact::register(value.expose_secret());
                        vault
                            .fingerprints
                            .insert(id.clone(), crate::digest::hex(&tag)[..16].to_owned());
                        vault.values.insert(id, value);
                    }
                    Err(why) => {
                        vault
                            .problems
                            .insert(id, format!("{} key {key}: {why}", secret.source));
                    }
                }
            }
        }
        vault
    }

    /// Withholds every value equal to one of `credentials` (a provider's API token) under
    /// any other secret or key: a committer cannot read the token's ciphertext, but could
    /// copy it into a Secret a task may take. Such a value becomes a problem, so what needs it
    /// waits and says why.
    pub fn withhold_copies_of(&mut self, credentials: &[(String, String)]) {
        let tokens: Vec<Vec<u8>> = credentials
            .iter()
            .filter_map(|id| self.values.get(id))
            .map(|v| v.expose_secret().to_vec())
            .collect();
        let copies: Vec<(String, String)> = self
            .values
            .iter()
            .filter(|(id, v)| {
                !credentials.contains(id) && tokens.iter().any(|t| t == v.expose_secret())
            })
            .map(|(id, _)| id.clone())
            .collect();
        for id in copies {
            self.values.remove(&id);
            self.fingerprints.remove(&id);
            self.problems.insert(
                id.clone(),
                format!(
                    "{}/{}: holds a provider's API token; a provider credential never goes to a guest",
                    id.0, id.1
                ),
            );
        }
    }

    pub fn value(&self, secret: &str, key: &str) -> Option<&SecretSlice<u8>> {
        self.values.get(&(secret.to_owned(), key.to_owned()))
    }

    /// A keyed hash of the value (16 hex digits): equal values, equal fingerprints; nothing
    /// about the value can be learned from it without the host's identity.
    pub fn fingerprint(&self, secret: &str, key: &str) -> Option<&str> {
        self.fingerprints
            .get(&(secret.to_owned(), key.to_owned()))
            .map(String::as_str)
    }

    /// Why a value could not be opened (naming the file and key), if it could not.
    pub fn problem(&self, secret: &str, key: &str) -> Option<&str> {
        self.problems
            .get(&(secret.to_owned(), key.to_owned()))
            .map(String::as_str)
    }

    /// Every value by `<secret>/<key>`: its fingerprint, or why it could not be opened.
    pub fn by_id(&self) -> BTreeMap<String, crate::plan::secrets::ValueNow> {
        use crate::plan::secrets::ValueNow;
        let ok = self
            .fingerprints
            .iter()
            .map(|((s, k), fp)| (format!("{s}/{k}"), ValueNow::Opened(fp.clone())));
        let bad = self
            .problems
            .iter()
            .map(|((s, k), why)| (format!("{s}/{k}"), ValueNow::Unreadable(why.clone())));
        ok.chain(bad).collect()
    }

    /// What `status/secrets.yaml` records of this vault: fingerprints, never values.
    pub fn seen(&self, desired: &Desired) -> crate::plan::secrets::SecretsSeen {
        let source = |s: &str| {
            desired
                .secrets
                .get(s)
                .map(|d| d.source.clone())
                .unwrap_or_default()
        };
        self.fingerprints
            .keys()
            .chain(self.problems.keys())
            .map(|(s, k)| {
                let seen = crate::plan::secrets::SecretSeen {
                    fingerprint: self.fingerprint(s, k).map(str::to_owned),
                    source: source(s),
                };
                (format!("{s}/{k}"), seen)
            })
            .collect()
    }

    pub fn problems(&self) -> impl Iterator<Item = &str> {
        self.problems.values().map(String::as_str)
    }

    /// Ties tasks to the values they use, without changing them: each task's run hash is
    /// its spec hash with the fingerprints of its secret values (a changed value is a new
    /// run), and a task whose value could not be opened is held, saying why.
    pub fn bind(&self, tasks: &BTreeMap<String, DesiredTask>) -> BTreeMap<String, BoundTask> {
        tasks
            .iter()
            .map(|(name, task)| (name.clone(), self.bind_one(task)))
            .collect()
    }

    fn bind_one(&self, task: &DesiredTask) -> BoundTask {
        if task.secrets.is_empty() {
            return BoundTask {
                run_hash: task.spec_hash.clone(),
                held: None,
            };
        }
        let mut held = None;
        let mut h = Sha256::new();
        h.update(task.spec_hash.as_bytes());
        for r in &task.secrets {
            h.update(format!("\0{}/{}/{}=", r.secret.0, r.key.0, r.target()).as_bytes());
            match self.fingerprint(&r.secret.0, &r.key.0) {
                Some(fp) => h.update(fp.as_bytes()),
                None => {
                    let why = self
                        .problem(&r.secret.0, &r.key.0)
                        .unwrap_or("the secret is not defined");
                    held.get_or_insert_with(|| {
                        format!("waiting for secret {}/{}: {why}", r.secret.0, r.key.0)
                    });
                }
            }
        }
        BoundTask {
            run_hash: crate::digest::hex(&h.finalize()),
            held,
        }
    }
}

/// A task as the values it uses make it (`Vault::bind`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BoundTask {
    /// What identifies a run: the spec hash, and the fingerprints of the task's values.
    pub run_hash: String,
    /// Why the task cannot run now (a value that could not be opened).
    pub held: Option<String>,
}

/// A fresh keyring in a temporary key file, for tests elsewhere in the crate.
#[cfg(test)]
pub(crate) fn test_keyring() -> (tempfile::TempDir, Keyring) {
    let (dir, path) = tests::key_file(0o600);
    let keyring = Keyring::load(&path).expect("keyring");
    (dir, keyring)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn a_process_holding_an_identity_is_not_dumpable() {
        no_core_dumps();
        assert_eq!(nix::sys::prctl::get_dumpable(), Ok(false));
    }

    /// A fresh identity in a key file of `mode`; returns the directory (keep it alive).
    pub(super) fn key_file(mode: u32) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("age.key");
        let identity = age::x25519::Identity::generate();
        std::fs::write(
            &path,
            format!(
                "# created: now\n# public key: {}\n{}\n",
                identity.to_public(),
                identity.to_string().expose_secret()
            ),
        )
        .expect("write key");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).expect("chmod");
        (dir, path)
    }

    fn secret(name: &str, key: &str, armored: String) -> BTreeMap<String, DesiredSecret> {
        BTreeMap::from([(
            name.to_owned(),
            DesiredSecret {
                name: name.to_owned(),
                data: BTreeMap::from([(key.to_owned(), crate::spec::ArmoredValue(armored))]),
                source: format!("fleet/secrets/{name}.yaml"),
            },
        )])
    }

    #[test]
    fn a_key_file_others_can_read_is_refused_with_the_fix() {
        let (_dir, path) = key_file(0o644);
        let err = Keyring::load(&path).expect_err("refused").to_string();
        assert!(err.starts_with("age identity "), "{err}");
        assert!(err.contains("readable by others (mode 0644)"), "{err}");
        assert!(err.contains("chmod 600"), "{err}");
        let (_dir, path) = key_file(0o600);
        assert_eq!(Keyring::load(&path).expect("loads").recipients().len(), 1);
    }

    #[test]
    fn values_round_trip_and_fingerprints_follow_the_value_not_the_ciphertext() {
        let (_dir, path) = key_file(0o600);
        let keyring = Keyring::load(&path).expect("keyring");
        let a1 = encrypt(b"value-one", &keyring.recipients()).expect("encrypt");
        let a2 = encrypt(b"value-one", &keyring.recipients()).expect("encrypt");
        let b = encrypt(b"value-two", &keyring.recipients()).expect("encrypt");
        assert!(a1.starts_with("-----BEGIN AGE ENCRYPTED FILE-----"));
        assert_ne!(a1, a2, "age encryption is randomised");
        assert_eq!(
            decrypt(&a1, &keyring).expect("decrypt").expose_secret(),
            b"value-one"
        );
        let fp = |armored: String| {
            Vault::open(&secret("s", "k", armored), Ok(&keyring))
                .fingerprint("s", "k")
                .map(str::to_owned)
                .expect("fingerprint")
        };
        assert_eq!(fp(a1.clone()), fp(a2), "re-encrypting does not change it");
        assert_ne!(fp(a1.clone()), fp(b), "a new value does");
        assert!(!fp(a1).contains("value"), "it is not the value");
    }

    #[test]
    fn a_wrong_identity_and_tampered_ciphertext_name_the_file_and_key() {
        let (_d1, mine) = key_file(0o600);
        let (_d2, theirs) = key_file(0o600);
        let mine = Keyring::load(&mine).expect("keyring");
        let theirs = Keyring::load(&theirs).expect("keyring");
        let armored = encrypt(b"v", &theirs.recipients()).expect("encrypt");
        let vault = Vault::open(&secret("api", "token", armored.clone()), Ok(&mine));
        let problem = vault.problem("api", "token").expect("a problem");
        assert!(
            problem.starts_with(
                "fleet/secrets/api.yaml key token: not encrypted to this host's identity"
            ),
            "{problem}"
        );
        assert!(problem.contains(&mine.recipients()[0]), "{problem}");

        // Flip one character of the payload (the last full line before the footer).
        let mut lines: Vec<String> = armored.lines().map(str::to_owned).collect();
        let at = lines.len() / 2;
        let flipped: String = lines[at]
            .chars()
            .enumerate()
            .map(|(i, c)| {
                if i == 3 {
                    if c == 'A' { 'B' } else { 'A' }
                } else {
                    c
                }
            })
            .collect();
        lines[at] = flipped;
        let vault = Vault::open(&secret("api", "token", lines.join("\n")), Ok(&theirs));
        let problem = vault.problem("api", "token").expect("a problem");
        assert!(
            problem.starts_with(
                "fleet/secrets/api.yaml key token: the ciphertext is damaged or was tampered with"
            ),
            "{problem}"
        );
        assert!(vault.value("api", "token").is_none());
    }

    #[test]
    fn a_copy_of_a_provider_token_is_withheld() {
        let (_dir, path) = key_file(0o600);
        let keyring = Keyring::load(&path).expect("keyring");
        let token = encrypt(b"pve-token-value", &keyring.recipients()).expect("encrypt");
        let mut secrets = secret("pve", "token", token.clone());
        // The committer cannot read the token, but can copy its ciphertext.
        secrets.extend(secret("innocent", "value", token));
        secrets.extend(secret(
            "other",
            "value",
            encrypt(b"something else", &keyring.recipients()).expect("encrypt"),
        ));
        let mut vault = Vault::open(&secrets, Ok(&keyring));
        vault.withhold_copies_of(&[("pve".into(), "token".into())]);
        assert!(
            vault.value("pve", "token").is_some(),
            "the driver still has it"
        );
        assert!(vault.value("innocent", "value").is_none());
        assert!(
            vault
                .problem("innocent", "value")
                .is_some_and(|p| p.contains("holds a provider's API token"))
        );
        assert!(vault.value("other", "value").is_some());
    }

    #[test]
    fn tasks_are_bound_to_their_values_and_held_without_them() {
        let (_dir, path) = key_file(0o600);
        let keyring = Keyring::load(&path).expect("keyring");
        let snapshot = |value: &str| {
            let armored = encrypt(value.as_bytes(), &keyring.recipients()).expect("encrypt");
            let desired = crate::resolve::tests_support::desired_with_task_secret(armored);
            let vault = Vault::open(&desired.secrets, Ok(&keyring));
            let bound = vault.bind(&desired.tasks)["t"].clone();
            assert_ne!(bound.run_hash, desired.tasks["t"].spec_hash);
            bound
        };
        let one = snapshot("one");
        assert_eq!(one.held, None);
        assert_eq!(
            snapshot("one").run_hash,
            one.run_hash,
            "same value, same run"
        );
        assert_ne!(
            snapshot("two").run_hash,
            one.run_hash,
            "a new value is a new run"
        );

        let desired = crate::resolve::tests_support::desired_with_task_secret(
            encrypt(b"x", &keyring.recipients()).expect("encrypt"),
        );
        let vault = Vault::open(&desired.secrets, Err(&SecretError::NoIdentity));
        let held = vault.bind(&desired.tasks)["t"].held.clone().expect("held");
        assert!(
            held.starts_with("waiting for secret s/k: fleet/secrets/s.yaml key k: no age identity"),
            "{held}"
        );
    }
}
