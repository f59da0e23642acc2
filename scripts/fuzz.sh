#!/usr/bin/env bash
# Fuzz the frame decoder (rust/qmesh-wire).
#
# With cargo-fuzz and a nightly toolchain: run the libFuzzer target
# `frame_decoder` for $FUZZ_SECONDS (default 60). Without them (the usual
# stable-only CI box): fall back to the long proptest run, which mutates valid
# frame streams (bit flips, truncations, length-field edits, duplicated,
# dropped and swapped chunks) and checks the decoder never panics and never
# returns an unauthentic frame. $QMESH_FUZZ_CASES sizes that run (default
# 10000 per second of $FUZZ_SECONDS: roughly the same wall time on a laptop
# core, plus the release build).
#
#   scripts/fuzz.sh                  # whichever is available
#   FUZZ_SECONDS=600 scripts/fuzz.sh
#   QMESH_FUZZ_FALLBACK=1 scripts/fuzz.sh   # force the proptest fallback
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

FUZZ_SECONDS="${FUZZ_SECONDS:-60}"
FUZZ_DIR="rust/qmesh-wire/fuzz"

have_cargo_fuzz() {
    [[ "${QMESH_FUZZ_FALLBACK:-0}" != "1" ]] || return 1
    command -v cargo >/dev/null 2>&1 || return 1
    # cargo-fuzz needs nightly for -Zsanitizer; it must both be installed.
    cargo +nightly --version >/dev/null 2>&1 || return 1
    cargo +nightly fuzz --version >/dev/null 2>&1 || return 1
}

if have_cargo_fuzz; then
    echo "fuzz.sh: cargo fuzz (nightly), target frame_decoder, ${FUZZ_SECONDS}s" >&2
    cd "$FUZZ_DIR"
    mkdir -p corpus/frame_decoder
    exec cargo +nightly fuzz run frame_decoder corpus/frame_decoder -- \
        -max_total_time="${FUZZ_SECONDS}" -max_len=65536 -timeout=10
fi

export QMESH_FUZZ_CASES="${QMESH_FUZZ_CASES:-$((FUZZ_SECONDS * 10000))}"
echo "fuzz.sh: cargo-fuzz/nightly unavailable; proptest fallback," \
    "${QMESH_FUZZ_CASES} cases" >&2
exec cargo test --release -p qmesh-wire --test fuzz_long -- \
    --ignored fuzz_decoder_long --exact --nocapture
