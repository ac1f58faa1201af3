//! `patchbook init [DIR]`: a new project folder a first run can start from.
//!
//! It owns the starter files (a commented `patchbook.toml`, an example inventory
//! and a first playbook, kept as files under `src/cli/init/` so they read as what
//! they are) and writing them. It never overwrites: an existing file is an error
//! naming it, checked for every file before the first one is written.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use super::CliError;

/// The starter files, by path relative to the project folder.
const FILES: [(&str, &str); 3] = [
    ("patchbook.toml", include_str!("init/patchbook.toml")),
    ("inventory.toml", include_str!("init/inventory.toml")),
    (
        "playbooks/patch-package.rhai",
        include_str!("init/patch-package.rhai"),
    ),
];

/// Writes the starter project into `dir` (created if missing) and prints what to
/// run next.
pub fn init(dir: &Path, quiet: bool) -> Result<ExitCode, CliError> {
    let targets: Vec<(PathBuf, &str)> = FILES
        .iter()
        .map(|(name, text)| (dir.join(name), *text))
        .collect();
    if let Some((path, _)) = targets.iter().find(|(p, _)| p.symlink_metadata().is_ok()) {
        return Err(CliError::Usage(format!(
            "init: {} already exists; init never overwrites: move it away or choose another folder",
            path.display()
        )));
    }
    for (path, text) in &targets {
        write_new(path, text)
            .map_err(|e| CliError::Other(format!("init: cannot write {}: {e}", path.display())))?;
    }
    if !quiet {
        for (path, _) in &targets {
            println!("created {}", path.display());
        }
        let cd = if dir == Path::new(".") {
            String::new()
        } else {
            format!("cd {} && ", shell_word(&dir.display().to_string()))
        };
        println!(
            "\nNext:\n  {cd}$EDITOR inventory.toml             # your hosts\n  \
             patchbook check                               # compile every playbook, run nothing\n  \
             patchbook plan playbooks/patch-package.rhai --param package=… --param version=… --param deb=… --param sha256=…"
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn write_new(path: &Path, text: &str) -> std::io::Result<()> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    // create_new: a file that appeared since the check above is still not replaced.
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)?;
    file.write_all(text.as_bytes())
}

/// `s` quoted for a POSIX shell when it holds anything but plain path characters.
fn shell_word(s: &str) -> String {
    let plain = s
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || "/._-+:@".contains(c));
    if plain && !s.is_empty() {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_to_overwrite_and_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("playbooks")).unwrap();
        std::fs::write(dir.path().join("playbooks/patch-package.rhai"), "mine").unwrap();
        let err = init(dir.path(), true).unwrap_err().to_string();
        assert!(err.contains("playbooks/patch-package.rhai"), "{err}");
        assert!(err.contains("already exists"), "{err}");
        // Nothing was written, not even the files that did not exist.
        assert!(!dir.path().join("patchbook.toml").exists());
        let kept = std::fs::read_to_string(dir.path().join("playbooks/patch-package.rhai"));
        assert_eq!(kept.unwrap(), "mine");
    }

    #[test]
    fn starter_config_parses_with_every_key_known() {
        let text = FILES[0].1;
        let config: crate::config::Config = toml::from_str(text).unwrap();
        assert_eq!(config.playbooks.as_deref(), Some(Path::new("playbooks")));
        assert!(
            config.stdlib.is_none(),
            "the starter uses the built-in stdlib"
        );
    }

    #[test]
    fn quotes_folder_names_for_the_shell() {
        assert_eq!(shell_word("demo"), "demo");
        assert_eq!(shell_word("my demo"), "'my demo'");
        assert_eq!(shell_word("it's"), r"'it'\''s'");
    }
}
