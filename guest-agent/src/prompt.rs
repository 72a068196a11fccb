//! Noticing that a task waits for a human: a screen model of its terminal (a vt100 parser,
//! so cursor movement, redraws and colour codes leave the text a person would see) and a
//! score of its last lines once the output has gone quiet.
//!
//! The last non-empty line is a prompt when it matches a strong pattern (`(y/n)`,
//! `Press ENTER`, `Are you sure`, ...) or a weak one (a trailing `?`); a strong pattern (which includes a
//! coding agent's bare input marker such as `>` or `❯`) also counts on the three lines above it, which is
//! where coding agents put the question when they draw a menu of choices below it.

use std::num::NonZeroU16;

use regex::{Regex, RegexBuilder};

/// Rows and columns of every task's terminal.
pub const ROWS: u16 = 40;
pub const COLS: u16 = 120;
/// Lines of context sent with a prompt.
pub const CONTEXT_LINES: usize = 20;

const STRONG: &[&str] = &[
    // (y/n) [Y/n] (yes/no) [y/N]
    r"[\[(]\s*y(es)?\s*/\s*n(o)?\s*[\])]",
    r"press\s+(enter|return|any key)",
    r"do you want to\b",
    r"are you sure",
    r"\b(continue|proceed)\s*\?",
    r"(password|passphrase)[^:]*:\s*$",
    // Coding agents' empty input line: `>`, `❯`, `›`, inside a box or not (the box's
    // bottom border comes after it).
    r"^\s*[│|]?\s*[>❯›]\s*[│|]?\s*$",
];

const WEAK: &[&str] = &[
    // A question as the last thing on screen.
    r"\?\s*$",
];

pub struct Detector {
    screen: vt100::Parser,
    strong: Vec<Regex>,
    weak: Vec<Regex>,
    option: Regex,
}

/// A prompt found on the screen.
#[derive(Debug, PartialEq, Eq)]
pub struct Found {
    pub text: String,
    pub screen: Vec<String>,
    /// The choices of a numbered menu under the question (`1. Yes`, `2. No`), in order,
    /// without their numbers; empty for a question answered by typing.
    pub options: Vec<String>,
}

/// Most choices a menu may have.
const MAX_OPTIONS: usize = 9;

/// A menu's line: an optional box edge and selection marker, a number, its label.
const OPTION: &str = r"^\s*[│|]?\s*([❯>›→▶]\s*)?(\d)[.)]\s+(\S.*?)\s*[│|]?\s*$";

impl Detector {
    /// `extra` are the task's own patterns, as strong as the built-in ones; one that is not
    /// a valid regular expression is returned as an error.
    pub fn new(extra: &[String]) -> Result<Detector, String> {
        let compile = |p: &str| {
            RegexBuilder::new(p)
                .case_insensitive(true)
                .size_limit(1 << 20)
                .build()
                .map_err(|e| format!("prompt pattern {p:?}: {e}"))
        };
        let mut strong = STRONG
            .iter()
            .map(|p| compile(p))
            .collect::<Result<Vec<_>, _>>()?;
        for p in extra {
            strong.push(compile(p)?);
        }
        let weak = WEAK
            .iter()
            .map(|p| compile(p))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Detector {
            screen: vt100::Parser::new(
                NonZeroU16::MIN.saturating_add(ROWS - 1),
                NonZeroU16::MIN.saturating_add(COLS - 1),
                0,
            ),
            strong,
            weak,
            option: compile(OPTION)?,
        })
    }

    pub fn feed(&mut self, bytes: &[u8]) {
        self.screen.process(bytes);
    }

    /// The visible lines, without trailing blank lines.
    fn lines(&self) -> Vec<String> {
        let mut lines: Vec<String> = self
            .screen
            .screen()
            .rows(0, COLS)
            .map(|l| l.trim_end().to_owned())
            .collect();
        while lines.last().is_some_and(|l| l.is_empty()) {
            lines.pop();
        }
        lines
    }

    /// A selection menu near the bottom of the screen under a question (a coding agent's
    /// permission dialog, picked with a key): the question and the choices. The choices
    /// must be numbered from 1 on consecutive lines, one of them under a selection marker
    /// (`❯ 1. Yes`), the last within a few lines of the bottom, and the nearest line above
    /// them must read as a question. A numbered list in output, or a line-based menu that
    /// is answered by typing a number and Enter, is not one.
    fn menu(&self, lines: &[String]) -> Option<(String, Vec<String>)> {
        let tail = lines.len().saturating_sub(6);
        let option = |line: &str| {
            let c = self.option.captures(line)?;
            Some((
                c.get(1).is_some(),
                c[2].parse::<usize>().ok()?,
                c[3].to_owned(),
            ))
        };
        let last = (tail..lines.len())
            .rev()
            .find(|&i| option(&lines[i]).is_some())?;
        let (_, n, _) = option(&lines[last])?;
        let first = last.checked_sub(n.checked_sub(1)?)?;
        let mut options = Vec::new();
        let mut selected = false;
        for (k, line) in lines[first..=last].iter().enumerate() {
            let (marked, number, label) = option(line)?;
            if number != k + 1 {
                return None;
            }
            selected |= marked;
            options.push(label);
        }
        if !selected {
            return None;
        }
        if !(2..=MAX_OPTIONS).contains(&options.len()) {
            return None;
        }
        let question = lines[..first].iter().rev().find(|l| !l.trim().is_empty())?;
        let reads_as_one = |set: &[Regex]| set.iter().any(|r| r.is_match(question));
        let text = question.trim().trim_matches(['│', '|']).trim().to_owned();
        (reads_as_one(&self.strong) || reads_as_one(&self.weak)).then_some((text, options))
    }

    /// Whether a line of the screen still shows `text` (a prompt's question).
    pub fn shows(&self, text: &str) -> bool {
        self.lines().iter().any(|l| l.contains(text))
    }

    /// The prompt on screen now, if the last lines score as one.
    pub fn detect(&self) -> Option<Found> {
        let lines = self.lines();
        let context = || lines[lines.len().saturating_sub(CONTEXT_LINES)..].to_vec();
        if let Some((text, options)) = self.menu(&lines) {
            return Some(Found {
                text,
                screen: context(),
                options,
            });
        }
        let recent: Vec<&String> = lines
            .iter()
            .rev()
            .filter(|l| !l.is_empty())
            .take(4)
            .collect();
        let last = recent.first()?;
        let matches = |set: &[Regex], line: &str| set.iter().any(|r| r.is_match(line));
        let hit = if matches(&self.strong, last) || matches(&self.weak, last) {
            Some((*last).clone())
        } else {
            recent[1..]
                .iter()
                .find(|l| matches(&self.strong, l))
                .map(|l| (*l).clone())
        }?;
        Some(Found {
            text: hit.trim().to_owned(),
            screen: context(),
            options: Vec::new(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn detect(output: &str) -> Option<String> {
        let mut d = Detector::new(&[]).expect("patterns compile");
        d.feed(output.as_bytes());
        d.detect().map(|f| f.text)
    }

    #[test]
    fn common_questions_are_prompts() {
        for (output, text) in [
            ("working\r\nContinue? (y/n) ", "Continue? (y/n)"),
            ("Install 3 packages [Y/n] ", "Install 3 packages [Y/n]"),
            ("Press ENTER to continue", "Press ENTER to continue"),
            (
                "Are you sure you want to delete it",
                "Are you sure you want to delete it",
            ),
            ("What is your name?", "What is your name?"),
            ("Password for alice: ", "Password for alice:"),
            ("╭──────╮\r\n│ >    │\r\n╰──────╯", "│ >    │"),
            (
                "Do you want to proceed?\r\n❯ 1. Yes\r\n  2. No",
                "Do you want to proceed?",
            ),
        ] {
            assert_eq!(detect(output).as_deref(), Some(text), "{output:?}");
        }
    }

    #[test]
    fn a_coding_agents_permission_menu_is_a_prompt_with_its_choices() {
        let output = concat!(
            "╭────────────────────────────────────╮\r\n",
            "│ Bash command                       │\r\n",
            "│   printf 'hi' > hello.txt          │\r\n",
            "│ Do you want to proceed?            │\r\n",
            "│ ❯ 1. Yes                           │\r\n",
            "│   2. Yes, and don't ask again      │\r\n",
            "│   3. No, and tell Claude (esc)     │\r\n",
            "╰────────────────────────────────────╯\r\n",
            "  Esc to cancel",
        );
        let mut d = Detector::new(&[]).expect("patterns compile");
        d.feed(output.as_bytes());
        let found = d.detect().expect("a prompt");
        assert_eq!(found.text, "Do you want to proceed?");
        assert_eq!(
            found.options,
            vec![
                "Yes",
                "Yes, and don't ask again",
                "No, and tell Claude (esc)"
            ]
        );
        // A numbered list in ordinary output is no menu, nor one that skips a number, nor
        // a line-based menu without a selection marker (answered by typing), nor a list
        // high above the bottom.
        for output in [
            "Steps done:\r\n1. fetch\r\n2. build\r\n",
            "Pick one?\r\n❯ 1. a\r\n3. c\r\n",
            "Which env?\r\n1) dev\r\n2) prod\r\nChoice: ",
            "Which approach?\r\n❯ 1. a\r\n2. b\r\n\r\n.\r\n.\r\n.\r\n.\r\n.\r\n> ",
            "Exit?\r\n❯ 0. exit\r\n",
        ] {
            let mut d = Detector::new(&[]).expect("patterns compile");
            d.feed(output.as_bytes());
            assert!(
                d.detect().is_none_or(|f| f.options.is_empty()),
                "{output:?}"
            );
        }
    }

    #[test]
    fn ordinary_output_is_not() {
        for output in [
            "compiling 3 crates\r\n",
            "test result: ok. 3 passed\r\n",
            "Is it done? yes\r\nbuilding\r\n",
            "",
        ] {
            assert_eq!(detect(output), None, "{output:?}");
        }
    }

    #[test]
    fn the_screen_model_sees_what_a_person_sees() {
        // A progress line redrawn with carriage returns and colours, then a question.
        let output = "\x1b[32m10%\x1b[0m\r50%\r100%\r\n\x1b[1mOverwrite file?\x1b[0m [y/N] ";
        let mut d = Detector::new(&[]).expect("patterns compile");
        d.feed(output.as_bytes());
        let found = d.detect().expect("a prompt");
        assert_eq!(found.text, "Overwrite file? [y/N]");
        assert_eq!(found.screen, vec!["100%", "Overwrite file? [y/N]"]);
    }

    #[test]
    fn a_task_can_add_patterns_and_bad_ones_are_refused() {
        let mut d = Detector::new(&["^approve deploy".into()]).expect("compiles");
        d.feed(b"approve deploy to staging: ");
        assert!(d.detect().is_some());
        assert!(Detector::new(&["(".into()]).is_err());
    }
}
