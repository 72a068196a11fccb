//! One file of a revision: which kinds its place holds, then bytes → YAML (with positions)
//! → JSON Schema → a typed object, with every problem located.

use super::objects::check_object;
use super::*;

/// The message for a YAML file outside the places fleet objects live.
pub(super) const MISPLACED: &str = "unexpected file: fleet objects live in fleet.yaml, loadouts/, vms/, tasks/, secrets/, workspaces/ and hitl/; move or remove it";

/// Which kinds may live where under `fleet/`; `None` for a place no kind lives.
pub(super) fn expected_kinds(rel: &str) -> Option<&'static [Kind]> {
    if rel == "fleet.yaml" {
        return Some(&[Kind::Fleet]);
    }
    match rel.split('/').next() {
        Some("loadouts") if rel.contains('/') => Some(&[Kind::Loadout]),
        Some("vms") if rel.contains('/') => Some(&[Kind::Vm, Kind::VmPool]),
        Some("tasks") if rel.contains('/') => Some(&[Kind::Task]),
        Some("hitl") if rel.contains('/') => Some(&[Kind::Answer]),
        Some("secrets") if rel.contains('/') => Some(&[Kind::Secret]),
        Some("workspaces") if rel.contains('/') => Some(&[Kind::Workspace]),
        _ => None,
    }
}

pub(super) fn load_file(
    path: &str,
    rel: &str,
    expected: &[Kind],
    bytes: &[u8],
    diags: &mut Vec<Diagnostic>,
) -> Option<AnyObject> {
    // Problems of the file as a whole name no field: they point at a place in it.
    let mut refuse = |pos: Pos, message: String| {
        diags.push(Diagnostic::new(path, pos, message));
        None
    };
    if bytes.len() > yaml::MAX_FILE_BYTES {
        return refuse(
            Pos::START,
            format!(
                "file is larger than {} KiB; fleet objects are small, split it or remove what does not belong",
                yaml::MAX_FILE_BYTES / 1024
            ),
        );
    }
    let text = match std::str::from_utf8(bytes) {
        Ok(t) => t,
        Err(e) => {
            let valid = &bytes[..e.valid_up_to()];
            let line = valid.iter().filter(|&&b| b == b'\n').count() as u64 + 1;
            let line_start = valid.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
            let column = String::from_utf8_lossy(&valid[line_start..])
                .chars()
                .count() as u64
                + 1;
            return refuse(
                Pos { line, column },
                "file is not valid UTF-8; save it as UTF-8 text".into(),
            );
        }
    };
    let tree = match yaml::parse(text) {
        Ok(t) => t,
        Err(e) => return refuse(e.pos, e.message),
    };
    if !matches!(tree.node, yaml::Node::Map(_)) {
        return refuse(
            tree.pos,
            "the document must be a mapping with apiVersion, kind, metadata and spec".into(),
        );
    }
    let kind_names = expected
        .iter()
        .map(|k| k.as_str())
        .collect::<Vec<_>>()
        .join(" or ");
    let kind = match tree.get("kind") {
        None => {
            return refuse(
                tree.pos,
                format!("missing required field `kind`; a file here holds kind {kind_names}"),
            );
        }
        Some(k) => match k.as_str().and_then(Kind::parse) {
            Some(kind) if expected.contains(&kind) => kind,
            Some(kind) => {
                return refuse(
                    k.pos,
                    format!(
                        "kind: {} does not belong in {rel}; a file here holds kind {kind_names}",
                        kind.as_str()
                    ),
                );
            }
            None => {
                return refuse(
                    k.pos,
                    format!(
                        "kind: {} is not a fleet kind; valid here: {kind_names}",
                        k.to_json()
                    ),
                );
            }
        },
    };
    let value = tree.to_json();
    let violations = schema::validate(kind, &value);
    if !violations.is_empty() {
        for v in violations {
            diags.push(Diagnostic::new(
                path,
                tree.pos_at_pointer(&v.pointer, v.at_key),
                v.message,
            ));
        }
        return None;
    }
    let object = match kind {
        Kind::Fleet => typed(path, tree, value, diags).map(AnyObject::Fleet),
        Kind::Loadout => typed(path, tree, value, diags).map(AnyObject::Loadout),
        Kind::Vm => typed(path, tree, value, diags).map(AnyObject::Vm),
        Kind::VmPool => typed(path, tree, value, diags).map(AnyObject::VmPool),
        Kind::Task => typed(path, tree, value, diags).map(|o| AnyObject::Task(Box::new(o))),
        Kind::Answer => typed(path, tree, value, diags).map(AnyObject::Answer),
        Kind::Secret => typed(path, tree, value, diags).map(AnyObject::Secret),
        Kind::Workspace => typed(path, tree, value, diags).map(AnyObject::Workspace),
        Kind::Host => typed(path, tree, value, diags).map(|o| AnyObject::Host(Box::new(o))),
    }?;
    check_object(&object, diags);
    Some(object)
}

fn typed<T: DeserializeOwned>(
    path: &str,
    tree: Located,
    value: serde_json::Value,
    diags: &mut Vec<Diagnostic>,
) -> Option<Object<T>> {
    match serde_json::from_value::<T>(value) {
        Ok(doc) => Some(Object {
            path: path.to_owned(),
            tree,
            doc,
        }),
        Err(e) => {
            // The schema is generated from these types, so this means they drifted apart.
            diags.push(Diagnostic::new(
                path,
                tree.pos,
                format!("internal error: the schema accepted this file but fleet could not read it ({e}); please report it"),
            ));
            None
        }
    }
}

/// Why `path` is not a plain relative path (absolute, empty, `.` or `..` parts, a
/// backslash), if it is not one. Such a path is checked again against the real directory
/// where it is used: this is the lexical half.
pub fn relative_path_problem(path: &str) -> Option<&'static str> {
    if path.starts_with('/') {
        Some("an absolute path")
    } else if path.contains('\\') || path.contains('\0') {
        Some("a backslash or NUL in a path")
    } else if path
        .split('/')
        .any(|part| part.is_empty() || part == "." || part == "..")
    {
        Some("empty, `.` or `..` parts in a path")
    } else {
        None
    }
}
