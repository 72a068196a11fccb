//! The ownership stamp in a Proxmox VM's description, and the marker in fleet's snippets.
//!
//! The description is free text an operator may read in the web UI, so the stamp is one
//! line, `fleet-stamp: <base64 of the stamp's JSON>`, under a sentence saying what it is.
//! PVE limits descriptions to 8 KiB; a stamp whose configuration copy would not fit keeps
//! everything but that copy (plans then name fewer fields, ownership is unaffected).

use base64::Engine;
use base64::engine::general_purpose::STANDARD;

use crate::observe::Stamp;

const PREFIX: &str = "fleet-stamp: ";
/// Room left in PVE's 8 KiB description for the sentence above the stamp.
const MAX_STAMP_LINE: usize = 7 * 1024;

pub fn render(stamp: &Stamp) -> String {
    let mut line = encode(stamp);
    if line.len() > MAX_STAMP_LINE {
        let mut slim = stamp.clone();
        slim.config = None;
        line = encode(&slim);
    }
    format!(
        "Managed by fleet {:?} as VM {:?}; changes made here are undone by the next apply.\n{line}\n",
        stamp.fleet, stamp.name
    )
}

fn encode(stamp: &Stamp) -> String {
    let json = serde_json::to_vec(stamp).expect("a stamp is JSON");
    format!("{PREFIX}{}", STANDARD.encode(json))
}

/// The stamp in a description, if it has a readable one.
pub fn parse(description: &str) -> Option<Stamp> {
    let line = description
        .lines()
        .find_map(|l| l.trim().strip_prefix(PREFIX))?;
    let json = STANDARD.decode(line.trim()).ok()?;
    serde_json::from_slice(&json).ok()
}

/// The second line of every snippet fleet writes.
pub fn snippet_marker(fleet: &str, vm: &str) -> String {
    format!("# fleet: {fleet}/{vm} (written by fleet; holds no secret)")
}

/// Whether a snippet's text is fleet's for this VM.
pub fn snippet_is(text: &str, fleet: &str, vm: &str) -> bool {
    text.lines().nth(1) == Some(snippet_marker(fleet, vm).as_str())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resolve::example_vm;

    fn stamp(files: usize) -> Stamp {
        let vm = example_vm("web-1", |c| {
            c.runcmd = vec!["x".repeat(100); files];
        });
        Stamp {
            fleet: "demo".into(),
            name: vm.name.clone(),
            spec_hash: vm.spec_hash.clone(),
            revision: "abc".into(),
            protect: true,
            config: Some(vm.config),
            created: None,
            adopted: false,
        }
    }

    #[test]
    fn stamps_round_trip_through_the_description() {
        let s = stamp(1);
        let text = render(&s);
        assert!(text.starts_with("Managed by fleet \"demo\""));
        assert_eq!(parse(&text), Some(s));
        // Operators add notes around it.
        assert!(parse(&format!("my notes\n\n{text}\nmore")).is_some());
        assert_eq!(parse("fleet-stamp: not base64!"), None);
        assert_eq!(parse("no stamp here"), None);
    }

    #[test]
    fn oversized_configuration_copies_are_dropped_not_truncated() {
        let s = stamp(200);
        let text = render(&s);
        assert!(text.len() < 8 * 1024, "{}", text.len());
        let parsed = parse(&text).expect("stamp");
        assert_eq!(parsed.config, None);
        assert_eq!(parsed.spec_hash, s.spec_hash);
        assert!(parsed.protect);
    }

    #[test]
    fn snippets_are_recognised_by_their_marker() {
        let text = format!(
            "#cloud-config\n{}\nruncmd: []\n",
            snippet_marker("demo", "a")
        );
        assert!(snippet_is(&text, "demo", "a"));
        assert!(!snippet_is(&text, "demo", "b"));
        assert!(!snippet_is(&text, "other", "a"));
    }
}
