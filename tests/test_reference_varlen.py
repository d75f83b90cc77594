"""CPU tests of the packed-batch (varlen) and KV-cache references in
flashcupy.reference (``flashcupy._reference_varlen``).  No GPU needed.

The statements that meet here:

* a packed batch of equal lengths is the dense problem ``(B, H, S, D)``,
  forward and backward, every variant and dropout included (the same bits:
  ``bh = b * H + h``);
* a packed batch of any lengths is, block by block, the dense reference on
  each sequence's slices; rows past ``cu_seqlens[-1]`` are 0 / -inf with zero
  gradients; dropout's bits are those of explicit ``_philox.keep_mask`` calls;
* the backward is the gradient of the forward (central differences);
* a KV cache is the dense reference on the keys it holds, contiguous or
  paged, after ``k_new`` / ``v_new`` are written in place where they belong.
"""
from __future__ import annotations

import numpy as np
import pytest

from flashcupy import _philox as ph
from flashcupy import reference as ref

pytestmark = pytest.mark.filterwarnings("error")  # no overflow/invalid warnings anywhere


def _rng(seed):
    return np.random.default_rng(seed)


def _close(a, b, tol=1e-12):
    a, b = np.asarray(a), np.asarray(b)
    assert a.shape == b.shape, (a.shape, b.shape)
    assert np.array_equal(np.isneginf(a), np.isneginf(b))
    assert not np.isnan(a).any() and not np.isnan(b).any()
    fin = np.isfinite(b)
    np.testing.assert_allclose(a[fin], b[fin], rtol=tol, atol=tol)


def _cu(lengths):
    return np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)


def _pack(dense):
    """(B, H, S, X) -> (H, B * S, X): the packed layout of equal lengths."""
    b, h, s, x = dense.shape
    return np.ascontiguousarray(dense.transpose(1, 0, 2, 3).reshape(h, b * s, x))


def _unpack(packed, batch):
    h, total, x = packed.shape
    return packed.reshape(h, batch, total // batch, x).transpose(1, 0, 2, 3)


def _block_diag(dense_pairs, fill):
    """(B, H, Sq, Sk) -> packed (H, B * Sq, B * Sk), ``fill`` off the blocks."""
    b, h, sq, sk = dense_pairs.shape
    out = np.full((h, b * sq, b * sk), fill, dtype=dense_pairs.dtype)
    for i in range(b):
        out[:, i * sq:(i + 1) * sq, i * sk:(i + 1) * sk] = dense_pairs[i]
    return out


VARIANTS = {
    "plain": {},
    "causal": dict(causal=True),
    "window": dict(window=(2, 1)),
    "softcap": dict(softcap=1.5),
    "alibi": dict(alibi=True),
    "sink": dict(sink=True),
    "bias": dict(bias=True),
    "mask": dict(mask=True),
    "dropout": dict(dropout_p=0.3),
    "all": dict(causal=True, window=(3, None), softcap=2.0, alibi=True, sink=True, bias=True,
                mask=True, dropout_p=0.25),
}


def _keywords(rng, spec, batch, heads, sq, sk, seed):
    """(dense keywords, packed keywords) for one VARIANTS entry, fresh values."""
    dense, packed = {}, {}
    for name in ("causal", "window", "softcap"):
        if name in spec:
            dense[name] = packed[name] = spec[name]
    if spec.get("alibi"):
        dense["alibi_slopes"] = packed["alibi_slopes"] = rng.uniform(0.1, 0.6, heads)
    if spec.get("sink"):
        dense["sink"] = packed["sink"] = rng.standard_normal(heads)
    if spec.get("bias"):
        b = rng.standard_normal((batch, heads, sq, sk))
        dense["bias"] = b
        packed["bias"] = _block_diag(b, np.nan)   # NaN off the blocks: never read
    if spec.get("mask"):
        m = rng.random((batch, heads, sq, sk)) < 0.8
        dense["mask"] = m
        packed["mask"] = _block_diag(m, False)
    if spec.get("dropout_p"):
        dense.update(dropout_p=spec["dropout_p"], seed=seed, offset=7)
        packed.update(dropout_p=spec["dropout_p"], seed=seed, offset=7)
    return dense, packed


@pytest.mark.parametrize("sq, sk", [(5, 7), (6, 4)], ids=["sq<sk", "sq>sk"])
@pytest.mark.parametrize("variant", list(VARIANTS), ids=list(VARIANTS))
def test_equal_lengths_are_the_dense_problem(seed, variant, sq, sk):
    rng = _rng(seed)
    batch, heads, d, dv = 3, 2, 8, 6
    q = rng.standard_normal((batch, heads, sq, d))
    k = rng.standard_normal((batch, heads, sk, d))
    v = rng.standard_normal((batch, heads, sk, dv))
    dout = rng.standard_normal((batch, heads, sq, dv))
    dkw, pkw = _keywords(rng, VARIANTS[variant], batch, heads, sq, sk, seed)
    cu_q, cu_k = _cu([sq] * batch), _cu([sk] * batch)

    out_d, lse_d = ref.attention_naive(q, k, v, **dkw)
    out_p, lse_p = ref.attention_varlen_naive(_pack(q), _pack(k), _pack(v), cu_q, cu_k, **pkw)
    _close(_unpack(out_p, batch), out_d)
    _close(lse_p.reshape(heads, batch, sq).transpose(1, 0, 2), lse_d)

    bias_grad = "bias" in dkw
    g_d = ref.attention_backward_naive(dout, q, k, v, out_d, lse_d, **dkw, bias_grad=bias_grad)
    g_p = ref.attention_varlen_backward_naive(_pack(dout), _pack(q), _pack(k), _pack(v), out_p,
                                              lse_p, cu_q, cu_k, **pkw, bias_grad=bias_grad)
    assert len(g_p) == len(g_d)
    for got, want in zip(g_p[:3], g_d[:3]):
        _close(_unpack(got, batch), want)
    rest_p, rest_d = list(g_p[3:]), list(g_d[3:])
    if "sink" in dkw:
        _close(rest_p.pop(0), rest_d.pop(0))   # (H,): summed over the batch in both
    if bias_grad:
        dbias = rest_p.pop(0)
        assert dbias.shape == pkw["bias"].shape
        _close(dbias, _block_diag(rest_d.pop(0), 0.0))   # 0 off the blocks


def _random_problem(rng, lens_q, lens_k, heads=(2,), d=8, dv=5, pad_q=0, pad_k=0):
    tq, tk = sum(lens_q) + pad_q, sum(lens_k) + pad_k
    q = rng.standard_normal(heads + (tq, d))
    k = rng.standard_normal(heads + (tk, d))
    v = rng.standard_normal(heads + (tk, dv))
    return q, k, v, _cu(lens_q), _cu(lens_k)


LENGTHS = {
    "mixed": ([3, 0, 5, 1, 4], [6, 2, 0, 1, 5]),
    "one": ([7], [9]),
    "empty_k": ([2, 3], [0, 0]),
    "none": ([], []),
}


@pytest.mark.parametrize("lengths", list(LENGTHS), ids=list(LENGTHS))
@pytest.mark.parametrize("variant", ["plain", "causal", "window", "all_but_dropout"])
def test_each_sequence_is_the_dense_reference_on_its_slices(seed, lengths, variant):
    rng = _rng(seed)
    lens_q, lens_k = LENGTHS[lengths]
    heads = (2,)
    q, k, v, cu_q, cu_k = _random_problem(rng, lens_q, lens_k, heads, pad_q=3, pad_k=2)
    tq, tk = q.shape[-2], k.shape[-2]
    kw = {}
    if variant == "causal":
        kw = dict(causal=True)
    elif variant == "window":
        kw = dict(window=(1, 0))
    elif variant == "all_but_dropout":
        kw = dict(causal=True, softcap=3.0, alibi_slopes=rng.uniform(0.1, 0.5, heads),
                  sink=rng.standard_normal(heads), bias=rng.standard_normal(heads + (tq, tk)),
                  mask=rng.random((tq, tk)) < 0.85)
    out, lse = ref.attention_varlen_naive(q, k, v, cu_q, cu_k, **kw)
    dout = rng.standard_normal(out.shape)
    bias_grad = "bias" in kw
    grads = ref.attention_varlen_backward_naive(dout, q, k, v, out, lse, cu_q, cu_k, **kw,
                                                bias_grad=bias_grad)
    dq, dk, dv = grads[:3]
    dsink = np.zeros(heads)
    seen_bias = np.zeros((tq, tk), dtype=bool)
    for b in range(len(lens_q)):
        rq, rk = slice(cu_q[b], cu_q[b + 1]), slice(cu_k[b], cu_k[b + 1])
        skw = dict(kw)
        for name in ("bias", "mask"):
            if name in skw:
                skw[name] = kw[name][..., rq, rk]
        o, l = ref.attention_naive(q[..., rq, :], k[..., rk, :], v[..., rk, :], **skw)
        _close(out[..., rq, :], o)
        _close(lse[..., rq], l)
        g = ref.attention_backward_naive(dout[..., rq, :], q[..., rq, :], k[..., rk, :],
                                         v[..., rk, :], o, l, **skw, bias_grad=bias_grad)
        _close(dq[..., rq, :], g[0])
        _close(dk[..., rk, :], g[1])
        _close(dv[..., rk, :], g[2])
        if "sink" in kw:
            dsink += g[3]
        if bias_grad:
            _close(grads[4][..., rq, rk], g[4])
            seen_bias[rq, rk] = True
    # rows of no sequence: out 0, lse -inf, no gradient
    end_q, end_k = cu_q[-1], cu_k[-1]
    assert np.all(out[..., end_q:, :] == 0) and np.all(np.isneginf(lse[..., end_q:]))
    assert np.all(dq[..., end_q:, :] == 0)
    assert np.all(dk[..., end_k:, :] == 0) and np.all(dv[..., end_k:, :] == 0)
    if "sink" in kw:
        _close(grads[3], dsink)
    if bias_grad:
        assert np.all(grads[4][:, ~seen_bias] == 0)
    if lengths == "empty_k":   # no key at all: out 0, lse = sink (or -inf)
        assert np.all(out == 0)
        inside = lse[..., :end_q]
        want = np.broadcast_to(kw["sink"][:, None], inside.shape) if "sink" in kw else -np.inf
        assert np.all(inside == want)


def test_single_sequence_is_the_dense_call(seed):
    rng = _rng(seed)
    q, k, v, cu_q, cu_k = _random_problem(rng, [9], [12], heads=(2, 3))
    kw = dict(causal=True, softcap=2.0, dropout_p=0.2, seed=seed)
    out, lse = ref.attention_varlen_naive(q, k, v, cu_q, cu_k, **kw)
    # B = 1: bh = flat(h), the dense numbering
    o, l = ref.attention_naive(q, k, v, **kw)
    _close(out, o)
    _close(lse, l)


@pytest.mark.parametrize("offset", [0, 12345])
def test_dropout_bits_are_the_documented_keep_mask(seed, offset):
    """Sequence b, head h keeps pair (i, j) (local) iff keep_mask(seed, offset,
    (B,) + heads, Sq_b, Sk_b, p, batch_index=(b,) + h) says so."""
    rng = _rng(seed)
    lens_q, lens_k = [4, 0, 3, 6], [5, 3, 0, 40]   # 40: a second 32-key block
    heads = (2, 2)
    q, k, v, cu_q, cu_k = _random_problem(rng, lens_q, lens_k, heads, pad_q=1)
    p = 0.4
    kw = dict(causal=True, sink=rng.standard_normal(heads))
    out, lse = ref.attention_varlen_naive(q, k, v, cu_q, cu_k, **kw, dropout_p=p, seed=seed,
                                          offset=offset)
    out0, lse0 = ref.attention_varlen_naive(q, k, v, cu_q, cu_k, **kw)
    _close(lse, lse0)   # dropout does not change the LSE
    full = (len(lens_q),) + heads
    for b in range(len(lens_q)):
        rq, rk = slice(cu_q[b], cu_q[b + 1]), slice(cu_k[b], cu_k[b + 1])
        sq, sk = lens_q[b], lens_k[b]
        # P itself: the dense reference with V = I
        probs, _ = ref.attention_naive(q[..., rq, :], k[..., rk, :],
                                       np.broadcast_to(np.eye(sk), heads + (sk, sk)), **kw)
        for h in np.ndindex(*heads):
            keep = ph.keep_mask(seed, offset, full, sq, sk, p, batch_index=(b,) + h)
            want = (np.where(keep, probs[h], 0.0) / (1 - p)) @ v[h][rk]
            _close(out[h][rq], want)
    assert np.all(out[..., cu_q[-1]:, :] == 0)


def test_gqa_broadcast_heads(seed):
    rng = _rng(seed)
    lens_q, lens_k = [3, 5, 0, 2], [4, 5, 2, 6]
    hkv, group = 2, 3
    q, k, v, cu_q, cu_k = _random_problem(rng, lens_q, lens_k, heads=(hkv, group))
    k, v = k[:, :1], v[:, :1]                       # (Hkv, 1, total_k, D): GQA
    kw = dict(causal=True, alibi_slopes=rng.uniform(0.1, 0.5, (hkv, group)),
              sink=rng.standard_normal(group), dropout_p=0.2, seed=seed)
    k_rep = np.ascontiguousarray(np.broadcast_to(k, (hkv, group) + k.shape[-2:]))
    v_rep = np.ascontiguousarray(np.broadcast_to(v, (hkv, group) + v.shape[-2:]))
    out, lse = ref.attention_varlen_naive(q, k, v, cu_q, cu_k, **kw)
    out_r, lse_r = ref.attention_varlen_naive(q, k_rep, v_rep, cu_q, cu_k, **kw)
    _close(out, out_r)
    _close(lse, lse_r)
    dout = rng.standard_normal(out.shape)
    g = ref.attention_varlen_backward_naive(dout, q, k, v, out, lse, cu_q, cu_k, **kw)
    g_r = ref.attention_varlen_backward_naive(dout, q, k_rep, v_rep, out, lse, cu_q, cu_k, **kw)
    assert g[1].shape == k.shape and g[2].shape == v.shape and g[3].shape == (group,)
    _close(g[0], g_r[0])
    _close(g[1], g_r[1].sum(axis=1, keepdims=True))
    _close(g[2], g_r[2].sum(axis=1, keepdims=True))
    _close(g[3], g_r[3])


@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
def test_backward_matches_finite_differences(seed, dropout_p):
    rng = _rng(seed)
    lens_q, lens_k = [2, 3, 0], [3, 2, 2]
    heads = (2,)
    q, k, v, cu_q, cu_k = _random_problem(rng, lens_q, lens_k, heads, d=3, dv=2, pad_q=1,
                                          pad_k=1)
    tq, tk = q.shape[-2], k.shape[-2]
    sink = rng.standard_normal(heads)
    bias = rng.standard_normal((1, tq, tk))   # shared by the heads: dbias sums them
    fixed = dict(causal=True, softcap=2.5, alibi_slopes=rng.uniform(0.1, 0.5, heads),
                 dropout_p=dropout_p, seed=seed, offset=3)
    w = rng.standard_normal(heads + (tq, v.shape[-1]))   # loss = sum(w * out)

    def loss(q, k, v, sink, bias):
        out, _ = ref.attention_varlen_naive(q, k, v, cu_q, cu_k, sink=sink, bias=bias, **fixed)
        return float(np.sum(w * out))

    out, lse = ref.attention_varlen_naive(q, k, v, cu_q, cu_k, sink=sink, bias=bias, **fixed)
    grads = ref.attention_varlen_backward_naive(w, q, k, v, out, lse, cu_q, cu_k, sink=sink,
                                                bias=bias, **fixed, bias_grad=True)
    args = [q, k, v, sink, bias]
    eps = 1e-6
    for n, (x, g) in enumerate(zip(args, grads)):
        assert g.shape == x.shape
        num = np.zeros_like(x)
        for idx in np.ndindex(*x.shape):
            hi = [a.copy() for a in args]
            lo = [a.copy() for a in args]
            hi[n][idx] += eps
            lo[n][idx] -= eps
            num[idx] = (loss(*hi) - loss(*lo)) / (2 * eps)
        np.testing.assert_allclose(g, num, rtol=1e-6, atol=1e-7, err_msg=f"argument {n}")


# ----------------------------------------------------------------------------
# KV cache
# ----------------------------------------------------------------------------

def _cache_problem(rng, batch=3, heads=(2,), sq=4, s_max=48, d=8, dv=6, b_cache=None):
    b_cache = batch if b_cache is None else b_cache
    q = rng.standard_normal((batch,) + heads + (sq, d))
    k_cache = rng.standard_normal((b_cache,) + heads + (s_max, d))
    v_cache = rng.standard_normal((b_cache,) + heads + (s_max, dv))
    return q, k_cache, v_cache


def _kv_variants(rng, batch, heads):
    return [dict(), dict(causal=True), dict(window=(5, 0), softcap=2.0),
            dict(causal=True, alibi_slopes=rng.uniform(0.1, 0.5, (batch,) + heads),
                 sink=rng.standard_normal(heads))]


@pytest.mark.parametrize("sq", [1, 4], ids=["decode", "prefill"])
def test_contiguous_cache_is_the_dense_reference_on_its_keys(seed, sq):
    rng = _rng(seed)
    batch, heads = 3, (2,)
    q, k_cache, v_cache = _cache_problem(rng, batch, heads, sq)
    seqlens = np.array([5, 0, 31], dtype=np.int32)
    for kw in _kv_variants(rng, batch, heads):
        out, lse = ref.attention_with_kvcache_naive(q, k_cache, v_cache, seqlens, **kw)
        assert out.shape == (batch,) + heads + (sq, v_cache.shape[-1])
        for b in range(batch):
            bkw = dict(kw)
            if "alibi_slopes" in kw:
                bkw["alibi_slopes"] = kw["alibi_slopes"][b]
            o, l = ref.attention_naive(q[b], k_cache[b, :, :seqlens[b]],
                                       v_cache[b, :, :seqlens[b]], **bkw)
            _close(out[b], o)
            _close(lse[b], l)


@pytest.mark.parametrize("sq, s_new", [(1, 1), (3, 3), (2, 5)])
def test_new_keys_are_written_in_place_then_attended(seed, sq, s_new):
    rng = _rng(seed)
    batch, heads = 3, (2,)
    q, k_cache, v_cache = _cache_problem(rng, batch, heads, sq, s_max=20, b_cache=5)
    idx = np.array([4, 0, 2])
    seqlens = np.array([7, 0, 20 - s_new])           # the last one fills its row exactly
    k_new = rng.standard_normal((batch,) + heads + (s_new, k_cache.shape[-1]))
    v_new = rng.standard_normal((batch,) + heads + (s_new, v_cache.shape[-1]))
    k0, v0 = k_cache.copy(), v_cache.copy()
    out, lse = ref.attention_with_kvcache_naive(q, k_cache, v_cache, seqlens, k_new=k_new,
                                                v_new=v_new, cache_batch_idx=idx, causal=True)
    k_want, v_want = k0.copy(), v0.copy()
    for b in range(batch):
        k_want[idx[b], :, seqlens[b]:seqlens[b] + s_new] = k_new[b]
        v_want[idx[b], :, seqlens[b]:seqlens[b] + s_new] = v_new[b]
    assert np.array_equal(k_cache, k_want) and np.array_equal(v_cache, v_want)  # nowhere else
    for b in range(batch):
        n = seqlens[b] + s_new
        o, l = ref.attention_naive(q[b], k_want[idx[b], :, :n], v_want[idx[b], :, :n],
                                   causal=True)
        _close(out[b], o)
        _close(lse[b], l)


def test_flash_attn_layout_as_views(seed):
    """(B, S, H, D) arrays passed as swapaxes views; the write reaches the caller's array."""
    rng = _rng(seed)
    batch, heads, s_max, d = 2, 3, 24, 8
    k_bshd = rng.standard_normal((batch, s_max, heads, d))
    v_bshd = rng.standard_normal((batch, s_max, heads, d))
    q_bshd = rng.standard_normal((batch, 1, heads, d))
    k_new = rng.standard_normal((batch, 1, heads, d))
    v_new = rng.standard_normal((batch, 1, heads, d))
    seqlens = np.array([3, 10])
    k_ref, v_ref = np.swapaxes(k_bshd, 1, 2).copy(), np.swapaxes(v_bshd, 1, 2).copy()
    out, lse = ref.attention_with_kvcache_naive(
        np.swapaxes(q_bshd, -2, -3), np.swapaxes(k_bshd, -2, -3), np.swapaxes(v_bshd, -2, -3),
        seqlens, k_new=np.swapaxes(k_new, -2, -3), v_new=np.swapaxes(v_new, -2, -3))
    for b in range(batch):
        assert np.array_equal(k_bshd[b, seqlens[b]], k_new[b, 0])
        assert np.array_equal(v_bshd[b, seqlens[b]], v_new[b, 0])
    out2, lse2 = ref.attention_with_kvcache_naive(
        np.swapaxes(q_bshd, 1, 2), k_ref, v_ref, seqlens, k_new=np.swapaxes(k_new, 1, 2),
        v_new=np.swapaxes(v_new, 1, 2))
    _close(out, out2)
    _close(lse, lse2)


def _paged_copy(rng, k_cache, v_cache, page_size):
    """The same logical cache as a shuffled page pool: (pool_k, pool_v, table)."""
    batch, heads, s_max = k_cache.shape[0], k_cache.shape[1:-2], k_cache.shape[-2]
    per_seq = s_max // page_size
    n_pages = batch * per_seq + 3                       # spare pages, never referenced
    perm = rng.permutation(n_pages)[:batch * per_seq]
    table = perm.reshape(batch, per_seq).astype(np.int32)
    pool_k = rng.standard_normal((n_pages,) + heads + (page_size, k_cache.shape[-1]))
    pool_v = rng.standard_normal((n_pages,) + heads + (page_size, v_cache.shape[-1]))
    for b in range(batch):
        for p in range(per_seq):
            rows = slice(p * page_size, (p + 1) * page_size)
            pool_k[table[b, p]] = k_cache[b, ..., rows, :]
            pool_v[table[b, p]] = v_cache[b, ..., rows, :]
    return pool_k, pool_v, table


@pytest.mark.parametrize("page_size", [16, 32])
@pytest.mark.parametrize("sq, s_new", [(1, 0), (1, 1), (3, 4)])
def test_paged_cache_equals_contiguous(seed, page_size, sq, s_new):
    rng = _rng(seed)
    batch, heads = 3, (2, 2)
    q, k_cache, v_cache = _cache_problem(rng, batch, heads, sq, s_max=64)
    pool_k, pool_v, table = _paged_copy(rng, k_cache, v_cache, page_size)
    spare = np.setdiff1d(np.arange(pool_k.shape[0]), table)
    spare_k = pool_k[spare].copy()
    seqlens = np.array([15, 33, 64 - s_new])          # page boundaries, a full cache
    new = {}
    if s_new:
        new = dict(k_new=rng.standard_normal((batch,) + heads + (s_new, q.shape[-1])),
                   v_new=rng.standard_normal((batch,) + heads + (s_new, v_cache.shape[-1])))
    for kw in _kv_variants(rng, batch, heads):
        c_k, c_v, p_k, p_v = k_cache.copy(), v_cache.copy(), pool_k.copy(), pool_v.copy()
        out_c, lse_c = ref.attention_with_kvcache_naive(q, c_k, c_v, seqlens, **new, **kw)
        out_p, lse_p = ref.attention_with_kvcache_naive(q, p_k, p_v, seqlens, **new,
                                                        block_table=table, **kw)
        _close(out_p, out_c)
        _close(lse_p, lse_c)
        # the pages now hold the contiguous cache's content, spare pages untouched
        for b in range(batch):
            for p in range(table.shape[1]):
                rows = slice(p * page_size, (p + 1) * page_size)
                assert np.array_equal(p_k[table[b, p]], c_k[b, ..., rows, :])
                assert np.array_equal(p_v[table[b, p]], c_v[b, ..., rows, :])
        assert np.array_equal(p_k[spare], spare_k)


def test_cache_in_its_own_dtype(seed):
    """New keys are stored in the cache's dtype and attended as stored."""
    rng = _rng(seed)
    q, k_cache, v_cache = _cache_problem(rng, 2, (2,), 1, s_max=16)
    k16, v16 = k_cache.astype(np.float16), v_cache.astype(np.float16)
    k_new = rng.standard_normal((2, 2, 1, 8))
    v_new = rng.standard_normal((2, 2, 1, 6))
    out, _ = ref.attention_with_kvcache_naive(q, k16, v16, 4, k_new=k_new, v_new=v_new)
    assert np.array_equal(k16[:, :, 4], k_new[:, :, 0].astype(np.float16))
    o, _ = ref.attention_naive(q, k16[:, :, :5], v16[:, :, :5])
    _close(out, o)


# ----------------------------------------------------------------------------
# validation
# ----------------------------------------------------------------------------

def _varlen_args(rng):
    q, k, v, cu_q, cu_k = _random_problem(rng, [2, 3], [3, 4])
    return q, k, v, cu_q, cu_k


@pytest.mark.parametrize("which", ["cu_seqlens_q", "cu_seqlens_k"])
@pytest.mark.parametrize("bad, exc, what", [
    (np.array([0.0, 2.0, 5.0]), TypeError, "integer"),
    (np.array([True, True, True]), TypeError, "integer"),
    (np.array([[0, 2, 5]]), ValueError, "1-D"),
    (np.array([], dtype=np.int32), ValueError, "1-D"),
    (np.array([1, 2, 5]), ValueError, "start at 0"),
    (np.array([0, 3, 2]), ValueError, "non-decreasing"),
    (np.array([0, 2, 99]), ValueError, "beyond the packed length"),
], ids=["float", "bool", "2d", "empty", "start", "decreasing", "beyond"])
def test_cu_seqlens_errors(seed, which, bad, exc, what):
    q, k, v, cu_q, cu_k = _varlen_args(_rng(seed))
    args = dict(cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)
    args[which] = bad
    with pytest.raises(exc, match=f"{which}.*{what}|{what}.*{which}"):
        ref.attention_varlen_naive(q, k, v, **args)
    out, lse = ref.attention_varlen_naive(q, k, v, cu_q, cu_k)
    with pytest.raises(exc, match=which):
        ref.attention_varlen_backward_naive(out, q, k, v, out, lse, **args)


def test_varlen_argument_errors(seed):
    rng = _rng(seed)
    q, k, v, cu_q, cu_k = _varlen_args(rng)
    with pytest.raises(ValueError, match="cu_seqlens_q .*cu_seqlens_k .*same number"):
        ref.attention_varlen_naive(q, k, v, cu_q, np.array([0, 3, 5, 7]))
    with pytest.raises(ValueError, match="bias .*heads \\+ \\(total_q, total_k\\)"):
        ref.attention_varlen_naive(q, k, v, cu_q, cu_k, bias=rng.standard_normal((5, 5)))
    with pytest.raises(TypeError, match="bias .*floating"):
        ref.attention_varlen_naive(q, k, v, cu_q, cu_k, bias=np.ones((5, 7), dtype=np.int32))
    with pytest.raises(TypeError, match="mask .*bool"):
        ref.attention_varlen_naive(q, k, v, cu_q, cu_k, mask=np.ones((5, 7)))
    with pytest.raises(ValueError, match="sink"):
        ref.attention_varlen_naive(q, k, v, cu_q, cu_k, sink=np.zeros(3))
    with pytest.raises(ValueError, match="seed"):
        ref.attention_varlen_naive(q, k, v, cu_q, cu_k, dropout_p=0.1)
    out, lse = ref.attention_varlen_naive(q, k, v, cu_q, cu_k)
    with pytest.raises(ValueError, match="bias_grad"):
        ref.attention_varlen_backward_naive(out, q, k, v, out, lse, cu_q, cu_k, bias_grad=True)


def _kv_args(rng):
    q, k_cache, v_cache = _cache_problem(rng, batch=2, heads=(2,), sq=1, s_max=32)
    return q, k_cache, v_cache


def _new(rng, s_new=2):
    return dict(k_new=rng.standard_normal((2, 2, s_new, 8)),
                v_new=rng.standard_normal((2, 2, s_new, 6)))


def test_cache_seqlens_errors(seed):
    rng = _rng(seed)
    q, kc, vc = _kv_args(rng)
    with pytest.raises(TypeError, match="cache_seqlens"):
        ref.attention_with_kvcache_naive(q, kc, vc, np.array([1.0, 2.0]))
    with pytest.raises(ValueError, match="cache_seqlens .*shape \\(2,\\)"):
        ref.attention_with_kvcache_naive(q, kc, vc, np.array([1, 2, 3]))
    with pytest.raises(ValueError, match="cache_seqlens entries .*\\[0, 32\\]"):
        ref.attention_with_kvcache_naive(q, kc, vc, np.array([1, 33]))
    with pytest.raises(ValueError, match="cache_seqlens entries"):
        ref.attention_with_kvcache_naive(q, kc, vc, np.array([-1, 3]))
    k0 = kc.copy()
    with pytest.raises(ValueError, match="no room for k_new .*cache_seqlens\\[1\\] = 31"):
        ref.attention_with_kvcache_naive(q, kc, vc, np.array([30, 31]), **_new(rng))
    assert np.array_equal(kc, k0)   # checks run before any write
    # paged: the room is max_pages * page_size
    pool_k, pool_v = rng.standard_normal((6, 2, 16, 8)), rng.standard_normal((6, 2, 16, 6))
    table = np.array([[0, 1], [2, 3]])
    with pytest.raises(ValueError, match="cache_seqlens entries .*\\[0, 32\\]"):
        ref.attention_with_kvcache_naive(q, pool_k, pool_v, np.array([33, 1]), block_table=table)
    with pytest.raises(ValueError, match="no room for k_new"):
        ref.attention_with_kvcache_naive(q, pool_k, pool_v, np.array([31, 1]), block_table=table,
                                         **_new(rng))


def test_block_table_and_page_errors(seed):
    rng = _rng(seed)
    q, _, _ = _kv_args(rng)
    pool_k, pool_v = rng.standard_normal((6, 2, 16, 8)), rng.standard_normal((6, 2, 16, 6))
    seqlens = np.array([3, 4])
    for bad in (np.array([[0, 6], [1, 2]]), np.array([[0, -1], [1, 2]])):
        with pytest.raises(ValueError, match="block_table entries .*\\[0, 6\\)"):
            ref.attention_with_kvcache_naive(q, pool_k, pool_v, seqlens, block_table=bad)
    with pytest.raises(TypeError, match="block_table"):
        ref.attention_with_kvcache_naive(q, pool_k, pool_v, seqlens,
                                         block_table=np.zeros((2, 2)))
    with pytest.raises(ValueError, match="block_table must have shape \\(B, max_pages\\)"):
        ref.attention_with_kvcache_naive(q, pool_k, pool_v, seqlens,
                                         block_table=np.zeros((3, 2), dtype=np.int32))
    for ps in (8, 24):
        pk, pv = rng.standard_normal((6, 2, ps, 8)), rng.standard_normal((6, 2, ps, 6))
        with pytest.raises(ValueError, match=f"page size \\(k_cache.shape\\[-2\\] = {ps}.*16"):
            ref.attention_with_kvcache_naive(q, pk, pv, seqlens,
                                             block_table=np.array([[0, 1], [2, 3]]))
    with pytest.raises(ValueError, match="cache_batch_idx .*contiguous"):
        ref.attention_with_kvcache_naive(q, pool_k, pool_v, seqlens,
                                         block_table=np.array([[0, 1], [2, 3]]),
                                         cache_batch_idx=np.array([0, 1]))
    shared = np.array([[0, 1], [0, 2]])                # both write row 3/4 of page 0
    with pytest.raises(ValueError, match="same cache slot.*block_table"):
        ref.attention_with_kvcache_naive(q, pool_k, pool_v, seqlens, block_table=shared,
                                         **_new(rng))


def test_cache_batch_idx_and_shape_errors(seed):
    rng = _rng(seed)
    q, kc, vc = _kv_args(rng)
    seqlens = np.array([3, 4])
    for bad in (np.array([0, 2]), np.array([-1, 0])):
        with pytest.raises(ValueError, match="cache_batch_idx entries .*\\[0, 2\\)"):
            ref.attention_with_kvcache_naive(q, kc, vc, seqlens, cache_batch_idx=bad)
    with pytest.raises(ValueError, match="cache_batch_idx must have shape \\(2,\\)"):
        ref.attention_with_kvcache_naive(q, kc, vc, seqlens, cache_batch_idx=np.array([0]))
    with pytest.raises(TypeError, match="cache_batch_idx"):
        ref.attention_with_kvcache_naive(q, kc, vc, seqlens, cache_batch_idx=np.array([0., 1.]))
    with pytest.raises(ValueError, match="same cache slot.*cache_batch_idx"):
        ref.attention_with_kvcache_naive(q, kc, vc, np.array([3, 4]),
                                         cache_batch_idx=np.array([1, 1]), **_new(rng))
    with pytest.raises(ValueError, match="k_cache .*cache rows"):
        ref.attention_with_kvcache_naive(q, kc[:1], vc[:1], seqlens)
    with pytest.raises(TypeError, match="k_cache must be a NumPy array"):
        ref.attention_with_kvcache_naive(q, kc.tolist(), vc, seqlens)
    with pytest.raises(ValueError, match="k_new and v_new"):
        ref.attention_with_kvcache_naive(q, kc, vc, seqlens, k_new=_new(rng)["k_new"])
    with pytest.raises(ValueError, match="k_new .*must have shape"):
        ref.attention_with_kvcache_naive(q, kc, vc, seqlens, k_new=rng.standard_normal((2, 3, 1, 8)),
                                         v_new=rng.standard_normal((2, 2, 1, 6)))
    ro = kc.copy()
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="k_cache is read-only"):
        ref.attention_with_kvcache_naive(q, ro, vc, seqlens, **_new(rng))
    with pytest.raises(ValueError, match="alibi_slopes"):
        ref.attention_with_kvcache_naive(q, kc, vc, seqlens, alibi_slopes=np.ones(3))
