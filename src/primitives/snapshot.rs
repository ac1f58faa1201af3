//! A host's state as a rollback rehearsal compares it: every installed package
//! and its version, every file, folder and link under some paths with its type,
//! mode, owner and (for files) SHA-256, and whether named services run. Read with
//! one read-only command; two snapshots compare into the lines a person reads.
//!
//! It owns reading and comparing; when to take a snapshot and what a difference
//! means for the run are the script layer's. It never changes the host.

use std::collections::BTreeMap;
use std::time::Duration;

use super::{HostCtx, PrimitiveError};
use crate::transport::quote;

/// What a snapshot covers.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Scope {
    /// Folders (or files) walked without crossing file systems.
    pub paths: Vec<String>,
    /// Process names whose running or not is part of the state.
    pub services: Vec<String>,
}

/// Paths a rehearsal compares when the policy names none: where packages and
/// admins put configuration and software.
pub const DEFAULT_PATHS: &[&str] = &["/etc", "/opt", "/usr/local"];

#[derive(Debug, Clone, PartialEq, Default)]
pub struct Snapshot {
    /// Package → version.
    pub packages: BTreeMap<String, String>,
    /// Path → `type mode uid:gid [sha256]`.
    pub files: BTreeMap<String, String>,
    /// Service → `running` or `stopped`.
    pub services: BTreeMap<String, String>,
}

impl Scope {
    fn script(&self) -> String {
        let mut s = String::from(
            "if command -v dpkg-query >/dev/null 2>&1; then \
               dpkg-query -W -f '${db:Status-Abbrev} ${Package} ${Version}\\n' | awk '$1 ~ /^.i/ {print \"pkg\", $2, $3}'; \
             else rpm -qa --qf 'pkg %{NAME} %{EPOCHNUM}:%{VERSION}-%{RELEASE}\\n'; fi\n",
        );
        if !self.paths.is_empty() {
            let paths: Vec<String> = self.paths.iter().map(|p| quote::word(p)).collect();
            let paths = paths.join(" ");
            s.push_str(&format!(
                "find {paths} -xdev -printf 'meta %y %m %U:%G %p\\n' 2>/dev/null\n\
                 find {paths} -xdev -type f -exec sha256sum {{}} + 2>/dev/null | sed 's/^/sha /'\n"
            ));
        }
        for svc in &self.services {
            s.push_str(&format!(
                "if pgrep -x {} >/dev/null; then echo \"svc {} running\"; else echo \"svc {} stopped\"; fi\n",
                quote::word(svc),
                quote::word(svc),
                quote::word(svc)
            ));
        }
        s
    }

    /// Reads the host's state.
    pub fn read(&self, ctx: &HostCtx, timeout: Duration) -> Result<Snapshot, PrimitiveError> {
        let argv = vec!["sh".to_string(), "-c".to_string(), self.script()];
        let r = super::exec::probe(ctx, &argv, timeout)?;
        if r.truncated {
            return Err(PrimitiveError::step(
                ctx.name(),
                "snapshot",
                "the host's state did not fit in one answer; give the rehearsal narrower `paths`",
            ));
        }
        Ok(parse(&r.stdout))
    }
}

/// Parses the output of [`Scope::read`]'s command.
pub fn parse(out: &str) -> Snapshot {
    let mut snap = Snapshot::default();
    let mut hashes: BTreeMap<String, String> = BTreeMap::new();
    for line in out.lines() {
        if let Some(rest) = line.strip_prefix("pkg ") {
            if let Some((name, version)) = rest.split_once(' ') {
                snap.packages.insert(name.to_string(), version.to_string());
            }
        } else if let Some(rest) = line.strip_prefix("meta ") {
            let mut f = rest.splitn(4, ' ');
            if let (Some(ty), Some(mode), Some(owner), Some(path)) =
                (f.next(), f.next(), f.next(), f.next())
            {
                snap.files
                    .insert(path.to_string(), format!("{ty} {mode} {owner}"));
            }
        } else if let Some(rest) = line.strip_prefix("sha ") {
            // sha256sum prints "HASH  PATH".
            if let Some((hash, path)) = rest.split_once("  ") {
                hashes.insert(path.to_string(), hash.to_string());
            }
        } else if let Some(rest) = line.strip_prefix("svc ") {
            if let Some((name, state)) = rest.split_once(' ') {
                snap.services.insert(name.to_string(), state.to_string());
            }
        }
    }
    for (path, hash) in hashes {
        if let Some(meta) = snap.files.get_mut(&path) {
            meta.push(' ');
            meta.push_str(&hash);
        }
    }
    snap
}

impl Snapshot {
    /// How many pieces of state it holds.
    pub fn size(&self) -> usize {
        self.packages.len() + self.files.len() + self.services.len()
    }

    /// One line per piece of state that differs from `before`.
    pub fn differences(&self, before: &Snapshot) -> Vec<String> {
        let mut out = Vec::new();
        diff("package", &before.packages, &self.packages, &mut out);
        diff("file", &before.files, &self.files, &mut out);
        diff("service", &before.services, &self.services, &mut out);
        out
    }
}

fn diff(
    what: &str,
    before: &BTreeMap<String, String>,
    after: &BTreeMap<String, String>,
    out: &mut Vec<String>,
) {
    for (k, b) in before {
        match after.get(k) {
            None => out.push(format!("{what} {k}: was `{b}`, now missing")),
            Some(a) if a != b => out.push(format!("{what} {k}: was `{b}`, now `{a}`")),
            Some(_) => {}
        }
    }
    for (k, a) in after {
        if !before.contains_key(k) {
            out.push(format!("{what} {k}: did not exist, now `{a}`"));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_of_difference_is_named() {
        let before = parse(
            "pkg acme-agent 1.0.0\nmeta f 644 0:0 /etc/acme/a b.conf\nsha 11  /etc/acme/a b.conf\n\
             meta d 755 0:0 /etc/acme\nsvc acme running\n",
        );
        assert_eq!(before.files["/etc/acme/a b.conf"], "f 644 0:0 11");
        assert!(before.differences(&before).is_empty());
        let after = parse(
            "pkg acme-agent 1.0.1\nmeta f 600 0:0 /etc/acme/a b.conf\nsha 11  /etc/acme/a b.conf\n\
             meta d 755 0:0 /etc/acme\nmeta f 600 0:0 /etc/acme/new\nsha 22  /etc/acme/new\n",
        );
        let d = after.differences(&before);
        assert_eq!(d.len(), 4, "{d:?}");
        assert!(d.iter().any(|l| l.starts_with("package acme-agent")));
        assert!(d.iter().any(|l| l.contains("/etc/acme/new: did not exist")));
        assert!(d
            .iter()
            .any(|l| l.starts_with("service acme: was `running`, now missing")));
    }

    #[test]
    fn reads_the_local_machine() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("x"), "hello").unwrap();
        let scope = Scope {
            paths: vec![dir.path().display().to_string()],
            services: vec!["no-such-daemon".into()],
        };
        let t = crate::transport::local::LocalTransport::new("here");
        let argv = vec!["sh".to_string(), "-c".to_string(), scope.script()];
        let out = super::super::exec::exec(&t, &argv, Duration::from_secs(30)).unwrap();
        let snap = parse(&out.stdout);
        let x = &snap.files[&dir.path().join("x").display().to_string()];
        assert!(
            x.ends_with("2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"),
            "{x}"
        );
        assert_eq!(snap.services["no-such-daemon"], "stopped");
        assert!(!snap.packages.is_empty(), "{}", out.stdout);
    }
}
