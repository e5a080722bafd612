//! Text from the daemon made safe for a terminal.  Names, paths, reasons,
//! results and logs come from users (a model folder may be called
//! `m\e]0;PWNED\a\e[2J`); printed raw, their escape sequences would retitle,
//! clear or reprogram the terminal of whoever runs `mezod status`, root
//! included.  Every control character is written out as an escape instead:
//! C0 (but newline and tab where text has lines), DEL, the C1 controls
//! U+0080–U+009F (U+009B is a one-character CSI on many terminals) and a
//! carriage return that does not end a line (it would let a line overwrite
//! the one shown before it).  `--json` output needs none of this: JSON escapes
//! control characters itself.

use std::borrow::Cow;

/// Multi-line text (a log, a reason, an error): lines and tabs kept, every
/// other control character escaped.
pub fn printable(text: &str) -> Cow<'_, str> {
    escape(text, true)
}

/// One value on one line (a name, a path, a table cell): newlines and tabs
/// are escaped too, so a value cannot start a line that looks like another.
pub fn printable_line(text: &str) -> Cow<'_, str> {
    escape(text, false)
}

fn escape(text: &str, lines: bool) -> Cow<'_, str> {
    let mut chars = text.chars().peekable();
    let mut out: Option<String> = None;
    let mut at = 0;
    while let Some(c) = chars.next() {
        let keep = match c {
            '\n' | '\t' => lines,
            '\r' => lines && chars.peek() == Some(&'\n'),
            // Cc: C0, DEL and C1.
            c => !c.is_control(),
        };
        if !keep {
            let s = out.get_or_insert_with(|| text[..at].to_string());
            match c {
                '\n' => s.push_str("\\n"),
                '\t' => s.push_str("\\t"),
                '\r' => s.push_str("\\r"),
                c if (c as u32) < 0x80 => s.push_str(&format!("\\x{:02x}", c as u32)),
                c => s.push_str(&format!("\\u{{{:x}}}", c as u32)),
            }
        } else if let Some(s) = &mut out {
            s.push(c);
        }
        at += c.len_utf8();
    }
    match out {
        Some(s) => Cow::Owned(s),
        None => Cow::Borrowed(text),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_never_reach_a_terminal() {
        let hostile = "m\x1b]0;PWNED\x07\x1b[2J";
        assert_eq!(printable(hostile), "m\\x1b]0;PWNED\\x07\\x1b[2J");
        assert_eq!(printable_line(hostile), printable(hostile));
        // C1 controls (CSI as one character), DEL, NUL.
        assert_eq!(printable("a\u{9b}2Jb\u{7f}\0"), "a\\u{9b}2Jb\\x7f\\x00");
        // Lines and tabs stay in text, not in one-line values.
        assert_eq!(
            printable("step 1\tloss 2\r\nstep 2\n"),
            "step 1\tloss 2\r\nstep 2\n"
        );
        assert_eq!(printable_line("a\nb\tc"), "a\\nb\\tc");
        // A carriage return that does not end a line would overwrite it.
        assert_eq!(printable("done\rfailed"), "done\\rfailed");
        assert_eq!(printable("ends\r"), "ends\\r");
        assert_eq!(printable_line("a\r\n"), "a\\r\\n");
        // Printable text, non-ASCII included, is not copied.
        let plain = "café — 東京 ✓";
        assert!(matches!(printable(plain), Cow::Borrowed(_)));
        assert_eq!(printable(plain), plain);
        let every: String = (0..=0x10ffff_u32).filter_map(char::from_u32).collect();
        assert!(!printable(&every)
            .chars()
            .any(|c| c.is_control() && c != '\n' && c != '\t'));
    }
}
