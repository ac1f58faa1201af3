//! Small real `.deb` packages for the lab, built with `dpkg-deb`.
//!
//! It owns the `acme-agent` test package in its three versions (1.0.0 installed at
//! start, 1.0.1 the good patch, 1.0.2 the bad patch whose `postinst` fails). It must
//! not install anything: installing is the fleet's job, inside a host's namespace.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use super::LabError;

/// The package every lab host runs.
pub const PACKAGE: &str = "acme-agent";
/// Installed on every host by `lab up`.
pub const BASE_VERSION: &str = "1.0.0";
/// The good patch.
pub const GOOD_VERSION: &str = "1.0.1";
/// The bad patch: its `postinst` exits 1.
pub const BAD_VERSION: &str = "1.0.2";

/// One file a package puts on the host.
struct PayloadFile {
    path: &'static str,
    contents: String,
    mode: u32,
}

/// What goes into one package.
struct DebSpec {
    name: &'static str,
    version: String,
    description: String,
    files: Vec<PayloadFile>,
    conffiles: Vec<&'static str>,
    postinst: String,
}

/// File name the lab gives a version of `acme-agent`.
pub fn file_name(version: &str) -> String {
    format!("{PACKAGE}_{version}_all.deb")
}

/// Builds the three `acme-agent` versions into `out_dir`; returns their paths in
/// version order.
pub fn build_acme_agent(out_dir: &Path) -> Result<Vec<PathBuf>, LabError> {
    std::fs::create_dir_all(out_dir).map_err(LabError::io(out_dir))?;
    [BASE_VERSION, GOOD_VERSION, BAD_VERSION]
        .iter()
        .map(|v| build(&acme_agent(v), out_dir))
        .collect()
}

fn acme_agent(version: &str) -> DebSpec {
    let agent = format!(
        "#!/bin/sh\n\
         # acme-agent {version}: prints its version; `--check` is the health check.\n\
         v=$(cat /opt/acme/VERSION) || exit 2\n\
         case \"$1\" in\n\
         \x20 --check) echo \"acme-agent $v ok\"; exit 0 ;;\n\
         \x20 *) echo \"acme-agent $v\" ;;\n\
         esac\n"
    );
    let postinst = if version == BAD_VERSION {
        "#!/bin/sh\necho \"acme-agent: postinst failed: service did not start\" >&2\nexit 1\n"
            .to_string()
    } else {
        "#!/bin/sh\nexit 0\n".to_string()
    };
    DebSpec {
        name: PACKAGE,
        version: version.to_string(),
        description: format!("ACME monitoring agent {version} (patchbook lab package)"),
        files: vec![
            PayloadFile {
                path: "opt/acme/agent.sh",
                contents: agent,
                mode: 0o755,
            },
            PayloadFile {
                path: "opt/acme/VERSION",
                contents: format!("{version}\n"),
                mode: 0o644,
            },
            PayloadFile {
                path: "etc/acme/agent.conf",
                contents: "# acme-agent settings\ninterval = 60\n".to_string(),
                mode: 0o644,
            },
        ],
        conffiles: vec!["/etc/acme/agent.conf"],
        postinst,
    }
}

fn build(spec: &DebSpec, out_dir: &Path) -> Result<PathBuf, LabError> {
    let out = out_dir.join(format!("{}_{}_all.deb", spec.name, spec.version));
    let root = tempfile::Builder::new()
        .prefix("deb-root-")
        .tempdir_in(out_dir)
        .map_err(LabError::io(out_dir))?;
    let r = root.path();
    let write = |rel: &str, contents: &str, mode: u32| -> Result<(), LabError> {
        let p = r.join(rel);
        if let Some(parent) = p.parent() {
            std::fs::create_dir_all(parent).map_err(LabError::io(parent))?;
            std::fs::set_permissions(parent, std::fs::Permissions::from_mode(0o755))
                .map_err(LabError::io(parent))?;
        }
        std::fs::write(&p, contents).map_err(LabError::io(&p))?;
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode))
            .map_err(LabError::io(&p))
    };
    for f in &spec.files {
        write(f.path, &f.contents, f.mode)?;
    }
    write(
        "DEBIAN/control",
        &format!(
            "Package: {}\nVersion: {}\nArchitecture: all\nMaintainer: ACME Ops <ops@example.com>\n\
             Section: admin\nPriority: optional\nDescription: {}\n",
            spec.name, spec.version, spec.description
        ),
        0o644,
    )?;
    let conffiles: String = spec.conffiles.iter().map(|c| format!("{c}\n")).collect();
    write("DEBIAN/conffiles", &conffiles, 0o644)?;
    write("DEBIAN/postinst", &spec.postinst, 0o755)?;
    for dir in ["opt", "etc"] {
        let _ = std::fs::set_permissions(r.join(dir), std::fs::Permissions::from_mode(0o755));
    }
    std::fs::set_permissions(r, std::fs::Permissions::from_mode(0o755)).map_err(LabError::io(r))?;
    super::run_tool(
        std::process::Command::new("dpkg-deb")
            .args(["--root-owner-group", "-Zgzip", "--build"])
            .arg(r)
            .arg(&out),
        "dpkg-deb",
    )?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builds_three_versions_with_the_right_control_fields() {
        let dir = tempfile::tempdir().unwrap();
        let debs = build_acme_agent(dir.path()).unwrap();
        assert_eq!(debs.len(), 3);
        for (deb, v) in debs.iter().zip([BASE_VERSION, GOOD_VERSION, BAD_VERSION]) {
            let out = std::process::Command::new("dpkg-deb")
                .args(["-f"])
                .arg(deb)
                .arg("Version")
                .output()
                .unwrap();
            assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), v);
        }
        let postinst = std::process::Command::new("dpkg-deb")
            .arg("--ctrl-tarfile")
            .arg(&debs[2])
            .output()
            .unwrap();
        assert!(!postinst.stdout.is_empty());
    }
}
