#!/usr/bin/env bash
# One device call: benchmarks (issue figures) and the training example.
set -u
export CUPY_CACHE_DIR=$PWD/.cache/cupy_cache PYTHONPATH=. PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
timeout 200 python3 benchmarks/bench_dtypes.py --out "$OUT/dtypes.json" > "$OUT/dtypes.txt" 2>"$OUT/dtypes.err"
timeout 60 python3 benchmarks/bench_overhead.py --mode fwd bwd --out "$OUT/overhead.json" > "$OUT/overhead.txt" 2>"$OUT/overhead.err"
if [ "${EXAMPLE:-1}" = 1 ]; then
  timeout 240 python3 examples/train_tiny_gpt.py --steps ${STEPS:-200} > "$OUT/train.txt" 2>&1
fi
timeout ${BENCH_TIMEOUT:-300} python3 benchmarks/bench_attention.py --quick --causal 0 1 --mode fwd bwd \
   --time-limit ${BENCH_LIMIT:-240} --out "$OUT/results.json" --plot "$OUT/attention.png" \
   > "$OUT/bench.txt" 2>"$OUT/bench.err"
tail -25 "$OUT/train.txt" 2>/dev/null; tail -30 "$OUT/dtypes.txt"; tail -20 "$OUT/overhead.txt"
tail -60 "$OUT/bench.txt"
