//! `fleet events`: the event log (`status/events.jsonl`) read back, filtered and printed,
//! once or as it grows (`--follow`).
//!
//! Messages may hold what a guest wrote (a prompt's text), so the text form goes through
//! `terminal::one_line`; `--json` prints each event as fleet wrote it. A line that is not
//! an event (a torn last line, a hand edit) is skipped and counted, never fatal.

use std::io::{BufRead, Write};
use std::time::{Duration, SystemTime};

use crate::output::Output;
use crate::status::{Event, EventKind};

/// Which events to show.
#[derive(Clone, Debug, Default)]
pub struct Filter {
    /// Only events at or after this time.
    pub since: Option<SystemTime>,
    /// Only these kinds (any, when empty).
    pub kinds: Vec<EventKind>,
    pub vm: Option<String>,
    pub task: Option<String>,
}

impl Filter {
    pub fn admits(&self, event: &Event) -> bool {
        self.since.is_none_or(|t| event.time.system_time() >= t)
            && (self.kinds.is_empty() || self.kinds.contains(&event.kind))
            && self
                .vm
                .as_ref()
                .is_none_or(|vm| event.vm.as_ref() == Some(vm))
            && self
                .task
                .as_ref()
                .is_none_or(|task| event.task.as_ref() == Some(task))
    }
}

/// An event kind by its wire name (`step.failed`); the error lists the valid ones.
pub fn parse_kind(name: &str) -> Result<EventKind, String> {
    serde_json::from_value(serde_json::Value::String(name.to_owned())).map_err(|_| {
        format!(
            "{name:?} is not an event kind; kinds are: {}",
            EventKind::ALL
                .iter()
                .map(|k| kind_name(*k))
                .collect::<Vec<_>>()
                .join(", ")
        )
    })
}

fn kind_name(kind: EventKind) -> String {
    serde_json::to_value(kind)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default()
}

/// One event as a line of text: time, kind, what it is about, and the message made safe
/// for a terminal.
pub fn line(event: &Event) -> String {
    let about = match (&event.vm, &event.task) {
        (Some(vm), Some(task)) => format!("{vm}/{task}"),
        (Some(vm), None) => vm.clone(),
        (None, Some(task)) => task.clone(),
        (None, None) => "-".to_owned(),
    };
    format!(
        "{}  {:<24} {:<20} {}",
        event.time,
        kind_name(event.kind),
        crate::terminal::one_line(&about, 40),
        crate::terminal::one_line(&event.message, 400)
    )
}

/// An event's JSON line as fleet wrote it, but with the characters a terminal would act on
/// escaped (`\u007f`, C1 controls, bidirectional overrides): JSON escapes only U+0000 to
/// U+001F, and these appear only inside strings, so the line stays the same JSON.
fn json_line(line: &[u8]) -> Vec<u8> {
    let text = String::from_utf8_lossy(line);
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if c == '\u{7f}' || ('\u{80}'..='\u{9f}').contains(&c) || crate::terminal::reorders(c) {
            out.push_str(&format!("\\u{:04x}", c as u32));
        } else {
            out.push(c);
        }
    }
    out.into_bytes()
}

/// Prints the events `reader` holds that `filter` admits; returns how many lines were not
/// events. A last line without its newline is still being written and is not printed.
pub fn print(
    reader: &mut impl BufRead,
    filter: &Filter,
    format: Output,
    out: &mut impl Write,
) -> std::io::Result<usize> {
    let mut skipped = 0;
    let mut buf = Vec::new();
    loop {
        buf.clear();
        let n = read_whole_line(reader, &mut buf)?;
        if n == 0 {
            return Ok(skipped);
        }
        let Ok(event) = serde_json::from_slice::<Event>(&buf) else {
            skipped += 1;
            continue;
        };
        if !filter.admits(&event) {
            continue;
        }
        write_event(out, format, &buf, &event)?;
    }
}

/// One event as `format` says: for JSON the line fleet wrote (re-encoded only if it was
/// not plain), for YAML a document, for text a line for people.
fn write_event(
    out: &mut impl Write,
    format: Output,
    raw: &[u8],
    event: &Event,
) -> std::io::Result<()> {
    match format {
        Output::Json => out.write_all(&json_line(raw)),
        Output::Yaml => {
            let doc = format.record(event).map_err(std::io::Error::other)?;
            out.write_all(doc.unwrap_or_default().as_bytes())
        }
        Output::Text => writeln!(out, "{}", line(event)),
    }
}

/// Reads one line including its newline into `buf`; 0 at the end, or when what is left is
/// a line still being written (it has no newline yet).
fn read_whole_line(reader: &mut impl BufRead, buf: &mut Vec<u8>) -> std::io::Result<usize> {
    let n = reader.read_until(b'\n', buf)?;
    if n == 0 || buf.last() != Some(&b'\n') {
        return Ok(0);
    }
    Ok(n)
}

/// The current event log read across its rotations (`policy.retention.logSize`): at its
/// end, when its path names a new file, reading drains the old one and goes on in the new.
pub struct RotatingLog<F> {
    file: std::fs::File,
    reopen: F,
}

impl<F: FnMut() -> std::io::Result<std::fs::File>> RotatingLog<F> {
    pub fn new(file: std::fs::File, reopen: F) -> RotatingLog<F> {
        RotatingLog { file, reopen }
    }
}

impl<F: FnMut() -> std::io::Result<std::fs::File>> std::io::Read for RotatingLog<F> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.file.read(buf)?;
        if n > 0 || buf.is_empty() {
            return Ok(n);
        }
        use std::os::unix::fs::MetadataExt;
        let Ok(next) = (self.reopen)() else {
            return Ok(0);
        };
        let (old, new) = (self.file.metadata()?, next.metadata()?);
        if (old.dev(), old.ino()) == (new.dev(), new.ino()) {
            return Ok(0);
        }
        // Rotated: what was appended to the old file before the rename comes first.
        let n = self.file.read(buf)?;
        if n > 0 {
            return Ok(n);
        }
        self.file = next;
        self.file.read(buf)
    }
}

/// `--follow`: prints what `reader` holds and then what is appended, checking every
/// `every`, until `stop` says so (the command runs until interrupted). A line is printed
/// once it is whole.
pub fn follow(
    reader: &mut impl BufRead,
    filter: &Filter,
    format: Output,
    out: &mut impl Write,
    every: Duration,
    stop: impl Fn() -> bool,
) -> std::io::Result<()> {
    let mut carry = Vec::new();
    loop {
        let mut chunk = Vec::new();
        let n = reader.read_until(b'\n', &mut chunk)?;
        if n == 0 {
            out.flush()?;
            if stop() {
                return Ok(());
            }
            std::thread::sleep(every);
            continue;
        }
        carry.extend_from_slice(&chunk);
        if carry.last() != Some(&b'\n') {
            continue; // The rest of the line is still being written.
        }
        if let Ok(event) = serde_json::from_slice::<Event>(&carry)
            && filter.admits(&event)
        {
            write_event(out, format, &carry, &event)?;
        }
        carry.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(kind: EventKind, vm: Option<&str>, message: &str, at: u64) -> Event {
        let mut e = Event::fleet(kind, None, message.to_owned())
            .at(SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000 + at));
        e.vm = vm.map(str::to_owned);
        e
    }

    fn jsonl(events: &[Event]) -> Vec<u8> {
        let mut out = Vec::new();
        for e in events {
            out.extend(serde_json::to_vec(e).expect("json"));
            out.push(b'\n');
        }
        out
    }

    #[test]
    fn events_are_filtered_by_kind_vm_and_time_and_bad_lines_skipped() {
        let mut log = jsonl(&[
            event(EventKind::StepFailed, Some("a"), "create a failed", 0),
            event(EventKind::StepFailed, Some("b"), "create b failed", 10),
            event(EventKind::RevisionRefused, None, "revision refused", 20),
        ]);
        log.extend(b"not an event\n{\"time\":\"2027-01-15T08:00:00Z\"");
        let filter = Filter {
            kinds: vec![parse_kind("step.failed").expect("a kind")],
            since: Some(SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_005)),
            ..Filter::default()
        };
        let mut out = Vec::new();
        let skipped = print(&mut &log[..], &filter, Output::Text, &mut out).expect("print");
        let text = String::from_utf8(out).expect("text");
        assert_eq!(text.lines().count(), 1, "{text}");
        assert!(
            text.contains("step.failed") && text.contains("create b failed"),
            "{text}"
        );
        assert_eq!(
            skipped, 1,
            "the torn last line is not counted, only the bad one"
        );

        let mut json = Vec::new();
        let only_b = Filter {
            vm: Some("b".into()),
            ..Filter::default()
        };
        print(&mut &log[..], &only_b, Output::Json, &mut json).expect("print");
        let back: Event = serde_json::from_slice(&json).expect("one event as written");
        assert_eq!(back.message, "create b failed");
    }

    #[test]
    fn guest_text_in_a_message_cannot_drive_the_terminal() {
        let e = event(
            EventKind::HitlPrompt,
            Some("a"),
            "prompt waits: \u{1b}]52;c;ZXZpbA==\u{7}\u{1b}[2J\napprove with: fleet hitl answer x yes",
            0,
        );
        let text = line(&e);
        assert!(!text.chars().any(|c| c.is_control()), "{text:?}");
        assert!(!text.contains('\n'));
        // As JSON: still the same event, with nothing a terminal would act on.
        let bidi = event(EventKind::HitlPrompt, None, "a\u{202E}b\u{9b}2Jc\u{7f}", 0);
        let raw = serde_json::to_vec(&bidi).expect("json");
        let shown = json_line(&raw);
        let text = String::from_utf8(shown.clone()).expect("text");
        assert!(
            !text
                .chars()
                .any(|c| c.is_control() || crate::terminal::reorders(c)),
            "{text:?}"
        );
        let back: Event = serde_json::from_slice(&shown).expect("the same JSON");
        assert_eq!(back.message, bidi.message);
        assert_eq!(crate::terminal::one_line(&bidi.message, 100), "ab2Jc");
    }

    #[test]
    fn an_unknown_kind_lists_the_valid_ones() {
        let why = parse_kind("step.exploded").expect_err("unknown");
        assert!(why.contains("step.failed"), "{why}");
    }

    #[test]
    fn follow_prints_lines_once_they_are_whole() {
        let first = jsonl(&[event(EventKind::StepFailed, Some("a"), "one", 0)]);
        let second = jsonl(&[event(EventKind::StepFailed, Some("a"), "two", 1)]);
        // The second event arrives in two pieces, as an append may.
        let (head, tail) = second.split_at(10);
        let mut input = first.clone();
        input.extend_from_slice(head);
        let mut reader = std::io::BufReader::new(Pieces {
            parts: vec![input, tail.to_vec()],
        });
        let mut out = Vec::new();
        let polls = std::cell::Cell::new(0);
        follow(
            &mut reader,
            &Filter::default(),
            Output::Text,
            &mut out,
            Duration::ZERO,
            || {
                polls.set(polls.get() + 1);
                polls.get() > 3
            },
        )
        .expect("follow");
        let text = String::from_utf8(out).expect("text");
        assert_eq!(text.lines().count(), 2, "{text}");
        assert!(
            text.lines().nth(1).is_some_and(|l| l.ends_with("two")),
            "{text}"
        );
    }

    /// A reader that hands out its parts one read at a time, then reports the end (as a
    /// file does between appends).
    struct Pieces {
        parts: Vec<Vec<u8>>,
    }

    impl std::io::Read for Pieces {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            if self.parts.is_empty() {
                return Ok(0);
            }
            let part = &mut self.parts[0];
            let n = part.len().min(buf.len());
            buf[..n].copy_from_slice(&part[..n]);
            part.drain(..n);
            if part.is_empty() {
                self.parts.remove(0);
            }
            Ok(n)
        }
    }
}
