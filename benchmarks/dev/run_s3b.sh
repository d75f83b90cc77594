#!/usr/bin/env bash
# Session 3, second kind of device call: dK/dV+dQ tile/order variants (harness, dev cubins),
# host profile, host overhead, then Nsight Compute on ours vs SDPA flash at D=$PROF_D.
set -u
export CUPY_CACHE_DIR=$PWD/.cache/cupy_cache PYTHONPATH=. PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"; touch /tmp/t0
if [ "${VARIANTS:-1}" = 1 ]; then
  VARIANT_KINDS=dkdvq timeout 240 python3 benchmarks/dev/sm80/harness.py --variants > "$OUT/variants.log" 2>&1
  cat "$OUT/variants.log"
fi
if [ "${HOSTPROF:-1}" = 1 ]; then
  timeout 120 python3 benchmarks/dev/host_profile.py > "$OUT/host_profile.txt" 2>&1
  grep -E "=====" "$OUT/host_profile.txt"
fi
if [ "${OVERHEAD:-1}" = 1 ]; then
  timeout 120 python3 benchmarks/bench_overhead.py --mode fwd bwd --repeats 15 --out "$OUT/overhead.json" > "$OUT/overhead.txt" 2>&1
  tail -11 "$OUT/overhead.txt"
fi
if [ "${PROF:-1}" = 1 ]; then
  PROF_FILTER='regex:flash_bwd_dq_dk_dv|fc_sm80_bwd_dkdvq' PROF_MODES=atomic PROF_SASS="dkdvq flash_bwd" \
    bash benchmarks/dev/sm80/prof.sh > "$OUT/prof_summary.log" 2>&1
  grep -E "Duration|Warp Cycles Per Issued|Issue Slots|^  [a-z_]" "$OUT/prof_summary.log" | cut -c1-150 | head -30
  cd "$OUT" && tar czf prof.tgz sass_*.csv details.txt raw.csv && rm -f sass_*.csv && cd - >/dev/null
fi
find .cache/cupy_cache -newer /tmp/t0 -type f | tar czf "$OUT/cache_new.tgz" -T - 2>/dev/null
ls -la "$OUT"
