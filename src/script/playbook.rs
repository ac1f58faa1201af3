//! Compiled playbook versions and the runs that execute them.
//!
//! [`Compiler`] turns a file or snippet into a [`CompiledPlaybook`]: a self-contained
//! AST (every import snapshotted, so it never reads the disk again), the SHA-256 of
//! its source and of each module, and the texts needed to render errors. A
//! [`ScriptRun`] is one run's engine with the primitives bound to a runtime; a
//! [`HostClosure`] calls a script closure once per host from worker threads.

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use rhai::{Dynamic, Engine, EvalAltResult, FnPtr, NativeCallContext, Position, Scope, AST};

use super::builtin::builtin_text;
use super::diagnostics::{diagnose, Diagnostic, SourceMap};
use super::engine::{deadline, on_script_stack, sandbox, CallGuard};
use super::patch::register_patch;
use super::register::{register_primitives, ScriptHost};
use super::resolver::{sha256_hex, LibraryResolver};
use super::{Limits, ScriptError};
use crate::inventory::Host;
use crate::run::Session;
use crate::runtime::Runtime;

/// Name of the variable an ad-hoc snippet sees its host under.
pub const HOST_VAR: &str = "host";

/// One compiled version of a playbook (or snippet).
#[derive(Clone)]
pub struct CompiledPlaybook {
    pub path: PathBuf,
    pub ast: AST,
    /// SHA-256 of the playbook source as compiled.
    pub sha256: String,
    /// `(import name, file, sha256)` of every module the playbook imported.
    pub modules: Vec<(String, PathBuf, String)>,
    /// Name the AST knows its source under (the display path).
    source_name: String,
    sources: SourceMap,
}

impl std::fmt::Debug for CompiledPlaybook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CompiledPlaybook")
            .field("path", &self.path)
            .field("sha256", &self.sha256)
            .field("modules", &self.modules)
            .finish_non_exhaustive()
    }
}

impl CompiledPlaybook {
    /// Renders an error raised while running this playbook.
    pub fn diagnose(&self, err: &EvalAltResult) -> Diagnostic {
        diagnose(err, &self.source_name, &self.sources)
    }

    /// The name errors show for this playbook (its display path).
    pub fn display_name(&self) -> &str {
        &self.source_name
    }

    /// The playbook's own source text, exactly as compiled.
    pub fn source_text(&self) -> Option<&str> {
        self.sources.get(&self.source_name).map(|f| &*f.text)
    }

    /// The error as a [`ScriptError`], rendered against this playbook's sources.
    pub fn error(&self, err: &EvalAltResult) -> ScriptError {
        ScriptError::Script(Box::new(self.diagnose(err)))
    }
}

/// Compiles playbooks and snippets against the stdlib and library folders.
#[derive(Debug, Clone)]
pub struct Compiler {
    limits: Limits,
    roots: Vec<PathBuf>,
    /// The stdlib is the copy built into the binary, searched before `roots`.
    builtin_stdlib: bool,
}

impl Compiler {
    /// Import roots: the stdlib folder, then each library folder, in order.
    pub fn new(limits: Limits, roots: Vec<PathBuf>) -> Self {
        Compiler {
            limits,
            roots,
            builtin_stdlib: false,
        }
    }

    /// Resolves stdlib imports from the copy built into the binary, before `roots`
    /// (which then hold only library folders).
    pub fn with_builtin_stdlib(mut self) -> Self {
        self.builtin_stdlib = true;
        self
    }

    /// The configured or found stdlib folder, else the built-in stdlib; then the
    /// library folders.
    pub fn from_config(cfg: &crate::config::Config) -> Self {
        let stdlib = cfg.stdlib_folder();
        let builtin = stdlib.is_none();
        let mut roots: Vec<PathBuf> = stdlib.into_iter().collect();
        roots.extend(cfg.library_dirs());
        let compiler = Compiler::new(cfg.limits.clone(), roots);
        if builtin {
            compiler.with_builtin_stdlib()
        } else {
            compiler
        }
    }

    /// Whether stdlib imports resolve to the copy built into the binary.
    pub fn builtin_stdlib(&self) -> bool {
        self.builtin_stdlib
    }

    pub fn roots(&self) -> &[PathBuf] {
        &self.roots
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Reads and compiles a playbook file.
    /// A built-in stdlib module's placeholder path (from `modules`) compiles its
    /// embedded text.
    pub fn compile_file(&self, path: &Path) -> Result<CompiledPlaybook, ScriptError> {
        if let Some(text) = self.builtin_stdlib.then(|| builtin_text(path)).flatten() {
            return self.compile_text(path, &path.display().to_string(), text, &[]);
        }
        let text = std::fs::read_to_string(path).map_err(|source| ScriptError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        self.compile_text(path, &path.display().to_string(), &text, &[])
    }

    /// Compiles `text` under the name `name` (shown in errors); `vars` are
    /// variables the caller binds before running (e.g. `host`), declared so strict
    /// variables accept them.
    pub fn compile_source(
        &self,
        name: &str,
        text: &str,
        vars: &[&str],
    ) -> Result<CompiledPlaybook, ScriptError> {
        self.compile_text(Path::new(name), name, text, vars)
    }

    fn compile_text(
        &self,
        path: &Path,
        name: &str,
        text: &str,
        vars: &[&str],
    ) -> Result<CompiledPlaybook, ScriptError> {
        // A fresh resolver per compile: nothing is cached across compiles, so a
        // changed module is always read again.
        let mut resolver = LibraryResolver::new(self.roots.clone());
        if self.builtin_stdlib {
            resolver = resolver.with_builtin_stdlib();
        }
        let mut engine = sandbox(&self.limits, Arc::new(AtomicBool::new(false)));
        register_primitives(&mut engine, None, None);
        register_patch(&mut engine, None);
        engine.set_module_resolver(resolver.clone());
        let mut scope = Scope::new();
        for v in vars {
            scope.push_dynamic(*v, Dynamic::UNIT);
        }
        // Imported modules run their top level now; bound it like any other call.
        let result = {
            let _guard = CallGuard::new(deadline(&self.limits), None);
            engine.compile_into_self_contained(&scope, text)
        };
        let text: Arc<str> = text.into();
        let mut sources = SourceMap::default();
        sources.insert(name, name, text.clone());
        let loaded = resolver.loaded();
        for m in &loaded {
            sources.insert(m.name.clone(), m.path.display().to_string(), m.text.clone());
        }
        match result {
            Ok(mut ast) => {
                ast.set_source(name);
                Ok(CompiledPlaybook {
                    path: path.to_path_buf(),
                    ast,
                    sha256: sha256_hex(text.as_bytes()),
                    modules: loaded
                        .into_iter()
                        .map(|m| (m.name, m.path, m.sha256))
                        .collect(),
                    source_name: name.to_string(),
                    sources,
                })
            }
            Err(e) => Err(ScriptError::Script(Box::new(diagnose(&e, name, &sources)))),
        }
    }
}

/// One run's engine: the sandbox plus the primitives bound to a runtime (and, for
/// a real run, to its [`Session`]), with its own cancel flag. Cheap to build
/// (microseconds); build one per run.
pub struct ScriptRun {
    engine: Engine,
    cancel: Arc<AtomicBool>,
    budget: Duration,
    session: Option<Arc<Session>>,
}

impl ScriptRun {
    /// A run that keeps no journal (`eval`, tests): probes work on the runtime's
    /// hosts and every change is refused, since nothing would record it. Without a
    /// runtime the primitives exist (so the names resolve) but refuse to run.
    pub fn new(limits: &Limits, runtime: Option<Arc<Runtime>>) -> Self {
        let session = runtime.map(|rt| Arc::new(Session::unjournaled(rt)));
        Self::build(limits, session.as_ref().map(|s| s.runtime.clone()), session)
    }

    /// A run with every primitive bound to `session` (its runtime, journal, plan mode
    /// and secrets).
    pub fn with_session(limits: &Limits, session: Arc<Session>) -> Self {
        Self::build(limits, Some(session.runtime.clone()), Some(session))
    }

    fn build(
        limits: &Limits,
        runtime: Option<Arc<Runtime>>,
        session: Option<Arc<Session>>,
    ) -> Self {
        let cancel = Arc::new(AtomicBool::new(false));
        let mut engine = sandbox(limits, cancel.clone());
        register_primitives(&mut engine, runtime, session.clone());
        register_patch(&mut engine, session.clone());
        ScriptRun {
            engine,
            cancel,
            budget: deadline(limits),
            session,
        }
    }

    /// The session this run's primitives work in, if it has one.
    pub fn session(&self) -> Option<&Arc<Session>> {
        self.session.as_ref()
    }

    /// A run about one host: primitives such as `log` report it as the current host.
    pub fn for_host(limits: &Limits, runtime: Option<Arc<Runtime>>, host: ScriptHost) -> Self {
        let mut run = ScriptRun::new(limits, runtime);
        run.engine.set_default_tag(Dynamic::from(host));
        run
    }

    /// A run about one host inside a session (an ad-hoc `patchbook exec` run).
    pub fn for_host_in(limits: &Limits, session: Arc<Session>, host: ScriptHost) -> Self {
        let mut run = ScriptRun::with_session(limits, session);
        run.engine.set_default_tag(Dynamic::from(host));
        run
    }

    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// For layers that add their own functions (e.g. `rollout`) to this run.
    pub fn engine_mut(&mut self) -> &mut Engine {
        &mut self.engine
    }

    /// Setting this flag stops every call on this run at its next check.
    pub fn cancel_flag(&self) -> Arc<AtomicBool> {
        self.cancel.clone()
    }

    /// `sleep()` in this run also ends when `stop` is set (a run's stop
    /// request), not only at the deadline or on a cancel.
    pub fn sleep_wakes_on(&mut self, stop: Arc<AtomicBool>) {
        super::engine::bounded_sleep(&mut self.engine, self.cancel.clone(), Some(stop));
    }

    /// The per-call wall-clock budget (limits.deadline_secs).
    pub fn budget(&self) -> Duration {
        self.budget
    }

    /// Runs the playbook's top-level statements.
    pub fn run(&self, pb: &CompiledPlaybook) -> Result<Dynamic, ScriptError> {
        let result = on_script_stack(&self.engine, || {
            let _guard = CallGuard::new(self.budget, None);
            self.engine.eval_ast::<Dynamic>(&pb.ast)
        })
        .unwrap_or_else(|e| Err(no_thread(e)));
        result.map_err(|e| pb.error(&e))
    }

    /// Runs a snippet compiled with [`HOST_VAR`] declared, with `host` bound.
    pub fn run_with_host(
        &self,
        pb: &CompiledPlaybook,
        host: ScriptHost,
    ) -> Result<Dynamic, ScriptError> {
        let result = on_script_stack(&self.engine, || {
            let _guard = CallGuard::new(self.budget, None);
            let mut scope = Scope::new();
            scope.push(HOST_VAR, host);
            self.engine
                .eval_ast_with_scope::<Dynamic>(&mut scope, &pb.ast)
        })
        .unwrap_or_else(|e| Err(no_thread(e)));
        result.map_err(|e| pb.error(&e))
    }
}

/// A script closure (`|host| { … }`) captured inside a native call, callable once
/// per host from worker threads. It keeps a copy of the calling script's state
/// (imports, functions, constants), so the closure body sees the same modules the
/// playbook imported. Each call gets its own operation counter, the host as its
/// tag, and its own wall-clock deadline.
pub struct HostClosure {
    global: rhai::GlobalRuntimeState,
    f: FnPtr,
    pos: Position,
    source: Option<String>,
}

impl HostClosure {
    pub fn from_context(ctx: &NativeCallContext, f: FnPtr) -> Self {
        HostClosure {
            global: ctx.global_runtime_state().clone(),
            f,
            pos: ctx.call_position(),
            source: ctx.call_source().map(str::to_string),
        }
    }

    /// Calls the closure with the host as its one argument. `engine` is the
    /// engine of the native call that captured the closure (`ctx.engine()`).
    /// Render the error with [`CompiledPlaybook::diagnose`].
    pub fn call(
        &self,
        engine: &Engine,
        host: ScriptHost,
        budget: Duration,
        cancel: Option<Arc<AtomicBool>>,
    ) -> Result<Dynamic, Box<EvalAltResult>> {
        let tag = Dynamic::from(host.clone());
        let guard = || CallGuard::new(budget, cancel.clone());
        self.call_guarded(engine, tag, vec![Dynamic::from(host)], true, guard)
    }

    /// [`HostClosure::call`] with a deadline that something other than
    /// `limits.deadline_secs` set (a rollout's per-host `timeout`); `source`
    /// names it in the error that ends the call.
    pub fn call_until(
        &self,
        engine: &Engine,
        host: ScriptHost,
        budget: Duration,
        source: &'static str,
        cancel: Option<Arc<AtomicBool>>,
    ) -> Result<Dynamic, Box<EvalAltResult>> {
        let tag = Dynamic::from(host.clone());
        let guard = || CallGuard::until(budget, source, cancel.clone());
        self.call_guarded(engine, tag, vec![Dynamic::from(host)], true, guard)
    }

    /// Calls the closure with any arguments (a rollout gate takes none); `tag` is
    /// what native functions see as the current host, `()` for none. Unlike the
    /// per-host calls, it shares the captured variables with the script: a gate
    /// runs alone, and may keep state between its calls.
    pub fn call_with(
        &self,
        engine: &Engine,
        tag: Dynamic,
        args: Vec<Dynamic>,
        budget: Duration,
        cancel: Option<Arc<AtomicBool>>,
    ) -> Result<Dynamic, Box<EvalAltResult>> {
        self.call_guarded(engine, tag, args, false, || {
            CallGuard::new(budget, cancel.clone())
        })
    }

    fn call_guarded(
        &self,
        engine: &Engine,
        tag: Dynamic,
        args: Vec<Dynamic>,
        own_copy: bool,
        guard: impl FnOnce() -> CallGuard + Send,
    ) -> Result<Dynamic, Box<EvalAltResult>> {
        on_script_stack(engine, || {
            let _guard = guard();
            let mut global = self.global.clone();
            global.num_operations = 0;
            global.tag = tag;
            let ctx = NativeCallContext::new_with_all_fields(
                engine,
                self.f.fn_name(),
                self.source.as_deref(),
                &global,
                self.pos,
            );
            if own_copy {
                self.own_copy().call_raw(&ctx, None, args)
            } else {
                self.f.call_raw(&ctx, None, args)
            }
        })
        .unwrap_or_else(|e| Err(no_thread(e)))
    }
}

impl HostClosure {
    /// The closure with its own copy of the variables it captured. Rhai keeps a
    /// captured variable in one shared, locked cell; host threads calling the
    /// same closure would all lock it, and Rhai fails a call that waits more than
    /// about 50 ms for the lock with "Data race detected": a method call on a
    /// captured value (`pause.sleep()`, `cfg.check(host)`) holds it for the whole
    /// call, and a loaded controller can stall any holder that long. With a copy
    /// per call, hosts never contend; in exchange, what one host's call writes to
    /// a captured variable is its own.
    ///
    /// Arrays, maps and blobs over [`SHARED_FROM`] items stay shared: copying
    /// them for every host made a closure that reads `targets.len()` quadratic
    /// in the fleet (3,000 hosts: 0.6 s → 7.4 s).
    fn own_copy(&self) -> FnPtr {
        let mut f = self.f.clone();
        let own: Vec<Dynamic> = f
            .curry()
            .iter()
            .map(|v| {
                if collection_len(v) > SHARED_FROM {
                    v.clone()
                } else {
                    v.flatten_clone()
                }
            })
            .collect();
        f.set_curry(own);
        f
    }
}

/// Items from which a captured collection is shared between host calls, not copied.
const SHARED_FROM: usize = 256;

/// Items in an array, map or blob (read through its lock when shared); 0 otherwise.
fn collection_len(v: &Dynamic) -> usize {
    if let Some(a) = v.read_lock::<rhai::Array>() {
        a.len()
    } else if let Some(m) = v.read_lock::<rhai::Map>() {
        m.len()
    } else if let Some(b) = v.read_lock::<rhai::Blob>() {
        b.len()
    } else {
        0
    }
}

fn no_thread(e: std::io::Error) -> Box<EvalAltResult> {
    Box::new(EvalAltResult::ErrorRuntime(
        format!("cannot start a thread to run the script: {e}").into(),
        Position::NONE,
    ))
}

/// The host objects for `hosts`, as scripts see them.
pub fn script_hosts(hosts: Vec<Host>) -> Vec<ScriptHost> {
    hosts.into_iter().map(ScriptHost::new).collect()
}

/// A script value as JSON: maps, arrays and scalars map directly; a `Host` shows
/// its name; anything else its string form.
pub fn to_json(v: &Dynamic) -> serde_json::Value {
    use serde_json::Value;
    if v.is_unit() {
        return Value::Null;
    }
    if let Some(b) = v.clone().try_cast::<bool>() {
        return Value::Bool(b);
    }
    if let Some(i) = v.clone().try_cast::<i64>() {
        return Value::from(i);
    }
    if let Some(f) = v.clone().try_cast::<f64>() {
        return serde_json::Number::from_f64(f)
            .map(Value::Number)
            .unwrap_or_else(|| Value::String(f.to_string()));
    }
    if v.is_string() || v.is_char() {
        return Value::String(v.to_string());
    }
    if let Some(a) = v.read_lock::<rhai::Array>() {
        return Value::Array(a.iter().map(to_json).collect());
    }
    if let Some(m) = v.read_lock::<rhai::Map>() {
        return Value::Object(m.iter().map(|(k, v)| (k.to_string(), to_json(v))).collect());
    }
    if let Some(h) = v.read_lock::<ScriptHost>() {
        return Value::String(h.name().to_string());
    }
    Value::String(v.to_string())
}

/// One host's outcome of an ad-hoc run.
#[derive(Debug)]
pub struct HostResult {
    pub host: String,
    pub result: Result<Dynamic, ScriptError>,
}

/// Runs a snippet compiled with [`HOST_VAR`] declared once per host, `forks` at a
/// time, keeping no journal (changes are refused). Each host gets its own engine
/// (its own operation count, deadline and tag), so one host's runaway script stops
/// only that host.
pub fn run_per_host(
    pb: &CompiledPlaybook,
    hosts: &[Host],
    runtime: Arc<Runtime>,
    limits: &Limits,
    forks: usize,
) -> Vec<HostResult> {
    run_per_host_in(
        pb,
        hosts,
        Arc::new(Session::unjournaled(runtime)),
        limits,
        forks,
    )
}

/// [`run_per_host`] inside a session: with a journal, every change is journaled.
pub fn run_per_host_in(
    pb: &CompiledPlaybook,
    hosts: &[Host],
    session: Arc<Session>,
    limits: &Limits,
    forks: usize,
) -> Vec<HostResult> {
    let stack = Some(super::engine::stack_for_levels(limits.max_call_levels));
    crate::rollout::pool::map_bounded_on_stack(hosts, forks, stack, |h| {
        let host = ScriptHost::new(h.clone());
        let run = ScriptRun::for_host_in(limits, session.clone(), host.clone());
        HostResult {
            host: h.name.clone(),
            result: run.run_with_host(pb, host),
        }
    })
}
