//! Artifacts: patch files fetched on the controller from trusted sources, checked and
//! kept in a content-addressed cache under `<state_dir>/cache/artifacts/<sha256>`.
//!
//! This module owns the source allowlist (`trusted_sources`), streaming download with
//! SHA-256 and size enforcement, retries on mismatch, minisign signature checks
//! against keys pinned in `[artifacts] public_keys`, and the re-hash of cached files.
//! It never touches a host and never writes the journal: it returns the checks it made
//! as [`ArtifactCheck`] records for the caller to journal.

use std::fs::File;
use std::io::{self, Read, Write};
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use serde::Serialize;
use sha2::{Digest, Sha256};
use url::Url;

use crate::config::Config;
use crate::journal::entry::{self, ArtifactRecord};
use crate::journal::Entry;

/// Downloads tried per artifact when `[artifacts] attempts` is not set.
pub const DEFAULT_ATTEMPTS: u32 = 3;
/// Read timeout per HTTP request when `[artifacts] timeout_secs` is not set.
pub const DEFAULT_TIMEOUT_SECS: u64 = 60;
/// A minisign signature is a few hundred bytes; anything far larger is not one.
const MAX_SIGNATURE_BYTES: u64 = 64 * 1024;
const CHUNK: usize = 64 * 1024;

/// What a playbook asks for: `artifact(url, #{ sha256, size?, signature? })`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ArtifactSpec {
    /// An https URL, a loopback http URL, a `file://` URL or a local path.
    pub url: String,
    /// Expected SHA-256, 64 hex digits.
    pub sha256: String,
    /// Expected size in bytes; a longer body is cut off.
    pub size: Option<u64>,
    /// A minisign signature: inline text, or a URL or path (relative ones resolve
    /// against the artifact's own location).
    pub signature: Option<String>,
}

/// Everything `fetch` needs from the config and the runtime.
#[derive(Debug, Clone)]
pub struct ArtifactSettings {
    pub trusted_sources: Vec<String>,
    /// Relative local paths (in `trusted_sources` and artifact URLs) resolve here.
    pub base_dir: PathBuf,
    pub cache_dir: PathBuf,
    pub attempts: u32,
    pub public_keys: Vec<String>,
    pub timeout: Duration,
}

impl ArtifactSettings {
    pub fn from_config(cfg: &Config, state_dir: &Path) -> Self {
        let a = &cfg.artifacts;
        ArtifactSettings {
            trusted_sources: cfg.trusted_sources.clone(),
            base_dir: cfg.base_dir.clone(),
            cache_dir: a
                .cache_dir
                .as_deref()
                .map(|p| cfg.resolve(p))
                .unwrap_or_else(|| state_dir.join("cache").join("artifacts")),
            attempts: a.attempts.unwrap_or(DEFAULT_ATTEMPTS).max(1),
            public_keys: a.public_keys.clone(),
            timeout: Duration::from_secs(a.timeout_secs.unwrap_or(DEFAULT_TIMEOUT_SECS).max(1)),
        }
    }
}

/// One check made while fetching, for the journal.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ArtifactCheck {
    /// `source`, `signature-source`, `cache`, `download`, `signature`.
    pub what: String,
    pub ok: bool,
    pub detail: String,
}

impl ArtifactCheck {
    /// This check as the `artifact` journal record of the artifact at `url`.
    pub fn entry(&self, url: &str, sha256: &str) -> Entry {
        Entry::Artifact(ArtifactRecord::One(entry::ArtifactCheck {
            url: Some(url.to_string()),
            sha256: Some(sha256.to_string()),
            what: self.what.clone(),
            ok: self.ok,
            detail: self.detail.clone(),
        }))
    }
}

/// A verified file in the cache, ready to deploy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Artifact {
    pub url: String,
    pub sha256: String,
    /// The size the playbook declared, if it did.
    pub size: Option<u64>,
    /// The verified size of the file.
    pub bytes: u64,
    /// `<cache_dir>/<sha256>`.
    pub path: PathBuf,
    pub signature_checked: bool,
    /// Served from the cache (after a re-hash) rather than downloaded.
    pub from_cache: bool,
    /// Downloads made by this fetch (0 on a cache hit).
    pub downloads: u32,
    pub checks: Vec<ArtifactCheck>,
}

/// Why one download attempt was thrown away.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AttemptFailure {
    #[error("SHA-256 mismatch: expected {expected}, got {actual} ({bytes} bytes)")]
    Checksum {
        expected: String,
        actual: String,
        bytes: u64,
    },
    #[error("the body is longer than the declared size of {declared} bytes; it was cut off")]
    TooLong { declared: u64 },
    #[error(
        "size mismatch: declared {declared} bytes, got {got} (SHA-256 expected {expected}, got {actual})"
    )]
    TooShort {
        declared: u64,
        got: u64,
        expected: String,
        actual: String,
    },
    #[error("{0}")]
    Transport(String),
}

#[derive(Debug, thiserror::Error)]
pub enum ArtifactError {
    #[error("artifact {url}: {reason}")]
    InvalidSpec { url: String, reason: String },
    #[error("trusted_sources entry {entry:?} in patchbook.toml: {reason}")]
    TrustedSource { entry: String, reason: String },
    #[error(
        "refusing {url}: it is not under any trusted_sources entry in patchbook.toml ({trusted}); \
         add the mirror there if you trust it"
    )]
    Untrusted { url: String, trusted: String },
    #[error(
        "artifacts.public_keys[{index}] in patchbook.toml is not a minisign public key: {reason}"
    )]
    PublicKey { index: usize, reason: String },
    #[error(
        "refusing {url}: artifacts.public_keys are pinned in patchbook.toml but the artifact has \
         no signature; pass `signature` (e.g. the .minisig file next to it)"
    )]
    SignatureMissing { url: String },
    #[error("refusing {url}: signature {signature}: {reason}")]
    BadSignature {
        url: String,
        signature: String,
        reason: String,
    },
    #[error("fetching {url} failed after {attempts} attempt(s): {last}; no host was touched")]
    Exhausted {
        url: String,
        attempts: u32,
        last: AttemptFailure,
    },
    #[error("artifact cache {path}: {source}; check that the state directory is writable")]
    Cache {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// Where bytes come from.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Location {
    Http(Url),
    File(PathBuf),
}

impl std::fmt::Display for Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Location::Http(u) => write!(f, "{u}"),
            Location::File(p) => write!(f, "{}", p.display()),
        }
    }
}

/// Removes `.` and resolves `..` without touching the disk; `..` above the root stays
/// at the root.
fn normalise(p: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir => {
                out.pop();
            }
            other => out.push(other.as_os_str()),
        }
    }
    out
}

fn is_loopback(u: &Url) -> bool {
    match u.host() {
        Some(url::Host::Domain(d)) => d.eq_ignore_ascii_case("localhost"),
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        None => false,
    }
}

/// Parses a URL or local path. `Err` carries the reason only; callers add context.
fn parse_location(s: &str, base_dir: &Path) -> Result<Location, String> {
    if s.is_empty() {
        return Err("it is empty".into());
    }
    if s.chars().any(|c| c.is_control()) {
        return Err("it contains control characters".into());
    }
    let lower = s.to_ascii_lowercase();
    if lower.starts_with("https://") || lower.starts_with("http://") {
        let u = Url::parse(s).map_err(|e| format!("not a valid URL: {e}"))?;
        if !u.username().is_empty() || u.password().is_some() {
            return Err("URLs with credentials are not accepted".into());
        }
        let path = u.path().to_ascii_lowercase();
        // An encoded slash or backslash could be decoded by the server into a path
        // that escapes the trusted prefix after we matched it.
        if path.contains("%2f") || path.contains("%5c") || path.contains('\\') {
            return Err("encoded '/' or '\\' in the path is not accepted".into());
        }
        if u.scheme() == "http" && !is_loopback(&u) {
            return Err("plain http is only accepted for 127.0.0.1, ::1 and localhost".into());
        }
        return Ok(Location::Http(u));
    }
    if lower.starts_with("file://") {
        let u = Url::parse(s).map_err(|e| format!("not a valid file URL: {e}"))?;
        let p = u
            .to_file_path()
            .map_err(|()| "a file:// URL must name a local absolute path".to_string())?;
        return Ok(Location::File(normalise(&p)));
    }
    if s.contains("://") {
        return Err("only https://, loopback http://, file:// and local paths are accepted".into());
    }
    let p = Path::new(s);
    let p = if p.is_absolute() {
        p.to_path_buf()
    } else {
        base_dir.join(p)
    };
    Ok(Location::File(normalise(&p)))
}

/// True when `loc` lies under the trusted `prefix`, on a path-segment boundary.
fn under(loc: &Location, prefix: &Location) -> bool {
    match (loc, prefix) {
        (Location::Http(u), Location::Http(p)) => {
            if u.scheme() != p.scheme()
                || u.host() != p.host()
                || u.port_or_known_default() != p.port_or_known_default()
            {
                return false;
            }
            let (path, pre) = (u.path(), p.path());
            if pre.ends_with('/') {
                path.starts_with(pre)
            } else {
                path == pre
                    || path
                        .strip_prefix(pre)
                        .is_some_and(|rest| rest.starts_with('/'))
            }
        }
        (Location::File(f), Location::File(d)) => {
            // Symlinks must not lead out of the mirror: compare real paths when they
            // exist, the normalised ones otherwise.
            let f = f.canonicalize().unwrap_or_else(|_| f.clone());
            let d = d.canonicalize().unwrap_or_else(|_| d.clone());
            f.starts_with(&d)
        }
        _ => false,
    }
}

/// Parses the allowlist; a malformed entry is a config error, not a silent skip.
/// Where `url` points, checked against `trusted_sources` and recorded either way,
/// with the trusted locations (for what the artifact brings along, its signature).
fn trusted_source(
    url: &str,
    settings: &ArtifactSettings,
    checks: &mut Vec<ArtifactCheck>,
) -> Result<(Location, Vec<Location>), ArtifactError> {
    let loc =
        parse_location(url, &settings.base_dir).map_err(|reason| ArtifactError::InvalidSpec {
            url: url.to_string(),
            reason,
        })?;
    let trusted = trusted_locations(settings)?;
    if !trusted.iter().any(|t| under(&loc, t)) {
        record(
            checks,
            url,
            "source",
            false,
            format!("{loc} is not trusted"),
        );
        return Err(ArtifactError::Untrusted {
            url: url.to_string(),
            trusted: trusted_list(settings),
        });
    }
    record(checks, url, "source", true, format!("{loc} is trusted"));
    Ok((loc, trusted))
}

/// `trusted_sources` as an error message shows them.
fn trusted_list(settings: &ArtifactSettings) -> String {
    if settings.trusted_sources.is_empty() {
        "the list is empty".to_string()
    } else {
        settings.trusted_sources.join(", ")
    }
}

fn trusted_locations(settings: &ArtifactSettings) -> Result<Vec<Location>, ArtifactError> {
    settings
        .trusted_sources
        .iter()
        .map(|entry| {
            parse_location(entry, &settings.base_dir).map_err(|reason| {
                ArtifactError::TrustedSource {
                    entry: entry.clone(),
                    reason,
                }
            })
        })
        .collect()
}

/// Whether `url` (a URL or local path) is on the allowlist. The allowlist itself is
/// checked and its first bad entry reported.
pub fn is_trusted(url: &str, settings: &ArtifactSettings) -> Result<bool, ArtifactError> {
    let trusted = trusted_locations(settings)?;
    Ok(match parse_location(url, &settings.base_dir) {
        Ok(loc) => trusted.iter().any(|t| under(&loc, t)),
        Err(_) => false,
    })
}

fn record(checks: &mut Vec<ArtifactCheck>, url: &str, what: &str, ok: bool, detail: String) {
    if ok {
        tracing::info!(artifact = url, check = what, ok, "{detail}");
    } else {
        tracing::warn!(artifact = url, check = what, ok, "{detail}");
    }
    checks.push(ArtifactCheck {
        what: what.to_string(),
        ok,
        detail,
    });
}

/// The signature as given: inline text or somewhere to fetch it from.
enum SignatureRef {
    Inline(String),
    At(Location),
}

fn resolve_signature(
    sig: &str,
    artifact: &Location,
    base_dir: &Path,
) -> Result<SignatureRef, String> {
    if sig.contains('\n') || sig.trim_start().starts_with("untrusted comment:") {
        return Ok(SignatureRef::Inline(sig.to_string()));
    }
    if sig.contains("://") || Path::new(sig).is_absolute() {
        return parse_location(sig, base_dir).map(SignatureRef::At);
    }
    match artifact {
        Location::Http(u) => {
            let joined = u
                .join(sig)
                .map_err(|e| format!("cannot resolve {sig:?} against {u}: {e}"))?;
            parse_location(joined.as_str(), base_dir).map(SignatureRef::At)
        }
        Location::File(p) => {
            let dir = p.parent().unwrap_or(Path::new("/"));
            Ok(SignatureRef::At(Location::File(normalise(&dir.join(sig)))))
        }
    }
}

fn agent(timeout: Duration) -> ureq::Agent {
    ureq::AgentBuilder::new()
        .timeout_connect(timeout.min(Duration::from_secs(15)))
        .timeout_read(timeout)
        .timeout_write(timeout)
        // A redirect could leave the allowlist; the final URL must be listed instead.
        .redirects(0)
        .user_agent(concat!("patchbook/", env!("CARGO_PKG_VERSION")))
        .build()
}

/// Opens a location for reading; for HTTP also returns the declared Content-Length.
fn open(
    agent: &ureq::Agent,
    loc: &Location,
) -> Result<(Box<dyn Read + Send>, Option<u64>), String> {
    match loc {
        Location::Http(u) => match agent.request_url("GET", u).call() {
            Ok(resp) if (300..400).contains(&resp.status()) => Err(format!(
                "HTTP {} redirect to {}; redirects are not followed: put the final URL in the \
                 playbook and in trusted_sources",
                resp.status(),
                resp.header("location").unwrap_or("(no location)")
            )),
            Ok(resp) => {
                let len = resp
                    .header("content-length")
                    .and_then(|v| v.trim().parse::<u64>().ok());
                Ok((Box::new(resp.into_reader()), len))
            }
            Err(ureq::Error::Status(code, resp)) => {
                Err(format!("HTTP {code} {} from {u}", resp.status_text()))
            }
            Err(e) => Err(format!("cannot download {u}: {e}")),
        },
        Location::File(p) => {
            let f = File::open(p).map_err(|e| format!("cannot open {}: {e}", p.display()))?;
            let len = f.metadata().ok().map(|m| m.len());
            Ok((Box::new(f), len))
        }
    }
}

/// SHA-256 and length of a file.
fn hash_file(path: &Path) -> io::Result<(String, u64)> {
    let mut f = File::open(path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; CHUNK];
    let mut total = 0u64;
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        total += n as u64;
    }
    Ok((hex::encode(h.finalize()), total))
}

/// The result of one download attempt: an I/O problem with the cache aborts at once,
/// anything else is worth another try.
enum AttemptError {
    Retry(AttemptFailure),
    Cache(io::Error),
}

/// Streams one download into a temp file in the cache folder, hashing as it goes and
/// cutting the body off one byte past the declared size.
fn download(
    agent: &ureq::Agent,
    loc: &Location,
    expected: Option<&str>,
    size: Option<u64>,
    cache_dir: &Path,
) -> Result<(tempfile::NamedTempFile, u64), AttemptError> {
    let (reader, declared_len) =
        open(agent, loc).map_err(|e| AttemptError::Retry(AttemptFailure::Transport(e)))?;
    if let (Some(size), Some(len)) = (size, declared_len) {
        if len > size {
            return Err(AttemptError::Retry(AttemptFailure::TooLong {
                declared: size,
            }));
        }
    }
    let mut tmp = tempfile::Builder::new()
        .prefix(".partial-")
        .tempfile_in(cache_dir)
        .map_err(AttemptError::Cache)?;
    let mut reader = reader.take(size.map_or(u64::MAX, |s| s.saturating_add(1)));
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; CHUNK];
    let mut total = 0u64;
    loop {
        let n = match reader.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                return Err(AttemptError::Retry(AttemptFailure::Transport(format!(
                    "reading {loc} failed after {total} bytes: {e}"
                ))))
            }
        };
        total += n as u64;
        if size.is_some_and(|s| total > s) {
            return Err(AttemptError::Retry(AttemptFailure::TooLong {
                declared: size.unwrap_or(0),
            }));
        }
        hasher.update(&buf[..n]);
        tmp.write_all(&buf[..n]).map_err(AttemptError::Cache)?;
    }
    let actual = hex::encode(hasher.finalize());
    if let Some(s) = size {
        if total != s {
            return Err(AttemptError::Retry(AttemptFailure::TooShort {
                declared: s,
                got: total,
                expected: expected.unwrap_or("(not pinned)").to_string(),
                actual,
            }));
        }
    }
    if let Some(expected) = expected.filter(|e| *e != actual) {
        return Err(AttemptError::Retry(AttemptFailure::Checksum {
            expected: expected.to_string(),
            actual,
            bytes: total,
        }));
    }
    tmp.as_file().sync_all().map_err(AttemptError::Cache)?;
    Ok((tmp, total))
}

fn read_signature(agent: &ureq::Agent, loc: &Location) -> Result<String, String> {
    let (reader, _) = open(agent, loc)?;
    let mut text = String::new();
    reader
        .take(MAX_SIGNATURE_BYTES + 1)
        .read_to_string(&mut text)
        .map_err(|e| format!("cannot read it: {e}"))?;
    if text.len() as u64 > MAX_SIGNATURE_BYTES {
        return Err(format!(
            "it is larger than {MAX_SIGNATURE_BYTES} bytes, not a minisign signature"
        ));
    }
    Ok(text)
}

fn parse_keys(keys: &[String]) -> Result<Vec<minisign_verify::PublicKey>, ArtifactError> {
    keys.iter()
        .enumerate()
        .map(|(index, k)| {
            let k = k.trim();
            let parsed = if k.contains('\n') {
                minisign_verify::PublicKey::decode(k)
            } else {
                minisign_verify::PublicKey::from_base64(k)
            };
            parsed.map_err(|e| ArtifactError::PublicKey {
                index,
                reason: e.to_string(),
            })
        })
        .collect()
}

/// Verifies `file` against a minisign signature with any of the pinned keys; returns
/// the signature's trusted comment.
fn verify_signature(
    text: &str,
    file: &Path,
    keys: &[minisign_verify::PublicKey],
) -> Result<String, String> {
    let sig = minisign_verify::Signature::decode(text)
        .map_err(|e| format!("not a minisign signature ({e})"))?;
    let mut last = "it was made by a key not pinned in artifacts.public_keys".to_string();
    for key in keys {
        let mut verifier = match key.verify_stream(&sig) {
            Ok(v) => v,
            Err(minisign_verify::Error::UnexpectedKeyId) => continue,
            Err(minisign_verify::Error::UnsupportedLegacyMode) => {
                return Err(
                    "legacy (non-prehashed) signature; re-sign with a current minisign".into(),
                )
            }
            Err(e) => return Err(e.to_string()),
        };
        let mut f = File::open(file).map_err(|e| format!("cannot re-read the file: {e}"))?;
        let mut buf = vec![0u8; CHUNK];
        loop {
            let n = f
                .read(&mut buf)
                .map_err(|e| format!("cannot re-read the file: {e}"))?;
            if n == 0 {
                break;
            }
            verifier.update(&buf[..n]);
        }
        match verifier.finalize() {
            Ok(()) => return Ok(sig.trusted_comment().to_string()),
            Err(e) => last = format!("verification failed: {e}"),
        }
    }
    Err(last)
}

fn normalise_sha(s: &str) -> Option<String> {
    let s = s.trim().to_ascii_lowercase();
    (s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit())).then_some(s)
}

/// Fetches, checks and caches an artifact. See [`fetch_recorded`].
pub fn fetch(spec: &ArtifactSpec, settings: &ArtifactSettings) -> Result<Artifact, ArtifactError> {
    let mut checks = Vec::new();
    fetch_recorded(spec, settings, &mut checks)
}

/// Fetches, checks and caches an artifact, appending every check made to `checks`
/// (also on failure, so the caller can journal why it was refused).
///
/// Order: spec and allowlist first (nothing is requested from an untrusted or
/// unsigned-but-keys-pinned source), then the cache entry (re-hashed; a corrupt one is
/// deleted), then up to `attempts` downloads, then the signature, then the rename into
/// the cache.
pub fn fetch_recorded(
    spec: &ArtifactSpec,
    settings: &ArtifactSettings,
    checks: &mut Vec<ArtifactCheck>,
) -> Result<Artifact, ArtifactError> {
    let url = spec.url.as_str();
    let invalid = |reason: String| ArtifactError::InvalidSpec {
        url: url.to_string(),
        reason,
    };
    let sha = normalise_sha(&spec.sha256)
        .ok_or_else(|| invalid("sha256 must be 64 hexadecimal digits".to_string()))?;
    let (loc, trusted) = trusted_source(url, settings, checks)?;

    let keys = parse_keys(&settings.public_keys)?;
    let signature = match &spec.signature {
        None => None,
        Some(s) => Some(
            resolve_signature(s, &loc, &settings.base_dir)
                .map_err(|r| invalid(format!("signature: {r}")))?,
        ),
    };
    if let Some(SignatureRef::At(sig_loc)) = &signature {
        if !trusted.iter().any(|t| under(sig_loc, t)) {
            record(
                checks,
                url,
                "signature-source",
                false,
                format!("{sig_loc} is not trusted"),
            );
            return Err(ArtifactError::Untrusted {
                url: sig_loc.to_string(),
                trusted: trusted_list(settings),
            });
        }
    }
    if !keys.is_empty() && signature.is_none() {
        record(
            checks,
            url,
            "signature",
            false,
            "missing while public keys are pinned".into(),
        );
        return Err(ArtifactError::SignatureMissing {
            url: url.to_string(),
        });
    }

    let cache_dir = &settings.cache_dir;
    let cache_err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| ArtifactError::Cache { path, source }
    };
    // NamedTempFile creates 0600 files, so cached artifacts are private already.
    crate::journal::private::create_dir_all(cache_dir).map_err(cache_err(cache_dir))?;
    let cached = cache_dir.join(&sha);
    let agent = agent(settings.timeout);

    let mut from_cache = false;
    let mut bytes = 0u64;
    let source = loc.to_string();
    let sources_file = sources_path(&cached);
    let known_sources = read_sources(&sources_file);
    if cached.exists() && !known_sources.contains(&source) {
        // The same bytes came from elsewhere. A checksum proves content, not that
        // this source serves it: fetch from here, so a wrong or dead mirror shows
        // now and not on the night the cache is cold.
        let from = if known_sources.is_empty() {
            "an unrecorded source".to_string()
        } else {
            known_sources.join(", ")
        };
        record(
            checks,
            url,
            "cache",
            true,
            format!(
                "{} holds this SHA-256 from {from}, not from {source}: not reused; fetching from {source}",
                cached.display()
            ),
        );
    } else if cached.exists() {
        let (actual, len) = hash_file(&cached).map_err(cache_err(&cached))?;
        let size_ok = spec.size.is_none_or(|s| s == len);
        if actual == sha && size_ok {
            record(
                checks,
                url,
                "cache",
                true,
                format!(
                    "{} re-hashed: SHA-256 {actual}, {len} bytes; fetched earlier from {source}",
                    cached.display()
                ),
            );
            from_cache = true;
            bytes = len;
        } else {
            record(
                checks,
                url,
                "cache",
                false,
                format!(
                    "{} is corrupt (SHA-256 {actual}, {len} bytes; expected {sha}); deleted",
                    cached.display()
                ),
            );
            std::fs::remove_file(&cached).map_err(cache_err(&cached))?;
            let _ = std::fs::remove_file(&sources_file);
        }
    }

    let mut staged: Option<tempfile::NamedTempFile> = None;
    let mut downloads = 0u32;
    if !from_cache {
        let mut last = None;
        for attempt in 1..=settings.attempts {
            downloads = attempt;
            match download(&agent, &loc, Some(&sha), spec.size, cache_dir) {
                Ok((tmp, len)) => {
                    record(
                        checks,
                        url,
                        "download",
                        true,
                        format!("attempt {attempt}: SHA-256 {sha}, {len} bytes"),
                    );
                    staged = Some(tmp);
                    bytes = len;
                    break;
                }
                Err(AttemptError::Cache(e)) => return Err(cache_err(cache_dir)(e)),
                Err(AttemptError::Retry(failure)) => {
                    record(
                        checks,
                        url,
                        "download",
                        false,
                        format!("attempt {attempt} of {}: {failure}", settings.attempts),
                    );
                    last = Some(failure);
                }
            }
        }
        if staged.is_none() {
            return Err(ArtifactError::Exhausted {
                url: url.to_string(),
                attempts: settings.attempts,
                last: last.unwrap_or_else(|| AttemptFailure::Transport("no attempt made".into())),
            });
        }
    }
    let file_path = staged
        .as_ref()
        .map(|t| t.path().to_path_buf())
        .unwrap_or_else(|| cached.clone());

    let mut signature_checked = false;
    match (&signature, keys.is_empty()) {
        (None, _) => {}
        (Some(_), true) => record(
            checks,
            url,
            "signature",
            true,
            "not verified: no artifacts.public_keys pinned in patchbook.toml".into(),
        ),
        (Some(sig), false) => {
            let (shown, text) = match sig {
                SignatureRef::Inline(t) => ("(inline)".to_string(), Ok(t.clone())),
                SignatureRef::At(l) => (l.to_string(), read_signature(&agent, l)),
            };
            let verdict = text.and_then(|t| verify_signature(&t, &file_path, &keys));
            match verdict {
                Ok(comment) => {
                    record(
                        checks,
                        url,
                        "signature",
                        true,
                        format!("{shown} verified; trusted comment: {comment}"),
                    );
                    signature_checked = true;
                }
                Err(reason) => {
                    record(
                        checks,
                        url,
                        "signature",
                        false,
                        format!("{shown}: {reason}"),
                    );
                    return Err(ArtifactError::BadSignature {
                        url: url.to_string(),
                        signature: shown,
                        reason,
                    });
                }
            }
        }
    }

    if let Some(tmp) = staged {
        tmp.persist(&cached)
            .map_err(|e| cache_err(&cached)(e.error))?;
        let mut sources = read_sources(&sources_file);
        if !sources.contains(&source) {
            sources.push(source.clone());
        }
        write_sources(&sources_file, &sources).map_err(cache_err(&sources_file))?;
        record(
            checks,
            url,
            "cache",
            true,
            format!("stored as {}", cached.display()),
        );
    }

    Ok(Artifact {
        url: url.to_string(),
        sha256: sha,
        size: spec.size,
        bytes,
        path: cached,
        signature_checked,
        from_cache,
        downloads,
        checks: checks.clone(),
    })
}

/// Fetches a document that changes over time and whose digest nobody pinned (an
/// advisory feed): the allowlist applies as to any artifact, the bytes are hashed
/// as they arrive and kept in the cache under their SHA-256, and the returned
/// digest is what the caller journals. Pinned documents go through
/// [`fetch_recorded`] instead.
pub fn fetch_unpinned(
    url: &str,
    settings: &ArtifactSettings,
    checks: &mut Vec<ArtifactCheck>,
) -> Result<Artifact, ArtifactError> {
    let (loc, _) = trusted_source(url, settings, checks)?;
    let cache_dir = &settings.cache_dir;
    let cache_err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| ArtifactError::Cache { path, source }
    };
    crate::journal::private::create_dir_all(cache_dir).map_err(cache_err(cache_dir))?;
    let agent = agent(settings.timeout);
    let mut last = None;
    for attempt in 1..=settings.attempts {
        match download(&agent, &loc, None, None, cache_dir) {
            Ok((tmp, len)) => {
                let (sha, _) = hash_file(tmp.path()).map_err(cache_err(tmp.path()))?;
                record(
                    checks,
                    url,
                    "download",
                    true,
                    format!("attempt {attempt}: SHA-256 {sha}, {len} bytes (not pinned)"),
                );
                let cached = cache_dir.join(&sha);
                tmp.persist(&cached)
                    .map_err(|e| cache_err(&cached)(e.error))?;
                let sources_file = sources_path(&cached);
                let mut sources = read_sources(&sources_file);
                let source = loc.to_string();
                if !sources.contains(&source) {
                    sources.push(source);
                }
                write_sources(&sources_file, &sources).map_err(cache_err(&sources_file))?;
                return Ok(Artifact {
                    url: url.to_string(),
                    sha256: sha,
                    size: None,
                    bytes: len,
                    path: cached,
                    signature_checked: false,
                    from_cache: false,
                    downloads: attempt,
                    checks: checks.clone(),
                });
            }
            Err(AttemptError::Cache(e)) => return Err(cache_err(cache_dir)(e)),
            Err(AttemptError::Retry(failure)) => {
                record(
                    checks,
                    url,
                    "download",
                    false,
                    format!("attempt {attempt} of {}: {failure}", settings.attempts),
                );
                last = Some(failure);
            }
        }
    }
    Err(ArtifactError::Exhausted {
        url: url.to_string(),
        attempts: settings.attempts,
        last: last.unwrap_or_else(|| AttemptFailure::Transport("no attempt made".into())),
    })
}

/// The file beside a cache entry that lists the sources its bytes came from.
fn sources_path(cached: &Path) -> PathBuf {
    let mut name = cached.as_os_str().to_owned();
    name.push(".sources.json");
    PathBuf::from(name)
}

/// The sources recorded for a cache entry; none when the list is missing or
/// unreadable (then the entry is reused by no source until fetched again).
fn read_sources(path: &Path) -> Vec<String> {
    std::fs::read(path)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default()
}

fn write_sources(path: &Path, sources: &[String]) -> std::io::Result<()> {
    let text = serde_json::to_vec_pretty(sources).map_err(std::io::Error::other)?;
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut tmp = tempfile::NamedTempFile::new_in(dir)?;
    tmp.write_all(&text)?;
    tmp.persist(path).map_err(|e| e.error)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_check_entry_is_the_record_the_script_layer_writes_today() {
        let c = ArtifactCheck {
            what: "download".into(),
            ok: true,
            detail: "sha256 matches".into(),
        };
        let e = c.entry("https://m.example.com/a.deb", "ab");
        assert_eq!(e.kind(), "artifact");
        assert_eq!(
            e.to_data(),
            serde_json::json!({"url": "https://m.example.com/a.deb", "sha256": "ab",
                               "what": c.what, "ok": c.ok, "detail": c.detail})
        );
    }

    fn settings(trusted: &[&str]) -> ArtifactSettings {
        ArtifactSettings {
            trusted_sources: trusted.iter().map(|s| s.to_string()).collect(),
            base_dir: PathBuf::from("/srv/patchbook"),
            cache_dir: PathBuf::from("/nonexistent"),
            attempts: 1,
            public_keys: vec![],
            timeout: Duration::from_secs(1),
        }
    }

    #[test]
    fn prefixes_match_on_boundaries_only() {
        let s = settings(&[
            "https://mirror.example.com/pool/",
            "https://dl.example.org/acme",
        ]);
        let yes = [
            "https://mirror.example.com/pool/a.deb",
            "https://MIRROR.example.com/pool/sub/a.deb",
            "https://mirror.example.com:443/pool/a.deb",
            "https://dl.example.org/acme/a.deb",
            "https://dl.example.org/acme",
        ];
        let no = [
            "https://mirror.example.com.evil.net/pool/a.deb",
            "https://mirror.example.com/poolx/a.deb",
            "https://mirror.example.com/pool/../secret/a.deb",
            "https://mirror.example.com/pool/%2e%2e/secret/a.deb",
            "https://mirror.example.com/pool/..%2fsecret/a.deb",
            "https://mirror.example.com:8443/pool/a.deb",
            "http://mirror.example.com/pool/a.deb",
            "https://mirror.example.com@evil.net/pool/a.deb",
            "https://dl.example.org/acme-evil/a.deb",
            "https://dl.example.org/acmex",
            "ftp://mirror.example.com/pool/a.deb",
            "/etc/passwd",
        ];
        for u in yes {
            assert!(is_trusted(u, &s).unwrap(), "{u} should be trusted");
        }
        for u in no {
            assert!(!is_trusted(u, &s).unwrap(), "{u} must not be trusted");
        }
    }

    #[test]
    fn local_mirrors_normalise_dotdot() {
        let s = settings(&["/srv/mirror", "offline"]);
        assert!(is_trusted("/srv/mirror/pool/a.deb", &s).unwrap());
        assert!(is_trusted("file:///srv/mirror/a.deb", &s).unwrap());
        assert!(is_trusted("/srv/patchbook/offline/a.deb", &s).unwrap());
        assert!(!is_trusted("/srv/mirror/../etc/passwd", &s).unwrap());
        assert!(!is_trusted("/srv/mirror2/a.deb", &s).unwrap());
        assert!(!is_trusted("https://srv/mirror/a.deb", &s).unwrap());
    }

    #[test]
    fn plain_http_is_only_for_loopback() {
        let err = is_trusted("https://x/a", &settings(&["http://mirror.example.com/"]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("only accepted for 127.0.0.1"), "{err}");
        let s = settings(&["http://127.0.0.1:8080/"]);
        assert!(is_trusted("http://127.0.0.1:8080/a.deb", &s).unwrap());
        assert!(!is_trusted("http://localhost:8080/a.deb", &s).unwrap());
        assert!(!is_trusted("http://127.0.0.1:8081/a.deb", &s).unwrap());
    }

    #[test]
    fn signature_paths_resolve_against_the_artifact() {
        let base = Path::new("/");
        let loc = parse_location("https://m.example.com/pool/a.deb", base).unwrap();
        match resolve_signature("a.deb.minisig", &loc, base).unwrap() {
            SignatureRef::At(Location::Http(u)) => {
                assert_eq!(u.as_str(), "https://m.example.com/pool/a.deb.minisig")
            }
            _ => panic!("expected a URL"),
        }
        match resolve_signature("untrusted comment: x\nRW..", &loc, base).unwrap() {
            SignatureRef::Inline(_) => {}
            _ => panic!("expected inline text"),
        }
    }
}
