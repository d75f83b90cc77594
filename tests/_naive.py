"""Naive attention "in a dtype", on CuPy (GPU) or NumPy (CPU) arrays alike.

The tolerance rule (see ``_assert.py``) compares the kernels' error with the
error of a naive implementation in the same dtype, both against a float64
reference.  This module provides both sides:

* ``dtype = float64``: the float64 reference (plain formulas, float64 math).
* ``dtype = float32``: naive float32 attention (matmul -> softmax -> matmul).
* ``dtype = float16 / bfloat16``: CuPy cannot run batched matmuls in bfloat16,
  so we emulate what a framework's half-precision naive attention does: math
  in float32, with every intermediate a framework would store in the dtype
  rounded to it -- q * scale, S, P, O (and in the backward dP, dS, dQ, dK, dV).

The variants (window, softcap, ALiBi, sink) follow ``flashcupy.reference``'s
semantics, written out again independently here (the float64 path is the GPU
tests' reference), with the roundings a framework's recipe for each would do.

Everything works on NumPy arrays too (CPU tests use that to check these
helpers against ``flashcupy.reference``).  bfloat16 conversions are done with
integer bit operations (round to nearest even), so they need no bfloat16
support in CuPy's elementwise kernels.
"""
from __future__ import annotations

import math

import ml_dtypes
import numpy as np

BF16 = np.dtype(ml_dtypes.bfloat16)
F16, F32, F64 = np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64)
DTYPES = (F16, BF16, F32, F64)
DTYPE_IDS = {F16: "fp16", BF16: "bf16", F32: "fp32", F64: "fp64"}


def xp_of(x):
    if isinstance(x, np.ndarray):
        return np
    import cupy

    return cupy.get_array_module(x)


# ----------------------------------------------------------------------------
# dtype conversions (bfloat16 by bit manipulation)
# ----------------------------------------------------------------------------

def _round_bf16_bits(x32):
    """float32 -> uint32 whose high half is the bfloat16 nearest (ties to even)."""
    xp = xp_of(x32)
    u = xp.ascontiguousarray(x32).view(xp.uint32)
    # -inf (0xFF800000) and finite values round correctly; there is no NaN here.
    return (u + xp.uint32(0x7FFF) + ((u >> 16) & xp.uint32(1))) & xp.uint32(0xFFFF0000)


def to_f32(x):
    """Any supported array as float32 (exact for float16 and bfloat16)."""
    xp = xp_of(x)
    if x.dtype == BF16:
        # same-itemsize view: fine for any strides; the astype makes it contiguous
        bits = x.view(xp.uint16).astype(xp.uint32) << xp.uint32(16)
        return bits.view(xp.float32)
    return x.astype(xp.float32)


def to_f64(x):
    return to_f32(x).astype(np.float64) if x.dtype == BF16 else x.astype(np.float64)


def cast(x, dtype):
    """A float32/float64 array converted (rounded to nearest) to ``dtype``."""
    xp = xp_of(x)
    dtype = np.dtype(dtype)
    if dtype == BF16:
        bits = _round_bf16_bits(x.astype(xp.float32))
        return (bits >> 16).astype(xp.uint16).view(BF16)
    return x.astype(dtype)


def compute_dtype(dtype):
    """The dtype the naive math runs in: float64 for float64, float32 otherwise."""
    return F64 if np.dtype(dtype) == F64 else F32


def rounder(dtype):
    """Function rounding a compute-dtype array to ``dtype`` and back (identity if same)."""
    dtype = np.dtype(dtype)
    if dtype == BF16:
        return lambda x: _round_bf16_bits(x).view(xp_of(x).float32)
    if dtype == F16:
        return lambda x: x.astype(F16).astype(F32)
    return lambda x: x


def upcast(x, dtype):
    return to_f64(x) if compute_dtype(dtype) == F64 else to_f32(x)


# ----------------------------------------------------------------------------
# random inputs
# ----------------------------------------------------------------------------

def _generator(xp, seed):
    if xp is np:
        return np.random.default_rng(seed)
    return xp.random.RandomState(seed)


def _draw(xp, gen, shape, dtype, scale=1.0):
    """Standard normal * scale, drawn in float32 (float64 for float64) and cast to dtype."""
    dtype = np.dtype(dtype)
    cdt = compute_dtype(dtype)
    if math.prod(shape) == 0:  # curand is never asked for 0 numbers
        return xp.zeros(shape, dtype)
    if xp is np:
        x = gen.standard_normal(shape).astype(cdt)
    else:
        x = gen.standard_normal(shape, dtype=cdt)
    if scale != 1.0:
        x = x * cdt.type(scale)
    return cast(x, dtype)


def randn(xp, seed, shape, dtype, scale=1.0):
    """One standard normal array of ``dtype`` (never all zeros unless empty)."""
    return _draw(xp, _generator(xp, seed), shape, dtype, scale)


def randn_many(xp, seed, shapes, dtype):
    """Independent standard normal arrays, one per shape, from one generator."""
    gen = _generator(xp, seed)
    return [_draw(xp, gen, tuple(s), dtype) for s in shapes]


# ----------------------------------------------------------------------------
# naive attention in a dtype
# ----------------------------------------------------------------------------

def batch_shape(q, k, v):
    return tuple(np.broadcast_shapes(q.shape[:-2], k.shape[:-2], v.shape[:-2]))


def sum_to_shape(g, shape):
    """Sums g over the axes along which an input of ``shape`` was broadcast."""
    extra = g.ndim - len(shape)
    if extra:
        g = g.sum(axis=tuple(range(extra)))
    axes = tuple(i for i, n in enumerate(shape) if n == 1 and g.shape[i] != 1)
    if axes:
        g = g.sum(axis=axes, keepdims=True)
    return g.reshape(shape)


def effective_right(causal, window):
    """The window's right side after causal (right = 0); None = unbounded."""
    right = None if window is None else window[1]
    if causal:
        right = 0 if right is None else min(right, 0)
    return right


def empty_rows(seqlen_q, seqlen_k, causal, window=None):
    """Number of leading query rows that see no key (all of them when Sk == 0).

    Row i sees keys [i + Sk - Sq - left, i + Sk - Sq + right] within [0, Sk);
    a left side >= 0 never empties a row (i < Sq), so only the leading rows
    with i + Sk - Sq + right < 0 are empty (the count this returns; a negative
    left side can also empty trailing rows, which it does not count)."""
    if seqlen_k == 0:
        return seqlen_q
    right = effective_right(causal, window)
    if right is None:
        return 0
    return max(0, min(seqlen_q, seqlen_q - seqlen_k - right))


def _per_batch(x, batch, cdt):
    """alibi_slopes / sink (any xp array) in the compute dtype, broadcast to
    ``batch`` and given two trailing axes (..., 1, 1)."""
    xp = xp_of(x)
    return xp.broadcast_to(x.astype(cdt), batch)[..., None, None]


def _probs(q, k, causal, scale, dtype, batch, window=None, softcap=None, alibi_slopes=None,
           sink=None, bias=None, mask=None):
    """Forward up to P, batch-broadcast, in the compute dtype.

    Returns ``(qs, p, lse, t, p_sink)``: q * scale, the softmax P, the LSE, the
    stored tanh of the softcap (None without) and the sink's probability
    (None without), each rounded where a framework would store it in the dtype:

    * softcap c (the Gemma 2 recipe): ``t = tanh(S / c)``, ``S = t * c``, each
      step rounded;
    * ALiBi: the bias ``-slope |i + Sk - Sq - j|`` is a tensor in the dtype,
      added to S (rounded);
    * sink (the gpt-oss recipe): the sink logit, in the dtype, is appended as
      one more column of S before the softmax and dropped after it;
    * bias: added to S in the dtype (rounded); mask: False pairs become -inf.
    """
    xp = xp_of(q)
    cdt = compute_dtype(dtype)
    rnd = rounder(dtype)
    qc = xp.broadcast_to(upcast(q, dtype), batch + q.shape[-2:])
    kc = xp.broadcast_to(upcast(k, dtype), batch + k.shape[-2:])
    qs = rnd(qc * cdt.type(scale))                         # a framework scales q in the dtype
    s = rnd(xp.matmul(qs, xp.swapaxes(kc, -1, -2)))         # S stored in the dtype
    t = None
    if softcap is not None:
        c = cdt.type(softcap)
        t = rnd(xp.tanh(rnd(s / c)))
        s = rnd(t * c)
    sq, sk = q.shape[-2], k.shape[-2]
    i = xp.arange(sq)[:, None]
    j = xp.arange(sk)[None, :]
    if alibi_slopes is not None:
        dist = xp.abs(i + (sk - sq) - j).astype(cdt)
        s = rnd(s + rnd(-_per_batch(alibi_slopes, batch, cdt) * dist))
    if bias is not None:
        s = rnd(s + xp.broadcast_to(upcast(bias, dtype), s.shape))
    if mask is not None:
        s = xp.where(xp.broadcast_to(mask, s.shape), s, cdt.type(-np.inf))
    left = None if window is None else window[0]
    right = effective_right(causal, window)
    if left is not None or right is not None:
        visible = xp.ones((sq, sk), dtype=bool)
        if right is not None:
            visible &= j <= i + (sk - sq) + right
        if left is not None:
            visible &= j >= i + (sk - sq) - left
        s = xp.where(visible, s, cdt.type(-np.inf))
    m = s.max(axis=-1, keepdims=True)                      # -inf for an empty row
    z = None
    if sink is not None:
        z = rnd(_per_batch(sink, batch, cdt))                # (batch..., 1, 1)
        m = xp.maximum(m, z)
    m_safe = xp.where(xp.isneginf(m), cdt.type(0), m)      # avoid (-inf) - (-inf)
    e = xp.exp(s - m_safe)
    l = e.sum(axis=-1, keepdims=True)
    if z is not None:
        e_sink = xp.exp(z - m_safe)
        l = l + e_sink
    seen = l > 0
    l_safe = xp.where(seen, l, cdt.type(1))
    p = rnd(e / l_safe)                                    # softmax output in the dtype
    p_sink = None if z is None else rnd(e_sink / l_safe)
    lse = xp.where(seen, m_safe + xp.log(l_safe), cdt.type(-np.inf))[..., 0]
    return qs, p, lse, t, p_sink


def _keep(batch, sq, sk, dropout_p, seed, offset, xp, dropout_batch=None):
    """The dropout keep mask of flashcupy._philox (None without dropout), on xp.

    ``dropout_batch = (full_shape, prefix)``: the problem is the batch element
    ``prefix + h`` of a larger ``full_shape`` (one sequence of a packed batch:
    ``((B,) + heads, (b,))``), whose bits it draws."""
    if not dropout_p:
        return None
    from flashcupy import _philox

    if dropout_batch is None:
        return xp.asarray(_philox.keep_mask(seed, offset, batch, sq, sk, dropout_p))
    full, prefix = dropout_batch
    keep = np.empty(tuple(batch) + (sq, sk), dtype=bool)
    for h in np.ndindex(*batch):
        keep[h] = _philox.keep_mask(seed, offset, full, sq, sk, dropout_p,
                                    batch_index=tuple(prefix) + h)
    return xp.asarray(keep)


def attention(q, k, v, causal=False, scale=None, dtype=None, *, window=None, softcap=None,
              alibi_slopes=None, sink=None, bias=None, mask=None, dropout_p=0.0, seed=None,
              offset=0, dropout_batch=None):
    """Naive attention in ``dtype`` (default q's dtype).

    Returns ``(out, lse)`` in the compute dtype (float32, or float64 for
    float64), out rounded to ``dtype``, with the broadcast batch shape.
    A row that sees no key gets out = 0 and lse = -inf (lse = sink with a sink).
    The variant keywords have flashcupy.reference's semantics; ``alibi_slopes``
    and ``sink`` are arrays of the same module (cupy or numpy) as q.  Dropout
    (the keep bits of flashcupy._philox) as a framework applies it: P o Z times
    1 / (1 - p), rounded in the dtype.
    """
    xp = xp_of(q)
    dtype = np.dtype(q.dtype if dtype is None else dtype)
    cdt = compute_dtype(dtype)
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    batch = batch_shape(q, k, v)
    sq, sk, dv = q.shape[-2], k.shape[-2], v.shape[-1]
    if sq == 0 or sk == 0:   # reductions over empty axes: the answer is known
        lse = xp.full(batch + (sq,), -np.inf, cdt)
        if sink is not None:
            z = rounder(dtype)(_per_batch(sink, batch, cdt)[..., 0])
            lse = xp.ascontiguousarray(xp.broadcast_to(z, lse.shape))
        return xp.zeros(batch + (sq, dv), cdt), lse
    _, p, lse, _, _ = _probs(q, k, causal, scale, dtype, batch, window, softcap, alibi_slopes,
                             sink, bias, mask)
    keep = _keep(batch, sq, sk, dropout_p, seed, offset, xp, dropout_batch)
    if keep is not None:
        p = rounder(dtype)(xp.where(keep, p * cdt.type(1.0 / (1.0 - dropout_p)), cdt.type(0)))
    vc = xp.broadcast_to(upcast(v, dtype), batch + v.shape[-2:])
    out = rounder(dtype)(xp.matmul(p, vc))
    return out, lse


def attention_backward(dout, q, k, v, causal=False, scale=None, dtype=None, *, window=None,
                       softcap=None, alibi_slopes=None, sink=None, bias=None, mask=None,
                       bias_grad=False, dropout_p=0.0, seed=None, offset=0, dropout_batch=None):
    """Naive gradients in ``dtype`` (default q's dtype), from a naive forward.

    Returns ``(dq, dk, dv)``, and ``dsink`` as a fourth when ``sink`` is given,
    in the compute dtype, rounded to ``dtype``, shaped like q, k, v (and sink)
    (summed over broadcast axes in the compute dtype, then rounded once, as a
    framework's expand-backward does).  The softcap's chain rule runs through
    the stored tanh: dS_raw = ((dS * c) * (1 - t^2)) / c, each step rounded.
    """
    xp = xp_of(q)
    dtype = np.dtype(q.dtype if dtype is None else dtype)
    cdt = compute_dtype(dtype)
    rnd = rounder(dtype)
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    batch = batch_shape(q, k, v)
    sq, sk = q.shape[-2], k.shape[-2]
    if sq == 0 or sk == 0:
        grads = (xp.zeros(q.shape, cdt), xp.zeros(k.shape, cdt), xp.zeros(v.shape, cdt))
        grads = grads if sink is None else grads + (xp.zeros(sink.shape, cdt),)
        return grads if not bias_grad else grads + (xp.zeros(bias.shape, cdt),)
    qs, p, _, t, p_sink = _probs(q, k, causal, scale, dtype, batch, window, softcap,
                                 alibi_slopes, sink, bias, mask)
    kc = xp.broadcast_to(upcast(k, dtype), batch + k.shape[-2:])
    vc = xp.broadcast_to(upcast(v, dtype), batch + v.shape[-2:])
    do = xp.broadcast_to(upcast(dout, dtype), batch + (sq, v.shape[-1]))

    keep = _keep(batch, sq, sk, dropout_p, seed, offset, xp, dropout_batch)
    rp = cdt.type(1.0 / (1.0 - dropout_p)) if keep is not None else None
    pd = p if keep is None else rnd(xp.where(keep, p * rp, cdt.type(0)))  # what O used
    dv = xp.matmul(xp.swapaxes(pd, -1, -2), do)                       # P^T dO
    dp = rnd(xp.matmul(do, xp.swapaxes(vc, -1, -2)))                  # dP = dO V^T
    if keep is not None:                                              # through the dropout
        dp = rnd(xp.where(keep, dp * rp, cdt.type(0)))
    delta = (dp * p).sum(axis=-1, keepdims=True)                      # the sink's dP is 0
    ds = rnd(p * (dp - delta))                                        # softmax backward
    dbias = rnd(sum_to_shape(ds, bias.shape)) if bias_grad else None  # the bias joins here
    if t is not None:                                                 # S = c tanh(S_raw / c)
        c = cdt.type(softcap)
        ds = rnd(rnd(rnd(ds * c) * (1 - t * t)) / c)
    dqs = rnd(xp.matmul(ds, kc))                                      # grad of q * scale
    dq = dqs * cdt.type(scale)
    dk = xp.matmul(xp.swapaxes(ds, -1, -2), qs)
    grads = (rnd(sum_to_shape(dq, q.shape)), rnd(sum_to_shape(dk, k.shape)),
             rnd(sum_to_shape(dv, v.shape)))
    if sink is not None:
        ds_sink = rnd(p_sink * -delta)[..., 0]                        # the sink column of dS
        grads = grads + (rnd(sum_to_shape(ds_sink.sum(axis=-1), sink.shape)),)
    return grads if dbias is None else grads + (dbias,)
