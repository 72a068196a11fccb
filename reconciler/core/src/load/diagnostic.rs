//! A problem in the operator's input, located at `path:line:column`.

use std::fmt;

use serde::Serialize;

use super::yaml::Pos;

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct Diagnostic {
    /// Path relative to the repository root, with `/` separators.
    pub path: String,
    pub line: u64,
    pub column: u64,
    /// Names the field and says what would be valid.
    pub message: String,
}

impl Diagnostic {
    pub fn new(path: impl Into<String>, pos: Pos, message: impl Into<String>) -> Diagnostic {
        Diagnostic {
            path: path.into(),
            line: pos.line,
            column: pos.column,
            message: message.into(),
        }
    }
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}:{}: error: {}",
            self.path, self.line, self.column, self.message
        )
    }
}

/// Renders a JSON pointer (`/spec/providers/0/uri`) as a field path (`spec.providers[0].uri`).
pub fn field_path(pointer: &str) -> String {
    let mut out = String::new();
    for seg in pointer.split('/').skip(1) {
        let seg = seg.replace("~1", "/").replace("~0", "~");
        if !seg.is_empty() && seg.bytes().all(|b| b.is_ascii_digit()) {
            out.push('[');
            out.push_str(&seg);
            out.push(']');
        } else {
            if !out.is_empty() {
                out.push('.');
            }
            out.push_str(&seg);
        }
    }
    if out.is_empty() {
        "the document".to_owned()
    } else {
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_field_paths() {
        assert_eq!(field_path("/spec/providers/0/uri"), "spec.providers[0].uri");
        assert_eq!(field_path(""), "the document");
        assert_eq!(field_path("/metadata/labels/a~1b"), "metadata.labels.a/b");
    }
}
