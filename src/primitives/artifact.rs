//! TEMPORARY placeholder until the artifact module lands.
use std::path::PathBuf;
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Artifact {
    pub url: String,
    pub path: PathBuf,
    pub sha256: String,
    pub size: u64,
}
