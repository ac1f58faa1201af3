//! Health checks: a command on the host, a systemd unit, an HTTP endpoint seen from
//! the controller. They only read; a failed check is an error the rollout counts.

use std::time::Duration;

use super::{cut, HostCtx, PrimitiveError};
use crate::journal::entry::HealthRecord;
use crate::journal::Entry;
use crate::transport::Command;

/// Options of `health(host, argv, #{ … })`.
#[derive(Debug, Clone)]
pub struct HealthCheck {
    pub expect_code: i32,
    /// A substring the command's stdout must contain.
    pub expect_stdout: Option<String>,
    /// Extra attempts after the first failure.
    pub retries: u32,
    pub delay: Duration,
    pub timeout: Duration,
}

impl Default for HealthCheck {
    fn default() -> Self {
        HealthCheck {
            expect_code: 0,
            expect_stdout: None,
            retries: 0,
            delay: Duration::from_secs(1),
            timeout: Duration::from_secs(60),
        }
    }
}

/// Runs `argv` until it passes or the retries are spent. Returns its stdout.
pub fn health(
    ctx: &HostCtx,
    argv: &[String],
    check: &HealthCheck,
) -> Result<String, PrimitiveError> {
    if argv.is_empty() {
        return Err(PrimitiveError::step(ctx.name(), "health", "empty argv"));
    }
    if ctx.planning() {
        ctx.plan_check("health", argv.join(" "), "unknown");
        return Ok(String::new());
    }
    let mut last = String::new();
    for attempt in 0..=check.retries {
        if attempt > 0 {
            std::thread::sleep(check.delay);
        }
        let out = ctx
            .transport
            .run(&Command::new(argv.iter().cloned()).timeout(ctx.timeout(check.timeout)))?;
        let stdout = out.stdout_str();
        let code_ok = out.code == check.expect_code;
        let text_ok = check
            .expect_stdout
            .as_ref()
            .is_none_or(|s| stdout.contains(s.as_str()));
        if code_ok && text_ok {
            ctx.record(
                "health",
                Entry::Health(HealthRecord {
                    argv: argv.to_vec(),
                    command: None,
                    ok: true,
                    attempts: attempt + 1,
                    error: None,
                }),
            )?;
            return Ok(stdout);
        }
        last = if !code_ok {
            format!(
                "exit {} (expected {}): {}",
                out.code,
                check.expect_code,
                cut(format!("{}{}", out.stderr_str(), stdout).trim(), 500)
            )
        } else {
            format!(
                "stdout does not contain {:?}: {}",
                check.expect_stdout.clone().unwrap_or_default(),
                cut(stdout.trim(), 500)
            )
        };
    }
    ctx.record(
        "health",
        Entry::Health(HealthRecord {
            argv: argv.to_vec(),
            command: None,
            ok: false,
            attempts: check.retries + 1,
            error: Some(last.clone()),
        }),
    )?;
    Err(PrimitiveError::step(
        ctx.name(),
        "health",
        format!(
            "`{}` failed after {} attempt(s): {last}",
            argv.join(" "),
            check.retries + 1
        ),
    ))
}

/// Whether a systemd unit is active. Hosts without systemctl answer with an error,
/// not with `false`, so a missing init system is never read as "service down".
pub fn service_active(ctx: &HostCtx, name: &str) -> Result<bool, PrimitiveError> {
    if name.is_empty()
        || name.starts_with('-')
        || name.chars().any(|c| c.is_control() || c.is_whitespace())
    {
        return Err(PrimitiveError::Refused {
            step: "service_active".into(),
            what: "unit name".into(),
            value: cut(name, 80),
            reason: "unit names have no spaces or control characters and do not start with '-'"
                .into(),
        });
    }
    let probe = ctx.transport.run(
        &Command::new(["sh", "-c", "command -v systemctl"])
            .timeout(ctx.timeout(Duration::from_secs(30))),
    )?;
    if !probe.success() {
        return Err(PrimitiveError::step(
            ctx.name(),
            "service_active",
            "systemctl is not available on this host",
        ));
    }
    let out = ctx.transport.run(
        &Command::new(["systemctl", "is-active", "--", name])
            .timeout(ctx.timeout(Duration::from_secs(30))),
    )?;
    Ok(out.success() && out.stdout_str().trim() == "active")
}

/// Options of `http_check(url, #{ … })`.
#[derive(Debug, Clone)]
pub struct HttpCheck {
    pub status: u16,
    pub contains: Option<String>,
    pub timeout: Duration,
}

impl Default for HttpCheck {
    fn default() -> Self {
        HttpCheck {
            status: 200,
            contains: None,
            timeout: Duration::from_secs(10),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum HttpCheckError {
    #[error("http_check {url}: {message}")]
    Failed { url: String, message: String },
}

/// Fetches `url` from the controller and checks status and body. At most 1 MiB of
/// the body is read.
pub fn http_check(url: &str, check: &HttpCheck) -> Result<u16, HttpCheckError> {
    use std::io::Read;
    let fail = |message: String| HttpCheckError::Failed {
        url: url.to_string(),
        message,
    };
    let agent = ureq::AgentBuilder::new().timeout(check.timeout).build();
    let resp = match agent.get(url).call() {
        Ok(r) => r,
        Err(ureq::Error::Status(_, r)) => r,
        Err(e) => return Err(fail(e.to_string())),
    };
    let status = resp.status();
    let mut body = String::new();
    let _ = resp.into_reader().take(1 << 20).read_to_string(&mut body);
    if status != check.status {
        return Err(fail(format!("status {status}, expected {}", check.status)));
    }
    if let Some(needle) = &check.contains {
        if !body.contains(needle.as_str()) {
            return Err(fail(format!("body does not contain {needle:?}")));
        }
    }
    Ok(status)
}
