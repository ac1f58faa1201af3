//! Strict host-key checking against an OpenSSH `known_hosts` file.
//!
//! It owns parsing (plain, `[host]:port`, comma lists, `*`/`?` wildcards, `!`
//! negation, hashed `|1|salt|hash` entries, `@revoked`) and the explicit opt-in
//! append. It parses every line itself, so one bad line is reported and skipped
//! rather than silently ending the file as libssh2's reader does. It never adds a
//! key on its own: only [`KnownHosts::append`], called on `--accept-new-host-keys`.

use std::io::Write;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use hmac::{Hmac, Mac};
use sha2::Digest;

/// One usable key line.
#[derive(Debug, Clone)]
struct Entry {
    line: usize,
    patterns: String,
    revoked: bool,
    key_type: String,
    blob: Vec<u8>,
}

/// The parsed file.
#[derive(Debug, Clone)]
pub struct KnownHosts {
    path: PathBuf,
    entries: Vec<Entry>,
    /// `file:line: reason` for each line that was skipped.
    pub skipped: Vec<String>,
}

/// What the file says about a presented key.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    Match,
    /// The host is recorded, but with other keys; `line` is the first of them.
    Changed {
        line: usize,
    },
    Revoked {
        line: usize,
    },
    Unknown,
}

impl KnownHosts {
    /// Reads `path`; a missing file is an empty one.
    pub fn load(path: &Path) -> std::io::Result<Self> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(e),
        };
        Ok(Self::parse(path, &text))
    }

    pub fn parse(path: &Path, text: &str) -> Self {
        let mut entries = Vec::new();
        let mut skipped = Vec::new();
        for (i, raw) in text.lines().enumerate() {
            let line = i + 1;
            let l = raw.trim();
            if l.is_empty() || l.starts_with('#') {
                continue;
            }
            let mut words = l.split_whitespace();
            let mut first = words.next().unwrap_or_default();
            let mut revoked = false;
            if let Some(marker) = first.strip_prefix('@') {
                match marker {
                    "revoked" => revoked = true,
                    _ => {
                        skipped.push(format!(
                            "{}:{line}: @{marker} is not supported, line ignored",
                            path.display()
                        ));
                        continue;
                    }
                }
                first = words.next().unwrap_or_default();
            }
            let (Some(key_type), Some(b64)) = (words.next(), words.next()) else {
                skipped.push(format!(
                    "{}:{line}: expected `hosts keytype base64-key`",
                    path.display()
                ));
                continue;
            };
            let Ok(blob) = base64::engine::general_purpose::STANDARD.decode(b64) else {
                skipped.push(format!(
                    "{}:{line}: key is not valid base64",
                    path.display()
                ));
                continue;
            };
            entries.push(Entry {
                line,
                patterns: first.to_string(),
                revoked,
                key_type: key_type.to_string(),
                blob,
            });
        }
        KnownHosts {
            path: path.to_path_buf(),
            entries,
            skipped,
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn for_host<'a>(&'a self, host: &'a str, port: u16) -> impl Iterator<Item = &'a Entry> + 'a {
        let name = host_pattern(host, port);
        self.entries
            .iter()
            .filter(move |e| matches_patterns(&e.patterns, &name))
    }

    /// Key types recorded for the host (OpenSSH names), in file order, revoked ones left out.
    pub fn recorded_types(&self, host: &str, port: u16) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        for e in self.for_host(host, port).filter(|e| !e.revoked) {
            if !out.contains(&e.key_type) {
                out.push(e.key_type.clone());
            }
        }
        out
    }

    pub fn check(&self, host: &str, port: u16, blob: &[u8]) -> Verdict {
        let mut first_other = None;
        let mut matched = false;
        for e in self.for_host(host, port) {
            if e.blob == blob {
                if e.revoked {
                    return Verdict::Revoked { line: e.line };
                }
                matched = true;
            } else if !e.revoked && first_other.is_none() {
                first_other = Some(e.line);
            }
        }
        match (matched, first_other) {
            (true, _) => Verdict::Match,
            (false, Some(line)) => Verdict::Changed { line },
            (false, None) => Verdict::Unknown,
        }
    }

    /// Appends one key under an exclusive lock with a single write, after checking
    /// (under the lock) that nobody recorded the host meanwhile. Returns false when
    /// the key was already there.
    pub fn append(
        path: &Path,
        host: &str,
        port: u16,
        key_type: &str,
        blob: &[u8],
    ) -> std::io::Result<bool> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .read(true)
            .open(path)?;
        // SAFETY: flock on a descriptor we own; released when `f` is closed.
        if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let now = KnownHosts::load(path)?;
        if now.check(host, port, blob) == Verdict::Match {
            return Ok(false);
        }
        let text = std::fs::read_to_string(path)?;
        let mut line = String::new();
        if !text.is_empty() && !text.ends_with('\n') {
            line.push('\n');
        }
        line.push_str(&format!(
            "{} {key_type} {}\n",
            host_pattern(host, port),
            base64::engine::general_purpose::STANDARD.encode(blob)
        ));
        f.write_all(line.as_bytes())?;
        f.sync_all()?;
        Ok(true)
    }
}

/// How OpenSSH names a host in known_hosts: bare for port 22, else `[host]:port`.
pub fn host_pattern(host: &str, port: u16) -> String {
    if port == 22 {
        host.to_string()
    } else {
        format!("[{host}]:{port}")
    }
}

/// OpenSSH's fingerprint form: `SHA256:` + unpadded base64 of the key blob's digest.
pub fn fingerprint(blob: &[u8]) -> String {
    let digest = sha2::Sha256::digest(blob);
    format!(
        "SHA256:{}",
        base64::engine::general_purpose::STANDARD_NO_PAD.encode(digest)
    )
}

/// The key type name inside an SSH public key blob (its first string).
pub fn blob_type(blob: &[u8]) -> Option<String> {
    let len = u32::from_be_bytes(blob.get(..4)?.try_into().ok()?) as usize;
    String::from_utf8(blob.get(4..4 + len)?.to_vec()).ok()
}

/// Host-key algorithms to offer for recorded key types.
pub fn host_key_methods(types: &[String]) -> String {
    let mut out: Vec<&str> = Vec::new();
    for t in types {
        match t.as_str() {
            "ssh-rsa" => out.extend(["rsa-sha2-512", "rsa-sha2-256", "ssh-rsa"]),
            other => out.push(other),
        }
    }
    out.join(",")
}

fn matches_patterns(patterns: &str, name: &str) -> bool {
    if let Some(hashed) = patterns.strip_prefix("|1|") {
        return hashed_match(hashed, name);
    }
    let mut hit = false;
    for p in patterns.split(',') {
        if let Some(neg) = p.strip_prefix('!') {
            if glob(neg, name) {
                return false;
            }
        } else if glob(p, name) {
            hit = true;
        }
    }
    hit
}

fn hashed_match(salt_and_hash: &str, name: &str) -> bool {
    let b64 = base64::engine::general_purpose::STANDARD;
    let Some((salt, hash)) = salt_and_hash.split_once('|') else {
        return false;
    };
    let (Ok(salt), Ok(hash)) = (b64.decode(salt), b64.decode(hash)) else {
        return false;
    };
    let Ok(mut mac) = Hmac::<sha1::Sha1>::new_from_slice(&salt) else {
        return false;
    };
    mac.update(name.as_bytes());
    mac.verify_slice(&hash).is_ok()
}

/// `*` and `?` wildcards, case-insensitive as OpenSSH does for host names.
fn glob(pattern: &str, name: &str) -> bool {
    let p: Vec<char> = pattern.to_ascii_lowercase().chars().collect();
    let n: Vec<char> = name.to_ascii_lowercase().chars().collect();
    let (mut pi, mut ni, mut star, mut mark) = (0, 0, None, 0);
    while ni < n.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == n[ni]) {
            pi += 1;
            ni += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some(pi);
            mark = ni;
            pi += 1;
        } else if let Some(s) = star {
            pi = s + 1;
            mark += 1;
            ni = mark;
        } else {
            return false;
        }
    }
    while pi < p.len() && p[pi] == '*' {
        pi += 1;
    }
    pi == p.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn blob(kind: &str, fill: u8) -> Vec<u8> {
        let mut b = u32::try_from(kind.len()).unwrap().to_be_bytes().to_vec();
        b.extend_from_slice(kind.as_bytes());
        b.extend_from_slice(&[0, 0, 0, 32]);
        b.extend_from_slice(&[fill; 32]);
        b
    }

    fn line(host: &str, b: &[u8]) -> String {
        format!(
            "{host} ssh-ed25519 {}\n",
            base64::engine::general_purpose::STANDARD.encode(b)
        )
    }

    fn hashed(name: &str, salt: &[u8]) -> String {
        let mut mac = Hmac::<sha1::Sha1>::new_from_slice(salt).unwrap();
        mac.update(name.as_bytes());
        let e = base64::engine::general_purpose::STANDARD;
        format!(
            "|1|{}|{}",
            e.encode(salt),
            e.encode(mac.finalize().into_bytes())
        )
    }

    #[test]
    fn bad_lines_are_skipped_not_fatal() {
        let (a, b) = (blob("ssh-ed25519", 1), blob("ssh-ed25519", 2));
        let text = format!(
            "{}garbage\nhost ssh-ed25519 !!!notbase64\n@cert-authority * ssh-ed25519 AAAA\n{}",
            line("[a]:2222", &a),
            line("[b]:2222", &b)
        );
        let kh = KnownHosts::parse(Path::new("kh"), &text);
        assert_eq!(kh.skipped.len(), 3, "{:?}", kh.skipped);
        assert!(kh.skipped[0].starts_with("kh:2:"));
        assert_eq!(kh.check("b", 2222, &b), Verdict::Match);
    }

    #[test]
    fn verdicts() {
        let (a, b) = (blob("ssh-ed25519", 1), blob("ssh-ed25519", 2));
        let text = [line("[h]:2222,other", &a), line("plain", &a)].concat();
        let kh = KnownHosts::parse(Path::new("kh"), &text);
        assert_eq!(kh.check("h", 2222, &a), Verdict::Match);
        assert_eq!(kh.check("h", 2222, &b), Verdict::Changed { line: 1 });
        assert_eq!(kh.check("h", 22, &a), Verdict::Unknown);
        assert_eq!(kh.check("plain", 22, &a), Verdict::Match);
        assert_eq!(kh.check("nobody", 22, &a), Verdict::Unknown);
        assert_eq!(kh.recorded_types("h", 2222), vec!["ssh-ed25519"]);
    }

    #[test]
    fn hashed_wildcard_negated_and_revoked_entries() {
        let (a, b) = (blob("ssh-ed25519", 1), blob("ssh-ed25519", 2));
        let text = [
            line(&hashed("[10.0.0.5]:2200", b"saltsaltsaltsaltsalt"), &a),
            line("*.example.com,!bad.example.com", &a),
            format!("@revoked {}", line("rev", &b)),
        ]
        .concat();
        let kh = KnownHosts::parse(Path::new("kh"), &text);
        assert_eq!(kh.check("10.0.0.5", 2200, &a), Verdict::Match);
        assert_eq!(kh.check("10.0.0.5", 2201, &a), Verdict::Unknown);
        assert_eq!(kh.check("10.0.0.5", 2200, &b), Verdict::Changed { line: 1 });
        assert_eq!(kh.check("web1.example.com", 22, &a), Verdict::Match);
        assert_eq!(kh.check("bad.example.com", 22, &a), Verdict::Unknown);
        assert_eq!(kh.check("rev", 22, &b), Verdict::Revoked { line: 3 });
    }

    #[test]
    fn fingerprint_and_type_follow_openssh() {
        let a = blob("ssh-ed25519", 1);
        assert_eq!(blob_type(&a).as_deref(), Some("ssh-ed25519"));
        assert!(fingerprint(&a).starts_with("SHA256:"));
        assert_eq!(
            host_key_methods(&["ssh-rsa".into(), "ssh-ed25519".into()]),
            "rsa-sha2-512,rsa-sha2-256,ssh-rsa,ssh-ed25519"
        );
    }

    #[test]
    fn append_is_idempotent() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("kh");
        std::fs::write(&p, "# no newline at end").unwrap();
        let a = blob("ssh-ed25519", 1);
        assert!(KnownHosts::append(&p, "h", 2222, "ssh-ed25519", &a).unwrap());
        assert!(!KnownHosts::append(&p, "h", 2222, "ssh-ed25519", &a).unwrap());
        let kh = KnownHosts::load(&p).unwrap();
        assert_eq!(kh.check("h", 2222, &a), Verdict::Match);
        assert!(kh.skipped.is_empty());
    }
}
