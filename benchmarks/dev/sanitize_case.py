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
        for causal in (False, True):
            q = rng.standard_normal((1, 2, 131, 72)).astype(dt)
            k = rng.standard_normal((1, 2, 197, 72)).astype(dt)
            v = rng.standard_normal((1, 2, 197, 72)).astype(dt)
            with fc.kernel_family(fam):
                out, lse = fc.attention(q, k, v, causal=causal, return_lse=True)
                do = rng.standard_normal(out.shape).astype(dt)
                grads = fc.attention_backward(do, q, k, v, out, lse, causal=causal)
            cp.cuda.get_current_stream().synchronize()
            ok = all(bool(cp.isfinite(g.astype(np.float32)).all()) for g in (out, *grads))
            print(f"{fam} {np.dtype(dt).name} causal={causal}: {'finite' if ok else 'NON-FINITE'}")
