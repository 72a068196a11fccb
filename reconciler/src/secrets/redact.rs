//! The redaction layer under fleet's logs: every value the vault opens is registered here,
//! and the log writer replaces any occurrence of one with `[REDACTED]` before a line leaves
//! the process. This is the safety net; the first rule is that no code logs a value.

use std::io::Write;
use std::sync::RwLock;

use secrecy::{ExposeSecret, SecretSlice};

/// Values shorter than this are not redacted: blanking every "a" or "1" would destroy logs
/// while protecting nothing a guess would not find.
const MIN_REDACTED_LEN: usize = 4;

static VALUES: RwLock<Vec<SecretSlice<u8>>> = RwLock::new(Vec::new());

/// Adds a value to the set the log writer blanks.
pub fn register(value: &[u8]) {
    if value.len() < MIN_REDACTED_LEN {
        return;
    }
    let mut values = VALUES.write().unwrap_or_else(|p| p.into_inner());
    if !values.iter().any(|v| v.expose_secret() == value) {
        values.push(SecretSlice::from(value.to_vec()));
    }
}

/// `text` with every registered value (and each of its lines, for multi-line values)
/// replaced by `[REDACTED]`.
pub fn redact(text: &[u8]) -> Vec<u8> {
    let values = VALUES.read().unwrap_or_else(|p| p.into_inner());
    let mut out = text.to_vec();
    for value in values.iter() {
        let value = value.expose_secret();
        let pieces = std::iter::once(value).chain(
            value
                .split(|&b| b == b'\n')
                .filter(|l| l.len() >= MIN_REDACTED_LEN && l.len() < value.len()),
        );
        for piece in pieces {
            out = replace_all(&out, piece, b"[REDACTED]");
        }
    }
    out
}

fn replace_all(haystack: &[u8], needle: &[u8], with: &[u8]) -> Vec<u8> {
    if needle.is_empty() || haystack.len() < needle.len() {
        return haystack.to_vec();
    }
    let mut out = Vec::with_capacity(haystack.len());
    let mut i = 0;
    while i < haystack.len() {
        if haystack[i..].starts_with(needle) {
            out.extend_from_slice(with);
            i += needle.len();
        } else {
            out.push(haystack[i]);
            i += 1;
        }
    }
    out
}

/// A log writer (for `tracing_subscriber::fmt().with_writer`) that redacts what it is given
/// and writes it to stderr. The fmt layer hands over one whole event per write.
pub struct RedactingStderr;

impl Write for RedactingStderr {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        std::io::stderr().write_all(&redact(buf))?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for RedactingStderr {
    type Writer = RedactingStderr;

    fn make_writer(&'a self) -> Self::Writer {
        RedactingStderr
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registered_values_and_their_lines_are_blanked() {
        register(b"canary-7f3a9c");
        register(b"line-one-xyz\nline-two-xyz");
        register(b"ab");
        let out = redact(b"token=canary-7f3a9c; pem=line-two-xyz; short=ab");
        assert_eq!(
            String::from_utf8(out).expect("utf-8"),
            "token=[REDACTED]; pem=[REDACTED]; short=ab"
        );
    }
}
