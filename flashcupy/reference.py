"""Float64 NumPy references for attention, forward and backward.

Two implementations, both on the CPU in float64 whatever the input dtype:

``attention_naive`` / ``attention_backward_naive``
    The textbook formulas.  They materialize the (Sq, Sk) score matrix, so they
    are exact (up to float64 rounding) and obviously right; use them as the
    ground truth.

``attention_tiled`` / ``attention_backward_tiled``
    The FlashAttention-2 algorithm written block by block, exactly as the CUDA
    kernels in ``cuda_src/`` do it: a query tile stays put while key/value
    tiles stream past, an online softmax keeps a running max ``m_i`` and a
    running sum ``l_i`` in log2 units, and nothing of size Sq x Sk is ever
    stored.  It is slow (Python loops over tiles) and exists to document the
    algorithm and to prove that the tiling itself is correct, independently of
    any GPU.

Conventions shared by all four functions (and by ``flashcupy.attention``):

* ``q`` has shape ``(..., Sq, D)``, ``k`` ``(..., Sk, D)``, ``v`` ``(..., Sk, Dv)``.
  Leading (batch) dims broadcast like ``numpy.matmul``: a key/value head axis
  of size 1 is multi-query attention, ``(B, Hkv, 1, S, D)`` against a query of
  shape ``(B, Hkv, G, S, D)`` is grouped-query attention.
* ``scale`` defaults to ``1 / sqrt(D)``.
* ``causal`` is bottom-right aligned: query ``i`` sees key ``j`` iff
  ``j <= i + (Sk - Sq)``.  With ``Sq > Sk`` the first ``Sq - Sk`` rows see no
  key: such a row (and every row when ``Sk == 0``) gets ``out = 0``,
  ``lse = -inf`` and zero gradients, never NaN.
* ``lse`` is the row logsumexp of the scaled scores in natural-log units.
* Gradients of broadcast inputs are summed over the broadcast axes, so each
  gradient has the shape of its input.
"""
from __future__ import annotations

import math

import numpy as np

__all__ = [
    "attention_naive",
    "attention_backward_naive",
    "attention_tiled",
    "attention_backward_tiled",
    "causal_mask",
]

LOG2E = 1.4426950408889634  # log2(e): folds exp into exp2, s2 = s * log2(e)
LN2 = 0.6931471805599453    # ln(2): converts a log2-unit LSE back to natural log


# ----------------------------------------------------------------------------
# shared helpers
# ----------------------------------------------------------------------------

def _f64(x) -> np.ndarray:
    """``x`` as a float64 NumPy array (accepts ml_dtypes.bfloat16 and friends)."""
    return np.asarray(x).astype(np.float64)


def _check_shapes(q, k, v):
    if q.ndim < 2 or k.ndim < 2 or v.ndim < 2:
        raise ValueError(
            f"q, k, v need at least 2 dims (..., S, D); got shapes {q.shape}, {k.shape}, {v.shape}")
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q and k must share the head dim D: q {q.shape}, k {k.shape}")
    if k.shape[-2] != v.shape[-2]:
        raise ValueError(f"k and v must share the key length Sk: k {k.shape}, v {v.shape}")
    return np.broadcast_shapes(q.shape[:-2], k.shape[:-2], v.shape[:-2])


def _default_scale(scale, head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim) if scale is None else float(scale)


def causal_mask(seqlen_q: int, seqlen_k: int) -> np.ndarray:
    """Boolean (Sq, Sk) mask, True where query i may see key j (bottom-right)."""
    i = np.arange(seqlen_q)[:, None]
    j = np.arange(seqlen_k)[None, :]
    return j <= i + (seqlen_k - seqlen_q)


def _sum_to_shape(grad: np.ndarray, shape: tuple) -> np.ndarray:
    """Sums ``grad`` over the axes along which an input of ``shape`` was broadcast."""
    extra = grad.ndim - len(shape)
    if extra:
        grad = grad.sum(axis=tuple(range(extra)))
    axes = tuple(i for i, n in enumerate(shape) if n == 1 and grad.shape[i] != 1)
    if axes:
        grad = grad.sum(axis=axes, keepdims=True)
    return grad.reshape(shape)


def _probabilities(s: np.ndarray, lse: np.ndarray) -> np.ndarray:
    """P = exp(s - lse) with -inf scores giving 0 and rows of lse = -inf giving 0."""
    empty = np.isneginf(lse)[..., None]
    with np.errstate(invalid="ignore"):
        p = np.exp(s - np.where(empty, 0.0, lse[..., None]))
    return np.where(empty, 0.0, p)


# ----------------------------------------------------------------------------
# naive: materialize S, exact
# ----------------------------------------------------------------------------

def _scores(q, k, causal, scale):
    """Scaled scores S = scale * Q K^T, -inf where masked; shape (..., Sq, Sk)."""
    s = np.matmul(q, np.swapaxes(k, -1, -2)) * scale
    if causal:
        s = np.where(causal_mask(q.shape[-2], k.shape[-2]), s, -np.inf)
    return s


def attention_naive(q, k, v, causal: bool = False, scale=None):
    """Exact attention in float64.

    Parameters
    ----------
    q : array_like, shape (..., Sq, D)
    k : array_like, shape (..., Sk, D)
    v : array_like, shape (..., Sk, Dv)
    causal : bool
        Bottom-right aligned causal mask.
    scale : float, optional
        Softmax scale; ``1 / sqrt(D)`` by default.

    Returns
    -------
    out : numpy.ndarray, shape (batch..., Sq, Dv), float64
    lse : numpy.ndarray, shape (batch..., Sq), float64
        Natural-log row logsumexp of the scaled scores; ``-inf`` for a row that
        sees no key.  ``batch`` is the broadcast of the three batch shapes.
    """
    q, k, v, batch, scale = _operands(q, k, v, scale)
    s = _scores(q, k, causal, scale)
    m = np.max(s, axis=-1, initial=-np.inf)          # -inf for an empty row
    m_safe = np.where(np.isneginf(m), 0.0, m)        # avoid (-inf) - (-inf)
    l = np.exp(s - m_safe[..., None]).sum(axis=-1)   # 0 for an empty row
    with np.errstate(divide="ignore"):
        lse = np.where(l > 0, m_safe + np.log(l), -np.inf)
    p = _probabilities(s, lse)
    out = np.matmul(p, v)
    return out, lse


def _operands(q, k, v, scale):
    """q, k, v in float64 broadcast to the full batch shape, that shape, and the
    resolved scale."""
    q, k, v = _f64(q), _f64(k), _f64(v)
    batch = _check_shapes(q, k, v)
    scale = _default_scale(scale, q.shape[-1])
    return (np.broadcast_to(q, batch + q.shape[-2:]), np.broadcast_to(k, batch + k.shape[-2:]),
            np.broadcast_to(v, batch + v.shape[-2:]), batch, scale)


def _backward_operands(dout, q, k, v, out, lse, scale):
    """The backward references' common start: the operands of ``_operands`` and
    dout, out, lse broadcast alike, plus the inputs' original shapes (to sum
    gradients back onto)."""
    shapes = (np.shape(q), np.shape(k), np.shape(v))
    q, k, v, batch, scale = _operands(q, k, v, scale)
    dout = np.broadcast_to(_f64(dout), batch + (q.shape[-2], v.shape[-1]))
    out = np.broadcast_to(_f64(out), dout.shape)
    lse = np.broadcast_to(_f64(lse), dout.shape[:-1])
    return shapes, batch, scale, (dout, q, k, v, out, lse)


def attention_backward_naive(dout, q, k, v, out, lse, causal: bool = False, scale=None):
    """Exact gradients of ``attention_naive`` in float64.

    ``out`` and ``lse`` are the forward results (as the kernels get them); P is
    recomputed from ``lse`` and ``delta = rowsum(dout * out)`` uses ``out``.

    Returns
    -------
    dq, dk, dv : numpy.ndarray, float64
        Shaped like ``q``, ``k`` and ``v``: summed over broadcast batch axes.
    """
    (q_shape, k_shape, v_shape), batch, scale, (dout, q, k, v, out, lse) = _backward_operands(
        dout, q, k, v, out, lse, scale)

    p = _probabilities(_scores(q, k, causal, scale), lse)   # (..., Sq, Sk)
    dv = np.matmul(np.swapaxes(p, -1, -2), dout)
    dp = np.matmul(dout, np.swapaxes(v, -1, -2))
    delta = np.sum(dout * out, axis=-1)                      # = rowsum(P * dP)
    ds = p * (dp - delta[..., None])
    dq = np.matmul(ds, k) * scale
    dk = np.matmul(np.swapaxes(ds, -1, -2), q) * scale
    return _sum_to_shape(dq, q_shape), _sum_to_shape(dk, k_shape), _sum_to_shape(dv, v_shape)


# ----------------------------------------------------------------------------
# tiled: FlashAttention-2, block by block, as the kernels do it
# ----------------------------------------------------------------------------

def _key_end(m_start: int, m_end: int, seqlen_q: int, seqlen_k: int, causal: bool) -> int:
    """One past the last key any query row in [m_start, m_end) may see (mask.cuh key_end)."""
    if not causal:
        return seqlen_k
    return max(0, min(seqlen_k, m_end + (seqlen_k - seqlen_q)))


def _query_begin(n_start: int, seqlen_q: int, seqlen_k: int, causal: bool) -> int:
    """First query row that may see any key at or after n_start (mask.cuh query_begin)."""
    if not causal:
        return 0
    return max(0, n_start - (seqlen_k - seqlen_q))


def _tile_scores_log2(q_tile, k_tile, m_start, n_start, seqlen_q, seqlen_k, causal, scale_log2):
    """(BLOCK_M, BLOCK_N) scores in log2 units, -inf where masked.

    Tiles at the sequence end are simply shorter here; the kernels predicate
    the out-of-range rows/columns instead, which is the same thing.
    """
    s2 = (q_tile @ k_tile.T) * scale_log2
    if causal:
        i = np.arange(m_start, m_start + q_tile.shape[0])[:, None]
        j = np.arange(n_start, n_start + k_tile.shape[0])[None, :]
        s2 = np.where(j <= i + (seqlen_k - seqlen_q), s2, -np.inf)
    return s2


def _fwd_one(q, k, v, causal, scale, BLOCK_M, BLOCK_N):
    """Forward for one batch element: q (Sq, D), k (Sk, D), v (Sk, Dv)."""
    seqlen_q, seqlen_k, head_dim_v = q.shape[0], k.shape[0], v.shape[1]
    scale_log2 = scale * LOG2E  # fold log2(e) into the scale once: exp(x) = exp2(x * log2 e)
    out = np.zeros((seqlen_q, head_dim_v))
    lse = np.full(seqlen_q, -np.inf)

    for m_start in range(0, seqlen_q, BLOCK_M):            # one CTA per query tile
        m_end = min(m_start + BLOCK_M, seqlen_q)
        q_tile = q[m_start:m_end]                           # load q: it stays for the whole key loop
        rows = m_end - m_start
        m_i = np.full(rows, -np.inf)                        # running row max of s2; -inf before any key
        l_i = np.zeros(rows)                                # running sum of exp2(s2 - m_i)
        acc_o = np.zeros((rows, head_dim_v))                # (BLOCK_M, Dv) unnormalized output

        # Causal: key tiles wholly right of the diagonal are never visited.
        n_stop = _key_end(m_start, m_end, seqlen_q, seqlen_k, causal)
        for n_start in range(0, n_stop, BLOCK_N):           # K/V tiles stream through
            n_end = min(n_start + BLOCK_N, seqlen_k)
            k_tile, v_tile = k[n_start:n_end], v[n_start:n_end]
            s2 = _tile_scores_log2(q_tile, k_tile, m_start, n_start,
                                   seqlen_q, seqlen_k, causal, scale_log2)

            m_new = np.maximum(m_i, s2.max(axis=1))
            # If every key so far was masked, m_new is -inf and (-inf) - (-inf)
            # would be NaN: subtract 0 instead, so exp2(-inf - 0) = 0.
            m_safe = np.where(np.isneginf(m_new), 0.0, m_new)
            alpha = np.exp2(m_i - m_safe)                   # rescales the old state; 0 when m_i = -inf
            p = np.exp2(s2 - m_safe[:, None])               # (BLOCK_M, BLOCK_N), masked -> 0
            l_i = l_i * alpha + p.sum(axis=1)
            acc_o = acc_o * alpha[:, None] + p @ v_tile     # O += P V
            m_i = m_new

        # Finalize: O / l, and the LSE in natural-log units.  A row that saw
        # no key has l_i = 0: its output is 0 (not 0/0) and its LSE -inf.
        seen = l_i > 0
        inv_l = np.divide(1.0, l_i, out=np.zeros_like(l_i), where=seen)
        out[m_start:m_end] = acc_o * inv_l[:, None]
        log2_l = np.log2(l_i, out=np.full_like(l_i, -np.inf), where=seen)
        lse[m_start:m_end] = np.where(seen, (m_i + log2_l) * LN2, -np.inf)
    return out, lse


def _bwd_one(dout, q, k, v, out, lse, causal, scale, BLOCK_M, BLOCK_N):
    """Backward for one batch element, in the three steps of the kernels."""
    seqlen_q, seqlen_k = q.shape[0], k.shape[0]
    scale_log2 = scale * LOG2E

    # Step 1, preprocess: delta_i = rowsum(dO_i * O_i), which equals
    # rowsum(P_i * dP_i) and turns the softmax Jacobian into one subtraction.
    delta = np.sum(dout * out, axis=1)
    lse2 = lse * LOG2E          # the LSE back in log2 units, like the scores
    empty = np.isneginf(lse2)   # rows that saw no key: P = 0 (not exp2(-inf + inf))

    def probs(q_tile, k_tile, m_start, m_end, n_start):
        """P recomputed from the LSE: exp2(s2 - lse2), already normalized."""
        s2 = _tile_scores_log2(q_tile, k_tile, m_start, n_start, seqlen_q, seqlen_k, causal,
                               scale_log2)
        row_lse2 = np.where(empty[m_start:m_end], 0.0, lse2[m_start:m_end])
        p = np.exp2(s2 - row_lse2[:, None])
        return np.where(empty[m_start:m_end, None], 0.0, p)

    # Step 2: dK, dV.  One CTA per key tile; it holds K_j, V_j and accumulators
    # dK_j, dV_j, and loops over the query tiles that can see it.  No atomics:
    # each key tile is owned by one CTA.
    dk = np.zeros_like(k)
    dv = np.zeros_like(v)
    for n_start in range(0, seqlen_k, BLOCK_N):
        n_end = min(n_start + BLOCK_N, seqlen_k)
        k_tile, v_tile = k[n_start:n_end], v[n_start:n_end]
        acc_dk = np.zeros_like(k_tile)   # (BLOCK_N, D)
        acc_dv = np.zeros_like(v_tile)   # (BLOCK_N, Dv)
        # Causal: query tiles wholly above the diagonal never see this key tile.
        first = _query_begin(n_start, seqlen_q, seqlen_k, causal)
        for m_start in range((first // BLOCK_M) * BLOCK_M, seqlen_q, BLOCK_M):
            m_end = min(m_start + BLOCK_M, seqlen_q)
            q_tile, do_tile = q[m_start:m_end], dout[m_start:m_end]
            p = probs(q_tile, k_tile, m_start, m_end, n_start)   # (BLOCK_M, BLOCK_N)
            acc_dv += p.T @ do_tile                              # dV += P^T dO
            dp = do_tile @ v_tile.T                              # dP = dO V^T
            ds = p * (dp - delta[m_start:m_end, None])           # dS = P * (dP - delta)
            acc_dk += ds.T @ q_tile                              # dK += dS^T Q
        dk[n_start:n_end] = acc_dk * scale                       # d(scale * QK^T)/dK
        dv[n_start:n_end] = acc_dv

    # Step 3: dQ.  One CTA per query tile, looping over the key tiles it sees
    # (the same loop bounds as the forward pass).
    dq = np.zeros_like(q)
    for m_start in range(0, seqlen_q, BLOCK_M):
        m_end = min(m_start + BLOCK_M, seqlen_q)
        q_tile, do_tile = q[m_start:m_end], dout[m_start:m_end]
        acc_dq = np.zeros_like(q_tile)   # (BLOCK_M, D)
        for n_start in range(0, _key_end(m_start, m_end, seqlen_q, seqlen_k, causal), BLOCK_N):
            n_end = min(n_start + BLOCK_N, seqlen_k)
            k_tile, v_tile = k[n_start:n_end], v[n_start:n_end]
            p = probs(q_tile, k_tile, m_start, m_end, n_start)
            ds = p * (do_tile @ v_tile.T - delta[m_start:m_end, None])
            acc_dq += ds @ k_tile                                # dQ += dS K
        dq[m_start:m_end] = acc_dq * scale
    return dq, dk, dv


def attention_tiled(q, k, v, causal: bool = False, scale=None, block_m: int = 64,
                    block_n: int = 64):
    """FlashAttention-2 forward, tile by tile, in float64.

    Same arguments and results as :func:`attention_naive`; ``block_m`` and
    ``block_n`` are the query and key tile sizes (BLOCK_M, BLOCK_N).

    Per query tile (Q_i stays resident) and per key tile (K_j, V_j stream)::

        s2    = Q_i K_j^T * scale * log2(e)          scores in log2 units, -inf if masked
        m_new = max(m_i, rowmax(s2))
        alpha = exp2(m_i - m_new)                    rescale factor for the old state
        P     = exp2(s2 - m_new)
        l_i   = l_i * alpha + rowsum(P)
        O_i   = O_i * alpha + P V_j
        m_i   = m_new

    and at the end ``O_i / l_i`` and ``lse = (m_i + log2 l_i) * ln 2``.
    """
    q, k, v = _f64(q), _f64(k), _f64(v)
    batch = _check_shapes(q, k, v)
    scale = _default_scale(scale, q.shape[-1])
    q = np.broadcast_to(q, batch + q.shape[-2:])
    k = np.broadcast_to(k, batch + k.shape[-2:])
    v = np.broadcast_to(v, batch + v.shape[-2:])
    out = np.zeros(batch + (q.shape[-2], v.shape[-1]))
    lse = np.zeros(batch + (q.shape[-2],))
    for b in np.ndindex(*batch):
        out[b], lse[b] = _fwd_one(q[b], k[b], v[b], causal, scale, block_m, block_n)
    return out, lse


def attention_backward_tiled(dout, q, k, v, out, lse, causal: bool = False, scale=None,
                             block_m: int = 64, block_n: int = 64):
    """FlashAttention-2 backward, tile by tile, in float64.

    Same arguments and results as :func:`attention_backward_naive`.  The three
    steps of the kernels:

    1. preprocess ``delta = rowsum(dO * O)`` per query row;
    2. per key tile j, over the query tiles i that see it, recompute
       ``P_ij = exp2(s2_ij - lse2_i)`` from the saved LSE and accumulate
       ``dV_j += P^T dO_i``, ``dS = P * (dO_i V_j^T - delta_i)``,
       ``dK_j += dS^T Q_i``;
    3. per query tile i, over the key tiles it sees, ``dQ_i += dS K_j``.

    dQ and dK carry the softmax scale.  Nothing of size Sq x Sk is stored.
    """
    (q_shape, k_shape, v_shape), batch, scale, (dout, q, k, v, out, lse) = _backward_operands(
        dout, q, k, v, out, lse, scale)
    dq, dk, dv = np.zeros(q.shape), np.zeros(k.shape), np.zeros(v.shape)
    for b in np.ndindex(*batch):
        dq[b], dk[b], dv[b] = _bwd_one(dout[b], q[b], k[b], v[b], out[b], lse[b], causal, scale,
                                       block_m, block_n)
    return _sum_to_shape(dq, q_shape), _sum_to_shape(dk, k_shape), _sum_to_shape(dv, v_shape)
