"""``python -m flashcupy``: environment report and a self-check.

With a GPU: forward and backward on a realistic shape in every dtype, checked
against a float64 reference, with the achieved TFLOP/s.  Without one: says so
and runs the reference tiled algorithm on the CPU against the naive one.
"""
from __future__ import annotations

import argparse
import math
import platform
import sys
import time

import numpy as np

from . import __version__, _dtypes, reference


def _versions():
    rows = [("flashcupy", __version__), ("python", platform.python_version()),
            ("numpy", np.__version__)]
    try:
        import cupy
    except ImportError:
        return rows + [("cupy", "not installed (see the README's Install section)")]
    rows.append(("cupy", cupy.__version__))
    try:
        from cupy.cuda import nvrtc
        rows.append(("nvrtc", ".".join(map(str, nvrtc.getVersion()))))
    except Exception as e:  # noqa: BLE001 - report, don't fail
        rows.append(("nvrtc", f"unavailable ({e.__class__.__name__}: {e})"))
    return rows


def _gpu_count() -> int:
    try:
        import cupy
    except ImportError:
        return 0
    try:
        return cupy.cuda.runtime.getDeviceCount()
    except cupy.cuda.runtime.CUDARuntimeError:
        return 0


def _cpu_selfcheck():
    try:
        import cupy  # noqa: F401
        missing = "No CUDA GPU or driver found"
    except ImportError:
        missing = "CuPy is not installed"
    print(f"\n{missing}: flashcupy's kernels need a CUDA GPU and CuPy. Running the reference "
          f"tiled algorithm (flashcupy.reference) on the CPU instead.")
    rng = np.random.default_rng(0)
    b, h, sq, sk, d = 1, 2, 200, 333, 64
    q, k = rng.standard_normal((b, h, sq, d)), rng.standard_normal((b, h, sk, d))
    v, dout = rng.standard_normal((b, h, sk, d)), rng.standard_normal((b, h, sq, d))
    for causal in (False, True):
        t = time.perf_counter()
        out_t, lse_t = reference.attention_tiled(q, k, v, causal=causal)
        out_n, lse_n = reference.attention_naive(q, k, v, causal=causal)
        grads_t = reference.attention_backward_tiled(dout, q, k, v, out_t, lse_t, causal=causal)
        grads_n = reference.attention_backward_naive(dout, q, k, v, out_n, lse_n, causal=causal)
        dt = time.perf_counter() - t
        err = max(np.max(np.abs(out_t - out_n)),
                  max(np.max(np.abs(a - b_)) for a, b_ in zip(grads_t, grads_n)))
        ok = err < 1e-10
        print(f"  tiled vs naive, causal={causal!s:5}: max |diff| {err:.2e} "
              f"({'ok' if ok else 'MISMATCH'}), {dt:.2f} s")
        if not ok:
            return 1
    return 0


def _gpu_selfcheck(args):
    import cupy

    import flashcupy as fc

    dev = cupy.cuda.Device()
    props = cupy.cuda.runtime.getDeviceProperties(dev.id)
    print(f"GPU        {props['name'].decode()} (compute capability "
          f"{dev.compute_capability[:-1]}.{dev.compute_capability[-1]}, "
          f"{props['multiProcessorCount']} SMs)")
    print(f"CUDA       runtime {cupy.cuda.runtime.runtimeGetVersion()}, "
          f"driver {cupy.cuda.runtime.driverGetVersion()}")
    b, h, s, d = args.batch, args.heads, args.seqlen, args.head_dim
    print(f"\nshape (B, H, S, D) = ({b}, {h}, {s}, {d}), causal={args.causal}; "
          f"errors are max |x - ref| against float64\n")
    print(f"{'dtype':<9} {'family':<8} {'fwd err':>9} {'bwd err':>9} {'fwd ms':>8} "
          f"{'fwd TFLOP/s':>11} {'bwd ms':>8} {'bwd TFLOP/s':>11}")
    flops = 4 * b * h * s * s * d / (2 if args.causal else 1)
    rng = cupy.random.default_rng(0)
    q64, k64, v64, do64 = (rng.standard_normal((b, h, s, d)) for _ in range(4))
    ref_out, ref_lse = _gpu_reference(q64, k64, v64, args.causal)
    ref_grads = _gpu_reference_bwd(do64, q64, k64, v64, ref_out, ref_lse, args.causal)
    status = 0
    for dt in _dtypes.SUPPORTED:
        q, k, v, do = (x.astype(dt) for x in (q64, k64, v64, do64))
        fam = fc.families_for(dt)[-1]
        with fc.kernel_family(fam):
            out, lse = fc.attention(q, k, v, causal=args.causal, return_lse=True)
            grads = fc.attention_backward(do, q, k, v, out, lse, causal=args.causal)
            t_f = _time(lambda: fc.attention(q, k, v, causal=args.causal))
            t_b = _time(lambda: fc.attention_backward(do, q, k, v, out, lse, causal=args.causal))
        e_f = float(cupy.max(cupy.abs(out.astype(np.float64) - ref_out)))
        e_b = max(float(cupy.max(cupy.abs(g.astype(np.float64) - r)))
                  for g, r in zip(grads, ref_grads))
        bad = not (math.isfinite(e_f) and math.isfinite(e_b))
        status |= bad
        print(f"{np.dtype(dt).name:<9} {fam:<8} {e_f:9.2e} {e_b:9.2e} {t_f:8.3f} "
              f"{flops / t_f / 1e9:11.1f} {t_b:8.3f} {2.5 * flops / t_b / 1e9:11.1f}"
              f"{'  NON-FINITE' if bad else ''}")
    print("\n(timings: CUDA events, median of 10 after 2 warm-ups; the test suite, not this "
          "report, holds the error bounds)")
    return status


def _gpu_reference(q, k, v, causal):
    import cupy

    s = q @ k.swapaxes(-1, -2) / math.sqrt(q.shape[-1])
    sq, sk = q.shape[-2], k.shape[-2]
    if causal:
        i = cupy.arange(sq)[:, None]
        j = cupy.arange(sk)[None, :]
        s = cupy.where(j <= i + (sk - sq), s, -cupy.inf)
    m = s.max(-1, keepdims=True)
    m = cupy.where(cupy.isfinite(m), m, 0)  # rows with no key: avoid -inf - -inf
    p = cupy.exp(s - m)
    l_ = p.sum(-1, keepdims=True)
    out = cupy.where(l_ > 0, p / cupy.where(l_ > 0, l_, 1), 0) @ v
    return out, (m + cupy.log(l_))[..., 0]


def _gpu_reference_bwd(do, q, k, v, out, lse, causal):
    import cupy

    scale = 1 / math.sqrt(q.shape[-1])
    s = q @ k.swapaxes(-1, -2) * scale
    sq, sk = q.shape[-2], k.shape[-2]
    if causal:
        i = cupy.arange(sq)[:, None]
        j = cupy.arange(sk)[None, :]
        s = cupy.where(j <= i + (sk - sq), s, -cupy.inf)
    p = cupy.where(cupy.isfinite(lse[..., None]), cupy.exp(s - lse[..., None]), 0)
    dv = p.swapaxes(-1, -2) @ do
    dp = do @ v.swapaxes(-1, -2)
    ds = p * (dp - (do * out).sum(-1, keepdims=True))
    return ds @ k * scale, ds.swapaxes(-1, -2) @ q * scale, dv


def _time(fn, warmup=2, reps=10):
    import cupy

    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        a, b = cupy.cuda.Event(), cupy.cuda.Event()
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(cupy.cuda.get_elapsed_time(a, b))
    return float(np.median(times))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m flashcupy", description=__doc__)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--causal", action="store_true")
    args = p.parse_args(argv)
    print("flashcupy self-check")
    for k, v in _versions():
        print(f"{k:<10} {v}")
    if _gpu_count() == 0:
        return _cpu_selfcheck()
    return _gpu_selfcheck(args)


if __name__ == "__main__":
    sys.exit(main())
