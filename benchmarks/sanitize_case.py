#!/usr/bin/env python
"""One forward and one backward call per dtype at lengths that are no multiple
of any tile, for compute-sanitizer (memcheck, racecheck, initcheck, synccheck).

    compute-sanitizer --tool memcheck python benchmarks/sanitize_case.py generic sm80 sm90
    compute-sanitizer --tool memcheck python benchmarks/sanitize_case.py sm90 with=bias,mask,dropout
    compute-sanitizer --tool racecheck python benchmarks/sanitize_case.py sm90 with=bias,mask sk=208
    compute-sanitizer --tool memcheck python benchmarks/sanitize_case.py sm90 sm80 seq
    compute-sanitizer --tool memcheck python benchmarks/sanitize_case.py sm90 sm80 split

The arguments name kernel families (default: generic); a family that cannot run
a dtype on this GPU is skipped.  ``with=`` adds variants to every call: ``bias``
(a full (1, 2, Sq, Sk) bias in the dtype, its gradient too), ``mask`` (a random
(1, 1, Sq, Sk) bool mask with one row that sees no key), ``dropout``
(dropout_p = 0.2).  ``sk=`` sets the key length (default 197; a multiple of 16
such as 208 makes the sm90 forward stage the bias / mask tiles in shared
memory, cuda_src/sm80/scores.cuh).  ``seq`` runs sequences instead: a packed
batch of odd lengths (0 and 1 among them, unused tail rows) forward and
backward through attention_varlen, and decode / prefill calls of
attention_with_kvcache on page pools of 16 and 48 rows and a contiguous cache,
with appends.  ``split`` runs split-KV decode calls (cuda_src/split.cuh):
forced split counts 3 and 128 (so most splits are empty) at odd lengths, head
dims 72 and 128, GQA-packed and not, and a paged cache with ragged lengths
(0 and 1 among them).  Prints one line per call, "finite" or
"NON-FINITE"; compute-sanitizer reports the errors.  Exit status 2 when no GPU
is available.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _timing as T  # noqa: E402

if any(a.startswith("-") for a in sys.argv[1:]):
    print(__doc__)
    sys.exit(0)
T.require_gpu()

import cupy as cp  # noqa: E402
import ml_dtypes  # noqa: E402
import numpy as np  # noqa: E402

import flashcupy as fc  # noqa: E402

SEQ = "seq" in sys.argv[1:]
SPLIT = "split" in sys.argv[1:]
families = [a for a in sys.argv[1:] if "=" not in a and a not in ("seq", "split")] or ["generic"]
SK = int(next((a[3:] for a in sys.argv[1:] if a.startswith("sk=")), 197))
variants = [v for a in sys.argv[1:] if a.startswith("with=") for v in a[5:].split(",") if v]
unknown = set(variants) - {"bias", "mask", "dropout"}
if unknown:
    sys.exit(f"sanitize_case.py: unknown variants {sorted(unknown)} (with=bias,mask,dropout)")
rng = cp.random.default_rng(0)


def variant_kwargs(dt, sq, sk):
    kw = {}
    if "bias" in variants:
        kw["bias"] = rng.standard_normal((1, 2, sq, sk)).astype(dt)
    if "mask" in variants:
        m = rng.random((1, 1, sq, sk)) > 0.3
        m[..., 5, :] = False
        kw["mask"] = m
    if "dropout" in variants:
        kw.update(dropout_p=0.2, seed=12345, offset=7)
    return kw


def finite(*xs):
    return all(bool(cp.isfinite(x.astype(np.float32)).all()) for x in xs)


def sequences(fam, dt):
    lens_q, lens_k = [37, 0, 131, 1, 66], [50, 3, 131, 0, 97]
    cu_q = cp.asarray(np.concatenate([[0], np.cumsum(lens_q)]), np.int32)
    cu_k = cp.asarray(np.concatenate([[0], np.cumsum(lens_k)]), np.int32)
    d = 128 if fam == "sm90" else 72
    for causal in (False, True):
        q = rng.standard_normal((2, 2, sum(lens_q) + 3, d)).astype(dt)
        k = rng.standard_normal((2, 1, sum(lens_k) + 5, d)).astype(dt)
        v = rng.standard_normal((2, 1, sum(lens_k) + 5, d)).astype(dt)
        with fc.kernel_family(fam):
            out, lse = fc.attention_varlen(q, k, v, cu_q, cu_k, causal=causal, return_lse=True)
            do = rng.standard_normal(out.shape).astype(dt)
            grads = fc.attention_varlen_backward(do, q, k, v, out, lse, cu_q, cu_k, causal=causal)
        cp.cuda.get_current_stream().synchronize()
        print(f"{fam} {np.dtype(dt).name} varlen causal={causal}: "
              f"{'finite' if finite(out, *grads) else 'NON-FINITE'}")
    lens = cp.asarray([0, 1, 45, 200], np.int32)
    for page in (16, 48, None):
        for sq in (1, 5):
            qd = rng.standard_normal((4, 2, 2, sq, d)).astype(dt)
            kn = rng.standard_normal((4, 2, 1, 3, d)).astype(dt)
            vn = rng.standard_normal((4, 2, 1, 3, d)).astype(dt)
            if page is None:
                kc = rng.standard_normal((4, 2, 1, 211, d)).astype(dt)
                table = None
            else:
                width = -(-203 // page)
                kc = rng.standard_normal((4 * width + 1, 2, 1, page, d)).astype(dt)
                table = cp.asarray(np.random.default_rng(page).permutation(4 * width + 1)[:4 * width]
                                   .reshape(4, width), np.int32)
            vc = rng.standard_normal(kc.shape).astype(dt)
            with fc.kernel_family(fam):
                out = fc.attention_with_kvcache(qd, kc, vc, lens, k_new=kn, v_new=vn,
                                                block_table=table, causal=True)
            cp.cuda.get_current_stream().synchronize()
            print(f"{fam} {np.dtype(dt).name} kvcache page={page} sq={sq}: "
                  f"{'finite' if finite(out) else 'NON-FINITE'}")


def splits(fam, dt):
    from flashcupy import _config

    for ns in (3, 128):
        for d in (72, 128):
            for g, causal in ((1, True), (4, False)):
                q = rng.standard_normal((2, 2, g, 3, d)).astype(dt)
                k = rng.standard_normal((2, 2, 1, 1037, d)).astype(dt)
                v = rng.standard_normal((2, 2, 1, 1037, d)).astype(dt)
                with fc.kernel_family(fam), _config.split_kv(ns):
                    out, lse = fc.attention(q, k, v, causal=causal, return_lse=True)
                cp.cuda.get_current_stream().synchronize()
                print(f"{fam} {np.dtype(dt).name} split={ns} d={d} group={g} causal={causal}: "
                      f"{'finite' if finite(out, lse) else 'NON-FINITE'}")
        lens = cp.asarray([0, 1, 45, 700], np.int32)
        qd = rng.standard_normal((4, 2, 4, 1, 128)).astype(dt)
        width = -(-700 // 16)
        kc = rng.standard_normal((4 * width, 2, 1, 16, 128)).astype(dt)
        vc = rng.standard_normal(kc.shape).astype(dt)
        table = cp.asarray(np.random.default_rng(1).permutation(4 * width).reshape(4, width),
                           np.int32)
        with fc.kernel_family(fam), _config.split_kv(ns):
            out = fc.attention_with_kvcache(qd, kc, vc, lens, block_table=table)
        cp.cuda.get_current_stream().synchronize()
        print(f"{fam} {np.dtype(dt).name} split={ns} paged ragged: "
              f"{'finite' if finite(out[1:]) else 'NON-FINITE'}")


for fam in families:
    for dt in (np.float16, ml_dtypes.bfloat16, np.float32, np.float64):
        if SPLIT:
            if fam in fc.families_for(dt) and fam != "generic":
                splits(fam, dt)
            continue
        if SEQ:
            if fam in fc.families_for(dt):
                sequences(fam, dt)
            continue
        if fam not in fc.families_for(dt):
            continue
        # sm80: both backward paths (atomic dQ by default, the kernel pair when
        # deterministic) and two head-dim buckets (their tiles differ)
        dets = (False, True) if fam != "generic" else (False,)
        # (sm90: one head dim on wgmma tiles, one that falls back to the sm80 tiles)
        dims = (128, 72) if fam == "sm90" else (72, 40) if fam != "generic" else (72,)
        for causal in (False, True):
            for d in dims:
                for det in dets:
                    q = rng.standard_normal((1, 2, 131, d)).astype(dt)
                    k = rng.standard_normal((1, 2, SK, d)).astype(dt)
                    v = rng.standard_normal((1, 2, SK, d)).astype(dt)
                    kw = variant_kwargs(dt, 131, SK)
                    bkw = dict(kw, bias_grad=True) if "bias" in kw else kw
                    with fc.kernel_family(fam):
                        out, lse = fc.attention(q, k, v, causal=causal, return_lse=True, **kw)
                        do = rng.standard_normal(out.shape).astype(dt)
                        grads = fc.attention_backward(do, q, k, v, out, lse, causal=causal,
                                                      deterministic=det and "bias" not in kw,
                                                      **bkw)
                    cp.cuda.get_current_stream().synchronize()
                    ok = all(bool(cp.isfinite(g.astype(np.float32)).all()) for g in (out, *grads))
                    det = det and "bias" not in kw  # (as passed above)
                    print(f"{fam} {np.dtype(dt).name} d={d} causal={causal} deterministic={det} "
                          f"{'+'.join(variants)}: "
                          f"{'finite' if ok else 'NON-FINITE'}")
