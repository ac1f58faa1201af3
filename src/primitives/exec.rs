//! Commands a playbook runs on a host: [`probe`] (the admin declares it reads
//! only; it runs in `plan` too and is not journaled) and [`change`] (`exec` and
//! `shell`: an unmanaged change, journaled with its intent before it runs and its
//! outcome after, reversible only through the undo argv the playbook gives).
//!
//! There is no string-to-shell path here: the argv goes to the transport word by
//! word; a raw shell line arrives as `["sh", "-c", line]` and is marked so in the
//! journal. This file never interprets the output.

use std::time::Duration;

use sha2::{Digest, Sha256};

use super::{HostCtx, PrimitiveError};
use crate::journal::entry::{ExecInput, ExecOutput};
use crate::journal::UndoStep;
use crate::transport::{Command, Transport};

/// What a command left behind, as text.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ExecResult {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
    /// True when stdout or stderr hit the transport's cap and the rest was dropped.
    pub truncated: bool,
    /// True in `plan`: the command was not run and the other fields are empty.
    pub planned: bool,
}

impl ExecResult {
    fn planned() -> Self {
        ExecResult {
            code: 0,
            stdout: String::new(),
            stderr: String::new(),
            truncated: false,
            planned: true,
        }
    }
}

/// An `exec` or `shell` step as a playbook asks for it.
#[derive(Debug, Clone)]
pub struct Change {
    pub argv: Vec<String>,
    /// The playbook gave a raw shell line (`shell`): `argv` is `["sh", "-c", line]`.
    pub raw_shell: bool,
    /// What reverses this change, when the playbook says: an argv to run, or a
    /// backup to restore.
    pub undo: Option<UndoStep>,
    pub timeout: Duration,
}

impl Change {
    fn step(&self) -> &'static str {
        if self.raw_shell {
            "shell"
        } else {
            "exec"
        }
    }

    /// The command as the operator reads it.
    pub fn shown(&self) -> String {
        if self.raw_shell {
            self.argv.last().cloned().unwrap_or_default()
        } else {
            crate::transport::quote::argv(&self.argv)
        }
    }

    /// The undo recorded with the intent: the playbook's argv, or a manual step
    /// that makes any rollback of this host say it is not fully reverted.
    pub fn undo_step(&self) -> UndoStep {
        match &self.undo {
            Some(u) => u.clone(),
            None => UndoStep::Manual {
                reason: format!(
                    "{} `{}` changed the host and has no undo; reverse it by hand (give #{{ undo: [argv] }} to make it reversible)",
                    self.step(),
                    crate::primitives::cut(&self.shown(), 200)
                ),
            },
        }
    }
}

fn digest(bytes: &str) -> String {
    hex::encode(Sha256::digest(bytes.as_bytes()))
}

/// Runs an unmanaged change: in `plan`, records what would run and runs nothing;
/// otherwise writes the intent (with its undo) before running and the outcome
/// (exit code, output digests) after. A non-zero exit code is a result, not an
/// error. Without a journal nothing may change, so it is refused.
pub fn change(ctx: &HostCtx, c: &Change) -> Result<ExecResult, PrimitiveError> {
    let step = c.step();
    if c.argv.is_empty() {
        return Err(PrimitiveError::step(ctx.name(), step, EMPTY_ARGV));
    }
    if let Some(UndoStep::Command { argv }) = &c.undo {
        if argv.is_empty() {
            return Err(PrimitiveError::step(
                ctx.name(),
                step,
                "the undo argv is empty; give the program and its arguments",
            ));
        }
    }
    if ctx.planning() {
        let undo = match &c.undo {
            Some(u) => format!("; undo: {}", super::undo::describe(u)),
            None => "; no undo".to_string(),
        };
        ctx.plan(
            step,
            format!("would run `{}`, not checked{undo}", c.shown()),
            "unknown",
        );
        return Ok(ExecResult::planned());
    }
    if ctx.run.journal.is_none() {
        return Err(PrimitiveError::Refused {
            step: format!("{}: {step}", ctx.name()),
            what: "command".into(),
            value: crate::primitives::cut(&c.shown(), 200),
            reason: "it changes the host, and this evaluation keeps no journal; run it in `patchbook exec SELECTOR SNIPPET` or a playbook, or use probe(host, argv) for a command that only reads".into(),
        });
    }
    let undo = c.undo_step();
    let input = ExecInput {
        argv: c.argv.clone(),
        raw_shell: c.raw_shell,
        unmanaged: true,
        undo: undo.clone(),
    };
    let intent = ctx.intent(step, &input)?;
    match exec(ctx.transport, &c.argv, ctx.timeout(c.timeout)) {
        Ok(r) => {
            let output = ExecOutput {
                code: Some(r.code),
                stdout_sha256: Some(digest(&r.stdout)),
                stderr_sha256: Some(digest(&r.stderr)),
                stdout_bytes: r.stdout.len(),
                stderr_bytes: r.stderr.len(),
                truncated: r.truncated,
                error: None,
            };
            ctx.outcome(step, intent, r.code == 0, &output, Some(undo))?;
            Ok(r)
        }
        Err(e) => {
            // It may have run before the connection died: the undo stays recorded.
            let output = ExecOutput {
                error: Some(e.to_string()),
                ..Default::default()
            };
            ctx.outcome(step, intent, false, &output, Some(undo))?;
            Err(e)
        }
    }
}

/// Runs a command the playbook declares read-only: in `plan` as in `run`, never
/// journaled. What it really does is the playbook's responsibility.
pub fn probe(
    ctx: &HostCtx,
    argv: &[String],
    timeout: Duration,
) -> Result<ExecResult, PrimitiveError> {
    exec(ctx.transport, argv, ctx.timeout(timeout))
}

const EMPTY_ARGV: &str =
    "argv is empty; give the program and its arguments, e.g. [\"uname\", \"-r\"]";

/// Runs `argv` on `t` with a real deadline. A non-zero exit code is a result, not an
/// error; errors are the transport's (connection lost, deadline passed, …).
pub fn exec(
    t: &dyn Transport,
    argv: &[String],
    timeout: Duration,
) -> Result<ExecResult, PrimitiveError> {
    if argv.is_empty() {
        return Err(PrimitiveError::step(t.host(), "exec", EMPTY_ARGV));
    }
    let cmd = Command::new(argv.iter().cloned()).timeout(timeout);
    let out = t.run(&cmd)?;
    Ok(ExecResult {
        code: out.code,
        stdout: out.stdout_str(),
        stderr: out.stderr_str(),
        truncated: out.truncated,
        planned: false,
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
