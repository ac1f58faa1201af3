//! Building sandboxed engines and bounding each call into a script.
//!
//! The standard package is built once per process; every engine after that costs
//! microseconds, so each run (or each host of an ad-hoc run) gets its own engine
//! with its own cancel flag. The wall-clock deadline lives in a thread-local set
//! around each call, because `on_progress` runs on the calling thread and knows
//! nothing else about the call. This file must not register anything that touches
//! the world: that is `register`'s job.

use std::cell::{Cell, RefCell};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use rhai::packages::{Package, StandardPackage};
type SharedModule = std::sync::Arc<rhai::Module>;
use rhai::{Dynamic, Engine, EvalAltResult, OptimizationLevel, Position};

use super::resolver::RefusingResolver;
use super::Limits;

/// How often (in operations) the deadline and cancel flags are looked at.
/// Reading the clock on every operation would cost more than the script itself.
const CHECK_EVERY: u64 = 1024;

fn standard_package() -> SharedModule {
    static STANDARD: OnceLock<SharedModule> = OnceLock::new();
    STANDARD
        .get_or_init(|| StandardPackage::new().as_shared_module())
        .clone()
}

/// One call's bounds: when it must end, and a flag that ends it early.
#[derive(Clone)]
struct CallBounds {
    deadline: Instant,
    budget: Duration,
    /// What set the deadline, for the message that ends the call.
    source: &'static str,
    cancel: Option<Arc<AtomicBool>>,
}

/// Where the deadline of an ordinary script call comes from.
const DEADLINE_SOURCE: &str = "limits.deadline_secs in patchbook.toml";

thread_local! {
    static BOUNDS: RefCell<Vec<CallBounds>> = const { RefCell::new(Vec::new()) };
    /// What this thread held when its outermost script call began (see
    /// [`super::memory`]); apart from `BOUNDS` so that the check on every
    /// operation is two plain reads.
    static HELD_AT_START: Cell<i64> = const { Cell::new(0) };
    /// The allocation work ([`super::memory::work_by_this_thread`]) when the
    /// outermost script call began.
    static WORK_AT_START: Cell<u64> = const { Cell::new(0) };
    /// Operations plus allocation work seen by the progress hook on this thread,
    /// ever, and the figure at which it next looks at the clock.
    static PROGRESS: Cell<u64> = const { Cell::new(0) };
    static NEXT_LOOK: Cell<u64> = const { Cell::new(0) };
}

/// Bounds every script call made on this thread while it lives; nested guards
/// stack, and dropping one restores the outer bounds.
#[must_use = "the bounds only hold while the guard lives"]
pub struct CallGuard {
    _not_send: std::marker::PhantomData<*const ()>,
}

impl CallGuard {
    pub fn new(budget: Duration, cancel: Option<Arc<AtomicBool>>) -> Self {
        Self::until(budget, DEADLINE_SOURCE, cancel)
    }

    /// Bounds with a deadline set by something other than `limits.deadline_secs`
    /// (a host's timeout in a rollout); `source` names it in the error.
    pub fn until(budget: Duration, source: &'static str, cancel: Option<Arc<AtomicBool>>) -> Self {
        let deadline = Instant::now()
            .checked_add(budget)
            .unwrap_or_else(|| Instant::now() + Duration::from_secs(86_400 * 365));
        BOUNDS.with(|b| {
            b.borrow_mut().push(CallBounds {
                deadline,
                budget,
                source,
                cancel,
            });
            // The outermost call's baseline: nested calls share its budget.
            if b.borrow().len() == 1 {
                HELD_AT_START.with(|h| h.set(super::memory::held_by_this_thread()));
                WORK_AT_START.with(|w| w.set(super::memory::work_by_this_thread()));
            }
        });
        CallGuard {
            _not_send: std::marker::PhantomData,
        }
    }
}

impl Drop for CallGuard {
    fn drop(&mut self) {
        BOUNDS.with(|b| {
            b.borrow_mut().pop();
        });
    }
}

/// Time left before the innermost call deadline on this thread, if any; primitives
/// use it to cap the commands they run, so a host command cannot outlive the call.
pub fn remaining() -> Option<Duration> {
    BOUNDS.with(|b| {
        b.borrow()
            .last()
            .map(|c| c.deadline.saturating_duration_since(Instant::now()))
    })
}

fn over_bounds(run_cancel: &AtomicBool) -> Option<Dynamic> {
    if run_cancel.load(Ordering::Relaxed) {
        return Some("the run was cancelled".into());
    }
    BOUNDS.with(|b| {
        let b = b.borrow();
        let c = b.last()?;
        if c.cancel.as_ref().is_some_and(|f| f.load(Ordering::Relaxed)) {
            return Some("the call was cancelled".into());
        }
        if Instant::now() >= c.deadline {
            return Some(
                format!(
                    "the script ran past its deadline of {} ({})",
                    seconds(c.budget),
                    c.source
                )
                .into(),
            );
        }
        None
    })
}

/// `3s`, `1.5s`: whole seconds without a fraction.
fn seconds(d: Duration) -> String {
    if d.subsec_millis() == 0 {
        format!("{}s", d.as_secs())
    } else {
        format!("{:.1}s", d.as_secs_f64())
    }
}

/// The error that ends a call whose operations, with the allocation work of its
/// thread added, pass `max` (0: no limit). Rhai counts `a = [a]` as one
/// operation however much `a` holds; copying it allocates for each value.
fn over_work(ops: u64, max: u64) -> Option<Dynamic> {
    let work = super::memory::work_by_this_thread().wrapping_sub(WORK_AT_START.with(Cell::get));
    // Below a look's worth of work Rhai's own count ends the call a few
    // operations later, with its own message.
    (max > 0 && work > CHECK_EVERY && ops.saturating_add(work) > max).then(|| {
        format!(
            "Too many operations: {ops} operations and {work} units of copying and allocating values passed limits.max_operations ({max})"
        )
        .into()
    })
}

/// True when the progress hook should look at the clock and the cancel flags:
/// once per [`CHECK_EVERY`] units of operations and allocation work, so a loop
/// whose every operation copies a large value is looked at as often as one of
/// cheap operations.
fn time_to_look() -> bool {
    let now = PROGRESS.with(|p| {
        let n = p.get().wrapping_add(1);
        p.set(n);
        n
    }) + super::memory::work_by_this_thread();
    NEXT_LOOK.with(|next| {
        if now >= next.get() {
            next.set(now + CHECK_EVERY);
            true
        } else {
            false
        }
    })
}

/// The error that ends a call holding more than `max_bytes` above what its thread
/// held when it began. Cheap enough for every operation: one thread-local read.
fn over_memory(max_bytes: i64) -> Option<Dynamic> {
    let used = super::memory::held_by_this_thread() - HELD_AT_START.with(Cell::get);
    (used > max_bytes).then(|| {
        format!(
            "the script holds more than {} MiB (limits.max_memory_mb in patchbook.toml): values kept alive by closures, curried functions or collections",
            max_bytes >> 20
        )
        .into()
    })
}

/// A sandboxed engine with every limit from `limits`, `eval` disabled, strict
/// variables, `Simple` optimisation, no module resolution beyond what a compiled
/// playbook carries, and `print`/`debug` sent to tracing. `cancel` stops every call
/// on this engine at its next check.
pub fn sandbox(limits: &Limits, cancel: Arc<AtomicBool>) -> Engine {
    let mut engine = Engine::new_raw();
    engine.register_global_module(standard_package());
    engine
        .set_max_operations(limits.max_operations)
        .set_max_call_levels(limits.max_call_levels)
        .set_max_expr_depths(limits.max_expr_depth, limits.max_function_expr_depth)
        .set_max_string_size(limits.max_string_size)
        .set_max_array_size(limits.max_array_size)
        .set_max_map_size(limits.max_map_size)
        .set_max_variables(limits.max_variables)
        .set_max_modules(limits.max_modules)
        .set_strict_variables(true)
        // Full would run registered functions at compile time.
        .set_optimization_level(OptimizationLevel::Simple)
        .disable_symbol("eval")
        .set_module_resolver(RefusingResolver);
    let run_cancel = cancel.clone();
    let max_bytes = i64::try_from(limits.max_memory_mb.saturating_mul(1 << 20)).unwrap_or(i64::MAX);
    let max_ops = limits.max_operations;
    engine.on_progress(move |ops| {
        // Memory on every operation: one closure can capture a megabyte, and a
        // thousand operations between looks would let a gigabyte through.
        if let Some(why) = over_memory(max_bytes) {
            return Some(why);
        }
        if let Some(why) = over_work(ops, max_ops) {
            return Some(why);
        }
        if !time_to_look() {
            return None;
        }
        over_bounds(&cancel)
    });
    bounded_sleep(&mut engine, run_cancel, None);
    guard_container_growth(&mut engine, limits);
    engine.on_print(|text| tracing::info!(target: "patchbook::log", "{text}"));
    engine.on_debug(|text, source, pos| {
        tracing::debug!(
            target: "patchbook::script",
            source = source.unwrap_or(""),
            line = pos.line().unwrap_or(0),
            "{text}"
        )
    });
    engine
}

/// Rhai's own `sleep` blocks inside one operation, so neither the deadline nor a
/// cancel (SIGTERM, the watch service stopping) can end it. This one sleeps in
/// short slices and ends the script the moment either is due, or `stop` is set:
/// a run's stop request (SIGTERM) lets steps in progress finish, but a sleep is
/// no step, and waiting it out would hold the shutdown up for as long as it asks.
pub(super) fn bounded_sleep(
    engine: &mut Engine,
    cancel: Arc<AtomicBool>,
    stop: Option<Arc<AtomicBool>>,
) {
    /// The longest a sleeping script waits before it notices a stop.
    const SLICE: Duration = Duration::from_millis(50);
    let sleep = move |seconds: f64| -> Result<(), Box<EvalAltResult>> {
        if !seconds.is_finite() || seconds <= 0.0 {
            return Ok(());
        }
        let until = Instant::now() + Duration::from_secs_f64(seconds.min(86_400.0 * 365.0));
        loop {
            if let Some(why) = over_bounds(&cancel) {
                return Err(Box::new(EvalAltResult::ErrorTerminated(
                    why,
                    Position::NONE,
                )));
            }
            if stop.as_ref().is_some_and(|f| f.load(Ordering::Relaxed)) {
                return Err(Box::new(EvalAltResult::ErrorTerminated(
                    "the run was asked to stop (SIGTERM) while the script slept".into(),
                    Position::NONE,
                )));
            }
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(());
            }
            std::thread::sleep(left.min(SLICE));
        }
    };
    let s2 = sleep.clone();
    engine.register_fn("sleep", move |seconds: i64| s2(seconds as f64));
    engine.register_fn("sleep", sleep);
}

/// Rhai checks sizes when a value passes through a function call, but not when
/// `m[key] = value` adds an entry to a map held in a variable: a loop of such
/// assignments would grow a map until the operation limit. Every variable read
/// checks the variable's own size first, so the next touch of an oversized
/// container stops the script. Nested containers are walked on one read in
/// [`DEEP_CHECK_EVERY`], because a full walk on every read would be quadratic.
fn guard_container_growth(engine: &mut Engine, limits: &Limits) {
    let limits = limits.clone();
    #[allow(deprecated)] // stable in practice; Rhai marks every resolver hook volatile
    engine.on_var(move |name, _index, ctx| {
        let Some(v) = ctx.scope().get(name) else {
            return Ok(None);
        };
        if !(v.is_map() || v.is_array() || v.is_string() || v.is_fnptr()) {
            return Ok(None);
        }
        if v.is_fnptr() {
            curried_within(v, &limits)?;
        }
        let deep = READS.with(|r| {
            let n = r.get().wrapping_add(1);
            r.set(n);
            n % DEEP_CHECK_EVERY == 0
        }) || paid_for_walk();
        let mut sizes = Sizes {
            budget: walk_budget(&limits),
            ..Sizes::default()
        };
        sizes.add(v, deep);
        if deep {
            WALKED.with(|w| w.set(w.get().saturating_add(4 * sizes.visited as u64)));
        }
        let over = |max: usize, n: usize| max > 0 && n > max;
        if sizes.depth > MAX_NESTING {
            return Err(Box::new(EvalAltResult::ErrorRuntime(
                format!(
                    "a value nests deeper than {MAX_NESTING} levels (arrays in arrays, closures capturing closures); build flatter values"
                )
                .into(),
                Position::NONE,
            )));
        }
        if sizes.visited > sizes.budget {
            return Err(Box::new(EvalAltResult::ErrorDataTooLarge(
                format!(
                    "Values held in one variable (more than {} in its arrays, maps and curried function pointers together; limits.max_array_size + max_map_size)",
                    sizes.budget - 1
                ),
                Position::NONE,
            )));
        }
        let what = if over(limits.max_map_size, sizes.map) {
            "Size of object map"
        } else if over(limits.max_array_size, sizes.array) {
            "Size of array"
        } else if over(limits.max_string_size, sizes.string) {
            "Length of string"
        } else {
            return Ok(None);
        };
        Err(Box::new(EvalAltResult::ErrorDataTooLarge(
            what.into(),
            Position::NONE,
        )))
    });
}

/// Most values one function pointer may carry curried, those of the function
/// pointers among them included. A function cannot take more arguments than a
/// scope holds variables, so a longer list can never be called; Rhai copies the
/// whole list on every `curry` and every read of the variable.
pub const MAX_CURRIED: usize = 1_000;

/// Refuses a function pointer whose copy would cost more than the sandbox
/// allows: more than [`MAX_CURRIED`] curried values, or more values than
/// `limits.max_array_size` in them. Rhai's own size checks count nothing inside a
/// function pointer, and `f = f.curry(f)` doubles what `f` holds on every turn.
/// Checked on every read of such a variable: the walk stops at shared values
/// (what a closure captured: copied as one pointer) and as soon as a bound is
/// passed, so a legitimate closure costs a few steps.
fn curried_within(v: &Dynamic, limits: &Limits) -> Result<(), Box<EvalAltResult>> {
    #[derive(Default)]
    struct Copy {
        values: usize,
        curried: usize,
        depth: usize,
    }
    let max_values = if limits.max_array_size == 0 {
        usize::MAX
    } else {
        limits.max_array_size
    };
    fn walk(v: &Dynamic, c: &mut Copy, depth: usize, max_values: usize) {
        c.values += 1;
        c.depth = c.depth.max(depth);
        if c.values > max_values || c.curried > MAX_CURRIED || depth > MAX_NESTING {
            return;
        }
        if let Some(f) = v.read_lock::<rhai::FnPtr>() {
            c.curried += f.curry().len();
            f.curry()
                .iter()
                .filter(|x| !x.is_shared())
                .for_each(|x| walk(x, c, depth + 1, max_values));
        } else if let Some(a) = v.read_lock::<rhai::Array>() {
            a.iter()
                .filter(|x| !x.is_shared())
                .for_each(|x| walk(x, c, depth + 1, max_values));
        } else if let Some(m) = v.read_lock::<rhai::Map>() {
            m.values()
                .filter(|x| !x.is_shared())
                .for_each(|x| walk(x, c, depth + 1, max_values));
        }
    }
    let mut c = Copy::default();
    walk(v, &mut c, 1, max_values);
    let why = if c.curried > MAX_CURRIED {
        format!("a function pointer carries more than {MAX_CURRIED} curried values (nested ones included); pass the data in one array instead")
    } else if c.values > max_values {
        format!("the values curried into a function pointer number more than {max_values} (limits.max_array_size in patchbook.toml)")
    } else if c.depth > MAX_NESTING {
        format!("a value nests deeper than {MAX_NESTING} levels (arrays in arrays, closures capturing closures); build flatter values")
    } else {
        return Ok(());
    };
    Err(Box::new(EvalAltResult::ErrorRuntime(
        why.into(),
        Position::NONE,
    )))
}

/// One read in this many walks nested containers.
const DEEP_CHECK_EVERY: u64 = 256;

/// Unspent allocation work that makes the next read walk deep.
const DEEP_WALK_MIN: u64 = 4096;
/// The most unspent work kept: a thread that worked long without reading a
/// container does not walk on every read afterwards.
const MAX_WALK_CREDIT: u64 = 1 << 20;

thread_local! {
    static READS: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
    /// Allocation work spent on deep walks: four units per value visited, so walks
    /// never cost more than a quarter of the work the script did.
    static WALKED: Cell<u64> = const { Cell::new(0) };
}

/// True when the allocation work done since the last deep walks pays for
/// another one. Copies of a value that doubles on every turn (`a = [f.curry(a),
/// f.curry(a)]`) must be seen within a turn or two, not after 256 reads; a value's
/// copy costs about a unit of work per value it holds (see `memory`), a walk
/// visits each value once.
fn paid_for_walk() -> bool {
    let work = super::memory::work_by_this_thread();
    WALKED.with(|w| {
        let floor = work.saturating_sub(MAX_WALK_CREDIT);
        if w.get() < floor {
            w.set(floor);
        }
        work >= w.get().saturating_add(DEEP_WALK_MIN)
    })
}

/// How many values a deep walk visits at the most: more than the array and map
/// limits together allow one variable to hold, curried values counted too.
fn walk_budget(limits: &Limits) -> usize {
    match (limits.max_array_size, limits.max_map_size) {
        (0, _) | (_, 0) => usize::MAX,
        (a, m) => a.saturating_add(m).saturating_add(1),
    }
}

/// How deep values may nest (arrays in arrays, closures capturing closures). Rhai
/// drops nested values recursively: a value nested a million deep overflows any
/// stack while it is dropped and aborts the process, so nesting is bounded well
/// before that.
pub const MAX_NESTING: usize = 1_000;

#[derive(Default)]
struct Sizes {
    map: usize,
    array: usize,
    string: usize,
    /// Deepest nesting seen, counted only on a deep walk.
    depth: usize,
    /// Values visited, and how many may be.
    visited: usize,
    budget: usize,
}

impl Sizes {
    /// Counts `v`'s own size and, on a deep walk, everything it holds: map values,
    /// array items and the values a closure captured. The walk stops past
    /// [`MAX_NESTING`], so it recurses no deeper than that (scripts run on a stack
    /// sized for it, see [`stack_size`]).
    fn add(&mut self, v: &Dynamic, deep: bool) {
        self.walk(v, deep, 1);
    }

    fn walk(&mut self, v: &Dynamic, deep: bool, depth: usize) {
        self.depth = self.depth.max(depth);
        self.visited += 1;
        if self.depth > MAX_NESTING || self.visited > self.budget {
            return;
        }
        if let Some(m) = v.read_lock::<rhai::Map>() {
            self.map += m.len();
            if deep {
                m.values().for_each(|x| self.walk(x, true, depth + 1));
            }
        } else if let Some(a) = v.read_lock::<rhai::Array>() {
            self.array += a.len();
            if deep {
                a.iter().for_each(|x| self.walk(x, true, depth + 1));
            }
        } else if let Some(s) = v.read_lock::<rhai::ImmutableString>() {
            self.string = self.string.max(s.len());
        } else if let Some(f) = v.read_lock::<rhai::FnPtr>() {
            if deep {
                f.curry().iter().for_each(|x| self.walk(x, true, depth + 1));
            }
        }
    }
}

/// The configured per-call deadline.
pub fn deadline(limits: &Limits) -> Duration {
    Duration::from_secs(limits.deadline_secs.max(1))
}

/// Stack for a thread that runs scripts: Rhai recurses on the native stack for
/// every script call level, and an unoptimised build needs far more per level than
/// the 2 MiB a spawned thread gets by default. Only touched pages are committed.
pub fn stack_size(engine: &Engine) -> usize {
    stack_for_levels(engine.max_call_levels())
}

/// [`stack_size`] of an engine built with `limits.max_call_levels = levels`.
pub fn stack_for_levels(levels: usize) -> usize {
    let per_level = 256 * 1024;
    (levels.max(1) * per_level + (8 << 20)).min(1 << 30)
}

thread_local! {
    /// Set while a script call runs on this thread: a nested call must not assume
    /// the whole stack is still free.
    static IN_SCRIPT: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Clears [`IN_SCRIPT`] again, also when the script call panics.
struct InScript;

impl Drop for InScript {
    fn drop(&mut self) {
        IN_SCRIPT.with(|c| c.set(false));
    }
}

/// Runs `f` on a stack that fits `engine`'s call-depth limit, so a runaway
/// recursion ends as a Rhai "Stack overflow" error instead of aborting the process.
/// A rollout worker started with such a stack (see
/// [`crate::rollout::Executor::worker_stack`]) runs `f` itself; anywhere else, or
/// for a call nested in another script call, `f` gets a fresh thread. A thread per
/// host was most of a 10,000-host plan's system time.
pub fn on_script_stack<R: Send>(
    engine: &Engine,
    f: impl FnOnce() -> R + Send,
) -> Result<R, std::io::Error> {
    let free = !IN_SCRIPT.with(|c| c.get());
    if free && crate::rollout::pool::worker_stack() >= stack_size(engine) {
        IN_SCRIPT.with(|c| c.set(true));
        let _clear = InScript;
        return Ok(f());
    }
    let span = tracing::Span::current();
    std::thread::scope(|s| {
        let handle = std::thread::Builder::new()
            .name("patchbook-script".into())
            .stack_size(stack_size(engine))
            .spawn_scoped(s, move || {
                // Keep the caller's span (run, wave, host) on the script's events.
                let _span = span.enter();
                f()
            })?;
        match handle.join() {
            Ok(r) => Ok(r),
            Err(panic) => std::panic::resume_unwind(panic),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rollout_worker_runs_scripts_itself_and_nested_calls_get_a_fresh_stack() {
        let engine = Engine::new_raw();
        let need = stack_size(&engine);
        // Elsewhere, a call gets its own thread.
        let here = std::thread::current().id();
        let elsewhere = on_script_stack(&engine, || std::thread::current().id()).unwrap();
        assert_ne!(elsewhere, here);
        let worker = std::thread::Builder::new()
            .stack_size(need)
            .spawn(move || {
                crate::rollout::pool::set_worker_stack(need);
                let me = std::thread::current().id();
                let (outer, inner) = on_script_stack(&engine, || {
                    let inner = on_script_stack(&engine, || std::thread::current().id());
                    (std::thread::current().id(), inner.unwrap())
                })
                .unwrap();
                // Once the call is over the worker's stack is free again.
                let again = on_script_stack(&engine, || std::thread::current().id()).unwrap();
                (me, outer, inner, again)
            })
            .unwrap();
        let (me, outer, inner, again) = worker.join().unwrap();
        assert_eq!(outer, me, "the worker did not run the script itself");
        assert_ne!(inner, me, "a nested call shared the busy stack");
        assert_eq!(again, me);
    }
}
