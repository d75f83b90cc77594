"""Philox4x32-10 and the dropout keep decision, in NumPy (no CuPy needed).

This module is the bit-level contract of dropout in flashcupy: the float64
references (``flashcupy.reference``) and the CUDA kernels draw the same bits
for the same (seed, offset, element), so a kernel's dropout pattern can be
checked exactly, and a backward regenerates the forward's pattern from the
seed alone.

The generator
-------------
Philox4x32-10 (Salmon, Moraes, Dror, Shaw, "Parallel random numbers: as easy
as 1, 2, 3", SC 2011; the generator of Random123, PyTorch and flash-attn), a
counter-based generator: a pure function of a 128-bit counter and a 64-bit key
that returns four 32-bit words.  With the constants::

    M0 = 0xD2511F53   M1 = 0xCD9E8D57   (round multipliers)
    W0 = 0x9E3779B9   W1 = 0xBB67AE85   (Weyl key increments)

one round maps the counter (c0, c1, c2, c3) under the key (k0, k1) to::

    hi0:lo0 = M0 * c0                 (full 64-bit product, high:low 32-bit halves)
    hi1:lo1 = M1 * c2
    (c0, c1, c2, c3) <- (hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0)

and then bumps the key, ``k0 += W0``, ``k1 += W1`` (mod 2**32).  Ten rounds,
the key bumped between consecutive rounds; the final counter is the output
(x0, x1, x2, x3).  Random123's known-answer vectors hold, e.g. counter
(0, 0, 0, 0) under key (0, 0) gives (0x6627e8d5, 0xe169c58d, 0xbc57ac4c,
0x9b00dbd8).

The keep decision
-----------------
Dropout with probability ``dropout_p`` over attention probabilities of batch
shape ``batch`` (the broadcast batch dims of q, k, v), query length Sq and
key length Sk, with a ``seed`` in [0, 2**64) and an ``offset`` in [0, 2**32):

* element (b, i, j), where ``b`` is a batch coordinate tuple, query row ``i``
  and key column ``j``, has the flat batch index ``bh`` = the row-major
  (C order) index of ``b`` within ``batch``;
* its counter is ``(c0, c1, c2, c3) = (4 * (j // 32) + (j // 2) % 4, i, bh,
  offset)``, its key ``(k0, k1) = (seed & 0xFFFFFFFF, seed >> 32)``;
* of the four output words it takes word ``x[(j // 8) % 4]``, and of that
  word the 16-bit half ``j % 2``: bits 0-15 for an even ``j``, bits 16-31 for
  an odd one;
* the pair is kept iff that half ``>= threshold``, where
  ``threshold = min(2**16 - 1, round(dropout_p * 2**16))`` is an integer
  (Python's ``round`` of the exact float64 product: halves to even).

So one Philox call serves 8 elements of a row: within each block of 32 key
columns, the columns ``8 w + 2 t + e`` (w = 0..3, e = 0, 1) of one ``t`` in
0..3.  Those are exactly the elements of a row that one thread holds in the
m16n8 accumulator layout of the tensor-core kernels (lane ``4 g + t``), so a
thread draws every bit it needs from its own calls and uses all 128 of them
(FlashAttention-2 likewise draws 16 8-bit values per call; 16 bits keep the
keep probability within 2**-17 of ``1 - dropout_p``).

``dropout_p = 0`` gives threshold 0 and keeps every pair.  A kept pair is
scaled by ``1 / (1 - dropout_p)`` (as PyTorch's SDPA does); the keep
probability is ``1 - threshold / 2**16``.  The bits of an element depend only
on (seed, offset, bh, i, j), never on Sq, Sk, the tiling or the order of
evaluation.

Functions
---------
``philox4x32_10(counter, key)``
    The generator, vectorized: four uint32 arrays.
``dropout_threshold(p)``
    The integer threshold above.
``keep_mask(seed, offset, batch_shape, seqlen_q, seqlen_k, dropout_p, rows=None, cols=None)``
    The boolean keep mask of a whole problem, or of a block of it.
``check_dropout(dropout_p, seed, offset)``
    Validates the three arguments (errors name them) and returns them
    normalized.
"""
from __future__ import annotations

import math
import numbers

import numpy as np

__all__ = ["M0", "M1", "W0", "W1", "philox4x32_10", "dropout_threshold", "keep_mask",
           "check_dropout", "counter_c0"]

M0 = 0xD2511F53
M1 = 0xCD9E8D57
W0 = 0x9E3779B9
W1 = 0xBB67AE85
ROUNDS = 10

_MASK32 = np.uint64(0xFFFFFFFF)
_SHIFT32 = np.uint64(32)


def _words(x, name: str) -> np.ndarray:
    """``x`` (ints or an integer array) as uint64 values that fit in 32 bits."""
    a = np.asarray(x)
    if a.dtype.kind not in "iu":
        raise TypeError(f"{name} words must be integers in [0, 2**32), got dtype {a.dtype}")
    if a.size and (int(a.min()) < 0 or int(a.max()) > 0xFFFFFFFF):
        raise ValueError(f"{name} words must be integers in [0, 2**32)")
    return a.astype(np.uint64)


def philox4x32_10(counter, key):
    """Philox4x32-10 of ``counter`` under ``key``, elementwise.

    Parameters
    ----------
    counter : 4 integer arrays (or ints) in [0, 2**32)
        The words (c0, c1, c2, c3); they broadcast together (and with the key).
    key : 2 integer arrays (or ints) in [0, 2**32)
        The words (k0, k1).

    Returns
    -------
    (x0, x1, x2, x3) : four numpy.uint32 arrays of the broadcast shape.
    """
    if len(counter) != 4 or len(key) != 2:
        raise ValueError(f"Philox4x32 takes 4 counter words and 2 key words, got "
                         f"{len(counter)} and {len(key)}")
    words = [_words(c, "counter") for c in counter] + [_words(w, "key") for w in key]
    shape = np.broadcast_shapes(*(w.shape for w in words))
    return tuple(np.broadcast_to(x, shape).astype(np.uint32) for x in _rounds(*words))


def _rounds(c0, c1, c2, c3, k0, k1):
    """The ten rounds on uint64 arrays holding 32-bit words (broadcast by the
    ufuncs); returns the four output words, still as uint64."""
    m0, m1 = np.uint64(M0), np.uint64(M1)
    w0, w1 = np.uint64(W0), np.uint64(W1)
    for r in range(ROUNDS):
        p0 = c0 * m0          # < 2**64: exact in uint64
        p1 = c2 * m1
        c0, c1, c2, c3 = ((p1 >> _SHIFT32) ^ c1 ^ k0, p1 & _MASK32,
                          (p0 >> _SHIFT32) ^ c3 ^ k1, p0 & _MASK32)
        if r + 1 < ROUNDS:
            k0 = (k0 + w0) & _MASK32
            k1 = (k1 + w1) & _MASK32
    return c0, c1, c2, c3


def _real(x, name: str) -> float:
    if isinstance(x, (bool, np.bool_)) or not isinstance(x, numbers.Real):
        raise TypeError(f"{name} must be a real number in [0, 1), got {x!r}")
    return float(x)


def _integer(x, name: str, bound_bits: int) -> int:
    if isinstance(x, (bool, np.bool_)) or not isinstance(x, numbers.Integral):
        raise TypeError(f"{name} must be an int in [0, 2**{bound_bits}), got {x!r}")
    x = int(x)
    if not 0 <= x < 2**bound_bits:
        raise ValueError(f"{name} must be an int in [0, 2**{bound_bits}), got {x}")
    return x


# The largest dropout_p accepted: the keep rate's 16-bit quantization error
# (<= 2**-17) stays below 0.08 % of 1 - p, and 1 / (1 - p) <= 100 keeps the
# rescaled probabilities far inside float16's range.
MAX_DROPOUT_P = 0.99


def check_dropout(dropout_p, seed, offset):
    """``(dropout_p, seed, offset)`` validated: a float in [0, 0.99], an int in
    [0, 2**64) or None, an int in [0, 2**32).  ``seed`` may be None only when
    ``dropout_p == 0``.  TypeError / ValueError name the argument."""
    p = _real(dropout_p, "dropout_p")
    if not (0.0 <= p < 1.0):   # also rejects NaN
        raise ValueError(f"dropout_p must be in [0, 1), got {p!r}")
    if p > MAX_DROPOUT_P:
        raise ValueError(
            f"dropout_p must be <= {MAX_DROPOUT_P}, got {p!r}: the keep decision draws 16 "
            f"bits per pair, so the keep rate 1 - dropout_p is exact only to 2**-17, "
            f"more than 0.08 % of it above {MAX_DROPOUT_P}")
    if seed is not None:
        seed = _integer(seed, "seed", 64)
    elif p > 0:
        raise ValueError(f"seed is required with dropout_p > 0 (got dropout_p={p!r}): "
                         f"an int in [0, 2**64) that fixes the dropout pattern")
    offset = _integer(offset, "offset", 32)
    return p, seed, offset


THRESHOLD_BITS = 16


def dropout_threshold(p) -> int:
    """``min(2**16 - 1, round(p * 2**16))``: a pair is kept iff its 16 bits >= this."""
    p = _real(p, "dropout_p")
    if not (0.0 <= p < 1.0):
        raise ValueError(f"dropout_p must be in [0, 1), got {p!r}")
    return min(2**THRESHOLD_BITS - 1, int(round(p * 2.0**THRESHOLD_BITS)))


def _index_range(idx, length: int, name: str) -> np.ndarray:
    """Row or column indices (a range, a slice or 1-D integers) inside [0, length)."""
    if idx is None:
        return np.arange(length, dtype=np.int64)
    if isinstance(idx, slice):
        return np.arange(length, dtype=np.int64)[idx]
    a = np.asarray(idx)
    if a.ndim != 1 or (a.size and a.dtype.kind not in "iu"):
        raise TypeError(f"{name} must be a range, a slice or 1-D integer indices, got {idx!r}")
    a = a.astype(np.int64)
    if a.size and (a.min() < 0 or a.max() >= length):
        raise ValueError(f"{name} must lie in [0, {length}), got indices from {a.min()} "
                         f"to {a.max()}")
    return a


def keep_mask(seed, offset, batch_shape, seqlen_q, seqlen_k, dropout_p, rows=None, cols=None,
              *, batch_index=None) -> np.ndarray:
    """The dropout keep mask (True = kept), as the module docstring defines it.

    Parameters
    ----------
    seed : int in [0, 2**64), or None when dropout_p == 0 (then every pair is kept)
    offset : int in [0, 2**32)
    batch_shape : tuple of ints
        The broadcast batch dims of q, k, v (flat index ``bh`` in C order).
    seqlen_q, seqlen_k : int
        Sq and Sk (the index bounds of ``rows`` and ``cols``).
    dropout_p : float in [0, 0.99]
    rows, cols : range, slice or 1-D integer indices, optional
        The query rows and key columns to generate (default: all), so that a
        tiled computation can draw one tile; the bits of an element depend on
        its coordinates only.
    batch_index : int or tuple of ints, keyword-only, optional
        Generate one batch element only: its flat index ``bh`` or its
        coordinate tuple within ``batch_shape``.  The result then has no batch
        dims.

    Returns
    -------
    numpy.ndarray of bool, shape ``batch_shape + (len(rows), len(cols))``
    (``(len(rows), len(cols))`` with ``batch_index``).
    """
    p, seed, offset = check_dropout(dropout_p, seed, offset)
    batch_shape = tuple(int(n) for n in batch_shape)
    n_batch = math.prod(batch_shape)
    for name, n in (("seqlen_q", seqlen_q), ("seqlen_k", seqlen_k)):
        if not 0 <= n <= 2**32:
            raise ValueError(f"{name} must be in [0, 2**32], got {n}")
    if n_batch > 2**32:
        raise ValueError(f"the batch has {n_batch} elements; the counter holds at most 2**32")
    i = _index_range(rows, seqlen_q, "rows")
    j = _index_range(cols, seqlen_k, "cols")
    if batch_index is None:
        bh = np.arange(n_batch, dtype=np.int64).reshape(batch_shape)
    else:
        if isinstance(batch_index, tuple):
            if len(batch_index) != len(batch_shape):
                raise ValueError(f"batch_index {batch_index} does not index batch_shape "
                                 f"{batch_shape}")
            flat = int(np.ravel_multi_index(batch_index, batch_shape)) if batch_shape else 0
        else:
            flat = int(batch_index)
            if not 0 <= flat < max(n_batch, 1):
                raise ValueError(f"batch_index {flat} is outside a batch of {n_batch}")
        bh = np.array(flat, dtype=np.int64)
    out_shape = bh.shape + (i.size, j.size)
    threshold = dropout_threshold(p)
    if threshold == 0 or not (i.size and j.size and bh.size):
        return np.ones(out_shape, dtype=bool)
    # One Philox call per (bh, i, c0): the counters the requested columns use,
    # then each column picks its word and its 16-bit half.
    c0 = counter_c0(j)
    calls, which = np.unique(c0, return_inverse=True)
    shape = (bh.size, i.size, calls.size)
    u64 = np.uint64
    words = _rounds(np.broadcast_to(calls.astype(u64), shape).copy(),
                    np.broadcast_to(i.astype(u64)[:, None], shape).copy(),
                    np.broadcast_to(bh.astype(u64).reshape(-1, 1, 1), shape).copy(),
                    np.full(shape, offset, dtype=u64), u64(seed & 0xFFFFFFFF), u64(seed >> 32))
    words = np.stack(words, axis=-1)                       # (n_bh, rows, calls, 4)
    picked = words[:, :, which.reshape(-1), (j // 8) % 4]  # (n_bh, rows, cols)
    half = (picked >> (u64(16) * (j % 2).astype(u64))) & u64(0xFFFF)
    return (half >= u64(threshold)).reshape(out_shape)


def counter_c0(j):
    """The first counter word of key column(s) ``j``: ``4 * (j // 32) + (j // 2) % 4``."""
    j = np.asarray(j, dtype=np.int64)
    return 4 * (j // 32) + (j // 2) % 4
