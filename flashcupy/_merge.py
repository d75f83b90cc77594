"""Merging attention over disjoint key sets through their log-sum-exps.

If ``(out_i, lse_i)`` is attention of the same queries over key set ``K_i``
(each ``lse_i`` the natural-log logsumexp of that set's scores), and the sets
are disjoint, attention over their union is

    lse = log(sum_i exp(lse_i))
    out = sum_i exp(lse_i - lse) * out_i

exactly (FlashAttention's online softmax, Dao 2023, applied to whole blocks;
the combine step of split-KV decoding and of ring attention).  A row that sees
no key in a set has ``lse_i = -inf`` and weight 0 (its ``out_i`` there is not
used, even if it is NaN); a row that sees no key in
any set gets ``out = 0`` and ``lse = -inf``, as ``attention`` gives it.  NaN
(or ``+inf``) in an ``lse_i`` makes the row NaN.

One formula, written once over the array module ``xp`` (NumPy for the float64
reference, CuPy for ``flashcupy.merge_attention``, PyTorch for
``flashcupy.torch.merge_attention``, where autograd differentiates it).
"""
from __future__ import annotations

import numpy as np


def merge(xp, outs, lses, acc, out_cast):
    """(out, lse) of the merge, accumulated in ``acc(x)`` precision;
    ``out_cast(x)`` gives the output its dtype.  Only functions that NumPy,
    CuPy and PyTorch spell alike: stack, amax, where, exp, log, isneginf."""
    lse_all = xp.stack([acc(x) for x in lses])       # (n, ..., Sq)
    m = xp.amax(lse_all, 0)
    empty = xp.isneginf(m)                            # no key in any set
    m_safe = xp.where(empty, 0.0, m)
    w = xp.exp(lse_all - m_safe)                      # exp(-inf) = 0
    total = w.sum(0)                                  # >= 1 where a set has keys
    inv = xp.where(empty, 0.0, 1.0 / xp.where(empty, 1.0, total))
    out = None
    for i, o in enumerate(outs):
        # (a set with no key for a row adds nothing, whatever its out holds
        # there: split-KV buffers of empty splits need not be written)
        wi = (w[i] * inv)[..., None]
        term = xp.where(wi == 0, 0.0, acc(o) * wi)
        out = term if out is None else out + term
    lse = xp.where(empty, -np.inf, m_safe + xp.log(xp.where(empty, 1.0, total)))
    return out_cast(out), lse


def check(fn, outs, lses, is_array, kind, describe, lse_dtypes):
    """Validation shared by the front ends (raises before any work)."""
    if not isinstance(outs, (list, tuple)) or not isinstance(lses, (list, tuple)):
        raise TypeError(f"{fn}: outs and lses must be lists (or tuples) of arrays, got "
                        f"{type(outs).__name__} and {type(lses).__name__}")
    if len(outs) == 0 or len(outs) != len(lses):
        raise ValueError(f"{fn}: expected one lse per out and at least one of each, got "
                         f"{len(outs)} outs and {len(lses)} lses")
    for i, (o, l) in enumerate(zip(outs, lses)):
        for name, x in ((f"outs[{i}]", o), (f"lses[{i}]", l)):
            if not is_array(x):
                raise TypeError(f"{fn}: {name} is a {type(x).__module__}.{type(x).__name__}; "
                                f"expected a {kind}")
    o0 = outs[0]
    if o0.ndim < 2:
        raise ValueError(f"{fn}: outs[0] has {describe(o0)}; expected (..., Sq, Dv)")
    for i, (o, l) in enumerate(zip(outs, lses)):
        if tuple(o.shape) != tuple(o0.shape) or o.dtype != o0.dtype:
            raise ValueError(f"{fn}: outs[{i}] has {describe(o)}; expected outs[0]'s "
                             f"{describe(o0)} (the same queries, over other keys)")
        if tuple(l.shape) != tuple(o0.shape[:-1]):
            raise ValueError(f"{fn}: lses[{i}] has {describe(l)}; expected shape "
                             f"{tuple(o0.shape[:-1])} (outs' shape without Dv)")
        if l.dtype not in lse_dtypes:
            raise TypeError(f"{fn}: lses[{i}] has {describe(l)}; expected a float32 or "
                            f"float64 log-sum-exp (as attention(..., return_lse=True) gives)")


def merge_attention(outs, lses, *, return_lse=False):
    """Attention over the union of disjoint key sets, from attention over each.

    Parameters
    ----------
    outs : list of cupy.ndarray, each ``(..., Sq, Dv)``
        ``attention`` of the same queries over each key set (same shape and
        dtype).
    lses : list of cupy.ndarray, each ``(..., Sq)``, float32 or float64
        Their row log-sum-exps (``attention(..., return_lse=True)``).
    return_lse : bool
        Also return the union's log-sum-exp (float64 if any out or lse is
        float64, else float32), so merges can be chained.

    Returns ``out`` in the outs' dtype (accumulated in float32, or float64
    for float64 outs), or ``(out, lse)``.  Exact up to rounding: one
    ``attention`` call over the union gives the same result within the usual
    tolerance (tests/test_merge.py).  Rows with no key in any set give 0 and
    ``lse = -inf``.
    """
    import cupy

    from . import api as _api

    fn = "flashcupy.merge_attention"
    check(fn, outs, lses, lambda x: isinstance(x, cupy.ndarray), "cupy.ndarray", _api._fmt,
          (np.dtype(np.float32), np.dtype(np.float64)))
    dev = outs[0].device.id
    for name, xs in (("outs", outs), ("lses", lses)):
        for i, x in enumerate(xs):
            if x.device.id != dev:
                raise ValueError(f"{fn}: {name}[{i}] is on device {x.device.id}, outs[0] on "
                                 f"device {dev}")
    wide = np.float64 if (outs[0].dtype == np.float64
                          or any(x.dtype == np.float64 for x in lses)) else np.float32
    with cupy.cuda.Device(dev):
        out, lse = merge(cupy, outs, lses, lambda x: x.astype(wide, copy=False),
                         lambda x: x.astype(outs[0].dtype, copy=False))
    return (out, lse) if return_lse else out
