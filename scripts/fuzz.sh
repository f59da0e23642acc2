#!/usr/bin/env bash
# Fuzz the parsers that read another party's bytes, and say how many inputs
# each one ran.
#
# Targets (the Rust tests that hold them, all #[ignore]d long runs):
#
#   frame_decoder    rust/qmesh-wire/tests/fuzz_long.rs       sealed frame stream decoder
#   noise_handshake  rust/qmesh-wire/tests/handshake_fuzz.rs  Noise IK messages 1 and 2
#   pg_scanner       rust/qmesh-pg/tests/fuzz_long.rs         Postgres message scanner
#   pg_startup       rust/qmesh-pg/tests/fuzz_long.rs         startup packets (SSL, cancel, ...)
#   pg_typed         rust/qmesh-pg/tests/fuzz_long.rs         typed frontend/backend parsers
#
# Each runs for $FUZZ_SECONDS (default 60). With cargo-fuzz and a nightly
# toolchain, frame_decoder runs under libFuzzer (its target lives in
# rust/qmesh-wire/fuzz); every other target, and frame_decoder on a
# stable-only box, runs as a long proptest run: valid inputs under mutations
# (bit flips, truncations, length-field and count edits, huge declared
# lengths, duplicated, dropped and inserted chunks) and plain random bytes,
# checked against properties stronger than "no panic" (see each file's
# documentation). Those runs are seeded (QMESH_FUZZ_SEED, default fixed) and
# sized by time, or by count with $QMESH_FUZZ_CASES (cases per target).
#
#   scripts/fuzz.sh                        # every target, 60 s each
#   FUZZ_SECONDS=300 scripts/fuzz.sh pg_scanner noise_handshake
#   QMESH_FUZZ_CASES=100000 scripts/fuzz.sh
#   QMESH_FUZZ_FALLBACK=1 scripts/fuzz.sh  # proptest even where cargo-fuzz exists
#
# Prints one line per target, "fuzz <target>: <n> cases in <t>s ...", and a
# summary at the end; exits non-zero if any target found a failure.
#
# Hostile clients against a running Gate (its tunnel and HTTP ports, through
# the Python layers too) are tests/test_hostile_clients.py: Hypothesis,
# derandomized with a fixed example count, part of the ordinary pytest run.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

FUZZ_SECONDS="${FUZZ_SECONDS:-60}"
FUZZ_DIR="rust/qmesh-wire/fuzz"

# target -> "package test-file test-name"
declare -A TARGETS=(
    [frame_decoder]="qmesh-wire fuzz_long fuzz_decoder_long"
    [noise_handshake]="qmesh-wire handshake_fuzz fuzz_handshake_long"
    [pg_scanner]="qmesh-pg fuzz_long fuzz_scanner_long"
    [pg_startup]="qmesh-pg fuzz_long fuzz_startup_long"
    [pg_typed]="qmesh-pg fuzz_long fuzz_typed_long"
)
ORDER=(frame_decoder noise_handshake pg_scanner pg_startup pg_typed)

if (($# > 0)); then
    selected=("$@")
else
    selected=("${ORDER[@]}")
fi
for target in "${selected[@]}"; do
    [[ -n "${TARGETS[$target]:-}" ]] || {
        echo "fuzz.sh: unknown target '$target' (known: ${ORDER[*]})" >&2
        exit 2
    }
done

have_cargo_fuzz() {
    [[ "${QMESH_FUZZ_FALLBACK:-0}" != "1" ]] || return 1
    command -v cargo >/dev/null 2>&1 || return 1
    # cargo-fuzz needs nightly for -Zsanitizer; it must both be installed.
    cargo +nightly --version >/dev/null 2>&1 || return 1
    cargo +nightly fuzz --version >/dev/null 2>&1 || return 1
}

# Time-sized unless a count was asked for.
if [[ -z "${QMESH_FUZZ_CASES:-}" ]]; then
    export QMESH_FUZZ_SECONDS="${QMESH_FUZZ_SECONDS:-$FUZZ_SECONDS}"
fi

summary=()
failed=0

run_libfuzzer() {
    local target=$1 log
    log=$(mktemp)
    echo "fuzz.sh: $target under cargo fuzz (nightly, libFuzzer), ${FUZZ_SECONDS}s" >&2
    mkdir -p "$FUZZ_DIR/corpus/$target"
    if (cd "$FUZZ_DIR" && cargo +nightly fuzz run "$target" "corpus/$target" -- \
        -max_total_time="${FUZZ_SECONDS}" -max_len=65536 -timeout=10) 2>&1 | tee "$log" >&2; then
        # libFuzzer ends with "Done <n> runs in <t> second(s)".
        summary+=("fuzz $target: $(grep -oE 'Done [0-9]+ runs in [0-9]+ second' "$log" |
            tail -n1 | awk '{print $2 " cases in " $5 "s (libFuzzer)"}')")
    else
        summary+=("fuzz $target: FAILED (libFuzzer; see above)")
        failed=1
    fi
    rm -f "$log"
}

run_proptest() {
    local target=$1 package test name log
    read -r package test name <<<"${TARGETS[$target]}"
    log=$(mktemp)
    echo "fuzz.sh: $target as a long proptest run" \
        "(${QMESH_FUZZ_CASES:+${QMESH_FUZZ_CASES} cases}${QMESH_FUZZ_CASES:-${QMESH_FUZZ_SECONDS}s})" >&2
    if cargo test --release -p "$package" --test "$test" -- \
        --ignored "$name" --exact --nocapture 2>&1 | tee "$log" >&2; then
        summary+=("$(grep -E "^fuzz $target: " "$log" | tail -n1)")
    else
        summary+=("fuzz $target: FAILED (see above)")
        failed=1
    fi
    rm -f "$log"
}

use_libfuzzer=0
if have_cargo_fuzz; then
    use_libfuzzer=1
fi
if ((use_libfuzzer == 0)); then
    echo "fuzz.sh: cargo-fuzz/nightly unavailable (or QMESH_FUZZ_FALLBACK=1);" \
        "every target runs as a proptest run" >&2
fi

# One build for every proptest target before the clocks start.
cargo test --release -p qmesh-wire -p qmesh-pg --test fuzz_long --test handshake_fuzz \
    --no-run >&2

for target in "${selected[@]}"; do
    # Only frame_decoder has a libFuzzer target so far.
    if ((use_libfuzzer)) && [[ "$target" == frame_decoder ]]; then
        run_libfuzzer "$target"
    else
        run_proptest "$target"
    fi
done

echo
echo "fuzz.sh: inputs run per target"
printf '  %s\n' "${summary[@]}"
exit "$failed"
