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
    stored.  The tile loops visit only the tiles a window (or causal) can see,
    through the same four range functions as the kernels (``_Window.key_begin``
    / ``key_end`` / ``query_begin`` / ``query_end``).  It is slow (Python loops
    over tiles) and exists to document the algorithm and to prove that the
    tiling itself is correct, independently of any GPU.

Packed (variable-length) batches and KV caches: ``attention_varlen_naive``,
``attention_varlen_backward_naive`` and ``attention_with_kvcache_naive`` (in
``flashcupy._reference_varlen``, re-exported here) loop over the sequences and
call the naive functions on each; causal and window are bottom-right aligned
per sequence, and that module's docstring defines the packed layout, the
per-sequence dropout bits, and the cache layouts and in-place appends.

Conventions shared by all four functions (and by ``flashcupy.attention``):

* ``q`` has shape ``(..., Sq, D)``, ``k`` ``(..., Sk, D)``, ``v`` ``(..., Sk, Dv)``.
  Leading (batch) dims broadcast like ``numpy.matmul``: a key/value head axis
  of size 1 is multi-query attention, ``(B, Hkv, 1, S, D)`` against a query of
  shape ``(B, Hkv, G, S, D)`` is grouped-query attention.  ``batch`` below is
  ``numpy.broadcast_shapes(q.shape[:-2], k.shape[:-2], v.shape[:-2])``.
* ``scale`` defaults to ``1 / sqrt(D)``.
* ``lse`` is the row logsumexp in natural-log units (of the scores, and of the
  sink logit when there is one).
* Gradients of broadcast inputs are summed over the broadcast axes, so each
  gradient has the shape of its input.

Variants (keyword-only, all composable with each other, with ``causal``, with
broadcast batch dims and with ``Dv != D``).  With ``diag = Sk - Sq``:

``window=(left, right)``
    Each side an int (negative: a band off the diagonal), or None for
    unbounded; ``window=None`` is
    ``(None, None)``.  Query ``i`` sees key ``j`` iff
    ``i + diag - left <= j <= i + diag + right`` (bottom-right aligned, like
    flash-attn's ``window_size``).  ``causal=True`` intersects the window with
    ``right = 0``: the effective right side is ``0 if right is None else
    min(right, 0)``, so ``window=(None, 0)`` is exactly ``causal=True``.
``causal``
    Query ``i`` sees key ``j`` iff ``j <= i + diag``.
``softcap=c``
    A float > 0 (None: off).  The scaled score ``s = scale * q.k`` becomes
    ``c * tanh(s / c)`` before ALiBi, masking and the softmax.  The backward
    multiplies dS by ``1 - tanh(s / c)**2``.
``alibi_slopes``
    Real array broadcastable to ``batch`` (e.g. ``(H,)``, ``(B, H)``, or
    ``(Hkv, G)`` for a query of shape ``(B, Hkv, G, Sq, D)``).  Adds
    ``-slope * |i + diag - j|`` to the (softcapped) scaled score.  Not
    differentiable.
``sink``
    Real array broadcastable to ``batch``: one logit per batch element, in the
    units of the scaled score, that joins the softmax denominator and carries
    no value::

        p_ij  = exp(s_ij) / (exp(sink) + sum_j exp(s_ij))
        out_i = sum_j p_ij v_j
        lse_i = log(exp(sink) + sum_j exp(s_ij))

    The backward returns ``dsink`` (shape of ``sink``, summed over the axes it
    was broadcast along)::

        dsink = -sum_i p_sink,i * delta_i,   p_sink,i = exp(sink - lse_i),
        delta_i = sum_d dO_id * O_id.

    ``sink = -inf`` is the same as no sink.
``bias``
    Real floating array (any float dtype, bfloat16 included; computed in
    float64) whose shape broadcasts to ``batch + (Sq, Sk)`` under NumPy rules,
    e.g. ``(Sq, Sk)``, ``(H, 1, Sk)``, ``(B, 1, 1, Sk)``: ``bias[..., i, j]``
    is added to the score of the pair (i, j) after the softcap and ALiBi.  A
    ``-inf`` entry removes the pair (like ``mask`` False); a NaN or ``+inf``
    entry on a pair that is not removed makes its row's ``out`` and ``lse``
    NaN (values are not scanned).  The backward returns
    ``dbias`` when called with ``bias_grad=True``: the gradient with respect
    to the bias as added, ``dS`` (before the softcap's ``1 - tanh**2``, which
    applies to the dq/dk path only), summed over the axes the bias was
    broadcast along, so it has the bias's shape, in float64.  A removed pair
    contributes 0.
``mask``
    Boolean array broadcastable to ``batch + (Sq, Sk)`` like ``bias``; True
    where query i may attend to key j (PyTorch SDPA's convention), False
    removes the pair.
``dropout_p``, ``seed``, ``offset``
    Dropout on the attention probabilities: ``dropout_p`` a real in [0, 0.99]
    (0: off), ``seed`` an int in [0, 2**64) (required when ``dropout_p > 0``),
    ``offset`` an int in [0, 2**32) (default 0).  The pair (i, j) of batch
    element ``b`` is kept or dropped by the Philox4x32-10 rule of
    ``flashcupy._philox`` (16 bits per pair; 8 pairs of a row per Philox call, ``bh`` the
    C-order flat index of ``b`` in ``batch``, key ``seed``; the kernels draw
    the same bits).  With ``K_ij`` in {0, 1} that decision and ``p_ij`` the
    softmax probability without dropout::

        out_i = sum_j p_ij K_ij / (1 - dropout_p) v_j

    ``lse`` is the logsumexp without dropout (dropout does not change it).
    The backward, given the same ``dropout_p``, ``seed`` and ``offset``,
    regenerates K and returns the exact gradient of that function::

        dV      = (P o K / (1 - dropout_p))^T dO
        dP      = (dO V^T) o K / (1 - dropout_p)
        delta_i = dO_i . out_i
        dS      = P o (dP - delta)

    and ``dsink = -sum_i p_sink,i delta_i`` as without dropout.

The score of a pair (i, j) of batch element ``b``, in order::

    s = scale * q_i . k_j
    s = c * tanh(s / c)                       softcap c, if given
    s = s - slope_b * |i + diag - j|          ALiBi, if given
    s = s + bias[b, i, j]                     bias, if given

The pair is removed (its score is -inf) if the window (or causal) hides it,
or ``mask[b, i, j]`` is False, or the biased score is -inf.  The softmax
(with the sink logit, if any, in its denominator) runs over the remaining
pairs.

A row that sees no pair (``Sq > Sk`` under causal, a window, a mask or
``-inf`` bias that removes the whole row, or ``Sk == 0``) gets ``out = 0``,
``lse = -inf`` (``lse = sink`` with a sink), zero gradients (dq row 0, no
contribution to dk, dv, dbias or dsink), never NaN.

The backward functions return ``(dq, dk, dv)``, then ``dsink`` if a sink was
given, then ``dbias`` if ``bias_grad=True`` (which needs a bias).
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import numpy as np

from . import _philox

__all__ = [
    "attention_naive",
    "attention_backward_naive",
    "attention_tiled",
    "attention_backward_tiled",
    "causal_mask",
    "visible_mask",
    "attention_varlen_naive",
    "attention_varlen_backward_naive",
    "attention_with_kvcache_naive",
    "merge_attention_naive",
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


def _sink_probability(sink: np.ndarray, lse: np.ndarray) -> np.ndarray:
    """p_sink = exp(sink - lse) per row (natural-log units), 0 where sink = -inf or
    the row's lse is -inf (then nothing, not even the sink, is in the softmax)."""
    off = np.isneginf(lse) | np.isneginf(sink)
    return np.where(off, 0.0, np.exp(np.where(off, 0.0, sink - np.where(off, 0.0, lse))))


# ----------------------------------------------------------------------------
# variants: validation and the visible band
# ----------------------------------------------------------------------------

def _check_window(window) -> tuple:
    """``window`` as a pair (left, right) of ints or None; errors name it.  A
    negative side moves the band off the diagonal (``(None, Sq - Sk)`` is the
    top-left causal mask)."""
    if window is None:
        return (None, None)
    if not isinstance(window, (tuple, list)) or len(window) != 2:
        raise TypeError(f"window must be None or a pair (left, right) of ints or None, "
                        f"got {window!r}")
    sides = []
    for name, w in zip(("left", "right"), window):
        if w is None:
            sides.append(None)
            continue
        if isinstance(w, (bool, np.bool_)) or not isinstance(w, numbers.Integral):
            raise TypeError(f"window {name} side must be an int or None (unbounded), "
                            f"got {w!r}")
        sides.append(int(w))
    return tuple(sides)


def _effective_window(window, causal: bool) -> tuple:
    """(left, right) after intersecting with causal (right = 0); None = unbounded."""
    left, right = _check_window(window)
    if causal:
        right = 0 if right is None else min(right, 0)
    return left, right


def _check_softcap(softcap):
    if softcap is None:
        return None
    if isinstance(softcap, (bool, np.bool_)) or not isinstance(softcap, numbers.Real):
        raise TypeError(f"softcap must be a real number > 0 or None, got {softcap!r}")
    c = float(softcap)
    if not (math.isfinite(c) and c > 0):
        raise ValueError(f"softcap must be a finite number > 0 (None turns it off), got {c!r}")
    return c


def _batch_param(x, batch: tuple, name: str):
    """A per-batch-element array (alibi_slopes, sink): float64, broadcast to
    ``batch``, and its own shape (to sum its gradient back onto)."""
    if x is None:
        return None, None
    a = np.asarray(x)
    if a.dtype.kind not in "fiu" and a.dtype.name != "bfloat16":
        raise TypeError(f"{name} must be a real-valued array, got dtype {a.dtype}")
    try:
        ok = np.broadcast_shapes(a.shape, batch) == tuple(batch)
    except ValueError:
        ok = False
    if not ok:
        raise ValueError(f"{name} of shape {a.shape} does not broadcast to the batch dims "
                         f"{tuple(batch)} of q, k, v (one value per batch element)")
    return np.broadcast_to(_f64(a), batch), a.shape


def _is_float_dtype(dtype: np.dtype) -> bool:
    """NumPy's floats, and ml_dtypes' (bfloat16, float8_*, ...), which NumPy
    sees as opaque 'V' dtypes."""
    return dtype.kind == "f" or (dtype.kind == "V" and dtype.name.startswith(
        ("bfloat16", "float8_", "float6_", "float4_")))


def _pair_param(x, batch: tuple, seqlen_q: int, seqlen_k: int, name: str):
    """A per-pair array (bias, mask), broadcast (as a view, nothing copied) to
    ``batch + (Sq, Sk)``, and its own shape.  ``bias``: a real float dtype,
    converted to float64 at its own shape; ``mask``: bool."""
    if x is None:
        return None, None
    a = np.asarray(x)
    if name == "mask":
        if a.dtype != np.bool_:
            raise TypeError(f"mask must be a bool array (True = may attend), got dtype {a.dtype}")
    elif not _is_float_dtype(a.dtype):
        raise TypeError(f"{name} must be a real floating-point array, got dtype {a.dtype}")
    target = tuple(batch) + (seqlen_q, seqlen_k)
    try:
        ok = np.broadcast_shapes(a.shape, target) == target
    except ValueError:
        ok = False
    if not ok:
        raise ValueError(f"{name} of shape {a.shape} does not broadcast to {target} "
                         f"(batch + (Sq, Sk))")
    return np.broadcast_to(a if name == "mask" else _f64(a), target), a.shape


@dataclass(frozen=True)
class _Dropout:
    """Validated dropout of one problem: the keep bits come from ``_philox``."""

    p: float
    seed: int
    offset: int
    batch: tuple
    seqlen_q: int
    seqlen_k: int

    @property
    def rescale(self) -> float:
        """1 / (1 - p): a kept probability's factor."""
        return 1.0 / (1.0 - self.p)

    def keep(self, rows=None, cols=None, b=None) -> np.ndarray:
        """Keep bits of the whole batch, (batch..., rows, cols), or with ``b``
        (a batch coordinate tuple) of that element only, (rows, cols)."""
        return _philox.keep_mask(self.seed, self.offset, self.batch, self.seqlen_q,
                                 self.seqlen_k, self.p, rows, cols, batch_index=b)


@dataclass(frozen=True)
class _Variant:
    """Everything that changes which scores exist and what they are, validated."""

    left: int | None              # window sides after causal; None = unbounded
    right: int | None
    softcap: float | None
    slopes: np.ndarray | None     # (batch...) float64 ALiBi slopes
    sink: np.ndarray | None       # (batch...) float64 sink logits
    sink_shape: tuple | None      # the sink's own shape (dsink has it)
    bias: np.ndarray | None = None        # (batch..., Sq, Sk) float64 view
    bias_shape: tuple | None = None       # the bias's own shape (dbias has it)
    mask: np.ndarray | None = None        # (batch..., Sq, Sk) bool view
    dropout: _Dropout | None = None       # None: dropout_p == 0

    def element(self, b):
        """(slope, sink) of batch element ``b`` as floats, None where absent."""
        return (None if self.slopes is None else float(self.slopes[b]),
                None if self.sink is None else float(self.sink[b]))


def _variant(batch, causal, window, softcap, alibi_slopes, sink, seqlen_q=0, seqlen_k=0,
             bias=None, mask=None, dropout_p=0.0, seed=None, offset=0) -> _Variant:
    left, right = _effective_window(window, causal)
    slopes, _ = _batch_param(alibi_slopes, batch, "alibi_slopes")
    sinks, sink_shape = _batch_param(sink, batch, "sink")
    bias_b, bias_shape = _pair_param(bias, batch, seqlen_q, seqlen_k, "bias")
    mask_b, _ = _pair_param(mask, batch, seqlen_q, seqlen_k, "mask")
    p, seed, offset = _philox.check_dropout(dropout_p, seed, offset)
    drop = (None if p == 0 else
            _Dropout(p, seed, offset, tuple(batch), seqlen_q, seqlen_k))
    return _Variant(left, right, _check_softcap(softcap), slopes, sinks, sink_shape,
                    bias_b, bias_shape, mask_b, drop)


def _check_bias_grad(bias_grad, var: _Variant) -> bool:
    if not isinstance(bias_grad, (bool, np.bool_)):
        raise TypeError(f"bias_grad must be a bool, got {bias_grad!r}")
    if bias_grad and var.bias is None:
        raise ValueError("bias_grad=True needs a bias (got bias=None)")
    return bool(bias_grad)


class _Window:
    """The visible band of one (Sq, Sk) problem, and the tile loop ranges.

    Key ``j`` is visible from query ``i`` iff ``0 <= j < Sk`` and
    ``lo <= j - i <= hi`` with ``lo = Sk - Sq - left`` and ``hi = Sk - Sq +
    right`` (``None``: that side unbounded).  The four range functions carry
    the names of the kernels' ``Variant`` members (``cuda_src/variant.cuh``).
    """

    def __init__(self, seqlen_q: int, seqlen_k: int, left=None, right=None):
        self.seqlen_q, self.seqlen_k = seqlen_q, seqlen_k
        diag = seqlen_k - seqlen_q
        self.lo = None if left is None else diag - left
        self.hi = None if right is None else diag + right

    # [key_begin, key_end) holds every key that a query row in [m_start, m_end) sees
    def key_begin(self, m_start: int, m_end: int) -> int:
        if self.lo is None:
            return 0
        return min(self.seqlen_k, max(0, m_start + self.lo))

    def key_end(self, m_start: int, m_end: int) -> int:
        if self.hi is None:
            return self.seqlen_k
        return max(0, min(self.seqlen_k, m_end - 1 + self.hi + 1))

    # [query_begin, query_end) holds every query that sees a key in [n_start, n_end)
    def query_begin(self, n_start: int, n_end: int) -> int:
        if self.hi is None:
            return 0
        return min(self.seqlen_q, max(0, n_start - self.hi))

    def query_end(self, n_start: int, n_end: int) -> int:
        if self.lo is None:
            return self.seqlen_q
        return max(0, min(self.seqlen_q, n_end - 1 - self.lo + 1))

    def needs_mask(self, m_start: int, m_end: int, n_start: int, n_end: int) -> bool:
        """Whether the tile rows [m_start, m_end) x keys [n_start, n_end) (both
        inside the sequences) holds an invisible pair; False: no element test."""
        return ((self.hi is not None and (n_end - 1) - m_start > self.hi)
                or (self.lo is not None and n_start - (m_end - 1) < self.lo))

    def visible(self, i, j):
        """Elementwise: may query i see key j (i, j broadcast)?"""
        ok = (i >= 0) & (i < self.seqlen_q) & (j >= 0) & (j < self.seqlen_k)
        if self.hi is not None:
            ok = ok & (j - i <= self.hi)
        if self.lo is not None:
            ok = ok & (j - i >= self.lo)
        return ok


def _key_range(win: _Window, m_start: int, m_end: int) -> tuple:
    return win.key_begin(m_start, m_end), win.key_end(m_start, m_end)


def _query_range(win: _Window, n_start: int, n_end: int) -> tuple:
    return win.query_begin(n_start, n_end), win.query_end(n_start, n_end)


def _tiles(begin: int, end: int, block: int) -> range:
    """Starts of the tiles (multiples of ``block``) that cover [begin, end)."""
    if begin >= end:
        return range(0)
    return range(begin - begin % block, end, block)


def visible_mask(seqlen_q: int, seqlen_k: int, causal: bool = False, window=None) -> np.ndarray:
    """Boolean (Sq, Sk) mask, True where query i may see key j (bottom-right
    aligned: ``i + Sk - Sq - left <= j <= i + Sk - Sq + right``, causal is
    ``right = 0``)."""
    left, right = _effective_window(window, causal)
    win = _Window(seqlen_q, seqlen_k, left, right)
    return win.visible(np.arange(seqlen_q)[:, None], np.arange(seqlen_k)[None, :])


def causal_mask(seqlen_q: int, seqlen_k: int) -> np.ndarray:
    """Boolean (Sq, Sk) mask, True where query i may see key j (bottom-right)."""
    return visible_mask(seqlen_q, seqlen_k, causal=True)


def _alibi_distance(seqlen_q: int, seqlen_k: int) -> np.ndarray:
    """|i + Sk - Sq - j|, shape (Sq, Sk), float64."""
    i = np.arange(seqlen_q)[:, None]
    j = np.arange(seqlen_k)[None, :]
    return np.abs(i + (seqlen_k - seqlen_q) - j).astype(np.float64)


# ----------------------------------------------------------------------------
# naive: materialize S, exact
# ----------------------------------------------------------------------------

def _scores(q, k, scale, var: _Variant):
    """Scores, shape (..., Sq, Sk): ``scale * Q K^T``, softcapped, plus ALiBi,
    plus the bias, -inf where not visible or masked.  Also returns ``tanh(s /
    c)`` (None without softcap) for the backward's chain rule."""
    sq, sk = q.shape[-2], k.shape[-2]
    s = np.matmul(q, np.swapaxes(k, -1, -2)) * scale
    t = None
    if var.softcap is not None:
        t = np.tanh(s / var.softcap)
        s = var.softcap * t
    if var.slopes is not None:
        s = s - var.slopes[..., None, None] * _alibi_distance(sq, sk)
    if var.bias is not None:
        s = s + var.bias                              # a -inf entry removes the pair
    if var.left is not None or var.right is not None:
        s = np.where(_Window(sq, sk, var.left, var.right).visible(
            np.arange(sq)[:, None], np.arange(sk)[None, :]), s, -np.inf)
    if var.mask is not None:
        s = np.where(var.mask, s, -np.inf)
    return s, t


def _pair_variant(batch, q, k, causal, window, softcap, alibi_slopes, sink, bias, mask,
                  dropout_p, seed, offset) -> _Variant:
    """``_variant`` with the problem's lengths (q, k already broadcast)."""
    return _variant(batch, causal, window, softcap, alibi_slopes, sink, q.shape[-2],
                    k.shape[-2], bias, mask, dropout_p, seed, offset)


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


def attention_naive(q, k, v, causal: bool = False, scale=None, *, window=None, softcap=None,
                    alibi_slopes=None, sink=None, bias=None, mask=None, dropout_p=0.0, seed=None,
                    offset=0):
    """Exact attention in float64.

    Parameters
    ----------
    q : array_like, shape (..., Sq, D)
    k : array_like, shape (..., Sk, D)
    v : array_like, shape (..., Sk, Dv)
    causal : bool
        Bottom-right aligned causal mask (the window's right side 0).
    scale : float, optional
        Softmax scale; ``1 / sqrt(D)`` by default.
    window : (left, right), optional
        Sliding window, each side an int or None (unbounded): query i sees
        key j iff ``i + Sk - Sq - left <= j <= i + Sk - Sq + right``.
    softcap : float > 0, optional
        ``s -> softcap * tanh(s / softcap)`` on the scaled score, first.
    alibi_slopes : array_like, broadcastable to ``batch``, optional
        Adds ``-slope * |i + Sk - Sq - j|`` to the (softcapped) score.
    sink : array_like, broadcastable to ``batch``, optional
        A logit per batch element in the softmax denominator (no value).
    bias : floating array_like, broadcastable to ``batch + (Sq, Sk)``, optional
        Added to the score of each pair after softcap and ALiBi; ``-inf``
        removes the pair.
    mask : bool array_like, broadcastable to ``batch + (Sq, Sk)``, optional
        True where query i may attend to key j.
    dropout_p : float in [0, 0.99]
        Dropout probability on the attention probabilities (0: off).
    seed : int in [0, 2**64), optional
        The dropout seed; required when ``dropout_p > 0``.
    offset : int in [0, 2**32)
        The dropout counter's fourth word (a second stream under one seed).

    Returns
    -------
    out : numpy.ndarray, shape (batch..., Sq, Dv), float64
    lse : numpy.ndarray, shape (batch..., Sq), float64
        Natural-log row logsumexp of the scores (and the sink), not changed by
        dropout: ``-inf`` for a row that sees no pair (the sink with one).
        ``batch`` is the broadcast of the three batch shapes.
    """
    q, k, v, batch, scale = _operands(q, k, v, scale)
    var = _pair_variant(batch, q, k, causal, window, softcap, alibi_slopes, sink, bias, mask,
                        dropout_p, seed, offset)
    s, _ = _scores(q, k, scale, var)
    m = np.max(s, axis=-1, initial=-np.inf)          # -inf for an empty row
    if var.sink is not None:
        m = np.maximum(m, var.sink[..., None])       # the sink is one more logit
    m_safe = np.where(np.isneginf(m), 0.0, m)        # avoid (-inf) - (-inf)
    l = np.exp(s - m_safe[..., None]).sum(axis=-1)   # 0 for an empty row
    if var.sink is not None:
        l = l + np.exp(var.sink[..., None] - m_safe)
    with np.errstate(divide="ignore"):
        # l = 0: the row saw nothing (-inf); l NaN (a NaN or +inf score) stays NaN
        lse = np.where(l > 0, m_safe + np.log(l), np.where(np.isnan(l), np.nan, -np.inf))
    p = _probabilities(s, lse)
    if var.dropout is not None:   # P o K / (1 - p): the kept probabilities, rescaled
        p = np.where(var.dropout.keep(), p * var.dropout.rescale, 0.0)
    out = np.matmul(p, v)
    return out, lse


def attention_backward_naive(dout, q, k, v, out, lse, causal: bool = False, scale=None, *,
                             window=None, softcap=None, alibi_slopes=None, sink=None, bias=None,
                             mask=None, dropout_p=0.0, seed=None, offset=0, bias_grad=False):
    """Exact gradients of ``attention_naive`` in float64.

    ``out`` and ``lse`` are the forward results (as the kernels get them); P is
    recomputed from ``lse`` and ``delta = rowsum(dout * out)`` uses ``out``.
    The variant keywords (bias, mask and the dropout's ``dropout_p``, ``seed``
    and ``offset`` included) must be the forward's.  With dropout, dV and dP
    carry the keep mask and the ``1 / (1 - dropout_p)`` factor.  With a
    softcap, dS is multiplied by ``1 - tanh(s / c)**2`` before it meets Q and
    K (dbias is dS before that factor).

    Returns
    -------
    dq, dk, dv : numpy.ndarray, float64
        Shaped like ``q``, ``k`` and ``v``: summed over broadcast batch axes.
    dsink : numpy.ndarray, float64, only when ``sink`` is given
        ``-sum_i exp(sink - lse_i) * delta_i``, shaped like ``sink``.
    dbias : numpy.ndarray, float64, only when ``bias_grad=True``
        dS summed over the bias's broadcast axes, shaped like ``bias``.
    """
    (q_shape, k_shape, v_shape), batch, scale, (dout, q, k, v, out, lse) = _backward_operands(
        dout, q, k, v, out, lse, scale)
    var = _pair_variant(batch, q, k, causal, window, softcap, alibi_slopes, sink, bias, mask,
                        dropout_p, seed, offset)
    want_dbias = _check_bias_grad(bias_grad, var)

    s, t = _scores(q, k, scale, var)
    p = _probabilities(s, lse)                               # (..., Sq, Sk)
    dp = np.matmul(dout, np.swapaxes(v, -1, -2))
    if var.dropout is None:
        dv = np.matmul(np.swapaxes(p, -1, -2), dout)
    else:
        keep, rescale = var.dropout.keep(), var.dropout.rescale
        dv = np.matmul(np.swapaxes(np.where(keep, p * rescale, 0.0), -1, -2), dout)
        dp = np.where(keep, dp * rescale, 0.0)               # d loss / d P (undropped)
    delta = np.sum(dout * out, axis=-1)                      # = rowsum(P * dP)
    ds = p * (dp - delta[..., None])                         # d loss / d score
    dbias = _sum_to_shape(ds, var.bias_shape) if want_dbias else None
    if t is not None:
        ds = ds * (1.0 - t * t)                              # d(c tanh(s/c)) / ds
    dq = np.matmul(ds, k) * scale
    dk = np.matmul(np.swapaxes(ds, -1, -2), q) * scale
    grads = (_sum_to_shape(dq, q_shape), _sum_to_shape(dk, k_shape), _sum_to_shape(dv, v_shape))
    if var.sink is not None:
        dsink = -np.sum(_sink_probability(var.sink[..., None], lse) * delta, axis=-1)
        grads += (_sum_to_shape(dsink, var.sink_shape),)
    if want_dbias:
        grads += (dbias,)
    return grads


# ----------------------------------------------------------------------------
# tiled: FlashAttention-2, block by block, as the kernels do it
# ----------------------------------------------------------------------------

@dataclass(frozen=True)
class _Element:
    """The variant as one batch element's kernel sees it (``Variant`` after
    ``bind``): the window band, the score transform in log2 units, the sink,
    the element's bias and mask (views of the broadcast arrays; a tile reads
    its own slice) and the dropout."""

    win: _Window
    scale: float
    softcap: float | None
    slope: float | None     # ALiBi slope, natural units
    sink: float | None      # sink logit, natural units
    bias: np.ndarray | None = None      # (Sq, Sk) float64 view, natural units
    mask: np.ndarray | None = None      # (Sq, Sk) bool view
    dropout: _Dropout | None = None
    index: tuple = ()                   # the batch coordinates (the dropout's bh)

    @property
    def sink2(self) -> float:
        return self.sink * LOG2E

    def tile_scores2(self, q_tile, k_tile, m_start, n_start):
        """(BLOCK_M, BLOCK_N) scores in log2 units, -inf where not visible, and
        ``tanh(s / c)`` (None without softcap).

        softcap:  s2 = (c log2 e) tanh(raw * scale / c);  else s2 = raw * scale log2 e
        ALiBi:    s2 -= slope log2 e |i + Sk - Sq - j|
        bias:     s2 += bias[i, j] log2 e     (the tile's slice only)
        The window's element test is applied only when ``needs_mask`` says the
        tile has an invisible pair; the mask (``-inf`` where False) in every
        tile.  Tiles at the sequence end are simply shorter here; the kernels
        predicate the out-of-range rows/columns instead, which is the same
        thing.
        """
        raw = q_tile @ k_tile.T
        m_end, n_end = m_start + q_tile.shape[0], n_start + k_tile.shape[0]
        i = np.arange(m_start, m_end)[:, None]
        j = np.arange(n_start, n_end)[None, :]
        t = None
        if self.softcap is None:
            s2 = raw * (self.scale * LOG2E)  # log2(e) folded into the scale once
        else:
            t = np.tanh(raw * (self.scale / self.softcap))
            s2 = (self.softcap * LOG2E) * t
        if self.slope is not None:
            diag = self.win.seqlen_k - self.win.seqlen_q
            s2 = s2 - (self.slope * LOG2E) * np.abs(i + diag - j)
        if self.bias is not None:
            s2 = s2 + self.bias[m_start:m_end, n_start:n_end] * LOG2E
        if self.win.needs_mask(m_start, m_end, n_start, n_end):
            s2 = np.where(self.win.visible(i, j), s2, -np.inf)
        if self.mask is not None:
            s2 = np.where(self.mask[m_start:m_end, n_start:n_end], s2, -np.inf)
        return s2, t

    def tile_keep(self, m_start, m_end, n_start, n_end):
        """The tile's dropout keep bits, (rows, cols) bool; None without dropout."""
        if self.dropout is None:
            return None
        return self.dropout.keep(range(m_start, m_end), range(n_start, n_end), self.index)

    @property
    def rescale(self) -> float:
        """1 / (1 - dropout_p); 1 without dropout."""
        return 1.0 if self.dropout is None else self.dropout.rescale


def _elements(batch, seqlen_q, seqlen_k, scale, var: _Variant):
    """(batch index, _Element) for every batch element."""
    win = _Window(seqlen_q, seqlen_k, var.left, var.right)
    for b in np.ndindex(*batch):
        slope, sink = var.element(b)
        yield b, _Element(win, scale, var.softcap, slope, sink,
                          None if var.bias is None else var.bias[b],
                          None if var.mask is None else var.mask[b], var.dropout, b)


class _BiasGrad:
    """dbias accumulated tile by tile straight into the bias's own shape: a
    tile's dS is summed over the axes the bias is broadcast along (size-1 row
    or column axes, size-1 or missing batch axes) and added to its slot."""

    def __init__(self, bias_shape: tuple, batch: tuple):
        self.shape = bias_shape
        self.full = (1,) * (len(batch) + 2 - len(bias_shape)) + tuple(bias_shape)
        self.grad = np.zeros(self.full)

    def add(self, b: tuple, m_start: int, n_start: int, ds: np.ndarray):
        slot = tuple(0 if n == 1 else bi for bi, n in zip(b, self.full[:-2]))
        if self.full[-2] == 1:
            ds, rows = ds.sum(axis=0, keepdims=True), slice(0, 1)
        else:
            rows = slice(m_start, m_start + ds.shape[0])
        if self.full[-1] == 1:
            ds, cols = ds.sum(axis=1, keepdims=True), slice(0, 1)
        else:
            cols = slice(n_start, n_start + ds.shape[1])
        self.grad[slot + (rows, cols)] += ds

    def result(self) -> np.ndarray:
        return self.grad.reshape(self.shape)


def _fwd_one(q, k, v, el: _Element, BLOCK_M, BLOCK_N):
    """Forward for one batch element: q (Sq, D), k (Sk, D), v (Sk, Dv)."""
    seqlen_q, head_dim_v = q.shape[0], v.shape[1]
    out = np.zeros((seqlen_q, head_dim_v))
    lse = np.full(seqlen_q, -np.inf)

    for m_start in range(0, seqlen_q, BLOCK_M):            # one CTA per query tile
        m_end = min(m_start + BLOCK_M, seqlen_q)
        q_tile = q[m_start:m_end]                           # load q: it stays for the whole key loop
        rows = m_end - m_start
        # Running row max of s2: starts at the sink logit (a key with no value),
        # or -inf before any key.  l_i: running sum of exp2(s2 - m_i) over keys.
        m_i = np.full(rows, -np.inf if el.sink is None else el.sink2)
        l_i = np.zeros(rows)
        acc_o = np.zeros((rows, head_dim_v))                # (BLOCK_M, Dv) unnormalized output

        # Only the key tiles of the window (causal: none right of the diagonal).
        for n_start in _tiles(*_key_range(el.win, m_start, m_end), BLOCK_N):  # K/V tiles stream
            n_end = min(n_start + BLOCK_N, k.shape[0])
            k_tile, v_tile = k[n_start:n_end], v[n_start:n_end]
            s2, _ = el.tile_scores2(q_tile, k_tile, m_start, n_start)

            m_new = np.maximum(m_i, s2.max(axis=1))
            # If every key so far was masked (and no sink), m_new is -inf and
            # (-inf) - (-inf) would be NaN: subtract 0 instead, so exp2(-inf - 0) = 0.
            m_safe = np.where(np.isneginf(m_new), 0.0, m_new)
            alpha = np.exp2(m_i - m_safe)                   # rescales the old state; 0 when m_i = -inf
            p = np.exp2(s2 - m_safe[:, None])               # (BLOCK_M, BLOCK_N), masked -> 0
            l_i = l_i * alpha + p.sum(axis=1)               # the undropped sum
            keep = el.tile_keep(m_start, m_end, n_start, n_end)
            if keep is not None:                            # dropout: only kept P meets V
                p = np.where(keep, p, 0.0)
            acc_o = acc_o * alpha[:, None] + p @ v_tile     # O += P V
            m_i = m_new

        # The sink joins the sum once, at the final max (variant.cuh sink_term):
        # a row that saw no key then has l_i = 1, out = 0 and lse = sink.
        if el.sink is not None:
            m_safe = np.where(np.isneginf(m_i), 0.0, m_i)   # sink = -inf and no key
            l_i = l_i + np.exp2(el.sink2 - m_safe)
        # Finalize: O / l, and the LSE in natural-log units.  A row that saw
        # no key (and no sink) has l_i = 0: its output is 0 (not 0/0), its LSE -inf.
        # Dropout's 1 / (1 - p) joins the normalization.
        seen = l_i > 0
        inv_l = np.divide(1.0, l_i, out=np.zeros_like(l_i), where=seen)
        out[m_start:m_end] = acc_o * (inv_l * el.rescale)[:, None]
        log2_l = np.log2(l_i, out=np.full_like(l_i, -np.inf), where=seen)
        lse[m_start:m_end] = np.where(seen, (m_i + log2_l) * LN2,
                                      np.where(np.isnan(l_i), np.nan, -np.inf))
    return out, lse


def _bwd_one(dout, q, k, v, out, lse, el: _Element, BLOCK_M, BLOCK_N, dbias=None):
    """Backward for one batch element, in the three steps of the kernels.

    Returns dq, dk, dv and dsink (None without a sink) of this element; adds
    its dS to ``dbias`` (a ``_BiasGrad``) when given."""
    seqlen_q, seqlen_k = q.shape[0], k.shape[0]

    # Step 1, preprocess: delta_i = rowsum(dO_i * O_i), which equals
    # rowsum(P_i * dP_i) and turns the softmax Jacobian into one subtraction.
    delta = np.sum(dout * out, axis=1)
    lse2 = lse * LOG2E          # the LSE back in log2 units, like the scores
    empty = np.isneginf(lse2)   # rows that saw nothing: P = 0 (not exp2(-inf + inf))
    # The sink's gradient needs only delta and the LSE: p_sink = exp2(sink2 - lse2).
    dsink = None
    if el.sink is not None:
        off = empty | np.isneginf(el.sink2)
        p_sink = np.where(off, 0.0, np.exp2(np.where(off, 0.0, el.sink2 - np.where(off, 0, lse2))))
        dsink = -float(np.sum(p_sink * delta))

    def probs(q_tile, k_tile, m_start, m_end, n_start):
        """P recomputed from the LSE, exp2(s2 - lse2), already normalized, and
        the factor dS gets from the softcap (1 - tanh^2; 1 without)."""
        s2, t = el.tile_scores2(q_tile, k_tile, m_start, n_start)
        row_lse2 = np.where(empty[m_start:m_end], 0.0, lse2[m_start:m_end])
        p = np.exp2(s2 - row_lse2[:, None])
        dcap = 1.0 if t is None else 1.0 - t * t
        return np.where(empty[m_start:m_end, None], 0.0, p), dcap

    def dprobs(do_tile, v_tile, keep):
        """dP = dO V^T, with dropout times K / (1 - p) (the gradient reaching
        the undropped P)."""
        dp = do_tile @ v_tile.T
        return dp if keep is None else np.where(keep, dp * el.rescale, 0.0)

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
        # Only the query tiles of the window (causal: none above the diagonal).
        for m_start in _tiles(*_query_range(el.win, n_start, n_end), BLOCK_M):
            m_end = min(m_start + BLOCK_M, seqlen_q)
            q_tile, do_tile = q[m_start:m_end], dout[m_start:m_end]
            p, dcap = probs(q_tile, k_tile, m_start, m_end, n_start)   # (BLOCK_M, BLOCK_N)
            keep = el.tile_keep(m_start, m_end, n_start, n_end)
            acc_dv += (p if keep is None else np.where(keep, p, 0.0)).T @ do_tile  # dV += P^T dO
            dp = dprobs(do_tile, v_tile, keep)                   # dP = dO V^T
            ds = p * (dp - delta[m_start:m_end, None])           # dS = P (dP - delta)
            if dbias is not None:
                dbias.add(el.index, m_start, n_start, ds)        # dbias: dS before tanh'
            ds = ds * dcap                                       # softcap: times tanh'
            acc_dk += ds.T @ q_tile                              # dK += dS^T Q
        dk[n_start:n_end] = acc_dk * el.scale                    # d(scale * QK^T)/dK
        dv[n_start:n_end] = acc_dv * el.rescale                  # dropout's 1 / (1 - p)

    # Step 3: dQ.  One CTA per query tile, looping over the key tiles it sees
    # (the same loop bounds as the forward pass).
    dq = np.zeros_like(q)
    for m_start in range(0, seqlen_q, BLOCK_M):
        m_end = min(m_start + BLOCK_M, seqlen_q)
        q_tile, do_tile = q[m_start:m_end], dout[m_start:m_end]
        acc_dq = np.zeros_like(q_tile)   # (BLOCK_M, D)
        for n_start in _tiles(*_key_range(el.win, m_start, m_end), BLOCK_N):
            n_end = min(n_start + BLOCK_N, seqlen_k)
            k_tile, v_tile = k[n_start:n_end], v[n_start:n_end]
            p, dcap = probs(q_tile, k_tile, m_start, m_end, n_start)
            dp = dprobs(do_tile, v_tile, el.tile_keep(m_start, m_end, n_start, n_end))
            ds = p * (dp - delta[m_start:m_end, None]) * dcap
            acc_dq += ds @ k_tile                                # dQ += dS K
        dq[m_start:m_end] = acc_dq * el.scale
    return dq, dk, dv, dsink


def attention_tiled(q, k, v, causal: bool = False, scale=None, block_m: int = 64,
                    block_n: int = 64, *, window=None, softcap=None, alibi_slopes=None,
                    sink=None, bias=None, mask=None, dropout_p=0.0, seed=None, offset=0):
    """FlashAttention-2 forward, tile by tile, in float64.

    Same arguments and results as :func:`attention_naive`; ``block_m`` and
    ``block_n`` are the query and key tile sizes (BLOCK_M, BLOCK_N).

    Per query tile [m0, m1) (Q_i stays resident), over the key tiles that
    cover [key_begin(m0, m1), key_end(m0, m1)) (floored to a tile start), per
    key tile (K_j, V_j stream)::

        s2    = score2(Q_i K_j^T)      scale * log2(e), softcap, ALiBi, bias;
                                       -inf if hidden or masked
        m_new = max(m_i, rowmax(s2))
        alpha = exp2(m_i - m_new)      rescale factor for the old state
        P     = exp2(s2 - m_new)
        l_i   = l_i * alpha + rowsum(P)
        O_i   = O_i * alpha + (P o K_ij) V_j     K_ij: the tile's dropout keep bits
        m_i   = m_new

    The state starts at ``m_i = -inf, l_i = 0``; with a sink at ``m_i =
    sink * log2(e), l_i = 0``, and ``exp2(sink2 - m_i)`` is added to ``l_i``
    once after the loop.  At the end ``O_i / ((1 - dropout_p) l_i)`` and
    ``lse = (m_i + log2 l_i) * ln 2``.  A tile reads only its slice of the
    bias and the mask and draws only its own keep bits.
    """
    q, k, v, batch, scale = _operands(q, k, v, scale)
    var = _pair_variant(batch, q, k, causal, window, softcap, alibi_slopes, sink, bias, mask,
                        dropout_p, seed, offset)
    out = np.zeros(batch + (q.shape[-2], v.shape[-1]))
    lse = np.zeros(batch + (q.shape[-2],))
    for b, el in _elements(batch, q.shape[-2], k.shape[-2], scale, var):
        out[b], lse[b] = _fwd_one(q[b], k[b], v[b], el, block_m, block_n)
    return out, lse


def attention_backward_tiled(dout, q, k, v, out, lse, causal: bool = False, scale=None,
                             block_m: int = 64, block_n: int = 64, *, window=None, softcap=None,
                             alibi_slopes=None, sink=None, bias=None, mask=None, dropout_p=0.0,
                             seed=None, offset=0, bias_grad=False):
    """FlashAttention-2 backward, tile by tile, in float64.

    Same arguments and results as :func:`attention_backward_naive`.  The three
    steps of the kernels:

    1. preprocess ``delta = rowsum(dO * O)`` per query row; with a sink also
       ``dsink = -sum_i exp2(sink2 - lse2_i) * delta_i`` (log2 units);
    2. per key tile [n0, n1), over the query tiles that cover
       [query_begin(n0, n1), query_end(n0, n1)), recompute
       ``P_ij = exp2(s2_ij - lse2_i)`` from the saved LSE and accumulate
       ``dV_j += (P o K)^T dO_i``, ``dP = (dO_i V_j^T) o K / (1 - dropout_p)``
       (K: the tile's dropout keep bits, all ones without dropout),
       ``dS = P * (dP - delta_i)``, dbias's share ``dS`` (into the bias's own
       shape), then ``dS *= 1 - tanh^2`` (with a softcap only) and
       ``dK_j += dS^T Q_i``; at the end ``dV_j /= 1 - dropout_p``;
    3. per query tile i, over the key tiles it sees (the forward's range),
       ``dQ_i += dS K_j``.

    dQ and dK carry the softmax scale.  Nothing of size Sq x Sk is stored
    (dbias has the bias's shape).
    """
    (q_shape, k_shape, v_shape), batch, scale, (dout, q, k, v, out, lse) = _backward_operands(
        dout, q, k, v, out, lse, scale)
    var = _pair_variant(batch, q, k, causal, window, softcap, alibi_slopes, sink, bias, mask,
                        dropout_p, seed, offset)
    dbias = _BiasGrad(var.bias_shape, batch) if _check_bias_grad(bias_grad, var) else None
    dq, dk, dv = np.zeros(q.shape), np.zeros(k.shape), np.zeros(v.shape)
    dsink = np.zeros(batch)
    for b, el in _elements(batch, q.shape[-2], k.shape[-2], scale, var):
        dq[b], dk[b], dv[b], ds_b = _bwd_one(dout[b], q[b], k[b], v[b], out[b], lse[b], el,
                                             block_m, block_n, dbias)
        if ds_b is not None:
            dsink[b] = ds_b
    grads = (_sum_to_shape(dq, q_shape), _sum_to_shape(dk, k_shape), _sum_to_shape(dv, v_shape))
    if var.sink is not None:
        grads += (_sum_to_shape(dsink, var.sink_shape),)
    if dbias is not None:
        grads += (dbias.result(),)
    return grads


# The packed-batch and KV-cache references are built on the functions above;
# imported last so that their module finds this one complete.
from ._reference_varlen import (  # noqa: E402
    attention_varlen_backward_naive,
    attention_varlen_naive,
    attention_with_kvcache_naive,
)


def merge_attention_naive(outs, lses):
    """``(out, lse)`` of attention over the union of disjoint key sets, from
    ``(out_i, lse_i)`` over each (natural-log LSEs), in float64:
    ``lse = log(sum_i exp(lse_i))``, ``out = sum_i exp(lse_i - lse) out_i``.
    Rows with no key in any set (every ``lse_i = -inf``) give 0 and -inf.
    (flashcupy/_merge.py holds the formula, shared with the GPU version.)"""
    from . import _merge

    if isinstance(outs, (list, tuple)) and isinstance(lses, (list, tuple)):
        outs = [np.asarray(o) for o in outs]
        lses = [np.asarray(x) for x in lses]
    _merge.check("merge_attention_naive", outs, lses, lambda x: isinstance(x, np.ndarray),
                 "numpy.ndarray", lambda x: f"shape {x.shape} and dtype {x.dtype}",
                 (np.dtype(np.float32), np.dtype(np.float64)))
    return _merge.merge(np, outs, lses, _f64, lambda x: x)
