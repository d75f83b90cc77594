#!/usr/bin/env bash
# Session 3 device call: GPU suite, host overhead, per-kernel backward breakdown
# beside SDPA flash; new CuPy cache entries come back as cache_new.tgz.
set -u
export CUPY_CACHE_DIR=$PWD/.cache/cupy_cache PYTHONPATH=. PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"; touch /tmp/t0
if [ "${TESTS:-1}" = 1 ]; then
  timeout ${TEST_TIMEOUT:-330} python3 -m pytest -q -n 16 -m "not bigmem" -p no:cacheprovider tests \
      -k "${TEST_K:-not kernel_check}" > "$OUT/pytest.log" 2>&1
  grep -E "^(FAILED|ERROR)" "$OUT/pytest.log" | head -30; tail -2 "$OUT/pytest.log"
fi
if [ "${OVERHEAD:-1}" = 1 ]; then
  timeout 90 python3 benchmarks/bench_overhead.py --mode fwd bwd --out "$OUT/overhead.json" > "$OUT/overhead.txt" 2>&1
  tail -11 "$OUT/overhead.txt"
fi
if [ "${BREAKDOWN:-1}" = 1 ]; then
  timeout ${BD_TIMEOUT:-150} python3 benchmarks/dev/breakdown.py ${BD_ARGS:-} > "$OUT/breakdown.txt" 2>&1
  cat "$OUT/breakdown.txt" | grep -v "^ *$" | tail -90
fi
if [ -n "${EXTRA:-}" ]; then bash -c "$EXTRA"; fi
find .cache/cupy_cache -newer /tmp/t0 -type f | tar czf "$OUT/cache_new.tgz" -T - 2>/dev/null
ls -la "$OUT"
