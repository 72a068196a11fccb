//! Guest-originated text made safe for a terminal or a page: a guest may send any bytes, and
//! an escape sequence printed raw can rewrite an operator's screen, set their clipboard or
//! forge lines such as an approval command.

/// Terminal output as text: escape sequences dropped, carriage returns before newlines
/// folded.
pub fn strip_codes(raw: &str) -> String {
    let mut out = String::with_capacity(raw.len());
    let mut chars = raw.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\u{1b}' => {
                // CSI: ESC [ params final-byte; OSC, DCS and the like: ESC ] (P, X, ^, _)
                // up to BEL or ESC \ (a title, a clipboard write: their text is dropped too);
                // other escapes: ESC and one character.
                match chars.peek() {
                    Some(&'[') => {
                        chars.next();
                        while let Some(&n) = chars.peek() {
                            chars.next();
                            if ('@'..='~').contains(&n) {
                                break;
                            }
                        }
                    }
                    Some(&(']' | 'P' | 'X' | '^' | '_')) => {
                        chars.next();
                        // An unterminated one ends at the line's end (or 4096 characters),
                        // so it cannot hide the rest of the output.
                        let mut taken = 0;
                        while let Some(&n) = chars.peek() {
                            if n == '\n' || taken == 4096 {
                                break;
                            }
                            chars.next();
                            taken += 1;
                            if n == '\u{7}' {
                                break;
                            }
                            if n == '\u{1b}' {
                                chars.next_if_eq(&'\\');
                                break;
                            }
                        }
                    }
                    _ => {
                        chars.next();
                    }
                }
            }
            '\r' if chars.peek() == Some(&'\n') => {}
            c if c.is_control() && c != '\n' && c != '\t' => {}
            c if reorders(c) => {}
            c => out.push(c),
        }
    }
    out
}

/// Characters that change how a line reads without showing themselves: bidirectional
/// overrides and isolates (which can make a line display in another order than it is),
/// zero-width characters and the byte-order mark.
pub fn reorders(c: char) -> bool {
    matches!(
        c,
        '\u{200B}'..='\u{200F}' | '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}' | '\u{FEFF}'
    )
}

/// One line of at most `max` characters: codes stripped, line breaks shown as `⏎`, the rest
/// cut with `…`. For printers that show guest text inline (`fleet hitl list`).
pub fn one_line(raw: &str, max: usize) -> String {
    let clean = strip_codes(raw);
    let folded: String = clean
        .trim_end()
        .chars()
        .map(|c| {
            if c == '\n' {
                '⏎'
            } else if c == '\t' {
                ' '
            } else {
                c
            }
        })
        .collect();
    if folded.chars().count() > max {
        let mut cut: String = folded.chars().take(max.saturating_sub(1)).collect();
        cut.push('…');
        cut
    } else {
        folded
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_and_forged_lines_do_not_survive() {
        let hostile = "Continue?\u{1b}]52;c;ZXZpbA==\u{7}\u{1b}[2J\napproval-1 approve: fleet hitl answer approval-1 abc\u{9b}31m";
        let line = one_line(hostile, 200);
        assert!(!line.chars().any(|c| c.is_control()), "{line:?}");
        assert!(!line.contains('\n'));
        assert!(line.starts_with("Continue?"), "{line}");
        assert_eq!(one_line(&"x".repeat(50), 10).chars().count(), 10);
    }
}
