//! Lab hosts whose login user is not root: a user who logs in with the lab's key
//! and becomes root with sudo and a password, as on servers where root cannot
//! log in.
//!
//! It owns a host's per-host account files (`auth/passwd`, `auth/group`,
//! `auth/shadow`, bind-mounted over the `/etc` ones), its `sudoers.d` (over
//! `/etc/sudoers.d`) and its `home` (over `/home`), all mounted into the running
//! host's mount namespace only. It must not change the machine's own accounts,
//! sudoers or `/home`, and must never put the password anywhere but the hashed
//! shadow entry: it reaches `openssl` on stdin.

use std::io::Write as _;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Stdio;

use super::{quote, write, Fleet, LabError};

/// First user and group id tried for a lab login user.
const FIRST_ID: u32 = 2000;

/// What sudo asks of the lab user.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SudoRule {
    /// The user's password, as most fleets require.
    Password,
    /// Nothing (`NOPASSWD: ALL`), as `[ssh] become` requires.
    NoPassword,
}

impl Fleet {
    /// Gives host `name` a login user `user` (the lab's key, a home in `/home`,
    /// `password` as its password) who may run anything as root through sudo, as
    /// `rule` says. The host keeps running; only its own view of the accounts
    /// changes.
    pub fn add_sudo_user(
        &self,
        name: &str,
        user: &str,
        password: &str,
        rule: SudoRule,
    ) -> Result<(), LabError> {
        if user.is_empty()
            || !user
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
        {
            return Err(LabError::Tool {
                tool: "add_sudo_user".into(),
                status: "refused".into(),
                stderr: format!("`{user}` is not a plain user name"),
            });
        }
        let host = self.host(name)?;
        let etc = |f: &str| {
            let p = Path::new("/etc").join(f);
            std::fs::read_to_string(&p).map_err(LabError::io(&p))
        };
        let (passwd, group, shadow) = (etc("passwd")?, etc("group")?, etc("shadow")?);
        let id = free_id(&passwd, &group);
        let hash = sha512_crypt(password)?;

        let auth = host.dir.join("auth");
        let sudoers = host.dir.join("sudoers.d");
        let home = host.dir.join("home");
        let ssh = home.join(user).join(".ssh");
        for d in [&auth, &sudoers, &ssh] {
            std::fs::create_dir_all(d).map_err(LabError::io(d))?;
        }
        write(
            &auth.join("passwd"),
            &format!("{passwd}{user}:x:{id}:{id}:patchbook lab:/home/{user}:/bin/sh\n"),
        )?;
        write(&auth.join("group"), &format!("{group}{user}:x:{id}:\n"))?;
        let shadow_path = auth.join("shadow");
        write(
            &shadow_path,
            &format!("{shadow}{user}:{hash}:19000:0:99999:7:::\n"),
        )?;
        set_mode(&shadow_path, 0o640)?;
        // Lab hosts have no mailer: no mail about a wrong password either.
        let tag = match rule {
            SudoRule::Password => "",
            SudoRule::NoPassword => "NOPASSWD: ",
        };
        let rule_file = sudoers.join(user);
        write(
            &rule_file,
            &format!("{user} ALL=(ALL:ALL) {tag}ALL\nDefaults:{user} !mail_badpass\n"),
        )?;
        set_mode(&rule_file, 0o440)?;
        let keys = ssh.join("authorized_keys");
        let controller = self.dir().join("authorized_keys");
        std::fs::copy(&controller, &keys).map_err(LabError::io(&controller))?;
        super::run_tool(
            std::process::Command::new("chown")
                .arg("-R")
                .arg(format!("{id}:{id}"))
                .arg(home.join(user)),
            "chown lab user home",
        )?;

        let q = |p: &Path| quote::word(&p.to_string_lossy());
        let script = format!(
            "mount --bind {} /etc/passwd && mount --bind {} /etc/group && \
             mount --bind {} /etc/shadow && mount --bind {} /etc/sudoers.d && \
             mount --bind {} /home",
            q(&auth.join("passwd")),
            q(&auth.join("group")),
            q(&shadow_path),
            q(&sudoers),
            q(&home)
        );
        let out = self.exec_in(name, &["sh", "-c", &script])?;
        if !out.status.success() {
            return Err(LabError::Tool {
                tool: format!("mount the accounts of {name}"),
                status: out.status.to_string(),
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            });
        }
        Ok(())
    }
}

/// The first id from [`FIRST_ID`] up used by no user and no group.
fn free_id(passwd: &str, group: &str) -> u32 {
    let used: Vec<u32> = passwd
        .lines()
        .chain(group.lines())
        .filter_map(|l| l.split(':').nth(2)?.parse().ok())
        .collect();
    (FIRST_ID..)
        .find(|id| !used.contains(id))
        .unwrap_or(FIRST_ID)
}

/// A `$6$` shadow hash of `password`, made by `openssl passwd` reading it on stdin.
fn sha512_crypt(password: &str) -> Result<String, LabError> {
    let tool = "openssl passwd -6 -stdin";
    let failed = |status: String, stderr: String| LabError::Tool {
        tool: tool.into(),
        status,
        stderr,
    };
    let mut child = std::process::Command::new("openssl")
        .args(["passwd", "-6", "-stdin"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|_| LabError::MissingTool {
            tool: "openssl".into(),
        })?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(format!("{password}\n").as_bytes())
            .map_err(|e| failed("stdin".into(), e.to_string()))?;
    }
    let out = child
        .wait_with_output()
        .map_err(|e| failed("lost".into(), e.to_string()))?;
    let hash = String::from_utf8_lossy(&out.stdout).trim().to_string();
    if !out.status.success() || !hash.starts_with("$6$") {
        return Err(failed(
            out.status.to_string(),
            String::from_utf8_lossy(&out.stderr).trim().to_string(),
        ));
    }
    Ok(hash)
}

fn set_mode(path: &Path, mode: u32) -> Result<(), LabError> {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(LabError::io(path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_lab_user_gets_an_id_no_user_or_group_has() {
        let passwd = "root:x:0:0::/root:/bin/sh\nann:x:2000:2000::/home/ann:/bin/sh\n";
        let group = "root:x:0:\nops:x:2001:\n";
        assert_eq!(free_id(passwd, group), 2002);
        assert_eq!(free_id("", ""), FIRST_ID);
    }
}
