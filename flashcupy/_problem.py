"""A validated attention call: :class:`Features` (the variant) and :class:`Problem`.

Both are frozen: validation in ``api.py`` builds them once per call signature,
planning reads them, and a plan replays them.  ``Features`` is the host half of
cuda_src/variant.cuh: every variant is a field here, a flag of
:meth:`Features.flags` and fields of the kernels' ``VariantArgs``
(:meth:`Features.kernel_args`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from . import _dtypes
from . import _philox
from ._spec import (VF_ALIBI, VF_BIAS, VF_BIAS_ACC, VF_DBIAS, VF_DBIAS_STORE, VF_DROPOUT,
                    VF_LEFT, VF_MASK, VF_PAGED, VF_RIGHT, VF_SEQ, VF_SINK, VF_SOFTCAP)

LOG2E = 1.4426950408889634


@dataclass(frozen=True)
class Features:
    """Which (query, key) pairs exist and what their scores are.

    window_left / window_right: the window of query i is keys
        i + Sk - Sq - left .. i + Sk - Sq + right; None is unbounded.  Causal
        attention is right = 0, so ``causal=True`` is folded in here.
    softcap: c > 0 or None: s -> c * tanh(s / c).
    alibi: slopes are given (an array travels beside the features).
    sink: a sink logit per batch element is given.
    bias: None, "t" (an additive bias in the inputs' dtype) or "acc" (in the
        accumulator's dtype, float32 beside 16-bit inputs).
    mask: a boolean mask is given.
    bias_grad: the backward also returns the bias's gradient.
    dbias_store: ... and stores it, one writer per element (a full-shape bias
        whose gradient has the kernels' bias type), instead of adding it.
    dropout: the dropout probability p (0: off); the seed and offset are
        per-call values, not features (a plan replays them from its
        environment).
    seq: per-sequence lengths and first rows (a packed batch or a KV cache;
        cuda_src/seq.cuh); Problem.seqlen_q / seqlen_k are then the longest.
    paged: the forward reads K / V rows through a block table.
    """

    window_left: int | None = None
    window_right: int | None = None
    softcap: float | None = None
    alibi: bool = False
    sink: bool = False
    bias: str | None = None
    mask: bool = False
    bias_grad: bool = False
    dbias_store: bool = False
    dropout: float = 0.0
    seq: bool = False
    paged: bool = False

    @property
    def local(self) -> bool:
        return self.window_left is not None or self.window_right is not None

    def flags(self, forward: bool = True) -> int:
        """The kernels' VF template argument (the backward has no sink term)."""
        return ((VF_RIGHT if self.window_right is not None else 0)
                | (VF_LEFT if self.window_left is not None else 0)
                | (VF_SOFTCAP if self.softcap else 0)
                | (VF_ALIBI if self.alibi else 0) | (VF_SINK if self.sink and forward else 0)
                | (VF_BIAS if self.bias == "t" else VF_BIAS_ACC if self.bias else 0)
                | (VF_MASK if self.mask else 0)
                | (VF_DBIAS if self.bias_grad and not forward else 0)
                | (VF_DBIAS_STORE if self.bias_grad and self.dbias_store and not forward else 0)
                | (VF_DROPOUT if self.dropout > 0 else 0)
                | (VF_SEQ if self.seq else 0) | (VF_PAGED if self.paged and forward else 0))

    def kernel_args(self, seqlen_q: int, seqlen_k: int, scale: float) -> dict:
        """The scalar fields of the kernels' VariantArgs (params.cuh).  An
        unbounded side is clamped to the whole row (left Sk, right Sq), which
        admits every key and keeps the bounds far from int overflow; a negative
        side is clamped where it empties every row."""
        # (a side below -Sq (left) or -Sk (right) already empties every row: clamped
        # there, any int keeps its meaning and the kernels' bounds stay in int range)
        left = seqlen_k if self.window_left is None else max(-seqlen_q,
                                                             min(self.window_left, seqlen_k))
        right = seqlen_q if self.window_right is None else max(-seqlen_k,
                                                               min(self.window_right, seqlen_q))
        args = {"var.window_left": left, "var.window_right": right}
        if self.softcap:
            args["var.softcap_inv2"] = 2.0 * LOG2E * scale / self.softcap
            args["var.softcap_log2"] = self.softcap * LOG2E
        if self.dropout > 0:
            args["var.dropout_threshold"] = _philox.dropout_threshold(self.dropout)
            args["var.dropout_rp"] = 1.0 / (1.0 - self.dropout)
            args["var.dropout_keep"] = 1.0 - self.dropout
        return args


@dataclass(frozen=True)
class Problem:
    """A validated attention problem: everything the launchers need."""

    bshape: tuple
    seqlen_q: int
    seqlen_k: int
    head_dim: int
    head_dim_v: int
    scale: float
    features: Features
    dtype: np.dtype
    acc_dtype: np.dtype
    device_id: int
    cc: int
    family: str
    # Sequences (features.seq): the packed lengths (total_q, total_k) of a
    # varlen batch (() for a KV cache), the environment names of SeqArgs'
    # per-call pointers, and its scalar fields ({"seq.x": value} as a tuple).
    packed: tuple = ()
    seq_words: tuple = ()
    seq_scalars: tuple = ()

    @property
    def dtype_name(self) -> str:
        return _dtypes.info(self.dtype).name

    @property
    def acc_bytes(self) -> int:
        return np.dtype(self.acc_dtype).itemsize

    @property
    def nbatch(self) -> int:
        return math.prod(self.bshape)

    @property
    def empty(self) -> bool:
        return self.nbatch == 0 or self.seqlen_q == 0 or self.seqlen_k == 0

    def scalars(self) -> dict:
        """The scalar fields shared by FwdParams and BwdParams."""
        return {"seqlen_q": self.seqlen_q, "seqlen_k": self.seqlen_k,
                "head_dim": self.head_dim, "head_dim_v": self.head_dim_v,
                "scale": self.scale, "scale_log2": self.scale * LOG2E,
                **self.features.kernel_args(self.seqlen_q, self.seqlen_k, self.scale),
                **dict(self.seq_scalars)}
