//! The stdlib compiled into the binary, so `import "patch/debian"` works from a
//! copied or packaged binary with no checkout beside it.
//!
//! It owns the embedded copy of the repository's `stdlib/` folder and the
//! placeholder paths its modules carry in diagnostics, journals and reports. It is
//! used only when no stdlib folder is configured or found (`Config::stdlib_folder`);
//! it never reads the disk, and watch mode does not watch it: it cannot change while
//! the process runs.

use std::path::{Path, PathBuf};

use include_dir::{include_dir, Dir};

static STDLIB: Dir<'static> = include_dir!("$CARGO_MANIFEST_DIR/stdlib");

/// Prefix of every embedded module's path. Not a real folder: it makes the origin
/// plain in error locations and run headers, and never matches a file on disk.
pub const BUILTIN_ROOT: &str = "<built-in stdlib>";

/// The placeholder path of the embedded file `file` (e.g. `patch/debian.rhai`).
pub fn builtin_path(file: &str) -> PathBuf {
    Path::new(BUILTIN_ROOT).join(file)
}

/// The text of the embedded file `file` (a relative `.rhai` name already checked
/// by `check_import_path`).
pub fn builtin_file(file: &str) -> Option<&'static str> {
    STDLIB.get_file(file).and_then(|f| f.contents_utf8())
}

/// The text behind a placeholder path from [`builtin_path`].
pub fn builtin_text(path: &Path) -> Option<&'static str> {
    let file = path.strip_prefix(BUILTIN_ROOT).ok()?;
    builtin_file(file.to_str()?)
}

/// Every embedded module as (file name under the stdlib, text), sorted by name.
pub fn builtin_modules() -> Vec<(String, &'static str)> {
    fn walk(dir: &Dir<'static>, out: &mut Vec<(String, &'static str)>) {
        for f in dir.files() {
            let name = f.path().to_string_lossy().into_owned();
            if let (true, Some(text)) = (name.ends_with(".rhai"), f.contents_utf8()) {
                out.push((name, text));
            }
        }
        for d in dir.dirs() {
            walk(d, out);
        }
    }
    let mut out = Vec::new();
    walk(&STDLIB, &mut out);
    out.sort();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embeds_the_stdlib_folder_exactly() {
        let modules = builtin_modules();
        assert!(modules.iter().any(|(n, _)| n == "patch/debian.rhai"));
        for (name, text) in &modules {
            let on_disk = std::fs::read_to_string(Path::new("stdlib").join(name)).unwrap();
            assert_eq!(*text, on_disk, "{name} differs from stdlib/{name}");
            assert_eq!(builtin_text(&builtin_path(name)), Some(*text));
        }
        let on_disk = glob::glob("stdlib/**/*.rhai").unwrap().count();
        assert_eq!(modules.len(), on_disk);
        assert_eq!(builtin_text(Path::new("stdlib/patch/debian.rhai")), None);
    }
}
