"""Which stage carries the float32 dQ error at D=1, S=2048 (tests/test_backward)."""
import sys
import cupy as cp, numpy as np
sys.path.insert(0, "tests")
import _naive as nv
import flashcupy as fc
from flashcupy.__main__ import _gpu_reference, _gpu_reference_bwd
import hashlib
nodeid = "tests/test_backward.py::test_backward[generic-fp32-d1-full-2048x2048]"
seed = int.from_bytes(hashlib.sha256(nodeid.encode()).digest()[:4], "little")
q, k, v, do = nv.randn_many(cp, seed, [(1, 2, 2048, 1)] * 4, np.float32)
Q, K, V, DO = (x.astype(np.float64) for x in (q, k, v, do))
with fc.kernel_family("generic"):
    out, lse = fc.attention(q, k, v, return_lse=True)
    g = fc.attention_backward(do, q, k, v, out, lse)
    ro, rl = _gpu_reference(Q, K, V, False)
    rg = _gpu_reference_bwd(DO, Q, K, V, ro, rl, False)
    e = lambda a, b: float(cp.abs(a.astype(np.float64) - b).max())
    print("out err", e(out, ro), "lse err", e(lse, rl))
    print("dq err (ours)", e(g[0], rg[0]), "dk", e(g[1], rg[1]), "dv", e(g[2], rg[2]))
    g2 = fc.attention_backward(do, q, k, v, ro.astype(np.float32), lse)
    print("dq err with exact out (rounded f32)", e(g2[0], rg[0]))
    g3 = fc.attention_backward(do, q, k, v, out, rl.astype(np.float32))
    print("dq err with exact lse (rounded f32)", e(g3[0], rg[0]))
    g4 = fc.attention_backward(do, q, k, v, ro.astype(np.float32), rl.astype(np.float32))
    print("dq err with both exact", e(g4[0], rg[0]))
