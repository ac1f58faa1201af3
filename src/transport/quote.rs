//! Quoting of argv words for a POSIX shell on the far side of an SSH exec request.
//!
//! SSH carries one command string; the remote login shell splits it. Every word is
//! single-quoted, so nothing in script data can become shell syntax.

/// Quotes one word so that a POSIX shell reads it back verbatim.
pub fn word(w: &str) -> String {
    if !w.is_empty()
        && w.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_./=:,+@%".contains(&b))
    {
        return w.to_string();
    }
    let mut out = String::with_capacity(w.len() + 2);
    out.push('\'');
    for c in w.chars() {
        if c == '\'' {
            out.push_str("'\\''");
        } else {
            out.push(c);
        }
    }
    out.push('\'');
    out
}

/// Quotes an argv into one command line.
pub fn argv<S: AsRef<str>>(argv: &[S]) -> String {
    argv.iter()
        .map(|w| word(w.as_ref()))
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_words_stay_plain() {
        assert_eq!(
            argv(&["dpkg-query", "-W", "acme-agent"]),
            "dpkg-query -W acme-agent"
        );
    }

    #[test]
    fn hostile_words_are_single_quoted() {
        assert_eq!(word("a b"), "'a b'");
        assert_eq!(word("$(reboot)"), "'$(reboot)'");
        assert_eq!(word("it's"), "'it'\\''s'");
        assert_eq!(word(""), "''");
        assert_eq!(word("-f=${Version}"), "'-f=${Version}'");
    }

    #[test]
    fn round_trip_through_a_real_shell() {
        let words = [
            "a b",
            "$(echo pwned)",
            "`id`",
            "x;y",
            "it's",
            "\n",
            "-rf",
            "*",
        ];
        let line = format!("printf '%s\\0' {}", argv(&words));
        let out = std::process::Command::new("sh")
            .arg("-c")
            .arg(line)
            .output()
            .expect("sh runs");
        let got: Vec<String> = out
            .stdout
            .split(|b| *b == 0)
            .filter(|s| !s.is_empty())
            .map(|s| String::from_utf8_lossy(s).into_owned())
            .collect();
        assert_eq!(got, words);
    }
}
