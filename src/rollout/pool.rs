//! A bounded worker pool: `workers` OS threads pull items from a shared queue.
//! ssh2 is blocking, so per-host work runs here; a 10,000-host run still uses only
//! `workers` threads.

use std::cell::Cell;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

thread_local! {
    /// The stack size this thread was started with, when a pool chose it.
    static WORKER_STACK: Cell<usize> = const { Cell::new(0) };
}

/// Records that the current thread was started with a stack of `bytes`.
pub(crate) fn set_worker_stack(bytes: usize) {
    WORKER_STACK.with(|c| c.set(bytes));
}

/// The stack size a rollout worker was started with; 0 on any other thread.
pub fn worker_stack() -> usize {
    WORKER_STACK.with(|c| c.get())
}

/// Starts a worker thread in `scope`, with a stack of `stack` bytes when given,
/// recorded for [`worker_stack`] before `f` runs. Every pool of script-running
/// workers starts its threads here.
pub(crate) fn spawn_worker<'scope, 'env, R: Send + 'scope>(
    scope: &'scope std::thread::Scope<'scope, 'env>,
    stack: Option<usize>,
    f: impl FnOnce() -> R + Send + 'scope,
) -> std::io::Result<std::thread::ScopedJoinHandle<'scope, R>> {
    let mut builder = std::thread::Builder::new().name("patchbook-host".into());
    if let Some(bytes) = stack {
        builder = builder.stack_size(bytes);
    }
    builder.spawn_scoped(scope, move || {
        if let Some(bytes) = stack {
            set_worker_stack(bytes);
        }
        f()
    })
}

/// Runs `work` on every item with at most `workers` at once; results keep item order.
pub fn map_bounded<T, R, F>(items: &[T], workers: usize, work: F) -> Vec<R>
where
    T: Sync,
    R: Send,
    F: Fn(&T) -> R + Sync,
{
    map_bounded_on_stack(items, workers, None, work)
}

/// [`map_bounded`] on workers started with a stack of `stack` bytes (recorded for
/// [`worker_stack`]), so per-item script calls run on the worker itself instead
/// of a fresh thread each: a thread per host was most of a large plan's system
/// time. A worker that cannot be started is not fatal while one runs; with none,
/// the items run on the calling thread.
pub fn map_bounded_on_stack<T, R, F>(
    items: &[T],
    workers: usize,
    stack: Option<usize>,
    work: F,
) -> Vec<R>
where
    T: Sync,
    R: Send,
    F: Fn(&T) -> R + Sync,
{
    let n = items.len();
    let workers = workers.clamp(1, n.max(1));
    let next = AtomicUsize::new(0);
    let results: Mutex<Vec<Option<R>>> = Mutex::new((0..n).map(|_| None).collect());
    let drain = || loop {
        let i = next.fetch_add(1, Ordering::Relaxed);
        if i >= n {
            break;
        }
        let r = work(&items[i]);
        results.lock().unwrap_or_else(|p| p.into_inner())[i] = Some(r);
    };
    std::thread::scope(|s| {
        let mut started = 0;
        for _ in 0..workers {
            if spawn_worker(s, stack, drain).is_ok() {
                started += 1;
            }
        }
        if started == 0 {
            drain();
        }
    });
    results
        .into_inner()
        .unwrap_or_else(|p| p.into_inner())
        .into_iter()
        .flatten()
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    #[test]
    fn keeps_order_and_bounds_concurrency() {
        let items: Vec<usize> = (0..200).collect();
        let live = AtomicUsize::new(0);
        let peak = AtomicUsize::new(0);
        let out = map_bounded(&items, 7, |i| {
            let now = live.fetch_add(1, Ordering::SeqCst) + 1;
            peak.fetch_max(now, Ordering::SeqCst);
            std::thread::sleep(std::time::Duration::from_millis(1));
            live.fetch_sub(1, Ordering::SeqCst);
            i * 2
        });
        assert_eq!(out, items.iter().map(|i| i * 2).collect::<Vec<_>>());
        assert!(peak.load(Ordering::SeqCst) <= 7);
    }

    #[test]
    fn workers_on_a_chosen_stack_say_so() {
        let items: Vec<usize> = (0..20).collect();
        let stacks = map_bounded_on_stack(&items, 3, Some(4 << 20), |_| worker_stack());
        assert!(stacks.iter().all(|s| *s == 4 << 20), "{stacks:?}");
        assert!(map_bounded(&items, 3, |_| worker_stack())
            .iter()
            .all(|s| *s == 0));
    }
}
