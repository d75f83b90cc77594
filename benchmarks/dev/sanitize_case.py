"""One forward and one backward call per dtype at lengths that are no multiple
of any tile, for compute-sanitizer (memcheck, racecheck, initcheck, synccheck).

    compute-sanitizer --tool memcheck python benchmarks/dev/sanitize_case.py [family ...]
"""
import sys

import cupy as cp
import ml_dtypes
import numpy as np

import flashcupy as fc

families = sys.argv[1:] or ["generic"]
rng = cp.random.default_rng(0)
for fam in families:
    for dt in (np.float16, ml_dtypes.bfloat16, np.float32, np.float64):
        if fam not in fc.families_for(dt):
            continue
        # sm80: both backward paths (atomic dQ by default, the kernel pair when
        # deterministic) and two head-dim buckets (their tiles differ)
        dets = (False, True) if fam != "generic" else (False,)
        dims = (72, 40) if fam != "generic" else (72,)
        for causal in (False, True):
            for d in dims:
                for det in dets:
                    q = rng.standard_normal((1, 2, 131, d)).astype(dt)
                    k = rng.standard_normal((1, 2, 197, d)).astype(dt)
                    v = rng.standard_normal((1, 2, 197, d)).astype(dt)
                    with fc.kernel_family(fam):
                        out, lse = fc.attention(q, k, v, causal=causal, return_lse=True)
                        do = rng.standard_normal(out.shape).astype(dt)
                        grads = fc.attention_backward(do, q, k, v, out, lse, causal=causal,
                                                      deterministic=det)
                    cp.cuda.get_current_stream().synchronize()
                    ok = all(bool(cp.isfinite(g.astype(np.float32)).all()) for g in (out, *grads))
                    print(f"{fam} {np.dtype(dt).name} d={d} causal={causal} deterministic={det}: "
                          f"{'finite' if ok else 'NON-FINITE'}")
