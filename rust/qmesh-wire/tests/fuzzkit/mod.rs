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
//! rust/qmesh-pg/tests/fuzzkit compiles this file too (by path), and adds an
//! allocation probe.
#![allow(dead_code)]

use std::time::{Duration, Instant};

use proptest::strategy::Strategy;
use proptest::test_runner::{Config, RngSeed, TestCaseError, TestError, TestRunner};

pub const DEFAULT_SEED: u64 = 0x716d_6573_685f_7769; // "qmesh_wi"
pub const BATCH: u32 = 10_000;
pub const DEFAULT_LONG_CASES: u64 = 100_000;

// -- the runner -----------------------------------------------------------------

fn env<T: std::str::FromStr>(name: &str) -> Option<T> {
    let value = std::env::var(name).ok()?;
    match value.parse() {
        Ok(v) => Some(v),
        Err(_) => panic!("{name}={value:?} is not a number"),
    }
}

fn config(cases: u32, seed: u64) -> Config {
    Config {
        cases,
        rng_seed: RngSeed::Fixed(seed),
        failure_persistence: None,
        ..Config::default()
    }
}

fn run_batch<S: Strategy>(
    target: &str,
    strategy: &S,
    test: &impl Fn(S::Value) -> Result<(), TestCaseError>,
    cases: u32,
    seed: u64,
) {
    let mut runner = TestRunner::new(config(cases, seed));
    match runner.run(strategy, test) {
        Ok(()) => {}
        Err(TestError::Fail(why, input)) => panic!(
            "fuzz {target}: failed with seed {seed} (QMESH_FUZZ_SEED={seed} reproduces it): \
             {why}\nminimal input: {input:#?}"
        ),
        Err(TestError::Abort(why)) => panic!("fuzz {target}: aborted with seed {seed}: {why}"),
    }
}

/// The short run every `cargo test` makes: `cases` cases, fixed seed.
pub fn quick<S: Strategy>(
    target: &str,
    cases: u32,
    strategy: S,
    test: impl Fn(S::Value) -> Result<(), TestCaseError>,
) {
    run_batch(target, &strategy, &test, cases, DEFAULT_SEED);
}

/// The long run, sized by the environment (see the module documentation).
pub fn long<S: Strategy>(
    target: &str,
    strategy: S,
    test: impl Fn(S::Value) -> Result<(), TestCaseError>,
) {
    let want_cases: Option<u64> = env("QMESH_FUZZ_CASES");
    let want_time = env::<f64>("QMESH_FUZZ_SECONDS").map(Duration::from_secs_f64);
    let want_cases = match (want_cases, want_time) {
        (None, None) => Some(DEFAULT_LONG_CASES),
        (cases, _) => cases,
    };
    let first_seed: u64 = env("QMESH_FUZZ_SEED").unwrap_or(DEFAULT_SEED);
    let started = Instant::now();
    let mut done = 0u64;
    let mut seed = first_seed;
    // With both a count and a time, run until both are met.
    while !(want_cases.is_none_or(|n| done >= n)
        && want_time.is_none_or(|t| started.elapsed() >= t))
    {
        let batch = match (want_cases, want_time) {
            (Some(n), None) => (n - done).min(u64::from(BATCH)) as u32,
            _ => BATCH,
        };
        run_batch(target, &strategy, &test, batch, seed);
        done += u64::from(batch);
        seed = seed.wrapping_add(1);
    }
    println!(
        "fuzz {target}: {done} cases in {:.1}s (seeds {first_seed}..={})",
        started.elapsed().as_secs_f64(),
        seed.wrapping_sub(1)
    );
}
