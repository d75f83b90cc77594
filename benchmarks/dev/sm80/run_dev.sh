#!/usr/bin/env bash
# One device call for sm80 kernel work: harness correctness (quick) + timing beside
# SDPA flash, then (PROF=1) the Nsight Compute pass of prof.sh.  Logs under $OUT.
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
H=benchmarks/dev/sm80/harness.py
timeout ${CHECK_TIMEOUT:-200} python3 $H --quick --no-bench > "$OUT/check.log" 2>&1
grep -E "FAIL|failures" "$OUT/check.log" | tail -5
timeout ${BENCH_TIMEOUT:-240} python3 $H --no-check > "$OUT/bench.log" 2>&1
cat "$OUT/bench.log" | tail -14
if [ "${PROF:-0}" = 1 ]; then bash benchmarks/dev/sm80/prof.sh > "$OUT/prof_summary.log" 2>&1; grep -E "Duration|^  void" "$OUT/prof_summary.log" | cut -c1-120; fi
if [ "${FWDVAR:-0}" = 1 ]; then timeout 300 python3 $H --fwd-variants --no-check > "$OUT/fwdvar.log" 2>&1; tail -26 "$OUT/fwdvar.log"; fi
