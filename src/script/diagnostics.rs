//! Script errors rendered the way `rustc` and `just` render theirs: the message,
//! `file:line:col`, the source line with a caret under the column, and the call
//! chain through functions and modules, innermost first.
//!
//! It turns a Rhai error plus the sources it came from into a [`Diagnostic`]; it
//! reads no files itself (the sources are the exact texts that were compiled).

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use rhai::{EvalAltResult, ParseErrorType, Position};

/// One source text a script error may point into.
#[derive(Debug, Clone)]
pub struct SourceFile {
    /// The path shown to the user.
    pub display: String,
    pub text: Arc<str>,
}

/// Source texts by the name Rhai knows them under: the playbook's display path,
/// and each module's import path.
#[derive(Debug, Clone, Default)]
pub struct SourceMap {
    files: HashMap<String, SourceFile>,
}

impl SourceMap {
    pub fn insert(&mut self, name: impl Into<String>, display: impl Into<String>, text: Arc<str>) {
        self.files.insert(
            name.into(),
            SourceFile {
                display: display.into(),
                text,
            },
        );
    }

    pub fn get(&self, name: &str) -> Option<&SourceFile> {
        self.files.get(name)
    }

    fn display(&self, name: &str) -> String {
        self.files
            .get(name)
            .map(|f| f.display.clone())
            .unwrap_or_else(|| name.to_string())
    }
}

/// A place in a source file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Location {
    pub file: String,
    pub line: usize,
    pub column: usize,
    /// The whole source line, when the text is known.
    pub text: Option<String>,
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}", self.file, self.line, self.column)
    }
}

/// One step of the call chain: a function call or a module load, and where it
/// happened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub what: String,
    pub at: Option<Location>,
}

/// A rendered script error.
#[derive(Debug, Clone)]
pub struct Diagnostic {
    pub message: String,
    pub location: Option<Location>,
    /// Innermost first.
    pub frames: Vec<Frame>,
    pub help: Option<String>,
    /// True when a sandbox limit (operations, depth, sizes, deadline) stopped the script.
    pub limit: bool,
}

/// Builds the diagnostic for `err`, raised while running code whose source is
/// named `top` in `sources`.
pub fn diagnose(err: &EvalAltResult, top: &str, sources: &SourceMap) -> Diagnostic {
    let mut frames = Vec::new();
    let mut current = top.to_string();
    let mut err = err;
    loop {
        match err {
            EvalAltResult::ErrorInFunctionCall(name, src, inner, pos) => {
                let what = if name.starts_with("anon$") {
                    "in closure".to_string()
                } else {
                    format!("in call to function `{name}`")
                };
                frames.push(Frame {
                    what,
                    at: locate(sources, &current, *pos, false),
                });
                if !src.is_empty() {
                    current = src.clone();
                }
                err = inner;
            }
            EvalAltResult::ErrorInModule(name, inner, pos) => {
                let at = locate(sources, &current, *pos, false)
                    .or_else(|| find_import(sources, &current, name));
                frames.push(Frame {
                    what: format!("in module `{name}`"),
                    at,
                });
                current = name.clone();
                err = inner;
            }
            _ => break,
        }
    }
    frames.reverse();
    let (help, limit) = help_for(err);
    let location = locate(sources, &current, err.position(), true).or_else(|| {
        // Imports resolved while compiling carry no position: point at the statement.
        let name = import_named_by(err)?;
        let mut at = find_import(sources, &current, &name)?;
        at.text = sources
            .get(&current)
            .and_then(|f| f.text.lines().nth(at.line - 1).map(str::to_string));
        Some(at)
    });
    Diagnostic {
        message: message_of(err),
        location,
        frames,
        help,
        limit,
    }
}

/// The import path an import failure is about.
fn import_named_by(err: &EvalAltResult) -> Option<String> {
    match err {
        EvalAltResult::ErrorModuleNotFound(s, _) => {
            Some(s.split(';').next().unwrap_or(s).trim().to_string())
        }
        EvalAltResult::ErrorRuntime(v, _) => {
            let s = v.clone().into_string().ok()?;
            let rest = s.strip_prefix("import `")?;
            rest.split_once('`').map(|(name, _)| name.to_string())
        }
        _ => None,
    }
}

fn message_of(err: &EvalAltResult) -> String {
    match err {
        EvalAltResult::ErrorRuntime(v, _) if v.is_string() => v.to_string(),
        EvalAltResult::ErrorTerminated(v, _) => format!("script stopped: {v}"),
        EvalAltResult::ErrorParsing(p @ ParseErrorType::VariableUndefined(_), _) => p.to_string(),
        other => {
            let text = other.to_string();
            let pos = other.position();
            if pos.is_none() {
                return text;
            }
            let suffix = format!(" ({pos})");
            text.strip_suffix(&suffix)
                .map(str::to_string)
                .unwrap_or(text)
        }
    }
}

fn help_for(err: &EvalAltResult) -> (Option<String>, bool) {
    let help = match err {
        EvalAltResult::ErrorTooManyOperations(_) => {
            "the script used up its operation budget (an endless loop?); limits.max_operations in patchbook.toml sets it"
        }
        EvalAltResult::ErrorStackOverflow(_) => {
            "functions called each other deeper than limits.max_call_levels allows (runaway recursion?)"
        }
        EvalAltResult::ErrorDataTooLarge(..) => {
            "a value grew past limits.max_string_size, max_array_size or max_map_size in patchbook.toml"
        }
        EvalAltResult::ErrorTooManyVariables(_) => {
            "more variables than limits.max_variables allows"
        }
        EvalAltResult::ErrorTooManyModules(_) => "more modules than limits.max_modules allows",
        EvalAltResult::ErrorTerminated(why, _) if why.to_string().contains("limits.") => {
            "a sandbox limit ([limits] in patchbook.toml) ended the script; nothing after this point ran"
        }
        EvalAltResult::ErrorTerminated(..) => {
            "the script was stopped from outside; nothing after this point ran"
        }
        EvalAltResult::ErrorParsing(ParseErrorType::ExprTooDeep, _) => {
            "expressions nest deeper than limits.max_expr_depth allows"
        }
        EvalAltResult::ErrorParsing(ParseErrorType::LiteralTooLarge(..), _) => {
            "a literal is larger than the sandbox limits allow"
        }
        other if other.to_string().contains("'eval' is disabled") => {
            "patchbook scripts cannot run code built from strings; call functions instead"
        }
        _ => return (None, false),
    };
    (Some(help.to_string()), true)
}

fn locate(sources: &SourceMap, name: &str, pos: Position, with_text: bool) -> Option<Location> {
    let line = pos.line()?;
    let column = pos.position().unwrap_or(1);
    let text = if with_text {
        sources
            .get(name)
            .and_then(|f| f.text.lines().nth(line - 1).map(str::to_string))
    } else {
        None
    };
    Some(Location {
        file: sources.display(name),
        line,
        column,
        text,
    })
}

/// Imports resolved while compiling carry no position; the import statement is
/// found in the importing source instead.
fn find_import(sources: &SourceMap, name: &str, module: &str) -> Option<Location> {
    let file = sources.get(name)?;
    let needle = format!("\"{module}\"");
    file.text.lines().enumerate().find_map(|(i, l)| {
        let col = l.find(&needle)?;
        l[..col].contains("import").then(|| Location {
            file: file.display.clone(),
            line: i + 1,
            column: l[..col].chars().count() + 1,
            text: None,
        })
    })
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.message)?;
        let width = self
            .location
            .as_ref()
            .map(|l| l.line.to_string().len())
            .unwrap_or(1);
        let pad = " ".repeat(width + 2);
        if let Some(loc) = &self.location {
            write!(f, "\n{}--> {loc}", " ".repeat(width + 1))?;
            if let Some(text) = &loc.text {
                // Keep tabs so the caret lines up under what the terminal shows.
                let lead: String = text
                    .chars()
                    .take(loc.column.saturating_sub(1))
                    .map(|c| if c == '\t' { '\t' } else { ' ' })
                    .collect();
                write!(f, "\n{pad}|")?;
                write!(f, "\n {:>width$} | {}", loc.line, text.trim_end())?;
                write!(f, "\n{pad}| {lead}^")?;
            }
        }
        for frame in &self.frames {
            match &frame.at {
                Some(at) => write!(f, "\n{pad}= {} ({at})", frame.what)?,
                None => write!(f, "\n{pad}= {}", frame.what)?,
            }
        }
        if let Some(help) = &self.help {
            write!(f, "\n{pad}= help: {help}")?;
        }
        Ok(())
    }
}
