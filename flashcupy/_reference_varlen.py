"""Float64 NumPy references for variable-length (packed) batches and KV caches.

Three functions, each a loop over the sequences of a batch that hands every
sequence to the dense references of ``flashcupy.reference``, so that every
variant keeps exactly the dense semantics (see that module's docstring):

``attention_varlen_naive`` / ``attention_varlen_backward_naive``
    Packed ("varlen") batches, as flash-attn's ``flash_attn_varlen_func``.
``attention_with_kvcache_naive``
    Attention against a contiguous or paged KV cache, optionally appending
    new keys and values to it first, as flash-attn's ``flash_attn_with_kvcache``
    (forward only).

Packed batches
--------------
``q`` has shape ``(..., total_q, D)``, ``k`` ``(..., total_k, D)``, ``v``
``(..., total_k, Dv)``; the leading (head) axes broadcast like the dense
batch axes (a key/value head axis of size 1 is MQA, ``(Hkv, 1)`` against
``(Hkv, G)`` is GQA), and ``heads`` below is their broadcast shape.
``cu_seqlens_q`` and ``cu_seqlens_k`` are 1-D integer arrays of length
``B + 1``, starting at 0 and non-decreasing: sequence ``b`` owns the rows
``cu_seqlens_q[b]:cu_seqlens_q[b + 1]`` of q's axis -2 and the rows
``cu_seqlens_k[b]:cu_seqlens_k[b + 1]`` of k and v.  Lengths of 0 (on either
side) are allowed.  The last entry may stop short of the packed length: the
rows past it belong to no sequence and get ``out = 0``, ``lse = -inf`` and
zero gradients.

Sequence ``b`` is the dense problem ``Sq_b = len_q[b]``, ``Sk_b = len_k[b]``:

* ``causal`` and ``window`` are bottom-right aligned per sequence
  (``diag = Sk_b - Sq_b``), with local indices ``i`` and ``j``;
* ``softcap``, ``alibi_slopes`` and ``sink`` are shared by all sequences:
  the slopes and sinks broadcast to ``heads`` (one value per head, not per
  sequence), the ALiBi distance ``|i + diag - j|`` is local;
* ``bias`` (real floating) and ``mask`` (bool) are packed: shape broadcastable
  to ``heads + (total_q, total_k)``, and sequence ``b`` uses the block
  ``[..., q rows of b, k rows of b]`` (a size-1 row or column axis is
  shared by every sequence).  Entries outside the blocks are never read;
  ``dbias`` has the bias's shape and is 0 there;
* dropout (``dropout_p``, ``seed``, ``offset``) draws the bits of the dense
  rule (``flashcupy._philox``) at local rows and columns, with the counter
  word ``bh`` = the C-order flat index of ``(b, h...)`` within
  ``(B,) + heads``, i.e. ``bh = b * prod(heads) + flat(h)``::

      K_b = _philox.keep_mask(seed, offset, (B,) + heads, Sq_b, Sk_b, dropout_p,
                              batch_index=(b,) + h)

  A kernel computes it from its coordinates (sequence ``b``, head ``h``,
  local ``i``, ``j``), each sequence's columns start on a 32-key block as in
  the dense kernels, and a batch of equal lengths ``S`` draws exactly the
  bits of the dense problem ``(B, *heads, S, D)`` (the layout of
  ``q.reshape(*heads, B, S, D)`` moved batch first), which is also
  flash-attn's order (batch-major).

A query row that sees no key (``Sk_b = 0``, a window, causal with
``Sq_b > Sk_b``, a mask) has ``out = 0`` and ``lse = -inf`` (``lse = sink``
with a sink), as in the dense references.

KV caches
---------
``q`` has shape ``(B, ..., Sq, D)``: the batch axis first, then head axes
that broadcast against the cache's.  A cache is batch (or page) first:

contiguous (``block_table=None``)
    ``k_cache`` ``(B_cache, ..., S_max, D)``, ``v_cache`` ``(B_cache, ...,
    S_max, Dv)``.  Sequence ``b`` uses cache row ``cache_batch_idx[b]``
    (default ``b``), key position ``t`` at ``k_cache[row, ..., t, :]``.
paged (``block_table`` given)
    ``k_cache`` ``(num_pages, ..., page_size, D)`` is a pool of pages,
    ``page_size`` a multiple of 16; ``block_table`` (integer, ``(B,
    max_pages)``, every entry in ``[0, num_pages)``) lists sequence ``b``'s
    pages in order: key position ``t`` lives at ``k_cache[block_table[b, t //
    page_size], ..., t % page_size, :]``.  ``cache_batch_idx`` does not apply.

``cache_seqlens`` (an int, or integers of shape ``(B,)``) is the number of keys
already cached per sequence.  With ``k_new`` / ``v_new`` (shapes ``(B, ...,
S_new, D)`` and ``(B, ..., S_new, Dv)``, the cache's head axes) the new keys
and values are first written IN PLACE into the given cache arrays at positions
``cache_seqlens[b] ... cache_seqlens[b] + S_new - 1`` (cast to the cache's
dtype; ``cache_seqlens`` itself is not changed), as ``flash_attn_with_kvcache``
does; every check runs before the first write, and no two sequences may
write the same cache slot.  Sequence ``b`` then attends to its keys ``0 ..
Sk_b - 1``, ``Sk_b = cache_seqlens[b] + S_new``, read from the cache as
stored (so in the cache's precision), with the Sq queries the last Sq
positions (bottom-right ``causal`` and ``window``).  ``alibi_slopes`` and
``sink`` broadcast to ``(B,) + heads``.

flash-attn's ``(B, S, H, D)`` layouts (and ``(num_pages, page_size, H, D)``)
are views here: pass ``np.swapaxes(x, -2, -3)`` for q, the caches and the new
keys; the writes go through the view into the caller's array.
"""
from __future__ import annotations

import numbers

import numpy as np

from . import _philox
from . import reference as _ref

__all__ = ["attention_varlen_naive", "attention_varlen_backward_naive",
           "attention_with_kvcache_naive"]

PAGE_MULTIPLE = 16  # a page holds whole 16-row tiles of the kernels


def _describe(a) -> str:
    return f"shape {np.shape(a)} and dtype {np.asarray(a).dtype}"


# ----------------------------------------------------------------------------
# packed batches: validation
# ----------------------------------------------------------------------------

def _cu_seqlens(x, name: str, packed_len: int, packed: str) -> np.ndarray:
    """``x`` as int64 cumulative lengths, checked; errors name ``name``."""
    a = np.asarray(x)
    if a.dtype.kind not in "iu":
        raise TypeError(f"{name} must be a 1-D integer array of B + 1 cumulative sequence "
                        f"lengths, got {_describe(a)}")
    if a.ndim != 1 or a.size == 0:
        raise ValueError(f"{name} must be 1-D of length B + 1 (>= 1), got {_describe(a)}")
    if a.dtype.kind == "u" and int(a.max()) > np.iinfo(np.int64).max:
        raise ValueError(f"{name} holds a value past int64, got max {int(a.max())}")
    a = a.astype(np.int64)
    if a[0] != 0:
        raise ValueError(f"{name} must start at 0, got {name}[0] = {int(a[0])} "
                         f"({_describe(x)})")
    down = np.flatnonzero(np.diff(a) < 0)
    if down.size:
        i = int(down[0])
        raise ValueError(f"{name} must be non-decreasing, got {name}[{i}] = {int(a[i])} > "
                         f"{name}[{i + 1}] = {int(a[i + 1])} ({_describe(x)})")
    if a[-1] > packed_len:
        raise ValueError(f"{name}[-1] = {int(a[-1])} is beyond the packed length {packed_len} "
                         f"of {packed} (its axis -2)")
    return a


def _packed_pair(x, heads: tuple, total_q: int, total_k: int, name: str):
    """A packed bias or mask, at least 2-D, checked to broadcast to
    ``heads + (total_q, total_k)``; None stays None."""
    if x is None:
        return None
    a = np.asarray(x)
    if name == "mask":
        if a.dtype != np.bool_:
            raise TypeError(f"mask must be a bool array (True = may attend), got {_describe(a)}")
    elif not _ref._is_float_dtype(a.dtype):
        raise TypeError(f"{name} must be a real floating-point array, got {_describe(a)}")
    target = tuple(heads) + (total_q, total_k)
    try:
        ok = np.broadcast_shapes(a.shape, target) == target
    except ValueError:
        ok = False
    if not ok:
        raise ValueError(f"{name} of {_describe(a)} does not broadcast to heads + (total_q, "
                         f"total_k) = {target}: a packed {name} holds sequence b's block at "
                         f"rows cu_seqlens_q[b]:cu_seqlens_q[b+1], columns "
                         f"cu_seqlens_k[b]:cu_seqlens_k[b+1]")
    return a.reshape((1,) * (2 - a.ndim) + a.shape) if a.ndim < 2 else a


def _block_slices(a: np.ndarray, rq: slice, rk: slice) -> tuple:
    """The (row, column) slices of sequence block (rq, rk) in a packed array:
    a size-1 axis is broadcast, so every sequence takes its one row/column."""
    return (slice(0, 1) if a.shape[-2] == 1 else rq,
            slice(0, 1) if a.shape[-1] == 1 else rk)


class _Packed:
    """A validated packed problem: its operands, sequences and variants."""

    def __init__(self, q, k, v, cu_seqlens_q, cu_seqlens_k, causal, scale, window, softcap,
                 alibi_slopes, sink, bias, mask, dropout_p, seed, offset):
        self.q, self.k, self.v = np.asarray(q), np.asarray(k), np.asarray(v)
        self.heads = _ref._check_shapes(self.q, self.k, self.v)
        total_q, total_k = self.q.shape[-2], self.k.shape[-2]
        self.cu_q = _cu_seqlens(cu_seqlens_q, "cu_seqlens_q", total_q, f"q {self.q.shape}")
        self.cu_k = _cu_seqlens(cu_seqlens_k, "cu_seqlens_k", total_k, f"k {self.k.shape}")
        if self.cu_q.size != self.cu_k.size:
            raise ValueError(f"cu_seqlens_q (shape {self.cu_q.shape}) and cu_seqlens_k (shape "
                             f"{self.cu_k.shape}) must describe the same number B of sequences")
        self.batch = self.cu_q.size - 1
        # Everything but the packed pair arrays is validated once here, with
        # the dense rules (errors name the argument), also when B == 0.
        var = _ref._variant(self.heads, causal, window, softcap, alibi_slopes, sink,
                            dropout_p=dropout_p, seed=seed, offset=offset)
        self.dropout = var.dropout
        self.causal, self.scale = causal, scale
        self.sink_shape = var.sink_shape
        self.bias = _packed_pair(bias, self.heads, total_q, total_k, "bias")
        self.mask = _packed_pair(mask, self.heads, total_q, total_k, "mask")
        # the keywords every sequence's dense call gets (dropout: drawn here)
        self.dense_kw = dict(window=window, softcap=softcap, alibi_slopes=alibi_slopes,
                             sink=sink)

    def sequences(self):
        """(b, q row slice, k row slice, the dense keywords of sequence b)."""
        for b in range(self.batch):
            rq = slice(int(self.cu_q[b]), int(self.cu_q[b + 1]))
            rk = slice(int(self.cu_k[b]), int(self.cu_k[b + 1]))
            kw = dict(self.dense_kw)
            for name, a in (("bias", self.bias), ("mask", self.mask)):
                if a is not None:
                    kw[name] = a[(Ellipsis,) + _block_slices(a, rq, rk)]
            yield b, rq, rk, kw

    def keep(self, b: int, rq: slice, rk: slice):
        """Sequence b's dropout keep bits, heads + (Sq_b, Sk_b); None without
        dropout.  bh is the flat index of (b, h...) in (B,) + heads."""
        d = self.dropout
        if d is None:
            return None
        sq, sk = rq.stop - rq.start, rk.stop - rk.start
        full = (self.batch,) + tuple(self.heads)
        keep = np.empty(tuple(self.heads) + (sq, sk), dtype=bool)
        for h in np.ndindex(*self.heads):
            keep[h] = _philox.keep_mask(d.seed, d.offset, full, sq, sk, d.p,
                                        batch_index=(b,) + h)
        return keep


def _dropped_scores(q, k, v, causal, scale, kw):
    """The dense operands and scores of one sequence (no dropout): what the
    dropout paths below need besides the keep bits."""
    q, k, v, batch, scale = _ref._operands(q, k, v, scale)
    var = _ref._pair_variant(batch, q, k, causal, kw["window"], kw["softcap"],
                             kw["alibi_slopes"], kw["sink"], kw.get("bias"), kw.get("mask"),
                             0.0, None, 0)
    s, t = _ref._scores(q, k, scale, var)
    return q, k, v, scale, var, s, t


# ----------------------------------------------------------------------------
# packed batches: forward and backward
# ----------------------------------------------------------------------------

def attention_varlen_naive(q, k, v, cu_seqlens_q, cu_seqlens_k, causal: bool = False,
                           scale=None, *, window=None, softcap=None, alibi_slopes=None,
                           sink=None, bias=None, mask=None, dropout_p=0.0, seed=None, offset=0):
    """Exact attention of a packed batch in float64, sequence by sequence.

    Parameters
    ----------
    q : array_like, shape (..., total_q, D)
    k : array_like, shape (..., total_k, D)
    v : array_like, shape (..., total_k, Dv)
    cu_seqlens_q, cu_seqlens_k : 1-D integer arrays of length B + 1
        Cumulative sequence lengths (from 0, non-decreasing, the last entry
        at most the packed length).
    causal, scale, window, softcap, alibi_slopes, sink
        As in :func:`flashcupy.reference.attention_naive`, per sequence
        (bottom-right alignment uses each sequence's own lengths); the slopes
        and sinks broadcast to the head dims.
    bias, mask : packed arrays broadcastable to ``heads + (total_q, total_k)``
        Sequence b reads its block (the module docstring).
    dropout_p, seed, offset
        Dropout; sequence b, head h draws the dense bits of batch element
        ``bh = b * prod(heads) + flat(h)`` at local rows and columns.

    Returns
    -------
    out : numpy.ndarray, shape heads + (total_q, Dv), float64
    lse : numpy.ndarray, shape heads + (total_q,), float64
        Rows past ``cu_seqlens_q[-1]``: ``out = 0``, ``lse = -inf``.
    """
    pk = _Packed(q, k, v, cu_seqlens_q, cu_seqlens_k, causal, scale, window, softcap,
                 alibi_slopes, sink, bias, mask, dropout_p, seed, offset)
    heads, total_q = tuple(pk.heads), pk.q.shape[-2]
    out = np.zeros(heads + (total_q, pk.v.shape[-1]))
    lse = np.full(heads + (total_q,), -np.inf)
    for b, rq, rk, kw in pk.sequences():
        qb, kb, vb = pk.q[..., rq, :], pk.k[..., rk, :], pk.v[..., rk, :]
        # dropout leaves the LSE alone: the dense call gives it in every case
        out_b, lse_b = _ref.attention_naive(qb, kb, vb, causal, scale, **kw)
        keep = pk.keep(b, rq, rk)
        if keep is not None:
            # The dense function would number this sequence's heads from bh = 0;
            # its own bits are drawn here and applied as attention_naive does.
            qb, kb, vb, _, _, s, _ = _dropped_scores(qb, kb, vb, causal, scale, kw)
            p = _ref._probabilities(s, lse_b)
            out_b = np.matmul(np.where(keep, p * pk.dropout.rescale, 0.0), vb)
        out[..., rq, :], lse[..., rq] = out_b, lse_b
    return out, lse


def _dropout_backward(dout, q, k, v, out, lse, causal, scale, kw, keep, rescale, bias_grad):
    """``attention_backward_naive`` of one sequence with the given keep bits
    (the formulas of its docstring), results in the same order."""
    shapes = (np.shape(q), np.shape(k), np.shape(v))
    _, _, _, scale_, var, s, t = _dropped_scores(q, k, v, causal, scale, kw)
    _, batch, _, (dout, q, k, v, out, lse) = _ref._backward_operands(dout, q, k, v, out, lse,
                                                                     scale)
    p = _ref._probabilities(s, lse)
    dv = np.matmul(np.swapaxes(np.where(keep, p * rescale, 0.0), -1, -2), dout)
    dp = np.where(keep, np.matmul(dout, np.swapaxes(v, -1, -2)) * rescale, 0.0)
    delta = np.sum(dout * out, axis=-1)
    ds = p * (dp - delta[..., None])
    dbias = _ref._sum_to_shape(ds, var.bias_shape) if bias_grad else None
    if t is not None:
        ds = ds * (1.0 - t * t)
    grads = (_ref._sum_to_shape(np.matmul(ds, k) * scale_, shapes[0]),
             _ref._sum_to_shape(np.matmul(np.swapaxes(ds, -1, -2), q) * scale_, shapes[1]),
             _ref._sum_to_shape(dv, shapes[2]))
    if var.sink is not None:
        dsink = -np.sum(_ref._sink_probability(var.sink[..., None], lse) * delta, axis=-1)
        grads += (_ref._sum_to_shape(dsink, var.sink_shape),)
    if bias_grad:
        grads += (dbias,)
    return grads


def attention_varlen_backward_naive(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k,
                                    causal: bool = False, scale=None, *, window=None,
                                    softcap=None, alibi_slopes=None, sink=None, bias=None,
                                    mask=None, dropout_p=0.0, seed=None, offset=0,
                                    bias_grad=False):
    """Exact gradients of :func:`attention_varlen_naive` in float64.

    ``dout`` and ``out`` have shape ``heads + (total_q, Dv)``, ``lse``
    ``heads + (total_q,)`` (they broadcast); the keywords must be the
    forward's.  Each sequence's gradients are those of
    :func:`flashcupy.reference.attention_backward_naive` on its slices (with
    its own dropout bits).

    Returns
    -------
    dq, dk, dv : numpy.ndarray, float64, shaped like q, k, v
        Zero on rows past ``cu_seqlens_q[-1]`` / ``cu_seqlens_k[-1]``.
    dsink : numpy.ndarray, float64, only when ``sink`` is given
        Summed over the sequences, shaped like ``sink``.
    dbias : numpy.ndarray, float64, only when ``bias_grad=True``
        Shaped like the packed ``bias``; 0 outside the sequences' blocks.
    """
    pk = _Packed(q, k, v, cu_seqlens_q, cu_seqlens_k, causal, scale, window, softcap,
                 alibi_slopes, sink, bias, mask, dropout_p, seed, offset)
    if not isinstance(bias_grad, (bool, np.bool_)):
        raise TypeError(f"bias_grad must be a bool, got {bias_grad!r}")
    if bias_grad and pk.bias is None:
        raise ValueError("bias_grad=True needs a bias (got bias=None)")
    heads, total_q = tuple(pk.heads), pk.q.shape[-2]
    dout = np.broadcast_to(np.asarray(dout), heads + (total_q, pk.v.shape[-1]))
    out = np.broadcast_to(np.asarray(out), dout.shape)
    lse = np.broadcast_to(np.asarray(lse), dout.shape[:-1])
    dq, dk, dv = np.zeros(pk.q.shape), np.zeros(pk.k.shape), np.zeros(pk.v.shape)
    dsink = None if sink is None else np.zeros(pk.sink_shape)
    dbias = np.zeros(pk.bias.shape) if bias_grad else None
    for b, rq, rk, kw in pk.sequences():
        args = (dout[..., rq, :], pk.q[..., rq, :], pk.k[..., rk, :], pk.v[..., rk, :],
                out[..., rq, :], lse[..., rq])
        keep = pk.keep(b, rq, rk)
        if keep is None:
            grads = _ref.attention_backward_naive(*args, causal, scale, **kw,
                                                  bias_grad=bool(bias_grad))
        else:
            grads = _dropout_backward(*args, causal, scale, kw, keep, pk.dropout.rescale,
                                      bool(bias_grad))
        dq[..., rq, :] += grads[0]
        dk[..., rk, :] += grads[1]
        dv[..., rk, :] += grads[2]
        rest = grads[3:]
        if dsink is not None:
            dsink += rest[0]
            rest = rest[1:]
        if dbias is not None:
            # += : a size-1 (shared) row or column axis collects every sequence
            dbias[(Ellipsis,) + _block_slices(dbias, rq, rk)] += rest[0]
    grads = (dq, dk, dv)
    if dsink is not None:
        grads += (dsink,)
    if dbias is not None:
        grads += (dbias.reshape(np.shape(bias)),)
    return grads


# ----------------------------------------------------------------------------
# KV cache
# ----------------------------------------------------------------------------

def _int_array(x, name: str, what: str) -> np.ndarray:
    a = np.asarray(x)
    if a.dtype.kind not in "iu":
        raise TypeError(f"{name} must be {what}, got {_describe(a)}")
    return a.astype(np.int64)


def _cache_array(c, name: str) -> np.ndarray:
    if not isinstance(c, np.ndarray):
        raise TypeError(f"{name} must be a NumPy array (k_new / v_new are written into it in "
                        f"place), got {type(c).__name__}")
    if c.ndim < 3:
        raise ValueError(f"{name} must have shape (B_cache or num_pages, ..., S_max or "
                         f"page_size, D), got {_describe(c)}")
    return c


def _new_keys(x, name: str, cache: np.ndarray, cache_name: str, batch: int) -> np.ndarray:
    a = np.asarray(x)
    if not (_ref._is_float_dtype(a.dtype) or a.dtype.kind in "iu"):
        raise TypeError(f"{name} must be a real array, got {_describe(a)}")
    want = (batch,) + cache.shape[1:-2]
    if a.ndim != cache.ndim or a.shape[:-2] != want or a.shape[-1] != cache.shape[-1]:
        raise ValueError(f"{name} of {_describe(a)} must have shape {want + ('S_new', cache.shape[-1])}: "
                         f"the batch of q, then the head axes and head dim of {cache_name} "
                         f"{cache.shape}")
    return a


def attention_with_kvcache_naive(q, k_cache, v_cache, cache_seqlens, *, k_new=None,
                                 v_new=None, cache_batch_idx=None, block_table=None,
                                 causal: bool = False, scale=None, window=None, softcap=None,
                                 alibi_slopes=None, sink=None):
    """Exact attention against a KV cache in float64 (forward only).

    WRITES ``k_new`` / ``v_new`` INTO ``k_cache`` / ``v_cache`` IN PLACE when
    they are given (the module docstring defines the layouts and positions).

    Parameters
    ----------
    q : array_like, shape (B, ..., Sq, D)
    k_cache, v_cache : numpy.ndarray
        Contiguous ``(B_cache, ..., S_max, D)`` / ``(..., S_max, Dv)``, or with
        ``block_table`` a page pool ``(num_pages, ..., page_size, D)`` /
        ``(..., page_size, Dv)``, page_size a multiple of 16.
    cache_seqlens : int or integer array of shape (B,)
        Keys already in the cache per sequence.
    k_new, v_new : array_like, shapes (B, ..., S_new, D) and (B, ..., S_new, Dv), optional
        Appended at positions ``cache_seqlens[b]`` onwards (both or neither).
    cache_batch_idx : integer array of shape (B,), optional
        Contiguous cache only: the cache row of each sequence (default ``b``).
    block_table : integer array of shape (B, max_pages), optional
        Paged cache: sequence b's pages in order.
    causal, scale, window, softcap
        As in :func:`flashcupy.reference.attention_naive`, with ``Sk_b =
        cache_seqlens[b] + S_new`` keys (bottom-right: the queries are the
        last Sq positions).
    alibi_slopes, sink : array_like broadcastable to (B,) + heads, optional

    Returns
    -------
    out : numpy.ndarray, shape (B,) + heads + (Sq, Dv), float64
    lse : numpy.ndarray, shape (B,) + heads + (Sq,), float64
    """
    qa = np.asarray(q)
    if qa.ndim < 3:
        raise ValueError(f"q must have shape (B, ..., Sq, D), got {_describe(qa)}")
    batch = qa.shape[0]
    k_cache, v_cache = _cache_array(k_cache, "k_cache"), _cache_array(v_cache, "v_cache")
    if k_cache.shape[:-1] != v_cache.shape[:-1]:
        raise ValueError(f"k_cache {k_cache.shape} and v_cache {v_cache.shape} must agree on "
                         f"all axes but the last (the head dims D and Dv)")
    if qa.shape[-1] != k_cache.shape[-1]:
        raise ValueError(f"q {qa.shape} and k_cache {k_cache.shape} must share the head dim D")
    try:
        heads = np.broadcast_shapes(qa.shape[1:-2], k_cache.shape[1:-2])
    except ValueError:
        raise ValueError(f"the head axes of q {qa.shape} (after the batch axis) and of k_cache "
                         f"{k_cache.shape} do not broadcast") from None
    n_slots, rows = k_cache.shape[0], k_cache.shape[-2]

    if block_table is not None:
        if cache_batch_idx is not None:
            raise ValueError("cache_batch_idx applies to a contiguous cache only; with "
                             "block_table the table picks each sequence's pages")
        if rows % PAGE_MULTIPLE or rows == 0:
            raise ValueError(f"the page size (k_cache.shape[-2] = {rows}, k_cache {k_cache.shape}) "
                             f"must be a positive multiple of {PAGE_MULTIPLE}")
        table = _int_array(block_table, "block_table", "an integer array of shape (B, max_pages)")
        if table.ndim != 2 or table.shape[0] != batch:
            raise ValueError(f"block_table must have shape (B, max_pages) with B = {batch} (q's "
                             f"batch), got {_describe(block_table)}")
        if table.size and (table.min() < 0 or table.max() >= n_slots):
            raise ValueError(f"block_table entries must be page indices in [0, {n_slots}) (the "
                             f"pool k_cache {k_cache.shape}), got entries from {int(table.min())} "
                             f"to {int(table.max())}")
        capacity = table.shape[1] * rows

        def locate(b, t):   # (page, row in page) of key position(s) t of sequence b
            return table[b, t // rows], t % rows
    else:
        if cache_batch_idx is None:
            if batch > n_slots:
                raise ValueError(f"k_cache {k_cache.shape} has {n_slots} cache rows for a batch "
                                 f"of {batch} (q {qa.shape}); pass cache_batch_idx to pick rows")
            idx = np.arange(batch)
        else:
            idx = _int_array(cache_batch_idx, "cache_batch_idx", "an integer array of shape (B,)")
            if idx.shape != (batch,):
                raise ValueError(f"cache_batch_idx must have shape ({batch},) (q's batch), got "
                                 f"{_describe(cache_batch_idx)}")
            if idx.size and (idx.min() < 0 or idx.max() >= n_slots):
                raise ValueError(f"cache_batch_idx entries must be in [0, {n_slots}) (the cache "
                                 f"rows of k_cache {k_cache.shape}), got entries from "
                                 f"{int(idx.min())} to {int(idx.max())}")
        capacity = rows

        def locate(b, t):   # (cache row, position) of key position(s) t of sequence b
            return np.full_like(t, idx[b]), t

    if isinstance(cache_seqlens, (bool, np.bool_)):
        raise TypeError(f"cache_seqlens must be an int or integers of shape ({batch},), got "
                        f"{cache_seqlens!r}")
    seqlens = _int_array(cache_seqlens, "cache_seqlens",
                         f"an int or an integer array of shape ({batch},)")
    if seqlens.ndim == 0:
        seqlens = np.full(batch, int(seqlens), dtype=np.int64)
    if seqlens.shape != (batch,):
        raise ValueError(f"cache_seqlens must be an int or have shape ({batch},) (q's batch), got "
                         f"{_describe(cache_seqlens)}")
    if seqlens.size and (seqlens.min() < 0 or seqlens.max() > capacity):
        raise ValueError(f"cache_seqlens entries must be in [0, {capacity}] (the keys a sequence's "
                         f"cache holds), got entries from {int(seqlens.min())} to "
                         f"{int(seqlens.max())}")

    s_new = 0
    if (k_new is None) != (v_new is None):
        raise ValueError("k_new and v_new go together: pass both or neither")
    if k_new is not None:
        k_new = _new_keys(k_new, "k_new", k_cache, "k_cache", batch)
        v_new = _new_keys(v_new, "v_new", v_cache, "v_cache", batch)
        if k_new.shape[-2] != v_new.shape[-2]:
            raise ValueError(f"k_new {k_new.shape} and v_new {v_new.shape} must share S_new")
        s_new = k_new.shape[-2]
        full = seqlens + s_new
        if full.size and full.max() > capacity:
            b = int(np.argmax(full))
            raise ValueError(f"no room for k_new (S_new = {s_new}): cache_seqlens[{b}] = "
                             f"{int(seqlens[b])} + S_new exceeds the {capacity} keys a "
                             f"sequence's cache holds")
        for name, c in (("k_cache", k_cache), ("v_cache", v_cache)):
            if not c.flags.writeable:
                raise ValueError(f"{name} is read-only; k_new / v_new are written into it")

    _ref._effective_window(window, causal)   # validated before any write
    _ref._check_softcap(softcap)
    full_batch = (batch,) + tuple(heads)
    slopes, _ = _ref._batch_param(alibi_slopes, full_batch, "alibi_slopes")
    sinks, _ = _ref._batch_param(sink, full_batch, "sink")

    if s_new:
        slots = [locate(b, np.arange(seqlens[b], seqlens[b] + s_new)) for b in range(batch)]
        flat = np.concatenate([slot * rows + row for slot, row in slots])
        if np.unique(flat).size != flat.size:
            raise ValueError(f"two sequences would write k_new into the same cache slot: the "
                             f"{'block_table' if block_table is not None else 'cache_batch_idx'}"
                             f" gives them overlapping positions")
        for b, (slot, row) in enumerate(slots):
            # advanced indices around the head axes put the key axis first
            k_cache[slot, ..., row, :] = np.moveaxis(k_new[b], -2, 0)
            v_cache[slot, ..., row, :] = np.moveaxis(v_new[b], -2, 0)

    sq = qa.shape[-2]
    out = np.zeros(full_batch + (sq, v_cache.shape[-1]))
    lse = np.zeros(full_batch + (sq,))
    for b in range(batch):
        slot, row = locate(b, np.arange(seqlens[b] + s_new))
        kb = np.moveaxis(k_cache[slot, ..., row, :], 0, -2)
        vb = np.moveaxis(v_cache[slot, ..., row, :], 0, -2)
        out[b], lse[b] = _ref.attention_naive(
            qa[b], kb, vb, causal, scale, window=window, softcap=softcap,
            alibi_slopes=None if slopes is None else slopes[b],
            sink=None if sinks is None else sinks[b])
    return out, lse
