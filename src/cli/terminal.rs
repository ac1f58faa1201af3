//! Escaping of control characters in the plain-text outputs (the `exec` table,
//! progress lines, plan and rollback output). Host output and inventory names are
//! other people's bytes: an ESC sequence in them could recolour, move the cursor,
//! retitle or (on some terminals) answer back through the operator's terminal, and
//! a carriage return could overwrite a FAILED with an ok. They are shown as `ls`
//! shows them, `\x1b`, so nothing is lost and nothing is interpreted.
//!
//! This module owns only that rendering; JSON output needs none (serde escapes
//! every control character) and it must not touch what the journal records.

use std::borrow::Cow;

/// `s` with every C0 control except tab and newline, DEL and the C1 controls
/// written as `\xNN`.
pub fn escape_controls(s: &str) -> Cow<'_, str> {
    let bad =
        |c: char| (c.is_control() && c != '\t' && c != '\n') || ('\u{80}'..='\u{9f}').contains(&c);
    if !s.chars().any(bad) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        if bad(c) {
            out.push_str(&format!("\\x{:02x}", c as u32));
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

/// [`escape_controls`], except that SGR sequences (`ESC [ digits;… m`: colours
/// and text styles, nothing that moves the cursor or rewrites the screen) are kept.
pub fn escape_controls_but_colours(s: &str) -> Cow<'_, str> {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(at) = rest.find('\x1b') {
        out.push_str(&escape_controls(&rest[..at]));
        let seq = &rest[at..];
        let body = seq[1..].strip_prefix('[').map(|b| {
            b.find(|c: char| !(c.is_ascii_digit() || c == ';'))
                .map(|end| (end, b.as_bytes()[end] == b'm'))
        });
        match body {
            Some(Some((end, true))) => {
                let len = 2 + end + 1;
                out.push_str(&seq[..len]);
                rest = &seq[len..];
            }
            _ => {
                out.push_str("\\x1b");
                rest = &seq[1..];
            }
        }
    }
    out.push_str(&escape_controls(rest));
    Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn controls_are_shown_not_interpreted() {
        assert_eq!(escape_controls("plain\ttab\nline"), "plain\ttab\nline");
        assert_eq!(
            escape_controls("a\x1b[31mred\x1b]0;title\x07\r\x7f\u{9b}2J"),
            "a\\x1b[31mred\\x1b]0;title\\x07\\x0d\\x7f\\x9b2J"
        );
        assert!(matches!(escape_controls("ok"), Cow::Borrowed(_)));
    }

    #[test]
    fn colours_pass_and_everything_else_is_shown() {
        assert_eq!(
            escape_controls_but_colours(
                "\x1b[2mts\x1b[0m \x1b[32mINFO\x1b[0m host=a\x1b[2Jb\x1b]0;t\x07"
            ),
            "\x1b[2mts\x1b[0m \x1b[32mINFO\x1b[0m host=a\\x1b[2Jb\\x1b]0;t\\x07"
        );
        assert_eq!(escape_controls_but_colours("end\x1b"), "end\\x1b");
        assert_eq!(escape_controls_but_colours("\x1b[31"), "\\x1b[31");
    }
}
