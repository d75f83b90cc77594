"""The generic (FMA) family: every dtype on every GPU (cuda_src/generic).

Rows per warp by (accumulator, kernel, bucket).  Bucket = max(HD, HDV), which
sets both the register file use (ROWS * HDV/32 accumulators per lane) and
shared memory.  All generic kernels use 4 warps: 128-thread CTAs let several
CTAs share an SM, which hides the latency of the plain (non-pipelined) tile
loads.  The kernels declare __launch_bounds__(128, 1): with a higher minimum
of CTAs per SM ptxas capped registers at 80-168 and spilled (kernel check),
without it it spilled a few bytes at 96-128 registers.
"""
from __future__ import annotations

from .. import _dtypes
from .._spec import (HEAD_DIM_BUCKETS, VF_ALIBI, VF_LEFT, VF_SINK, VF_SOFTCAP, KernelSpec,
                     head_dim_bucket)

NAME = "generic"

ROWS = {
    # (acc, kernel): {bucket: rows}                       reason
    ("f32", "fwd"): {32: 8, 64: 8, 128: 8,  # 8 rows: each K read feeds 8 FMAs; 49 KB smem at 128
                     256: 4},               # 4 rows: 81 KB smem, fits the 99 KB of sm_86/89
    ("f64", "fwd"): {32: 8,                 # as f32; 25 KB smem
                     64: 4, 128: 4,         # 8 rows at 64 spill on sm_90a (255 registers); 81 KB smem at 128
                     256: 2},               # 146 KB: K and V tiles alone are 130 KB (sm_80/90 only)
    ("f32", "bwd_dq"): {32: 8, 64: 8, 128: 8,  # 66 KB smem at 128, 64 accumulators per lane
                        256: 2},               # 83 KB smem; 4 rows spill on sm_90a (255 registers)
    ("f64", "bwd_dq"): {32: 8, 64: 8, 128: 4,  # 98 KB smem at 128
                        256: 1},               # 148 KB: per-lane K, V tiles are 132 KB (sm_80/90 only)
    ("f32", "bwd_dkdv"): {32: 8, 64: 8,          # 34 KB smem at 64, 32 accumulators per lane
                          128: 4,                # 8 rows spill 12-20 bytes at 255 registers (16-bit
                                                 # inputs) since one parameter struct; 4 rows: 245
                          256: 2},               # 4 rows spill 8-24 bytes likewise
    ("f64", "bwd_dkdv"): {32: 8, 64: 8,          # 67 KB smem at 64
                          128: 2,                # 84 KB smem (4 rows would be 100 KB, over sm_86's 99)
                          256: 1},               # 149 KB: per-lane Q, dO tiles are 132 KB (sm_80/90 only)
}
PREPROCESS_WARPS = 8  # one warp per row, 8 rows per CTA: a pure bandwidth kernel
# The dK/dV kernels sum the query heads that share a KV head (GQA/MQA groups) in
# registers, sequentially in the accumulator type.  Up to GROUP_MAX of them per
# CTA: that bounds the sequential fp32 sum (error grows with its length; a group
# of 70,000 heads lost 1.5e-5 relative in a test), and spreads larger groups
# over more CTAs; their partial sums are added by a pairwise CuPy reduction.
GROUP_MAX = 16
BLOCK_N = 32  # keys (or queries, in dK/dV) per step: one per lane (cuda_src/generic/tile.cuh)


def supports(dtype: str, cc: int) -> bool:
    return True


def spec(kernel: str, dtype: str, head_dim: int = 0, head_dim_v: int = 0,
         grad_dtype: str = "", variant: int = 0) -> KernelSpec:
    if kernel == "bwd_preprocess":
        return KernelSpec(NAME, kernel, dtype, nwarps=PREPROCESS_WARPS)
    if kernel != "fwd":
        variant &= ~VF_SINK  # the backward sees the sink through the LSE
    hd, hdv = head_dim_bucket(head_dim), head_dim_bucket(head_dim_v)
    acc = "f64" if dtype == "fp64" else "f32"
    rows = ROWS[(acc, kernel)][max(hd, hdv)]
    if (kernel == "fwd" and acc == "f32" and max(hd, hdv) == 128
            and variant & (VF_SOFTCAP | VF_ALIBI | VF_SINK | VF_LEFT)):
        rows = 4  # the variants' per-score terms: 8 rows spill 16-24 bytes (255 registers)
    return KernelSpec(NAME, kernel, dtype, hd, hdv, nwarps=4, rows=rows, variant=variant,
                      grad_dtype=grad_dtype if grad_dtype != dtype else "")


def source(s: KernelSpec) -> str:
    return "generic/fwd.cuh" if s.kernel == "fwd" else "generic/bwd.cuh"


def name_expression(s: KernelSpec) -> str:
    info = _dtypes.info(_dtypes.BY_NAME[s.dtype])
    t, acc = info.storage, info.acc
    if s.kernel == "fwd":
        return (f"fc_generic_fwd<{t}, {acc}, {s.head_dim}, {s.head_dim_v}, {s.nwarps}, "
                f"{s.rows}, {s.variant}>")
    if s.kernel == "bwd_preprocess":
        return f"fc_generic_bwd_preprocess<{t}, {acc}, {s.nwarps}>"
    tg = _dtypes.info(_dtypes.BY_NAME[s.grad_dtype]).storage if s.grad_dtype else t
    return (f"fc_generic_{s.kernel}<{t}, {acc}, {tg}, {s.head_dim}, {s.head_dim_v}, "
            f"{s.nwarps}, {s.rows}, {s.variant}>")


def tile_rows(s: KernelSpec) -> int:
    """Rows of the sequence axis one CTA owns (queries, or keys for dK/dV)."""
    return s.nwarps if s.kernel == "bwd_preprocess" else s.nwarps * s.rows


def smem_bytes(s: KernelSpec) -> int:
    """Dynamic shared memory: the *Smem structs of cuda_src/generic (the kernel
    check compiles a static_assert that the two agree)."""
    a = s.acc_bytes
    pad = 16 // a
    hd, hdv = s.head_dim, s.head_dim_v
    m = s.nwarps * s.rows
    if s.kernel == "fwd":
        return a * (m * hd + BLOCK_N * (hd + pad) + BLOCK_N * hdv)
    if s.kernel == "bwd_dq":
        return a * (m * (hd + hdv) + BLOCK_N * (hd + pad) + BLOCK_N * (hdv + pad))
    if s.kernel == "bwd_dkdv":
        return a * (m * (hd + hdv) + BLOCK_N * (hd + pad) + BLOCK_N * (hdv + pad) + 2 * BLOCK_N)
    return 0


def smem_expression(s: KernelSpec):
    """The C++ constant expression of the kernel's shared memory, or None."""
    info = _dtypes.info(_dtypes.BY_NAME[s.dtype])
    struct = {"fwd": "FwdSmem", "bwd_dq": "DqSmem", "bwd_dkdv": "DkdvSmem"}.get(s.kernel)
    if struct is None:
        return None
    return (f"generic::{struct}<{info.acc}, {s.head_dim}, {s.head_dim_v}, {s.nwarps}, "
            f"{s.rows}>::SIZE * sizeof({info.acc})")


def runs_on(s: KernelSpec, arch: str) -> bool:
    return True


def shipped_specs(variants=(0,)) -> list:
    out = []
    for dt in ("fp16", "bf16", "fp32", "fp64"):
        out.append(spec("bwd_preprocess", dt))
        for vf in variants:
            for b in HEAD_DIM_BUCKETS:
                for kern in ("fwd", "bwd_dq", "bwd_dkdv"):
                    out.append(spec(kern, dt, b, b, variant=vf))
    return list(dict.fromkeys(out))
