"""What a compiled kernel is: :class:`KernelSpec`, head-dim buckets, limits.

A spec names everything that is a C++ template parameter of a kernel: family,
dtype, head-dim buckets, warps, tile sizes, variant flags.  Its readable ``key``
is also the memoization key of the compiled kernel.  The family modules
(``flashcupy/_families``) turn a spec into a source file, a name expression and
a shared-memory size; ``flashcupy/_config.py`` picks the family.  This module
imports neither (no import cycle).
"""
from __future__ import annotations

from dataclasses import dataclass

HEAD_DIM_BUCKETS = (32, 64, 128, 256)
MAX_HEAD_DIM = HEAD_DIM_BUCKETS[-1]

# Shared-memory ceilings per block (bytes), with the opt-in above 48 KB.
SMEM_LIMIT_CONSUMER = 99 * 1024   # sm_86 / sm_89
SMEM_LIMIT_SM80 = 163 * 1024      # A100
SMEM_LIMIT_SM90 = 227 * 1024      # H100 / H200

# Variant flags: the VF template parameter of every attention kernel
# (cuda_src/variant.cuh).  The backward never needs SINK (the sink reaches it
# through the LSE), so backward specs drop it.
# The window's two sides are two flags: causal attention (right side only)
# compiles to one bound per row, as before windows existed.
VF_RIGHT, VF_SOFTCAP, VF_ALIBI, VF_SINK, VF_LEFT = 1, 2, 4, 8, 16
# An additive bias stored in the input dtype (VF_BIAS) or in the accumulator's
# (VF_BIAS_ACC: float32 beside 16-bit inputs), a boolean mask, and, in the
# backward only, the bias's gradient.
VF_BIAS, VF_MASK, VF_DBIAS, VF_BIAS_ACC = 32, 64, 128, 256
# Dropout on the probabilities (Philox bits, flashcupy/_philox.py).
VF_DROPOUT = 512
# With VF_DBIAS: dS stored into a full-shape bias's gradient, not added (one
# writer per element).
VF_DBIAS_STORE = 1024
# Sequences (cuda_src/seq.cuh): per-sequence lengths and first rows (packed
# batches, KV caches), and, in the forward, K / V rows through a block table.
VF_SEQ, VF_PAGED = 2048, 4096
# Split-KV (cuda_src/split.cuh): the forward of one query tile over several
# CTAs by key range, each writing float32 partial results for the combine.
VF_SPLIT = 8192
VF_LOCAL = VF_LEFT | VF_RIGHT  # a two-sided sliding window
_VF_NAMES = ((VF_RIGHT, "right"), (VF_LEFT, "left"), (VF_SOFTCAP, "softcap"),
             (VF_ALIBI, "alibi"), (VF_SINK, "sink"), (VF_BIAS, "bias"),
             (VF_BIAS_ACC, "bias32"), (VF_MASK, "mask"), (VF_DBIAS, "dbias"),
             (VF_DROPOUT, "dropout"), (VF_DBIAS_STORE, "dbias-store"),
             (VF_SEQ, "seq"), (VF_PAGED, "paged"), (VF_SPLIT, "split"))


def variant_names(vf: int) -> list:
    return [n for bit, n in _VF_NAMES if vf & bit]


def head_dim_bucket(d: int) -> int:
    """Smallest compiled head-dim bucket that holds ``d`` columns."""
    for b in HEAD_DIM_BUCKETS:
        if d <= b:
            return b
    raise ValueError(f"head dim {d} exceeds the largest supported ({MAX_HEAD_DIM})")


@dataclass(frozen=True)
class KernelSpec:
    family: str          # "generic" | "sm80" | "sm90" | "f64mma"
    kernel: str          # "fwd" | "bwd_preprocess" | "bwd_dq" | "bwd_dkdv" | family extras
    dtype: str           # "fp16" | "bf16" | "fp32" | "fp64" (see _dtypes)
    head_dim: int = 0    # compile-time bucket of D
    head_dim_v: int = 0  # compile-time bucket of Dv
    nwarps: int = 4
    rows: int = 0        # generic: query rows (or keys, in dK/dV) per warp
    block_m: int = 0     # tensor-core families: query tile
    block_n: int = 0     # tensor-core families: key tile
    stages: int = 0      # tensor-core families: cp.async pipeline depth
    variant: int = 0     # VF_* flags (window/causal, softcap, ALiBi, sink)
    grad_dtype: str = ""  # store type of gradients when it differs from dtype ("" = same)
    extra: tuple = ()    # family-specific tile flags, in order

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
        parts.extend(variant_names(self.variant))
        if self.grad_dtype:
            parts.append(f"g{self.grad_dtype}")
        parts.extend(str(e) for e in self.extra)
        return ".".join(parts)

    @property
    def threads(self) -> int:
        return 32 * self.nwarps

    @property
    def acc_bytes(self) -> int:
        return 8 if self.dtype == "fp64" else 4
