#!/usr/bin/env bash
# Same-process A/B of a compile-time switch of the sm80 kernels, then Nsight Compute at
# D=$PROF_D against SDPA flash.  Build the two cubin sets first, here (no GPU):
#   python benchmarks/dev/sm80/build_cubin.py --bwd-variants
#   HARNESS_BUILD=$PWD/benchmarks/dev/sm80/build_b HARNESS_DEFINES="NAME=VALUE" \
#       python benchmarks/dev/sm80/build_cubin.py --bwd-variants
# and carry both folders (AB_BUILDS lists them; default: build only).
set -u
export CUPY_CACHE_DIR=$PWD/.cache/cupy_cache PYTHONPATH=. PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
for b in ${AB_BUILDS:-build}; do
  HARNESS_BUILD=benchmarks/dev/sm80/$b VARIANT_KINDS=${VARIANT_KINDS:-dkdvq} timeout 200 \
    python3 benchmarks/dev/sm80/harness.py --variants > "$OUT/variants_$b.log" 2>&1
  echo "== $b"; cat "$OUT/variants_$b.log"
done
if [ "${PROF:-1}" = 1 ]; then
  PROF_D=${PROF_D:-64} PROF_FILTER='regex:flash_bwd_dq_dk_dv|fc_sm80_bwd_dkdvq' PROF_MODES=atomic PROF_SASS="dkdvq flash_bwd" \
    bash benchmarks/dev/sm80/prof.sh > "$OUT/prof_summary.log" 2>&1
  grep -E "Duration|Warp Cycles Per Issued|Issue Slots|^  [a-z_]" "$OUT/prof_summary.log" | cut -c1-150 | head -30
  cd "$OUT" && tar czf prof.tgz sass_*.csv details.txt raw.csv && rm -f sass_*.csv raw.csv && cd - >/dev/null
fi
ls -la "$OUT"
