//! Module resolution for `import "patch/debian"`: the stdlib (a folder, or the copy
//! built into the binary), then each library folder from `patchbook.toml`, in order.
//!
//! A [`LibraryResolver`] is built fresh for every compile (hot reload depends on it:
//! nothing is cached across compiles) and records the text and SHA-256 of every file
//! it reads, so a compiled playbook can say exactly which module versions it holds.
//! Imports that would leave those roots are refused, for the built-in stdlib as for
//! folders. This file reads `.rhai` files under the roots and nothing else.

use std::collections::HashMap;
use std::path::{Component, Path, PathBuf};
use std::sync::{Arc, Mutex};

type SharedModule = std::sync::Arc<rhai::Module>;
use rhai::{Engine, EvalAltResult, Module, ModuleResolver, Position, Scope, AST};
use sha2::{Digest, Sha256};

use super::builtin::{builtin_file, builtin_path, builtin_text};

/// One module file read while compiling.
#[derive(Debug, Clone)]
pub struct LoadedModule {
    /// The import path as written, e.g. `patch/debian`.
    pub name: String,
    pub path: PathBuf,
    pub sha256: String,
    pub text: Arc<str>,
}

/// Resolves imports under an ordered list of root folders. Clones share their
/// record of loaded files: one clone goes into the engine, the compiler keeps another.
#[derive(Clone)]
pub struct LibraryResolver {
    roots: Arc<Vec<PathBuf>>,
    /// Search the built-in stdlib before the roots (no stdlib folder configured).
    builtin_stdlib: bool,
    loaded: Arc<Mutex<Vec<LoadedModule>>>,
    /// Compiled modules by import path, so a module imported twice in one compile is
    /// read and evaluated once and both importers see the same version.
    modules: Arc<Mutex<HashMap<String, SharedModule>>>,
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

impl LibraryResolver {
    pub fn new(roots: Vec<PathBuf>) -> Self {
        LibraryResolver {
            roots: Arc::new(roots),
            builtin_stdlib: false,
            loaded: Arc::default(),
            modules: Arc::default(),
        }
    }

    /// Searches the stdlib built into the binary first, as the stdlib folder would be.
    pub fn with_builtin_stdlib(mut self) -> Self {
        self.builtin_stdlib = true;
        self
    }

    pub fn roots(&self) -> &[PathBuf] {
        &self.roots
    }

    /// Every module file read so far, in first-read order.
    pub fn loaded(&self) -> Vec<LoadedModule> {
        self.loaded
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The file `name` resolves to, or every path that was tried.
    pub fn locate(&self, name: &str) -> Result<PathBuf, ImportError> {
        check_import_path(name)?;
        let file = if name.ends_with(".rhai") {
            name.to_string()
        } else {
            format!("{name}.rhai")
        };
        let mut searched = Vec::new();
        if self.builtin_stdlib {
            if builtin_file(&file).is_some() {
                return Ok(builtin_path(&file));
            }
            searched.push(builtin_path(&file));
        }
        for root in self.roots.iter() {
            let candidate = root.join(&file);
            if candidate.is_file() {
                return Ok(candidate);
            }
            searched.push(candidate);
        }
        Err(ImportError::NotFound {
            name: name.to_string(),
            searched,
        })
    }

    fn read(&self, name: &str, pos: Position) -> Result<(PathBuf, Arc<str>), Box<EvalAltResult>> {
        let path = self.locate(name).map_err(|e| e.into_rhai(pos))?;
        let mut loaded = self.loaded.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(m) = loaded.iter().find(|m| m.path == path) {
            return Ok((path, m.text.clone()));
        }
        let builtin = self.builtin_stdlib.then(|| builtin_text(&path)).flatten();
        let text: Arc<str> = match builtin {
            Some(text) => Ok(text.to_string()),
            None => std::fs::read_to_string(&path),
        }
        .map_err(|e| {
            Box::new(EvalAltResult::ErrorRuntime(
                format!("cannot read module {}: {e}", path.display()).into(),
                pos,
            ))
        })?
        .into();
        loaded.push(LoadedModule {
            name: name.to_string(),
            path: path.clone(),
            sha256: sha256_hex(text.as_bytes()),
            text: text.clone(),
        });
        Ok((path, text))
    }

    fn compile(
        &self,
        engine: &Engine,
        name: &str,
        pos: Position,
    ) -> Result<AST, Box<EvalAltResult>> {
        let (_, text) = self.read(name, pos)?;
        let mut ast = engine
            .compile(&*text)
            .map_err(|e| Box::new(EvalAltResult::ErrorInModule(name.into(), e.into(), pos)))?;
        ast.set_source(name);
        Ok(ast)
    }
}

/// Why an import path was not resolved.
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error("import `{name}` refused: {reason}; imports name a module under stdlib/ or a library folder, like `patch/debian`")]
    Refused { name: String, reason: &'static str },
    #[error("module `{name}` not found; searched {}", searched.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", "))]
    NotFound {
        name: String,
        searched: Vec<PathBuf>,
    },
}

impl ImportError {
    fn into_rhai(self, pos: Position) -> Box<EvalAltResult> {
        match self {
            // Carries the searched paths in the module name: Rhai's own message then
            // reads "Module not found: patch/x; searched …".
            ImportError::NotFound { .. } => {
                let text = self.to_string();
                let detail = text
                    .strip_prefix("module `")
                    .and_then(|t| t.split_once("` not found"))
                    .map(|(n, rest)| format!("{n}{rest}"))
                    .unwrap_or(text);
                Box::new(EvalAltResult::ErrorModuleNotFound(detail, pos))
            }
            ImportError::Refused { .. } => {
                Box::new(EvalAltResult::ErrorRuntime(self.to_string().into(), pos))
            }
        }
    }
}

/// Refuses absolute paths, `..`, `.` and anything but plain relative names.
pub fn check_import_path(name: &str) -> Result<(), ImportError> {
    let refuse = |reason| {
        Err(ImportError::Refused {
            name: name.to_string(),
            reason,
        })
    };
    if name.is_empty() {
        return refuse("the path is empty");
    }
    if name.contains('\\') || name.contains('\0') {
        return refuse("the path contains a backslash or NUL");
    }
    let p = Path::new(name);
    if p.is_absolute() {
        return refuse("absolute paths are not allowed");
    }
    for c in p.components() {
        match c {
            Component::Normal(_) => {}
            Component::ParentDir => return refuse("`..` would leave the library folders"),
            Component::CurDir => return refuse("`.` components are not allowed"),
            Component::RootDir | Component::Prefix(_) => {
                return refuse("absolute paths are not allowed")
            }
        }
    }
    Ok(())
}

impl ModuleResolver for LibraryResolver {
    fn resolve(
        &self,
        engine: &Engine,
        _source: Option<&str>,
        path: &str,
        pos: Position,
    ) -> Result<SharedModule, Box<EvalAltResult>> {
        if let Some(m) = self
            .modules
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(path)
        {
            return Ok(m.clone());
        }
        let ast = self.compile(engine, path, pos)?;
        let mut module = Module::eval_ast_as_new(Scope::new(), &ast, engine)
            .map_err(|e| Box::new(EvalAltResult::ErrorInModule(path.into(), e, pos)))?;
        module.set_id(path);
        let module: SharedModule = module.into();
        self.modules
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(path.to_string(), module.clone());
        Ok(module)
    }

    fn resolve_ast(
        &self,
        engine: &Engine,
        _source: Option<&str>,
        path: &str,
        pos: Position,
    ) -> Option<Result<AST, Box<EvalAltResult>>> {
        Some(self.compile(engine, path, pos))
    }
}

/// The resolver of run engines: a compiled playbook carries every module it
/// imports, so anything reaching this resolver was not a string-literal import.
pub struct RefusingResolver;

impl ModuleResolver for RefusingResolver {
    fn resolve(
        &self,
        _engine: &Engine,
        _source: Option<&str>,
        path: &str,
        pos: Position,
    ) -> Result<SharedModule, Box<EvalAltResult>> {
        Err(Box::new(EvalAltResult::ErrorRuntime(
            format!(
                "import `{path}` is not part of the compiled playbook; write imports as string literals (import \"patch/debian\" as deb;)"
            )
            .into(),
            pos,
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_escapes() {
        for bad in ["../../etc/x", "/etc/passwd", "a/../../b", "./x", "", "a\\b"] {
            assert!(
                matches!(check_import_path(bad), Err(ImportError::Refused { .. })),
                "{bad} was accepted"
            );
        }
        for good in ["patch/debian", "acme/contacts", "x.rhai"] {
            assert!(check_import_path(good).is_ok(), "{good} was refused");
        }
    }

    #[test]
    fn not_found_names_every_path() {
        let r = LibraryResolver::new(vec![
            PathBuf::from("/nonexistent/a"),
            PathBuf::from("/nonexistent/b"),
        ]);
        let err = r.locate("patch/x").unwrap_err().to_string();
        assert!(err.contains("/nonexistent/a/patch/x.rhai"), "{err}");
        assert!(err.contains("/nonexistent/b/patch/x.rhai"), "{err}");
    }

    #[test]
    fn builtin_stdlib_comes_first_and_keeps_the_path_checks() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("patch")).unwrap();
        std::fs::write(dir.path().join("patch/debian.rhai"), "fn shadow() {}").unwrap();
        std::fs::write(dir.path().join("org.rhai"), "fn org() {}").unwrap();
        let r = LibraryResolver::new(vec![dir.path().to_path_buf()]).with_builtin_stdlib();
        assert_eq!(
            r.locate("patch/debian").unwrap(),
            builtin_path("patch/debian.rhai")
        );
        assert_eq!(r.locate("org").unwrap(), dir.path().join("org.rhai"));
        for bad in ["../stdlib/patch/debian", "/patch/debian", "./patch/debian"] {
            assert!(
                matches!(r.locate(bad), Err(ImportError::Refused { .. })),
                "{bad} was accepted"
            );
        }
        let err = r.locate("patch/none").unwrap_err().to_string();
        assert!(err.contains("<built-in stdlib>/patch/none.rhai"), "{err}");
        // Without the flag the placeholder path is no module at all.
        let plain = LibraryResolver::new(vec![dir.path().to_path_buf()]);
        assert_eq!(
            plain.locate("patch/debian").unwrap(),
            dir.path().join("patch/debian.rhai")
        );
    }
}
