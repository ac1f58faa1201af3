//! Building sandboxed engines and bounding each call into a script.
//!
//! The standard package is built once per process; every engine after that costs
//! microseconds, so each run (or each host of an ad-hoc run) gets its own engine
//! with its own cancel flag. The wall-clock deadline lives in a thread-local set
//! around each call, because `on_progress` runs on the calling thread and knows
//! nothing else about the call. This file must not register anything that touches
//! the world: that is `register`'s job.

use std::cell::RefCell;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use rhai::packages::{Package, StandardPackage};
type SharedModule = std::sync::Arc<rhai::Module>;
use rhai::{Dynamic, Engine, OptimizationLevel};

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
    cancel: Option<Arc<AtomicBool>>,
}

thread_local! {
    static BOUNDS: RefCell<Vec<CallBounds>> = const { RefCell::new(Vec::new()) };
}

/// Bounds every script call made on this thread while it lives; nested guards
/// stack, and dropping one restores the outer bounds.
#[must_use = "the bounds only hold while the guard lives"]
pub struct CallGuard {
    _not_send: std::marker::PhantomData<*const ()>,
}

impl CallGuard {
    pub fn new(budget: Duration, cancel: Option<Arc<AtomicBool>>) -> Self {
        let deadline = Instant::now()
            .checked_add(budget)
            .unwrap_or_else(|| Instant::now() + Duration::from_secs(86_400 * 365));
        BOUNDS.with(|b| {
            b.borrow_mut().push(CallBounds {
                deadline,
                budget,
                cancel,
            })
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
                    "the script ran past its deadline of {}s (limits.deadline_secs in patchbook.toml)",
                    c.budget.as_secs()
                )
                .into(),
            );
        }
        None
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
    engine.on_progress(move |ops| {
        if ops % CHECK_EVERY != 0 {
            return None;
        }
        over_bounds(&cancel)
    });
    engine.on_print(|text| tracing::info!(target: "patchbook::script", "{text}"));
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

/// The configured per-call deadline.
pub fn deadline(limits: &Limits) -> Duration {
    Duration::from_secs(limits.deadline_secs.max(1))
}
