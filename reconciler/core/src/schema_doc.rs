//! The field-by-field reference (`docs/reference.md`), rendered from the same JSON Schemas
//! fleet validates against, so the two cannot drift: a test compares the committed page
//! with a fresh rendering (`UPDATE_EXPECT=1` rewrites it).

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde_json::Value;

use crate::spec::Kind;

/// Where a kind's files live.
fn location(kind: Kind) -> &'static str {
    match kind {
        Kind::Fleet => "`fleet/fleet.yaml`",
        Kind::Loadout => "`fleet/loadouts/*.yaml`",
        Kind::Vm => "`fleet/vms/*.yaml`",
        Kind::VmPool => "`fleet/vms/*.yaml`",
        Kind::Task => "`fleet/tasks/*.yaml`",
        Kind::Answer => "`fleet/hitl/*.yaml`",
        Kind::Secret => "`fleet/secrets/*.yaml`",
        Kind::Workspace => "`fleet/workspaces/*.yaml`",
        Kind::Host => "`/etc/fleet/host.yaml`, on the host, never in a repository",
    }
}

/// The whole page.
pub fn render() -> String {
    let mut out = String::from(
        "# Field reference\n\n\
         Every field of every kind, generated from the JSON Schemas in `schema/` (what `fleet \
         validate` checks files against) by a test that fails when this page and the schemas \
         differ: `UPDATE_EXPECT=1 cargo test -p fleet-core committed_reference` rewrites it. \
         Point an editor at the schemas with a modeline: `# yaml-language-server: \
         $schema=../../schema/vm.schema.json`.\n\n\
         Fields not marked required may be left out; the description gives the default. Value \
         types used by several fields (sizes, durations, names) are described once, at the \
         end.\n",
    );
    let mut leaves = BTreeMap::new();
    for kind in Kind::ALL {
        let schema = crate::spec::schema_for(kind);
        let defs = schema["$defs"].as_object().cloned().unwrap_or_default();
        let _ = write!(
            out,
            "\n## {} ({})\n\nSchema: `schema/{}`.",
            kind.as_str(),
            location(kind),
            kind.schema_file()
        );
        if let Some(text) = schema["description"].as_str() {
            let _ = write!(out, " {}", one_line(text));
        }
        out.push_str("\n\n| Field | Type | Description |\n|---|---|---|\n");
        let mut rows = Vec::new();
        fields(&schema, &defs, "", &mut Vec::new(), &mut rows, &mut leaves);
        for (path, kind, description) in rows {
            let _ = writeln!(out, "| `{path}` | {kind} | {description} |");
        }
    }
    out.push_str("\n## Value types\n\n| Type | Description |\n|---|---|\n");
    for (name, description) in leaves {
        let _ = writeln!(out, "| {name} | {description} |");
    }
    out
}

type Defs = serde_json::Map<String, Value>;
type Row = (String, String, String);

/// The definition `node` refers to (itself when it refers to none), with the name of the
/// definition if any. `anyOf: [X, null]` (an optional field) is X.
fn resolve<'a>(node: &'a Value, defs: &'a Defs) -> (&'a Value, Option<&'a str>) {
    if let Some(name) = node["$ref"]
        .as_str()
        .and_then(|r| r.strip_prefix("#/$defs/"))
    {
        return (defs.get(name).unwrap_or(node), Some(name));
    }
    if let Some(options) = node["anyOf"].as_array() {
        let real: Vec<&Value> = options.iter().filter(|o| o["type"] != "null").collect();
        if let [only] = real.as_slice() {
            return resolve(only, defs);
        }
    }
    (node, None)
}

/// Rows for each property of `node` (an object schema), recursing into objects and lists
/// of objects; `seen` stops a definition from recursing into itself.
fn fields(
    node: &Value,
    defs: &Defs,
    prefix: &str,
    seen: &mut Vec<String>,
    rows: &mut Vec<Row>,
    leaves: &mut BTreeMap<String, String>,
) {
    let (node, _) = resolve(node, defs);
    if let Some(forms) = node["oneOf"].as_array() {
        for form in forms {
            let (form, _) = resolve(form, defs);
            let tag = form["properties"]["type"]["const"]
                .as_str()
                .map_or_else(String::new, |t| format!("({t})"));
            let at = match prefix.strip_suffix("[]") {
                Some(list) => format!("{list}[{}]", tag.trim_matches(['(', ')'])),
                None => format!("{prefix}{tag}"),
            };
            fields(form, defs, &at, seen, rows, leaves);
        }
        return;
    }
    let required: Vec<&str> = node["required"]
        .as_array()
        .map(|r| r.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    let Some(properties) = node["properties"].as_object() else {
        return;
    };
    for (name, property) in properties {
        let path = if prefix.is_empty() {
            name.clone()
        } else {
            format!("{prefix}.{name}")
        };
        let (target, def) = resolve(property, defs);
        let mut description = property["description"]
            .as_str()
            .or_else(|| target["description"].as_str())
            .map(one_line)
            .unwrap_or_default();
        if required.contains(&name.as_str()) {
            description = format!("**Required.** {description}");
        }
        if let Some(default) = property.get("default") {
            let _ = write!(description, " Default `{}`.", plain(default));
        }
        let (kind, inner, inner_path) = type_of(target, def, defs, leaves);
        rows.push((path.clone(), kind, description.trim().to_owned()));
        if let Some(inner) = inner {
            let key = def.map_or_else(|| path.clone(), str::to_owned);
            if seen.contains(&key) {
                continue;
            }
            seen.push(key);
            fields(
                inner,
                defs,
                &format!("{path}{inner_path}"),
                seen,
                rows,
                leaves,
            );
            seen.pop();
        }
    }
}

/// A field's type for people, and the object schema to recurse into (with the path suffix:
/// `[]` for a list's items, `.<key>` for a map's values).
fn type_of<'a>(
    node: &'a Value,
    def: Option<&str>,
    defs: &'a Defs,
    leaves: &mut BTreeMap<String, String>,
) -> (String, Option<&'a Value>, &'static str) {
    if let Some(values) = enum_values(node) {
        return (format!("one of {}", values.join(", ")), None, "");
    }
    if node["oneOf"].is_array() {
        // A tagged union of objects (providers): each form's fields are listed under it.
        return ("object, by `type`".into(), Some(node), "");
    }
    if node["properties"].is_object() {
        return ("object".into(), Some(node), "");
    }
    if let Some(forms) = node["anyOf"].as_array() {
        // Several shapes (`vm: NAME` or `vm: {pool, fresh}`): named, not expanded.
        let names: Vec<String> = forms
            .iter()
            .filter(|f| f["type"] != "null")
            .map(|f| {
                let (f, def) = resolve(f, defs);
                type_of(f, def, defs, leaves).0
            })
            .collect();
        return (names.join(" or "), None, "");
    }
    let types: Vec<&str> = match &node["type"] {
        Value::String(t) => vec![t.as_str()],
        Value::Array(ts) => ts
            .iter()
            .filter_map(Value::as_str)
            .filter(|t| *t != "null")
            .collect(),
        _ => Vec::new(),
    };
    match types.first().copied() {
        Some("array") => {
            let (items, item_def) = resolve(&node["items"], defs);
            let (item, inner, _) = type_of(items, item_def, defs, leaves);
            (format!("list of {item}"), inner, "[]")
        }
        Some("object") => match node.get("additionalProperties") {
            Some(values) if values.is_object() => {
                let (values, value_def) = resolve(values, defs);
                let (value, inner, _) = type_of(values, value_def, defs, leaves);
                (format!("map of {value}"), inner, ".<key>")
            }
            _ => ("object".into(), None, ""),
        },
        Some(scalar) => match def {
            // A named string type (Size, Duration, Name…): described once, at the end.
            Some(name) if scalar == "string" => {
                let mut text = node["description"]
                    .as_str()
                    .map(one_line)
                    .unwrap_or_default();
                if let Some(pattern) = node["pattern"].as_str() {
                    let _ = write!(text, " Pattern `{pattern}`.");
                }
                leaves.insert(name.to_owned(), text.trim().to_owned());
                (name.to_owned(), None, "")
            }
            _ => {
                let mut kind = scalar.to_owned();
                match (node.get("minimum"), node.get("maximum")) {
                    (Some(min), Some(max)) => {
                        let _ = write!(kind, " ({}–{})", plain(min), plain(max));
                    }
                    (None, Some(max)) => {
                        let _ = write!(kind, " (at most {})", plain(max));
                    }
                    (Some(min), None) if min != 0 => {
                        let _ = write!(kind, " (at least {})", plain(min));
                    }
                    _ => {}
                }
                (kind, None, "")
            }
        },
        None => ("any".into(), None, ""),
    }
}

/// The values of an enumeration (`enum`, `const`, or `oneOf` of those), quoted.
fn enum_values(node: &Value) -> Option<Vec<String>> {
    if let Some(c) = node.get("const") {
        return Some(vec![format!("`{}`", plain(c))]);
    }
    if let Some(values) = node["enum"].as_array() {
        return Some(values.iter().map(|v| format!("`{}`", plain(v))).collect());
    }
    let variants = node["oneOf"].as_array()?;
    let mut all = Vec::new();
    for variant in variants {
        all.extend(enum_values(variant)?);
    }
    Some(all)
}

fn plain(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// A description on one table row: line breaks joined, pipes escaped.
fn one_line(text: &str) -> String {
    text.split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
        .replace('|', "\\|")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn committed_reference_matches_the_schemas() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/reference.md");
        expect_test::expect_file![path].assert_eq(&render());
    }

    #[test]
    fn the_reference_names_nested_fields_with_their_types() {
        let page = render();
        for row in [
            "| `spec.resources.memory` | Size |",
            "| `spec.network.mode` | one of `isolated`, `full`, `brokered` |",
            "| `metadata.name` | Name | **Required.**",
            "| `spec.policy.retention.logFiles` | integer (1–100) |",
        ] {
            assert!(page.contains(row), "{row}");
        }
    }
}
