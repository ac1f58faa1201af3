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
    #[error("http_check {url}: `{host}` is neither a host of the inventory nor in `http_check_allow` in patchbook.toml; add it there if the controller may query it")]
    NotAllowed { url: String, host: String },
}

/// Where `http_check` may go. A script could otherwise use it, with `contains`,
/// as a yes/no oracle over any URL the controller reaches (cloud metadata,
/// internal admin pages); like artifacts' `trusted_sources`, the operator names
/// what is fair game: the inventory's hosts (by name or address) and the config's
/// `http_check_allow` entries (host names, or `http(s)://` URL prefixes).
#[derive(Debug, Clone, Default)]
pub struct HttpTargets {
    /// Inventory host names and addresses, compared case-insensitively.
    pub hosts: Vec<String>,
    /// `http_check_allow` from the config.
    pub allow: Vec<String>,
}

impl HttpTargets {
    /// Checks `url` against the targets; the error says how to allow it.
    pub fn check(&self, url: &str) -> Result<(), HttpCheckError> {
        let parsed = url::Url::parse(url).map_err(|e| HttpCheckError::Failed {
            url: url.to_string(),
            message: format!("not a URL ({e})"),
        })?;
        if !matches!(parsed.scheme(), "http" | "https") {
            return Err(HttpCheckError::Failed {
                url: url.to_string(),
                message: "only http:// and https:// URLs can be checked".into(),
            });
        }
        // `host_str` is the parsed, normalised host (IDNA, IPv6 brackets kept):
        // userinfo tricks like `http://inventory-host@169.254.169.254/` do not
        // reach the comparison.
        let host = parsed.host_str().unwrap_or("").to_ascii_lowercase();
        let bare = host.trim_start_matches('[').trim_end_matches(']');
        let named = |h: &String| {
            let h = h.trim().to_ascii_lowercase();
            !h.is_empty() && (h == host || h == bare)
        };
        if self.hosts.iter().any(named) {
            return Ok(());
        }
        let normalised = parsed.as_str();
        let allowed = self.allow.iter().any(|a| {
            if a.starts_with("http://") || a.starts_with("https://") {
                // A prefix must end at a path boundary, or `https://ok.example`
                // would also admit `https://ok.example.evil.test`.
                url::Url::parse(a).is_ok_and(|p| {
                    let p = p.as_str();
                    normalised.starts_with(p) && (p.ends_with('/') || normalised.len() == p.len())
                })
            } else {
                named(a)
            }
        });
        if allowed {
            Ok(())
        } else {
            Err(HttpCheckError::NotAllowed {
                url: url.to_string(),
                host,
            })
        }
    }
}

/// Fetches `url` from the controller and checks status and body. At most 1 MiB of
/// the body is read.
///
/// Only URLs that `targets` allows are fetched, and redirects are not followed: a
/// redirect would lead anywhere the allowed server says.
pub fn http_check(
    url: &str,
    check: &HttpCheck,
    targets: &HttpTargets,
) -> Result<u16, HttpCheckError> {
    use std::io::Read;
    targets.check(url)?;
    let fail = |message: String| HttpCheckError::Failed {
        url: url.to_string(),
        message,
    };
    let agent = ureq::AgentBuilder::new()
        .timeout(check.timeout)
        .redirects(0)
        .build();
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

#[cfg(test)]
mod http_target_tests {
    use super::*;

    #[test]
    fn inventory_hosts_and_the_allowlist_are_the_only_targets() {
        let t = HttpTargets {
            hosts: vec!["web1".into(), "10.0.0.5".into(), "::1".into()],
            allow: vec![
                "https://status.example.com/api/".into(),
                "Mon.Example".into(),
            ],
        };
        for ok in [
            "http://web1/health",
            "http://WEB1:8080/",
            "http://10.0.0.5:9100/metrics",
            "http://[::1]:80/",
            "https://status.example.com/api/v1",
            "http://mon.example/",
        ] {
            assert!(t.check(ok).is_ok(), "{ok}");
        }
        for bad in [
            "http://169.254.169.254/latest/meta-data/",
            "http://web1@169.254.169.254/",
            "http://web1.evil.test/",
            "https://status.example.com/apix",
            "https://status.example.com/",
            "ftp://web1/",
            "not a url",
        ] {
            assert!(t.check(bad).is_err(), "{bad}");
        }
        let e = t.check("http://169.254.169.254/").unwrap_err().to_string();
        assert!(
            e.contains("http_check_allow") && e.contains("169.254.169.254"),
            "{e}"
        );
    }
}
