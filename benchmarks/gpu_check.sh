#!/usr/bin/env bash
# benchmarks/gpu_check.sh OUTDIR — strata's GPU side, built and checked on a GPU machine
# (issue 12), from a clean tree, offline, in under 5 minutes on a 16-core box.
#
#   PYTHON=/opt/torch/.venv/bin/python3 benchmarks/gpu_check.sh /tmp/gpu_check
#
# 1. Dependencies that such a machine may lack (liburing, GoogleTest, nlohmann-json, xxhash,
#    libnuma) come from Debian packages in .deps/debs/ (fetched beforehand with
#    `apt-get download`, see docs/gpu.md), unpacked with dpkg -x into .deps/root and found
#    through -DSTRATA_DEPS_PREFIX; nothing is installed into the system. pybind11 comes from
#    $PYTHON (`python -m pybind11 --cmakedir`).
# 2. Builds only what the checks need, in $BUILD (default build-gpu-check): the core, the CUDA
#    code for this GPU's architecture, the binding strata._C, test_cuda_* and strata-bench-gpu.
#    The binding goes into $BUILD/pkg/strata beside a copy of python/strata, so the tree's own
#    python/strata is not touched.
# 3. Runs the C++ GPU tests, the bench (--json) and benchmarks/gpu_check.py, prints one table,
#    and leaves in OUTDIR: gpu_check.log (everything), steps.tsv, test_cuda_*.json,
#    bench_gpu.jsonl, python_checks.json, hardware_profile_gpu.json, gpu_check.json.
# Exit status: 0 every check passed, 1 a check failed, 2 nothing failed but some checks could
# not run (no GPU, no torch, the engine without a GPU path). Each step has a time limit.
set -uo pipefail

if [ $# -ne 1 ]; then
  echo "usage: [PYTHON=...] [BUILD=...] [JOBS=...] [CUDA_ARCH=90] $0 OUTDIR" >&2
  exit 64
fi
ROOT=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$1"
OUTDIR=$(cd "$1" && pwd)
BUILD=${BUILD:-$ROOT/build-gpu-check}
JOBS=${JOBS:-$(nproc)}
BUILD_TIMEOUT=${BUILD_TIMEOUT:-240}  # seconds; the 5-minute budget assumes a 16-core machine
if [ -z "${PYTHON:-}" ]; then
  PYTHON=/opt/torch/.venv/bin/python3
  [ -x "$PYTHON" ] || PYTHON=$(command -v python3)
fi
START=$(date +%s)
STEPS="$OUTDIR/steps.tsv"
: >"$STEPS"
rm -f "$OUTDIR"/test_cuda_*.json "$OUTDIR/bench_gpu.jsonl" "$OUTDIR/python_checks.json" \
  "$OUTDIR/gpu_check.json"
exec > >(tee "$OUTDIR/gpu_check.log") 2>&1

# step NAME STATUS SECONDS DETAIL -> one line of steps.tsv (read by gpu_check.py summarize)
step() { printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" >>"$STEPS"; }
now() { date +%s; }

echo "=== gpu_check: $(date -u +%FT%TZ) on $(hostname), tree $ROOT"
echo "PYTHON=$PYTHON BUILD=$BUILD JOBS=$JOBS"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap \
  --format=csv,noheader || echo "nvidia-smi: not found"

# ------------------------------------------------------------------ toolchain
if ! command -v nvcc >/dev/null && [ -x /usr/local/cuda/bin/nvcc ]; then
  export PATH=/usr/local/cuda/bin:$PATH
fi
if [ -z "${CUDA_ARCH:-}" ]; then
  CUDA_ARCH=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -1 | tr -d '. ')
  [ -n "$CUDA_ARCH" ] || CUDA_ARCH=90
fi
echo "nvcc: $(command -v nvcc || echo 'not found'); CUDA_ARCH=$CUDA_ARCH; cmake $(cmake --version | head -1)"

# --------------------------------------------------------------- dependencies
CMAKE_ARGS=()
t0=$(now)
if compgen -G "$ROOT/.deps/debs/*.deb" >/dev/null; then
  # Unpack once per set of packages: fresh header timestamps would rebuild everything.
  sums=$(cd "$ROOT/.deps/debs" && cksum ./*.deb)
  ok=1
  if [ "$sums" != "$(cat "$ROOT/.deps/root/.debs" 2>/dev/null)" ]; then
    rm -rf "$ROOT/.deps/root" && mkdir -p "$ROOT/.deps/root"
    for deb in "$ROOT"/.deps/debs/*.deb; do
      if command -v dpkg >/dev/null; then
        dpkg -x "$deb" "$ROOT/.deps/root" || ok=0
      else  # a .deb is an ar archive holding data.tar.*
        (tmp=$(mktemp -d) && cd "$tmp" && ar x "$deb" && tar -xf data.tar.* -C "$ROOT/.deps/root" \
          && rm -rf "$tmp") || ok=0
      fi
    done
    [ $ok = 1 ] && printf '%s\n' "$sums" >"$ROOT/.deps/root/.debs"
  fi
  CMAKE_ARGS+=("-DSTRATA_DEPS_PREFIX=$ROOT/.deps/root")
  export LD_LIBRARY_PATH="$ROOT/.deps/root/usr/lib/x86_64-linux-gnu${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  step "deps (.deps/debs unpacked)" "$([ $ok = 1 ] && echo ok || echo fail)" "$(( $(now) - t0 ))" \
    "$(ls "$ROOT"/.deps/debs/*.deb | wc -l) packages in .deps/root"
else
  step "deps (.deps/debs)" "info" 0 "no .deps/debs: using the system's packages"
fi
PYBIND_DIR=$("$PYTHON" -m pybind11 --cmakedir 2>/dev/null || true)
[ -n "$PYBIND_DIR" ] && CMAKE_ARGS+=("-Dpybind11_DIR=$PYBIND_DIR")

# ---------------------------------------------------------------------- build
PKG="$BUILD/pkg"
mkdir -p "$PKG"
rm -rf "$PKG/strata" && cp -r "$ROOT/python/strata" "$PKG/strata" && rm -f "$PKG"/strata/_C*.so
configure() {  # $1: ON/OFF for the binding
  timeout 120 cmake -S "$ROOT" -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=Release \
    -DSTRATA_WITH_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES="$CUDA_ARCH" -DSTRATA_ONLY='cuda|gpu' \
    -DSTRATA_BUILD_PYTHON="$1" -DPython_EXECUTABLE="$PYTHON" -DSTRATA_PYTHON_OUT="$PKG/strata" \
    "${CMAKE_ARGS[@]}"
}
t0=$(now)
BINDING=ON
if ! configure ON; then
  echo "=== configure with the binding failed; retrying without it (Python checks will not run)"
  BINDING=OFF
  rm -f "$BUILD/CMakeCache.txt"
  configure OFF || { step "configure" fail "$(( $(now) - t0 ))" "cmake failed (see log)"; }
fi
TARGETS=(test_cuda_math test_cuda_device strata-bench-gpu)
[ $BINDING = ON ] && TARGETS+=(_C)
timeout "$BUILD_TIMEOUT" cmake --build "$BUILD" -j "$JOBS" --target "${TARGETS[@]}"
rc=$?
if [ $rc = 0 ]; then
  step "build (core, CUDA sm_$CUDA_ARCH, ${TARGETS[*]})" ok "$(( $(now) - t0 ))" \
    "binding $([ $BINDING = ON ] && echo built || echo 'not built (configure failed)')"
elif [ $rc = 124 ]; then
  step "build (core, CUDA sm_$CUDA_ARCH, ${TARGETS[*]})" fail "$(( $(now) - t0 ))" \
    "timed out after ${BUILD_TIMEOUT} s with -j $JOBS (BUILD_TIMEOUT=...; rerun continues it)"
else
  step "build (core, CUDA sm_$CUDA_ARCH, ${TARGETS[*]})" fail "$(( $(now) - t0 ))" \
    "cmake --build exit status $rc (see log)"
fi
grep -q '^STRATA_WITH_CUDA:BOOL=ON' "$BUILD/CMakeCache.txt" 2>/dev/null && \
  [ -f "$BUILD/libstrata_cuda.a" ] || step "CUDA code" fail 0 "strata_cuda was not built (nvcc missing?)"

# ----------------------------------------------------------------------- C++
for t in test_cuda_math test_cuda_device; do
  if [ -x "$BUILD/bin/$t" ]; then
    t0=$(now)
    timeout 120 "$BUILD/bin/$t" --gtest_output="json:$OUTDIR/$t.json" || true
    echo "($t: $(( $(now) - t0 )) s)"
  fi
done
if [ -x "$BUILD/bin/strata-bench-gpu" ]; then
  t0=$(now)
  if timeout 150 "$BUILD/bin/strata-bench-gpu" --json >"$OUTDIR/bench_gpu.jsonl"; then
    step "strata-bench-gpu --json" ok "$(( $(now) - t0 ))" "$(grep -c '^{' "$OUTDIR/bench_gpu.jsonl") rows"
  else
    step "strata-bench-gpu --json" fail "$(( $(now) - t0 ))" "exit status $? (see log)"
  fi
  "$PYTHON" - "$OUTDIR/bench_gpu.jsonl" <<'EOF' || true
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.startswith("{")]
for r in rows:
    print("  ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items()))
EOF
fi

# -------------------------------------------------------------------- Python
if [ $BINDING = ON ] && compgen -G "$PKG/strata/_C*.so" >/dev/null; then
  t0=$(now)
  PYTHONPATH="$PKG" timeout 240 "$PYTHON" "$ROOT/benchmarks/gpu_check.py" run --out "$OUTDIR" \
    --bench "$OUTDIR/bench_gpu.jsonl"
  rc=$?
  step "gpu_check.py run" "$([ $rc = 0 ] && echo ok || echo fail)" "$(( $(now) - t0 ))" \
    "exit status $rc"
else
  step "gpu_check.py run" "not run" 0 "the binding was not built"
fi

# ZeRO stage 3 with the model on the GPU (issue 21): CudaLanes against stage 2 on the same GPU.
if [ $BINDING = ON ] && compgen -G "$PKG/strata/_C*.so" >/dev/null; then
  if "$PYTHON" -c 'import pytest' 2>/dev/null; then
    t0=$(now)
    PYTHONPATH="$PKG" timeout 240 "$PYTHON" -m pytest -q -p no:cacheprovider \
      "$ROOT/tests/python/test_stage3_device.py" -k cuda_lanes
    rc=$?
    step "stage 3 on the GPU (CudaLanes) vs stage 2" "$([ $rc = 0 ] && echo ok || echo fail)" \
      "$(( $(now) - t0 ))" "pytest exit status $rc"
  else
    step "stage 3 on the GPU (CudaLanes) vs stage 2" "not run" 0 "pytest is not installed for $PYTHON"
  fi
fi

echo "=== gpu_check finished in $(( $(now) - START )) s"
"$PYTHON" "$ROOT/benchmarks/gpu_check.py" summarize "$OUTDIR"
exit $?
