"""Tensor-core family (mma.sync m16n8k16, sm_80+; wgmma on sm_90a): the selection table.

Kernels: cuda_src/sm80/fwd.cuh (fc_sm80_fwd), cuda_src/sm80/fwd_wg.cuh
(fc_sm80_fwd_wg: the forward with warpgroup MMA, H100, tiles flagged "wg") and
cuda_src/sm80/bwd.cuh (fc_sm80_bwd_dkdv, fc_sm80_bwd_dq, fc_sm80_bwd_dkdvq; tiles
flagged "wg", "wga" there: every product by wgmma, cuda_src/sm80/bwd_wg.cuh and
wgmma.cuh), all templated on
``<T, HD, HDV, BLOCK_M, BLOCK_N, NWARPS, STAGES, CAUSAL>``, and two bandwidth
kernels of the backward (fc_sm80_bwd_preprocess, fc_sm80_bwd_dq_convert).

Each bucket lists tile candidates in order of preference; the first whose
shared memory fits the device is used (H100: 227 KB, A100: 163 KB, sm_86/89:
99 KB).  Figures are H100 bf16 TFLOP/s at S = 4k / 16k (batch*S = 16k,
H*D = 2048) from benchmarks/dev/sm80/h100_variants.log.
"""
from __future__ import annotations

from ._config import KernelSpec, SMEM_LIMIT_SM80, SMEM_LIMIT_SM90, head_dim_bucket

AVAILABLE = True
PAD = 8  # smem row padding in elements (16 bytes): conflict-free ldmatrix / cp.async

# (BLOCK_M, BLOCK_N, NWARPS, STAGES[, flags]).  "qs": Q is re-read from shared
# memory at every K tile (Q_IN_REGS = false) instead of held in registers.
# Cells are bf16 TFLOP/s at S = 1k / 4k / 16k (benchmarks/dev/sm80/h100_run2_fwd.log).
FWD_TILES = {
    32: [(128, 128, 4, 2, "qs")],  # 186/219/230, 7-16 % over 128x64x4w (Q in registers)
    64: [(64, 64, 4, 2, "wg"),  # wgmma (sm_90a, fwd_wg.cuh), one warpgroup, several CTAs
                                # per SM: 305/359/371, causal 235/320/350 vs 128x64x8w wg
                                # (2 CTAs/SM) 293/345/360, 128x128x8w wg (1 CTA/SM)
                                # 251/307/325, mma.sync 128x64x4w 253/304/312 (harness,
                                # h100_s4_run4/5_fwd_variants.log)
         (128, 64, 4, 2)],   # 4 warps x 32 rows: each K/V fragment feeds two m16 tiles;
                             # 189/272/295; 128x128x8w 221/251 at 4k/16k; 128x128x4w "qs" spills
    128: [(64, 64, 4, 2, "wg"),  # wgmma (sm_90a): 329/425/413, causal 253/353/444 vs
                                 # 128x128x8w wg 321/399/433, 242/344/431 and mma.sync
                                 # 128x64x4w 267/332/357 (h100_s4_run5_fwd_variants.log)
          (128, 64, 4, 2),   # flash-attn's tile, 4 warps x 32 rows, Q re-read from smem:
                             # 260/334/350 vs 128x128x8w 202/244/263 and 128x32x4w 231/296/315
                             # (h100_s2_run10_fwdvar.log); spill-free (255 regs) since the
                             # conditional O rescale (NOTES.md s. 6); 104 KB: H100 and A100
          (64, 64, 4, 2)],   # 87 KB: sm_86/89
    256: [(128, 64, 8, 2),   # 226/271/291, 8-21 % over 64x32x4w; 198 KB: H100 only
          (64, 32, 4, 2)],   # the largest tile within 163 KB and 255 registers: A100
}
# dK/dV: BLOCK_M = queries per step, BLOCK_N = keys per CTA.  "2d": the 2-D warp
# split (SPLIT2D = true; 8 warps, HD and HDV multiples of 64): S and dP on 2x4
# warps, dV and dK on 4x2, P and dS through shared memory, so every fragment read
# feeds two mma instead of one (benchmarks/dev/sm80/NOTES.md, h100_run1_variants.log).
DKDV_TILES = {
    32: [(64, 128, 8, 2)],
    64: [(64, 128, 8, 2, "2d", "wg", "wga"),  # every product by wgmma (sm_90a): 238/234,
                                              # causal 209/237 vs 207/218, 187/204 (whole
                                              # det backward, h100_s4_run13_dkdv_wga_variants.log)
         (64, 128, 8, 2)],   # 201/197 (whole backward, S=16k); 64x64x4w 191/191; 3 stages: no
                             # gain; the 2-D split was slower at 64; 2-D 128x128 with wgmma
                             # 221/211 vs 207/218 at 4k/16k (h100_s4_run9_dkdv_variants.log): mixed
    128: [(64, 128, 8, 2, "2d", "wg", "wga"),  # every product by wgmma: 279/275, causal
                                               # 259/284 vs 263/268, 230/262 (run 13)
          (64, 128, 8, 2, "2d"),  # 204/202 vs 185/190 for 1-D; 171 KB (swizzled Q/dO): H100 only
          (32, 64, 4, 2)],   # 1-D: 2 CTAs/SM; BLOCK_M 64 spills; A100
}
# dK/dV with dQ added by float32 atomics into a workspace (deterministic=False, the
# default; flash-attn 2's design: 5 products per step instead of the 4 + 3 of the
# dK/dV and dQ pair).  Cells: whole backward bf16 TFLOP/s at S = 4k / 16k
# (benchmarks/dev/sm80/NOTES.md section 4).
DKDVQ_TILES = {
    32: [(64, 128, 8, 2)],
    64: [(128, 128, 8, 2, "2d", "wg", "wga"),  # every product by wgmma (bwd_wg.cuh), sm_90a,
                                               # S / dP in two 64-key passes (no spill):
                                               # 320/338, causal 273/333 vs 307/328, 263/321
                                               # for 64x128 (h100_s4_run16_wga_halves_variants
                                               # .log); 162 KB.  64x128 (run 12): 304/331,
                                               # causal 271/309; S, dP alone on wgmma in the
                                               # 2-D body: 279/306, 255/296 (NOTES.md s. 8)
         (128, 128, 8, 2, "2d"),  # 247/270 (harness, session 3); 3 stages 248/266: no gain;
                                  # 174 KB: sm_90+ without wgmma (sm_100)
         (64, 128, 8, 2)],        # 1-D, 93 KB: A100 (the 2-D tiles spill on sm_80)
    128: [(64, 128, 8, 2, "2d", "wg", "wga"),  # every product by wgmma (sm_90a): 408/418,
                                               # causal 331/406 vs 353/379, 306/364 (run 12);
                                               # with the bulk dQ: 371/396, 325/399 (run 11,
                                               # its staging barrier stalls the async products)
          (64, 128, 8, 2, "2d", "bulk"),  # dQ by bulk reduction (sm_90): 299/315, causal
                                          # 266/311 vs 297/306, 261/308 for 3 stages with
                                          # red.global.add (harness, session 3); 204 KB
          (32, 128, 8, 2)],       # 1-D, 115 KB: A100
}
DQ_TILES = {
    32: [(64, 64, 4, 2)],
    64: [(64, 128, 4, 2)],   # 197-204
    128: [(64, 64, 4, 2)],   # 180-203; 3 stages slower
}
# HD = 256 backward: a warp owning 16 keys would need 256 registers for its dK,
# dV accumulators alone; it runs on the generic family.

_TABLES = {"fwd": FWD_TILES, "bwd_dkdv": DKDV_TILES, "bwd_dq": DQ_TILES,
           "bwd_dkdvq": DKDVQ_TILES}
_KERNEL_NAMES = {"fwd": "fc_sm80_fwd", "bwd_dkdv": "fc_sm80_bwd_dkdv", "bwd_dq": "fc_sm80_bwd_dq",
                 "bwd_dkdvq": "fc_sm80_bwd_dkdvq"}
# Bandwidth kernels of the backward: delta = rowsum(dO o O) with 16-byte loads
# (HDV / 8 lanes per row), and dq = dq_accum * scale, cast (one thread per
# 16-byte quad of the workspace, 4 rows per warp).
PREPROCESS_WARPS = 4
CONVERT_WARPS = 4
_STORAGE = {"fp16": "fc_half", "bf16": "fc_bf16"}


def source(spec) -> str:
    if spec.kernel == "fwd":
        return "sm80/fwd_wg.cuh" if "wg" in spec.extra else "sm80/fwd.cuh"
    return "sm80/bwd.cuh"


def name_expression(spec) -> str:
    if spec.kernel == "bwd_dq_convert":
        return f"fc_sm80_bwd_dq_convert<{_STORAGE[spec.dtype]}, {spec.nwarps}>"
    if spec.kernel == "bwd_preprocess":
        return (f"fc_sm80_bwd_preprocess<{_STORAGE[spec.dtype]}, {spec.head_dim_v}, "
                f"{spec.nwarps}>")
    if spec.kernel == "fwd" and "wg" in spec.extra:  # fwd_wg.cuh: no trailing flags
        return (f"fc_sm80_fwd_wg<{_STORAGE[spec.dtype]}, {spec.head_dim}, {spec.head_dim_v}, "
                f"{spec.block_m}, {spec.block_n}, {spec.nwarps}, {spec.stages}, "
                f"{'true' if spec.causal else 'false'}>")
    # Trailing template flags (defaults in the kernels): SPLIT2D for dK/dV,
    # Q_IN_REGS for the forward.
    flag = ", true" if "2d" in spec.extra else ", false" if "qs" in spec.extra else ""
    if spec.kernel == "bwd_dkdvq" and ("bulk" in spec.extra or "wg" in spec.extra):
        flag += ", true" if "bulk" in spec.extra else ", false"  # BULK_DQ after SPLIT2D
    if "wg" in spec.extra:  # WG_SDP, WG_ALL (after BULK_DQ in dkdvq): bwd_wg.cuh (sm_90a)
        flag += ", true, true"
    return (f"{_KERNEL_NAMES[spec.kernel]}<{_STORAGE[spec.dtype]}, {spec.head_dim}, "
            f"{spec.head_dim_v}, {spec.block_m}, {spec.block_n}, {spec.nwarps}, {spec.stages}, "
            f"{'true' if spec.causal else 'false'}{flag}>")


def smem_bytes(spec) -> int:
    """Dynamic shared memory (bytes); the formulas of the kernel headers."""
    hd, hdv, bm, bn, st = spec.head_dim, spec.head_dim_v, spec.block_m, spec.block_n, spec.stages
    if spec.kernel in ("bwd_dq_convert", "bwd_preprocess"):
        return 0
    if spec.kernel == "fwd" and "wg" in spec.extra:
        return 2 * (bm * hd + 2 * bn * (hd + hdv))  # Q | K[2] | V[2], swizzled, no pad
    if spec.kernel == "fwd":
        return 2 * (bm * (max(hd, hdv) + PAD) + st * bn * (hd + hdv + 2 * PAD))
    if spec.kernel in ("bwd_dkdv", "bwd_dkdvq") and "wga" in spec.extra:
        # bwd_wg.cuh: K, V | STAGES x (Q, dO, lse, delta), rounded up to 1 KB | P, dS
        # [| dQ staging]; everything swizzled, no pad
        ring = 2 * bn * (hd + hdv) + st * (2 * bm * (hd + hdv) + 8 * bm)
        return (-(-ring // 1024) * 1024 + 4 * bm * bn
                + (4 * bm * hd if "bulk" in spec.extra and spec.kernel == "bwd_dkdvq" else 0))
    if spec.kernel in ("bwd_dkdv", "bwd_dkdvq") and "2d" in spec.extra:
        # K, V | STAGES x (Q, dO [swizzled, no pad], lse, delta) | P, dS [| dQ staging]
        return (2 * bn * (hd + hdv + 2 * PAD) + st * (2 * bm * (hd + hdv) + 8 * bm)
                + 4 * bm * (bn + PAD) + (4 * bm * hd if "bulk" in spec.extra else 0))
    if spec.kernel in ("bwd_dkdv", "bwd_dkdvq"):
        return (2 * (bn * (hd + PAD) + bn * (hdv + PAD))
                + st * (2 * bm * (hd + PAD) + 2 * bm * (hdv + PAD) + 8 * bm)
                + (2 * bn * (bm + PAD) if spec.kernel == "bwd_dkdvq" else 0))  # dS^T
    if spec.kernel == "bwd_dq":
        return 2 * (bm * (hd + PAD) + bm * (hdv + PAD) + st * bn * (hd + hdv + 2 * PAD))
    raise ValueError(spec.kernel)


def _spec(kernel, dtype, hd, hdv, tile, causal) -> KernelSpec:
    bm, bn, nw, st = tile[:4]
    return KernelSpec("sm80", kernel, dtype, hd, hdv, nwarps=nw, block_m=bm, block_n=bn,
                      stages=st, causal=bool(causal), extra=tuple(tile[4:]))


def _pick(kernel, dtype, head_dim, head_dim_v, causal, smem_limit, cc=80):
    hd, hdv = head_dim_bucket(head_dim), head_dim_bucket(head_dim_v)
    cands = _TABLES[kernel].get(max(hd, hdv))
    if not cands:
        return None
    for tile in cands:
        if "2d" in tile and (hd % 64 or hdv % 64):
            continue  # the 2-D split tiles head dims in 64-column warp slices
        if "bulk" in tile and cc < 90:
            continue  # cp.reduce.async.bulk is sm_90+
        if "wg" in tile and (cc != 90 or hd % 64 or hdv % 64):
            continue  # wgmma is sm_90a only; its tiles are whole 64-column panels
        spec = _spec(kernel, dtype, hd, hdv, tile, causal)
        if smem_bytes(spec) <= smem_limit:
            return spec
    return None


_SMEM_OPTIN: dict = {}


def _smem_limit(device_id: int) -> int:
    if device_id not in _SMEM_OPTIN:
        import cupy

        _SMEM_OPTIN[device_id] = int(
            cupy.cuda.Device(device_id).attributes["MaxSharedMemoryPerBlockOptin"])
    return _SMEM_OPTIN[device_id]


def fwd_spec(prob):
    spec = _pick("fwd", prob.dtype_name, prob.head_dim, prob.head_dim_v, prob.causal,
                 _smem_limit(prob.device_id), prob.cc)
    if spec is None:  # no tile fits this GPU's shared memory
        from ._config import generic_spec
        return generic_spec("fwd", prob.dtype_name, prob.head_dim, prob.head_dim_v)
    return spec


def bwd_spec(prob, kernel, grad_dtype=""):
    """The tensor-core kernels store gradients in the input dtype only; a
    gradient that needs an accumulator-dtype buffer (an input broadcast over an
    axis the kernel does not sum) and the HD = 256 bucket run on the generic
    family."""
    from ._config import generic_spec

    if kernel == "bwd_preprocess":
        return preprocess_spec(prob.dtype_name, head_dim_bucket(prob.head_dim_v))
    if kernel == "bwd_dq_convert":
        return KernelSpec("sm80", kernel, prob.dtype_name, nwarps=CONVERT_WARPS)
    if kernel == "bwd_dkdvq" and grad_dtype:
        return None  # the atomic path needs dK, dV in the input dtype: use the pair
    spec = None if grad_dtype else _pick(kernel, prob.dtype_name, prob.head_dim,
                                         prob.head_dim_v, prob.causal,
                                         _smem_limit(prob.device_id), prob.cc)
    if spec is None:
        if kernel == "bwd_dkdvq":
            return None  # no atomic tile for this bucket / GPU: the caller runs the pair
        return generic_spec(kernel, prob.dtype_name, prob.head_dim, prob.head_dim_v, grad_dtype)
    return spec


def preprocess_spec(dtype, hdv_bucket):
    return KernelSpec("sm80", "bwd_preprocess", dtype, hdv_bucket, hdv_bucket,
                      nwarps=PREPROCESS_WARPS)


def runs_on(spec, arch: str) -> bool:
    """Whether ``spec`` is ever launched on ``arch`` (its tile fits there)."""
    limit = SMEM_LIMIT_SM90 if arch.startswith("sm_9") else SMEM_LIMIT_SM80
    if "bulk" in spec.extra and not arch.startswith("sm_9"):
        return False
    if "wg" in spec.extra and arch != "sm_90a":
        return False
    return smem_bytes(spec) <= limit


def shipped_specs():
    out = []
    for dtype in ("fp16", "bf16"):
        out.append(KernelSpec("sm80", "bwd_dq_convert", dtype, nwarps=CONVERT_WARPS))
        out.extend(preprocess_spec(dtype, b) for b in (32, 64, 128, 256))
        for kernel, table in _TABLES.items():
            for b, tiles in table.items():
                for tile in tiles:
                    for causal in (False, True):
                        out.append(_spec(kernel, dtype, b, b, tile, causal))
    return out
