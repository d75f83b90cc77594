#!/usr/bin/env bash
# One device call: benchmarks (issue figures) and the training example.
# Eight files at most come back from $OUT: stderr of every step goes to errors.log.
set -u
export CUPY_CACHE_DIR=$PWD/.cache/cupy_cache PYTHONPATH=. PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
E="$OUT/errors.log"
timeout 200 python3 benchmarks/bench_dtypes.py > "$OUT/dtypes.txt" 2>>"$E"
timeout 60 python3 benchmarks/bench_overhead.py --mode fwd bwd > "$OUT/overhead.txt" 2>>"$E"
if [ "${EXAMPLE:-1}" = 1 ]; then
  timeout 240 python3 examples/train_tiny_gpt.py --steps ${STEPS:-200} > "$OUT/train.txt" 2>&1
fi
timeout ${BENCH_TIMEOUT:-300} python3 benchmarks/bench_attention.py --quick --causal 0 1 --mode fwd bwd \
   --time-limit ${BENCH_LIMIT:-240} --out "$OUT/results.json" --plot "$OUT/attention.png" \
   > "$OUT/bench.txt" 2>>"$E"
tail -25 "$OUT/train.txt" 2>/dev/null; tail -30 "$OUT/dtypes.txt"; tail -20 "$OUT/overhead.txt"
tail -60 "$OUT/bench.txt"
