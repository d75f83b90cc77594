"""Packed variable-length batches and paged KV caches against their baselines.

    python benchmarks/bench_varlen.py                # both tables
    python benchmarks/bench_varlen.py --only varlen  # or: --only paged

Table 1, varlen (bf16, D = 128, causal): 16 sequences of random lengths in
[64, 4096] summing to about 32k tokens, forward and backward, in TFLOP/s of
the visible pairs (sum over sequences of attention_flops(1, H, L, L, D, causal)):

* ``fc varlen``      flashcupy.attention_varlen / attention_varlen_backward,
  as CUDA-graph replays (no host work) and eagerly (with the call's one
  device-to-host check);
* ``fc dense@L``     the dense kernels at the same per-sequence lengths: for
  each length L, flashcupy.attention on a full GPU's worth of (B, H, L, D)
  (B = 32k / L) gives TFLOP/s(L); the row is sum(F_L) / sum(F_L / TFLOP/s(L)),
  the throughput a perfect scheduler of dense calls would reach;
* ``sdpa padded``    torch SDPA (its own backend choice) on the batch padded to
  the longest sequence with a boolean mask (key padding and causal), the same
  visible FLOPs in the numerator;
* ``torch varlen``   PyTorch's padding-free varlen attention
  (torch.nn.attention.varlen.varlen_attn) where this PyTorch has it.

Table 2, paged decode (bf16, D = 128, 32 query heads over 8 KV heads, one new
query per sequence): 32 sequences of random lengths in [512, 8192]; GB/s of
the K and V bytes the sequences hold, for a contiguous cache and page pools of
16 and 256 rows in a random page order.  Timed as CUDA-graph replays (the
serving loop; no per-call host check) and eagerly (with the one device-to-host
check per call).

Timing: benchmarks/_timing.py (CUDA events, warm-up, median, L2 flush).
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _timing as T  # noqa: E402


def lengths(n, lo, hi, total, seed):
    import numpy as np

    rng = np.random.default_rng(seed)
    x = rng.uniform(lo, hi, n)
    x = np.clip(np.round(x * total / x.sum()), lo, hi).astype(int)
    return [int(v) for v in x]


def visible_flops(lens, h, d, causal, mode):
    return sum(T.attention_flops(1, h, L, L, d, causal, mode) for L in lens)


def bench(fn, args):
    return T.do_bench(fn, warmup_ms=args.warmup_ms, rep_ms=args.rep_ms).ms


def timed(call, sets, args):
    """(CUDA-graph replay ms, eager ms) of call(*s) over the rotating sets: the
    replay has no host work (a serving or training loop that captures its
    step); the eager call runs every host check, with its one device-to-host
    copy."""
    eager = bench(T.Rotate(call, sets), args)
    return T.graph_ms(call, sets, lambda fn: bench(fn, args)), eager


def varlen_table(fc, torch, args):
    import cupy as cp
    import numpy as np

    h, d, causal = args.heads, 128, True
    lens = lengths(16, 64, 4096, args.tokens, args.seed)
    total = sum(lens)
    cu = cp.asarray(np.concatenate([[0], np.cumsum(lens)]), np.int32)
    dt = T.dtype_from_name("bf16")
    rows = []

    def sets(make):
        return [make() for _ in range(args.rotate)]

    # flashcupy varlen
    packed = sets(lambda: [T.randn((h, total, d), dt) for _ in range(4)])
    fwd_state = []
    for q, k, v, do in packed:
        o, lse = fc.attention_varlen(q, k, v, cu, cu, causal=causal, return_lse=True)
        fwd_state.append((q, k, v, do, o, lse))
    mx = max(lens)  # (a CUDA-graph capture needs the longest length: nothing is read back)
    gf, t_f = timed(lambda q, k, v, do, o, lse: fc.attention_varlen(
        q, k, v, cu, cu, max_seqlen_q=mx, max_seqlen_k=mx, causal=causal), fwd_state, args)
    gb, t_b = timed(lambda q, k, v, do, o, lse: fc.attention_varlen_backward(
        do, q, k, v, o, lse, cu, cu, max_seqlen_q=mx, max_seqlen_k=mx, causal=causal),
        fwd_state, args)
    ff, fb = visible_flops(lens, h, d, causal, "fwd"), visible_flops(lens, h, d, causal, "bwd")
    rows.append(("fc varlen (graph)", T.tflops(ff, gf), T.tflops(fb, gb)))
    rows.append(("fc varlen (eager)", T.tflops(ff, t_f), T.tflops(fb, t_b)))
    del packed, fwd_state
    T.free_gpu_memory()

    # the dense kernels at each length, on a full GPU
    inv_f = inv_b = 0.0
    for L in sorted(set(lens)):
        b = max(1, args.tokens // L)
        st = []
        for _ in range(args.rotate):
            q, k, v, do = (T.randn((b, h, L, d), dt) for _ in range(4))
            o, lse = fc.attention(q, k, v, causal=causal, return_lse=True)
            st.append((q, k, v, do, o, lse))
        tf = bench(T.Rotate(lambda q, k, v, do, o, lse: fc.attention(q, k, v, causal=causal), st),
                   args)
        tb = bench(T.Rotate(lambda q, k, v, do, o, lse: fc.attention_backward(
            do, q, k, v, o, lse, causal=causal), st), args)
        n = lens.count(L)
        f1, b1 = T.attention_flops(1, h, L, L, d, causal), T.attention_flops(1, h, L, L, d, causal,
                                                                              "bwd")
        inv_f += n * f1 / T.tflops(b * f1, tf)
        inv_b += n * b1 / T.tflops(b * b1, tb)
        del st
        T.free_gpu_memory()
    rows.append(("fc dense@L", ff / inv_f, fb / inv_b))

    if torch is not None:
        tdt = torch.bfloat16
        lmax = max(lens)
        valid = torch.zeros(16, lmax, dtype=torch.bool, device="cuda")
        for i, L in enumerate(lens):
            valid[i, :L] = True
        causal_m = torch.ones(lmax, lmax, dtype=torch.bool, device="cuda").tril()
        mask = (valid[:, None, None, :] & causal_m)            # (16, 1, Lmax, Lmax)
        mask |= ~valid[:, None, :, None]   # padding queries see every key (no NaN rows)
        F = torch.nn.functional.scaled_dot_product_attention
        st = []
        for _ in range(args.rotate):
            q, k, v, do = (torch.randn(16, h, lmax, d, device="cuda", dtype=tdt)
                           .requires_grad_(i < 3) for i in range(4))
            st.append((q, k, v, do))
        with T.torch_on_cupy_stream():
            try:
                tf = bench(T.Rotate(lambda q, k, v, do: F(q, k, v, attn_mask=mask), st), args)

                def fb_(q, k, v, do):
                    o = F(q, k, v, attn_mask=mask)
                    torch.autograd.grad(o, (q, k, v), do)
                tb = bench(T.Rotate(fb_, st), args) - tf
                rows.append(("sdpa padded", T.tflops(ff, tf), T.tflops(fb, tb)))
            except Exception as e:  # noqa: BLE001
                rows.append((f"sdpa padded ({T.classify_error(e)})", None, None))
        del st
        try:
            from torch.nn.attention.varlen import varlen_attn
        except Exception:  # noqa: BLE001
            varlen_attn = None
        if varlen_attn is not None:
            cut = torch.as_tensor(cp.asnumpy(cu), device="cuda")
            st = []
            for _ in range(args.rotate):
                q, k, v, do = (torch.randn(total, h, d, device="cuda", dtype=tdt)
                               .requires_grad_(i < 3) for i in range(4))
                st.append((q, k, v, do))
            with T.torch_on_cupy_stream():
                try:
                    def f_(q, k, v, do):
                        try:
                            return varlen_attn(q, k, v, cut, cut, max(lens), max(lens),
                                               is_causal=True)
                        except TypeError:   # (PyTorch versions that take a window instead)
                            return varlen_attn(q, k, v, cut, cut, max(lens), max(lens),
                                               window_size=(-1, 0))
                    tf = bench(T.Rotate(f_, st), args)

                    def b_(q, k, v, do):
                        torch.autograd.grad(f_(q, k, v, do), (q, k, v), do)
                    tb = bench(T.Rotate(b_, st), args) - tf
                    rows.append(("torch varlen", T.tflops(ff, tf), T.tflops(fb, tb)))
                except Exception as e:  # noqa: BLE001
                    rows.append((f"torch varlen ({T.classify_error(e)}: {str(e)[:60]})", None,
                                 None))
            del st
        T.free_gpu_memory()

    print(f"\nvarlen: 16 sequences, {total} tokens (lengths {min(lens)}..{max(lens)}), "
          f"H={h}, D={d}, bf16, causal; TFLOP/s of visible pairs")
    base_f, base_b = rows[0][1], rows[0][2]
    table = [[name, T.fmt(f), T.fmt(b),
              T.fmt(base_f / f, 2) if f else "-", T.fmt(base_b / b, 2) if b else "-"]
             for name, f, b in rows]
    print(T.format_table(table, ["provider", "fwd", "bwd", "fc/this fwd", "fc/this bwd"]))


def paged_table(fc, args):
    import cupy as cp
    import numpy as np

    nb, hkv, g, d = 32, 8, 4, 128
    dt = T.dtype_from_name("bf16")
    lens = lengths(nb, 512, 8192, nb * 4352, args.seed + 1)
    s_max = max(lens)
    lens_d = cp.asarray(lens, np.int32)
    kv_bytes = sum(lens) * hkv * d * 2 * 2
    rng = np.random.default_rng(args.seed)
    rows = []

    # contiguous
    sets = []
    for _ in range(args.rotate):
        q = T.randn((nb, hkv, g, 1, d), dt)
        kc, vc = (T.randn((nb, hkv, 1, s_max, d), dt) for _ in range(2))
        sets.append((q, kc, vc))
    tg, te = timed(lambda q, kc, vc: fc.attention_with_kvcache(q, kc, vc, lens_d), sets, args)
    rows.append(("contiguous", kv_bytes / tg / 1e6, kv_bytes / te / 1e6))
    del sets
    T.free_gpu_memory()
    for page in (16, 256):
        n_pages = [-(-L // page) for L in lens]
        width = max(n_pages)
        pool = sum(n_pages)
        sets = []
        for _ in range(args.rotate):
            perm = rng.permutation(pool)
            tab = np.zeros((nb, width), np.int32)
            at = 0
            for b, n in enumerate(n_pages):
                tab[b, :n] = perm[at:at + n]
                at += n
            q = T.randn((nb, hkv, g, 1, d), dt)
            kp, vp = (T.randn((pool, hkv, 1, page, d), dt) for _ in range(2))
            sets.append((q, kp, vp, cp.asarray(tab)))
        tg, te = timed(lambda q, kp, vp, tab: fc.attention_with_kvcache(
            q, kp, vp, lens_d, block_table=tab), sets, args)
        rows.append((f"page {page}", kv_bytes / tg / 1e6, kv_bytes / te / 1e6))
        del sets
        T.free_gpu_memory()
    print(f"\npaged decode: {nb} sequences, {sum(lens)} cached tokens "
          f"(lengths {min(lens)}..{max(lens)}), {hkv * g} query heads / {hkv} KV heads, "
          f"D={d}, bf16, Sq=1; GB/s of K+V ({kv_bytes / 1e9:.2f} GB)")
    base = rows[0][1]
    print(T.format_table([[n, T.fmt(a), T.fmt(e), T.fmt(a / base, 2)] for n, a, e in rows],
                         ["cache", "GB/s (graph)", "GB/s (eager)", "vs contiguous"]))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", choices=["varlen", "paged"], default=None)
    p.add_argument("--tokens", type=int, default=32768)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rotate", type=int, default=2)
    p.add_argument("--warmup-ms", type=float, default=T.WARMUP_MS)
    p.add_argument("--rep-ms", type=float, default=T.REP_MS)
    args = p.parse_args(argv)
    T.require_gpu()
    fc, why = T.try_import_flashcupy()
    if fc is None:
        sys.exit(why)
    torch, why = T.try_import_torch()
    if torch is None:
        T.progress(f"no PyTorch rows: {why}")
    print(T.format_environment(T.environment(), T.timing_method(args.warmup_ms, args.rep_ms,
                                                                 rotate=args.rotate)))
    if args.only in (None, "varlen"):
        varlen_table(fc, torch, args)
    if args.only in (None, "paged"):
        paged_table(fc, args)


if __name__ == "__main__":
    main()
