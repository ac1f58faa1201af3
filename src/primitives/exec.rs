//! `exec`: run one argv on a host and hand back what it printed. There is no
//! string-to-shell path here: the argv goes to the transport word by word. A raw
//! shell line is the script layer's `shell`, which builds `["sh", "-c", line]` and
//! marks it in the log. This file never journals (exec is read-only by contract of
//! the caller) and never interprets the output.

use std::time::Duration;

use super::PrimitiveError;
use crate::transport::{Command, Transport};

/// What a command left behind, as text.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ExecResult {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
    /// True when stdout or stderr hit the transport's cap and the rest was dropped.
    pub truncated: bool,
}

/// Runs `argv` on `t` with a real deadline. A non-zero exit code is a result, not an
/// error; errors are the transport's (connection lost, deadline passed, …).
pub fn exec(
    t: &dyn Transport,
    argv: &[String],
    timeout: Duration,
) -> Result<ExecResult, PrimitiveError> {
    if argv.is_empty() {
        return Err(PrimitiveError::step(
            t.host(),
            "exec",
            "argv is empty; give the program and its arguments, e.g. [\"uname\", \"-r\"]",
        ));
    }
    let cmd = Command::new(argv.iter().cloned()).timeout(timeout);
    let out = t.run(&cmd)?;
    Ok(ExecResult {
        code: out.code,
        stdout: out.stdout_str(),
        stderr: out.stderr_str(),
        truncated: out.truncated,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transport::local::LocalTransport;

    #[test]
    fn captures_code_and_output() {
        let t = LocalTransport::new("here");
        let argv: Vec<String> = ["sh", "-c", "echo out; echo err >&2; exit 3"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let r = exec(&t, &argv, Duration::from_secs(10)).unwrap();
        assert_eq!(r.code, 3);
        assert_eq!(r.stdout, "out\n");
        assert_eq!(r.stderr, "err\n");
        assert!(!r.truncated);
    }

    #[test]
    fn empty_argv_is_refused() {
        let t = LocalTransport::new("here");
        let err = exec(&t, &[], Duration::from_secs(1))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("here") && err.contains("argv is empty"),
            "{err}"
        );
    }

    #[test]
    fn cut_marks_the_cut() {
        assert_eq!(crate::primitives::cut("abc", 5), "abc");
        let c = crate::primitives::cut("abcdef", 3);
        assert!(c.starts_with("abc…") && c.contains("3 more bytes"), "{c}");
    }
}
