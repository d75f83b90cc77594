"""Quick GPU smoke check of the public API against a float64 reference (dev use)."""
import math, sys, time
import numpy as np, cupy as cp, ml_dtypes
import flashcupy as fc
from flashcupy.__main__ import _gpu_reference, _gpu_reference_bwd

rng = cp.random.default_rng(1)
fails = 0
def rel(a, b):
    return float(cp.max(cp.abs(a.astype(np.float64) - b)) / (cp.max(cp.abs(b)) + 1e-30))

def case(dt, qs, ks, vs, causal, fam="generic", tol=None):
    global fails
    q64, k64, v64 = rng.standard_normal(qs), rng.standard_normal(ks), rng.standard_normal(vs)
    q, k, v = (x.astype(dt) for x in (q64, k64, v64))
    q64, k64, v64 = (x.astype(np.float64) for x in (q, k, v))
    with fc.kernel_family(fam):
        out, lse = fc.attention(q, k, v, causal=causal, return_lse=True)
        do64 = rng.standard_normal(out.shape); do = do64.astype(dt); do64 = do.astype(np.float64)
        dq, dk, dv = fc.attention_backward(do, q, k, v, out, lse, causal=causal)
    bq, bk, bv = np.broadcast_shapes(qs[:-2], ks[:-2], vs[:-2]), None, None
    Q, K, V = (cp.broadcast_to(x, tuple(np.broadcast_shapes(qs[:-2], ks[:-2], vs[:-2])) + x.shape[-2:]) for x in (q64, k64, v64))
    ro, rl = _gpu_reference(Q, K, V, causal)
    rdq, rdk, rdv = _gpu_reference_bwd(do64, Q, K, V, ro, rl, causal)
    def red(g, shape):
        nb = len(g.shape) - len(shape)
        g = g.sum(axis=tuple(range(nb))) if nb else g
        axes = tuple(i for i, (a, b) in enumerate(zip(g.shape, shape)) if b == 1 and a != 1)
        return g.sum(axis=axes, keepdims=True) if axes else g
    rdq, rdk, rdv = red(rdq, qs), red(rdk, ks), red(rdv, vs)
    errs = [rel(out, ro), float(cp.max(cp.abs(lse - rl))), rel(dq, rdq), rel(dk, rdk), rel(dv, rdv)]
    tol = tol or {np.float64: 1e-10, np.float32: 1e-4}.get(np.dtype(dt).type, 3e-2)
    ok = all(e < tol for e in errs) and not any(math.isnan(e) for e in errs)
    fails += not ok
    print(f"{fam:8} {np.dtype(dt).name:9} q{qs} k{ks} v{vs} causal={causal}: "
          + " ".join(f"{e:.1e}" for e in errs) + ("" if ok else "  FAIL"), flush=True)

for fam in sys.argv[1:] or ["generic"]:
    for dt in [np.float32, np.float64, np.float16, ml_dtypes.bfloat16]:
        if fam not in fc.families_for(dt):
            continue
        for d in [8, 59, 64, 128, 256]:
            for causal in [False, True]:
                case(dt, (2, 3, 100, d), (2, 3, 77, d), (2, 3, 77, d), causal, fam)
    case(np.float32, (2, 8, 65, 64), (2, 1, 130, 64), (2, 1, 130, 32), True, fam)  # MQA, Dv != D
    case(np.float32, (2, 2, 4, 33, 64), (2, 2, 1, 40, 64), (2, 2, 1, 40, 64), False, fam)  # GQA
    case(np.float32, (1, 4, 33, 64), (3, 4, 40, 64), (3, 4, 40, 64), False, fam)  # q broadcast
    case(np.float32, (3, 1, 33, 64), (3, 4, 40, 64), (1, 4, 40, 64), False, fam)  # mixed
    case(np.float32, (70000, 2, 16), (70000, 2, 16), (70000, 2, 16), True, fam)  # > 65535 batch
print("FAILS", fails)
