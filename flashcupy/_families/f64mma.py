"""The f64mma family: float64 on the double-precision tensor cores (DMMA,
``mma.sync.m8n8k4`` with f64 operands; sm_80 and newer: A100, H100, H200).

The forward (cuda_src/f64mma/fwd.cuh) runs here.  The backward's dQ and dK/dV
kernels (cuda_src/f64mma/bwd.cuh) are written and pass the kernel check (sm_80
and sm_90a, no spills in the shipped set) but have not yet run on a GPU:
until a GPU run of the test suite clears them, ``BACKWARD`` is False and the
backward is the generic family's (its plan and delta kernel are in any case).

Tile: 8 or 4 warps (NWARPS), MT fragments of 8 query rows per warp, 32-key
tiles.

* MT = 2 (BLOCK_M = 64) up to D = 128: each K fragment read from shared memory
  feeds two MMAs and each V fragment two, 0.375 and 0.25 bytes of shared
  memory per flop (one fragment of 256 bytes per 512-flop MMA would be 0.5,
  at the shared-memory bandwidth of a DMMA-bound SM); O takes 64 doubles per
  lane at D = 128 (128 registers).  Shared memory 135 KB at D = 128 (fits the
  A100's 163), 70 KB at 64.
* MT = 1 (BLOCK_M = 32) at D = 256: two fragments would need 256 registers
  for O alone.  200 KB: H100 / H200 only; an A100 runs the generic kernel
  there (``pick`` checks the limit).
* MT = 1 at D = 128 with dropout, or with a bias or mask over sequences: at
  MT = 2 those spill 4-36 bytes at 255 registers (kernel check, sm_80 and
  sm_90a); every other variant fits in 248-254.
"""
from __future__ import annotations

from .._spec import (HEAD_DIM_BUCKETS, VF_BIAS, VF_DROPOUT, VF_MASK, VF_SEQ, VF_SINK,
                     VF_PAGED, VF_SPLIT, KernelSpec, head_dim_bucket)

NAME = "f64mma"
# Warps per CTA, tried in order until the shared memory fits: 8 warps share
# each K/V tile over 128 query rows (203 KB at D = 128: H100 / H200), 4 on the
# A100 (135 KB).  With one 4-warp CTA per SM (135 KB at D = 128) nothing hid
# the MMA and load latencies: 14.9 TFLOP/s at B1 H16 S4k D128 (NOTES.md 16.1).
NWARPS = {32: (8, 4), 64: (8, 4), 128: (8, 4), 256: (4,)}
BLOCK_N = 32
PAD = 4  # doubles of row padding (cuda_src/f64mma/fwd.cuh: two wavefronts per fragment load)
MT = {32: 2, 64: 2, 128: 2,  # 8-row fragments per warp, by max(HD, HDV) bucket (above)
      256: 1}


BACKWARD = False  # select the dQ and dK/dV kernels below (see the module docstring)

# The backward: (warps, MT) tried in order until the shared memory fits, by
# max(HD, HDV) bucket.  No D = 256 tile: dK and dV of even one 8-key fragment
# per warp are 128 doubles per lane (256 registers); the generic kernels run.
BWD_TILES = {
    # dQ: Q and dO stay in shared memory (four padded tiles: 203 KB at D = 128,
    # MT = 2; 135 KB at MT = 1, the A100's tile)
    "bwd_dq": {32: ((4, 2),), 64: ((4, 2),), 128: ((4, 2), (4, 1))},
    # dK/dV: dK and dV accumulate in registers, 2 x HD / 4 doubles per lane at
    # MT = 2 (128 registers at D = 64); MT = 1 at D = 128 (another 128 at MT 2)
    "bwd_dkdv": {32: ((4, 2),), 64: ((4, 2),), 128: ((4, 1),)},
}


def supports(dtype: str, cc: int) -> bool:
    return dtype == "fp64" and cc >= 80


def fwd_spec(dtype: str, head_dim: int, head_dim_v: int, variant: int = 0,
             nwarps: int = 0) -> KernelSpec:
    """``nwarps``: 0 for the table's first choice."""
    hd, hdv = head_dim_bucket(head_dim), head_dim_bucket(head_dim_v)
    nwarps = nwarps or NWARPS[max(hd, hdv)][0]
    mt = MT[max(hd, hdv)]
    if max(hd, hdv) == 128 and (variant & VF_DROPOUT
                                or (variant & (VF_BIAS | VF_MASK) and variant & VF_SEQ)):
        mt = 1  # (the spills above)
    return KernelSpec(NAME, "fwd", dtype, hd, hdv, nwarps=nwarps, rows=8 * mt, variant=variant)


def bwd_spec(kernel: str, dtype: str, head_dim: int, head_dim_v: int, variant: int,
             nwarps: int, mt: int) -> KernelSpec:
    hd, hdv = head_dim_bucket(head_dim), head_dim_bucket(head_dim_v)
    variant &= ~VF_SINK  # the backward sees the sink through the LSE
    return KernelSpec(NAME, kernel, dtype, hd, hdv, nwarps=nwarps, rows=8 * mt, variant=variant)


def pick(kernel: str, dtype: str, head_dim: int, head_dim_v: int, variant: int,
         smem_limit: int):
    """The family's kernel for ``kernel``, or None where it has none (the
    backward, split-KV, a tile over the shared memory): the caller then runs
    the generic family's."""
    b = max(head_dim_bucket(head_dim), head_dim_bucket(head_dim_v))
    if kernel in BWD_TILES:
        if not BACKWARD:
            return None
        tiles = BWD_TILES[kernel].get(b, ())
        if (kernel == "bwd_dkdv" and b >= 64 and variant & VF_DROPOUT) or (
                kernel == "bwd_dq" and b == 128 and variant & (VF_BIAS | VF_MASK)
                and variant & (VF_DROPOUT | VF_SEQ)):
            # at MT = 2 these spill 20-188 bytes at 255 registers (kernel check,
            # sm_90a); at MT = 1 every combination fits but the heaviest dK/dV
            # one on sm_80 (all of bias, mask, dbias, dropout, window, softcap,
            # ALiBi and sequences: 8 bytes)
            tiles = ((4, 1),)
        for w, mt in tiles:
            s = bwd_spec(kernel, dtype, head_dim, head_dim_v, variant, w, mt)
            if smem_bytes(s) <= smem_limit:
                return s
        return None
    if kernel != "fwd" or variant & VF_SPLIT:
        return None
    for w in NWARPS[b]:
        s = fwd_spec(dtype, head_dim, head_dim_v, variant, w)
        if smem_bytes(s) <= smem_limit:
            return s
    return None


def source(s: KernelSpec) -> str:
    return "f64mma/fwd.cuh" if s.kernel == "fwd" else "f64mma/bwd.cuh"


def name_expression(s: KernelSpec) -> str:
    dims = f"{s.head_dim}, {s.head_dim_v}, {s.nwarps}, {s.rows // 8}, {s.variant}"
    if s.kernel == "fwd":
        return f"fc_f64mma_fwd<double, double, {dims}>"
    return f"fc_f64mma_{s.kernel}<double, double, double, {dims}>"


def tile_rows(s: KernelSpec) -> int:
    return s.nwarps * s.rows


def smem_bytes(s: KernelSpec) -> int:
    """The *Smem structs of cuda_src/f64mma (the kernel check asserts they agree)."""
    m = s.nwarps * s.rows
    hd, hdv = s.head_dim + PAD, s.head_dim_v + PAD
    if s.kernel == "fwd":
        return 8 * (m * hd + BLOCK_N * hd + BLOCK_N * hdv)
    extra = 2 * BLOCK_N if s.kernel == "bwd_dkdv" else 0  # (LSE and delta of a query tile)
    return 8 * (m * (hd + hdv) + BLOCK_N * (hd + hdv) + extra)


_SMEM_STRUCT = {"fwd": "FwdSmem", "bwd_dq": "DqSmem", "bwd_dkdv": "DkdvSmem"}


def smem_expression(s: KernelSpec):
    return (f"f64mma::{_SMEM_STRUCT[s.kernel]}<{s.head_dim}, {s.head_dim_v}, {s.nwarps}, "
            f"{s.rows // 8}>::SIZE * sizeof(double)")


def runs_on(s: KernelSpec, arch: str) -> bool:
    """sm_80 and newer; the D = 256 tile only where its shared memory fits."""
    from .._spec import SMEM_LIMIT_SM80, SMEM_LIMIT_SM90

    limit = SMEM_LIMIT_SM90 if arch.startswith("sm_9") else SMEM_LIMIT_SM80
    return smem_bytes(s) <= limit


def shipped_specs(variants=(0,)) -> list:
    out = []
    for vf in variants:
        if vf & VF_SPLIT:
            continue
        for b in HEAD_DIM_BUCKETS:
            out.extend(fwd_spec("fp64", b, b, vf, w) for w in NWARPS[b])
            if vf & VF_PAGED:
                continue  # (the backward has no paged K / V)
            for kernel, table in BWD_TILES.items():
                out.extend(bwd_spec(kernel, "fp64", b, b, vf, w, mt) for w, mt in table.get(b, ()))
    return list(dict.fromkeys(out))
