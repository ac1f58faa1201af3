//! Reading a host's installed packages with their source packages: one read-only
//! command per host (`dpkg-query` or `rpm -qa`), never a change.

use super::{HostPackages, InstalledPackage, Release};
use crate::primitives::facts::{self, PackageManager};
use crate::primitives::{HostCtx, PrimitiveError};
use crate::transport::Command;

const DPKG_FORMAT: &str =
    "${db:Status-Abbrev}\\t${binary:Package}\\t${Version}\\t${source:Package}\\t${source:Version}\\n";
const RPM_FORMAT: &str = "%{NAME}\\t%{EPOCH}:%{VERSION}-%{RELEASE}\\t%{SOURCERPM}\\n";

/// The argv that lists every installed package with its source.
pub fn list_argv(pm: PackageManager) -> Option<Vec<String>> {
    let words: Vec<&str> = match pm {
        PackageManager::Dpkg => vec!["dpkg-query", "-W", "-f", DPKG_FORMAT],
        PackageManager::Rpm => vec!["rpm", "-qa", "--qf", RPM_FORMAT],
        PackageManager::Unknown => return None,
    };
    Some(words.into_iter().map(str::to_string).collect())
}

/// Reads `dpkg-query` output; only fully or half installed packages count (`rc`,
/// removed with config left, carries no code).
pub fn parse_dpkg(text: &str) -> Vec<InstalledPackage> {
    text.lines()
        .filter_map(|l| {
            let mut f = l.split('\t');
            let status = f.next()?.trim();
            let (binary, version, source, source_version) =
                (f.next()?, f.next()?, f.next()?, f.next()?);
            if status.starts_with(['r', 'u', 'p']) || version.is_empty() {
                return None;
            }
            // dpkg prints an empty source for packages built from themselves in
            // some old databases.
            let source = if source.is_empty() {
                binary.split(':').next()?
            } else {
                source
            };
            Some(InstalledPackage {
                binary: binary.into(),
                version: version.into(),
                source: source.into(),
                source_version: if source_version.is_empty() {
                    version
                } else {
                    source_version
                }
                .into(),
            })
        })
        .collect()
}

/// Reads `rpm -qa` output. The source name comes from `SOURCERPM`
/// (`openssl-3.0.7-18.el9_2.src.rpm`); the version compared is the binary's own
/// EVR, which names the epoch the source RPM file name leaves out.
pub fn parse_rpm(text: &str) -> Vec<InstalledPackage> {
    text.lines()
        .filter_map(|l| {
            let mut f = l.split('\t');
            let (name, evr, srpm) = (f.next()?, f.next()?, f.next()?);
            let evr = evr.strip_prefix("(none):").unwrap_or(evr);
            // gpg-pubkey and friends have no source RPM.
            let source = srpm
                .strip_suffix(".src.rpm")
                .and_then(|nvr| nvr.rsplit_once('-'))
                .and_then(|(nv, _)| nv.rsplit_once('-'))
                .map(|(n, _)| n)?;
            Some(InstalledPackage {
                binary: name.into(),
                version: evr.into(),
                source: source.into(),
                source_version: evr.into(),
            })
        })
        .collect()
}

/// Facts and installed packages of one host.
pub fn scan(ctx: &HostCtx) -> Result<HostPackages, PrimitiveError> {
    let f = facts::facts(ctx)?;
    let release = Release::of_facts(&f);
    let os = format!("{} {}", f.os_id, f.os_version).trim().to_string();
    let Some(argv) = list_argv(f.package_manager) else {
        return Ok(HostPackages {
            host: ctx.name().into(),
            release: None,
            os,
            packages: Vec::new(),
        });
    };
    let cmd = Command::new(argv).timeout(ctx.timeout(std::time::Duration::from_secs(120)));
    let out = ctx.transport.run(&cmd)?;
    if !out.success() {
        return Err(PrimitiveError::failed(ctx.name(), "scan", &out));
    }
    let text = out.stdout_str();
    let packages = match f.package_manager {
        PackageManager::Rpm => parse_rpm(&text),
        _ => parse_dpkg(&text),
    };
    Ok(HostPackages {
        host: ctx.name().into(),
        release,
        os,
        packages,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dpkg_lines_name_their_source() {
        let p = parse_dpkg(
            "ii \tlibssl3:amd64\t3.0.11-1~deb12u2+b1\topenssl\t3.0.11-1~deb12u2\n\
             rc \told\t1.0\told\t1.0\n\
             ii \tcurl\t7.88.1-10\tcurl\t7.88.1-10\n",
        );
        assert_eq!(p.len(), 2);
        assert_eq!(&*p[0].source, "openssl");
        assert_eq!(&*p[0].source_version, "3.0.11-1~deb12u2");
        assert_eq!(&*p[0].version, "3.0.11-1~deb12u2+b1");
    }

    #[test]
    fn rpm_lines_take_the_source_from_sourcerpm() {
        let p = parse_rpm(
            "openssl-libs\t1:3.0.7-18.el9_2\topenssl-3.0.7-18.el9_2.src.rpm\n\
             bash\t(none):5.1.8-6.el9\tbash-5.1.8-6.el9.src.rpm\n\
             gpg-pubkey\t(none):fd431d51-4ae0493b\t(none)\n",
        );
        assert_eq!(p.len(), 2);
        assert_eq!(
            (&*p[0].source, &*p[0].source_version),
            ("openssl", "1:3.0.7-18.el9_2")
        );
        assert_eq!(&*p[1].source_version, "5.1.8-6.el9");
    }

    #[test]
    fn this_machines_dpkg_database_reads() {
        let Some(argv) = list_argv(PackageManager::Dpkg) else {
            unreachable!()
        };
        let out = std::process::Command::new(&argv[0])
            .args(&argv[1..])
            .output()
            .unwrap();
        assert!(out.status.success());
        let p = parse_dpkg(&String::from_utf8_lossy(&out.stdout));
        assert!(p.len() > 50, "{}", p.len());
        assert!(p
            .iter()
            .any(|x| *x.source != *x.binary.split(':').next().unwrap_or("")));
    }
}
