#!/usr/bin/env bash
# scripts/build-wheel.sh — build the release wheel into dist/ and print its
# path as the last line of output.
#
# The wheel is abi3 (one wheel for every CPython >= 3.11) and manylinux2014
# (glibc >= 2.17). Linked natively on Debian 12 the extension picks up
# glibc 2.28-2.34 symbol versions from the Rust standard library and the C in
# zstd, and maturin's manylinux audit rejects it for manylinux2014 and
# manylinux_2_28 alike; so maturin links with zig (the `ziglang` package from
# PyPI) against glibc 2.17 symbols instead. The zig build uses its own folder,
# target/<triple>/release, so it never invalidates setup.sh's build.
#
# Environment: QMESH_WHEEL_COMPAT overrides the platform tag (default
# manylinux2014; e.g. manylinux_2_28).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
VENV="$ROOT/.venv"
COMPAT=${QMESH_WHEEL_COMPAT:-manylinux2014}
ZIGLANG_REQ='ziglang~=0.17.1'  # the zig maturin 1.16 was tested with here
LOG_DIR="$ROOT/.cache/wheel"
mkdir -p "$LOG_DIR" dist

say() { printf 'build-wheel: %s\n' "$*"; }
die() { printf 'build-wheel: error: %s\n' "$*" >&2; exit 1; }

say "preparing the build tools"
bash scripts/setup.sh --tools-only | sed 's/^/  /'
export VIRTUAL_ENV="$VENV" PATH="$VENV/bin:$PATH" PIP_DISABLE_PIP_VERSION_CHECK=1
if ! command -v cargo >/dev/null 2>&1 && [[ -x $HOME/.cargo/bin/cargo ]]; then
  export PATH="$PATH:$HOME/.cargo/bin"
fi
command -v cargo >/dev/null 2>&1 || die "cargo not found; install Rust (https://rustup.rs)"
"$VENV/bin/python" -m pip install --quiet "$ZIGLANG_REQ" \
  || die "could not install $ZIGLANG_REQ from PyPI"
say "zig $("$VENV/bin/python" -m ziglang version)"

OUT=$(mktemp -d "$ROOT/dist/.build.XXXXXX")
trap 'rm -rf "$OUT"' EXIT
say "maturin build --release --zig --compatibility $COMPAT (log: .cache/wheel/build.log)"
start=$SECONDS
if ! maturin build --release --zig --compatibility "$COMPAT" --out "$OUT" \
    >"$LOG_DIR/build.log" 2>&1; then
  tail -n 60 "$LOG_DIR/build.log" | sed 's/^/    /' >&2
  die "maturin build failed (full log: .cache/wheel/build.log)"
fi
say "built in $((SECONDS - start))s"

shopt -s nullglob
wheels=("$OUT"/*.whl)
((${#wheels[@]} == 1)) || die "expected one wheel in $OUT, found ${#wheels[@]}"

# Check the tags and contents ourselves rather than trusting the file name.
"$VENV/bin/python" - "${wheels[0]}" <<'PY' || die "the wheel failed its checks"
import re
import sys
import zipfile
from pathlib import Path

path = Path(sys.argv[1])
problems = []
m = re.fullmatch(r"qmesh-([^-]+)-cp311-abi3-(.+)\.whl", path.name)
if not m:
    sys.exit(f"unexpected wheel name {path.name} (want qmesh-VERSION-cp311-abi3-PLATFORM.whl)")
platforms = m.group(2).split(".")
if not all(p.startswith("manylinux") for p in platforms):
    problems.append(f"platform tags {platforms} are not all manylinux")
# The oldest glibc the tags promise, e.g. manylinux2014 = manylinux_2_17.
legacy = {"manylinux2014": (2, 17), "manylinux2010": (2, 12), "manylinux1": (2, 5)}
promised = []
for p in platforms:
    policy = re.sub(r"_(x86_64|aarch64|i686|ppc64le|s390x|armv7l)$", "", p)
    if policy in legacy:
        promised.append(legacy[policy])
    elif mm := re.fullmatch(r"manylinux_(\d+)_(\d+)", policy):
        promised.append((int(mm.group(1)), int(mm.group(2))))
    else:
        problems.append(f"unknown platform tag {p}")
with zipfile.ZipFile(path) as z:
    names = set(z.namelist())
    dist_info = f"qmesh-{m.group(1)}.dist-info"
    for required in ("qmesh/__init__.py", "qmesh/cli/__init__.py", "qmesh/_core.abi3.so",
                     "qmesh/_core.pyi", "qmesh/py.typed", f"{dist_info}/entry_points.txt"):
        if required not in names:
            problems.append(f"missing {required}")
    wheel_meta = z.read(f"{dist_info}/WHEEL").decode()
    tags = re.findall(r"^Tag: (\S+)$", wheel_meta, re.M)
    if not tags or not all(t.startswith("cp311-abi3-manylinux") for t in tags):
        problems.append(f"WHEEL tags {tags}")
    entry_points = z.read(f"{dist_info}/entry_points.txt").decode()
    if not re.search(r"^qmesh\s*=\s*qmesh\.cli:main$", entry_points, re.M):
        problems.append("no `qmesh` console script")
    so = z.read("qmesh/_core.abi3.so") if "qmesh/_core.abi3.so" in names else b""
versions = {tuple(int(x) for x in v.split(b"."))
            for v in re.findall(rb"GLIBC_(\d+(?:\.\d+)+)", so)}
newest = max(versions, default=(0,))
if promised and newest[:2] > min(promised):
    problems.append(f"_core.abi3.so needs GLIBC_{'.'.join(map(str, newest))}, "
                    f"newer than the tag's glibc {min(promised)}")
if problems:
    sys.exit("\n".join(problems))
print(f"build-wheel: checked {path.name}: tags {', '.join(tags)}; "
      f"newest glibc symbol GLIBC_{'.'.join(map(str, newest))}")
PY

dest="$ROOT/dist/$(basename "${wheels[0]}")"
mv -f "${wheels[0]}" "$dest"
say "wheel:"
printf '%s\n' "$dest"
