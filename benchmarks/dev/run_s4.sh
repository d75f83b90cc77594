#!/usr/bin/env bash
# Session 4 device call: GPU suite, harness A/B of the dK/dV tiles (VARIANT_KINDS),
# a backward benchmark beside SDPA flash; new CuPy cache entries come back as
# cache_new.tgz.  Build the harness cubins here first (no GPU):
#   python benchmarks/dev/sm80/build_cubin.py --bwd-variants
set -u
export CUPY_CACHE_DIR=$PWD/.cache/cupy_cache PYTHONPATH=. PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"; touch /tmp/t0
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm --format=csv,noheader
if [ "${TESTS:-1}" = 1 ]; then
  timeout ${TEST_TIMEOUT:-330} python3 -m pytest -q -n 16 -m "not bigmem" -p no:cacheprovider tests \
      -k "${TEST_K:-not kernel_check}" > "$OUT/pytest.log" 2>&1
  grep -E "^(FAILED|ERROR)" "$OUT/pytest.log" | head -30; tail -2 "$OUT/pytest.log"
fi
if [ "${VARIANTS:-1}" = 1 ]; then
  VARIANT_KINDS=${VARIANT_KINDS:-dkdvq} timeout ${VAR_TIMEOUT:-200} \
    python3 benchmarks/dev/sm80/harness.py --variants > "$OUT/variants.log" 2>&1
  cat "$OUT/variants.log"
fi
if [ "${BENCH:-1}" = 1 ]; then
  timeout ${BENCH_TIMEOUT:-240} python3 benchmarks/bench_attention.py --quick --causal 0 1 \
    --mode ${BENCH_MODES:-bwd} --providers flashcupy sdpa-flash --no-plot --no-memory \
    --time-limit ${BENCH_LIMIT:-200} --out "$OUT/results.json" > "$OUT/bench.txt" 2>&1
  grep -v "^ *$" "$OUT/bench.txt" | tail -${BENCH_TAIL:-40}
fi
if [ -n "${EXTRA:-}" ]; then bash -c "$EXTRA"; fi
find .cache/cupy_cache -newer /tmp/t0 -type f | tar czf "$OUT/cache_new.tgz" -T - 2>/dev/null
ls -la "$OUT"
