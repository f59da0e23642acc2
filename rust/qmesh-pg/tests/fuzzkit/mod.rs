//! The stand-in for `cargo fuzz` in this crate's tests: proptest runs with a
//! fixed seed, sized for `cargo test` or, for the `#[ignore]`d long runs,
//! by the environment (see scripts/fuzz.sh):
//!
//! * `QMESH_FUZZ_CASES`: run at least this many cases;
//! * `QMESH_FUZZ_SECONDS`: run batches until this much time has passed;
//! * `QMESH_FUZZ_SEED`: the seed of the first batch (each batch of
//!   [`BATCH`] cases takes the next one), default [`DEFAULT_SEED`].
//!
//! Neither count nor time given: [`DEFAULT_LONG_CASES`]. Every run prints
//! `fuzz <target>: <n> cases in <t>s (seeds <a>..=<b>)`, which is what
//! scripts/fuzz.sh reports.
//!
//! Also here: a global allocator that records the largest single allocation
//! a piece of code makes on this thread ([`largest_alloc`]), so that "a
//! hostile length field cannot make the parser allocate" is a tested
//! property rather than a reading of the code.
#![allow(dead_code)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

// -- the allocation probe -------------------------------------------------------

struct Tracking;

thread_local! {
    // `const` initialisers without destructors: safe to touch from inside
    // the allocator (no lazy registration, which would allocate).
    static ARMED: Cell<bool> = const { Cell::new(false) };
    static LARGEST: Cell<usize> = const { Cell::new(0) };
}

fn note(size: usize) {
    if ARMED.try_with(Cell::get).unwrap_or(false) {
        let _ = LARGEST.try_with(|l| l.set(l.get().max(size)));
    }
}

unsafe impl GlobalAlloc for Tracking {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        System.alloc(layout)
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        System.alloc_zeroed(layout)
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note(new_size);
        System.realloc(ptr, layout, new_size)
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout)
    }
}

#[global_allocator]
static GLOBAL: Tracking = Tracking;

/// Run `f`; also return the largest single allocation (or reallocation) it
/// made on this thread, in bytes.
pub fn largest_alloc<T>(f: impl FnOnce() -> T) -> (T, usize) {
    LARGEST.with(|l| l.set(0));
    ARMED.with(|a| a.set(true));
    let out = f();
    ARMED.with(|a| a.set(false));
    (out, LARGEST.with(Cell::get))
}

// -- the runner -----------------------------------------------------------------
// qmesh-wire's, compiled here from its file: the test crates of two packages
// cannot depend on each other, but they can build the same source.

#[path = "../../../qmesh-wire/tests/fuzzkit/mod.rs"]
mod runner;
pub use runner::*;
