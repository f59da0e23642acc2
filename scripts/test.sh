#!/usr/bin/env bash
# scripts/test.sh — THE test command: set up, then run every check.
#
#   scripts/test.sh [PYTEST ARGS...]     e.g. scripts/test.sh -k tunnel -x
#
# Steps: scripts/setup.sh (venv + editable install + release build of
# qmesh._core), cargo test (release, so the proptests run quickly; it shares
# target/ with the extension build), mypy's stubtest on qmesh/_core.pyi, ruff,
# mypy (strict, on qmesh, tests, bench and scripts), pytest. A failing step does not stop the later ones (set QMESH_FAIL_FAST=1
# to stop at the first failure), except setup: nothing runs without it. Exit
# status 0 only when every step passed; a summary is printed at the end.
# The check functions below run through `step`, which shellcheck cannot see.
# shellcheck disable=SC2317
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
VENV="$ROOT/.venv"
PY="$VENV/bin/python"

SUMMARY=()
FAILED=0

finish() {
  printf '\n== summary ==\n'
  printf '  %s\n' "${SUMMARY[@]}"
  if ((FAILED)); then
    printf 'test.sh: FAILED\n'
    exit 1
  fi
  printf 'test.sh: all steps passed\n'
  exit 0
}

# step NAME COMMAND...: run it, record PASS/FAIL and the time it took.
step() {
  local name=$1; shift
  printf '\n== %s ==\n' "$name"
  local start=$SECONDS rc=0
  "$@" || rc=$?
  local took=$((SECONDS - start))
  if ((rc == 0)); then
    SUMMARY+=("PASS  $name (${took}s)")
  else
    SUMMARY+=("FAIL  $name (exit $rc, ${took}s)")
    FAILED=1
    if [[ $name == setup || ${QMESH_FAIL_FAST:-0} == 1 ]]; then
      finish
    fi
  fi
}

cargo_test() {
  # Shares target/release with setup.sh's `maturin develop --release`: the
  # dependencies compiled there (snow, aes-gcm, zstd) are reused here, and
  # the test-only ones (proptest) do not disturb the extension's build. The
  # binding crate has test = false, so this does not compile pyo3; if it ever
  # does, PYO3_PYTHON makes it use the same interpreter as maturin, and
  # pyo3's build script (which reruns when that changes) stays fresh.
  PYO3_PYTHON="$PY" cargo test --workspace --release
}

stubtest() {
  "$PY" -m mypy.stubtest qmesh._core
}

ruff_check() {
  # Git keeps no empty folders, so bench/ (say) may be missing in a clone.
  local paths=() p
  for p in qmesh tests bench; do
    [[ -e $p ]] && paths+=("$p")
  done
  "$VENV/bin/ruff" check "${paths[@]}"
}

run_pytest() {
  local rc=0
  "$PY" -m pytest -q -ra "$@" || rc=$?
  if ((rc == 5)); then
    printf 'test.sh: pytest collected no tests (exit 5); that is a failure here\n' >&2
  fi
  return "$rc"
}

step setup bash scripts/setup.sh
# setup.sh may have added ~/.cargo/bin to its own PATH; do the same here.
if ! command -v cargo >/dev/null 2>&1 && [[ -x $HOME/.cargo/bin/cargo ]]; then
  export PATH="$PATH:$HOME/.cargo/bin"
fi
step "cargo test (release)" cargo_test
step "stubtest qmesh._core" stubtest
step "ruff check" ruff_check
# Who may import whom (tests/test_layers.py reads every import in qmesh/):
# its own step, so a layering break is named as such, not lost in pytest.
step "import layers" "$PY" -m pytest -q -p no:cacheprovider tests/test_layers.py
step "mypy (strict)" "$PY" -m mypy
step pytest run_pytest --ignore=tests/test_layers.py "$@"
finish
