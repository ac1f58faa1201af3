//! Jump hosts (`ProxyJump`) as an inventory states them: the native `jump` key,
//! `-o ProxyJump=…` or `-J …` inside `ansible_ssh_common_args` /
//! `ansible_ssh_extra_args`, and the `[user@]host[:port]` spec grammar OpenSSH uses.
//!
//! It owns reading those values into [`JumpHost`]s, resolving hop names that are
//! inventory hosts into that host's address, port, user and identity, and the
//! warnings for connection settings patchbook does not understand. It must not
//! dial anything: the transport walks the chain.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::literal::shlex_split;

/// One bastion on the way to a host, in dialling order. Fields the inventory
/// leaves open (`None`) may still come from `~/.ssh/config` in the transport.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JumpHost {
    /// The inventory host name when the hop is one, otherwise the spec's host part:
    /// what messages and ssh_config `Host` patterns see.
    pub name: String,
    pub address: String,
    pub port: Option<u16>,
    pub user: Option<String>,
    pub identity: Option<PathBuf>,
}

impl JumpHost {
    /// Parses `[user@]host[:port]`, `[user@][v6addr]:port` or
    /// `ssh://[user@]host[:port]`.
    pub fn parse(spec: &str) -> Result<JumpHost, String> {
        let s = spec.trim();
        let s = s.strip_prefix("ssh://").unwrap_or(s);
        let (user, rest) = match s.rsplit_once('@') {
            Some((u, r)) if !u.is_empty() => (Some(u.to_string()), r),
            Some(_) => return Err(format!("jump host `{spec}` has an empty user before `@`")),
            None => (None, s),
        };
        let (host, port) = if let Some(v6) = rest.strip_prefix('[') {
            let (addr, after) = v6
                .split_once(']')
                .ok_or_else(|| format!("jump host `{spec}` opens `[` without closing it"))?;
            (addr, after.strip_prefix(':'))
        } else {
            match rest.rsplit_once(':') {
                Some((h, p)) if !h.contains(':') => (h, Some(p)),
                _ => (rest, None),
            }
        };
        if host.is_empty() || host.contains(char::is_whitespace) {
            return Err(format!("jump host `{spec}` names no host"));
        }
        let port = port
            .map(|p| {
                p.parse::<u16>()
                    .ok()
                    .filter(|p| *p != 0)
                    .ok_or_else(|| format!("jump host `{spec}`: `{p}` is not a port number"))
            })
            .transpose()?;
        Ok(JumpHost {
            name: host.to_string(),
            address: host.to_string(),
            port,
            user,
            identity: None,
        })
    }
}

/// Splits a `ProxyJump` value (`a,b,c`; `none` for no jump) into its specs.
pub fn split_chain(value: &str) -> Vec<String> {
    if value.trim().eq_ignore_ascii_case("none") {
        return Vec::new();
    }
    value
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(String::from)
        .collect()
}

/// What `ansible_ssh_common_args` (or `_extra_args`) says: the jump chain, if it
/// names one, and every part patchbook does not act on, as `(key, what)` pairs.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct SshArgs {
    pub jump: Option<Vec<String>>,
    pub ignored: Vec<(String, String)>,
}

/// Reads OpenSSH command-line arguments as Ansible passes them to `ssh`.
/// `ProxyJump` (`-o ProxyJump=…`, `-oProxyJump …`, `-J …`) is taken; any other
/// option or flag is listed in [`SshArgs::ignored`] so the caller can warn.
pub fn parse_ssh_args(args: &str) -> Result<SshArgs, String> {
    let words = shlex_split(args).map_err(|e| format!("cannot split `{args}`: {e}"))?;
    let mut out = SshArgs::default();
    let mut i = 0;
    let next = |i: &mut usize, flag: &str| -> Result<String, String> {
        *i += 1;
        words
            .get(*i)
            .cloned()
            .ok_or_else(|| format!("`{flag}` at the end of `{args}` has no value"))
    };
    while i < words.len() {
        let w = words[i].clone();
        if let Some(inline) = w.strip_prefix("-o") {
            let option = if inline.is_empty() {
                next(&mut i, "-o")?
            } else {
                inline.to_string()
            };
            let (key, value) = match option.split_once('=') {
                Some((k, v)) => (k.trim().to_string(), v.trim().to_string()),
                None => match option.trim().split_once(char::is_whitespace) {
                    Some((k, v)) => (k.to_string(), v.trim().to_string()),
                    None => (option.trim().to_string(), String::new()),
                },
            };
            if key.eq_ignore_ascii_case("ProxyJump") {
                out.jump = Some(split_chain(&value));
            } else {
                out.ignored
                    .push((format!("-o {key}"), format!("-o {key}={value}")));
            }
        } else if let Some(inline) = w.strip_prefix("-J") {
            let value = if inline.is_empty() {
                next(&mut i, "-J")?
            } else {
                inline.to_string()
            };
            out.jump = Some(split_chain(&value));
        } else {
            out.ignored.push((w.clone(), w));
        }
        i += 1;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hop(name: &str, port: Option<u16>, user: Option<&str>) -> JumpHost {
        JumpHost {
            name: name.into(),
            address: name.into(),
            port,
            user: user.map(String::from),
            identity: None,
        }
    }

    #[test]
    fn specs_parse_like_openssh() {
        assert_eq!(
            JumpHost::parse("ops@bastion.example:2222").unwrap(),
            hop("bastion.example", Some(2222), Some("ops"))
        );
        assert_eq!(JumpHost::parse("b2").unwrap(), hop("b2", None, None));
        assert_eq!(
            JumpHost::parse("ssh://me@gw:22").unwrap(),
            hop("gw", Some(22), Some("me"))
        );
        assert_eq!(
            JumpHost::parse("[::1]:2200").unwrap(),
            hop("::1", Some(2200), None)
        );
        for bad in ["@gw", "gw:http", "gw:0", "[::1", ""] {
            assert!(JumpHost::parse(bad).is_err(), "{bad:?} parsed");
        }
    }

    #[test]
    fn proxyjump_comes_from_every_spelling_in_common_args() {
        for args in [
            "-o ProxyJump=ops@b1:2222,b2",
            "-o 'ProxyJump ops@b1:2222,b2'",
            "-oProxyJump=ops@b1:2222,b2",
            "-J ops@b1:2222,b2",
            "-Jops@b1:2222,b2",
            "-o proxyjump=ops@b1:2222,b2",
        ] {
            let got = parse_ssh_args(args).unwrap();
            assert_eq!(
                got.jump,
                Some(vec!["ops@b1:2222".to_string(), "b2".to_string()]),
                "{args}"
            );
            assert!(got.ignored.is_empty(), "{args}: {:?}", got.ignored);
        }
        assert_eq!(
            parse_ssh_args("-o ProxyJump=none").unwrap().jump,
            Some(vec![])
        );
        assert!(parse_ssh_args("-J").is_err());
    }

    #[test]
    fn options_patchbook_does_not_act_on_are_listed() {
        let got = parse_ssh_args(
            "-o StrictHostKeyChecking=no -J b1 -o ProxyCommand='ssh -W %h:%p gw' -C",
        )
        .unwrap();
        assert_eq!(got.jump, Some(vec!["b1".to_string()]));
        let keys: Vec<&str> = got.ignored.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(keys, ["-o StrictHostKeyChecking", "-o ProxyCommand", "-C"]);
    }
}
