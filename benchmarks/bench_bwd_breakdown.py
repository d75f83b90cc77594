#!/usr/bin/env python
"""Per-kernel time of one attention_backward call, beside SDPA flash.

Replays each step of the cached backward plan alone (benchmarks/_timing.py's
do_bench: CUDA events, L2 flushed before each rep) so the bandwidth kernels
(delta, memset, dQ convert) and the main kernel show up separately; then the
whole call, the same call with deterministic=True (and its extra time), and
SDPA's FlashAttention backend's backward when PyTorch with CUDA is installed.
bf16, batch*S = 16k, H*D = 2048 (the bench_attention.py setup).  It replays
flashcupy's internal plan (flashcupy.api.cached_plan), so it follows that
module's internals.

    python benchmarks/bench_bwd_breakdown.py
    python benchmarks/bench_bwd_breakdown.py --s 1024 4096 --d 64 128 --causal 0
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _timing as T  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog="Exit status 2 when no GPU is available.")
    p.add_argument("--s", type=int, nargs="+", default=[1024, 4096, 16384])
    p.add_argument("--d", type=int, nargs="+", default=[64, 128])
    p.add_argument("--causal", type=int, nargs="+", default=[0, 1])
    a = p.parse_args()
    T.require_gpu()
    import cupy as cp

    import flashcupy as fc
    from flashcupy import api

    torch, why_not = T.try_import_torch()
    if torch is None:
        print(f"(no sdpa-flash rows: {why_not})")

    dt = T.dtype_from_name("bf16")
    print(f"{'D':>4} {'S':>6} {'c':>2}  {'step':<44} {'us':>9}  {'GB/s or TF/s':>12}")
    for d in a.d:
        for s in a.s:
            for causal in a.causal:
                b, h = 16384 // s, 2048 // d
                shape = (b, h, s, d)
                q, k, v, do = (T.randn(shape, dt) for _ in range(4))
                out, lse = fc.attention(q, k, v, causal=bool(causal), return_lse=True)
                fc.attention_backward(do, q, k, v, out, lse, causal=bool(causal))
                plan = api.cached_plan("bwd", (do, q, k, v, out, lse), bool(causal), None)
                env = {"dout": do, "q": q, "k": k, "v": v, "o": out, "lse": lse,
                       "dq_out": cp.empty_like(q), "dk_out": cp.empty_like(k),
                       "dv_out": cp.empty_like(v)}
                plan.run(env)  # fills env with the workspaces
                stream = cp.cuda.get_current_stream().ptr
                flops = T.attention_flops(b, h, s, s, d, bool(causal), "bwd")
                total = 0.0
                for st in plan.steps:
                    if st[0] == "launch":
                        lau = st[1]
                        ms = T.do_bench(lambda: lau.run(env, stream), rep_ms=60).ms
                        name = lau.name.split("<")[0].replace("fc_", "")
                    elif st[0] == "zero":
                        x = env[st[1]]
                        ms = T.do_bench(lambda: cp.cuda.runtime.memsetAsync(
                            x.data.ptr, 0, x.nbytes, stream), rep_ms=60).ms
                        name = f"memset {st[1]} ({x.nbytes / 2**20:.0f} MiB)"
                    else:
                        continue
                    total += ms
                    print(f"{d:>4} {s:>6} {causal:>2}  {name:<44} {ms * 1e3:>9.1f}")
                ms = T.do_bench(lambda: fc.attention_backward(do, q, k, v, out, lse,
                                                              causal=bool(causal)), rep_ms=100).ms
                print(f"{d:>4} {s:>6} {causal:>2}  {'sum of steps':<44} {total * 1e3:>9.1f}"
                      f"  {T.tflops(flops, total):>9.1f} TF")
                print(f"{d:>4} {s:>6} {causal:>2}  {'attention_backward':<44} {ms * 1e3:>9.1f}"
                      f"  {T.tflops(flops, ms):>9.1f} TF")
                ms_det = T.do_bench(lambda: fc.attention_backward(
                    do, q, k, v, out, lse, causal=bool(causal), deterministic=True), rep_ms=100).ms
                print(f"{d:>4} {s:>6} {causal:>2}  {'attention_backward deterministic=True':<44} "
                      f"{ms_det * 1e3:>9.1f}  {T.tflops(flops, ms_det):>9.1f} TF "
                      f"(cost {100 * (ms_det / ms - 1):.0f} %)")
                if torch is not None:
                    _sdpa_flash_backward(torch, q, k, v, do, causal, flops, f"{d:>4} {s:>6} {causal:>2}")
                T.free_gpu_memory()


def _sdpa_flash_backward(torch, q, k, v, do, causal, flops, prefix):
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    tq, tk, tv = (torch.from_dlpack(x).detach().requires_grad_() for x in (q, k, v))
    tdo = torch.from_dlpack(do)
    with T.torch_on_cupy_stream(), sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        to = F.scaled_dot_product_attention(tq, tk, tv, is_causal=bool(causal))
        ms = T.do_bench(lambda: torch.autograd.grad(to, (tq, tk, tv), tdo,
                                                    retain_graph=True), rep_ms=100).ms
    print(f"{prefix}  {'sdpa-flash backward':<44} {ms * 1e3:>9.1f}"
          f"  {T.tflops(flops, ms):>9.1f} TF", flush=True)


if __name__ == "__main__":
    main()
