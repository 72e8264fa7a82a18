#!/usr/bin/env bash
# GPU check for jaxq's Pallas kernels: compiled-kernel tests, then the benchmark.
#
# Runs on the device machine (JAX 0.11 + CUDA, Python 3.12, nothing installable)
# from the repository root with no `pip install`: jaxq is imported through
# PYTHONPATH. Logs and the benchmark JSON go to $OUT (default /tmp/jaxq_device_out).
# Stays under 8 minutes: every step has its own `timeout`, and the benchmark
# streams its rows, so a cut-off run still leaves the cells it finished.
#
#   bash scripts/device_check.sh            # everything
#   BENCH_ARGS="--sizes 4096" bash scripts/device_check.sh   # smaller benchmark
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/jaxq_device_out}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY="${PYTHON:-python3}"
TEST_TIMEOUT="${TEST_TIMEOUT:-150}"
BENCH_TIMEOUT="${BENCH_TIMEOUT:-270}"
start=$(date +%s)

{
  echo "== device"
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1 || echo "nvidia-smi unavailable"
  "$PY" - <<'PYEOF'
import sys
import jax
print("python", sys.version.split()[0], "| jax", jax.__version__, "| backend", jax.default_backend())
for d in jax.devices():
    print("device:", d.device_kind, d)
try:
    from jax.experimental.pallas import triton as plt
    print("pallas triton:", [n for n in ("CompilerParams", "TritonCompilerParams") if hasattr(plt, n)])
except Exception as e:
    print("pallas triton import failed:", type(e).__name__, e)
import jaxq.kernels  # bare import must work with jax/flax/optax/numpy only
mods = [m for m in ("yaml", "tqdm", "chex", "matplotlib", "sklearn", "qwix") if m in sys.modules]
print("jaxq.kernels imported; optional modules pulled in:", mods or "none")
PYEOF
} 2>&1 | tee "$OUT/env.log"

echo "== kernel tests (compiled on this backend; timeout ${TEST_TIMEOUT}s)"
# Memory grows on demand, so the tests do not reserve 75% of the GPU.
XLA_PYTHON_CLIENT_PREALLOCATE=false timeout "$TEST_TIMEOUT" "$PY" -m pytest -q -rs -p no:cacheprovider \
  tests/test_kernels.py --durations=10 2>&1 | tee "$OUT/tests.log"
echo "tests exit code: ${PIPESTATUS[0]}" | tee -a "$OUT/tests.log"

echo "== benchmark (timeout ${BENCH_TIMEOUT}s)"
timeout "$BENCH_TIMEOUT" "$PY" benchmarks/kernels.py --json "$OUT/bench.json" ${BENCH_ARGS:-} 2>&1 | tee "$OUT/bench.log"
echo "benchmark exit code: ${PIPESTATUS[0]}" | tee -a "$OUT/bench.log"

echo "== done in $(( $(date +%s) - start ))s; logs in $OUT"
