#!/usr/bin/env python
"""Host overhead per call at a tiny shape (B=1, H=1, S=128, D=64, bf16).

For each provider:
  (a) GPU time per call: a spin kernel holds the stream while the host enqueues
      N calls behind it, so once it ends the calls run back to back with no
      host gaps; CUDA events bracket the N calls (recorded after the spin).
  (b) wall time per call: host clock around N calls with one synchronize at
      the end (host-bound at this size).
  overhead = (b) - (a), in microseconds: the host cost the GPU does not hide.

Providers: flashcupy (fc.attention on CuPy arrays), flashcupy.torch.attention
on torch tensors (if that module imports), torch SDPA (default dispatch and
flash forced), and an empty CuPy RawKernel as the launch floor.

    python benchmarks/bench_overhead.py
    python benchmarks/bench_overhead.py --mode fwd bwd --n 500
    python benchmarks/bench_overhead.py --mode step --b 32 --h 4 --s 256 --causal 1

Modes: fwd (no autograd), bwd (the backward of a saved forward; autograd.grad
for PyTorch providers), step (forward + backward through autograd, a training
step's attention).  The host figures drift with CPU clocks and scheduling, so
--rounds measures every provider in turn, several times over, and reports the
median of the rounds with the ratio to SDPA's default taken within each round.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _timing as T  # noqa: E402

PROVIDERS = ["empty-rawkernel", "flashcupy", "flashcupy.torch", "sdpa-default", "sdpa-flash"]

_SPIN_SRC = r"""
extern "C" __global__ void fc_bench_spin(unsigned long long ns) {
  unsigned long long t0, t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t0));
  do { asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t)); } while (t - t0 < ns);
}
extern "C" __global__ void fc_bench_empty() {}
"""
_module = None


def _kernels():
    global _module
    import cupy

    if _module is None:
        _module = cupy.RawModule(code=_SPIN_SRC)
    return _module.get_function("fc_bench_spin"), _module.get_function("fc_bench_empty")


def gpu_us_per_call(fn, n, spin_ms):
    """(a): events around n back-to-back calls queued behind a spin kernel.

    Returns (us per call, host issue time in ms).  If the host took longer to
    issue the n calls than the spin lasted, the GPU may have idled in between;
    the caller retries with a longer spin.
    """
    import cupy
    import numpy as np

    spin, _ = _kernels()
    stream = cupy.cuda.get_current_stream()
    e0, e1 = cupy.cuda.Event(), cupy.cuda.Event()
    stream.synchronize()
    spin((1,), (1,), (np.uint64(int(spin_ms * 1e6)),))  # on the current stream
    e0.record(stream)
    h0 = time.perf_counter()
    for _ in range(n):
        fn()
    issue_ms = (time.perf_counter() - h0) * 1e3
    e1.record(stream)
    e1.synchronize()
    return cupy.cuda.get_elapsed_time(e0, e1) * 1e3 / n, issue_ms


def wall_us_per_call(fn, n):
    """(b): host clock around n calls, one synchronize at the end."""
    T.synchronize()
    h0 = time.perf_counter()
    for _ in range(n):
        fn()
    T.synchronize()
    return (time.perf_counter() - h0) * 1e6 / n


def measure(fn, n, repeats):
    # Warm up: compile, allocator caches, autotuning.
    for _ in range(max(10, n // 10)):
        fn()
    T.synchronize()
    spin_ms = 20.0
    gpu, wall, gaps = [], [], False
    for _ in range(repeats):
        for _attempt in range(4):
            g, issue_ms = gpu_us_per_call(fn, n, spin_ms)
            if issue_ms < 0.8 * spin_ms:
                break
            spin_ms = 2.0 * issue_ms + 5.0
        else:
            gaps = True  # could not out-wait the host; (a) is an upper bound
        gpu.append(g)
        wall.append(wall_us_per_call(fn, n))
    g, w = statistics.median(gpu), statistics.median(wall)
    return {"gpu_us": g, "wall_us": w, "overhead_us": w - g, "gaps": gaps,
            "gpu_us_all": gpu, "wall_us_all": wall}


def make(provider, args, libs, mode):
    """Returns (fn, ctx) for one call of ``provider``."""
    shape = (args.b, args.h, args.s, args.d)
    causal = bool(args.causal)
    if provider == "empty-rawkernel":
        if mode != "fwd":
            raise NotImplementedError("floor is one launch; no bwd")
        _, empty = _kernels()
        return (lambda: empty((1,), (32,), ())), contextlib.nullcontext()
    if provider == "flashcupy":
        fc, why = libs["flashcupy"]
        if fc is None:
            raise ImportError(why)
        dt = T.dtype_from_name(args.dtype)
        q, k, v = (T.randn(shape, dt) for _ in range(3))
        if mode == "fwd":
            return (lambda: fc.attention(q, k, v, causal=causal)), contextlib.nullcontext()
        out, lse = fc.attention(q, k, v, causal=causal, return_lse=True)
        do = T.randn(shape, dt)
        if mode == "step":
            def step():
                o, s = fc.attention(q, k, v, causal=causal, return_lse=True)
                return fc.attention_backward(do, q, k, v, o, s, causal=causal)
            return step, contextlib.nullcontext()
        return ((lambda: fc.attention_backward(do, q, k, v, out, lse, causal=causal)),
                contextlib.nullcontext())
    torch, why = libs.get("torch", (None, "torch not requested"))
    if torch is None:
        raise ImportError(why)
    dt = T.torch_dtype_from_name(args.dtype)
    grad = mode in ("bwd", "step")
    q, k, v = (torch.randn(shape, device="cuda", dtype=dt, requires_grad=grad)
               for _ in range(3))
    if provider == "flashcupy.torch":
        fct, why = libs["flashcupy.torch"]
        if fct is None:
            raise ImportError(why)
        f = lambda: fct.attention(q, k, v, causal=causal)  # noqa: E731
        ctx_f = T.torch_on_cupy_stream
    elif provider.startswith("sdpa"):
        import torch.nn.functional as F
        from torch.nn.attention import SDPBackend, sdpa_kernel

        f = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal)  # noqa: E731

        @contextlib.contextmanager
        def ctx_f():
            with T.torch_on_cupy_stream():
                if provider == "sdpa-flash":
                    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                        yield
                else:
                    yield
    else:
        raise ValueError(provider)
    if mode == "fwd":
        @contextlib.contextmanager
        def ctx():
            with ctx_f(), torch.no_grad():
                yield
        return f, ctx()
    with ctx_f():
        out = f()
        do = torch.randn_like(out)
    if mode == "step":
        return (lambda: torch.autograd.grad(f(), (q, k, v), do)), ctx_f()
    return (lambda: torch.autograd.grad(out, (q, k, v), do, retain_graph=True)), ctx_f()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Exit status 2 when no GPU is available.")
    p.add_argument("--providers", nargs="+", choices=PROVIDERS, default=PROVIDERS)
    p.add_argument("--mode", nargs="+", choices=["fwd", "bwd", "step"], default=["fwd"],
                   help="bwd: attention_backward / autograd.grad of a saved forward; "
                        "step: forward + backward")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32", "fp64"], default="bf16")
    p.add_argument("--b", type=int, default=1)
    p.add_argument("--h", type=int, default=1)
    p.add_argument("--s", type=int, default=128)
    p.add_argument("--d", type=int, default=64)
    p.add_argument("--causal", type=int, choices=[0, 1], default=0)
    p.add_argument("--n", type=int, default=100,
                   help="calls per measurement (keep n x launches per call under ~1000, the "
                        "launch queue depth, or (a) is flagged)")
    p.add_argument("--repeats", type=int, default=7,
                   help="measurements per round; the median is kept")
    p.add_argument("--rounds", type=int, default=3,
                   help="passes over all providers; the median over rounds is shown")
    p.add_argument("--out", default="bench_out/overhead.json", help="JSON path")
    args = p.parse_args(argv)
    T.require_gpu()

    libs = {"flashcupy": T.try_import_flashcupy()}
    if any(x.startswith("sdpa") or x == "flashcupy.torch" for x in args.providers):
        libs["torch"] = T.try_import_torch()
    if "flashcupy.torch" in args.providers:
        if libs["torch"][0] is None:
            libs["flashcupy.torch"] = (None, libs["torch"][1])
        else:
            try:
                import flashcupy.torch as fct

                libs["flashcupy.torch"] = (fct, None)
            except Exception as e:  # noqa: BLE001
                libs["flashcupy.torch"] = (None, f"flashcupy.torch not importable "
                                                 f"({type(e).__name__}: {e})")
    env = T.environment()
    method = (f"(a) CUDA events around {args.n} calls queued behind a globaltimer spin kernel "
              f"(no host gaps); (b) perf_counter around {args.n} calls, one synchronize; "
              f"median of {args.repeats}, then the median of {args.rounds} rounds over all providers "
              f"(the ratio to SDPA default within each round); overhead = b - a")
    per = {}  # (mode, provider) -> list of per-round results, or an error status
    for rnd in range(args.rounds):
        for mode in args.mode:
            for prov in args.providers:
                if prov == "empty-rawkernel" and mode != "fwd":
                    continue
                if isinstance(per.get((mode, prov)), str):
                    continue  # failed in an earlier round
                T.progress(f"round {rnd + 1}/{args.rounds}: {mode} {prov} ...")
                try:
                    fn, ctx = make(prov, args, libs, mode)
                    with ctx:
                        per.setdefault((mode, prov), []).append(
                            measure(fn, args.n, args.repeats))
                except Exception as e:  # noqa: BLE001
                    per[(mode, prov)] = T.classify_error(e) if not isinstance(e, ImportError) \
                        else f"unavailable: {str(e)[:80]}"
                fn = ctx = None
                T.free_gpu_memory()
    rows = []
    for (mode, prov), res in per.items():
        row = {"provider": prov, "mode": mode}
        if isinstance(res, str):
            row["status"] = res
        else:
            row["status"] = "ok"
            for f in ("gpu_us", "wall_us", "overhead_us"):
                row[f] = statistics.median(r[f] for r in res)
            row["wall_us_rounds"] = [r["wall_us"] for r in res]
            row["gaps"] = any(r["gaps"] for r in res)
            ref = per.get((mode, "sdpa-default"))
            if isinstance(ref, list) and len(ref) == len(res):
                # within each round, then the median: drift between rounds cancels
                row["vs_sdpa_default"] = statistics.median(
                    r["wall_us"] / b["wall_us"] for r, b in zip(res, ref))
        rows.append(row)
    T.release_flush_buffer()
    import bench_attention as BA

    BA.write_json(args.out, env, method, args, rows)
    body = [[r["provider"], r["mode"], T.fmt(r.get("gpu_us"), 1), T.fmt(r.get("wall_us"), 1),
             T.fmt(r.get("overhead_us"), 1), T.fmt(r.get("vs_sdpa_default"), 2),
             "-".join(T.fmt(x, 0) for x in (min(r["wall_us_rounds"]), max(r["wall_us_rounds"])))
             if r["status"] == "ok" else "",
             ("(a) may include host gaps" if r.get("gaps") else "")
             if r["status"] == "ok" else r["status"][:60]] for r in rows]
    print(T.format_environment(env, method))
    print(f"shape B={args.b} H={args.h} S={args.s} D={args.d} {args.dtype} "
          f"causal={args.causal}")
    print(T.format_table(body, ["provider", "mode", "GPU us/call", "wall us/call",
                                "overhead us", "wall / SDPA default", "wall range", "note"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
