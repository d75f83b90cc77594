#!/usr/bin/env bash
# One device call while iterating on kernels: tile variants (harness), the GPU suite,
# and the quick benchmark against SDPA flash.  Logs under $OUT; summary last.
set -u
export CUPY_CACHE_DIR=$PWD/.cache/cupy_cache PYTHONPATH=. PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
if [ -n "${FWD_VAR_D:-}" ]; then
  FWD_VAR_D=$FWD_VAR_D timeout 200 python3 benchmarks/dev/sm80/harness.py --fwd-variants --no-check > "$OUT/fwdvar.log" 2>&1
fi
if [ "${TESTS:-1}" = 1 ]; then
  timeout ${TEST_TIMEOUT:-330} python3 -m pytest -q -n 16 -m "not bigmem" -p no:cacheprovider tests \
      -k "not kernel_check" > "$OUT/pytest.log" 2>&1
fi
timeout ${BENCH_TIMEOUT:-200} python3 benchmarks/bench_attention.py --quick --causal 0 1 --mode fwd bwd \
   --providers flashcupy sdpa-flash --time-limit ${BENCH_LIMIT:-150} --out "$OUT/results.json" --no-plot \
   > "$OUT/bench.txt" 2>"$OUT/bench.err"
tail -40 "$OUT/bench.txt"
tail -14 "$OUT/fwdvar.log" 2>/dev/null
grep -E "^(FAILED|ERROR)" "$OUT/pytest.log" 2>/dev/null | head -20
tail -1 "$OUT/pytest.log" 2>/dev/null
