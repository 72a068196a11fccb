//! JSON Schema validation with the committed `schema/*.schema.json` (compiled into the
//! binary), and translation of schema errors into messages that name the field and say
//! what would be valid.

use std::collections::BTreeMap;
use std::sync::OnceLock;

use jsonschema::error::ValidationErrorKind;
use jsonschema::{ValidationError, Validator};
use serde_json::Value;

use super::diagnostic::field_path;
use crate::spec::Kind;

/// One schema violation: the instance pointer, whether it points at a key, and the message.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Violation {
    pub pointer: String,
    pub at_key: bool,
    pub message: String,
}

struct Compiled {
    schema: Value,
    validator: Validator,
}

fn committed_schema(kind: Kind) -> &'static str {
    match kind {
        Kind::Fleet => include_str!("../../../../schema/fleet.schema.json"),
        Kind::Loadout => include_str!("../../../../schema/loadout.schema.json"),
        Kind::Vm => include_str!("../../../../schema/vm.schema.json"),
        Kind::VmPool => include_str!("../../../../schema/vmpool.schema.json"),
        Kind::Task => include_str!("../../../../schema/task.schema.json"),
        Kind::Answer => include_str!("../../../../schema/answer.schema.json"),
        Kind::Secret => include_str!("../../../../schema/secret.schema.json"),
        Kind::Workspace => include_str!("../../../../schema/workspace.schema.json"),
        Kind::Host => include_str!("../../../../schema/host.schema.json"),
    }
}

fn compiled(kind: Kind) -> &'static Compiled {
    static CACHE: OnceLock<BTreeMap<Kind, Compiled>> = OnceLock::new();
    let all = CACHE.get_or_init(|| {
        Kind::ALL
            .into_iter()
            .map(|k| {
                let schema: Value = serde_json::from_str(committed_schema(k))
                    .expect("committed schemas are valid JSON (checked by a test)");
                let validator = jsonschema::draft202012::new(&schema)
                    .expect("committed schemas compile (checked by a test)");
                (k, Compiled { schema, validator })
            })
            .collect()
    });
    &all[&kind]
}

/// Validates `instance` against the schema of `kind`; returns every violation.
pub fn validate(kind: Kind, instance: &Value) -> Vec<Violation> {
    let compiled = compiled(kind);
    let mut out = Vec::new();
    for err in compiled.validator.iter_errors(instance) {
        explain(&compiled.schema, &err, &mut out);
    }
    if kind == Kind::Secret {
        out.iter_mut()
            .for_each(|v| never_echo_secret_values(instance, v));
    }
    out.sort();
    out.dedup();
    out
}

/// A Secret's `data` values are ciphertext, or a value someone committed in the clear by
/// mistake: a diagnostic about one must not repeat it (diagnostics reach terminals, logs and
/// the status directory).
fn never_echo_secret_values(instance: &Value, v: &mut Violation) {
    let Some(rest) = v.pointer.strip_prefix("/spec/data/") else {
        return;
    };
    let key = rest
        .split('/')
        .next()
        .unwrap_or_default()
        .replace("~1", "/")
        .replace("~0", "~");
    let name = instance
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or("NAME");
    v.message = if v.at_key {
        format!(
            "spec.data: key {key:?} is not valid; keys use letters, digits, `_`, `.` and `-` (at most 64)"
        )
    } else {
        format!(
            "spec.data.{key}: not an ASCII-armored age value; encrypt it with `fleet secret set {name} {key}` (a value in the clear is never accepted nor repeated here; if one was committed, change it at its source)"
        )
    };
}

/// Fields a repository once held that now belong to the host configuration: a revision
/// carrying one gets told where it went, not just that it is unknown.
fn moved_to_host(pointer: &str) -> Option<&'static str> {
    const CONNECTION: [&str; 10] = [
        "uri",
        "storageDir",
        "endpoint",
        "node",
        "token",
        "caFile",
        "insecureSkipVerify",
        "storage",
        "bridge",
        "snippets",
    ];
    let mut parts = pointer.trim_start_matches('/').split('/');
    match (
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
    ) {
        (Some("spec"), Some("providers"), Some(_), Some(field), None)
            if CONNECTION.contains(&field) =>
        {
            Some(
                "belongs in the host configuration, not the repository: how to reach a provider, where it stores files and which credentials it uses are the host's to say (fleet.yaml keeps only name, type and domainType); move it to the provider of that name in /etc/fleet/host.yaml",
            )
        }
        (Some("spec"), Some("policy"), Some("recipients"), None, None)
        | (Some("spec"), Some("recipients"), None, None, None) => Some(
            "belongs in the host configuration (recipients): a commit must not choose who can read every secret; move it to /etc/fleet/host.yaml",
        ),
        _ => None,
    }
}

fn explain(schema: &Value, err: &ValidationError<'_>, out: &mut Vec<Violation>) {
    let pointer = err.instance_path().as_str().to_owned();
    let field = field_path(&pointer);
    let (pointer, at_key, message) = match err.kind() {
        ValidationErrorKind::AdditionalProperties { unexpected } => {
            let valid = valid_properties(schema, err.schema_path().as_str());
            for name in unexpected {
                let child = format!("{pointer}/{}", name.replace('~', "~0").replace('/', "~1"));
                let message = match moved_to_host(&child) {
                    Some(hint) => format!("{}: {hint}", field_path(&child)),
                    None => format!(
                        "{}: unknown field; {}",
                        field_path(&child),
                        describe_valid_fields(&valid, name)
                    ),
                };
                out.push(Violation {
                    pointer: child,
                    at_key: true,
                    message,
                });
            }
            return;
        }
        ValidationErrorKind::Required { property } => {
            let name = property.as_str().unwrap_or("?");
            let where_ = if pointer.is_empty() {
                "the document".to_owned()
            } else {
                field
            };
            (
                pointer,
                false,
                format!("{where_}: missing required field `{name}`"),
            )
        }
        ValidationErrorKind::OneOfNotValid { context } | ValidationErrorKind::AnyOf { context }
            if enum_of_consts(context).is_some() =>
        {
            // Enums whose values carry descriptions are a oneOf of consts: list them all.
            let values = enum_of_consts(context).unwrap_or_default();
            (
                pointer,
                false,
                format!(
                    "{field}: {} is not valid; valid: {}",
                    describe_value(err.instance()),
                    values.join(", ")
                ),
            )
        }
        ValidationErrorKind::OneOfNotValid { context } | ValidationErrorKind::AnyOf { context } => {
            // Tagged unions (providers): report the branch whose tag matched, if any. A
            // branch of another type than the value (a task's `vm` is a name or a mapping)
            // is never the one meant.
            let of_its_type = |branch: &&Vec<_>| {
                !branch.iter().any(|e: &jsonschema::ValidationError| {
                    e.instance_path() == err.instance_path()
                        && matches!(e.kind(), ValidationErrorKind::Type { .. })
                })
            };
            let mut candidates: Vec<&Vec<_>> = context.iter().filter(of_its_type).collect();
            if candidates.is_empty() {
                candidates = context.iter().collect();
            }
            let matching = candidates.into_iter().find(|branch| {
                !branch.iter().any(|e| {
                    e.instance_path().as_str().ends_with("/type")
                        && matches!(
                            e.kind(),
                            ValidationErrorKind::Constant { .. } | ValidationErrorKind::Enum { .. }
                        )
                })
            });
            match matching {
                Some(branch) => {
                    for e in branch {
                        explain(schema, e, out);
                    }
                    return;
                }
                None => {
                    let tags: Vec<String> = context
                        .iter()
                        .flatten()
                        .filter(|e| e.instance_path().as_str().ends_with("/type"))
                        .filter_map(|e| match e.kind() {
                            ValidationErrorKind::Constant { expected_value } => {
                                expected_value.as_str().map(str::to_owned)
                            }
                            _ => None,
                        })
                        .collect();
                    let type_pointer = format!("{pointer}/type");
                    let has_type = err.instance().get("type").is_some();
                    let message = if tags.is_empty() {
                        format!("{field}: does not match any allowed form")
                    } else if has_type {
                        format!(
                            "{}: unsupported value {}; valid: {}",
                            field_path(&type_pointer),
                            err.instance()["type"],
                            tags.join(", ")
                        )
                    } else {
                        format!(
                            "{field}: missing required field `type`; valid: {}",
                            tags.join(", ")
                        )
                    };
                    let p = if has_type { type_pointer } else { pointer };
                    (p, false, message)
                }
            }
        }
        ValidationErrorKind::Type { kind } => (
            pointer,
            false,
            format!(
                "{field}: expected {}, found {}",
                type_name(kind),
                describe_value(err.instance())
            ),
        ),
        ValidationErrorKind::Enum { options } => (
            pointer,
            false,
            format!(
                "{field}: {} is not valid; valid: {}",
                describe_value(err.instance()),
                list_options(options)
            ),
        ),
        ValidationErrorKind::Constant { expected_value } => (
            pointer,
            false,
            format!(
                "{field}: {} is not valid; expected {}",
                describe_value(err.instance()),
                expected_value
            ),
        ),
        ValidationErrorKind::Pattern { .. } => {
            let hint = pattern_hint(schema, err.schema_path().as_str());
            (
                pointer,
                false,
                format!(
                    "{field}: {} is not valid; {hint}",
                    describe_value(err.instance())
                ),
            )
        }
        ValidationErrorKind::Minimum { limit }
        | ValidationErrorKind::ExclusiveMinimum { limit } => (
            pointer,
            false,
            format!(
                "{field}: {} is too small; the minimum is {limit}",
                err.instance()
            ),
        ),
        ValidationErrorKind::Maximum { limit }
        | ValidationErrorKind::ExclusiveMaximum { limit } => (
            pointer,
            false,
            format!(
                "{field}: {} is too large; the maximum is {limit}",
                err.instance()
            ),
        ),
        ValidationErrorKind::MinItems { limit } => (
            pointer,
            false,
            format!("{field}: needs at least {limit} item(s)"),
        ),
        ValidationErrorKind::MinLength { limit } => (
            pointer,
            false,
            format!("{field}: must be at least {limit} character(s) long"),
        ),
        ValidationErrorKind::MaxLength { limit } => (
            pointer,
            false,
            format!("{field}: must be at most {limit} characters long"),
        ),
        _ => (pointer, false, format!("{field}: {err}")),
    };
    out.push(Violation {
        pointer,
        at_key,
        message,
    });
}

/// The allowed values when every branch of a oneOf is a single `const`.
fn enum_of_consts(context: &[Vec<ValidationError<'static>>]) -> Option<Vec<String>> {
    let mut values = Vec::new();
    for branch in context {
        match branch.as_slice() {
            [e] => match e.kind() {
                ValidationErrorKind::Constant { expected_value } => values.push(
                    expected_value
                        .as_str()
                        .map(str::to_owned)
                        .unwrap_or_else(|| expected_value.to_string()),
                ),
                _ => return None,
            },
            _ => return None,
        }
    }
    (!values.is_empty()).then_some(values)
}

/// Follows a schema path (`/properties/spec/$ref/properties/resources/additionalProperties`)
/// through `$ref`s to the object schema that owns the keyword and lists its properties.
fn valid_properties(schema: &Value, schema_path: &str) -> Vec<String> {
    let Some(owner) = schema_at(schema, schema_path, 1) else {
        return Vec::new();
    };
    owner
        .get("properties")
        .and_then(Value::as_object)
        .map(|p| p.keys().cloned().collect())
        .unwrap_or_default()
}

/// The human description of the pattern a string failed, taken from the schema.
fn pattern_hint(schema: &Value, schema_path: &str) -> String {
    schema_at(schema, schema_path, 1)
        .and_then(|owner| owner.get("description"))
        .and_then(Value::as_str)
        .map(|d| format!("expected {}", lower_first(d.trim_end_matches('.'))))
        .or_else(|| {
            schema_at(schema, schema_path, 0)
                .and_then(Value::as_str)
                .map(|p| format!("it must match {p}"))
        })
        .unwrap_or_else(|| "it does not match the expected format".to_owned())
}

fn lower_first(s: &str) -> String {
    let mut c = s.chars();
    match c.next() {
        Some(f) => f.to_lowercase().collect::<String>() + c.as_str(),
        None => String::new(),
    }
}

/// Walks `schema_path` (dropping its last `drop_last` segments), following `$ref`s.
fn schema_at<'a>(root: &'a Value, schema_path: &str, drop_last: usize) -> Option<&'a Value> {
    let segments: Vec<&str> = schema_path.split('/').skip(1).collect();
    let keep = segments.len().checked_sub(drop_last)?;
    let mut node = root;
    for seg in &segments[..keep] {
        if *seg == "$ref" {
            let target = node.get("$ref")?.as_str()?;
            node = root.pointer(target.strip_prefix('#')?)?;
        } else {
            let seg = seg.replace("~1", "/").replace("~0", "~");
            node = match node {
                Value::Object(m) => m.get(&seg)?,
                Value::Array(a) => a.get(seg.parse::<usize>().ok()?)?,
                _ => return None,
            };
        }
    }
    // A trailing $ref object stands for its target.
    while let Some(target) = node.get("$ref").and_then(Value::as_str) {
        node = root.pointer(target.strip_prefix('#')?)?;
    }
    Some(node)
}

fn describe_valid_fields(valid: &[String], unexpected: &str) -> String {
    if valid.is_empty() {
        return "this mapping takes no fields".to_owned();
    }
    let close = valid
        .iter()
        .find(|v| strsim_close(v, unexpected))
        .map(|v| format!("did you mean `{v}`? "))
        .unwrap_or_default();
    format!(
        "{close}valid fields: {}",
        valid
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>()
            .join(", ")
    )
}

/// Cheap "did you mean": same letters up to one edit or a case difference.
fn strsim_close(a: &str, b: &str) -> bool {
    if a.eq_ignore_ascii_case(b) {
        return true;
    }
    let (a, b): (Vec<char>, Vec<char>) = (a.chars().collect(), b.chars().collect());
    if a.len().abs_diff(b.len()) > 1 {
        return false;
    }
    // Levenshtein distance ≤ 2 with a two-row table; names are short.
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.iter().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            let cost = usize::from(ca != cb);
            cur[j + 1] = (prev[j] + cost).min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()] <= 2
}

fn type_name(kind: &jsonschema::error::TypeKind) -> String {
    use jsonschema::error::TypeKind;
    let name = |t: &jsonschema::JsonType| match t.to_string().as_str() {
        "object" => "a mapping".to_owned(),
        "array" => "a list".to_owned(),
        "string" => "a string".to_owned(),
        "integer" => "a whole number".to_owned(),
        "number" => "a number".to_owned(),
        "boolean" => "true or false".to_owned(),
        "null" => "nothing".to_owned(),
        other => other.to_owned(),
    };
    match kind {
        TypeKind::Single(t) => name(t),
        // Optional fields allow null; "expected nothing or a number" helps nobody.
        TypeKind::Multiple(ts) => ts
            .iter()
            .filter(|t| t.to_string() != "null")
            .map(|t| name(&t))
            .collect::<Vec<_>>()
            .join(" or "),
    }
}

fn describe_value(v: &Value) -> String {
    match v {
        Value::Null => "nothing (null)".to_owned(),
        Value::Bool(b) => format!("boolean {b}"),
        Value::Number(n) => format!("number {n}"),
        Value::String(s) => format!("string {:?}", truncate(s, 60)),
        Value::Array(_) => "a list".to_owned(),
        Value::Object(_) => "a mapping".to_owned(),
    }
}

fn truncate(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        s.to_owned()
    } else {
        s.chars().take(max).collect::<String>() + "…"
    }
}

fn list_options(options: &Value) -> String {
    match options {
        Value::Array(items) => items
            .iter()
            .map(|v| {
                v.as_str()
                    .map(str::to_owned)
                    .unwrap_or_else(|| v.to_string())
            })
            .collect::<Vec<_>>()
            .join(", "),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn committed_schemas_are_valid_2020_12() {
        for kind in Kind::ALL {
            let schema: Value = serde_json::from_str(committed_schema(kind)).expect("json");
            assert!(jsonschema::meta::is_valid(&schema), "{kind:?}");
        }
    }

    #[test]
    fn unknown_field_lists_valid_fields() {
        let v = validate(
            Kind::Vm,
            &json!({"apiVersion": "fleet/v1", "kind": "VM", "metadata": {"name": "a"},
                    "spec": {"provider": "p", "image": "i", "resources": {"memroy": "1Gi"}}}),
        );
        assert_eq!(v.len(), 1, "{v:?}");
        assert_eq!(v[0].pointer, "/spec/resources/memroy");
        assert!(v[0].at_key);
        assert_eq!(
            v[0].message,
            "spec.resources.memroy: unknown field; did you mean `memory`? valid fields: cpus, memory, disk"
        );
    }

    #[test]
    fn provider_type_is_explained() {
        let v = validate(
            Kind::Host,
            &json!({"apiVersion": "fleet/v1", "kind": "Host",
                    "spec": {"providers": [{"name": "x", "type": "vmware"}]}}),
        );
        assert_eq!(v.len(), 1, "{v:?}");
        assert_eq!(v[0].pointer, "/spec/providers/0/type");
        assert_eq!(
            v[0].message,
            "spec.providers[0].type: unsupported value \"vmware\"; valid: libvirt, proxmox"
        );
    }

    #[test]
    fn errors_inside_a_matching_provider_branch_are_reported() {
        let v = validate(
            Kind::Host,
            &json!({"apiVersion": "fleet/v1", "kind": "Host",
                    "spec": {"providers": [{"name": "x", "type": "libvirt", "uri": "qemu:///system", "storageDir": 7}]}}),
        );
        assert_eq!(v.len(), 1, "{v:?}");
        assert_eq!(v[0].pointer, "/spec/providers/0/storageDir");
        assert_eq!(
            v[0].message,
            "spec.providers[0].storageDir: expected a string, found number 7"
        );
    }

    #[test]
    fn connection_details_in_a_revision_are_sent_to_the_host_configuration() {
        let v = validate(
            Kind::Fleet,
            &json!({"apiVersion": "fleet/v1", "kind": "Fleet", "metadata": {"name": "a"},
                    "spec": {"providers": [{"name": "x", "type": "libvirt", "uri": "qemu+ext:///system?command=/tmp/x"}],
                             "policy": {"recipients": ["age1x"]}}}),
        );
        assert_eq!(v.len(), 2, "{v:?}");
        assert!(
            v[0].message
                .starts_with("spec.policy.recipients: belongs in the host configuration"),
            "{v:?}"
        );
        assert!(
            v[1].message
                .starts_with("spec.providers[0].uri: belongs in the host configuration"),
            "{v:?}"
        );
    }
}
