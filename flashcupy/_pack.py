"""GQA packing: a query-head group folded into the rows of one problem.

With q ``(..., Hkv, G, Sq, D)`` against k, v ``(..., Hkv, 1, Sk, D)`` (GQA /
MQA by broadcasting, or SDPA's ``enable_gqa`` after flashcupy.torch splits the
heads), the G x Sq query rows of a group attend to the same keys.  Seen as one
problem of G * Sq rows per K/V head, every K/V tile is read once per group
instead of once per query head: the decode case (Sq of 1 to 16 against a long
cache), where a 64-row tile otherwise holds one useful row and the G heads
stream the same bytes G times (FlashAttention-3 and FlashInfer pack decode
rows the same way).

The fold is exact when a row's result does not depend on its position or head
inside the group:
- no position-dependent mask: no window, and causal only for Sq = 1 (its one
  row sees every key, bottom-right aligned);
- no per-head terms: no ALiBi slopes, sink, bias or mask;
- no dropout (its bits are keyed by the row and head).
and when q's group axis merges with its row axis in memory (stride of G =
Sq x the row stride, true for a contiguous q; any stride at Sq = 1) and k, v
have size 1 there.

The transformation is on a validated problem and its arrays (``fold``), just
before planning; a plan built on the folded views replays on the caller's
arrays (the same pointers).  The forward only, so far.
"""
from __future__ import annotations

import dataclasses

import numpy as np


def fold(prob, env):
    """``(prob, env)`` with the last batch axis (the group) folded into the
    rows, or None where the fold does not apply (see the module docstring)."""
    from . import _config

    mode = _config.gqa_mode()
    if mode == "off" or (mode == "auto" and prob.seqlen_q > _config.GQA_AUTO_MAX_ROWS):
        return None
    f = prob.features
    nb = len(prob.bshape)
    a = nb - 1  # the group: the batch axis next to the rows
    if a < 0 or prob.bshape[a] < 2 or "cu_q" in prob.seq_words:
        return None
    if f.seq and a == 0:
        return None  # (axis 0 is the kernels' sequence axis: never folded)
    if f.alibi or f.sink or f.bias or f.mask or f.dropout or f.window_left is not None:
        return None
    q, k, v, o, lse = (env[n] for n in ("q", "k", "v", "o", "lse"))
    sq, g = prob.seqlen_q, prob.bshape[a]
    if f.window_right is not None and not (sq == 1 and f.window_right >= 0):
        return None  # (Sq = 1: a right side >= 0 keeps every key of the one row)
    if not (q.ndim == k.ndim == v.ndim == nb + 2 and q.shape[a] == g
            and k.shape[a] == 1 and v.shape[a] == 1):
        return None
    # the folded rows: the group axis at Sq = 1 (any stride), else group x rows,
    # which must merge in memory
    if sq == 1:
        row_stride = q.strides[a]
    elif q.strides[a] == sq * q.strides[-2]:
        row_stride = q.strides[-2]
    else:
        return None
    if not (o.flags.c_contiguous and lse.flags.c_contiguous):
        return None
    if isinstance(q, np.ndarray):  # (the CPU tests fold NumPy arrays)
        as_strided = np.lib.stride_tricks.as_strided
    else:
        from cupy.lib.stride_tricks import as_strided
    cut = (slice(None),) * a + (0,)
    env = dict(env, q=as_strided(q, q.shape[:a] + (g * sq, q.shape[-1]),
                                 q.strides[:a] + (row_stride, q.strides[-1])),
               k=k[cut], v=v[cut], o=o.reshape(o.shape[:a] + (g * sq, o.shape[-1])),
               lse=lse.reshape(lse.shape[:a] + (g * sq,)))
    feats = dataclasses.replace(f, window_right=None) if sq == 1 else f
    return dataclasses.replace(prob, bshape=prob.bshape[:a], seqlen_q=g * sq,
                               features=feats), env
