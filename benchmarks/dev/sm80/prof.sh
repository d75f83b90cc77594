#!/usr/bin/env bash
# Nsight Compute pass over ours vs SDPA flash (prof.py); reports under $OUT.
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
cd benchmarks/dev/sm80
NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu | head -1)
F=${PROF_FILTER:-'regex:flash_fwd_kernel|flash_bwd_dq_dk_dv|fc_sm80_fwd|fc_sm80_bwd_dkdv|fc_sm80_bwd_dq'}
timeout ${PROF_TIMEOUT:-300} $NCU --set full --import-source no -k "$F" -o "$OUT/prof" -f python3 prof.py > "$OUT/ncu_run.log" 2>&1
tail -5 "$OUT/ncu_run.log"
$NCU -i "$OUT/prof.ncu-rep" --page details > "$OUT/details.txt" 2>&1
$NCU -i "$OUT/prof.ncu-rep" --page raw --csv --metrics gpu__time_duration.sum,sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_active,sm__inst_executed_pipe_lsu.avg.pct_of_peak_sustained_active,l1tex__data_pipe_lsu_wavefronts_mem_shared.avg.pct_of_peak_sustained_elapsed,smsp__issue_active.avg.pct_of_peak_sustained_active,launch__registers_per_thread > "$OUT/raw.csv" 2>&1
for k in ${PROF_SASS:-dkdvq flash_bwd fc_sm80_fwd flash_fwd}; do
  $NCU -i "$OUT/prof.ncu-rep" -k "regex:$k" --page source --csv --print-source sass > "$OUT/sass_$k.csv" 2>&1 || true
done
rm -f "$OUT/prof.ncu-rep"
ls -la $OUT
grep -E "^  [a-z_]+.*\(|Duration|Registers Per|Compute \(SM\) Throughput|Memory Throughput|Issue Slots Busy|Warp Cycles Per Issued|Achieved Occupancy" "$OUT/details.txt" | head -80
