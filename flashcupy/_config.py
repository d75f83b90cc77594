"""Kernel specializations, and the one table that picks them.

A :class:`KernelSpec` names everything that is a C++ template parameter of a
kernel: family, dtype, head-dim buckets, warps, tile sizes.  Its readable
``key`` is also the memoization key of the compiled kernel.

``select_*`` functions are the only place where tile sizes are chosen; each
row of the tables below carries the reason for its choice.
"""
from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass

from . import _dtypes

HEAD_DIM_BUCKETS = (32, 64, 128, 256)
MAX_HEAD_DIM = HEAD_DIM_BUCKETS[-1]
FAMILIES = ("generic", "sm80")

# Shared-memory ceilings per block (bytes), with the opt-in above 48 KB.
SMEM_LIMIT_CONSUMER = 99 * 1024   # sm_86 / sm_89
SMEM_LIMIT_SM80 = 163 * 1024      # A100
SMEM_LIMIT_SM90 = 227 * 1024      # H100


def head_dim_bucket(d: int) -> int:
    """Smallest compiled head-dim bucket that holds ``d`` columns."""
    for b in HEAD_DIM_BUCKETS:
        if d <= b:
            return b
    raise ValueError(f"head dim {d} exceeds the largest supported ({MAX_HEAD_DIM})")


@dataclass(frozen=True)
class KernelSpec:
    family: str          # "generic" | "sm80"
    kernel: str          # "fwd" | "bwd_preprocess" | "bwd_dq" | "bwd_dkdv" | family extras
    dtype: str           # "fp16" | "bf16" | "fp32" | "fp64" (see _dtypes)
    head_dim: int = 0    # compile-time bucket of D
    head_dim_v: int = 0  # compile-time bucket of Dv
    nwarps: int = 4
    rows: int = 0        # generic: query rows (or keys, in dK/dV) per warp
    block_m: int = 0     # tensor-core families: query tile
    block_n: int = 0     # tensor-core families: key tile
    stages: int = 0      # tensor-core families: cp.async pipeline depth
    causal: bool = False  # tensor-core families specialize on the mask
    grad_dtype: str = ""  # store type of gradients when it differs from dtype ("" = same)
    extra: tuple = ()    # family-specific template arguments, in order

    # -- naming -----------------------------------------------------------------
    @property
    def key(self) -> str:
        parts = [self.family, self.kernel, self.dtype]
        if self.head_dim:
            parts.append(f"d{self.head_dim}x{self.head_dim_v}")
        parts.append(f"w{self.nwarps}")
        if self.rows:
            parts.append(f"r{self.rows}")
        if self.block_m:
            parts.append(f"m{self.block_m}n{self.block_n}s{self.stages}")
        if self.causal:
            parts.append("causal")
        if self.grad_dtype:
            parts.append(f"g{self.grad_dtype}")
        parts.extend(str(e) for e in self.extra)
        return ".".join(parts)

    @property
    def threads(self) -> int:
        return 32 * self.nwarps

    @property
    def source(self) -> str:
        """The cuda_src file that defines this kernel."""
        if self.family == "generic":
            return "generic/fwd.cuh" if self.kernel == "fwd" else "generic/bwd.cuh"
        from . import _config_sm80
        return _config_sm80.source(self)

    @property
    def name_expression(self) -> str:
        if self.family != "generic":
            from . import _config_sm80
            return _config_sm80.name_expression(self)
        info = _dtypes.info(_dtypes.BY_NAME[self.dtype])
        t, acc = info.storage, info.acc
        if self.kernel == "fwd":
            return (f"fc_generic_fwd<{t}, {acc}, {self.head_dim}, {self.head_dim_v}, "
                    f"{self.nwarps}, {self.rows}>")
        if self.kernel == "bwd_preprocess":
            return f"fc_generic_bwd_preprocess<{t}, {acc}, {self.nwarps}>"
        tg = _dtypes.info(_dtypes.BY_NAME[self.grad_dtype]).storage if self.grad_dtype else t
        return (f"fc_generic_{self.kernel}<{t}, {acc}, {tg}, {self.head_dim}, "
                f"{self.head_dim_v}, {self.nwarps}, {self.rows}>")

    # -- launch geometry --------------------------------------------------------
    @property
    def acc_bytes(self) -> int:
        return 8 if self.dtype == "fp64" else 4

    @property
    def tile_rows(self) -> int:
        """Rows of the sequence axis one CTA owns (queries, or keys for dK/dV)."""
        if self.family == "generic":
            return self.nwarps if self.kernel == "bwd_preprocess" else self.nwarps * self.rows
        if self.kernel == "bwd_dq_convert":
            return 4 * self.nwarps  # cuda_src/sm80/bwd.cuh: 4 rows per warp
        if self.kernel == "bwd_preprocess":  # HDV / 8 lanes (at least 4) per row
            return self.nwarps * 32 // max(4, self.head_dim_v // 8)
        return self.block_n if self.kernel in ("bwd_dkdv", "bwd_dkdvq") else self.block_m

    @property
    def smem_bytes(self) -> int:
        """Dynamic shared memory; mirrors the *Smem structs in cuda_src/generic."""
        if self.family != "generic":
            from . import _config_sm80
            return _config_sm80.smem_bytes(self)
        a = self.acc_bytes
        pad = 16 // a
        hd, hdv = self.head_dim, self.head_dim_v
        m = self.nwarps * self.rows
        if self.kernel == "fwd":
            return a * (m * hd + 32 * (hd + pad) + 32 * hdv)
        if self.kernel == "bwd_dq":
            return a * (m * (hd + hdv) + 32 * (hd + pad) + 32 * (hdv + pad))
        if self.kernel == "bwd_dkdv":
            return a * (m * (hd + hdv) + 32 * (hd + pad) + 32 * (hdv + pad) + 64)
        return 0


# ---------------------------------------------------------------------------
# The generic (FMA) family: rows per warp by (accumulator, kernel, bucket).
# Bucket = max(HD, HDV), which sets both the register file use (ROWS * HDV/32
# accumulators per lane) and shared memory.  All generic kernels use 4 warps:
# 128-thread CTAs let several CTAs share an SM, which hides the latency of the
# plain (non-pipelined) tile loads.  The kernels declare __launch_bounds__(128, 1):
# with a higher minimum of CTAs per SM ptxas capped registers at 80-168 and
# spilled (kernel check), without it it spilled a few bytes at 96-128 registers.
# ---------------------------------------------------------------------------
GENERIC_ROWS = {
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
    ("f32", "bwd_dkdv"): {32: 8, 64: 8, 128: 8,  # 66 KB smem at 128, 64 accumulators per lane
                          256: 4},               # 98 KB smem
    ("f64", "bwd_dkdv"): {32: 8, 64: 8,          # 67 KB smem at 64
                          128: 2,                # 84 KB smem (4 rows would be 100 KB, over sm_86's 99)
                          256: 1},               # 149 KB: per-lane Q, dO tiles are 132 KB (sm_80/90 only)
}
GENERIC_PREPROCESS_WARPS = 8
# The dK/dV kernels sum the query heads that share a KV head (GQA/MQA groups) in
# registers, sequentially in the accumulator type.  Up to GROUP_MAX of them per
# CTA: that bounds the sequential fp32 sum (error grows with its length; a group
# of 70,000 heads lost 1.5e-5 relative in a test), and spreads larger groups
# over more CTAs; their partial sums are added by a pairwise CuPy reduction.
GROUP_MAX = 16


def group_max(family: str) -> int:
    """GQA/MQA heads one dK/dV CTA sums.  The tensor-core kernels store dK/dV
    in the input dtype only (a split would need float32 partial buffers), and
    for float16/bfloat16 outputs the sequential float32 sum's error stays far
    below the output rounding: no cap."""
    return GROUP_MAX if family == "generic" else 1 << 30  # one warp per row, 8 rows per CTA: a pure bandwidth kernel


def generic_spec(kernel: str, dtype: str, head_dim: int = 0, head_dim_v: int = 0,
                 grad_dtype: str = "") -> KernelSpec:
    if kernel == "bwd_preprocess":
        return KernelSpec("generic", kernel, dtype, nwarps=GENERIC_PREPROCESS_WARPS)
    hd, hdv = head_dim_bucket(head_dim), head_dim_bucket(head_dim_v)
    acc = "f64" if dtype == "fp64" else "f32"
    rows = GENERIC_ROWS[(acc, kernel)][max(hd, hdv)]
    return KernelSpec("generic", kernel, dtype, hd, hdv, nwarps=4, rows=rows,
                      grad_dtype=grad_dtype if grad_dtype != dtype else "")


# ---------------------------------------------------------------------------
# Family choice.
# ---------------------------------------------------------------------------
_FORCED = contextvars.ContextVar("flashcupy_kernel_family", default="auto")


@contextlib.contextmanager
def kernel_family(name: str):
    """Force a kernel family inside a ``with`` block.

    ``"auto"`` (the default) picks the fastest family for the inputs:
    ``"sm80"`` (tensor cores) for float16/bfloat16 on compute capability 8.0
    and newer, ``"generic"`` (plain FMA) otherwise.  Forcing a family that
    cannot run the inputs raises ``ValueError`` at the call.
    """
    if name not in ("auto",) + FAMILIES:
        raise ValueError(f"kernel_family: expected one of {('auto',) + FAMILIES}, got {name!r}")
    token = _FORCED.set(name)
    try:
        yield
    finally:
        _FORCED.reset(token)


def current_family() -> str:
    """The family forced by the innermost ``kernel_family`` block, or "auto"."""
    return _FORCED.get()


def family_supports(family: str, dtype: str, cc: int) -> bool:
    if family == "generic":
        return True
    if family == "sm80":
        from . import _config_sm80
        return _config_sm80.AVAILABLE and dtype in ("fp16", "bf16") and cc >= 80
    return False


def families_for(dtype: str, cc: int) -> tuple:
    return tuple(f for f in FAMILIES if family_supports(f, dtype, cc))


def choose_family(dtype: str, cc: int) -> str:
    forced = _FORCED.get()
    if forced == "auto":
        return "sm80" if family_supports("sm80", dtype, cc) else "generic"
    if not family_supports(forced, dtype, cc):
        raise ValueError(
            f"kernel family {forced!r} cannot run {dtype} inputs on a compute capability "
            f"{cc // 10}.{cc % 10} GPU; it runs on: {families_for(dtype, cc)}")
    return forced
