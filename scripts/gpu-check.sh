#!/usr/bin/env bash
# scripts/gpu-check.sh — run the daemon's GPU path for real on a machine with an NVIDIA GPU.
#
#   scripts/gpu-check.sh prepare   HERE, with network: fill .gpu-check/ (ignored by
#                                  git, < 64 MiB) with what the GPU machine lacks
#   scripts/gpu-check.sh build     THERE: build llama-cpp-python with CUDA (5-8 min)
#   scripts/gpu-check.sh test      THERE: telemetry, plan, a model on the GPU, report
#   scripts/gpu-check.sh all       THERE: build, then test
#
# The GPU machine (see docs/daemon.md, "GPU check") has Python 3.12, CUDA's
# nvcc, CMake, ninja, scikit-build-core, numpy, psutil, attrs, h11 and
# nvidia-ml-py, and no network. So `prepare` downloads, here, the wheels it
# lacks (trio, gguf, pydantic, fastapi, uvicorn…, as Python 3.12 manylinux
# wheels, at the versions this venv has) and llama-cpp-python's source,
# trimmed to fit a device call (vocabulary files, docs, tests and the
# backends other than CPU and CUDA removed). A device session then runs, in
# one call, carrying .gpu-check:
#
#   bash scripts/gpu-check.sh all        (timeout_s 600; results in $OUT)
#
# `test` writes a Llama-3-8B-shaped model with random weights (14.5 GB, f16;
# the real Gemma file is too big to carry) into /tmp, then runs
# scripts/gpu_check.py: the daemon's TelemetryReader through the real NVML,
# a fresh node calibration with every layer offloaded (synthetic models
# only: the prediction is made before the model has run), the planner's
# plan for the model on that GPU with its cost per token by cause, the
# daemon's llama.cpp runtime serving it with --n_gpu_layers from the plan,
# measured decode tokens/s per round against the calibrated prediction and
# the old memory-bound ceiling, VRAM used against the estimate. `all` is
# build + test in one call; if it does not fit 600 s, run `build` and
# `test` as two calls on the warm machine.
# Environment: GPU_CHECK_SHAPE=1b|8b|tiny (default 8b), GPU_CHECK_ARCH=90
# (CUDA architecture; default: the local GPU's, from nvidia-smi).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
CARRY="$ROOT/.gpu-check"
SITE=/tmp/qmesh-gpu-site
WORK=/tmp/qmesh-gpu-work
say() { printf 'gpu-check: %s\n' "$*"; }
die() { printf 'gpu-check: error: %s\n' "$*" >&2; exit 1; }

# Wheels the device image lacks (its package list: /work/.library/device/KINDS.md).
WHEELS=(trio outcome sniffio gguf pydantic pydantic-core pydantic-settings python-dotenv
        typing-inspection annotated-types fastapi annotated-doc opentelemetry-api
        starlette uvicorn sse-starlette starlette-context diskcache)

prepare() {
  local py="$ROOT/.venv/bin/python" name version
  [[ -x $py ]] || die "run scripts/setup.sh first (the versions come from .venv)"
  mkdir -p "$CARRY/wheels"
  for name in "${WHEELS[@]}"; do
    version=$("$py" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$name")
    "$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
      --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
      --platform manylinux2014_x86_64 -d "$CARRY/wheels" "$name==$version"
  done
  version=$("$py" -c 'import importlib.metadata as m; print(m.version("llama-cpp-python"))')
  say "llama-cpp-python $version source, trimmed"
  local tmp
  tmp=$(mktemp -d)
  "$py" -m pip download -q --no-deps --no-binary llama-cpp-python -d "$tmp" \
    "llama-cpp-python==$version"
  tar xzf "$tmp"/llama_cpp_python-*.tar.gz -C "$tmp"
  local src
  src=$(echo "$tmp"/llama_cpp_python-*/)
  local vendor="${src:?}/vendor/llama.cpp"
  rm -rf "$src/.git" "$src/examples" "$src/docs"
  local dir
  for dir in models docs tests benches media .github examples gguf-py conversion scripts pocs app; do
    rm -rf "${vendor:?}/$dir"
  done
  find "$vendor/tools" -mindepth 1 -maxdepth 1 ! -name mtmd -exec rm -rf {} +
  for backend in cann et hexagon metal opencl openvino sycl virtgpu vulkan webgpu zdnn zendnn; do
    rm -rf "$vendor/ggml/src/ggml-$backend"
  done
  tar czf "$CARRY/llama-cpp-python-src.tar.gz" -C "$tmp" "$(basename "$src")"
  rm -rf "$tmp"
  du -sh "$CARRY"
  say "ready: carry .gpu-check on the device and run: bash scripts/gpu-check.sh all"
}

use_carried() {
  [[ -d $CARRY/wheels ]] || die ".gpu-check/wheels is missing: run 'scripts/gpu-check.sh prepare' here first and carry .gpu-check"
  if [[ ! -d $SITE ]]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" \
      "$CARRY"/wheels/*.whl
  fi
  export PYTHONPATH="$SITE:$ROOT${PYTHONPATH:+:$PYTHONPATH}"
}

build() {
  use_carried
  command -v nvcc >/dev/null || die "no nvcc: this is not the GPU machine"
  local arch=${GPU_CHECK_ARCH:-}
  if [[ -z $arch ]]; then
    arch=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -n 1 | tr -d '.')
  fi
  mkdir -p "$WORK"
  tar xzf "$CARRY/llama-cpp-python-src.tar.gz" -C "$WORK"
  say "building llama-cpp-python with CUDA for sm_$arch on $(nproc) cores"
  local start=$SECONDS
  # One architecture, no tests, examples, tools or multimodal library: the
  # device time is short. GGML_NATIVE=ON: this wheel never leaves the machine.
  CMAKE_ARGS="-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=$arch -DGGML_NATIVE=ON -DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF" \
    CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) \
    python3 -m pip wheel -q --no-deps --no-build-isolation --no-index -w "$WORK/wheel" \
    "$WORK"/llama_cpp_python-*/
  python3 -m pip install -q --no-index --no-deps --target "$SITE" --upgrade "$WORK"/wheel/*.whl
  say "built in $((SECONDS - start))s"
}

run_test() {
  use_carried
  python3 -c 'import llama_cpp, llama_cpp.server.app' \
    || die "llama-cpp-python is not installed: run 'scripts/gpu-check.sh build' first"
  local shape=${GPU_CHECK_SHAPE:-8b}
  mkdir -p "$WORK"
  local model="$WORK/gpucheck-$shape.gguf"
  [[ -s $model ]] || python3 scripts/gpu_check.py make-model "$model" --shape "$shape"
  nvidia-smi --query-gpu=name,memory.used,memory.total,pcie.link.gen.current,pcie.link.gen.max,pcie.link.width.current,pcie.link.width.max,power.draw --format=csv || true
  PYTHONUNBUFFERED=1 python3 scripts/gpu_check.py test "$model"
}

case "${1:-}" in
  prepare) prepare ;;
  build) build ;;
  test) run_test ;;
  all) build && run_test ;;
  *) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 2 ;;
esac
