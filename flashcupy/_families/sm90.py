"""The sm90 family: float16/bfloat16 with warpgroup MMA (wgmma, sm_90a only).

Kernels: cuda_src/sm90/fwd.cuh (fc_sm90_fwd) and cuda_src/sm90/bwd.cuh
(fc_sm90_bwd_dkdv, fc_sm90_bwd_dkdvq: every backward product on wgmma), with
the sm80 family's parameters and launch geometry.  Its tiles are whole
64-column panels (128-byte swizzle), so it has head-dim buckets 64 and 128
only; everything else a call needs (other buckets, the deterministic dQ pass,
the bandwidth kernels) comes from the sm80 table.

Figures: H100 bf16 TFLOP/s at S = 1k / 4k / 16k (batch*S = 16k, H*D = 2048),
from the kernel harness (benchmarks/dev/NOTES.md section 8).
"""
from __future__ import annotations

from .._spec import (VF_ALIBI, VF_BIAS, VF_BIAS_ACC, VF_MASK, VF_SOFTCAP, KernelSpec,
                     head_dim_bucket)
from . import sm80

NAME = "sm90"

# (BLOCK_M, BLOCK_N, NWARPS, STAGES)
FWD_TILES = {
    64: [(64, 64, 4, 2)],   # one warpgroup, several CTAs per SM: 305/359/371, causal
                            # 235/320/350 vs 128x64x8w (2 CTAs/SM) 293/345/360, 128x128x8w
                            # (1 CTA/SM) 251/307/325, mma.sync 128x64x4w 253/304/312
    128: [(64, 64, 4, 2)],  # 329/425/413, causal 253/353/444 vs 128x128x8w 321/399/433,
                            # 242/344/431 and mma.sync 128x64x4w 267/332/357
}
# "no-softcap+alibi": softcap together with ALiBi adds enough per-score terms that
# these 255-register bodies spill (4-60 bytes, kernel check); such calls take the
# sm80 table's tile.
DKDV_TILES = {  # deterministic dK/dV: whole deterministic backward at 4k / 16k
    64: [(64, 128, 8, 2, "no-softcap+alibi")],   # 238/234, causal 209/237 vs mma.sync
                                                 # 207/218, 187/204
    128: [(64, 128, 8, 2, "no-softcap+alibi")],  # 279/275, causal 259/284 vs 263/268,
                                                 # 230/262
}
DKDVQ_TILES = {  # dK/dV + atomic dQ (the default backward), 4k / 16k
    64: [(128, 128, 8, 2, "no-softcap+alibi")],
                             # S / dP in two 64-key passes (no spill): 320/338, causal
                             # 273/333 vs 307/328, 263/321 for 64x128; 162 KB
    128: [(64, 128, 8, 2, "no-softcap+alibi")],
                             # 408/418, causal 331/406 vs 353/379, 306/364 (mma.sync 2-D);
                             # with the bulk dQ 371/396: its staging barrier stalls the
                             # asynchronous products
}
TABLES = {"fwd": FWD_TILES, "bwd_dkdv": DKDV_TILES, "bwd_dkdvq": DKDVQ_TILES}
_KERNEL_NAMES = {"fwd": "fc_sm90_fwd", "bwd_dkdv": "fc_sm90_bwd_dkdv",
                 "bwd_dkdvq": "fc_sm90_bwd_dkdvq"}


def supports(dtype: str, cc: int) -> bool:
    return dtype in ("fp16", "bf16") and cc == 90


def source(s: KernelSpec) -> str:
    return "sm90/fwd.cuh" if s.kernel == "fwd" else "sm90/bwd.cuh"


def name_expression(s: KernelSpec) -> str:
    return (f"{_KERNEL_NAMES[s.kernel]}<{sm80.STORAGE[s.dtype]}, {s.head_dim}, {s.head_dim_v}, "
            f"{s.block_m}, {s.block_n}, {s.nwarps}, {s.stages}, {s.variant}>")


tile_rows = sm80.tile_rows


def smem_bytes(s: KernelSpec) -> int:
    """Dynamic shared memory (bytes): FwdWgCfg / DkdvWgCfg of cuda_src/sm90."""
    hd, hdv, bm, bn, st = s.head_dim, s.head_dim_v, s.block_m, s.block_n, s.stages
    if s.kernel == "fwd":
        # Q | K[2] | V[2], swizzled, no pad | bias[2], mask[2] (rows padded by 16 bytes)
        bias_e = 4 if s.variant & VF_BIAS_ACC else 2 if s.variant & VF_BIAS else 0
        stage = 2 * bm * ((bias_e * bn + 16 if bias_e else 0) +
                          (bn + 16 if s.variant & VF_MASK else 0))
        return 2 * (bm * hd + 2 * bn * (hd + hdv)) + stage
    # K, V | STAGES x (Q, dO, lse, delta), rounded up to 1 KB | P, dS; all swizzled
    ring = 2 * bn * (hd + hdv) + st * (2 * bm * (hd + hdv) + 8 * bm)
    return -(-ring // 1024) * 1024 + 4 * bm * bn


def smem_expression(s: KernelSpec):
    hd, hdv, bm, bn, nw, st = s.head_dim, s.head_dim_v, s.block_m, s.block_n, s.nwarps, s.stages
    if s.kernel == "fwd":
        return f"sm80::FwdWgCfg<{hd}, {hdv}, {bm}, {bn}, {nw}, {s.variant}>::SMEM_BYTES"
    atomic = "true" if s.kernel == "bwd_dkdvq" else "false"
    return f"sm80::DkdvWgCfg<{hd}, {hdv}, {bm}, {bn}, {nw}, {st}, {atomic}, false>::SMEM_BYTES"


def pick(kernel, dtype, head_dim, head_dim_v, variant, smem_limit, cc=90):
    """A wgmma tile where one exists and runs (sm_90a, whole 64-column panels, the
    shared memory fits), else the sm80 table's choice."""
    hd, hdv = head_dim_bucket(head_dim), head_dim_bucket(head_dim_v)
    if cc == 90 and kernel in TABLES and hd % 64 == 0 and hdv % 64 == 0:
        for tile in TABLES[kernel].get(max(hd, hdv), ()):
            if "no-softcap+alibi" in tile and variant & VF_SOFTCAP and variant & VF_ALIBI:
                continue
            s = sm80.tile_spec(kernel, dtype, hd, hdv, tile[:4], variant, family=NAME)
            if smem_bytes(s) <= smem_limit:
                return s
    return sm80.pick(kernel, dtype, head_dim, head_dim_v, variant, smem_limit, cc)


def runs_on(s: KernelSpec, arch: str) -> bool:
    return arch == "sm_90a"  # a wgmma kernel built for any other target does not compile


def shipped_specs(variants=(0,)) -> list:
    out = []
    for dtype in ("fp16", "bf16"):
        for vf in variants:
            for kernel, table in TABLES.items():
                for b, tiles in table.items():
                    for tile in tiles:
                        if "no-softcap+alibi" in tile and vf & VF_SOFTCAP and vf & VF_ALIBI:
                            continue
                        out.append(sm80.tile_spec(kernel, dtype, b, b, tile[:4], vf, family=NAME))
    return list(dict.fromkeys(out))
