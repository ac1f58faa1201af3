//! The script sandbox's memory budget: a counting global allocator that keeps,
//! per thread, the bytes that thread holds (allocated minus freed).
//!
//! Rhai bounds the size of each string, array and map, but not how many of them a
//! script keeps alive: closures capturing megabyte strings, curried arguments and
//! blobs add up until the allocator fails and the process aborts. Each script call
//! runs on a thread of its own ([`super::engine`]'s `CallGuard` takes a baseline),
//! and the engine's progress hook ends the script cleanly once the thread holds
//! more than `limits.max_memory_mb` above that baseline. This module only counts;
//! it must never fail an allocation itself (that would be an abort).

use std::alloc::{GlobalAlloc, Layout};

use mimalloc::MiMalloc;
use std::cell::Cell;

thread_local! {
    // `const`, no destructor: readable from the allocator at any point of a
    // thread's life, teardown included, without allocating.
    static HELD: Cell<i64> = const { Cell::new(0) };
    /// Work the thread's allocations stand for (see [`work_by_this_thread`]);
    /// only ever grows.
    static WORK: Cell<u64> = const { Cell::new(0) };
}

/// Bytes that count as one unit of work: copying them costs about what one
/// script operation does.
const BYTES_PER_UNIT: u64 = 256;

/// mimalloc, counting per thread. Loading and planning a large fleet is mostly
/// small allocations, which mimalloc serves in about two thirds of glibc's time.
pub struct Counting;

/// An allocation size as a signed delta; sizes never exceed `isize::MAX`, so
/// this is exact.
fn signed(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

fn add(delta: i64) {
    let _ = HELD.try_with(|h| h.set(h.get().wrapping_add(delta)));
}

/// An allocation of `bytes`: one unit for the allocation, one per
/// [`BYTES_PER_UNIT`] it holds.
fn worked(bytes: usize) {
    let units = 1 + bytes as u64 / BYTES_PER_UNIT;
    let _ = WORK.try_with(|w| w.set(w.get().wrapping_add(units)));
}

// SAFETY: every call is forwarded unchanged to mimalloc; the counting touches only
// a const thread-local `Cell`, which neither allocates nor unwinds.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: forwarded with the caller's own guarantees.
        let p = unsafe { MiMalloc.alloc(layout) };
        if !p.is_null() {
            add(signed(layout.size()));
            worked(layout.size());
        }
        p
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as above.
        let p = unsafe { MiMalloc.alloc_zeroed(layout) };
        if !p.is_null() {
            add(signed(layout.size()));
            worked(layout.size());
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: as above.
        unsafe { MiMalloc.dealloc(ptr, layout) };
        add(-signed(layout.size()));
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: as above.
        let p = unsafe { MiMalloc.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            add(signed(new_size) - signed(layout.size()));
            // Growing a string or array in place costs what it adds.
            worked(new_size.saturating_sub(layout.size()));
        }
        p
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Bytes the calling thread holds now: what it allocated minus what it freed.
/// Memory freed by another thread is not subtracted here, so this drifts; the
/// sandbox compares it against a baseline taken when each script call starts.
pub fn held_by_this_thread() -> i64 {
    HELD.try_with(Cell::get).unwrap_or(0)
}

/// Units of work the calling thread's allocations stand for, ever: one per
/// allocation and one per 256 bytes allocated. Rhai counts one operation for
/// `a = [a]` whether `a` holds one value or ten thousand nested ones, yet copying
/// it allocates for every one of them; the sandbox adds these units to its
/// operation count so that `max_operations` and the deadline checks follow the
/// work done. Frees are not counted: every value freed was allocated, and counted,
/// once.
pub fn work_by_this_thread() -> u64 {
    WORK.try_with(Cell::get).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_thread_sees_what_it_holds_and_what_it_frees() {
        std::thread::spawn(|| {
            let before = held_by_this_thread();
            let v = vec![0u8; 8 << 20];
            let during = held_by_this_thread();
            assert!(during - before >= 8 << 20, "{before} {during}");
            drop(v);
            assert!(held_by_this_thread() - before < 1 << 20);
            // A hundred small vectors are a hundred units and more; freeing them takes
            // none back.
            let work = work_by_this_thread();
            let v: Vec<Vec<u8>> = (0..100).map(|_| vec![0u8; 10]).collect();
            let done = work_by_this_thread() - work;
            assert!((101..300).contains(&done), "{done}");
            drop(v);
            assert_eq!(work_by_this_thread() - work, done);
        })
        .join()
        .unwrap();
    }
}
