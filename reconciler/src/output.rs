//! `-o text|json|yaml`: how a command that prints state prints it. Text is for people and
//! may change; JSON and YAML are the status files' own fields, for scripts.

use serde::Serialize;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    #[default]
    Text,
    Json,
    Yaml,
}

impl Output {
    /// With the `--json` some commands had before `-o`.
    pub fn or_json(self, json: bool) -> Output {
        if json { Output::Json } else { self }
    }

    /// `value` as JSON (pretty) or YAML, ending in a newline; `None` for text, which each
    /// command writes its own way.
    pub fn render(self, value: &impl Serialize) -> anyhow::Result<Option<String>> {
        Ok(match self {
            Output::Text => None,
            Output::Json => Some(serde_json::to_string_pretty(value)? + "\n"),
            Output::Yaml => Some(serde_saphyr::to_string(value)?),
        })
    }

    /// One record of a stream (an event): a JSON line, or a YAML document.
    pub fn record(self, value: &impl Serialize) -> anyhow::Result<Option<String>> {
        Ok(match self {
            Output::Text => None,
            Output::Json => Some(serde_json::to_string(value)? + "\n"),
            Output::Yaml => Some(format!("---\n{}", serde_saphyr::to_string(value)?)),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_and_yaml_hold_the_same_fields() {
        let value = serde_json::json!({"vm": "web-01", "phase": "Running", "cpus": 2});
        assert_eq!(Output::Text.render(&value).expect("text"), None);
        let json = Output::Json.render(&value).expect("json").expect("some");
        let back: serde_json::Value = serde_json::from_str(&json).expect("parses");
        assert_eq!(back, value);
        let yaml = Output::Yaml.render(&value).expect("yaml").expect("some");
        let back: serde_json::Value = serde_saphyr::from_str(&yaml).expect("parses");
        assert_eq!(back, value);
        let doc = Output::Yaml.record(&value).expect("yaml").expect("some");
        assert!(doc.starts_with("---\n"), "{doc}");
        assert_eq!(Output::Json.or_json(false), Output::Json);
        assert_eq!(Output::Text.or_json(true), Output::Json);
    }
}
