#!/usr/bin/env python
"""Where the host time of a small call goes: cProfile over many calls.

B=1, H=1, S=128, D=64, bf16 (bench_overhead.py's shape).  Prints the host time
per call without the profiler, then the top functions by own time, for
fc.attention, fc.attention_backward and, when PyTorch with CUDA is installed,
flashcupy.torch forward (no grad), its custom ops and the autograd backward.

    python benchmarks/profile_host.py

Exit status 2 when no GPU is available.
"""
from __future__ import annotations

import cProfile
import io
import os
import pstats
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _timing as T  # noqa: E402


def prof(name, fn, n=3000):
    for _ in range(200):
        fn()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    plain = (time.perf_counter() - t0) / n * 1e6
    pr = cProfile.Profile()
    pr.enable()
    for _ in range(n):
        fn()
    pr.disable()
    s = io.StringIO()
    pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(18)
    print(f"===== {name}: {plain:.1f} us/call host (no profiler)")
    print("\n".join(s.getvalue().splitlines()[6:30]))


def main():
    if len(sys.argv) > 1:  # --help, or anything: there are no options
        print(__doc__)
        return
    T.require_gpu()
    import cupy as cp
    import ml_dtypes
    import numpy as np

    import flashcupy as fc

    bf = np.dtype(ml_dtypes.bfloat16)
    q, k, v, do = (cp.random.standard_normal((1, 1, 128, 64), dtype=cp.float32).astype(bf)
                   for _ in range(4))
    out, lse = fc.attention(q, k, v, return_lse=True)
    prof("fc.attention", lambda: fc.attention(q, k, v))
    prof("fc.attention_backward", lambda: fc.attention_backward(do, q, k, v, out, lse))
    torch, why_not = T.try_import_torch()
    if torch is None:
        print(f"(no flashcupy.torch rows: {why_not})")
        return
    import flashcupy.torch as fct

    tq, tk, tv = (torch.randn(1, 1, 128, 64, device="cuda", dtype=torch.bfloat16)
                  for _ in range(3))
    with torch.no_grad():
        prof("flashcupy.torch.attention (no grad)", lambda: fct.attention(tq, tk, tv))
        prof("torch.ops.flashcupy.attention_fwd", lambda: torch.ops.flashcupy.attention_fwd(
            tq, tk, tv, False, None))
    for t in (tq, tk, tv):
        t.requires_grad_(True)
    o = fct.attention(tq, tk, tv)
    tdo = torch.randn_like(o)
    prof("flashcupy.torch autograd.grad", lambda: torch.autograd.grad(
        o, (tq, tk, tv), tdo, retain_graph=True), n=1000)
    o2, l2 = torch.ops.flashcupy.attention_fwd(tq.detach(), tk.detach(), tv.detach(), False, None)
    prof("torch.ops.flashcupy.attention_bwd", lambda: torch.ops.flashcupy.attention_bwd(
        tdo, tq.detach(), tk.detach(), tv.detach(), o2, l2, False, None, False), n=1000)
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
