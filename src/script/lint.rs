//! Static checks of compiled playbooks and modules: what `patchbook check` finds
//! beyond syntax, so a misspelt primitive, a wrong number of arguments or a
//! misspelt option key fails the check instead of a host in the middle of a run.
//!
//! It owns the rules and their messages: calls to functions nobody defines, calls
//! no overload accepts, and unknown keys in literal option maps and rollout
//! policies. The names it knows come from an engine registered exactly as a run's
//! (the caller builds it), the script's own functions and the modules it imported;
//! the option keys come from the constants each primitive checks its own map
//! against. It must not run any script code, touch a host, or keep a second copy
//! of any list of names.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use rhai::{ASTNode, Engine, Expr, FnAccess, FnCallExpr, OptimizationLevel, Position, Stmt, AST};

use super::diagnostics::{Diagnostic, Location};
use super::engine::sandbox;
use super::files::{FILE_OPTION_KEYS, LINE_IN_FILE_OPTION_KEYS, REMOVE_FILE_OPTION_KEYS};
use super::patch::{
    ARTIFACT_OPTION_KEYS, DEPLOY_OPTION_KEYS, HEALTH_OPTION_KEYS, HTTP_CHECK_OPTION_KEYS,
    NOTIFY_OPTION_KEYS,
};
use super::playbook::{CompiledPlaybook, Compiler};
use super::register::{EXEC_OPTION_KEYS, HOSTS_OPTION_KEYS, PROBE_OPTION_KEYS};
use super::rollout::{TEST_OPTION_KEYS, WINDOW_OPTION_KEYS};
use super::services::{REBOOT_OPTION_KEYS, SERVICE_OPTION_KEYS};
use super::upgrade::{PENDING_UPDATES_OPTION_KEYS, UPGRADE_OPTION_KEYS};
use super::Limits;
use crate::config::suggest;
use crate::rollout::policy::POLICY_KEYS;

/// A primitive's argument that, when written as a literal map, may only hold `keys`.
#[derive(Debug, Clone, Copy)]
pub struct OptionMap {
    pub function: &'static str,
    /// The number of arguments of the form that takes the map.
    pub arity: usize,
    /// Which argument the map is, counting from 0.
    pub index: usize,
    pub keys: &'static [&'static str],
    /// What a key is called in messages.
    pub what: &'static str,
    /// The form is accepted even when the engine does not register it (yet): its
    /// options are declared before the primitive grows them.
    pub adds_arity: bool,
}

const fn opts(
    function: &'static str,
    arity: usize,
    index: usize,
    keys: &'static [&'static str],
) -> OptionMap {
    OptionMap {
        function,
        arity,
        index,
        keys,
        what: "option",
        adds_arity: false,
    }
}

/// Every option map `check` looks into, pointing at the primitives' own lists.
pub const OPTION_MAPS: &[OptionMap] = &[
    opts("artifact", 2, 1, ARTIFACT_OPTION_KEYS),
    opts("hosts", 2, 1, HOSTS_OPTION_KEYS),
    opts("deploy", 3, 2, DEPLOY_OPTION_KEYS),
    opts("health", 3, 2, HEALTH_OPTION_KEYS),
    opts("http_check", 2, 1, HTTP_CHECK_OPTION_KEYS),
    opts("notify", 3, 2, NOTIFY_OPTION_KEYS),
    opts("put_file", 4, 3, FILE_OPTION_KEYS),
    opts("template", 5, 4, FILE_OPTION_KEYS),
    opts("line_in_file", 3, 2, LINE_IN_FILE_OPTION_KEYS),
    opts("remove_file", 3, 2, REMOVE_FILE_OPTION_KEYS),
    opts("window", 2, 1, WINDOW_OPTION_KEYS),
    opts("test", 4, 2, TEST_OPTION_KEYS),
    opts("service", 3, 2, SERVICE_OPTION_KEYS),
    opts("reboot", 2, 1, REBOOT_OPTION_KEYS),
    opts("pending_updates", 2, 1, PENDING_UPDATES_OPTION_KEYS),
    opts("upgrade", 3, 2, UPGRADE_OPTION_KEYS),
    opts("vulnerable", 3, 2, super::advisory::VULNERABLE_OPTION_KEYS),
    opts("monitor", 3, 1, super::monitor::MONITOR_OPTION_KEYS),
    OptionMap {
        what: "policy key",
        ..opts("rollout", 3, 1, POLICY_KEYS)
    },
    OptionMap {
        adds_arity: true,
        ..opts("exec", 3, 2, EXEC_OPTION_KEYS)
    },
    OptionMap {
        adds_arity: true,
        ..opts("shell", 3, 2, EXEC_OPTION_KEYS)
    },
    OptionMap {
        adds_arity: true,
        ..opts("probe", 3, 2, PROBE_OPTION_KEYS)
    },
];

/// Names Rhai handles itself rather than through registered functions
/// (`Fn("f")`, `f.call(x)`, `curry`, `type_of`, …): never reported.
const KEYWORD_FUNCTIONS: &[&str] = &[
    "print",
    "debug",
    "type_of",
    "eval",
    "Fn",
    "call",
    "curry",
    "is_shared",
    "is_def_fn",
    "is_def_var",
    "this",
    "global",
];

/// Checks compiled files against the functions of one fully registered engine.
#[derive(Debug)]
pub struct Checker {
    /// Every function the engine knows (primitives, builtins, the standard
    /// library), with the numbers of arguments its overloads take.
    native: BTreeMap<String, BTreeSet<usize>>,
    /// Parses sources again without optimisation: the optimiser folds a literal
    /// map into a constant, which loses the keys' positions.
    parser: Engine,
}

impl Checker {
    /// `engine` must be registered like a run's engine (see
    /// `crate::cli::run::check_engine`); nothing is called on it. `limits` are the
    /// sandbox limits the files were compiled under.
    pub fn new(engine: &Engine, limits: &Limits) -> Self {
        let mut native: BTreeMap<String, BTreeSet<usize>> = BTreeMap::new();
        let found = engine.collect_fn_metadata(
            None,
            |f| Some((f.metadata.name.to_string(), f.metadata.num_params)),
            true,
        );
        for (name, n) in found {
            native.entry(name).or_default().insert(n);
        }
        for o in OPTION_MAPS.iter().filter(|o| o.adds_arity) {
            native
                .entry(o.function.to_string())
                .or_default()
                .insert(o.arity);
        }
        let mut parser = sandbox(limits, Arc::new(AtomicBool::new(false)));
        parser.set_optimization_level(OptimizationLevel::None);
        Checker { native, parser }
    }

    /// Checks `pb` and every module it imported, skipping files already in `seen`
    /// (a module imported by many playbooks is reported once). Problems inside a
    /// module point at the module's file.
    pub fn check_tree(
        &self,
        compiler: &Compiler,
        pb: &CompiledPlaybook,
        seen: &mut HashSet<PathBuf>,
    ) -> Vec<Diagnostic> {
        let mut out = Vec::new();
        if seen.insert(canonical(&pb.path)) {
            out.extend(self.check(pb));
        }
        for (_, path, _) in &pb.modules {
            if !seen.insert(canonical(path)) {
                continue;
            }
            // The playbook compiled, so its modules do too; a module that changed
            // on disk since is reported when its own folder is checked.
            if let Ok(m) = compiler.compile_file(path) {
                out.extend(self.check(&m));
            }
        }
        out
    }

    /// Every problem in `pb`'s own code (statements, functions, closures), in
    /// source order.
    pub fn check(&self, pb: &CompiledPlaybook) -> Vec<Diagnostic> {
        let Some(text) = pb.source_text() else {
            return Vec::new();
        };
        // The text compiled once already; parsing it again cannot fail short of a
        // change in the limits, and then the compile error has been reported.
        let Ok(ast) = self.parser.compile(text) else {
            return Vec::new();
        };
        // Imported modules are only in the compiled (self-contained) version.
        let file = FileFacts::of(&ast, &pb.ast);
        let mut found: Vec<(Position, String, Option<String>)> = Vec::new();
        ast.walk(&mut |path: &[ASTNode]| {
            match path.last() {
                Some(ASTNode::Expr(Expr::FnCall(call, pos)))
                | Some(ASTNode::Stmt(Stmt::FnCall(call, pos))) => {
                    self.call(&file, call, *pos, false, &mut found)
                }
                Some(ASTNode::Expr(Expr::MethodCall(call, pos))) => {
                    self.call(&file, call, *pos, true, &mut found)
                }
                _ => {}
            }
            true
        });
        found.sort_by_key(|(pos, ..)| (pos.line(), pos.position()));
        found.dedup_by(|a, b| a.0 == b.0 && a.1 == b.1);
        let lines: Vec<&str> = text.lines().collect();
        found
            .into_iter()
            .map(|(pos, message, help)| Diagnostic {
                message,
                location: pos.line().map(|line| Location {
                    file: pb.display_name().to_string(),
                    line,
                    column: pos.position().unwrap_or(1),
                    text: lines.get(line - 1).map(|l| l.to_string()),
                }),
                frames: Vec::new(),
                help,
                limit: false,
            })
            .collect()
    }

    fn call(
        &self,
        file: &FileFacts,
        call: &FnCallExpr,
        pos: Position,
        method: bool,
        found: &mut Vec<(Position, String, Option<String>)>,
    ) {
        let name = call.name.as_str();
        // Operators and internal names (`!`, `+`, `get$x`) are Rhai's own business.
        if call.op_token.is_some() || !is_identifier(name) {
            return;
        }
        if !call.namespace.is_empty() {
            return self.module_call(file, call, pos, found);
        }
        if KEYWORD_FUNCTIONS.contains(&name) {
            if name == "Fn" && !method {
                self.fn_pointer(file, call, found);
            }
            return;
        }
        // A method call passes its receiver as the first argument of a native
        // function, and as `this` (not an argument) to a script function.
        let given = call.args.len() + usize::from(method);
        let mut accepted: BTreeSet<usize> = self.native.get(name).cloned().unwrap_or_default();
        if let Some(script) = file.functions.get(name) {
            accepted.extend(script.iter().map(|n| n + usize::from(method)));
        }
        if accepted.is_empty() {
            // `obj.action(x)` calls the closure stored under `action` in a map.
            if method && file.members.contains(name) {
                return;
            }
            let names = self
                .native
                .keys()
                .map(String::as_str)
                .chain(file.functions.keys().map(String::as_str));
            let message = match did_you_mean(name, names) {
                Some(s) => format!("unknown function `{name}` (did you mean `{s}`?)"),
                None => format!("unknown function `{name}`"),
            };
            found.push((pos, message, None));
            return;
        }
        if !accepted.contains(&given) {
            let help = method.then(|| {
                "in a method call `a.f(b)` the receiver `a` counts as the first argument"
                    .to_string()
            });
            found.push((
                pos,
                format!("`{name}` takes {}, not {given}", arguments(&accepted)),
                help,
            ));
            return;
        }
        let offset = usize::from(method);
        for o in OPTION_MAPS
            .iter()
            .filter(|o| o.function == name && o.arity == given && o.index >= offset)
        {
            if let Some(Expr::Map(map, _)) = call.args.get(o.index - offset) {
                for (key, _) in &map.0 {
                    let key_name = key.name.as_str();
                    if o.keys.contains(&key_name) {
                        continue;
                    }
                    let message = match did_you_mean(key_name, o.keys.iter().copied()) {
                        Some(s) => format!(
                            "unknown {} `{key_name}` of `{name}` (did you mean `{s}`?)",
                            o.what
                        ),
                        None => format!("unknown {} `{key_name}` of `{name}`", o.what),
                    };
                    let help = format!("`{name}` accepts: {}", o.keys.join(", "));
                    found.push((key.pos, message, Some(help)));
                }
            }
        }
    }

    /// `m::f(…)`: `f` must be a public function of the module imported as `m`.
    fn module_call(
        &self,
        file: &FileFacts,
        call: &FnCallExpr,
        pos: Position,
        found: &mut Vec<(Position, String, Option<String>)>,
    ) {
        // Deeper paths (`a::b::f`) reach sub-modules this check does not model.
        if call.namespace.path.len() != 1 {
            return;
        }
        let alias = call.namespace.root();
        let Some(paths) = file.aliases.get(alias) else {
            return;
        };
        let mut accepted = BTreeSet::new();
        let mut defined = BTreeSet::new();
        for p in paths {
            if let Some(fns) = file.modules.get(p) {
                accepted.extend(fns.get(call.name.as_str()).into_iter().flatten());
                defined.extend(fns.keys().map(String::as_str));
            }
        }
        if defined.is_empty() && paths.iter().all(|p| !file.modules.contains_key(p)) {
            return;
        }
        let name = call.name.as_str();
        let shown = format!("{alias}::{name}");
        let module = paths.iter().next().map(String::as_str).unwrap_or(alias);
        let at = if pos.is_none() {
            call.namespace.position()
        } else {
            pos
        };
        if accepted.is_empty() {
            let message = match did_you_mean(name, defined.iter().copied()) {
                Some(s) => format!("unknown function `{shown}` (did you mean `{alias}::{s}`?)"),
                None => format!("unknown function `{shown}`"),
            };
            let help = format!(
                "module `{module}` defines: {}",
                defined.into_iter().collect::<Vec<_>>().join(", ")
            );
            found.push((at, message, Some(help)));
        } else if !accepted.contains(&call.args.len()) {
            found.push((
                at,
                format!(
                    "`{shown}` takes {}, not {}",
                    arguments(&accepted),
                    call.args.len()
                ),
                None,
            ));
        }
    }

    /// `Fn("name")` with a literal name must name a function that exists.
    fn fn_pointer(
        &self,
        file: &FileFacts,
        call: &FnCallExpr,
        found: &mut Vec<(Position, String, Option<String>)>,
    ) {
        let Some(Expr::StringConstant(target, pos)) = call.args.first() else {
            return;
        };
        let target = target.as_str();
        if !is_identifier(target)
            || self.native.contains_key(target)
            || file.functions.contains_key(target)
        {
            return;
        }
        let names = file.functions.keys().map(String::as_str);
        let message = match did_you_mean(target, names) {
            Some(s) => format!("unknown function `{target}` in Fn(…) (did you mean `{s}`?)"),
            None => format!("unknown function `{target}` in Fn(…)"),
        };
        found.push((*pos, message, None));
    }
}

/// What one compiled file defines and imports.
#[derive(Debug, Default)]
struct FileFacts {
    /// The file's own functions (closures excluded) and their numbers of parameters.
    functions: BTreeMap<String, BTreeSet<usize>>,
    /// Import alias → import paths (the same alias may import different paths in
    /// different functions).
    aliases: BTreeMap<String, BTreeSet<String>>,
    /// Import path → public functions of that module and their arities.
    modules: BTreeMap<String, BTreeMap<String, BTreeSet<usize>>>,
    /// Map keys and property names: a method call to one of these may be a
    /// closure stored in a map.
    members: HashSet<String>,
}

impl FileFacts {
    /// `ast` is the file's own code; `compiled` carries the imported modules.
    fn of(ast: &AST, compiled: &AST) -> Self {
        let mut f = FileFacts::default();
        for def in ast.iter_functions() {
            if def.name.starts_with("anon$") {
                continue;
            }
            f.functions
                .entry(def.name.to_string())
                .or_default()
                .insert(def.params.len());
        }
        if let Some(resolver) = compiled.resolver() {
            for (path, module) in resolver.iter() {
                let fns = f.modules.entry(path.to_string()).or_default();
                for (_, access, name, n, _) in module.iter_script_fn_info() {
                    // Closures are functions too, under generated names.
                    if access != FnAccess::Private && !name.starts_with("anon$") {
                        fns.entry(name.to_string()).or_default().insert(n);
                    }
                }
            }
        }
        ast.walk(&mut |path: &[ASTNode]| {
            match path.last() {
                Some(ASTNode::Stmt(Stmt::Import(x, _))) => {
                    if let Expr::StringConstant(p, _) = &x.0 {
                        if !x.1.name.is_empty() {
                            f.aliases
                                .entry(x.1.name.to_string())
                                .or_default()
                                .insert(p.to_string());
                        }
                    }
                }
                Some(ASTNode::Expr(Expr::Map(m, _))) => {
                    f.members
                        .extend(m.0.iter().map(|(k, _)| k.name.to_string()));
                }
                Some(ASTNode::Expr(Expr::Property(p, _))) => {
                    f.members.insert(p.2.to_string());
                }
                _ => {}
            }
            true
        });
        f
    }
}

fn canonical(p: &std::path::Path) -> PathBuf {
    std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf())
}

fn is_identifier(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|c| c.is_alphabetic() || c == '_')
        && chars.all(|c| c.is_alphanumeric() || c == '_')
}

/// "1 argument", "2 or 3 arguments", "1, 2 or 4 arguments".
fn arguments(counts: &BTreeSet<usize>) -> String {
    let list: Vec<String> = counts.iter().map(usize::to_string).collect();
    let joined = match list.as_slice() {
        [] => "no".to_string(),
        [one] => one.clone(),
        [init @ .., last] => format!("{} or {last}", init.join(", ")),
    };
    let plural = if list.len() == 1 && counts.contains(&1) {
        "argument"
    } else {
        "arguments"
    };
    format!("{joined} {plural}")
}

/// The candidate closest to `name`, when it is close enough to be a typo (see
/// [`crate::config::suggest`]); only names a script could write are offered.
pub fn did_you_mean<'a>(name: &str, candidates: impl Iterator<Item = &'a str>) -> Option<&'a str> {
    suggest::did_you_mean(name, candidates.filter(|c| is_identifier(c)))
}

pub use suggest::edit_distance;

#[cfg(test)]
mod tests {
    use super::*;

    fn check(src: &str) -> Vec<String> {
        let limits = crate::script::Limits::default();
        // The run engine without `watch`'s schedule(), which the script layer
        // cannot import; `patchbook check` itself uses the full one.
        let mut run = crate::script::ScriptRun::new(&limits, None);
        crate::script::rollout::register_rollout(run.engine_mut(), None, None);
        let checker = Checker::new(run.engine(), &limits);
        let pb = Compiler::new(limits.clone(), Vec::new())
            .compile_source("t.rhai", src, &[])
            .unwrap();
        checker
            .check(&pb)
            .into_iter()
            .map(|d| {
                let at = d.location.map(|l| format!("{}:{}", l.line, l.column));
                format!("{} {}", at.unwrap_or_default(), d.message)
            })
            .collect()
    }

    #[test]
    fn distances_and_suggestions() {
        assert_eq!(edit_distance("deplo", "deploy"), 1);
        assert_eq!(edit_distance("kitten", "sitting"), 3);
        assert_eq!(edit_distance("", "abc"), 3);
        let keys = ["waves", "max_failed", "pilot"];
        assert_eq!(did_you_mean("wavs", keys.iter().copied()), Some("waves"));
        assert_eq!(
            did_you_mean("max_faild", keys.iter().copied()),
            Some("max_failed")
        );
        assert_eq!(did_you_mean("zzz", keys.iter().copied()), None);
        assert_eq!(
            did_you_mean("sha", ["sha256", "size"].into_iter()),
            Some("sha256")
        );
    }

    #[test]
    fn argument_counts_read_as_english() {
        assert_eq!(arguments(&[1].into()), "1 argument");
        assert_eq!(arguments(&[2, 3].into()), "2 or 3 arguments");
        assert_eq!(arguments(&[1, 2, 4].into()), "1, 2 or 4 arguments");
    }

    #[test]
    fn finds_unknown_calls_arities_and_keys() {
        let found = check(
            "fn f(a) { a }\nlet x = f(1, 2);\ndeplo(x);\nwindow(\"x\", #{ bufer: 1 });\nx.neding(1);\n",
        );
        assert_eq!(
            found,
            [
                "2:9 `f` takes 1 argument, not 2",
                "3:1 unknown function `deplo` (did you mean `deploy`?)",
                "4:16 unknown option `bufer` of `window` (did you mean `buffer`?)",
                "5:3 unknown function `neding` (did you mean `needing`?)",
            ]
        );
    }

    #[test]
    fn closures_methods_and_builtins_are_not_reported() {
        let found = check(
            "let f = |x| x + 1;\nlet g = f.curry(1);\nf.call(2);\ncall(f, 3);\nlet p = Fn(\"len\");\n\
             let m = #{ act: |y| y };\nm.act(1);\nlet a = [1, 2];\na.len();\na.push(3);\n\
             type_of(a);\nlet s = \"x\";\ns.trim();\nexec(a, [], #{ undo: [], timeout: 1 });\n",
        );
        assert!(found.is_empty(), "{found:?}");
    }
}
