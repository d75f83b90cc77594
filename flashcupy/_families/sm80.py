"""The sm80 family: float16/bfloat16 on tensor cores with mma.sync m16n8k16 (sm_80+).

Kernels: cuda_src/sm80/fwd.cuh (fc_sm80_fwd), cuda_src/sm80/bwd.cuh
(fc_sm80_bwd_dkdv, fc_sm80_bwd_dq, fc_sm80_bwd_dkdvq), all templated on
``<T, HD, HDV, BLOCK_M, BLOCK_N, NWARPS, STAGES, VF>``, and two bandwidth
kernels of the backward (fc_sm80_bwd_preprocess, fc_sm80_bwd_dq_convert).

Each bucket lists tile candidates in order of preference; the first whose
shared memory fits the device is used (H100/H200: 227 KB, A100: 163 KB,
sm_86/89: 99 KB).  Figures are H100 bf16 TFLOP/s at S = 1k / 4k / 16k
(batch*S = 16k, H*D = 2048), measured by the kernel harness that
benchmarks/dev/NOTES.md describes.
"""
from __future__ import annotations

from .._spec import (VF_BIAS, VF_BIAS_ACC, VF_DROPOUT, VF_MASK, VF_PAGED, VF_SEQ, VF_SINK,
                     VF_SPLIT, KernelSpec, SMEM_LIMIT_SM80,
                     SMEM_LIMIT_SM90, head_dim_bucket)

NAME = "sm80"
PAD = 8  # smem row padding in elements (16 bytes): conflict-free ldmatrix / cp.async

# (BLOCK_M, BLOCK_N, NWARPS, STAGES[, flags]).  "qs": Q is re-read from shared
# memory at every K tile (Q_IN_REGS = false) instead of held in registers.
# "no-offset": a bias or mask (one more load and add per score, and their row
# pointers) makes this tile spill (16-64 bytes, kernel check): such calls take
# the next row.
FWD_TILES = {
    32: [(128, 128, 4, 2, "qs")],  # 186/219/230, 7-16 % over 128x64x4w (Q in registers)
    64: [(128, 64, 4, 2, "no-offset", "no-paged"),  # 4 warps x 32 rows: each K/V fragment feeds two m16
                             # tiles; 189/272/295; 128x128x8w 221/251 at 4k/16k; 128x128x4w
                             # "qs" spills
         (64, 64, 4, 2)],    # bias / mask: 197 registers, no spill
    128: [(128, 64, 4, 2, "no-offset", "no-seq", "no-split"),  # flash-attn's tile, 4 warps x 32 rows, Q re-read:
                             # 260/334/350 vs 128x128x8w 202/244/263 and 128x32x4w 231/296/315;
                             # spill-free (255 regs) since the conditional O rescale
                             # (NOTES.md); 104 KB: H100 and A100
          (64, 64, 4, 2)],   # 87 KB: sm_86/89; bias / mask (241 registers, no spill), sequences,
                             # split-KV
    256: [(128, 64, 8, 2),   # 226/271/291, 8-21 % over 64x32x4w; 198 KB: H100 only
          (64, 32, 4, 2)],   # the largest tile within 163 KB and 255 registers: A100
}
# dK/dV: BLOCK_M = queries per step, BLOCK_N = keys per CTA.  "2d": the 2-D warp
# split (SPLIT2D = true; 8 warps, HD and HDV multiples of 64): S and dP on 2x4
# warps, dV and dK on 4x2, P and dS through shared memory, so every fragment read
# feeds two mma instead of one (NOTES.md).
DKDV_TILES = {
    32: [(64, 128, 8, 2)],
    64: [(64, 128, 8, 2)],   # 201/197 (whole backward, 4k/16k); 64x64x4w 191/191; 3 stages: no
                             # gain; the 2-D split was slower at 64
    128: [(64, 128, 8, 2, "2d", "no-seq"),  # 204/202 vs 185/190 for 1-D; 171 KB (swizzled
                                            # Q/dO): H100 only
          (32, 64, 4, 2)],   # 1-D: 2 CTAs/SM; BLOCK_M 64 spills; A100
    # HD = 256: the 2-D split with dK / dV in four 64-column slices (2 warps along
    # the keys x 4 along D, 128 accumulator registers a thread; FlashAttention-2's
    # hdim-256 backward splits them across warps the same way): 248 / 244 registers,
    # no spill (kernel check).  The 1-D tiles need 256+ registers for dK, dV alone.
    256: [(64, 64, 8, 2, "2d", "no-dropout"),   # 213 KB: H100 / H200
          (32, 64, 8, 2, "2d", "no-dropout")],  # 140 KB: A100
}
# dK/dV with dQ added by float32 atomics into a workspace (deterministic=False, the
# default; flash-attn 2's design: 5 products per step instead of the 4 + 3 of the
# dK/dV and dQ pair).  Cells: whole backward bf16 TFLOP/s at S = 4k / 16k.
DKDVQ_TILES = {
    32: [(64, 128, 8, 2)],
    64: [(128, 128, 8, 2, "2d"),  # 247/270; 3 stages 248/266: no gain; 174 KB: sm_90+
         (64, 128, 8, 2)],        # 1-D, 93 KB: A100 (the 2-D tiles spill on sm_80)
    128: [(64, 128, 8, 2, "2d", "bulk", "no-seq"),  # dQ by bulk reduction (sm_90): 299/315, causal
                                          # 266/311 vs 297/306, 261/308 for 3 stages with
                                          # red.global.add; 204 KB
          (32, 128, 8, 2)],       # 1-D, 115 KB: A100
    # HD = 256: dK / dV in 64-column slices as in DKDV_TILES, plus the dQ product
    # (64 query rows spill: 255 registers + 68 bytes).  H200, B4 H8 S4k bf16, whole
    # backward: 211 / causal 196 TFLOP/s with the bulk dQ (SDPA flash 245 / 218),
    # 200 / 184 with red.global.add, 202 / 187 with 3 stages; the deterministic
    # pair (64x64 dK/dV + 64x32 dQ) 190 / 177.
    256: [(32, 64, 8, 2, "2d", "bulk", "no-dropout"),  # 236 registers, 172 KB: sm_90
          (32, 64, 8, 2, "2d", "no-dropout")],         # 238 registers, 140 KB: A100
}
DQ_TILES = {
    32: [(64, 64, 4, 2)],
    64: [(64, 128, 4, 2)],   # 197-204
    128: [(64, 64, 4, 2)],   # 180-203; 3 stages slower
    256: [(64, 32, 4, 2)],   # 239 registers, no spill; 132 KB
}

TABLES = {"fwd": FWD_TILES, "bwd_dkdv": DKDV_TILES, "bwd_dq": DQ_TILES,
          "bwd_dkdvq": DKDVQ_TILES}
_KERNEL_NAMES = {"fwd": "fc_sm80_fwd", "bwd_dkdv": "fc_sm80_bwd_dkdv",
                 "bwd_dq": "fc_sm80_bwd_dq", "bwd_dkdvq": "fc_sm80_bwd_dkdvq"}
# Bandwidth kernels of the backward: delta = rowsum(dO o O) with 16-byte loads
# (HDV / 8 lanes per row), and dq = dq_accum * scale, cast (one thread per
# 16-byte quad of the workspace, 4 rows per warp).
PREPROCESS_WARPS = 4
CONVERT_WARPS = 4
# Split-KV's combine (cuda_src/split.cuh): one warp per query row, 4 rows a CTA
# (a decode step has B x H x Sq rows: few CTAs either way; it reads each
# partial row once).
COMBINE_WARPS = 4
STORAGE = {"fp16": "fc_half", "bf16": "fc_bf16"}


def supports(dtype: str, cc: int) -> bool:
    return dtype in ("fp16", "bf16") and cc >= 80


def source(s: KernelSpec) -> str:
    if s.kernel == "fwd_combine":
        return "split.cuh"
    return "sm80/fwd.cuh" if s.kernel == "fwd" else "sm80/bwd.cuh"


def name_expression(s: KernelSpec) -> str:
    if s.kernel == "bwd_dq_convert":
        return f"fc_sm80_bwd_dq_convert<{STORAGE[s.dtype]}, {s.nwarps}>"
    if s.kernel == "bwd_preprocess":
        return f"fc_sm80_bwd_preprocess<{STORAGE[s.dtype]}, {s.head_dim_v}, {s.nwarps}>"
    if s.kernel == "fwd_combine":
        return f"fc_split_combine<{STORAGE[s.dtype]}, {s.nwarps}>"
    # Trailing template flags (defaults in the kernels): Q_IN_REGS for the forward,
    # SPLIT2D [, BULK_DQ] for dK/dV.
    flag = ", true" if "2d" in s.extra else ", false" if "qs" in s.extra else ""
    if s.kernel == "bwd_dkdvq" and "bulk" in s.extra:
        flag += ", true"
    return (f"{_KERNEL_NAMES[s.kernel]}<{STORAGE[s.dtype]}, {s.head_dim}, {s.head_dim_v}, "
            f"{s.block_m}, {s.block_n}, {s.nwarps}, {s.stages}, {s.variant}{flag}>")


def tile_rows(s: KernelSpec) -> int:
    if s.kernel == "bwd_dq_convert":
        return 4 * s.nwarps  # cuda_src/sm80/bwd.cuh: 4 rows per warp
    if s.kernel == "bwd_preprocess":  # HDV / 8 lanes (at least 4) per row
        return s.nwarps * 32 // max(4, s.head_dim_v // 8)
    if s.kernel == "fwd_combine":
        return s.nwarps  # cuda_src/split.cuh: one warp per row
    return s.block_n if s.kernel in ("bwd_dkdv", "bwd_dkdvq") else s.block_m


def smem_bytes(s: KernelSpec) -> int:
    """Dynamic shared memory (bytes): the *Cfg structs of cuda_src/sm80 (the
    kernel check compiles a static_assert that the two agree)."""
    hd, hdv, bm, bn, st = s.head_dim, s.head_dim_v, s.block_m, s.block_n, s.stages
    if s.kernel in ("bwd_dq_convert", "bwd_preprocess", "fwd_combine"):
        return 0
    if s.kernel == "fwd":
        return 2 * (bm * (max(hd, hdv) + PAD) + st * bn * (hd + hdv + 2 * PAD))
    if s.kernel in ("bwd_dkdv", "bwd_dkdvq") and "2d" in s.extra:
        # K, V | STAGES x (Q, dO [swizzled, no pad], lse, delta) | P, dS [| dQ staging]
        return (2 * bn * (hd + hdv + 2 * PAD) + st * (2 * bm * (hd + hdv) + 8 * bm)
                + 4 * bm * (bn + PAD) + (4 * bm * hd if "bulk" in s.extra else 0))
    if s.kernel in ("bwd_dkdv", "bwd_dkdvq"):
        return (2 * (bn * (hd + PAD) + bn * (hdv + PAD))
                + st * (2 * bm * (hd + PAD) + 2 * bm * (hdv + PAD) + 8 * bm)
                + (2 * bn * (bm + PAD) if s.kernel == "bwd_dkdvq" else 0))  # dS^T
    if s.kernel == "bwd_dq":
        return 2 * (bm * (hd + PAD) + bm * (hdv + PAD) + st * bn * (hd + hdv + 2 * PAD))
    raise ValueError(s.kernel)


def smem_expression(s: KernelSpec):
    """The C++ constant expression of the kernel's shared memory, or None."""
    hd, hdv, bm, bn, nw, st = s.head_dim, s.head_dim_v, s.block_m, s.block_n, s.nwarps, s.stages
    if s.kernel == "fwd":
        q = "false" if "qs" in s.extra else "true"
        return f"sm80::FwdCfg<{hd}, {hdv}, {bm}, {bn}, {nw}, {st}, {q}>::SMEM_BYTES"
    if s.kernel in ("bwd_dkdv", "bwd_dkdvq"):
        atomic = "true" if s.kernel == "bwd_dkdvq" else "false"
        if "2d" in s.extra:
            bulk = "true" if "bulk" in s.extra else "false"
            return f"sm80::Dkdv2dCfg<{hd}, {hdv}, {bm}, {bn}, {nw}, {st}, {atomic}, {bulk}>::SMEM_BYTES"
        return f"sm80::DkdvCfg<{hd}, {hdv}, {bm}, {bn}, {nw}, {st}, {atomic}>::SMEM_BYTES"
    if s.kernel == "bwd_dq":
        return f"sm80::DqCfg<{hd}, {hdv}, {bm}, {bn}, {nw}, {st}>::SMEM_BYTES"
    return None


# Table tags that are not kernel flags: which variants a tile must not take.
TAGS = {"no-offset": lambda vf: bool(vf & (VF_BIAS | VF_BIAS_ACC | VF_MASK)),
        # The 2-D dK/dV tiles run at 244-255 registers: a packed batch's
        # per-sequence rows and lengths (loaded, not recomputable from the
        # parameters) spill there; sequences take the 1-D tile below.
        # The same holds for the 128-row forward tile at D = 128 (255
        # registers; the block-table lookups of a paged cache spill most), and
        # a decode step's few query rows fill a 64-row tile no worse.
        "no-seq": lambda vf: bool(vf & VF_SEQ),
        # The block-table entries a paged forward holds a tile ahead
        # (cuda_src/seq.cuh KvAhead) take the 128-row D = 64 forward to 255
        # registers and 80 bytes of spill on sm_80 (kernel check).
        "no-paged": lambda vf: bool(vf & VF_PAGED),
        # The split epilogue's partial-row stores take the 255-register D = 128
        # forward to 120 bytes of spill (kernel check); a split's few query
        # rows fill a 64-row tile no worse.
        "no-split": lambda vf: bool(vf & VF_SPLIT),
        # Dropout's bits come in 32-key blocks (variant.cuh dropout_frag); the
        # 2-D split's S tiles at BLOCK_N = 64 give a warp 16 keys, so a dropout
        # backward at HD = 256 takes the generic dK/dV kernel.
        "no-dropout": lambda vf: bool(vf & VF_DROPOUT)}


def refuses(tile, variant) -> bool:
    return any(t in tile and rule(variant) for t, rule in TAGS.items())


def tile_spec(kernel, dtype, hd, hdv, tile, variant, family=NAME) -> KernelSpec:
    bm, bn, nw, st = tile[:4]
    if kernel != "fwd":
        variant &= ~VF_SINK  # the backward sees the sink through the LSE
    return KernelSpec(family, kernel, dtype, hd, hdv, nwarps=nw, block_m=bm, block_n=bn,
                      stages=st, variant=variant,
                      extra=tuple(f for f in tile[4:] if f not in TAGS))


def pick(kernel, dtype, head_dim, head_dim_v, variant, smem_limit, cc=80):
    """The first tile of the table that can run here, or None."""
    hd, hdv = head_dim_bucket(head_dim), head_dim_bucket(head_dim_v)
    for tile in TABLES[kernel].get(max(hd, hdv), ()):
        if "2d" in tile and (hd % 64 or hdv % 64):
            continue  # the 2-D split tiles head dims in 64-column warp slices
        if "bulk" in tile and cc < 90:
            continue  # cp.reduce.async.bulk is sm_90+
        if refuses(tile, variant):
            continue
        s = tile_spec(kernel, dtype, hd, hdv, tile, variant)
        if smem_bytes(s) <= smem_limit:
            return s
    return None


def preprocess_spec(dtype, hdv_bucket) -> KernelSpec:
    return KernelSpec(NAME, "bwd_preprocess", dtype, hdv_bucket, hdv_bucket,
                      nwarps=PREPROCESS_WARPS)


def convert_spec(dtype) -> KernelSpec:
    return KernelSpec(NAME, "bwd_dq_convert", dtype, nwarps=CONVERT_WARPS)


def combine_spec(dtype) -> KernelSpec:
    return KernelSpec(NAME, "fwd_combine", dtype, nwarps=COMBINE_WARPS)


def runs_on(s: KernelSpec, arch: str) -> bool:
    """Whether ``s`` is ever launched on ``arch`` (its tile fits there)."""
    limit = SMEM_LIMIT_SM90 if arch.startswith("sm_9") else SMEM_LIMIT_SM80
    if "bulk" in s.extra and not arch.startswith("sm_9"):
        return False
    return smem_bytes(s) <= limit


def shipped_specs(variants=(0,)) -> list:
    out = []
    for dtype in ("fp16", "bf16"):
        out.append(convert_spec(dtype))
        out.append(combine_spec(dtype))
        out.extend(preprocess_spec(dtype, b) for b in (32, 64, 128, 256))
        for vf in variants:
            for kernel, table in TABLES.items():
                for b, tiles in table.items():
                    for tile in tiles:
                        if not refuses(tile, vf):
                            out.append(tile_spec(kernel, dtype, b, b, tile, vf))
    return list(dict.fromkeys(out))
