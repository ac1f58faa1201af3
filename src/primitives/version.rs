//! Version comparison and package-name grammar for the two package managers patchbook
//! drives: Debian's dpkg and rpm.
//!
//! This module owns the ordering rules (`dpkg_cmp` follows dpkg's `verrevcmp`, `rpm_cmp`
//! follows rpm's `rpmvercmp` over `[epoch:]version[-release]` as `rpm.vercmp` parses it)
//! and the validators that keep hostile strings away from command lines. It is pure:
//! it must not run commands, touch hosts or know Rhai. The agreement tests in
//! `tests/versions.rs` hold both orderings against the real tools.

use std::cmp::Ordering;

/// Longest package name or version accepted. Real ones are far shorter; the cap keeps
/// megabyte strings from reaching argv and error messages.
pub const MAX_LEN: usize = 256;

/// A package name or version that its package manager's grammar does not allow.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{what} {shown} is not valid: {reason}")]
pub struct InvalidInput {
    /// What was checked, e.g. "Debian package name".
    pub what: &'static str,
    /// The input, quoted and cut to a readable length.
    pub shown: String,
    pub reason: String,
}

fn invalid(what: &'static str, input: &str, reason: impl Into<String>) -> InvalidInput {
    const SHOW: usize = 64;
    let shown = if input.chars().count() > SHOW {
        let head: String = input.chars().take(SHOW).collect();
        format!("{head:?}… ({} bytes)", input.len())
    } else {
        format!("{input:?}")
    };
    InvalidInput {
        what,
        shown,
        reason: reason.into(),
    }
}

fn first_bad_char(s: &str, ok: impl Fn(u8) -> bool) -> Option<char> {
    s.chars().find(|c| !c.is_ascii() || !ok(*c as u8))
}

fn describe(c: char) -> String {
    match c {
        '\0' => "NUL".to_string(),
        '\n' => "a newline".to_string(),
        c if c.is_control() || c.is_whitespace() => format!("{:?}", c),
        c => format!("'{c}'"),
    }
}

fn check_len(what: &'static str, s: &str) -> Result<(), InvalidInput> {
    if s.is_empty() {
        return Err(invalid(what, s, "it is empty"));
    }
    if s.len() > MAX_LEN {
        return Err(invalid(
            what,
            s,
            format!("it is {} bytes long; the limit is {MAX_LEN}", s.len()),
        ));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------
// dpkg

/// Sort weight of one byte outside a digit run, as dpkg's `order()`: `~` before the
/// end of the string, the end before letters, letters before everything else.
fn dpkg_order(c: Option<u8>) -> i32 {
    match c {
        None => 0,
        Some(c) if c.is_ascii_digit() => 0,
        Some(c) if c.is_ascii_alphabetic() => c as i32,
        Some(b'~') => -1,
        Some(c) => c as i32 + 256,
    }
}

/// dpkg's `verrevcmp` over one upstream version or revision.
fn verrevcmp(a: &[u8], b: &[u8]) -> Ordering {
    let (mut i, mut j) = (0usize, 0usize);
    let at = |s: &[u8], k: usize| s.get(k).copied();
    let digit = |c: Option<u8>| c.is_some_and(|c| c.is_ascii_digit());
    while i < a.len() || j < b.len() {
        while (i < a.len() && !digit(at(a, i))) || (j < b.len() && !digit(at(b, j))) {
            let ac = dpkg_order(at(a, i));
            let bc = dpkg_order(at(b, j));
            if ac != bc {
                return ac.cmp(&bc);
            }
            i += 1;
            j += 1;
        }
        while at(a, i) == Some(b'0') {
            i += 1;
        }
        while at(b, j) == Some(b'0') {
            j += 1;
        }
        let mut first_diff = Ordering::Equal;
        while digit(at(a, i)) && digit(at(b, j)) {
            if first_diff == Ordering::Equal {
                first_diff = a[i].cmp(&b[j]);
            }
            i += 1;
            j += 1;
        }
        if digit(at(a, i)) {
            return Ordering::Greater;
        }
        if digit(at(b, j)) {
            return Ordering::Less;
        }
        if first_diff != Ordering::Equal {
            return first_diff;
        }
    }
    Ordering::Equal
}

/// A Debian version split as dpkg splits it.
struct DebVersion<'a> {
    epoch: u64,
    upstream: &'a str,
    revision: &'a str,
}

fn parse_deb(v: &str) -> DebVersion<'_> {
    let v = v.trim();
    let (epoch, rest) = match v.split_once(':') {
        Some((e, rest)) if !e.is_empty() && e.bytes().all(|b| b.is_ascii_digit()) => {
            (e.parse::<u64>().unwrap_or(u64::MAX), rest)
        }
        _ => (0, v),
    };
    let (upstream, revision) = match rest.rsplit_once('-') {
        Some((u, r)) => (u, r),
        None => (rest, ""),
    };
    DebVersion {
        epoch,
        upstream,
        revision,
    }
}

/// Compares two Debian versions as `dpkg --compare-versions` does: epoch as a number,
/// then upstream version, then revision, each with dpkg's `verrevcmp` (`~` sorts
/// before everything including the end, letters before other symbols, digit runs
/// compare as numbers so leading zeros do not count). A missing epoch is 0 and a
/// missing revision is empty. Inputs dpkg would reject still get a total order;
/// validate with [`check_deb_version`] first when the input is untrusted.
pub fn dpkg_cmp(a: &str, b: &str) -> Ordering {
    let a = parse_deb(a);
    let b = parse_deb(b);
    a.epoch
        .cmp(&b.epoch)
        .then_with(|| verrevcmp(a.upstream.as_bytes(), b.upstream.as_bytes()))
        .then_with(|| verrevcmp(a.revision.as_bytes(), b.revision.as_bytes()))
}

/// Checks a Debian package name: lowercase letters, digits, `+`, `-`, `.`, at least
/// two characters, starting with a letter or digit (Debian policy §5.6.1).
pub fn check_deb_package(name: &str) -> Result<(), InvalidInput> {
    const WHAT: &str = "Debian package name";
    check_len(WHAT, name)?;
    let allowed = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit() || b"+-.".contains(&b);
    if let Some(c) = first_bad_char(name, allowed) {
        return Err(invalid(
            WHAT,
            name,
            format!(
                "it contains {}; only a-z, 0-9, '+', '-' and '.' are allowed",
                describe(c)
            ),
        ));
    }
    if !name.as_bytes()[0].is_ascii_alphanumeric() {
        return Err(invalid(WHAT, name, "it must start with a letter or digit"));
    }
    if name.len() < 2 {
        return Err(invalid(WHAT, name, "it must be at least two characters"));
    }
    Ok(())
}

/// Checks a Debian version `[epoch:]upstream[-revision]` (Debian policy §5.6.12):
/// a numeric epoch, an upstream part that starts with a digit and holds only
/// letters, digits, `.`, `+`, `~` and `-`, and a revision of letters, digits, `.`,
/// `+` and `~`.
pub fn check_deb_version(v: &str) -> Result<(), InvalidInput> {
    const WHAT: &str = "Debian version";
    check_len(WHAT, v)?;
    let rest = match v.split_once(':') {
        Some((epoch, rest)) => {
            if epoch.is_empty() || !epoch.bytes().all(|b| b.is_ascii_digit()) {
                return Err(invalid(WHAT, v, "the epoch before ':' must be a number"));
            }
            if epoch.parse::<i32>().is_err() {
                return Err(invalid(WHAT, v, "the epoch is too large"));
            }
            rest
        }
        None => v,
    };
    let (upstream, revision) = match rest.rsplit_once('-') {
        Some((u, r)) => (u, Some(r)),
        None => (rest, None),
    };
    if upstream.is_empty() {
        return Err(invalid(WHAT, v, "the upstream version is empty"));
    }
    if !upstream.as_bytes()[0].is_ascii_digit() {
        return Err(invalid(
            WHAT,
            v,
            "the upstream version must start with a digit",
        ));
    }
    let up_ok = |b: u8| b.is_ascii_alphanumeric() || b".+~-".contains(&b);
    if let Some(c) = first_bad_char(upstream, up_ok) {
        return Err(invalid(
            WHAT,
            v,
            format!(
                "the upstream version contains {}; only letters, digits, '.', '+', '~' and '-' are allowed",
                describe(c)
            ),
        ));
    }
    if let Some(r) = revision {
        if r.is_empty() {
            return Err(invalid(WHAT, v, "the revision after '-' is empty"));
        }
        let rev_ok = |b: u8| b.is_ascii_alphanumeric() || b".+~".contains(&b);
        if let Some(c) = first_bad_char(r, rev_ok) {
            return Err(invalid(
                WHAT,
                v,
                format!(
                    "the revision contains {}; only letters, digits, '.', '+' and '~' are allowed",
                    describe(c)
                ),
            ));
        }
    }
    Ok(())
}

pub fn valid_deb_package(name: &str) -> bool {
    check_deb_package(name).is_ok()
}

pub fn valid_deb_version(v: &str) -> bool {
    check_deb_version(v).is_ok()
}

// ---------------------------------------------------------------------------------
// rpm

/// rpm's `rpmvercmp`, including `~` (sorts before everything, the end included) and
/// `^` (sorts after the end but before any further segment), as in rpm ≥ 4.15.
pub fn rpmvercmp(a: &str, b: &str) -> Ordering {
    if a == b {
        return Ordering::Equal;
    }
    let (a, b) = (a.as_bytes(), b.as_bytes());
    let (mut i, mut j) = (0usize, 0usize);
    let sep = |c: u8| !c.is_ascii_alphanumeric() && c != b'~' && c != b'^';
    while i < a.len() || j < b.len() {
        while i < a.len() && sep(a[i]) {
            i += 1;
        }
        while j < b.len() && sep(b[j]) {
            j += 1;
        }
        let (ca, cb) = (a.get(i).copied(), b.get(j).copied());

        if ca == Some(b'~') || cb == Some(b'~') {
            if ca != Some(b'~') {
                return Ordering::Greater;
            }
            if cb != Some(b'~') {
                return Ordering::Less;
            }
            i += 1;
            j += 1;
            continue;
        }

        if ca == Some(b'^') || cb == Some(b'^') {
            if ca.is_none() {
                return Ordering::Less;
            }
            if cb.is_none() {
                return Ordering::Greater;
            }
            if ca != Some(b'^') {
                return Ordering::Greater;
            }
            if cb != Some(b'^') {
                return Ordering::Less;
            }
            i += 1;
            j += 1;
            continue;
        }

        let (Some(first), Some(_)) = (ca, cb) else {
            break;
        };

        let isnum = first.is_ascii_digit();
        let class = |c: u8| {
            if isnum {
                c.is_ascii_digit()
            } else {
                c.is_ascii_alphabetic()
            }
        };
        let (si, sj) = (i, j);
        while i < a.len() && class(a[i]) {
            i += 1;
        }
        while j < b.len() && class(b[j]) {
            j += 1;
        }
        let (mut seg_a, mut seg_b) = (&a[si..i], &b[sj..j]);

        // A numeric segment against an alpha one: numbers are newer.
        if seg_b.is_empty() {
            return if isnum {
                Ordering::Greater
            } else {
                Ordering::Less
            };
        }

        if isnum {
            while seg_a.first() == Some(&b'0') {
                seg_a = &seg_a[1..];
            }
            while seg_b.first() == Some(&b'0') {
                seg_b = &seg_b[1..];
            }
            match seg_a.len().cmp(&seg_b.len()) {
                Ordering::Equal => {}
                longer => return longer,
            }
        }
        match seg_a.cmp(seg_b) {
            Ordering::Equal => {}
            other => return other,
        }
    }
    match (i >= a.len(), j >= b.len()) {
        (true, true) => Ordering::Equal,
        (true, false) => Ordering::Less,
        _ => Ordering::Greater,
    }
}

/// An rpm EVR split as rpm's `parseEVR` splits it.
struct RpmEvr<'a> {
    epoch: &'a str,
    version: &'a str,
    release: Option<&'a str>,
}

fn parse_evr(evr: &str) -> RpmEvr<'_> {
    let digits = evr.bytes().take_while(u8::is_ascii_digit).count();
    let after_epoch = &evr[digits..];
    let (epoch, rest) = match after_epoch.strip_prefix(':') {
        Some(rest) if digits == 0 => ("0", rest),
        Some(rest) => (&evr[..digits], rest),
        None => ("0", evr),
    };
    // rpm searches for the release dash only after the epoch digits, and takes the last.
    let (version, release) = match after_epoch.rfind('-') {
        Some(k) => {
            let dash = digits + k;
            let start = evr.len() - rest.len();
            let version = if dash >= start { &evr[start..dash] } else { "" };
            (version, Some(&evr[dash + 1..]))
        }
        None => (rest, None),
    };
    RpmEvr {
        epoch,
        version,
        release,
    }
}

/// Compares two rpm `[epoch:]version[-release]` strings as rpm's `rpm.vercmp`
/// (`rpmverCmp`) does: epoch (missing means 0), then version, then release, each with
/// [`rpmvercmp`]; a missing release sorts before any release.
pub fn rpm_cmp(a: &str, b: &str) -> Ordering {
    let a = parse_evr(a);
    let b = parse_evr(b);
    rpmvercmp(a.epoch, b.epoch)
        .then_with(|| rpmvercmp(a.version, b.version))
        .then_with(|| match (a.release, b.release) {
            (None, None) => Ordering::Equal,
            (Some(_), None) => Ordering::Greater,
            (None, Some(_)) => Ordering::Less,
            (Some(x), Some(y)) => rpmvercmp(x, y),
        })
}

/// Checks an rpm package name: letters, digits, `.`, `_`, `+`, `-`, starting with a
/// letter, digit or `_`.
pub fn check_rpm_name(name: &str) -> Result<(), InvalidInput> {
    const WHAT: &str = "rpm package name";
    check_len(WHAT, name)?;
    let allowed = |b: u8| b.is_ascii_alphanumeric() || b"._+-".contains(&b);
    if let Some(c) = first_bad_char(name, allowed) {
        return Err(invalid(
            WHAT,
            name,
            format!(
                "it contains {}; only letters, digits, '.', '_', '+' and '-' are allowed",
                describe(c)
            ),
        ));
    }
    let first = name.as_bytes()[0];
    if !(first.is_ascii_alphanumeric() || first == b'_') {
        return Err(invalid(
            WHAT,
            name,
            "it must start with a letter, digit or '_'",
        ));
    }
    Ok(())
}

/// Checks an rpm `[epoch:]version[-release]`: a numeric epoch that fits 32 bits, a
/// version starting with a letter or digit, and version and release made of letters,
/// digits, `.`, `_`, `+`, `~` and `^` (rpmbuild's own character set, without macros).
pub fn check_rpm_version(v: &str) -> Result<(), InvalidInput> {
    const WHAT: &str = "rpm version";
    check_len(WHAT, v)?;
    let rest = match v.split_once(':') {
        Some((epoch, rest)) => {
            if epoch.is_empty() || !epoch.bytes().all(|b| b.is_ascii_digit()) {
                return Err(invalid(WHAT, v, "the epoch before ':' must be a number"));
            }
            if epoch.parse::<u32>().is_err() {
                return Err(invalid(WHAT, v, "the epoch is too large"));
            }
            rest
        }
        None => v,
    };
    let (version, release) = match rest.split_once('-') {
        Some((ver, rel)) => (ver, Some(rel)),
        None => (rest, None),
    };
    let part_ok = |b: u8| b.is_ascii_alphanumeric() || b"._+~^".contains(&b);
    if version.is_empty() {
        return Err(invalid(WHAT, v, "the version is empty"));
    }
    if !version.as_bytes()[0].is_ascii_alphanumeric() {
        return Err(invalid(
            WHAT,
            v,
            "the version must start with a letter or digit",
        ));
    }
    for (name, part) in [("version", Some(version)), ("release", release)] {
        let Some(part) = part else { continue };
        if part.is_empty() {
            return Err(invalid(WHAT, v, format!("the {name} is empty")));
        }
        if let Some(c) = first_bad_char(part, part_ok) {
            let what = if c == '-' {
                format!("the {name} contains a second '-'")
            } else {
                format!(
                    "the {name} contains {}; only letters, digits, '.', '_', '+', '~' and '^' are allowed",
                    describe(c)
                )
            };
            return Err(invalid(WHAT, v, what));
        }
    }
    Ok(())
}

pub fn valid_rpm_name(name: &str) -> bool {
    check_rpm_name(name).is_ok()
}

pub fn valid_rpm_version(v: &str) -> bool {
    check_rpm_version(v).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use Ordering::*;

    #[test]
    fn dpkg_known_orderings() {
        assert_eq!(dpkg_cmp("1.0~rc1", "1.0"), Less);
        assert_eq!(dpkg_cmp("1.0", "1.0+b1"), Less);
        assert_eq!(dpkg_cmp("1:0.1", "2.0"), Greater);
        assert_eq!(dpkg_cmp("0:1.0", "1.0"), Equal);
        assert_eq!(dpkg_cmp("1.0", "1.00"), Equal);
        assert_eq!(dpkg_cmp("1.0-0", "1.0"), Equal);
        assert_eq!(dpkg_cmp("1.0a", "1.0+"), Less);
        assert_eq!(dpkg_cmp("1.0~~", "1.0~"), Less);
    }

    #[test]
    fn rpm_known_orderings() {
        assert_eq!(rpm_cmp("1.0~rc1", "1.0"), Less);
        assert_eq!(rpm_cmp("1.0^git1", "1.0"), Greater);
        assert_eq!(rpm_cmp("1.0^git1", "1.0.1"), Less);
        assert_eq!(rpm_cmp("1:1.0", "2.0"), Greater);
        assert_eq!(rpm_cmp("1.0-1", "1.0"), Greater);
        assert_eq!(rpm_cmp("0:1.0", "1.0"), Equal);
        assert_eq!(rpm_cmp("1.0a", "1.0.1"), Less);
        assert_eq!(rpm_cmp("1.01", "1.1"), Equal);
    }

    #[test]
    fn evr_split_follows_rpm() {
        let e = parse_evr("2:1.0-3-4");
        assert_eq!((e.epoch, e.version, e.release), ("2", "1.0-3", Some("4")));
        let e = parse_evr(":1.0");
        assert_eq!((e.epoch, e.version, e.release), ("0", "1.0", None));
        let e = parse_evr("12-3");
        assert_eq!((e.epoch, e.version, e.release), ("0", "12", Some("3")));
    }

    #[test]
    fn hostile_names_and_versions_are_refused() {
        let long = "1".repeat(64 * 1024);
        for bad in [
            "a;b", "$(id)", "`id`", "a\nb", "a\0b", "-rf", "", &long, "a b",
        ] {
            assert!(!valid_deb_package(bad), "{bad:?}");
            assert!(!valid_rpm_name(bad), "{bad:?}");
        }
        for bad in [";", "$(id)", "`id`", "\n", "\0", " ", "'", "\"", "|", "&"] {
            let v = format!("1.{bad}");
            assert!(!valid_deb_version(&v), "{v:?}");
            assert!(!valid_rpm_version(&v), "{v:?}");
        }
        assert!(!valid_deb_version("-1.0"));
        assert!(!valid_rpm_version("-1.0"));
        assert!(!valid_deb_version(&long));
        let err = check_deb_version(&long).unwrap_err().to_string();
        assert!(err.len() < 300, "{err}");
        assert!(valid_deb_package("acme-agent"));
        assert!(valid_deb_version("1:1.0.1~rc1-2+deb12u1"));
        assert!(valid_rpm_name("acme-agent"));
        assert!(valid_rpm_version("1:1.0.1^git3-2.el9"));
    }
}
