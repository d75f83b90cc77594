"""Variable-length (packed) batches and KV caches on the attention kernels.

The kernels see a sequence as one more batch axis, the first (their b0,
cuda_src/seq.cuh): every packed operand is viewed along it at stride 0, and
``SeqArgs`` gives each CTA its sequence's first rows and lengths.  So the
dense planning of ``flashcupy.api`` (batch layouts, GQA groups, gradient sums,
variants) runs unchanged on those views; Problem.seqlen_q / seqlen_k are the
longest sequence's (the grid), ``Problem.packed`` the packed lengths.

KV caches: q is dense ``(B, ..., Sq, D)``; each sequence attends to its first
``cache_seqlens[b] (+ S_new)`` keys of its cache row.  A contiguous cache
with ``cache_batch_idx`` and a paged pool both read K / V through a block
table (the contiguous one as pages of S_max rows, one per sequence).

Checks that need device data (cumulative lengths, cache lengths, block
tables) are reduced on the device and copied to the host once per call; they
are skipped while a CUDA graph is being captured (no copy is legal then), so a
captured call must be given valid data.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np

from . import _plan
from . import api as _api

try:  # (flashcupy imports without CuPy; these functions need it)
    import cupy
except ImportError:  # pragma: no cover
    cupy = None

PAGE_MULTIPLE = 16  # a page holds whole 16-row tiles of the kernels


def _sv(x, n):
    """``x`` seen along a new leading sequence axis of size n, at stride 0."""
    return cupy.broadcast_to(x[None], (n,) + tuple(x.shape))


def _capturing() -> bool:
    try:
        return bool(cupy.cuda.get_current_stream().is_capturing())
    except Exception:  # pragma: no cover (older CuPy)
        return False


def _describe(x) -> str:
    return _api._fmt(x)


def _int32_vector(fn, name, x, length, what, dev):
    """A device int32 1-D array of ``length`` entries (None: any length >= 1),
    contiguous (a copy otherwise)."""
    if not isinstance(x, cupy.ndarray):
        raise TypeError(f"{fn}: {name} must be a cupy int32 array of {what}, got "
                        f"{type(x).__name__}")
    if x.dtype != np.int32:
        raise TypeError(f"{fn}: {name} has {_describe(x)}; expected int32 ({what})")
    if x.ndim != 1 or (length is not None and x.shape[0] != length) or x.shape[0] < 1:
        want = f"shape ({length},)" if length is not None else "a 1-D array"
        raise ValueError(f"{fn}: {name} has {_describe(x)}; expected {want} ({what})")
    if x.device.id != dev:
        raise ValueError(f"{fn}: {name} is on device {x.device.id}, the inputs on device {dev}")
    return x if x.flags.c_contiguous else cupy.ascontiguousarray(x)


def _fetch(parts):
    """One device-to-host copy of small int64 device scalars (or None while a
    graph is captured)."""
    if _capturing() or not parts:
        return None
    return [int(v) for v in cupy.stack([cupy.asarray(p, dtype=np.int64).reshape(())
                                        for p in parts]).get()]


def _cu_summary(cu):
    """Device scalars: first entry, smallest step, last entry, largest step."""
    if cu.shape[0] == 1:
        z = cupy.zeros((), np.int64)
        return [cu[0], z, cu[-1], z]
    d = cu[1:] - cu[:-1]
    return [cu[0], d.min(), cu[-1], d.max()]


@dataclasses.dataclass
class _Packed:
    nseq: int
    max_q: int
    max_k: int
    last_q: int
    last_k: int
    cu_q: object
    cu_k: object


def _check_max(fn, name, given, actual):
    if given is None:
        return actual
    if isinstance(given, bool) or not isinstance(given, (int, np.integer)) or given < 0:
        raise TypeError(f"{fn}: {name} must be a non-negative int or None, got {given!r}")
    if actual is not None and given < actual:
        raise ValueError(f"{fn}: {name}={given} is smaller than the longest sequence ({actual})")
    return int(given)


def _packed(fn, q, k, cu_q, cu_k, max_q, max_k):
    """Validates the cumulative lengths (one device reduction, one copy)."""
    dev = q.device.id
    what = "B + 1 cumulative sequence lengths"
    cu_q = _int32_vector(fn, "cu_seqlens_q", cu_q, None, what, dev)
    cu_k = _int32_vector(fn, "cu_seqlens_k", cu_k, cu_q.shape[0], what, dev)
    vals = _fetch(_cu_summary(cu_q) + _cu_summary(cu_k))
    if vals is None:  # (a graph is captured: the caller vouches for the data)
        if max_q is None or max_k is None:
            raise ValueError(f"{fn}: inside CUDA-graph capture pass max_seqlen_q and "
                             f"max_seqlen_k (the lengths cannot be read then)")
        return _Packed(cu_q.shape[0] - 1, int(max_q), int(max_k), q.shape[-2], k.shape[-2],
                       cu_q, cu_k)
    for name, (first, lo, last, hi), n, arr in (
            ("cu_seqlens_q", vals[:4], q.shape[-2], "q"), ("cu_seqlens_k", vals[4:], k.shape[-2],
                                                           "k")):
        if first != 0:
            raise ValueError(f"{fn}: {name} must start at 0, got {first}")
        if lo < 0:
            raise ValueError(f"{fn}: {name} must be non-decreasing (a step of {lo} found)")
        if last > n:
            raise ValueError(f"{fn}: the last entry of {name} ({last}) exceeds the packed length "
                             f"{n} of {arr} (axis -2)")
    mq = _check_max(fn, "max_seqlen_q", max_q, vals[3])
    mk = _check_max(fn, "max_seqlen_k", max_k, vals[7])
    return _Packed(cu_q.shape[0] - 1, mq, mk, vals[2], vals[6], cu_q, cu_k)


def _seq_problem(prob, max_q, max_k, packed, words, paged=False, scalars=None):
    feats = dataclasses.replace(prob.features, seq=True, paged=paged)
    return dataclasses.replace(prob, seqlen_q=max_q, seqlen_k=max_k, features=feats,
                               packed=packed, seq_words=tuple(words),
                               seq_scalars=tuple(sorted((scalars or {}).items())))


def _heads(fn, q, k, v):
    try:
        _api.broadcast_shapes(q.shape, k.shape, v.shape)
    except ValueError as e:
        raise ValueError(f"{fn}: {e}") from None
    return tuple(np.broadcast_shapes(q.shape[:-2], k.shape[:-2], v.shape[:-2]))


def _rank(x, nheads):
    """``x`` with leading axes of size 1 up to ``nheads`` head axes (a view)."""
    extra = nheads + 2 - x.ndim
    return x.reshape((1,) * extra + tuple(x.shape)) if extra > 0 else x


def _variant_env(env, nseq, alibi_slopes, sink):
    if alibi_slopes is not None:
        env["alibi"] = alibi_slopes
    if sink is not None:
        env["sink"] = sink


# ----------------------------------------------------------------------------
# packed batches
# ----------------------------------------------------------------------------

def attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, *, max_seqlen_q=None,
                     max_seqlen_k=None, causal=False, scale=None, return_lse=False, window=None,
                     softcap=None, alibi_slopes=None, sink=None, bias=None, mask=None,
                     dropout_p=0.0, seed=None, offset=0):
    """Attention over a packed batch of variable-length sequences.

    Sequence ``b`` owns the rows ``cu_seqlens_q[b]:cu_seqlens_q[b + 1]`` of q's
    axis -2 and ``cu_seqlens_k[b]:cu_seqlens_k[b + 1]`` of k and v; it is the
    dense problem of ``flashcupy.attention`` on those rows, with every keyword
    per sequence (bottom-right ``causal`` / ``window`` alignment on each
    sequence's own lengths).  flash-attn's ``flash_attn_varlen_func``.

    Parameters
    ----------
    q : cupy.ndarray, shape (..., total_q, D)
    k : cupy.ndarray, shape (..., total_k, D)
    v : cupy.ndarray, shape (..., total_k, Dv)
        The leading (head) axes broadcast (MQA / GQA as in ``attention``);
        flash-attn's ``(total, H, D)`` layout is ``x.swapaxes(0, 1)``.
    cu_seqlens_q, cu_seqlens_k : cupy.ndarray, int32, shape (B + 1,)
        Cumulative lengths: from 0, non-decreasing, the last entry at most the
        packed length (rows past it get ``out = 0``, ``lse = -inf``).  Lengths
        of 0 are allowed.  Checked on the device (one copy of the summary).
    max_seqlen_q, max_seqlen_k : int, optional
        Upper bounds of the lengths (required inside CUDA-graph capture).
    causal, scale, return_lse, window, softcap, dropout_p, seed, offset
        As in ``attention``.  Dropout draws the bits of batch element
        ``b * prod(heads) + flat(h)`` at local rows and columns, so a batch of
        equal lengths draws exactly those of the dense ``(B, *heads, S, D)``.
    alibi_slopes, sink : cupy.ndarray, float32, optional
        Broadcastable to the head axes (shared by the sequences).
    bias, mask : cupy.ndarray, optional
        Packed: broadcastable to ``heads + (total_q, total_k)``; sequence b
        reads its diagonal block (rows of b, columns of b).

    Returns
    -------
    out : cupy.ndarray, shape heads + (total_q, Dv), q's dtype
    lse : cupy.ndarray, shape heads + (total_q,) (with ``return_lse``)
    """
    fn = "flashcupy.attention_varlen"
    out, lse = _varlen_forward(fn, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                               max_seqlen_k, causal, scale, window, softcap, alibi_slopes, sink,
                               bias, mask, dropout_p, seed, offset)
    return (out, lse) if return_lse else out


def _prepare_packed(fn, q, k, v, cu_q, cu_k, max_q, max_k, causal, scale, window, softcap,
                    alibi_slopes, sink, bias, mask, bias_grad, dropout_p):
    for name, x in (("q", q), ("k", k), ("v", v)):
        _api._check_array(fn, name, x)
    if k.shape[-2] != v.shape[-2]:
        raise ValueError(f"{fn}: k {tuple(k.shape)} and v {tuple(v.shape)} must have the same "
                         f"packed length (axis -2)")
    heads = _heads(fn, q, k, v)
    pk = _packed(fn, q, k, cu_q, cu_k, max_q, max_k)
    n = pk.nseq
    # (every operand at the heads' rank first: the sequence axis goes in front of
    # each, and must line up across them)
    qv, kv, vv = (_sv(_api._last_axis_contiguous(_rank(x, len(heads))), n) for x in (q, k, v))
    prob = _api._prepare(fn, qv, kv, vv, causal, scale, window, softcap, alibi_slopes, sink,
                         bias, mask, bias_grad, dropout_p)
    prob = _seq_problem(prob, pk.max_q, pk.max_k, (q.shape[-2], k.shape[-2]),
                        ("cu_q", "cu_k", "cu_qa"))
    return pk, heads, (qv, kv, vv), prob


def _varlen_forward(fn, q, k, v, cu_q, cu_k, max_q, max_k, causal, scale, window, softcap,
                    alibi_slopes, sink, bias, mask, dropout_p, seed, offset):
    bias = _api._convert_bias(q, bias)
    pk, heads, (qv, kv, vv), prob = _prepare_packed(
        fn, q, k, v, cu_q, cu_k, max_q, max_k, causal, scale, window, softcap, alibi_slopes,
        sink, bias, mask, False, dropout_p)
    seed, offset = _api._check_seed(fn, prob.features.dropout, seed, offset)
    n, tq = pk.nseq, q.shape[-2]
    with cupy.cuda.Device(prob.device_id):
        out = cupy.empty(heads + (tq, prob.head_dim_v), prob.dtype)
        lse = cupy.empty(heads + (tq,), prob.acc_dtype)
        if _capturing():   # (the tail rows are unknown: every row is written first)
            out.fill(0)
            lse.fill(-np.inf)
        if n > 0 and pk.max_q > 0:
            env = {"q": qv, "k": kv, "v": vv, "o": _sv(out, n), "lse": _sv(lse, n),
                   "cu_q": pk.cu_q, "cu_k": pk.cu_k, "cu_qa": pk.cu_q}
            _variant_env(env, n, alibi_slopes, sink)
            _api._add_pairs(env, bias, mask)
            _api.dropout_env(env, prob.features.dropout, seed, offset)
            plan = _plan.Plan(prob)
            _api._plan_forward(plan, env)
            plan.run(env)
        # rows past the last sequence (and everything of an empty batch)
        out[..., pk.last_q:, :] = 0
        lse[..., pk.last_q:] = -np.inf
    return out, lse


def attention_varlen_backward(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, *,
                              max_seqlen_q=None, max_seqlen_k=None, causal=False, scale=None,
                              deterministic=False, window=None, softcap=None, alibi_slopes=None,
                              sink=None, bias=None, mask=None, bias_grad=False, dropout_p=0.0,
                              seed=None, offset=0):
    """Gradients of :func:`attention_varlen` (FlashAttention-2's backward per
    sequence).  Arguments as there, plus ``dout``, ``out``, ``lse`` (the
    forward's, packed) and ``deterministic`` / ``bias_grad`` as in
    ``attention_backward``.

    Returns
    -------
    dq, dk, dv : cupy.ndarray, the shapes and dtype of q, k, v (rows past the
        last sequence 0; gradients of broadcast heads summed)
    dsink : float32, the sink's shape (only with a sink)
    dbias : the bias's shape and dtype (only with ``bias_grad``), 0 outside
        the sequences' blocks.  With ``deterministic=True`` the bias must not
        broadcast over heads, rows or keys (each element then has one writer).
    """
    fn = "flashcupy.attention_varlen_backward"
    for name, x in (("dout", dout), ("out", out), ("lse", lse)):
        _api._check_array(fn, name, x)
    if not isinstance(deterministic, (bool, np.bool_)):
        raise TypeError(f"{fn}: deterministic must be a bool, got {deterministic!r}")
    bias_in = bias
    bias = _api._convert_bias(q, bias)
    pk, heads, (qv, kv, vv), prob = _prepare_packed(
        fn, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale,
        window, softcap, alibi_slopes, sink, bias, mask, bias_grad, dropout_p)
    n, tq = pk.nseq, q.shape[-2]
    dev = prob.device_id
    _api._check_given(fn, "dout", dout, heads + (tq, prob.head_dim_v), prob.dtype, dev)
    _api._check_given(fn, "out", out, heads + (tq, prob.head_dim_v), prob.dtype, dev)
    _api._check_given(fn, "lse", lse, heads + (tq,), prob.acc_dtype, dev)
    if bias_grad and deterministic:
        full = tuple(bias.shape) == heads + (tq, k.shape[-2])
        if not full:
            raise NotImplementedError(
                f"{fn}: deterministic=True with bias_grad=True needs a packed bias of the full "
                f"shape {heads + (tq, k.shape[-2])} (got {tuple(bias.shape)}): the gradient of "
                f"a broadcast bias is summed with atomics")
    seed, offset = _api._check_seed(fn, prob.features.dropout, seed, offset)
    with cupy.cuda.Device(dev):
        dq, dk, dv = (cupy.empty(_rank(x, len(heads)).shape, prob.dtype) for x in (q, k, v))
        grads = [g.reshape(x.shape) for g, x in zip((dq, dk, dv), (q, k, v))]
        dsink = dbias = None
        if sink is not None:
            dsink = cupy.zeros(sink.shape, np.float32)
            grads.append(dsink)
        if bias_grad:
            dbias = cupy.zeros(bias_in.shape, bias_in.dtype)
            grads.append(dbias)
        if _capturing():   # (the tail rows are unknown: every row is written first)
            for g in (dq, dk, dv):
                g.fill(0)
        if n > 0 and pk.max_q > 0 and pk.max_k > 0:
            douts = _sv(_api._last_axis_contiguous(dout), n)
            outs = _sv(_api._last_axis_contiguous(out), n)
            cu_qa = pk.cu_q + cupy.arange(n + 1, dtype=np.int32) * np.int32(_api._SEQ_QA_PAD)
            env = {"dout": douts, "q": qv, "k": kv, "v": vv, "o": outs, "lse": _sv(lse, n),
                   "dq_out": _sv(dq, n), "dk_out": _sv(dk, n), "dv_out": _sv(dv, n),
                   "cu_q": pk.cu_q, "cu_k": pk.cu_k, "cu_qa": cu_qa,
                   "lse_packed": lse, "seq_rows_q": pk.last_q}
            _variant_env(env, n, alibi_slopes, sink)
            if sink is not None:
                env["dsink_out"] = dsink
            _api._add_pairs(env, bias, mask)
            _api.dropout_env(env, prob.features.dropout, seed, offset)
            if bias_grad:
                env["dbias_out"] = dbias
            plan = _plan.Plan(prob)
            _api._plan_backward(plan, env, deterministic)
            plan.run(env)
            dq[..., pk.last_q:, :] = 0
            dk[..., pk.last_k:, :] = 0
            dv[..., pk.last_k:, :] = 0
        else:
            for g in (dq, dk, dv):
                g.fill(0)
    return tuple(grads)


# ----------------------------------------------------------------------------
# KV caches
# ----------------------------------------------------------------------------

def attention_with_kvcache(q, k_cache, v_cache, cache_seqlens, *, k_new=None, v_new=None,
                           cache_batch_idx=None, block_table=None, causal=False, scale=None,
                           window=None, softcap=None, alibi_slopes=None, sink=None,
                           return_lse=False):
    """Attention against a KV cache (contiguous or paged), forward only.

    WRITES ``k_new`` / ``v_new`` INTO ``k_cache`` / ``v_cache`` IN PLACE (at
    positions ``cache_seqlens[b] ..``) before attending, as flash-attn's
    ``flash_attn_with_kvcache`` does; ``cache_seqlens`` itself is not changed.
    Every check runs before the first write.

    Parameters
    ----------
    q : cupy.ndarray, shape (B, ..., Sq, D)
        The batch axis first, then head axes that broadcast against the
        cache's (GQA); the queries are the last Sq positions of each sequence
        (bottom-right ``causal`` / ``window``).
    k_cache, v_cache : cupy.ndarray
        Contiguous ``(B_cache, ..., S_max, D)`` / ``(..., S_max, Dv)``, or with
        ``block_table`` a pool of pages ``(num_pages, ..., page_size, D)``
        (``page_size`` a multiple of 16).  flash-attn's and vLLM's
        ``(num_pages, page_size, H, D)`` is ``x.swapaxes(1, 2)`` (a view).
    cache_seqlens : int or cupy.ndarray, int32, shape (B,)
        Keys already in the cache per sequence.
    k_new, v_new : cupy.ndarray, shapes (B, ..., S_new, D) / (..., S_new, Dv), optional
        Appended (both or neither), cast to the cache's dtype.
    cache_batch_idx : cupy.ndarray, int32, shape (B,), optional
        Contiguous cache: the cache row of each sequence (default b).
    block_table : cupy.ndarray, int32, shape (B, max_pages), optional
        Paged cache: sequence b's pages in order.
    causal, scale, window, softcap, alibi_slopes, sink, return_lse
        As in ``attention``; the slopes and sinks broadcast to (B,) + heads.

    Returns
    -------
    out : cupy.ndarray, shape (B,) + heads + (Sq, Dv)
    lse : (with ``return_lse``) shape (B,) + heads + (Sq,)

    Device checks (lengths within the cache, table entries within the pool,
    distinct cache rows and slots for the appends) need one copy to the host;
    inside CUDA-graph capture they are skipped and the data must be valid.
    """
    fn = "flashcupy.attention_with_kvcache"
    for name, x in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        _api._check_array(fn, name, x)
    if q.ndim < 3:
        raise ValueError(f"{fn}: q has {_describe(q)}; expected (B, ..., Sq, D)")
    nb, dev = q.shape[0], q.device.id
    for name, x in (("k_cache", k_cache), ("v_cache", v_cache)):
        if x.ndim != q.ndim:
            raise ValueError(f"{fn}: {name} has {_describe(x)}; expected {q.ndim} axes like q "
                             f"(a batch or page axis, the head axes, rows, D)")
    if k_cache.shape[:-1] != v_cache.shape[:-1]:
        raise ValueError(f"{fn}: k_cache {tuple(k_cache.shape)} and v_cache "
                         f"{tuple(v_cache.shape)} must agree on all axes but the last")
    if k_cache.dtype != q.dtype or v_cache.dtype != q.dtype:
        raise TypeError(f"{fn}: k_cache ({k_cache.dtype}) and v_cache ({v_cache.dtype}) must "
                        f"have q's dtype ({q.dtype})")
    for name, x in (("k_cache", k_cache), ("v_cache", v_cache)):
        if x.shape[-1] > 1 and x.strides[-1] != x.itemsize:
            raise ValueError(f"{fn}: {name} has strides {x.strides} (bytes); the last axis (D) "
                             f"must be contiguous (the appends write into the cache itself, so "
                             f"it cannot be copied)")
    rows = k_cache.shape[-2]
    paged = block_table is not None
    if paged and cache_batch_idx is not None:
        raise ValueError(f"{fn}: cache_batch_idx applies to a contiguous cache only; with "
                         f"block_table the table picks each sequence's pages")
    if paged and (rows % PAGE_MULTIPLE or rows == 0):
        raise ValueError(f"{fn}: the page size (k_cache.shape[-2] = {rows}) must be a positive "
                         f"multiple of {PAGE_MULTIPLE}")
    # cache lengths
    if isinstance(cache_seqlens, (int, np.integer)) and not isinstance(cache_seqlens, bool):
        lens = cupy.full((nb,), int(cache_seqlens), np.int32)
    else:
        lens = _int32_vector(fn, "cache_seqlens", cache_seqlens, nb,
                             "the keys already cached per sequence", dev)
    # the new keys
    if (k_new is None) != (v_new is None):
        raise ValueError(f"{fn}: pass both k_new and v_new, or neither")
    s_new = 0
    if k_new is not None:
        for name, x, cache in (("k_new", k_new, k_cache), ("v_new", v_new, v_cache)):
            _api._check_array(fn, name, x)
            want = (nb,) + tuple(cache.shape[1:-2])
            if x.ndim != cache.ndim or tuple(x.shape[:-2]) != want or x.shape[-1] != cache.shape[-1]:
                raise ValueError(f"{fn}: {name} has {_describe(x)}; expected "
                                 f"{want + ('S_new', cache.shape[-1])}")
            if x.device.id != dev:
                raise ValueError(f"{fn}: {name} is on device {x.device.id}, q on device {dev}")
        if k_new.shape[-2] != v_new.shape[-2]:
            raise ValueError(f"{fn}: k_new {tuple(k_new.shape)} and v_new "
                             f"{tuple(v_new.shape)} must append the same number of rows")
        s_new = k_new.shape[-2]
    # where sequence b's keys live
    if paged:
        table = _int32_2d(fn, "block_table", block_table, nb, dev)
        capacity = table.shape[1] * rows
        n_slots = k_cache.shape[0]
    else:
        n_slots = k_cache.shape[0]
        capacity = rows
        if cache_batch_idx is not None:
            idx = _int32_vector(fn, "cache_batch_idx", cache_batch_idx, nb,
                                "the cache row of each sequence", dev)
            table = idx.reshape(nb, 1)
        else:
            if n_slots < nb:
                raise ValueError(f"{fn}: k_cache has {n_slots} rows (axis 0) for a batch of "
                                 f"{nb}; pass cache_batch_idx to map sequences to rows")
            table = None
    # attention over the cache: views with the sequence axis first, checked on the
    # host before any device check or write
    heads = _heads(fn, q, k_cache[:1], v_cache[:1])[1:]
    if table is None:
        kv, vv = k_cache[:nb], v_cache[:nb]
    else:
        kv, vv = _sv(k_cache[0], nb), _sv(v_cache[0], nb)
    prob = _api._prepare(fn, q, kv, vv, causal, scale, window, softcap, alibi_slopes, sink)
    words = ["len_k"]
    scalars = {}
    if table is not None:
        # (the kernels form offsets inside the pool as unsigned 32-bit products:
        # cuda_src/rows.cuh KvPages)
        for name, x in (("k_cache", k_cache), ("v_cache", v_cache)):
            if x.strides[0] < 0 or x.strides[-2] < 0:
                raise ValueError(f"{fn}: {name} has strides {x.strides} (bytes); the page (or "
                                 f"cache row) axis and the row axis must not run backwards "
                                 f"with block_table / cache_batch_idx (pass a forward view)")
            if x.strides[0] // x.itemsize >= 2 ** 32 or rows * (x.strides[-2] // x.itemsize) >= 2 ** 32:
                raise ValueError(f"{fn}: {name} has strides {x.strides} (bytes): one page (or "
                                 f"cache row) spans 2^32 elements or more, which the paged "
                                 f"kernels do not address")
        words.append("table")
        scalars = {"seq.table_stride": table.strides[0] // 4,
                   "seq.k_page_stride": k_cache.strides[0] // k_cache.itemsize,
                   "seq.v_page_stride": v_cache.strides[0] // v_cache.itemsize,
                   "seq.page_size": rows,
                   # t // rows as a multiply-high on the device (cuda_src/rows.cuh);
                   # a cache of 0 or 1 rows has only page 0 (and 2^64 + 1 would not fit)
                   "seq.page_magic": (1 << 64) // rows + 1 if rows >= 2 else 0}
    prob = _seq_problem(prob, q.shape[-2], capacity, (), words, paged=table is not None,
                        scalars=scalars)
    total = lens + np.int32(s_new)
    # (inside a graph capture no check runs: nothing could be read back)
    capturing = _capturing()
    checks = [] if capturing else [lens.min() if nb else cupy.zeros((), np.int32),
                                   total.max() if nb else cupy.zeros((), np.int32)]
    if table is not None and table.size and not capturing:
        checks += [table.min(), table.max()]
    dup = None
    if s_new and nb:
        slot = _append_slots(lens, s_new, table, rows, paged)
    if s_new and nb and not capturing:
        flat = slot.reshape(-1)
        srt = cupy.sort(flat)
        dup = (srt[1:] == srt[:-1]).any() if flat.size > 1 else cupy.zeros((), np.bool_)
        checks.append(dup)
    vals = _fetch(checks)
    if vals is not None:
        if nb and vals[0] < 0:
            raise ValueError(f"{fn}: cache_seqlens must be >= 0 (found {vals[0]})")
        if nb and vals[1] > capacity:
            what = (f"{table.shape[1]} pages of {rows}" if paged else f"S_max = {rows}")
            if s_new:
                raise ValueError(f"{fn}: cache_seqlens + k_new's {s_new} rows reach {vals[1]} "
                                 f"keys, beyond the cache ({what}): k_new is longer than the "
                                 f"room left")
            raise ValueError(f"{fn}: cache_seqlens reach {vals[1]} keys, beyond the cache "
                             f"({what})")
        if table is not None and table.size and (vals[2] < 0 or vals[3] >= n_slots):
            name = "block_table" if paged else "cache_batch_idx"
            raise ValueError(f"{fn}: {name} holds entries in [{vals[2]}, {vals[3]}], outside "
                             f"[0, {n_slots}) (k_cache.shape[0])")
        if dup is not None and vals[-1]:
            raise ValueError(f"{fn}: two sequences would append into the same cache slot "
                             f"(cache_batch_idx / block_table rows overlap)")
    # the appends, in place
    if s_new and nb:
        _append(k_cache, k_new, slot, rows, paged, table)
        _append(v_cache, v_new, slot, rows, paged, table)
    sq = q.shape[-2]
    with cupy.cuda.Device(dev):
        out = cupy.empty((nb,) + heads + (sq, prob.head_dim_v), prob.dtype)
        lse = cupy.empty((nb,) + heads + (sq,), prob.acc_dtype)
        if nb and sq and math.prod(heads):
            qc = _api._last_axis_contiguous(q)
            env = {"q": qc, "k": kv, "v": vv, "o": out, "lse": lse, "len_k": total}
            if table is not None:
                env["table"] = table
            _variant_env(env, nb, alibi_slopes, sink)
            # (a GQA group folds into the rows where it applies: _pack.py)
            plan = _api.plan_forward(prob, env)
            plan.run(env)
    return (out, lse) if return_lse else out


def _int32_2d(fn, name, x, nb, dev):
    if not isinstance(x, cupy.ndarray):
        raise TypeError(f"{fn}: {name} must be a cupy int32 array of shape (B, max_pages), got "
                        f"{type(x).__name__}")
    if x.dtype != np.int32:
        raise TypeError(f"{fn}: {name} has {_describe(x)}; expected int32 (B, max_pages)")
    if x.ndim != 2 or x.shape[0] != nb or x.shape[1] < 1:
        raise ValueError(f"{fn}: {name} has {_describe(x)}; expected shape ({nb}, max_pages)")
    if x.device.id != dev:
        raise ValueError(f"{fn}: {name} is on device {x.device.id}, q on device {dev}")
    return x if x.flags.c_contiguous else cupy.ascontiguousarray(x)


def _append_slots(lens, s_new, table, rows, paged):
    """(B, S_new) flat cache slots (cache row or page x rows + row) the new keys
    go to."""
    pos = lens[:, None].astype(np.int64) + cupy.arange(s_new, dtype=np.int64)[None, :]
    nb = lens.shape[0]
    if paged:
        pg = cupy.take_along_axis(table.astype(np.int64),
                                  cupy.minimum(pos // rows, table.shape[1] - 1), axis=1)
        return pg * rows + pos % rows
    row = (cupy.arange(nb, dtype=np.int64) if table is None else table[:, 0].astype(np.int64))
    return row[:, None] * rows + pos


def _append(cache, new, slot, rows, paged, table):
    """cache[slot // rows, ..., slot % rows, :] = new (moved to (B, S_new, ...))."""
    page = slot // rows
    r = slot % rows
    val = cupy.moveaxis(new, -2, 1).astype(cache.dtype)  # (B, S_new, heads..., D)
    idx = (page,) + (slice(None),) * (cache.ndim - 3) + (r, slice(None))
    cache[idx] = val
