//! RPM hosts for the lab: real `acme-agent` RPMs built with `rpmbuild`, and the
//! per-host trees that make a lab host an RPM system (its own `/var/lib/rpm`, an
//! `/etc/os-release` that says RHEL, and a `~/.rpmmacros` pointing rpm at that
//! database, since Debian's rpm defaults to `~/.rpmdb`).
//!
//! It owns the `rpms/` and `template-rpm/` folders of a lab directory and the trees
//! it seeds into an RPM host's folder. It must not touch this machine's own rpm
//! state, `/etc` or `/usr/lib/os-release`: everything it installs goes into a
//! template folder bind-mounted in a private mount namespace, and a host sees its
//! copies only inside its own namespace.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};

use serde::{Deserialize, Serialize};

use super::deb::{BAD_VERSION, BASE_VERSION, GOOD_VERSION, PACKAGE};
use super::{run_tool, wait_tool, write, Fleet, LabError};
use crate::transport::quote;

/// The release every lab RPM carries: `rpm -q` reports `1.0.1-1`.
pub const RELEASE: &str = "1";
/// Stands in for the base system a real RHEL host has (bash provides `/bin/sh`,
/// which any package with a shell scriptlet requires).
pub const BASE_PACKAGE: &str = "lab-base";
/// The folder of a lab directory that holds the RPMs.
pub const RPMS_DIR: &str = "rpms";
/// The folder of a lab directory every RPM host is seeded from.
pub const TEMPLATE: &str = "template-rpm";
/// Where an RPM host keeps its database (the RHEL default).
pub const DB_PATH: &str = "/var/lib/rpm";

/// What an RPM host says it is: enough for the facts probe to call it RHEL.
const OS_RELEASE: &str = "NAME=\"Red Hat Enterprise Linux\"\n\
VERSION=\"9.4 (Plow)\"\n\
ID=\"rhel\"\n\
ID_LIKE=\"fedora\"\n\
VERSION_ID=\"9.4\"\n\
PRETTY_NAME=\"Red Hat Enterprise Linux 9.4 (Plow), patchbook lab host\"\n";

/// Which package database a lab host carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PkgDb {
    /// A Debian host: dpkg database, Debian's own os-release.
    #[default]
    Dpkg,
    /// A RHEL host: rpm database in `/var/lib/rpm`, os-release `ID=rhel`, an empty
    /// dpkg database (the dpkg tools stay on the path, as rpm does on Debian).
    Rpm,
}

impl PkgDb {
    /// The name, which is also the inventory group of such hosts.
    pub fn as_str(self) -> &'static str {
        match self {
            PkgDb::Dpkg => "dpkg",
            PkgDb::Rpm => "rpm",
        }
    }
}

/// The package databases of a whole fleet, as `lab up --pkg` takes them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Packaging {
    #[default]
    Dpkg,
    Rpm,
    /// The first half (rounded up) dpkg hosts, the rest RPM hosts.
    Mixed,
}

impl Packaging {
    /// One kind per host, for `n` hosts.
    pub fn kinds(self, n: usize) -> Vec<PkgDb> {
        match self {
            Packaging::Dpkg => vec![PkgDb::Dpkg; n],
            Packaging::Rpm => vec![PkgDb::Rpm; n],
            Packaging::Mixed => (0..n)
                .map(|i| {
                    if i < n.div_ceil(2) {
                        PkgDb::Dpkg
                    } else {
                        PkgDb::Rpm
                    }
                })
                .collect(),
        }
    }
}

impl std::str::FromStr for Packaging {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "dpkg" => Ok(Packaging::Dpkg),
            "rpm" => Ok(Packaging::Rpm),
            "mixed" => Ok(Packaging::Mixed),
            other => Err(format!(
                "unknown package database {other:?}: use dpkg, rpm or mixed (half each)"
            )),
        }
    }
}

/// File name the lab gives a version of `acme-agent` as an RPM.
pub fn file_name(version: &str) -> String {
    format!("{PACKAGE}-{version}-{RELEASE}.noarch.rpm")
}

/// The version `rpm -q` reports for a lab version (`1.0.1` → `1.0.1-1`).
pub fn evr(version: &str) -> String {
    format!("{version}-{RELEASE}")
}

/// Builds `lab-base` and the three `acme-agent` versions into `out_dir` at once;
/// returns the acme-agent paths in version order. 1.0.2 is the bad patch: rpm
/// installs it (a failing `%post` is only a warning to rpm, unlike dpkg's
/// postinst), but its health check `/opt/acme/agent.sh --check` fails.
pub fn build_acme_agent(out_dir: &Path) -> Result<Vec<PathBuf>, LabError> {
    std::fs::create_dir_all(out_dir).map_err(LabError::io(out_dir))?;
    let top = tempfile::Builder::new()
        .prefix("rpmbuild-")
        .tempdir_in(out_dir)
        .map_err(LabError::io(out_dir))?;
    let mut builds = vec![spawn_rpmbuild(
        top.path(),
        out_dir,
        "lab-base",
        &base_spec(),
    )?];
    for v in [BASE_VERSION, GOOD_VERSION, BAD_VERSION] {
        let root = top.path().join(format!("payload-{v}"));
        write_payload(&root, v)?;
        builds.push(spawn_rpmbuild(
            top.path(),
            out_dir,
            &format!("{PACKAGE}-{v}"),
            &acme_agent_spec(v, &root),
        )?);
    }
    for (mut child, what) in builds {
        wait_tool(&mut child, &what)?;
    }
    Ok([BASE_VERSION, GOOD_VERSION, BAD_VERSION]
        .iter()
        .map(|v| out_dir.join(file_name(v)))
        .collect())
}

fn base_spec() -> String {
    "Name: lab-base\nVersion: 1\nRelease: 1\n\
     Summary: The base system of a patchbook lab RPM host\n\
     License: MIT\nBuildArch: noarch\nAutoReqProv: no\nProvides: /bin/sh\n\n\
     %description\nProvides what bash and filesystem provide on a real RHEL host.\n\n\
     %files\n"
        .to_string()
}

fn acme_agent_spec(version: &str, payload: &Path) -> String {
    let post = if version == BAD_VERSION {
        "%post\necho \"acme-agent: %post failed: service did not start\" >&2\nexit 1\n\n"
    } else {
        ""
    };
    format!(
        "Name: {PACKAGE}\nVersion: {version}\nRelease: {RELEASE}\n\
         Summary: ACME monitoring agent {version} (patchbook lab package)\n\
         License: MIT\nBuildArch: noarch\nAutoReqProv: no\n\n\
         %description\nACME monitoring agent {version}, built by the patchbook lab.\n\n\
         %install\ncp -a {src}/. %{{buildroot}}/\n\n\
         {post}\
         %files\n\
         %dir %attr(0755,root,root) /opt/acme\n\
         %attr(0755,root,root) /opt/acme/agent.sh\n\
         %attr(0644,root,root) /opt/acme/VERSION\n\
         %config(noreplace) %attr(0644,root,root) /etc/acme/agent.conf\n",
        src = quote::word(&payload.to_string_lossy()),
    )
}

/// The files acme-agent puts on a host, laid out under `root`.
fn write_payload(root: &Path, version: &str) -> Result<(), LabError> {
    let check = if version == BAD_VERSION {
        "echo \"acme-agent $v: service did not start\" >&2; exit 1"
    } else {
        "echo \"acme-agent $v ok\"; exit 0"
    };
    let agent = format!(
        "#!/bin/sh\n\
         # acme-agent {version}: prints its version; `--check` is the health check.\n\
         v=$(cat /opt/acme/VERSION) || exit 2\n\
         case \"$1\" in\n\
         \x20 --check) {check} ;;\n\
         \x20 *) echo \"acme-agent $v\" ;;\n\
         esac\n"
    );
    let files = [
        ("opt/acme/agent.sh", agent, 0o755),
        ("opt/acme/VERSION", format!("{version}\n"), 0o644),
        (
            "etc/acme/agent.conf",
            "# acme-agent settings\ninterval = 60\n".to_string(),
            0o644,
        ),
    ];
    for (rel, contents, mode) in files {
        let p = root.join(rel);
        if let Some(parent) = p.parent() {
            std::fs::create_dir_all(parent).map_err(LabError::io(parent))?;
        }
        write(&p, &contents)?;
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode))
            .map_err(LabError::io(&p))?;
    }
    Ok(())
}

/// Starts one `rpmbuild -bb` of `spec` in its own top folder under `top`, writing
/// the RPM straight into `out_dir` under [`file_name`]'s pattern.
fn spawn_rpmbuild(
    top: &Path,
    out_dir: &Path,
    name: &str,
    spec: &str,
) -> Result<(Child, String), LabError> {
    let topdir = top.join(format!("top-{name}"));
    std::fs::create_dir_all(&topdir).map_err(LabError::io(&topdir))?;
    let spec_path = topdir.join(format!("{name}.spec"));
    write(&spec_path, spec)?;
    let define = |k: &str, v: &str| format!("{k} {v}");
    let child = std::process::Command::new("rpmbuild")
        .arg("-bb")
        .arg("--quiet")
        .arg("--define")
        .arg(define("_topdir", &topdir.to_string_lossy()))
        .arg("--define")
        .arg(define("_rpmdir", &out_dir.to_string_lossy()))
        .arg("--define")
        .arg("_build_name_fmt %%{NAME}-%%{VERSION}-%%{RELEASE}.%%{ARCH}.rpm")
        // The distribution's post-install scripts (strip, compress, byte-compile)
        // have nothing to do for two shell files and cost seconds.
        .arg("--define")
        .arg("__os_install_post %{nil}")
        .arg("--define")
        .arg("_build_id_links none")
        .arg(&spec_path)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|_| LabError::MissingTool {
            tool: "rpmbuild".into(),
        })?;
    Ok((child, format!("rpmbuild {name}")))
}

/// Checks the rpm tools and makes the mount point an RPM host's database is bound
/// over (an empty folder on this machine; Debian's own rpm uses `~/.rpmdb`).
pub(super) fn preflight() -> Result<(), LabError> {
    for tool in ["rpm", "rpmbuild", "rpmdb"] {
        if !super::which(tool) {
            return Err(LabError::MissingTool { tool: tool.into() });
        }
    }
    std::fs::create_dir_all(DB_PATH).map_err(LabError::io(Path::new(DB_PATH)))
}

/// Builds the RPMs into `dir/rpms` and the tree every RPM host starts from into
/// `dir/template-rpm`: an rpm database holding lab-base and acme-agent 1.0.0, the
/// `/opt` and `/etc/acme` that install left, an empty dpkg database, a home with
/// `.rpmmacros`, and the os-release file.
pub(super) fn build_template(dir: &Path) -> Result<(), LabError> {
    build_acme_agent(&dir.join(RPMS_DIR))?;
    let t = dir.join(TEMPLATE);
    let _ = std::fs::remove_dir_all(&t);
    for sub in ["rpm", "dpkg", "opt", "etc-acme"] {
        std::fs::create_dir_all(t.join(sub)).map_err(LabError::io(&t))?;
    }
    super::empty_dpkg_admin(&t.join("dpkg"))?;
    seed_home(&t.join("root"))?;
    // The trees every host mounts (its init, /run, boot id, apt state).
    super::init::seed_init(&t)?;
    super::apt::seed(&t)?;
    write(&t.join("dpkg.log"), "")?;
    write(&t.join("os-release"), OS_RELEASE)?;
    run_tool(
        std::process::Command::new("rpmdb")
            .arg("--initdb")
            .arg("--dbpath")
            .arg(t.join("rpm")),
        "rpmdb --initdb (lab template)",
    )?;
    let rpms = dir.join(RPMS_DIR);
    let script = format!(
        "{} && {} && rpm -i --dbpath {DB_PATH} -- {} {}",
        super::bind_mounts(&t),
        bind_mounts(&t),
        quote::word(&rpms.join("lab-base-1-1.noarch.rpm").to_string_lossy()),
        quote::word(&rpms.join(file_name(BASE_VERSION)).to_string_lossy()),
    );
    run_tool(
        std::process::Command::new("unshare")
            .args(["-m", "--propagation", "private", "sh", "-c"])
            .arg(script),
        "rpm -i acme-agent 1.0.0 (lab template)",
    )
}

/// The mount commands an RPM host adds to [`super::bind_mounts`]: its database and
/// its os-release (`/etc/os-release` is a symlink on Debian; the bind lands on
/// `/usr/lib/os-release`, so both names say RHEL inside the host).
pub(super) fn bind_mounts(hdir: &Path) -> String {
    let q = |s: &str| quote::word(&hdir.join(s).to_string_lossy());
    format!(
        "mount --bind {} {DB_PATH} && mount --bind {} /etc/os-release",
        q("rpm"),
        q("os-release")
    )
}

/// Puts an RPM host's trees into the template's state. The folders and files stay
/// (they are mount sources of a running host); only their contents are replaced.
pub(super) fn seed_host(template: &Path, hdir: &Path) -> Result<(), LabError> {
    for sub in ["rpm", "dpkg", "opt", "etc-acme", "root"] {
        let d = hdir.join(sub);
        std::fs::create_dir_all(&d).map_err(LabError::io(&d))?;
        super::clear_dir(&d)?;
        super::copy_tree(&template.join(sub), &d)?;
    }
    super::init::seed_init(hdir)?;
    super::apt::seed(hdir)?;
    write(&hdir.join("os-release"), OS_RELEASE)?;
    write(&hdir.join("dpkg.log"), "")
}

/// An RPM host's `/root`: a plain shell, and rpm pointed at `/var/lib/rpm`.
fn seed_home(home: &Path) -> Result<(), LabError> {
    super::seed_home(home)?;
    write(
        &home.join(".rpmmacros"),
        &format!("# lab RPM host: the database lives where RHEL keeps it\n%_dbpath {DB_PATH}\n"),
    )
}

impl Fleet {
    /// An RPM of `acme-agent` at `version` (`1.0.0`, `1.0.1`, `1.0.2`).
    pub fn rpm(&self, version: &str) -> PathBuf {
        self.dir.join(RPMS_DIR).join(file_name(version))
    }

    /// The host's own rpm database folder, as seen from the controller.
    pub fn rpm_db(&self, name: &str) -> Result<PathBuf, LabError> {
        Ok(self.host(name)?.dir.join("rpm"))
    }

    /// The `VERSION-RELEASE` of `package` in the host's rpm database, asked with
    /// `rpm -q --dbpath` from the controller side; `None` when it is not installed.
    pub fn rpm_installed_version(
        &self,
        name: &str,
        package: &str,
    ) -> Result<Option<String>, LabError> {
        let db = self.rpm_db(name)?;
        let out = std::process::Command::new("rpm")
            .arg("-q")
            .arg("--dbpath")
            .arg(&db)
            .args(["--qf", "%{VERSION}-%{RELEASE}\\n", "--", package])
            .output()
            .map_err(|e| LabError::Tool {
                tool: "rpm -q".into(),
                status: "did not start".into(),
                stderr: e.to_string(),
            })?;
        let text = String::from_utf8_lossy(&out.stdout);
        Ok(match out.status.code() {
            Some(0) => text.lines().next().map(str::to_string),
            // rpm -q says "package … is not installed" and exits 1.
            Some(1) if text.contains("is not installed") => None,
            _ => {
                return Err(LabError::Tool {
                    tool: format!("rpm -q --dbpath {}", db.display()),
                    status: out.status.to_string(),
                    stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
                })
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builds_three_noarch_versions_and_only_the_bad_one_fails_its_check() {
        let dir = tempfile::tempdir().unwrap();
        let rpms = build_acme_agent(dir.path()).unwrap();
        assert_eq!(rpms.len(), 3);
        for (rpm, v) in rpms.iter().zip([BASE_VERSION, GOOD_VERSION, BAD_VERSION]) {
            let out = std::process::Command::new("rpm")
                .args(["-qp", "--qf", "%{NAME} %{VERSION}-%{RELEASE} %{ARCH}"])
                .arg(rpm)
                .output()
                .unwrap();
            assert_eq!(
                String::from_utf8_lossy(&out.stdout),
                format!("acme-agent {} noarch", evr(v))
            );
            let scripts = std::process::Command::new("rpm")
                .args(["-qp", "--scripts"])
                .arg(rpm)
                .output()
                .unwrap();
            let scripts = String::from_utf8_lossy(&scripts.stdout);
            assert_eq!(scripts.contains("exit 1"), v == BAD_VERSION, "{scripts}");
        }
        let base = dir.path().join("lab-base-1-1.noarch.rpm");
        let provides = std::process::Command::new("rpm")
            .args(["-qp", "--provides"])
            .arg(&base)
            .output()
            .unwrap();
        assert!(String::from_utf8_lossy(&provides.stdout).contains("/bin/sh"));
        // No build folder is left behind next to the packages.
        let left: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| !n.ends_with(".rpm"))
            .collect();
        assert!(left.is_empty(), "{left:?}");
    }

    #[test]
    fn mixed_packaging_puts_dpkg_hosts_first() {
        use PkgDb::*;
        assert_eq!(Packaging::Mixed.kinds(3), [Dpkg, Dpkg, Rpm]);
        assert_eq!(Packaging::Rpm.kinds(2), [Rpm, Rpm]);
        assert!("deb".parse::<Packaging>().is_err());
    }
}
