//! The map kept true by test: the rules `docs/ARCHITECTURE.md` states about where code may
//! do what are checked here against the sources, so breaking one fails `cargo test`.
//!
//! - the core crate (`reconciler/core`) reads no files, clocks, processes or environment
//!   and names no I/O crate;
//! - git2 is used only by `source` and `tasks::repo`;
//! - an `Event` is made only by its constructors (`status/event.rs`);
//! - every module under `src/` is on the code map;
//! - a module's `//!` doc names only types (and variants) the code uses.
//!
//! Each check is a function of (path, text), so the checks themselves are tested on
//! fixtures that break them.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// Where the workspace's modules live.
const SOURCE_DIRS: [&str; 3] = ["reconciler/src", "reconciler/core/src", "guest-agent/src"];

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the workspace holds reconciler/")
        .to_path_buf()
}

/// Every `.rs` file under `dir`, with its text.
fn sources(dir: &Path) -> Vec<(PathBuf, String)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d)
            .expect("read a source directory")
            .flatten()
        {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                let text = std::fs::read_to_string(&path).expect("read a source file");
                out.push((path, text));
            }
        }
    }
    out.sort();
    out
}

/// The text of a file without its tests: everything before the first `#[cfg(test)]`
/// (fleet keeps test modules last), and nothing of a file that is all tests.
fn without_tests<'a>(path: &Path, text: &'a str) -> &'a str {
    if path.file_name().is_some_and(|n| n == "tests.rs") {
        return "";
    }
    text.find("#[cfg(test)]").map_or(text, |at| &text[..at])
}

/// What in `text` breaks the core's purity: the calls and crates that reach outside.
fn core_violations(path: &Path, text: &str) -> Vec<String> {
    const BANNED: [&str; 14] = [
        "std::fs",
        "File::open",
        "std::process",
        "Command::new",
        "SystemTime::now",
        "Instant::now",
        "std::env",
        "TcpStream",
        "UdpSocket",
        "to_socket_addrs",
        "git2",
        "tokio",
        "reqwest",
        "virt::",
    ];
    let code = without_tests(path, text);
    code.lines()
        .enumerate()
        .filter(|(_, line)| !line.trim_start().starts_with("//"))
        .flat_map(|(n, line)| {
            BANNED
                .iter()
                .filter(|banned| line.contains(*banned))
                .map(move |banned| format!("{}:{}: {banned} in the core", path.display(), n + 1))
        })
        .collect()
}

#[test]
fn the_core_does_no_io() {
    let root = workspace().join("reconciler/core/src");
    let found: Vec<String> = sources(&root)
        .iter()
        .flat_map(|(path, text)| core_violations(path, text))
        .collect();
    assert!(found.is_empty(), "{}", found.join("\n"));
    // And the crate graph agrees: no I/O crate is a dependency of the core.
    let manifest = std::fs::read_to_string(workspace().join("reconciler/core/Cargo.toml"))
        .expect("core manifest");
    for io in ["tokio", "virt", "git2", "reqwest", "axum", "hyper"] {
        assert!(
            !manifest.lines().any(|l| l.starts_with(&format!("{io} "))),
            "reconciler/core/Cargo.toml depends on {io}"
        );
    }
}

#[test]
fn the_purity_check_catches_io() {
    let path = Path::new("reconciler/core/src/plan/mod.rs");
    let clean = "pub fn plan() {}\n// std::fs in a comment is fine\n#[cfg(test)]\nmod t { fn f() { std::fs::read(\"x\"); } }\n";
    assert!(core_violations(path, clean).is_empty());
    let dirty = "pub fn plan() {\n    let _ = std::fs::read_to_string(\"/etc/passwd\");\n    let _ = std::time::SystemTime::now();\n}\n";
    assert_eq!(
        core_violations(path, dirty),
        [
            "reconciler/core/src/plan/mod.rs:2: std::fs in the core",
            "reconciler/core/src/plan/mod.rs:3: SystemTime::now in the core",
        ]
    );
}

/// Files outside `allowed` (paths relative to `reconciler/src`) that use `needle`.
fn used_outside(needle: &str, allowed: &[&str]) -> Vec<String> {
    let root = workspace().join("reconciler/src");
    sources(&root)
        .iter()
        .filter(|(path, text)| {
            let rel = path.strip_prefix(&root).expect("under src");
            !allowed.iter().any(|a| rel == Path::new(a))
                && without_tests(path, text).contains(needle)
        })
        .map(|(path, _)| path.display().to_string())
        .collect()
}

#[test]
fn git2_is_used_only_by_source_and_task_repositories() {
    let found = used_outside(
        "git2::",
        &["source.rs", "tasks/repo.rs", "tasks/results.rs"],
    );
    assert!(
        found.is_empty(),
        "git2 outside source, tasks::repo and tasks::results: {found:?}"
    );
}

/// Lines of `text` (without its tests) that build an `Event` by a struct literal.
fn event_literals(path: &Path, text: &str) -> Vec<String> {
    without_tests(path, text)
        .lines()
        .enumerate()
        .filter(|(_, line)| {
            line.match_indices("Event {").any(|(at, _)| {
                let before = line[..at].chars().next_back();
                !before.is_some_and(|c| c.is_alphanumeric() || c == '_')
                    && !line.contains("struct Event")
            })
        })
        .map(|(n, _)| format!("{}:{}", path.display(), n + 1))
        .collect()
}

#[test]
fn events_are_made_only_by_their_constructors() {
    let root = workspace().join("reconciler/src");
    let found: Vec<String> = sources(&root)
        .iter()
        .filter(|(path, _)| !path.ends_with("status/event.rs"))
        .flat_map(|(path, text)| event_literals(path, text))
        .collect();
    assert!(
        found.is_empty(),
        "an Event literal outside status::event: {found:?}"
    );
    let fixture =
        "let e = Event {\n    kind: EventKind::StepStarted,\n};\nlet t = ChangeEvent { x };\n";
    assert_eq!(event_literals(Path::new("x.rs"), fixture), ["x.rs:1"]);
}

/// The module paths of the `.rs` files under `src` (`tasks::runner`, `plan`), leaving out
/// crate roots, test modules and binaries.
fn module_paths(src: &Path) -> Vec<String> {
    sources(src)
        .iter()
        .filter_map(|(path, _)| {
            let rel = path.strip_prefix(src).expect("under src");
            let parts: Vec<String> = rel
                .with_extension("")
                .iter()
                .map(|p| p.to_string_lossy().into_owned())
                .collect();
            let last = parts.last()?.as_str();
            if matches!(last, "lib" | "main" | "tests") || parts[0] == "bin" {
                return None;
            }
            let parts = if last == "mod" {
                &parts[..parts.len() - 1]
            } else {
                &parts[..]
            };
            Some(parts.join("::"))
        })
        .collect()
}

#[test]
fn every_module_is_on_the_code_map() {
    let map = std::fs::read_to_string(workspace().join("docs/ARCHITECTURE.md")).expect("map");
    let mut missing = Vec::new();
    for src in SOURCE_DIRS {
        for module in module_paths(&workspace().join(src)) {
            if !map.contains(&format!("`{module}`")) {
                missing.push(format!("{src}: `{module}`"));
            }
        }
    }
    assert!(
        missing.is_empty(),
        "modules missing from docs/ARCHITECTURE.md:\n{}",
        missing.join("\n")
    );
}

/// Every identifier the workspace's code (not its comments) uses: a type, variant or
/// header a module doc names must be one of them.
fn code_identifiers() -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for src in SOURCE_DIRS
        .iter()
        .chain(["guest-agent/protocol/src"].iter())
    {
        for (_, text) in sources(&workspace().join(src)) {
            for line in text.lines() {
                let code = line.split("//").next().unwrap_or_default();
                names.extend(
                    code.split(|c: char| !(c.is_alphanumeric() || c == '_'))
                        .filter(|w| !w.is_empty())
                        .map(str::to_owned),
                );
            }
        }
    }
    names
}

/// Type-like names (CamelCase, possibly behind a path) that a `//!` line of `text` quotes
/// in backticks and that `known` does not hold.
fn unknown_doc_types(text: &str, known: &BTreeSet<String>) -> Vec<String> {
    let mut out = Vec::new();
    for line in text.lines().filter(|l| l.trim_start().starts_with("//!")) {
        for quoted in line.split('`').skip(1).step_by(2) {
            let last = quoted.rsplit("::").next().unwrap_or(quoted);
            let is_type = last.chars().next().is_some_and(char::is_uppercase)
                && last.chars().all(char::is_alphanumeric)
                && last.chars().any(char::is_lowercase);
            if is_type && !known.contains(last) {
                out.push(quoted.to_owned());
            }
        }
    }
    out
}

#[test]
fn module_docs_name_types_that_exist() {
    let known = code_identifiers();
    let mut found = Vec::new();
    for src in SOURCE_DIRS {
        for (path, text) in sources(&workspace().join(src)) {
            for name in unknown_doc_types(&text, &known) {
                found.push(format!("{}: `{name}`", path.display()));
            }
        }
    }
    assert!(
        found.is_empty(),
        "module docs name types that do not exist:\n{}",
        found.join("\n")
    );
}

#[test]
fn the_doc_check_catches_a_type_that_is_gone() {
    let known: BTreeSet<String> = ["TaskBook".to_owned()].into();
    let doc =
        "//! The book (`TaskBook`) and its runner (`runner::VmRunner`), in `tasks`.\nfn f() {}\n";
    assert_eq!(unknown_doc_types(doc, &known), ["runner::VmRunner"]);
}

/// `docs/troubleshooting.md` has a section for every check `fleet doctor` runs, and no
/// section for a check it no longer runs.
#[test]
fn troubleshooting_covers_every_doctor_check() {
    let text = std::fs::read_to_string(workspace().join("docs/troubleshooting.md"))
        .expect("docs/troubleshooting.md");
    let sections: Vec<&str> = text.lines().filter_map(|l| l.strip_prefix("## ")).collect();
    assert_eq!(
        sections,
        fleet::doctor::CHECKS,
        "one section per check, in order"
    );
}
