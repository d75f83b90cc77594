#!/usr/bin/env bash
# A/B of the dK/dV+dQ kernel's Q/dO layout (swizzled vs padded; dev cubins in build/ and
# build_pad/), then Nsight Compute at D=$PROF_D against SDPA flash.
set -u
export CUPY_CACHE_DIR=$PWD/.cache/cupy_cache PYTHONPATH=. PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
for lay in swz pad; do
  if [ $lay = pad ]; then export HARNESS_BUILD=benchmarks/dev/sm80/build_pad FC_SM80_SWZ_QDO=0; fi
  VARIANT_KINDS=dkdvq timeout 200 python3 benchmarks/dev/sm80/harness.py --variants > "$OUT/variants_$lay.log" 2>&1
  echo "== $lay"; cat "$OUT/variants_$lay.log"
done
unset HARNESS_BUILD FC_SM80_SWZ_QDO
if [ "${PROF:-1}" = 1 ]; then
  PROF_D=${PROF_D:-64} PROF_FILTER='regex:flash_bwd_dq_dk_dv|fc_sm80_bwd_dkdvq' PROF_MODES=atomic PROF_SASS="dkdvq flash_bwd" \
    bash benchmarks/dev/sm80/prof.sh > "$OUT/prof_summary.log" 2>&1
  grep -E "Duration|Warp Cycles Per Issued|Issue Slots|^  [a-z_]" "$OUT/prof_summary.log" | cut -c1-150 | head -30
  cd "$OUT" && tar czf prof.tgz sass_*.csv details.txt raw.csv && rm -f sass_*.csv raw.csv && cd - >/dev/null
fi
ls -la "$OUT"
