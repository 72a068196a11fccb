//! YAML text → a tree of values that remembers where each one was written.
//!
//! serde-saphyr parses (strict booleans, duplicate keys rejected, depth and size budgets);
//! the tree keeps the line and column of every key and value, so that schema and semantic
//! errors found later can point at `file:line:column`. The tree converts to a
//! `serde_json::Value` for JSON Schema validation and typed deserialisation.

use serde::Deserialize;
use serde::de::{self, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_saphyr::Spanned;

/// Files larger than this are refused before parsing.
pub const MAX_FILE_BYTES: usize = 1024 * 1024;
/// Nesting deeper than this is refused while parsing (no fleet object needs more than ~8).
pub const MAX_DEPTH: usize = 64;

/// A position in a file, 1-based. `Pos::START` is used for whole-file problems.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Pos {
    pub line: u64,
    pub column: u64,
}

impl Pos {
    pub const START: Pos = Pos { line: 1, column: 1 };

    fn from_location(loc: &serde_saphyr::Location) -> Pos {
        if loc.line() == 0 {
            Pos::START
        } else {
            Pos {
                line: loc.line(),
                column: loc.column().max(1),
            }
        }
    }
}

/// A YAML value with positions.
#[derive(Clone, Debug, PartialEq)]
pub enum Node {
    Null,
    Bool(bool),
    Number(serde_json::Number),
    String(String),
    Seq(Vec<Located>),
    /// Keys keep their own position, so "unknown field" can point at the key.
    Map(Vec<(Pos, String, Located)>),
}

/// A node and the position of its value.
#[derive(Clone, Debug, PartialEq)]
pub struct Located {
    pub pos: Pos,
    pub node: Node,
}

/// A problem found while parsing: where, and a one-line message.
#[derive(Clone, Debug, PartialEq)]
pub struct ParseError {
    pub pos: Pos,
    pub message: String,
}

/// Parses one YAML document. A file must hold exactly one document.
pub fn parse(text: &str) -> Result<Located, ParseError> {
    let options = serde_saphyr::options! {
        strict_booleans: true,
        with_snippet: false,
        budget: serde_saphyr::budget! { max_depth: MAX_DEPTH },
    };
    match serde_saphyr::from_str_with_options::<Spanned<NodeDe>>(text, options) {
        Ok(spanned) => Ok(spanned_to_located(spanned)),
        Err(err) => Err(parse_error(&err)),
    }
}

fn parse_error(err: &serde_saphyr::Error) -> ParseError {
    let pos = err
        .location()
        .map(|l| Pos::from_location(&l))
        .unwrap_or(Pos::START);
    let rendered = err.to_string();
    // serde-saphyr prefixes "line L column C: "; the position is printed separately.
    let first_line = rendered.lines().next().unwrap_or("invalid YAML").trim();
    let message = strip_position_prefix(first_line);
    ParseError {
        pos,
        message: humanise_parse_message(message),
    }
}

fn strip_position_prefix(s: &str) -> &str {
    let Some(rest) = s.strip_prefix("line ") else {
        return s;
    };
    // "line 3 column 7: message" or "line 3: message"
    match rest.find(": ") {
        Some(i)
            if rest[..i]
                .chars()
                .all(|c| c.is_ascii_digit() || c == ' ' || c.is_ascii_alphabetic()) =>
        {
            &rest[i + 2..]
        }
        _ => s,
    }
}

/// Rewrites serde-saphyr's messages for operators: no library API advice, no repeated
/// position (it is printed in front), and what to do.
fn humanise_parse_message(message: &str) -> String {
    let lower = message.to_ascii_lowercase();
    // The position is printed separately; drop the parser's own copy and what follows it.
    let core = match message.find(" at line ") {
        Some(i) => &message[..i],
        None => message,
    };
    if let Some(rest) = core.strip_prefix("duplicate mapping key: ") {
        let key = rest.split(',').next().unwrap_or(rest).trim();
        format!(
            "duplicate key `{key}`: each key may appear once per mapping; remove the repeated one"
        )
    } else if lower.contains("multiple yaml documents") {
        "this file holds several YAML documents (separated by ---); a file holds exactly one object, split them into separate files".to_owned()
    } else if lower.contains("budget breached") {
        "the document expands to too many values (anchors and aliases repeated over and over); fleet objects are small, write the values out".to_owned()
    } else if lower.contains("recursion limit") || lower.contains("depth") {
        format!("YAML nesting is too deep; fleet objects nest at most {MAX_DEPTH} levels")
    } else {
        format!("YAML syntax: {core}")
    }
}

fn spanned_to_located(spanned: Spanned<NodeDe>) -> Located {
    Located {
        pos: Pos::from_location(&spanned.referenced),
        node: spanned.value.0,
    }
}

impl Located {
    /// The value as plain JSON (for schema validation and typed deserialisation).
    pub fn to_json(&self) -> serde_json::Value {
        use serde_json::Value;
        match &self.node {
            Node::Null => Value::Null,
            Node::Bool(b) => Value::Bool(*b),
            Node::Number(n) => Value::Number(n.clone()),
            Node::String(s) => Value::String(s.clone()),
            Node::Seq(items) => Value::Array(items.iter().map(Located::to_json).collect()),
            Node::Map(entries) => Value::Object(
                entries
                    .iter()
                    .map(|(_, k, v)| (k.clone(), v.to_json()))
                    .collect(),
            ),
        }
    }

    /// The child at `key` of a mapping.
    pub fn get(&self, key: &str) -> Option<&Located> {
        match &self.node {
            Node::Map(entries) => entries.iter().find(|(_, k, _)| k == key).map(|(_, _, v)| v),
            _ => None,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match &self.node {
            Node::String(s) => Some(s),
            _ => None,
        }
    }

    /// Follows a JSON pointer (`/spec/resources/memory`) as far as it goes and returns the
    /// position of the deepest node reached. With `key_of_last`, a final mapping key points at
    /// the key rather than its value (for unknown-field errors).
    pub fn pos_at_pointer(&self, pointer: &str, key_of_last: bool) -> Pos {
        let mut node = self;
        let segments: Vec<String> = pointer
            .split('/')
            .skip(1)
            .map(|s| s.replace("~1", "/").replace("~0", "~"))
            .collect();
        for (i, seg) in segments.iter().enumerate() {
            let last = i + 1 == segments.len();
            let next = match &node.node {
                Node::Map(entries) => match entries.iter().find(|(_, k, _)| k == seg) {
                    Some((kpos, _, v)) if last && key_of_last => return *kpos,
                    Some((_, _, v)) => Some(v),
                    None => None,
                },
                Node::Seq(items) => seg.parse::<usize>().ok().and_then(|i| items.get(i)),
                _ => None,
            };
            match next {
                Some(n) => node = n,
                None => break,
            }
        }
        node.pos
    }
}

/// Deserialises any YAML value into a [`Node`], wrapping children in `Spanned` so each keeps
/// its position.
struct NodeDe(Node);

impl<'de> Deserialize<'de> for NodeDe {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(NodeVisitor).map(NodeDe)
    }
}

struct NodeVisitor;

impl<'de> Visitor<'de> for NodeVisitor {
    type Value = Node;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("any YAML value")
    }
    fn visit_unit<E: de::Error>(self) -> Result<Node, E> {
        Ok(Node::Null)
    }
    fn visit_none<E: de::Error>(self) -> Result<Node, E> {
        Ok(Node::Null)
    }
    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Node, D::Error> {
        d.deserialize_any(NodeVisitor)
    }
    fn visit_bool<E: de::Error>(self, v: bool) -> Result<Node, E> {
        Ok(Node::Bool(v))
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Node, E> {
        Ok(Node::Number(v.into()))
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Node, E> {
        Ok(Node::Number(v.into()))
    }
    fn visit_i128<E: de::Error>(self, v: i128) -> Result<Node, E> {
        Ok(Node::String(v.to_string()))
    }
    fn visit_u128<E: de::Error>(self, v: u128) -> Result<Node, E> {
        Ok(Node::String(v.to_string()))
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Node, E> {
        serde_json::Number::from_f64(v)
            .map(Node::Number)
            .ok_or_else(|| E::custom("numbers must be finite"))
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<Node, E> {
        Ok(Node::String(v.to_owned()))
    }
    fn visit_string<E: de::Error>(self, v: String) -> Result<Node, E> {
        Ok(Node::String(v))
    }
    fn visit_bytes<E: de::Error>(self, _: &[u8]) -> Result<Node, E> {
        Err(E::custom("binary values are not allowed in fleet files"))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Node, A::Error> {
        let mut items = Vec::new();
        while let Some(item) = seq.next_element::<Spanned<NodeDe>>()? {
            items.push(spanned_to_located(item));
        }
        Ok(Node::Seq(items))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Node, A::Error> {
        let mut entries = Vec::new();
        while let Some(key) = map.next_key::<Spanned<KeyDe>>()? {
            let value = map.next_value::<Spanned<NodeDe>>()?;
            entries.push((
                Pos::from_location(&key.referenced),
                key.value.0,
                spanned_to_located(value),
            ));
        }
        Ok(Node::Map(entries))
    }
}

/// Mapping keys: scalars rendered as strings (`1: x` has key "1"); anything else is refused.
struct KeyDe(String);

impl<'de> Deserialize<'de> for KeyDe {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        match deserializer.deserialize_any(NodeVisitor)? {
            Node::String(s) => Ok(KeyDe(s)),
            Node::Number(n) => Ok(KeyDe(n.to_string())),
            Node::Bool(b) => Ok(KeyDe(b.to_string())),
            Node::Null => Ok(KeyDe("null".into())),
            Node::Seq(_) | Node::Map(_) => Err(de::Error::custom(
                "mapping keys must be plain scalars, not lists or mappings",
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_positions_of_keys_and_values() {
        let doc = parse("a: 1\nspec:\n  memory: 2Gi\n  list:\n    - x\n    - y\n").expect("valid");
        assert_eq!(
            doc.pos_at_pointer("/spec/memory", false),
            Pos {
                line: 3,
                column: 11
            }
        );
        assert_eq!(
            doc.pos_at_pointer("/spec/memory", true),
            Pos { line: 3, column: 3 }
        );
        assert_eq!(
            doc.pos_at_pointer("/spec/list/1", false),
            Pos { line: 6, column: 7 }
        );
        assert_eq!(
            doc.to_json(),
            serde_json::json!({"a": 1, "spec": {"memory": "2Gi", "list": ["x", "y"]}})
        );
    }

    #[test]
    fn rejects_duplicate_keys_with_position() {
        let err = parse("a: 1\nb: 2\na: 3\n").expect_err("duplicate");
        assert_eq!(err.pos.line, 3, "{err:?}");
        assert!(err.message.contains("duplicate"), "{err:?}");
    }

    #[test]
    fn rejects_yaml11_booleans() {
        let err = parse("protect: yes\n").map(|d| d.to_json());
        // strict booleans: `yes` stays a string; the schema then rejects it as not a boolean.
        assert_eq!(err.expect("parses"), serde_json::json!({"protect": "yes"}));
    }

    #[test]
    fn rejects_deep_nesting_quickly() {
        let text = "[".repeat(100_000);
        let err = parse(&text).expect_err("too deep");
        assert_eq!(err.pos.line, 1);
    }
}
