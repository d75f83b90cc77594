#!/usr/bin/env bash
# One device call: GPU test suite, big-memory tests, compute-sanitizer, self-check.
# Logs go to $OUT; the summary lines print last.
set -u
export CUPY_CACHE_DIR=$PWD/.cache/cupy_cache PYTHONPATH=. PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
summary=()
timeout ${TEST_TIMEOUT:-300} python3 -m pytest -q -n 8 -m "not bigmem" -p no:cacheprovider tests \
    -k "not kernel_check" > "$OUT/pytest.log" 2>&1
summary+=("pytest (gpu, -n 8): $(tail -1 "$OUT/pytest.log")")
timeout 200 python3 -m pytest -q -rA -p no:cacheprovider tests/test_torch.py \
    -k "opcheck or gradcheck or compile or graph or side_stream or zero_copy" > "$OUT/torch_tools.log" 2>&1
summary+=("pytest test_torch (opcheck/gradcheck/compile/graph/streams/zero-copy): $(tail -1 "$OUT/torch_tools.log")")
if [ "${BIGMEM:-1}" = 1 ]; then
  timeout 240 python3 -m pytest -q -m bigmem -p no:cacheprovider tests > "$OUT/bigmem.log" 2>&1
  summary+=("pytest -m bigmem: $(tail -1 "$OUT/bigmem.log")")
fi
for tool in ${SANITIZERS:-memcheck racecheck initcheck synccheck}; do
  timeout 240 compute-sanitizer --tool $tool python3 benchmarks/dev/sanitize_case.py ${FAMILIES:-generic sm80} \
      > "$OUT/sanitize_$tool.log" 2>&1
  summary+=("compute-sanitizer $tool: $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$OUT/sanitize_$tool.log" | tail -1) [$(grep -c finite "$OUT/sanitize_$tool.log") calls]")
done
python3 -m flashcupy --batch 1 --heads 16 --seqlen 4096 > "$OUT/selfcheck.log" 2>&1
tail -8 "$OUT/selfcheck.log"
grep -E "^(FAILED|ERROR)" "$OUT/pytest.log" | head -20
printf '%s\n' "${summary[@]}"
