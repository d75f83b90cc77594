"""GPU tests of packed variable-length batches (``attention_varlen`` and its
backward) and KV caches (``attention_with_kvcache``, contiguous and paged).

Every sequence of a packed batch is checked on its own rows with the tolerance
rule of _assert.py against the float64 reference of _naive.py (the same
functions test_forward / test_backward use), so a kernel that reads a
neighbour's rows, aligns ``causal`` on the wrong lengths or draws the wrong
dropout bits fails on that sequence.  Rows past ``cu_seqlens[-1]`` must be
exactly 0 / -inf with zero gradients.  A cache call is checked the same way on
the keys each sequence holds after the in-place append, and the caches
themselves must equal what ``flashcupy.reference.attention_with_kvcache_naive``
leaves in NumPy copies, bit for bit.

The grid spreads the factors over (family, dtype) by rotation as
test_variants.py does: lengths with 0, 1 and non-multiples of every tile,
a single sequence, GQA / MQA head layouts, head dims 64 and 128, page sizes
16, 48, 64 and 256, decode shapes (Sq = 1 ... 16), and every variant (causal,
window, softcap, ALiBi, sink, bias, mask, dropout).  Outputs come from a
NaN-poisoned pool.  Bad-input errors run at the end: each must name its
argument and launch nothing.
"""
from __future__ import annotations

import math

import numpy as np
import pytest

import _assert as A
import _naive as nv
from _grid import check_dsink, check_forward, dtype_id, family
from test_variants import FAMILY_DTYPES, fd_id

cp = pytest.importorskip("cupy")
import flashcupy as fc  # noqa: E402
from flashcupy import reference as ref  # noqa: E402

pytestmark = pytest.mark.gpu

# (q head axes, k/v head axes)
LAYOUTS = {"heads": ((2,), (2,)), "gqa": ((2, 2), (2, 1)), "mqa": ((3,), (1,)),
           "mqa-rank": ((3,), ())}   # k, v (total_k, D): fewer axes than q
CACHE_HEADS = ["heads", "gqa", "mqa"]    # (a cache has q's number of axes)
# per-sequence lengths (q, k): empty sequences inside the batch, a single row,
# lengths that are no multiple of any tile, Sq > Sk (causal rows that see nothing)
LENGTHS = [
    ([37, 0, 129, 1, 200], [50, 0, 129, 7, 180]),
    ([64, 300], [64, 300]),
    ([1, 2, 3, 100, 0], [300, 2, 0, 97, 5]),
    ([257], [190]),
]


def _cu(lengths):
    return cp.asarray(np.concatenate([[0], np.cumsum(lengths)]), np.int32)


def _rows(cu, b):
    c = cp.asnumpy(cu)
    return slice(int(c[b]), int(c[b + 1]))


def _block(x, rq, rk):
    """Sequence block (rq, rk) of a packed (..., total_q, total_k) bias or mask;
    an axis of size 1 broadcasts and is kept."""
    iq = rq if x.shape[-2] > 1 else slice(None)
    ik = rk if x.shape[-1] > 1 else slice(None)
    return x[..., iq, ik]


def make_packed(seed, dtype, layout, lens_q, lens_k, d, dv, tail=(0, 0)):
    """q, k, v, dout packed along axis -2 with ``tail`` unused rows each."""
    qh, kh = LAYOUTS[layout]
    tq, tk = sum(lens_q) + tail[0], sum(lens_k) + tail[1]
    heads = tuple(np.broadcast_shapes(qh, kh))
    return nv.randn_many(cp, seed, [qh + (tq, d), kh + (tk, d), kh + (tk, dv),
                                    heads + (tq, dv)], dtype)


def variant_kw(parts, seed, layout, tq, tk, dtype):
    """(causal, keywords) for a '+'-joined variant name of a packed problem."""
    qh, kh = LAYOUTS[layout]
    heads = tuple(np.broadcast_shapes(qh, kh))
    rng = np.random.default_rng(seed ^ 0xA11CE)
    kw = {}
    if "window" in parts:
        kw["window"] = (40, 8)
    if "softcap" in parts:
        kw["softcap"] = 2.0
    if "alibi" in parts:
        kw["alibi_slopes"] = cp.asarray(rng.uniform(0.01, 0.2, heads), np.float32)
    if "sink" in parts:
        kw["sink"] = cp.asarray(3.0 + rng.standard_normal(heads), np.float32)
    if "bias" in parts:
        kw["bias"] = nv.randn(cp, seed ^ 0xB1A5, heads + (tq, tk), dtype)
    if "keybias" in parts:   # broadcast over heads and rows: key padding as a bias
        kw["bias"] = nv.randn(cp, seed ^ 0xB1A6, (1, tk), np.float32)
    if "mask" in parts:
        kw["mask"] = cp.asarray(rng.random((1, tq, tk)) > 0.3)
    if "dropout" in parts:
        kw.update(dropout_p=0.2, seed=seed % 1000)
    return "causal" in parts, kw


def _seq_kw(kw, b, rq, rk, full):
    """The keywords of sequence b's dense problem: its bias / mask block, and
    the dropout bits of batch elements (b,) + h of ``full``."""
    out = dict(kw)
    for name in ("bias", "mask"):
        if name in kw:
            out[name] = _block(kw[name], rq, rk)
    if kw.get("dropout_p"):
        out["dropout_batch"] = (full, (b,))
    return out


def check_varlen_forward(q, k, v, cu_q, cu_k, out, lse, causal, kw):
    nb = cu_q.size - 1
    heads = tuple(out.shape[:-2])
    for b in range(nb):
        rq, rk = _rows(cu_q, b), _rows(cu_k, b)
        check_forward(q[..., rq, :], k[..., rk, :], v[..., rk, :], out[..., rq, :],
                      lse[..., rq], causal, **_seq_kw(kw, b, rq, rk, (nb,) + heads))
    end = int(cp.asnumpy(cu_q)[-1])
    assert bool((nv.to_f64(out[..., end:, :]) == 0).all()), "out: rows past the last sequence"
    assert bool(cp.isneginf(lse[..., end:]).all()), "lse: rows past the last sequence"


def check_varlen_backward(dout, q, k, v, cu_q, cu_k, grads, causal, kw, fwd):
    nb = cu_q.size - 1
    heads = tuple(dout.shape[:-2])
    n = 3 + ("sink" in kw) + bool(kw.get("bias_grad"))
    assert len(grads) == n, f"{len(grads)} gradients, expected {n}"
    for name, g, x in zip(("dq", "dk", "dv"), grads, (q, k, v)):
        assert g.dtype == x.dtype and g.shape == x.shape, (name, g.dtype, g.shape, x.shape)
    dq, dk, dv = grads[:3]
    for b in range(nb):
        rq, rk = _rows(cu_q, b), _rows(cu_k, b)
        skw = _seq_kw(kw, b, rq, rk, (nb,) + heads)
        args = (dout[..., rq, :], q[..., rq, :], k[..., rk, :], v[..., rk, :], causal)
        refs = nv.attention_backward(*args, dtype=np.float64, **skw)
        naive = nv.attention_backward(*args, **skw)
        mag = max(float(abs(nv.to_f64(r)).max()) if r.size else 0.0 for r in refs[:3])
        for name, g, r, nn in zip(("dq", "dk", "dv"), (dq[..., rq, :], dk[..., rk, :],
                                                        dv[..., rk, :]), refs, naive):
            A.assert_close(f"{name} (sequence {b})", g, r, nn, grad=True, magnitude=mag)
        if kw.get("bias_grad"):
            db = _block(grads[-1], rq, rk)
            A.assert_close(f"dbias (sequence {b})", db, refs[-1], naive[-1], grad=True,
                           magnitude=max(mag, float(abs(nv.to_f64(refs[-1])).max())
                                         if refs[-1].size else 0.0))
    end_q, end_k = int(cp.asnumpy(cu_q)[-1]), int(cp.asnumpy(cu_k)[-1])
    for name, g, end in (("dq", dq, end_q), ("dk", dk, end_k), ("dv", dv, end_k)):
        assert bool((nv.to_f64(g[..., end:, :]) == 0).all()), f"{name}: rows past the last sequence"
    if "sink" in kw:   # summed over every sequence: the packed formula
        check_dsink(grads[3], dout, fwd[0], fwd[1], kw["sink"], q.dtype)
    if kw.get("bias_grad"):   # 0 outside the sequences' blocks
        db = nv.to_f64(grads[-1]).copy()
        for b in range(nb):
            rq, rk = _rows(cu_q, b), _rows(cu_k, b)
            db[..., rq, rk] = 0
        assert bool((db == 0).all()), "dbias: nonzero outside the sequences' blocks"


def run_varlen(fam, dtype, layout, lens, heads, parts, seed, poison_pool, tail=(0, 0),
               backward=True, deterministic=False):
    lens_q, lens_k = lens
    d, dv = heads
    q, k, v, dout = make_packed(seed, dtype, layout, lens_q, lens_k, d, dv, tail)
    cu_q, cu_k = _cu(lens_q), _cu(lens_k)
    causal, kw = variant_kw(parts, seed, layout, q.shape[-2], k.shape[-2], dtype)
    with family(fam, dtype):
        with poison_pool():
            out, lse = fc.attention_varlen(q, k, v, cu_q, cu_k, causal=causal, return_lse=True,
                                           **kw)
        check_varlen_forward(q, k, v, cu_q, cu_k, out, lse, causal, kw)
        if not backward:
            return
        bkw = dict(kw)
        if "bias" in parts or "keybias" in parts:
            bkw["bias_grad"] = "bias" in parts   # the full bias's gradient, block by block
        with poison_pool():
            grads = fc.attention_varlen_backward(dout, q, k, v, out, lse, cu_q, cu_k,
                                                 causal=causal, deterministic=deterministic,
                                                 **bkw)
    if not isinstance(grads, tuple):
        grads = (grads,)
    check_varlen_backward(dout, q, k, v, cu_q, cu_k, grads, causal, bkw, (out, lse))


# ----------------------------------------------------------------------------
# packed batches
# ----------------------------------------------------------------------------

def _heads_for(fam, i):
    return [(128, 128), (64, 64)][i % 2] if fam != "generic" else [(64, 64), (40, 72), (128, 128)][i % 3]


@pytest.mark.parametrize("fd", FAMILY_DTYPES, ids=fd_id)
@pytest.mark.parametrize("causal", [False, True], ids=["dense", "causal"])
def test_varlen(fd, causal, seed, poison_pool):
    """Every family and dtype, plain and causal, over every length set and
    layout (rotated), with unused tail rows."""
    fam, dtype = fd
    i = FAMILY_DTYPES.index(fd)
    for j, lens in enumerate(LENGTHS):
        layout = list(LAYOUTS)[(i + j) % len(LAYOUTS)]
        run_varlen(fam, dtype, layout, lens, _heads_for(fam, i + j),
                   ("causal",) if causal else (), seed + j, poison_pool,
                   tail=(3, 5) if j % 2 else (0, 0), deterministic=bool(j % 2))


VARIANT_CASES = ["window", "softcap", "alibi", "sink", "bias", "keybias", "mask", "dropout",
                 "causal+softcap+alibi+sink", "causal+window+mask+dropout",
                 "window+softcap+alibi+sink+bias+mask+dropout"]


def _variant_grid():
    out = []
    for ci, case in enumerate(VARIANT_CASES):
        for k in range(2):   # two (family, dtype) cells per case
            fd = FAMILY_DTYPES[(2 * ci + 3 * k) % len(FAMILY_DTYPES)]
            out.append(pytest.param(fd, case, LENGTHS[(ci + k) % len(LENGTHS)],
                                    list(LAYOUTS)[(ci + 2 * k) % len(LAYOUTS)],
                                    id=f"{fd_id(fd)}-{case}"))
    return out


@pytest.mark.parametrize("fd,case,lens,layout", _variant_grid())
def test_varlen_variants(fd, case, lens, layout, seed, poison_pool):
    fam, dtype = fd
    run_varlen(fam, dtype, layout, lens, _heads_for(fam, len(case)), tuple(case.split("+")),
               seed, poison_pool, tail=(2, 0))


@pytest.mark.parametrize("fd", FAMILY_DTYPES[:3], ids=fd_id)
def test_varlen_single_sequence_is_dense(fd, seed):
    """One sequence (and a batch of equal lengths) is the dense problem, bit
    for bit with dropout (the documented bits: bh = b * H + h)."""
    fam, dtype = fd
    q, k, v = nv.randn_many(cp, seed, [(3, 2, 150, 64), (3, 2, 150, 64), (3, 2, 150, 64)], dtype)
    with family(fam, dtype):
        for kw in ({"causal": True}, {"dropout_p": 0.3, "seed": 7, "window": (20, 30)}):
            dense, lse_d = fc.attention(q, k, v, return_lse=True, **kw)
            packed = [x.transpose(1, 0, 2, 3).reshape(2, 450, 64) for x in (q, k, v)]
            cu = _cu([150, 150, 150])
            out, lse = fc.attention_varlen(*packed, cu, cu, return_lse=True, **kw)
            out = out.reshape(2, 3, 150, 64).transpose(1, 0, 2, 3)
            lse = lse.reshape(2, 3, 150).transpose(1, 0, 2)
            assert bool((out == dense).all()) and bool((lse == lse_d).all()), kw


def test_varlen_flash_attn_layout(seed):
    """flash-attn's (total, H, D) arrives as a swapaxes view, same answer."""
    dtype = nv.BF16
    lens = [70, 0, 33, 129]
    q, k, v = nv.randn_many(cp, seed, [(232, 4, 64), (232, 2, 64), (232, 2, 64)], dtype)
    cu = _cu(lens)
    views = [x.swapaxes(0, 1) for x in (q, k, v)]
    copies = [cp.ascontiguousarray(x) for x in views]
    a = fc.attention_varlen(*[x.reshape(2, 2, 232, 64) if i == 0 else x[:, None]
                              for i, x in enumerate(views)], cu, cu, causal=True)
    b = fc.attention_varlen(*[x.reshape(2, 2, 232, 64) if i == 0 else x[:, None]
                              for i, x in enumerate(copies)], cu, cu, causal=True)
    assert bool((a == b).all())


@pytest.mark.parametrize("fd", FAMILY_DTYPES[:3], ids=fd_id)
def test_varlen_deterministic(fd, seed):
    fam, dtype = fd
    lens = [300, 5, 260]
    q, k, v, do = make_packed(seed, dtype, "gqa", lens, lens, 128, 128)
    cu = _cu(lens)
    with family(fam, dtype):
        out, lse = fc.attention_varlen(q, k, v, cu, cu, causal=True, return_lse=True)
        runs = [fc.attention_varlen_backward(do, q, k, v, out, lse, cu, cu, causal=True,
                                             deterministic=True) for _ in range(3)]
    for r in runs[1:]:
        for a, b in zip(runs[0], r):
            assert bool((a == b).all())


def test_varlen_matches_reference_module(seed):
    """The kernels against flashcupy.reference's float64 loop (the published
    reference), dropout and a bias included."""
    dtype = np.float32
    lens_q, lens_k = [40, 0, 77], [60, 3, 77]
    q, k, v, do = make_packed(seed, dtype, "gqa", lens_q, lens_k, 32, 32, tail=(2, 1))
    cu_q, cu_k = _cu(lens_q), _cu(lens_k)
    kw = dict(causal=True, dropout_p=0.25, seed=11, softcap=3.0)
    out, lse = fc.attention_varlen(q, k, v, cu_q, cu_k, return_lse=True, **kw)
    h = [cp.asnumpy(x).astype(np.float64) for x in (q, k, v, do)]
    cq, ck = cp.asnumpy(cu_q), cp.asnumpy(cu_k)
    out_r, lse_r = ref.attention_varlen_naive(h[0], h[1], h[2], cq, ck, **kw)
    np.testing.assert_allclose(cp.asnumpy(out), out_r, atol=2e-5, rtol=0)
    fin = np.isfinite(lse_r)
    assert np.array_equal(fin, np.isfinite(cp.asnumpy(lse)))
    np.testing.assert_allclose(cp.asnumpy(lse)[fin], lse_r[fin], atol=2e-5, rtol=0)
    grads = fc.attention_varlen_backward(do, q, k, v, out, lse, cu_q, cu_k, **kw)
    refs = ref.attention_varlen_backward_naive(h[3], h[0], h[1], h[2], cp.asnumpy(out).astype(np.float64),
                                               cp.asnumpy(lse).astype(np.float64), cq, ck, **kw)
    for g, r in zip(grads, refs):
        np.testing.assert_allclose(cp.asnumpy(g), r, atol=5e-5 * max(1.0, np.abs(r).max()), rtol=0)


# ----------------------------------------------------------------------------
# KV caches
# ----------------------------------------------------------------------------

# (name, page size or None, cache_batch_idx)
CACHE_LAYOUTS = [("contiguous", None, False), ("batch-idx", None, True),
                 ("page16", 16, False), ("page48", 48, False), ("page64", 64, False),
                 ("page256", 256, False)]
CACHE_VARIANTS = ["causal", "", "causal+window", "softcap+alibi+sink", "causal+sink"]


def _cache_case(seed, dtype, layout, page, batch_idx, sq, s_new, lens, d=128):
    """q, caches (cupy) and their NumPy copies, block table / batch index, k_new, v_new."""
    qh, kh = LAYOUTS[layout]
    nb = len(lens)
    rng = np.random.default_rng(seed ^ 0xCAC4E)
    need = [L + s_new for L in lens]
    if page is None:
        s_max = max(need) + 9
        slots = nb + 2 if batch_idx else nb
        shape_k = (slots,) + kh + (s_max, d)
        table = cp.asarray(rng.permutation(slots)[:nb], np.int32) if batch_idx else None
    else:
        n_pages = [max(1, -(-n // page)) for n in need]
        width = max(n_pages) + 1
        pool = sum(n_pages) + 3
        perm = rng.permutation(pool)
        tab = np.full((nb, width), pool - 1, np.int32)   # unused entries: any valid page
        at = 0
        for b, n in enumerate(n_pages):
            tab[b, :n] = perm[at:at + n]
            at += n
        table = cp.asarray(tab)
        shape_k = (pool,) + kh + (page, d)
    kc, vc = nv.randn_many(cp, seed, [shape_k, shape_k], dtype)
    q = nv.randn(cp, seed ^ 1, (nb,) + qh + (sq, d), dtype)
    new = (nv.randn_many(cp, seed ^ 2, [(nb,) + kh + (s_new, d)] * 2, dtype)
           if s_new else (None, None))
    return q, kc, vc, table, new


def _keys_of(cache, b, length, page, table, batch_idx):
    """Sequence b's first ``length`` keys from a cache (cupy or NumPy)."""
    if page is None:
        row = int(table[b]) if batch_idx else b
        return cache[row, ..., :length, :]
    n = max(1, -(-length // page))
    pages = [cache[int(p)] for p in np.asarray(table[b])[:n]]
    xp = nv.xp_of(cache)
    return xp.concatenate(pages, axis=-2)[..., :length, :]


def run_cache(fam, dtype, layout, cache_layout, sq, s_new, lens, parts, seed, poison_pool):
    _, page, batch_idx = cache_layout
    q, kc, vc, table, (kn, vn) = _cache_case(seed, dtype, layout, page, batch_idx, sq, s_new,
                                             lens)
    nb = len(lens)
    heads = tuple(np.broadcast_shapes(LAYOUTS[layout][0], LAYOUTS[layout][1]))
    causal, kw = variant_kw(parts, seed, layout, 1, 1, dtype)
    if "alibi_slopes" in kw or "sink" in kw:   # per sequence and head: (B,) + heads
        rng = np.random.default_rng(seed ^ 3)
        if "alibi_slopes" in kw:
            kw["alibi_slopes"] = cp.asarray(rng.uniform(0.01, 0.2, (nb,) + heads), np.float32)
        if "sink" in kw:
            kw["sink"] = cp.asarray(3.0 + rng.standard_normal((nb,) + heads), np.float32)
    lens_d = cp.asarray(lens, np.int32)
    # the reference's caches, in NumPy, updated in place like the kernels'
    kh_, vh_ = cp.asnumpy(kc), cp.asnumpy(vc)
    where = {}
    if page is not None:
        where["block_table"] = table
    elif batch_idx:
        where["cache_batch_idx"] = table
    ref.attention_with_kvcache_naive(
        cp.asnumpy(q), kh_, vh_, np.asarray(lens),
        k_new=None if kn is None else cp.asnumpy(kn), v_new=None if vn is None else cp.asnumpy(vn),
        **{n: cp.asnumpy(t) for n, t in where.items()}, causal=causal,
        **{n: cp.asnumpy(x) if isinstance(x, cp.ndarray) else x for n, x in kw.items()})
    with family(fam, dtype):
        with poison_pool():
            out, lse = fc.attention_with_kvcache(q, kc, vc, lens_d, k_new=kn, v_new=vn,
                                                 causal=causal, return_lse=True, **where, **kw)
    assert bool((cp.asnumpy(kc) == kh_).all()) and bool((cp.asnumpy(vc) == vh_).all()), (
        "the caches after the append differ from the reference's")
    assert bool((lens_d == cp.asarray(lens, np.int32)).all()), "cache_seqlens was changed"
    tab = None if table is None else cp.asnumpy(table)
    for b in range(nb):
        n = lens[b] + s_new
        kb = _keys_of(kc, b, n, page, tab, batch_idx)
        vb = _keys_of(vc, b, n, page, tab, batch_idx)
        skw = dict(kw)
        for name in ("alibi_slopes", "sink"):
            if name in kw:
                skw[name] = kw[name][b]
        check_forward(q[b], kb, vb, out[b], lse[b], causal, **skw)


def _cache_grid():
    out = []
    for li, cl in enumerate(CACHE_LAYOUTS):
        for k in range(2):
            fd = FAMILY_DTYPES[(li + 3 * k) % len(FAMILY_DTYPES)]
            var = CACHE_VARIANTS[(li + k) % len(CACHE_VARIANTS)]
            out.append(pytest.param(fd, cl, var, CACHE_HEADS[(li + k) % len(CACHE_HEADS)],
                                    (1, 4, 16, 37)[(li + 2 * k) % 4], (0, 1, 3)[(li + k) % 3],
                                    id=f"{fd_id(fd)}-{cl[0]}-{var or 'plain'}"))
    return out


@pytest.mark.parametrize("fd,cache_layout,parts,layout,sq,s_new", _cache_grid())
def test_kvcache(fd, cache_layout, parts, layout, sq, s_new, seed, poison_pool):
    """Decode and prefill shapes against contiguous and paged caches, appends
    included, with empty and single-key sequences."""
    fam, dtype = fd
    lens = [0, 1, 300, 77, 515][: 5 if sq < 16 else 3]
    run_cache(fam, dtype, layout, cache_layout, sq, s_new, lens,
              tuple(p for p in parts.split("+") if p), seed, poison_pool)


def test_kvcache_vllm_layout(seed):
    """vLLM's / flash-attn's (num_pages, page_size, H, D) pool as a swapaxes
    view gives the contiguous pool's answer, and the appends land in it."""
    dtype = nv.BF16
    pool = nv.randn(cp, seed, (12, 16, 2, 64), dtype)
    vpool = nv.randn(cp, seed ^ 5, (12, 16, 2, 64), dtype)
    table = cp.asarray([[3, 7, 0], [11, 2, 5]], np.int32)
    lens = cp.asarray([20, 33], np.int32)
    q = nv.randn(cp, seed ^ 6, (2, 2, 2, 1, 64), dtype)   # (B, H_kv, group, Sq, D)
    kn = nv.randn(cp, seed ^ 7, (2, 2, 1, 1, 64), dtype)
    vn = nv.randn(cp, seed ^ 8, (2, 2, 1, 1, 64), dtype)
    k2, v2 = pool.copy(), vpool.copy()
    kv_view = pool.swapaxes(1, 2)[:, :, None]       # (pages, H, 1, page, D), no copy
    vv_view = vpool.swapaxes(1, 2)[:, :, None]
    assert kv_view.base is not None
    a = fc.attention_with_kvcache(q, kv_view, vv_view, lens, k_new=kn, v_new=vn,
                                  block_table=table, causal=True)
    kc = cp.ascontiguousarray(k2.swapaxes(1, 2)[:, :, None])
    vc = cp.ascontiguousarray(v2.swapaxes(1, 2)[:, :, None])
    b = fc.attention_with_kvcache(q, kc, vc, lens, k_new=kn, v_new=vn, block_table=table,
                                  causal=True)
    assert bool((a == b).all())
    assert bool((kv_view == kc).all()) and bool((vv_view == vc).all())


def test_kvcache_graph_capture(seed):
    """The cache call captures into a CUDA graph (no host copy inside) and a
    replay sees new device lengths."""
    dtype = nv.BF16
    kc, vc = nv.randn_many(cp, seed, [(3, 2, 256, 64)] * 2, dtype)
    q = nv.randn(cp, seed ^ 1, (3, 2, 1, 64), dtype)
    lens = cp.asarray([10, 100, 200], np.int32)
    new_lens = cp.asarray([50, 1, 255], np.int32)
    fc.attention_with_kvcache(q, kc, vc, lens)          # compile outside the capture
    stream = cp.cuda.Stream(non_blocking=True)
    with stream:
        stream.begin_capture()
        out = fc.attention_with_kvcache(q, kc, vc, lens)
        graph = stream.end_capture()
    # (the capture stream does not wait for the default stream: write the new
    # lengths on it, ahead of the replay)
    with stream:
        lens[...] = new_lens
    graph.launch(stream)
    stream.synchronize()
    want = fc.attention_with_kvcache(q, kc, vc, lens)
    assert bool((out == want).all())


# ----------------------------------------------------------------------------
# bad input: a clear error naming the argument, nothing launched
# ----------------------------------------------------------------------------

@pytest.fixture
def packed():
    q = nv.randn(cp, 1, (2, 100, 64), nv.BF16)
    return q, q.copy(), q.copy(), _cu([40, 60])


def _raises(exc, name, fn, *args, **kw):
    with pytest.raises(exc) as e:
        fn(*args, **kw)
    assert name in str(e.value), f"{name!r} not named in: {e.value}"


def test_varlen_bad_cu_seqlens(packed):
    q, k, v, cu = packed
    _raises(TypeError, "cu_seqlens_q", fc.attention_varlen, q, k, v, cu.astype(np.int64), cu)
    _raises(TypeError, "cu_seqlens_k", fc.attention_varlen, q, k, v, cu, cp.asnumpy(cu))
    _raises(ValueError, "cu_seqlens_q", fc.attention_varlen, q, k, v,
            cp.asarray([0, 60, 40], np.int32), cu)          # decreasing
    _raises(ValueError, "cu_seqlens_k", fc.attention_varlen, q, k, v, cu,
            cp.asarray([0, 60, 101], np.int32))             # past the packed length
    _raises(ValueError, "cu_seqlens_q", fc.attention_varlen, q, k, v,
            cp.asarray([3, 60, 100], np.int32), cu)         # not from 0
    _raises(ValueError, "cu_seqlens", fc.attention_varlen, q, k, v, cu, _cu([40, 30, 30]))


def test_kvcache_bad_input(seed):
    dtype = nv.BF16
    kc, vc = nv.randn_many(cp, seed, [(2, 2, 64, 64)] * 2, dtype)
    q = nv.randn(cp, seed, (2, 2, 1, 64), dtype)
    lens = cp.asarray([10, 64], np.int32)
    kn = nv.randn(cp, seed, (2, 2, 1, 64), dtype)
    before = cp.asnumpy(kc)
    _raises(ValueError, "k_new", fc.attention_with_kvcache, q, kc, vc, lens, k_new=kn, v_new=kn)
    ok_lens = cp.asarray([10, 20], np.int32)
    _raises(ValueError, "alibi_slopes", fc.attention_with_kvcache, q, kc, vc, ok_lens, k_new=kn,
            v_new=kn, alibi_slopes=cp.ones((5,), np.float32))
    _raises(ValueError, "q", fc.attention_with_kvcache, q[..., :32], kc, vc, ok_lens, k_new=kn,
            v_new=kn)
    assert bool((cp.asnumpy(kc) == before).all()), "a refused call wrote into the cache"
    _raises(ValueError, "k_cache", fc.attention_with_kvcache, q, kc[..., ::2],
            vc, ok_lens)
    _raises(ValueError, "cache_seqlens", fc.attention_with_kvcache, q, kc, vc,
            cp.asarray([10, 65], np.int32))
    _raises(TypeError, "cache_seqlens", fc.attention_with_kvcache, q, kc, vc,
            cp.asarray([10, 20], np.int64))
    pool = nv.randn(cp, seed, (4, 2, 16, 64), dtype)
    _raises(ValueError, "block_table", fc.attention_with_kvcache, q, pool, pool,
            cp.asarray([3, 5], np.int32), block_table=cp.asarray([[0], [4]], np.int32))
    _raises(ValueError, "page", fc.attention_with_kvcache, q, pool[:, :, :10], pool[:, :, :10],
            cp.asarray([3, 5], np.int32), block_table=cp.asarray([[0], [1]], np.int32))
    _raises(ValueError, "same cache slot", fc.attention_with_kvcache, q, kc, vc,
            cp.asarray([3, 3], np.int32), k_new=kn, v_new=kn,
            cache_batch_idx=cp.asarray([1, 1], np.int32))
    # a pool (or a cache seen through cache_batch_idx) whose page or row axis runs
    # backwards: the paged kernels form offsets as unsigned products
    _raises(ValueError, "run backwards", fc.attention_with_kvcache, q, pool[::-1], pool[::-1],
            cp.asarray([3, 5], np.int32), block_table=cp.asarray([[0], [1]], np.int32))
    _raises(ValueError, "run backwards", fc.attention_with_kvcache, q, kc[:, :, ::-1],
            vc[:, :, ::-1], ok_lens, cache_batch_idx=cp.asarray([1, 0], np.int32))


def test_kvcache_one_row_cache(seed):
    """A contiguous cache of a single row through cache_batch_idx (one page of
    one row per sequence) against the reference."""
    dtype = nv.BF16
    kc, vc = nv.randn_many(cp, seed, [(3, 2, 1, 64)] * 2, dtype)
    q = nv.randn(cp, seed ^ 1, (2, 2, 1, 64), dtype)
    lens = cp.asarray([1, 0], np.int32)
    idx = cp.asarray([2, 0], np.int32)
    out = fc.attention_with_kvcache(q, kc, vc, lens, cache_batch_idx=idx)
    want, _ = ref.attention_naive(nv.to_f64(q[:1]).get(), nv.to_f64(kc[2:3]).get(),
                                  nv.to_f64(vc[2:3]).get())
    naive, _ = nv.attention(q[:1], kc[2:3], vc[2:3])
    A.assert_close("one-row cache out", out[:1], cp.asarray(want), naive)
    assert bool((out[1] == 0).all())   # no key cached: a row that sees nothing
