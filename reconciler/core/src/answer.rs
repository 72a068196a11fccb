//! What an answer to a prompt may contain: the one rule shared by committed Answers
//! (checked by `load`), host answer files and `fleet hitl answer` (checked by the shell).

/// Longest answer accepted, in bytes.
pub const MAX_ANSWER_BYTES: usize = 4096;

/// Why an answer may not be typed into a terminal, if it may not. Control characters
/// (escape sequences, Ctrl-C, a second line) would let an answer do more than answer.
/// A prompt whose task allows control characters in answers (`prompts.allowControl`)
/// has only the length checked.
pub fn answer_problem(answer: &str, allow_control: bool) -> Option<String> {
    if answer.len() > MAX_ANSWER_BYTES {
        return Some(format!(
            "the answer is {} bytes; answers are at most {MAX_ANSWER_BYTES}",
            answer.len()
        ));
    }
    if let Some(c) = answer
        .chars()
        .find(|c| c.is_control())
        .filter(|_| !allow_control)
    {
        return Some(format!(
            "the answer contains the control character U+{:04X}; answers are one line of plain text (Enter is added)",
            c as u32
        ));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_are_one_line_of_plain_text() {
        assert_eq!(answer_problem("yes", false), None);
        assert_eq!(answer_problem("ja, gerne — 🙂", false), None);
        assert!(answer_problem("y\nrm -rf /", false).is_some());
        assert!(answer_problem("\u{1b}[2J", false).is_some());
        assert!(answer_problem("\u{3}", false).is_some());
        assert!(answer_problem(&"y".repeat(MAX_ANSWER_BYTES + 1), false).is_some());
        // A task that allows control characters gets them; the length still counts.
        assert_eq!(answer_problem("\u{1b}[A", true), None);
        assert!(answer_problem(&"y".repeat(MAX_ANSWER_BYTES + 1), true).is_some());
    }
}
