//! The one store of secret values of a run: everything patchbook writes (journal,
//! logs, progress, reports, notifications, error messages) shows `***` in their
//! place.
//!
//! It is passed explicitly: the runtime owns a [`Secrets`] handle, every journal it
//! opens shares it ([`super::Journal::with_secrets`]), and a script's `secret()`
//! adds to it, so a value declared once is hidden everywhere from then on. The
//! binary's log writer and its last error message read the same store through
//! [`Secrets::process`], because the log subscriber exists before any runtime
//! does. It owns no output itself.

use std::sync::{Arc, OnceLock, RwLock};

use serde_json::Value;

/// A shared set of secret values; cloning shares it.
#[derive(Debug, Clone, Default)]
pub struct Secrets(Arc<RwLock<Vec<String>>>);

static PROCESS: OnceLock<Secrets> = OnceLock::new();

impl Secrets {
    /// An empty store of its own (a library user's runtime, a test).
    pub fn new() -> Self {
        Secrets::default()
    }

    /// The store of this process: the one the CLI's runtime uses and its stderr
    /// writer reads.
    pub fn process() -> Secrets {
        PROCESS.get_or_init(Secrets::default).clone()
    }

    /// Hides `value` from everything written from now on. Empty values are ignored.
    pub fn add(&self, value: &str) {
        if value.is_empty() {
            return;
        }
        let mut all = self.0.write().unwrap_or_else(|p| p.into_inner());
        if !all.iter().any(|x| x == value) {
            all.push(value.to_string());
        }
    }

    /// Every value, in the order they were added.
    pub fn list(&self) -> Vec<String> {
        self.0.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// `text` with every secret shown as `***`.
    pub fn redact_str(&self, text: &str) -> String {
        let all = self.0.read().unwrap_or_else(|p| p.into_inner());
        if all.is_empty() {
            return text.to_string();
        }
        super::redact_str(text, &all)
    }

    /// Every string of `v`, object keys included, with every secret as `***`.
    pub fn redact_value(&self, v: Value) -> Value {
        let all = self.list();
        super::redact_value(v, &all)
    }
}

/// `text` with every secret of this process shown as `***`: for output that does
/// not pass through a journal (logs, progress lines, error messages).
pub fn scrub(text: &str) -> String {
    Secrets::process().redact_str(text)
}

/// Replaces `${env:NAME}` and `${file:PATH}` references with their values and
/// adds each value to `secrets`. A `$` not followed by `{` is kept as written.
pub fn expand(template: &str, secrets: &mut Vec<String>) -> Result<String, String> {
    let mut out = String::with_capacity(template.len());
    let mut rest = template;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let Some(end) = after.find('}') else {
            return Err(format!(
                "unterminated `${{` in `{template}`; write ${{env:NAME}} or ${{file:PATH}}"
            ));
        };
        let reference = &after[..end];
        let value = match reference.split_once(':') {
            Some(("env", name)) => std::env::var(name).map_err(|_| {
                format!("${{env:{name}}} is not set; export {name} before the run")
            })?,
            Some(("file", path)) => std::fs::read_to_string(path)
                .map_err(|e| format!("${{file:{path}}} cannot be read: {e}"))?
                .lines()
                .next()
                .unwrap_or("")
                .to_string(),
            _ => {
                return Err(format!(
                    "`${{{reference}}}` is not a secret reference; write ${{env:NAME}} or ${{file:PATH}}"
                ))
            }
        };
        if !value.is_empty() && !secrets.iter().any(|s| s == &value) {
            secrets.push(value.clone());
        }
        out.push_str(&value);
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clones_share_one_store_and_new_stores_are_apart() {
        let a = Secrets::new();
        let b = a.clone();
        b.add("hunter2");
        b.add("");
        assert_eq!(a.list(), vec!["hunter2".to_string()]);
        assert_eq!(a.redact_str("pw=hunter2"), "pw=***");
        assert_eq!(Secrets::new().redact_str("pw=hunter2"), "pw=hunter2");
    }
}
