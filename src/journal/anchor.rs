//! Signed anchors: the Ed25519 key pair that vouches for a run's checkpoints and
//! close, kept outside the state directory.
//!
//! A hash chain only proves that a file agrees with itself: whoever can write the
//! state directory can re-hash a run and re-chain the audit index. A signature made
//! with a key that is not in the state directory cannot be redone by that writer.
//! This module owns the key files (a raw 32-byte seed to sign, an OpenSSH
//! `ssh-ed25519 AAAA…` line to verify), the exact bytes that are signed, and the
//! optional copy of each signed head to syslog. It must not read or write run files
//! or the index (the journal and the audit do), and it never writes the seed
//! anywhere.

use std::fmt;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use ed25519_dalek::{Signature, Signer as _, SigningKey, Verifier as _, VerifyingKey};
use sha2::{Digest, Sha256};

/// Prefix of every signed message, so a signature made for patchbook's audit can
/// never be replayed as a signature of anything else made with the same key.
const DOMAIN: &[u8] = b"patchbook-audit-v1\0";

#[derive(Debug, thiserror::Error)]
pub enum AnchorError {
    #[error("cannot read audit signing key {path}; check `[audit] signing_key` in patchbook.toml")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read audit verify key file {path}; check `[audit] verify_key` in patchbook.toml (a path, or the `ssh-ed25519 AAAA…` line itself)")]
    ReadVerifyKey {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("audit signing key {path} is not a 32-byte Ed25519 seed (found {len} bytes); make one with `head -c 32 /dev/urandom > {}`", path.display())]
    BadSeed { path: PathBuf, len: usize },
    #[error("audit verify key `{given}` is not an `ssh-ed25519 AAAA…` public key: {reason}; print the right one with `patchbook audit key` where the signing key is configured")]
    BadVerifyKey { given: String, reason: String },
}

/// The private half: signs checkpoints, closes and index entries.
#[derive(Clone)]
pub struct Signer {
    key: SigningKey,
}

impl fmt::Debug for Signer {
    // Never print the seed, not even in a Debug dump.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Signer({})", self.verify_key().fingerprint())
    }
}

impl Signer {
    /// Reads a raw 32-byte seed file (`head -c 32 /dev/urandom > audit.key`).
    pub fn from_seed_file(path: &Path) -> Result<Self, AnchorError> {
        let bytes = std::fs::read(path).map_err(|source| AnchorError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let seed: [u8; 32] = bytes
            .as_slice()
            .try_into()
            .map_err(|_| AnchorError::BadSeed {
                path: path.to_path_buf(),
                len: bytes.len(),
            })?;
        Ok(Signer::from_seed(seed))
    }

    pub fn from_seed(seed: [u8; 32]) -> Self {
        Signer {
            key: SigningKey::from_bytes(&seed),
        }
    }

    pub fn verify_key(&self) -> VerifyKey {
        VerifyKey {
            key: self.key.verifying_key(),
        }
    }

    fn sign(&self, message: &[u8]) -> String {
        hex::encode(self.key.sign(message).to_bytes())
    }

    /// Signs an audit index entry by its hash (which covers its seq, run, event,
    /// record count, head hash and the previous entry's hash).
    pub fn sign_index(&self, entry_hash: &str) -> String {
        self.sign(&index_message(entry_hash))
    }

    /// Signs a run's close: the run, the close record's seq and the hash of the
    /// record before it.
    pub fn sign_close(&self, run: &str, seq: u64, prev: &str) -> String {
        self.sign(&close_message(run, seq, prev))
    }
}

/// The public half: what `audit verify` checks signatures with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifyKey {
    key: VerifyingKey,
}

impl VerifyKey {
    /// `ssh-ed25519 AAAA… [comment]`, or a file holding that line (`config_dir`
    /// resolves a relative path).
    pub fn load(spec: &str, config_dir: &Path) -> Result<Self, AnchorError> {
        let spec = spec.trim();
        // A key line of another type is a wrong key, not a file name.
        if spec.starts_with("ssh-") {
            return VerifyKey::parse(spec);
        }
        let path = config_dir.join(spec);
        let text = std::fs::read_to_string(&path).map_err(|source| AnchorError::ReadVerifyKey {
            path: path.clone(),
            source,
        })?;
        VerifyKey::parse(&text)
    }

    pub fn parse(line: &str) -> Result<Self, AnchorError> {
        let bad = |reason: &str| AnchorError::BadVerifyKey {
            given: line.trim().chars().take(80).collect(),
            reason: reason.to_string(),
        };
        let mut words = line.split_whitespace();
        if words.next() != Some("ssh-ed25519") {
            return Err(bad("it must start with `ssh-ed25519`"));
        }
        let blob = words
            .next()
            .and_then(|b| base64::engine::general_purpose::STANDARD.decode(b).ok())
            .ok_or_else(|| bad("the key is not base64"))?;
        // The OpenSSH wire form: string "ssh-ed25519", string key (32 bytes).
        let expected_prefix = wire_prefix();
        let key = blob
            .strip_prefix(expected_prefix.as_slice())
            .and_then(|k| <[u8; 32]>::try_from(k).ok())
            .ok_or_else(|| bad("it does not hold a 32-byte Ed25519 key"))?;
        let key = VerifyingKey::from_bytes(&key).map_err(|e| bad(&e.to_string()))?;
        Ok(VerifyKey { key })
    }

    /// `ssh-ed25519 AAAA… patchbook-audit`, the form [`VerifyKey::load`] reads.
    pub fn to_openssh(&self) -> String {
        let mut blob = wire_prefix();
        blob.extend_from_slice(self.key.as_bytes());
        format!(
            "ssh-ed25519 {} patchbook-audit",
            base64::engine::general_purpose::STANDARD.encode(blob)
        )
    }

    /// `SHA256:…` as `ssh-keygen -l` prints it, to name the key without showing it.
    pub fn fingerprint(&self) -> String {
        let mut blob = wire_prefix();
        blob.extend_from_slice(self.key.as_bytes());
        let digest = Sha256::digest(&blob);
        format!(
            "SHA256:{}",
            base64::engine::general_purpose::STANDARD_NO_PAD.encode(digest)
        )
    }

    fn verify(&self, message: &[u8], sig_hex: &str) -> bool {
        let Some(sig) = hex::decode(sig_hex)
            .ok()
            .and_then(|b| <[u8; 64]>::try_from(b).ok())
        else {
            return false;
        };
        self.key
            .verify(message, &Signature::from_bytes(&sig))
            .is_ok()
    }

    pub fn verify_index(&self, entry_hash: &str, sig: &str) -> bool {
        self.verify(&index_message(entry_hash), sig)
    }

    pub fn verify_close(&self, run: &str, seq: u64, prev: &str, sig: &str) -> bool {
        self.verify(&close_message(run, seq, prev), sig)
    }
}

fn wire_prefix() -> Vec<u8> {
    let mut out = Vec::with_capacity(51);
    out.extend_from_slice(&11u32.to_be_bytes());
    out.extend_from_slice(b"ssh-ed25519");
    out.extend_from_slice(&32u32.to_be_bytes());
    out
}

fn index_message(entry_hash: &str) -> Vec<u8> {
    let mut m = DOMAIN.to_vec();
    m.extend_from_slice(b"index\0");
    m.extend_from_slice(entry_hash.as_bytes());
    m
}

fn close_message(run: &str, seq: u64, prev: &str) -> Vec<u8> {
    let mut m = DOMAIN.to_vec();
    m.extend_from_slice(b"close\0");
    m.extend_from_slice(run.as_bytes());
    m.push(0);
    m.extend_from_slice(seq.to_string().as_bytes());
    m.push(0);
    m.extend_from_slice(prev.as_bytes());
    m
}

/// Where a copy of each signed head goes besides the index: outside the state
/// directory, so cutting the index's tail leaves a trace a writer of that
/// directory cannot remove.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Sink {
    #[default]
    None,
    /// The local syslog, through `logger -t patchbook-audit`.
    Syslog,
}

impl Sink {
    /// Sends one line; a sink that fails is reported in the log and never stops
    /// the run (the index entry is already on disk and signed).
    pub fn send(&self, line: &str) {
        if *self != Sink::Syslog {
            return;
        }
        let sent = std::process::Command::new("logger")
            .args(["-t", "patchbook-audit", "-p", "auth.notice", "--", line])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status();
        match sent {
            Ok(s) if s.success() => {}
            Ok(s) => tracing::warn!("audit head not sent to syslog: `logger` exited with {s}"),
            Err(e) => tracing::warn!("audit head not sent to syslog: cannot run `logger`: {e}"),
        }
    }
}

/// The key and sink a journal signs with; cheap to clone.
#[derive(Debug, Clone)]
pub struct Anchor {
    pub signer: Signer,
    pub sink: Sink,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_signature_verifies_only_its_own_message_and_key() {
        let s = Signer::from_seed([7; 32]);
        let k = VerifyKey::parse(&s.verify_key().to_openssh()).unwrap();
        let sig = s.sign_close("r1", 5, "ab");
        assert!(k.verify_close("r1", 5, "ab", &sig));
        assert!(!k.verify_close("r1", 6, "ab", &sig));
        assert!(!k.verify_close("r2", 5, "ab", &sig));
        assert!(!k.verify_index("ab", &sig));
        let other = Signer::from_seed([8; 32]).verify_key();
        assert!(!other.verify_close("r1", 5, "ab", &sig));
        assert!(!k.verify_close("r1", 5, "ab", "zz"));
    }

    #[test]
    fn a_verify_key_is_read_inline_or_from_a_file_beside_the_config() {
        let dir = tempfile::tempdir().unwrap();
        let line = Signer::from_seed([7; 32]).verify_key().to_openssh();
        std::fs::write(dir.path().join("audit.pub"), format!("{line}\n")).unwrap();
        let from_file = VerifyKey::load("audit.pub", dir.path()).unwrap();
        assert_eq!(from_file, VerifyKey::load(&line, dir.path()).unwrap());
        let err = VerifyKey::load("missing.pub", dir.path()).unwrap_err();
        assert!(err.to_string().contains("verify key file"), "{err}");
    }

    #[test]
    fn verify_keys_that_are_not_ed25519_are_refused() {
        assert!(VerifyKey::parse("ssh-rsa AAAAB3NzaC1yc2E=").is_err());
        assert!(VerifyKey::parse("ssh-ed25519 !!!").is_err());
        assert!(VerifyKey::parse("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5").is_err());
        let dbg = format!("{:?}", Signer::from_seed([7; 32]));
        assert!(dbg.starts_with("Signer(SHA256:"), "{dbg}");
    }
}
