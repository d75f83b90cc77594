"""GPU correctness + timing of the sm80 family (standalone: CuPy, no flashcupy).

PYTHONUNBUFFERED=1 python3 benchmarks/dev/sm80/harness.py [--quick] [--no-bench]
Kernels come from benchmarks/dev/sm80/build (cubins made by build_cubin.py, no device-time
NVRTC) or are compiled here when that folder is missing.
"""
import json
import math
import os
import sys
import time

import cupy as cp
import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import specs  # noqa: E402
from specs import b  # noqa: E402

BUILD = os.environ.get("HARNESS_BUILD", os.path.join(HERE, "build"))
_mods, _fns = {}, {}
_names = json.load(open(os.path.join(BUILD, "names.json"))) if os.path.exists(
    os.path.join(BUILD, "names.json")) else None


def kernel(name, smem=0):
    if name not in _fns:
        f = None
        if _names is not None and name in _names:
            fn, low = _names[name]
            try:
                if fn not in _mods:
                    _mods[fn] = cp.RawModule(path=os.path.join(BUILD, fn))
                f = _mods[fn].get_function(low)
            except Exception as e:  # e.g. driver older than the NVRTC that built it
                print("cubin load failed, compiling:", name, e)
        if f is None:
            import src
            # (sm_90a on an H100, as the library does: wgmma kernels trap without it)
            cc = cp.cuda.Device().compute_capability
            arch = ("-arch=sm_90a",) if cc == "90" else ()
            m = cp.RawModule(code=src.source(), options=("-std=c++17",) + arch,
                             name_expressions=[name])
            f = m.get_function(name)
        _fns[name] = f
    f = _fns[name]
    if smem > 48 * 1024:
        f.max_dynamic_shared_size_bytes = smem
    return f


TNAME = {"bf16": "fc_bf16", "fp16": "fc_half"}
CPDT = {"fp16": cp.float16}


OVERRIDE = {}  # (kind, hd) -> tiles (bm, bn, nw, st): time a variant


def spec(kind, t, hd, causal):
    if (kind, hd) in OVERRIDE:
        return specs.make_spec(kind, TNAME[t], hd, OVERRIDE[(kind, hd)], causal)
    for s in specs.all_specs((TNAME[t],)):
        if s.kind == kind and f"<{TNAME[t]}, {hd}, {hd}," in s.name and s.causal == causal:
            return s
    raise KeyError((kind, t, hd, causal))


def bucket(d):
    for b in (32, 64, 128, 256):
        if d <= b:
            return b


def targ(a):
    """pointer + (sb0, sb1, sb2, sr) of a (B, H, S, D) or (B, H, S) array."""
    it = a.itemsize
    st = [s // it for s in a.strides]
    return [np.uint64(a.data.ptr), np.int64(st[0]), np.int64(st[1]), np.int64(0), np.int64(st[2])]


# bf16 storage: uint16 arrays; conversions by bit ops on the GPU
def to_dev(x64, t):
    if t == "fp16":
        return x64.astype(cp.float16)
    f = x64.astype(cp.float32).view(cp.uint32)
    r = ((f + cp.uint32(0x7FFF) + ((f >> 16) & 1)) >> 16).astype(cp.uint16)  # RNE
    return r


def from_dev(a, t):
    if t == "fp16":
        return a.astype(cp.float64)
    return (a.astype(cp.uint32) << 16).view(cp.float32).astype(cp.float64)


POISON = True


def poison(a):
    if not POISON:
        return
    if a.dtype == cp.uint16:
        a.fill(0x7FC0)
    else:
        a.fill(np.nan)


# ----------------------------------------------------------------------------
def fwd(q, k, v, t, causal, scale, B, H, hd_bucket=None, kb_strides=None):
    Sq, D = q.shape[2], q.shape[3]
    Sk, Dv = k.shape[2], v.shape[3]
    hd = hd_bucket or bucket(max(D, Dv))
    s = spec("fwd", t, hd, causal)
    bm = s.tiles[0]
    o = cp.empty(q.shape[:3] + (Dv,), q.dtype)
    lse = cp.empty(q.shape[:3], cp.float32)
    poison(o), poison(lse)
    ka, va = targ(k), targ(v)
    if kb_strides is not None:  # broadcast k/v over axis 1 groups (GQA): override
        ka[1:4], va[1:4] = kb_strides[0], kb_strides[1]
    args = targ(q) + ka + va + targ(o) + targ(lse) + [np.int32(B), np.int32(H), np.int32(1),
            np.int32(Sq), np.int32(Sk), np.int32(D), np.int32(Dv), np.float32(scale),
            np.float32(scale * math.log2(math.e)), np.int32(causal)]
    kernel(s.name, s.smem)((math.ceil(Sq / bm), B * H, 1), (s.nthreads,), tuple(args),
                           shared_mem=s.smem)
    return o, lse


def bwd(q, k, v, o, lse, do, t, causal, scale, mode, B, Hk, G=1):
    """q/o/do/lse: (B, Hk*G, Sq, .), k/v: (B, Hk, Sk, .); mode 'det' | 'atomic'."""
    Sq, D = q.shape[2], q.shape[3]
    Sk, Dv = k.shape[2], v.shape[3]
    hd = bucket(max(D, Dv))
    sl2 = np.float32(scale * math.log2(math.e))
    delta = cp.empty(q.shape[:3], cp.float32)
    poison(delta)
    pre = kernel(f"fc_generic_bwd_preprocess<{TNAME[t]}, float, 4>")
    pre_args = tuple(targ(o) + targ(do) + targ(delta) + [np.int32(B), np.int32(Hk * G), np.int32(1),
                                                         np.int32(Sq), np.int32(Dv)])
    dq = cp.empty_like(q)
    dk = cp.empty_like(k)
    dv = cp.empty_like(v)
    poison(dq), poison(dk), poison(dv)

    def gview(a):  # (B, Hk*G, S, .) -> args with batch (B, Hk) and group stride
        st = [x // a.itemsize for x in a.strides]
        return [np.uint64(a.data.ptr), np.int64(st[0]), np.int64(st[1] * G), np.int64(0),
                np.int64(st[2])], np.int64(st[1])
    qa, q_sg = gview(q)
    da, do_sg = gview(do)
    la, l_sg = gview(lse)
    dla, dl_sg = gview(delta)
    common_tail = [np.int32(Sq), np.int32(Sk), np.int32(D), np.int32(Dv), np.float32(scale), sl2,
                   np.int32(causal)]
    kind = "dkdvq" if mode == "atomic" else "dkdv"
    s = spec(kind, t, hd, causal)
    args = qa + targ(k) + targ(v) + da + la + dla + targ(dk) + targ(dv) + [
        np.int32(B), np.int32(Hk), np.int32(1), np.int32(G), q_sg, do_sg, l_sg, dl_sg] + common_tail
    launches = []
    if mode == "atomic":
        # layout contract of fc_sm80_bwd_dkdvq: row pitch = the head-dim bucket,
        # query axis padded to a multiple of BLOCK_M
        bm = s.tiles[0]
        dqa = cp.zeros(q.shape[:2] + (-(-Sq // bm) * bm, hd), cp.float32)
        dqa_a, dqa_sg = gview(dqa)
        args = args + dqa_a + [dqa_sg]
        launches.append((kernel(s.name, s.smem), (math.ceil(Sk / s.tiles[1]), B * Hk, 1),
                         (s.nthreads,), tuple(args), s.smem))
        cs = [x for x in specs.all_specs((TNAME[t],)) if x.kind == "convert"][0]
        cargs = targ(dqa) + targ(dq) + [np.int32(B), np.int32(Hk * G), np.int32(1), np.int32(Sq),
                                        np.int32(D), np.float32(scale)]
        launches.append((kernel(cs.name), (math.ceil(Sq / 16), B * Hk * G, 1), (128,),
                         tuple(cargs), 0))
    else:
        launches.append((kernel(s.name, s.smem), (math.ceil(Sk / s.tiles[1]), B * Hk, 1),
                         (s.nthreads,), tuple(args), s.smem))
        sq = spec("dq", t, hd, causal)
        # dq kernel: batch over (B, Hk*G); k/v broadcast over the group axis
        kst = [x // k.itemsize for x in k.strides]
        vst = [x // v.itemsize for x in v.strides]
        Hq = Hk * G
        kq = [np.uint64(k.data.ptr), np.int64(kst[0]), np.int64(kst[1]), np.int64(0), np.int64(kst[2])]
        vq = [np.uint64(v.data.ptr), np.int64(vst[0]), np.int64(vst[1]), np.int64(0), np.int64(vst[2])]
        # nb = (B, Hk, G): q strides (sB, G*sH, sH)
        def qv3(a):
            st = [x // a.itemsize for x in a.strides]
            return [np.uint64(a.data.ptr), np.int64(st[0]), np.int64(st[1] * G), np.int64(st[1]),
                    np.int64(st[2])]
        qargs = qv3(q) + kq + vq + qv3(do) + qv3(lse) + qv3(delta) + qv3(dq) + [
            np.int32(B), np.int32(Hk), np.int32(G)] + common_tail
        launches.append((kernel(sq.name, sq.smem), (math.ceil(Sq / sq.tiles[0]), B * Hq, 1),
                         (sq.nthreads,), tuple(qargs), sq.smem))

    def run():
        pre((math.ceil(Sq / 4), B * Hk * G, 1), (128,), pre_args)
        if mode == "atomic":
            dqa.fill(0)
        for f, grid, block, a, sm in launches:
            f(grid, block, a, shared_mem=sm)
    run()
    return dq, dk, dv, run


# ----------------------------------------------------------------------------
def reference(q, k, v, do, causal, scale, G=1):
    """float64; q (B, Hq, Sq, D), k/v (B, Hk, Sk, .) with Hq = Hk*G."""
    if G > 1:
        k = cp.repeat(k, G, axis=1)
        v = cp.repeat(v, G, axis=1)
    Sq, Sk = q.shape[2], k.shape[2]
    s = cp.matmul(q, k.transpose(0, 1, 3, 2)) * scale
    if causal:
        i = cp.arange(Sq)[:, None]
        j = cp.arange(Sk)[None, :]
        s = cp.where(j <= i + (Sk - Sq), s, -cp.inf)
    m = s.max(-1, keepdims=True)
    msafe = cp.where(cp.isinf(m), 0, m)
    e = cp.exp(s - msafe)
    l = e.sum(-1, keepdims=True)
    p = cp.where(l > 0, e / cp.where(l > 0, l, 1), 0)
    o = cp.matmul(p, v)
    lse = cp.where(l[..., 0] > 0, cp.log(cp.where(l > 0, l, 1))[..., 0] + msafe[..., 0], -cp.inf)
    dp = cp.matmul(do, v.transpose(0, 1, 3, 2))
    delta = (do * o).sum(-1, keepdims=True)
    ds = p * (dp - delta)
    dq = cp.matmul(ds, k) * scale
    dk = cp.matmul(ds.transpose(0, 1, 3, 2), q) * scale
    dv = cp.matmul(p.transpose(0, 1, 3, 2), do)
    if G > 1:
        B, Hq = q.shape[:2]
        dk = dk.reshape(B, Hq // G, G, Sk, -1).sum(2)
        dv = dv.reshape(B, Hq // G, G, Sk, -1).sum(2)
    return o, lse, dq, dk, dv


def relerr(x, ref):
    x = from_dev(x, T) if x.dtype != cp.float32 else x.astype(cp.float64)
    if bool(cp.isnan(x).any()):
        return float("nan")
    # floor 1e-2: with Sk = 1 the exact dQ, dK are 0 and both sides are rounding noise
    return float(cp.abs(x - ref).max() / max(float(cp.abs(ref).max()), 1e-2))


T = "bf16"
TOL_F = {"bf16": 2e-2, "fp16": 4e-3}
TOL_B = {"bf16": 5e-2, "fp16": 1e-2}


def correctness(quick=False, fwd_only=False, only_bucket=None, quiet=False):
    """The sweep.  fwd_only: no backward; only_bucket: only head dims of that bucket;
    quiet: print only failing rows."""
    global T
    fails = 0
    rng = cp.random.default_rng(0)
    Ds = [(32, 32), (64, 64), (128, 128), (256, 256), (59, 59), (80, 80), (1, 1), (64, 48)]
    lens = [(1, 1), (17, 257), (255, 1000), (1000, 255), (257, 17), (128, 128)]
    if quick:
        Ds, lens = Ds[:3] + Ds[4:6], lens[1:4]
    if only_bucket is not None:
        Ds = [d for d in Ds if bucket(max(d)) == only_bucket]
    if not quiet:
        print(f"{'dt':4s} {'D':>7s} {'causal':6s} {'Sq':>5s} {'Sk':>5s} {'G':>2s} | o      lse    | "
          "det: dq     dk     dv    | atomic: dq   dk     dv")
    for t in ("bf16", "fp16"):
        T = t
        for D, Dv in Ds:
            for causal in (False, True):
                for (Sq, Sk) in lens:
                    for G in ((1, 2) if (Sq, Sk) == (255, 1000) else (1,)):
                        B, Hk = 2, 2 if G == 1 else 1
                        Hq = Hk * G
                        scale = 1.0 / math.sqrt(D)
                        q64 = rng.standard_normal((B, Hq, Sq, D))
                        k64 = rng.standard_normal((B, Hk, Sk, D))
                        v64 = rng.standard_normal((B, Hk, Sk, Dv))
                        do64 = rng.standard_normal((B, Hq, Sq, Dv))
                        q, k, v, do = (to_dev(x, t) for x in (q64, k64, v64, do64))
                        q64, k64, v64, do64 = (from_dev(x, t) for x in (q, k, v, do))
                        ro, rlse, rdq, rdk, rdv = reference(q64, k64, v64, do64, causal, scale, G)
                        ks = [np.int64(k.strides[0] // 2), np.int64(0), np.int64(0)]
                        vs = [np.int64(v.strides[0] // 2), np.int64(0), np.int64(0)]
                        if G == 1:
                            o, lse = fwd(q, k, v, t, causal, scale, B, Hq)
                        else:  # q as (B, Hq): k/v broadcast over heads (Hk == 1)
                            o, lse = fwd(q, k, v, t, causal, scale, B, Hq, kb_strides=(ks, vs))
                        eo = relerr(o, ro)
                        fin = cp.isfinite(rlse)
                        lse_ok = bool(cp.all(cp.isneginf(lse) == ~fin)) and not bool(cp.isnan(lse).any())
                        else_ = float(cp.abs(cp.where(fin, lse - rlse, 0)).max()) if lse_ok else float("nan")
                        ok = eo <= TOL_F[t] and else_ <= 1e-2
                        line = f"{t:4s} {D:3d}/{Dv:3d} {str(causal):6s} {Sq:5d} {Sk:5d} {G:2d} | {eo:.1e} {else_:.1e} |"
                        if max(D, Dv) <= 128 and not fwd_only:
                            # backward from the reference-consistent O (kernel's O in T)
                            for mode in ("det", "atomic"):
                                dq, dk, dv, _ = bwd(q, k, v, o, lse, do, t, causal, scale, mode, B, Hk, G)
                                es = [relerr(dq, rdq), relerr(dk, rdk), relerr(dv, rdv)]
                                ok &= all(e <= TOL_B[t] for e in es)
                                line += " " + " ".join(f"{e:.1e}" for e in es) + " |"
                        if not ok:
                            fails += 1
                            line += "  FAIL"
                        if not quiet or not ok:
                            print(line)
    cp.cuda.Device().synchronize()
    if not quiet:
        print("correctness failures:", fails)
    return fails


def timeit(fn, n=10):
    """Median seconds of fn() over n calls (CUDA events), after 3 warm-up calls."""
    for _ in range(3):
        fn()
    a, b_ = cp.cuda.Event(), cp.cuda.Event()
    ts = []
    for _ in range(n):
        a.record()
        fn()
        b_.record()
        b_.synchronize()
        ts.append(cp.cuda.get_elapsed_time(a, b_))
    return float(np.median(ts)) * 1e-3


# ----------------------------------------------------------------------------
def bench(fwd_only=False):
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel
    import torch.nn.functional as F
    global T, POISON
    T = "bf16"
    POISON = False
    print("GPU:", cp.cuda.runtime.getDeviceProperties(0)["name"].decode(), "| torch", torch.__version__,
          "| cupy", cp.__version__, "| CUDA events, median of 10 after 3 warm-up")

    print(f"{'D':>4s} {'S':>6s} {'causal':6s} | fwd ours  sdpa | bwd det  atomic  sdpa   (TFLOP/s)")
    for D in (64, 128):
        H = 2048 // D
        for S in (1024, 4096, 16384):
            B = 16384 // S
            for causal in (False, True):
                flops = 4 * B * H * S * S * D / (2 if causal else 1)
                tq = torch.randn(B, H, S, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                tk = torch.randn(B, H, S, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                tv = torch.randn(B, H, S, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                tdo = torch.randn(B, H, S, D, device="cuda", dtype=torch.bfloat16)
                q, k, v, do = (cp.from_dlpack(x.detach().view(torch.int16)).view(cp.uint16)
                               for x in (tq, tk, tv, tdo))
                scale = 1 / math.sqrt(D)
                with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                    t_sf = timeit(lambda: F.scaled_dot_product_attention(tq, tk, tv, is_causal=causal))
                    out = F.scaled_dot_product_attention(tq, tk, tv, is_causal=causal)
                    t_sb = float("nan") if fwd_only else timeit(
                        lambda: torch.autograd.grad(out, (tq, tk, tv), tdo, retain_graph=True))
                torch.cuda.synchronize()
                t_f = timeit(lambda: fwd(q, k, v, "bf16", causal, scale, B, H))
                o, lse = fwd(q, k, v, "bf16", causal, scale, B, H)
                res = [float("nan")] * 2
                for mode in (() if fwd_only else ("det", "atomic")):
                    *_, run = bwd(q, k, v, o, lse, do, "bf16", causal, scale, mode, B, H)
                    res[("det", "atomic").index(mode)] = timeit(run)
                print(f"{D:4d} {S:6d} {str(causal):6s} | {flops / t_f / 1e12:8.1f} {flops / t_sf / 1e12:5.1f} | "
                      f"{2.5 * flops / res[0] / 1e12:7.1f} {2.5 * flops / res[1] / 1e12:7.1f} "
                      f"{2.5 * flops / t_sb / 1e12:6.1f}", flush=True)
                del tq, tk, tv, tdo, out
                cp.get_default_memory_pool().free_all_blocks()
                torch.cuda.empty_cache()


def variants():
    """Correctness (bf16, 255x1000) and timing of every tile variant, S = 4k and 16k."""
    import torch
    global T, POISON
    T = "bf16"
    rng = cp.random.default_rng(1)
    print("variant correctness (bf16, Sq=255, Sk=1000, D=hd-5 and hd):")
    kinds = os.environ.get("VARIANT_KINDS", "").split() or list(specs.VARIANTS)
    for kind, per in specs.VARIANTS.items():
        if kind not in kinds:
            continue
        for hd, lst in per.items():
            for tiles in lst:
                OVERRIDE.clear()
                OVERRIDE[(kind, hd)] = tiles
                errs = []
                for causal in (False, True):
                    for D in (hd - 5, hd):
                        B, H, Sq, Sk = 1, 2, 255, 1000
                        x = [to_dev(rng.standard_normal(sh), "bf16") for sh in
                             ((B, H, Sq, D), (B, H, Sk, D), (B, H, Sk, D), (B, H, Sq, D))]
                        q, k, v, do = x
                        ro, rlse, rdq, rdk, rdv = reference(*(from_dev(a, "bf16") for a in x), causal, D ** -0.5)
                        o, lse = fwd(q, k, v, "bf16", causal, D ** -0.5, B, H)
                        if kind == "fwd":
                            errs.append(relerr(o, ro))
                        else:
                            try:
                                dq, dk, dv, _ = bwd(q, k, v, o, lse, do, "bf16", causal,
                                                    D ** -0.5,
                                                    "atomic" if kind == "dkdvq" else "det", B, H)
                                errs += [relerr(dq, rdq), relerr(dk, rdk), relerr(dv, rdv)]
                            except Exception as e:  # e.g. more shared memory than the GPU has
                                errs.append(float("inf"))
                                print("   ", tiles, type(e).__name__, str(e)[:80])
                bad = not all(e <= (TOL_F if kind == "fwd" else TOL_B)["bf16"] for e in errs)
                print(f"  {kind:6s} hd={hd:3d} {tiles}: max err {max(errs):.1e}{'  FAIL' if bad else ''}")
    OVERRIDE.clear()
    POISON = False

    print("variant timing (bf16, TFLOP/s; bwd = full det path [dkdv/dq] or atomic path [dkdvq])")
    for hd in (64, 128):
        H = 2048 // hd
        for S in (4096, 16384):
            Bt = 16384 // S
            x = [to_dev(cp.random.standard_normal((Bt, H, S, hd), dtype=cp.float32), "bf16") for _ in range(4)]
            q, k, v, do = x
            for causal in (False, True):
                flops = 4 * Bt * H * S * S * hd / (2 if causal else 1)
                o, lse = fwd(q, k, v, "bf16", causal, hd ** -0.5, Bt, H)
                for kind, lst in specs.VARIANTS.items():
                    if kind not in kinds:
                        continue
                    row = []
                    for tiles in lst[hd]:
                        OVERRIDE.clear()
                        OVERRIDE[(kind, hd)] = tiles
                        if kind == "fwd":
                            t_ = timeit(lambda: fwd(q, k, v, "bf16", causal, hd ** -0.5, Bt, H))
                            row.append(flops / t_ / 1e12)
                        else:
                            try:
                                *_, run = bwd(q, k, v, o, lse, do, "bf16", causal, hd ** -0.5,
                                              "atomic" if kind == "dkdvq" else "det", Bt, H)
                                row.append(2.5 * flops / timeit(run) / 1e12)
                            except Exception as e:  # e.g. more shared memory than the GPU has
                                print("   ", tiles, type(e).__name__, str(e)[:80])
                                row.append(0.0)
                    OVERRIDE.clear()
                    print(f"  hd={hd:3d} S={S:5d} causal={str(causal):5s} {kind:6s} " +
                          "  ".join(f"{t}:{r:.0f}" for t, r in zip(lst[hd], row)), flush=True)
            del x, q, k, v, do
            cp.get_default_memory_pool().free_all_blocks()


def fwd_variants():
    """Every fwd tile in specs.VARIANTS: the fwd-only correctness sweep (both dtypes,
    every head dim of its bucket), then TFLOP/s (bf16, B*S = 16k, H*D = 2048) beside
    SDPA's FLASH_ATTENTION backend in this process."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel
    import torch.nn.functional as F
    global T, POISON
    fails = 0
    only = [int(x) for x in os.environ.get("FWD_VAR_D", "").split()]  # e.g. "128"
    if only:
        specs.VARIANTS["fwd"] = {d: t for d, t in specs.VARIANTS["fwd"].items() if d in only}
    for hd, lst in specs.VARIANTS["fwd"].items():
        for tiles in lst:
            OVERRIDE.clear()
            OVERRIDE[("fwd", hd)] = tiles
            f = correctness(fwd_only=True, only_bucket=hd, quiet=True)
            print(f"  fwd sweep hd={hd:3d} {tiles}: failures {f}", flush=True)
            fails += f
    OVERRIDE.clear()
    T = "bf16"
    POISON = False

    print("GPU:", cp.cuda.runtime.getDeviceProperties(0)["name"].decode(), "| torch", torch.__version__,
          "| fwd TFLOP/s bf16, CUDA events, median of 10 after 3 warm-up")
    for D, lst in specs.VARIANTS["fwd"].items():
        H = 2048 // D
        for S in (1024, 4096, 16384):
            B = 16384 // S
            tq, tk, tv = (torch.randn(B, H, S, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
            q, k, v = (cp.from_dlpack(x.view(torch.int16)).view(cp.uint16) for x in (tq, tk, tv))
            for causal in (False, True):
                flops = 4 * B * H * S * S * D / (2 if causal else 1)
                with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                    t_sf = timeit(lambda: F.scaled_dot_product_attention(tq, tk, tv, is_causal=causal))
                row = []
                for tiles in lst:
                    OVERRIDE.clear()
                    OVERRIDE[("fwd", D)] = tiles
                    row.append(flops / timeit(lambda: fwd(q, k, v, "bf16", causal, D ** -0.5, B, H)) / 1e12)
                OVERRIDE.clear()
                print(f"  D={D:3d} S={S:5d} causal={str(causal):5s} sdpa:{flops / t_sf / 1e12:.0f}  " +
                      "  ".join(f"{t}:{r:.0f}" for t, r in zip(lst, row)), flush=True)
            del tq, tk, tv, q, k, v
            cp.get_default_memory_pool().free_all_blocks()
            torch.cuda.empty_cache()
    return fails


if __name__ == "__main__":
    if "--fwd-variants" in sys.argv and "--no-check" in sys.argv:
        fwd_variants()
        sys.exit(0)
    if "--variants" in sys.argv:
        variants()
        sys.exit(0)
    t0 = time.time()
    if "--no-check" not in sys.argv:
        correctness("--quick" in sys.argv)
        print(f"[{time.time() - t0:.0f}s]")
    if "--no-bench" not in sys.argv:
        bench("--fwd-only" in sys.argv)
        print(f"[{time.time() - t0:.0f}s]")
    if "--fwd-variants" in sys.argv:
        fwd_variants()
        print(f"[{time.time() - t0:.0f}s]")
