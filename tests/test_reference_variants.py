"""CPU tests of the attention variants in flashcupy.reference and tests/_naive.py:
sliding window, softcap, ALiBi and attention sinks (and their compositions).

No GPU needed.  Three independent statements of each variant meet here:

* ``_brute``: the issue's formulas written out per (query, key) pair with
  Python scalars, the definition;
* ``flashcupy.reference``: the naive (whole score matrix) and the tiled
  (FlashAttention-2, as the kernels do it) references;
* ``tests/_naive.py``: the naive "in a dtype" implementation whose float64 path
  is the GPU tests' reference.

The naive backward is held to central finite differences in float64 for the
new terms (softcap chain rule, ALiBi, window, dsink), and each such check is
shown to fail on a deliberately broken gradient.
"""
from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

import _assert as A
import _naive as nv
from flashcupy import reference as ref

pytestmark = pytest.mark.filterwarnings("error")  # no overflow/invalid warnings anywhere


def _rng(seed):
    return np.random.default_rng(seed)


def _close(a, b, tol=1e-12):
    a, b = np.asarray(a), np.asarray(b)
    assert a.shape == b.shape, (a.shape, b.shape)
    assert np.array_equal(np.isneginf(a), np.isneginf(b))
    assert not np.isnan(a).any()
    fin = np.isfinite(b)
    np.testing.assert_allclose(a[fin], b[fin], rtol=tol, atol=tol)


def _same_bits(a, b):
    a, b = np.asarray(a), np.asarray(b)
    assert a.shape == b.shape and a.dtype == b.dtype
    assert np.array_equal(a.view(np.uint64), b.view(np.uint64))


# ----------------------------------------------------------------------------
# the definition, per pair, in Python scalars
# ----------------------------------------------------------------------------

def _brute(q, k, v, scale, causal=False, window=None, softcap=None, slope=None, sink=None):
    """2-D q (Sq, D), k (Sk, D), v (Sk, Dv); scalar slope and sink.  Returns out, lse."""
    sq, sk = len(q), len(k)
    left, right = window if window is not None else (None, None)
    if causal:
        right = 0 if right is None else min(right, 0)
    diag = sk - sq
    out = np.zeros((sq, v.shape[1]))
    lse = np.empty(sq)
    for i in range(sq):
        logits, values = [], []
        for j in range(sk):
            if left is not None and j < i + diag - left:
                continue
            if right is not None and j > i + diag + right:
                continue
            s = scale * float(np.dot(q[i], k[j]))
            if softcap is not None:
                s = softcap * math.tanh(s / softcap)
            if slope is not None:
                s -= slope * abs(i + diag - j)
            logits.append(s)
            values.append(v[j])
        if sink is not None:
            logits.append(sink)
            values.append(np.zeros(v.shape[1]))
        if not logits:
            lse[i] = -np.inf
            continue
        mx = max(logits)
        w = [math.exp(x - mx) for x in logits]
        z = sum(w)
        out[i] = sum(wi * vi for wi, vi in zip(w, values)) / z
        lse[i] = mx + math.log(z)
    return out, lse


# ----------------------------------------------------------------------------
# the variants and their pairwise combinations
# ----------------------------------------------------------------------------

# one representative of each; window sides chosen so that, with the lengths
# below, some tiles are skipped, some cut, some whole
SINGLES = {
    "causal": {"causal": True},
    "window": {"window": (20, 7)},
    "softcap": {"softcap": 0.8},    # c below the scores' spread: tanh is far from linear
    "alibi": {"alibi_slopes": True},
    "sink": {"sink": True},
}
COMBOS = (["none"] + list(SINGLES) + ["+".join(c) for c in itertools.combinations(SINGLES, 2)]
          + ["+".join(SINGLES)])


def _variant(name, batch, seed, *, slopes_shape=None, sink_shape=None, sink_center=0.5):
    """(causal, keywords) of a combination name, with random slopes / sinks of
    the given shapes (default: the batch shape)."""
    kw = {}
    if name != "none":
        for part in name.split("+"):
            kw.update(SINGLES[part])
    causal = kw.pop("causal", False)
    rng = _rng(seed + 7)
    if kw.get("alibi_slopes"):
        kw["alibi_slopes"] = rng.uniform(0.01, 0.1, slopes_shape or batch)
    if kw.get("sink"):   # around log(Sk) when given: the sink takes a sizeable share
        kw["sink"] = rng.normal(sink_center, 1.5, sink_shape or batch)
    return causal, kw


def _run_both(q, k, v, causal, kw, dout, blocks):
    """Naive and tiled, forward and backward: ((out, lse, grads), (out, lse, grads))."""
    out, lse = ref.attention_naive(q, k, v, causal, **kw)
    out_t, lse_t = ref.attention_tiled(q, k, v, causal, block_m=blocks[0], block_n=blocks[1],
                                       **kw)
    g = ref.attention_backward_naive(dout, q, k, v, out, lse, causal, **kw)
    g_t = ref.attention_backward_tiled(dout, q, k, v, out, lse, causal, None, *blocks, **kw)
    return (out, lse, g), (out_t, lse_t, g_t)


@pytest.mark.parametrize("blocks", [(16, 32), (32, 16)], ids=lambda b: f"{b[0]}_{b[1]}")
@pytest.mark.parametrize("seqlens", [(1, 1), (17, 130), (70, 17), (130, 70)],
                         ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("combo", COMBOS)
def test_tiled_matches_naive(combo, seqlens, blocks, seed):
    sq, sk = seqlens
    rng = _rng(seed)
    q = rng.standard_normal((2, 1, sq, 16))
    k = rng.standard_normal((1, 2, sk, 16))      # batch (2, 2): both sides broadcast
    v = rng.standard_normal((1, 2, sk, 24))      # Dv != D
    dout = rng.standard_normal((2, 2, sq, 24))
    causal, kw = _variant(combo, (2, 2), seed, slopes_shape=(2,), sink_shape=(2, 1))
    (out, lse, g), (out_t, lse_t, g_t) = _run_both(q, k, v, causal, kw, dout, blocks)
    _close(out_t, out)
    _close(lse_t, lse)
    assert len(g) == len(g_t) == (4 if "sink" in kw else 3)
    for x, a, b in zip((q, k, v) + ((kw.get("sink"),) if "sink" in kw else ()), g_t, g):
        assert a.shape == np.shape(x)
        _close(a, b)


@pytest.mark.parametrize("combo", COMBOS)
def test_naive_matches_definition(combo, seed):
    """flashcupy.reference against the per-pair definition, element by element."""
    rng = _rng(seed)
    q = rng.standard_normal((2, 13, 8))
    k = rng.standard_normal((2, 29, 8))
    v = rng.standard_normal((2, 29, 5))
    causal, kw = _variant(combo, (2,), seed)
    scale = 0.45
    out, lse = ref.attention_naive(q, k, v, causal, scale, **kw)
    for b in range(2):
        o_b, l_b = _brute(q[b], k[b], v[b], scale, causal, kw.get("window"), kw.get("softcap"),
                          None if "alibi_slopes" not in kw else kw["alibi_slopes"][b],
                          None if "sink" not in kw else kw["sink"][b])
        _close(out[b], o_b)
        _close(lse[b], l_b)


# ----------------------------------------------------------------------------
# window edges, the visible band and the loop ranges
# ----------------------------------------------------------------------------

WINDOWS = [None, (0, 0), (0, 1), (1, 0), (1, 1), (0, None), (None, 0), (None, 1), (3, None),
           (5, 2), (69, 69), (200, 200), (None, None), (200, 0)]


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("seqlens", [(1, 1), (1, 70), (17, 70), (70, 17), (64, 64), (0, 5),
                                     (5, 0)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_visible_mask_definition_and_ranges(seqlens, causal):
    sq, sk = seqlens
    for window in WINDOWS:
        mask = ref.visible_mask(sq, sk, causal, window)
        left, right = window if window is not None else (None, None)
        if causal:
            right = 0 if right is None else min(right, 0)
        want = np.array([[(left is None or j >= i + sk - sq - left)
                          and (right is None or j <= i + sk - sq + right)
                          for j in range(sk)] for i in range(sq)], dtype=bool).reshape(sq, sk)
        assert np.array_equal(mask, want), window
        # the test helper's count of empty (leading) rows
        empty = ~mask.any(axis=1) if sk else np.ones(sq, bool)
        n = nv.empty_rows(sq, sk, causal, window)
        assert empty[:n].all() and not empty[n:].any(), (window, n)
        # loop ranges: exact hulls of the visible keys / queries of any tile
        win = ref._Window(sq, sk, left, right)
        for m0, m1 in [(0, min(sq, 16)), (min(sq, 16), min(sq, 48)), (max(0, sq - 5), sq)]:
            if m0 >= m1:
                continue
            cols = np.flatnonzero(mask[m0:m1].any(axis=0))
            kb, ke = ref._key_range(win, m0, m1)
            if cols.size:
                assert (kb, ke) == (cols[0], cols[-1] + 1), (window, m0, m1)
            else:
                assert kb >= ke, (window, m0, m1)
            for n0, n1 in [(0, min(sk, 16)), (max(0, sk - 7), sk)]:
                if n0 < n1:
                    tile = mask[m0:m1, n0:n1]
                    assert win.needs_mask(m0, m1, n0, n1) == (not tile.all()), (window, m0, n0)
        for n0, n1 in [(0, min(sk, 16)), (min(sk, 16), min(sk, 48)), (max(0, sk - 5), sk)]:
            if n0 >= n1:
                continue
            rows = np.flatnonzero(mask[:, n0:n1].any(axis=1))
            qb, qe = ref._query_range(win, n0, n1)
            if rows.size:
                assert (qb, qe) == (rows[0], rows[-1] + 1), (window, n0, n1)
            else:
                assert qb >= qe, (window, n0, n1)


def test_window_none_zero_is_causal_bit_for_bit(seed):
    rng = _rng(seed)
    q, k, v = rng.standard_normal((2, 70, 16)), rng.standard_normal((2, 90, 16)), \
        rng.standard_normal((2, 90, 8))
    dout = rng.standard_normal((2, 70, 8))
    for sq in (70, 1):   # Sq < Sk; and one row
        qq, do = q[:, :sq], dout[:, :sq]
        for fwd, bwd in [(ref.attention_naive, ref.attention_backward_naive),
                         (ref.attention_tiled, ref.attention_backward_tiled)]:
            causal = fwd(qq, k, v, True)
            for window, c in [((None, 0), False), ((None, 0), True), ((None, 5), True),
                              ((None, None), True)]:
                win = fwd(qq, k, v, c, window=window)
                for a, b in zip(win, causal):
                    _same_bits(a, b)
                gc = bwd(do, qq, k, v, *causal, True)
                gw = bwd(do, qq, k, v, *causal, c, window=window)
                for a, b in zip(gw, gc):
                    _same_bits(a, b)
    # a window wider than both lengths is no window at all
    full = ref.attention_naive(q, k, v)
    for a, b in zip(ref.attention_naive(q, k, v, window=(200, 200)), full):
        _same_bits(a, b)


@pytest.mark.parametrize("window", WINDOWS[1:], ids=str)
@pytest.mark.parametrize("seqlens", [(17, 70), (70, 17), (64, 64)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_window_edges_tiled_matches_naive(window, seqlens, seed):
    sq, sk = seqlens
    rng = _rng(seed)
    q, k, v = rng.standard_normal((sq, 8)), rng.standard_normal((sk, 8)), \
        rng.standard_normal((sk, 4))
    dout = rng.standard_normal((sq, 4))
    for causal in (False, True):
        (out, lse, g), (out_t, lse_t, g_t) = _run_both(q, k, v, causal, {"window": window},
                                                       dout, (16, 16))
        _close(out_t, out)
        _close(lse_t, lse)
        for a, b in zip(g_t, g):
            _close(a, b)
        o_b, l_b = _brute(q, k, v, 1 / math.sqrt(8), causal, window)
        _close(out, o_b)
        _close(lse, l_b)


def test_window_work_is_proportional():
    """The tiled loops visit only the tiles of the band: (64, 0) at S = 1024 with
    64 x 64 tiles is 2 key tiles per query tile, 2 query tiles per key tile."""
    win = ref._Window(1024, 1024, 64, 0)
    key_tiles = [len(ref._tiles(*ref._key_range(win, m, m + 64), 64)) for m in range(0, 1024, 64)]
    query_tiles = [len(ref._tiles(*ref._query_range(win, n, n + 64), 64))
                   for n in range(0, 1024, 64)]
    assert key_tiles == [1] + [2] * 15
    assert query_tiles == [2] * 15 + [1]
    causal = ref._Window(1024, 1024, None, 0)
    assert sum(len(ref._tiles(*ref._key_range(causal, m, m + 64), 64))
               for m in range(0, 1024, 64)) == 16 * 17 // 2


# ----------------------------------------------------------------------------
# broadcasting: GQA with per-head slopes and sinks
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_gqa_per_head_slopes_and_sinks(causal, seed):
    """q (B, Hkv, G, S, D) against k/v (B, Hkv, 1, S, D); slopes (Hkv, G) and a
    sink (Hkv, G) per query head: the same as each head on its own, dsink summed
    over B."""
    rng = _rng(seed)
    B, Hkv, G, sq, sk = 2, 2, 3, 19, 33
    q = rng.standard_normal((B, Hkv, G, sq, 8))
    k = rng.standard_normal((B, Hkv, 1, sk, 8))
    v = rng.standard_normal((B, Hkv, 1, sk, 6))
    dout = rng.standard_normal((B, Hkv, G, sq, 6))
    slopes = rng.uniform(0.05, 0.5, (Hkv, G))
    sink = rng.normal(0, 1, (Hkv, G))
    kw = dict(window=(9, 4), softcap=1.5, alibi_slopes=slopes, sink=sink)
    out, lse = ref.attention_naive(q, k, v, causal, **kw)
    out_t, lse_t = ref.attention_tiled(q, k, v, causal, block_m=8, block_n=16, **kw)
    _close(out_t, out)
    _close(lse_t, lse)
    dq, dk, dv, dsink = ref.attention_backward_naive(dout, q, k, v, out, lse, causal, **kw)
    g_t = ref.attention_backward_tiled(dout, q, k, v, out, lse, causal, None, 8, 16, **kw)
    for a, b in zip(g_t, (dq, dk, dv, dsink)):
        _close(a, b)
    assert dsink.shape == (Hkv, G) and dk.shape == k.shape
    dk_want, dv_want, dsink_want = np.zeros_like(k), np.zeros_like(v), np.zeros_like(sink)
    for b, h, g in np.ndindex(B, Hkv, G):
        one = dict(window=(9, 4), softcap=1.5, alibi_slopes=slopes[h, g], sink=sink[h, g])
        o1, l1 = ref.attention_naive(q[b, h, g], k[b, h, 0], v[b, h, 0], causal, **one)
        _close(out[b, h, g], o1)
        _close(lse[b, h, g], l1)
        o_b, l_b = _brute(q[b, h, g], k[b, h, 0], v[b, h, 0], 1 / math.sqrt(8), causal,
                          (9, 4), 1.5, slopes[h, g], sink[h, g])
        _close(o1, o_b)
        _close(l1, l_b)
        g1 = ref.attention_backward_naive(dout[b, h, g], q[b, h, g], k[b, h, 0], v[b, h, 0],
                                          o1, l1, causal, **one)
        _close(dq[b, h, g], g1[0])
        dk_want[b, h, 0] += g1[1]
        dv_want[b, h, 0] += g1[2]
        dsink_want[h, g] += g1[3]
    _close(dk, dk_want)
    _close(dv, dv_want)
    _close(dsink, dsink_want)


# ----------------------------------------------------------------------------
# backward == central finite differences (float64), for each new term
# ----------------------------------------------------------------------------

FD_CASES = {
    "softcap": (False, {"softcap": 0.6}),
    "alibi": (False, {"alibi_slopes": np.array([0.3, 0.7])}),
    "window": (False, {"window": (1, 2)}),
    "window_causal": (True, {"window": (2, None)}),
    "sink": (False, {"sink": np.array([0.4, -0.3])}),
    "sink_causal": (True, {"sink": np.array([1.2])}),          # one sink broadcast to both
    "all": (True, {"window": (3, 1), "softcap": 0.9, "alibi_slopes": np.array([0.2, 0.5]),
                   "sink": np.array([0.1, 0.8])}),
}


def _fd_gradients(q, k, v, dout, causal, kw, scale, h=1e-6):
    """Central differences of sum(dout * out) w.r.t. q, k, v and the sink."""
    def loss(q_, k_, v_, sink_):
        kw_ = dict(kw, sink=sink_) if "sink" in kw else kw
        return float(np.sum(dout * ref.attention_naive(q_, k_, v_, causal, scale, **kw_)[0]))

    args = [q, k, v] + ([np.asarray(kw["sink"], float)] if "sink" in kw else [])
    if "sink" not in kw:
        args.append(None)
    grads = []
    for which in range(4 if "sink" in kw else 3):
        numeric = np.zeros_like(args[which])
        for idx in np.ndindex(*args[which].shape):
            plus = [a if a is None else a.copy() for a in args]
            minus = [a if a is None else a.copy() for a in args]
            plus[which][idx] += h
            minus[which][idx] -= h
            numeric[idx] = (loss(*plus) - loss(*minus)) / (2 * h)
        grads.append(numeric)
    return grads


def _fd_setup(seed, case):
    rng = _rng(seed)
    # Sq > Sk: a causal window leaves the first row empty; scores ~ N(0, 1.5^2)
    q = rng.standard_normal((2, 5, 3)) * 1.5
    k = rng.standard_normal((2, 4, 3))
    v = rng.standard_normal((2, 4, 2))
    dout = rng.standard_normal((2, 5, 2))
    causal, kw = FD_CASES[case]
    return q, k, v, dout, causal, kw, 0.8


@pytest.mark.parametrize("case", list(FD_CASES))
def test_backward_finite_differences(case, seed):
    q, k, v, dout, causal, kw, scale = _fd_setup(seed, case)
    out, lse = ref.attention_naive(q, k, v, causal, scale, **kw)
    analytic = ref.attention_backward_naive(dout, q, k, v, out, lse, causal, scale, **kw)
    tiled = ref.attention_backward_tiled(dout, q, k, v, out, lse, causal, scale, 2, 3, **kw)
    numeric = _fd_gradients(q, k, v, dout, causal, kw, scale)
    assert len(analytic) == len(numeric)
    for name, a, t, n in zip(("dq", "dk", "dv", "dsink"), analytic, tiled, numeric):
        assert a.shape == n.shape, name
        np.testing.assert_allclose(a, n, rtol=1e-6, atol=1e-7, err_msg=name)
        _close(t, a)


def test_finite_differences_catch_broken_gradients(seed, monkeypatch):
    """The checks above can fail: a backward without the softcap's 1 - tanh^2,
    and a dsink of the wrong sign, both miss the finite differences."""
    q, k, v, dout, causal, kw, scale = _fd_setup(seed, "all")
    out, lse = ref.attention_naive(q, k, v, causal, scale, **kw)
    numeric = _fd_gradients(q, k, v, dout, causal, kw, scale)
    good = ref.attention_backward_naive(dout, q, k, v, out, lse, causal, scale, **kw)
    np.testing.assert_allclose(good[0], numeric[0], rtol=1e-6, atol=1e-7)

    scores = ref._scores
    monkeypatch.setattr(ref, "_scores", lambda *a: (scores(*a)[0], None))  # drop tanh'
    no_tanh = ref.attention_backward_naive(dout, q, k, v, out, lse, causal, scale, **kw)
    monkeypatch.undo()
    assert np.abs(no_tanh[0] - numeric[0]).max() > 1e-2
    assert np.abs(no_tanh[1] - numeric[1]).max() > 1e-2
    # dsink of the wrong sign; and dsink with p_sink taken from the wrong lse
    assert np.abs(-good[3] - numeric[3]).max() > 1e-2
    lse_nosink = ref.attention_naive(q, k, v, causal, scale,
                                     **{a: b for a, b in kw.items() if a != "sink"})[1]
    p_sink = np.exp(kw["sink"][:, None] - np.where(np.isneginf(lse_nosink), np.inf, lse_nosink))
    wrong = -np.sum(p_sink * np.sum(dout * out, axis=-1), axis=-1)
    assert np.abs(wrong - numeric[3]).max() > 1e-3


# ----------------------------------------------------------------------------
# rows that see no key, known values
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("with_sink", [False, True], ids=["nosink", "sink"])
@pytest.mark.parametrize("case", [
    (9, 4, False, (0, 0)),       # rows 0..4 see nothing
    (9, 4, False, (2, 1)),       # rows 0..3
    (9, 4, True, (None, None)),  # causal: rows 0..4
    (9, 4, True, (3, 2)),        # causal wins over right = 2
    (6, 0, False, None),         # no keys at all
], ids=["w00", "w21", "causal", "causal_w32", "sk0"])
def test_empty_rows(case, with_sink, seed):
    """out 0, lse -inf (or exactly the sink), zero gradients, never NaN."""
    sq, sk, causal, window = case
    rng = _rng(seed)
    q, k, v = rng.standard_normal((2, sq, 8)), rng.standard_normal((2, sk, 8)), \
        rng.standard_normal((2, sk, 8))
    n = nv.empty_rows(sq, sk, causal, window)
    assert 0 < n < sq or sk == 0
    kw = dict(window=window, softcap=2.0, alibi_slopes=np.array([0.25, 0.5]))
    if with_sink:
        kw["sink"] = np.array([0.7, -1.1])
    for fwd, bwd in [(ref.attention_naive, ref.attention_backward_naive),
                     (ref.attention_tiled, ref.attention_backward_tiled)]:
        out, lse = fwd(q, k, v, causal, **kw)
        assert not np.isnan(out).any() and not np.isnan(lse).any()
        assert (out[:, :n] == 0).all()
        if with_sink:
            assert np.allclose(lse[:, :n], kw["sink"][:, None], rtol=0, atol=1e-15)
        else:
            assert np.isneginf(lse[:, :n]).all()
        assert np.isfinite(lse[:, n:]).all()
        grads = bwd(np.ones_like(out), q, k, v, out, lse, causal, **kw)
        assert len(grads) == (4 if with_sink else 3)
        assert not any(np.isnan(g).any() for g in grads)
        assert (grads[0][:, :n] == 0).all()
        if sk == 0:
            assert all((g == 0).all() for g in grads)


def test_known_values():
    rng = np.random.default_rng(3)
    q, k, v = rng.standard_normal((4, 6)), rng.standard_normal((9, 6)), \
        rng.standard_normal((9, 5))
    plain = ref.attention_naive(q, k, v)
    # sink = -inf is no sink; slope 0 is no ALiBi (bit for bit); a huge cap ~ none
    for a, b in zip(ref.attention_naive(q, k, v, sink=-np.inf), plain):
        _close(a, b, 0)
    for a, b in zip(ref.attention_tiled(q, k, v, sink=np.float64(-np.inf)), plain):
        _close(a, b)
    for a, b in zip(ref.attention_naive(q, k, v, alibi_slopes=0.0), plain):
        _same_bits(a, b)
    for a, b in zip(ref.attention_naive(q, k, v, softcap=1e9), plain):
        _close(a, b, 1e-12)
    # one key and a sink z: out = v * sigmoid(s - z), lse = logaddexp(s, z)
    s = 0.5 * q @ k[0]
    out, lse = ref.attention_naive(q, k[:1], v[:1], scale=0.5, sink=0.3)
    _close(out, v[0] * (1 / (1 + np.exp(0.3 - s)))[:, None])
    _close(lse, np.logaddexp(s, 0.3))
    # a softcap bounds every score: |lse - log(Sk)| <= c
    _, lse = ref.attention_naive(q * 50, k, v, softcap=0.25)
    assert (np.abs(lse - math.log(9)) <= 0.25 + 1e-12).all()
    # ALiBi: query i of Sq = Sk, key i is at distance 0, key 0 at distance i
    _, lse_a = ref.attention_naive(np.zeros((3, 2)), np.zeros((3, 2)), np.ones((3, 1)),
                                   alibi_slopes=1.0)
    want = [np.log(np.exp(-np.abs(i - np.arange(3))).sum()) for i in range(3)]
    _close(lse_a, np.array(want))


def test_dsink_formula(seed):
    """dsink = -sum_i exp(sink - lse_i) * delta_i, summed over broadcast axes."""
    rng = _rng(seed)
    q, k, v = rng.standard_normal((3, 2, 7, 4)), rng.standard_normal((3, 2, 11, 4)), \
        rng.standard_normal((3, 2, 11, 4))
    dout = rng.standard_normal((3, 2, 7, 4))
    sink = rng.standard_normal((2,))
    out, lse = ref.attention_naive(q, k, v, True, sink=sink, window=(3, None))
    *_, dsink = ref.attention_backward_naive(dout, q, k, v, out, lse, True, sink=sink,
                                             window=(3, None))
    want = -(np.exp(sink[:, None] - lse) * (dout * out).sum(-1)).sum(axis=(0, 2))
    _close(dsink, want)


# ----------------------------------------------------------------------------
# validation
# ----------------------------------------------------------------------------

def _call_all(q, k, v, **kw):
    """Calls each of the four references (backward with a dummy forward) with ``kw``."""
    out, lse = np.zeros((2, 3, 4)), np.zeros((2, 3))
    yield lambda: ref.attention_naive(q, k, v, **kw)
    yield lambda: ref.attention_tiled(q, k, v, **kw)
    yield lambda: ref.attention_backward_naive(out, q, k, v, out, lse, **kw)
    yield lambda: ref.attention_backward_tiled(out, q, k, v, out, lse, **kw)


@pytest.mark.parametrize("kw, exc, match", [
    ({"window": (1.5, 0)}, TypeError, "window left"),
    ({"window": (0, "2")}, TypeError, "window right"),
    ({"window": (True, 0)}, TypeError, "window left"),
    ({"window": 4}, TypeError, "window"),
    ({"window": (1, 2, 3)}, TypeError, "window"),
    ({"softcap": 0.0}, ValueError, "softcap"),
    ({"softcap": -1.0}, ValueError, "softcap"),
    ({"softcap": float("nan")}, ValueError, "softcap"),
    ({"softcap": float("inf")}, ValueError, "softcap"),
    ({"softcap": "5"}, TypeError, "softcap"),
    ({"softcap": True}, TypeError, "softcap"),
    ({"alibi_slopes": np.ones(3)}, ValueError, "alibi_slopes"),
    ({"alibi_slopes": np.ones((1, 2, 1))}, ValueError, "alibi_slopes"),
    ({"alibi_slopes": np.array(["a", "b"])}, TypeError, "alibi_slopes"),
    ({"sink": np.ones((2, 2))}, ValueError, "sink"),
    ({"sink": np.ones((3,))}, ValueError, "sink"),
], ids=lambda x: str(x) if not isinstance(x, dict) else ",".join(f"{a}={b!r}"[:30]
                                                                 for a, b in x.items()))
def test_validation_errors(kw, exc, match):
    q, k, v = np.zeros((2, 3, 4)), np.zeros((2, 5, 4)), np.zeros((2, 5, 4))
    for call in _call_all(q, k, v, **kw):
        with pytest.raises(exc, match=match):
            call()


def test_validation_accepts():
    q, k, v = np.zeros((2, 3, 4)), np.zeros((2, 5, 4)), np.zeros((2, 5, 4))
    for kw in [{"window": [np.int64(2), None]}, {"window": (0, 0)}, {"softcap": np.float32(3)},
               {"softcap": 2}, {"alibi_slopes": np.ones(2, np.float32)},
               {"alibi_slopes": 0.5}, {"sink": np.ones((2,), np.float32)},
               {"sink": np.ones((1,))}]:
        for call in _call_all(q, k, v, **kw):
            call()


# ----------------------------------------------------------------------------
# tests/_naive.py: the GPU tests' reference (float64) and allowance (in a dtype)
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("combo", COMBOS)
def test_naive_helper_float64_is_the_reference(combo, seed):
    rng = _rng(seed)
    q = rng.standard_normal((2, 1, 21, 16))
    k = rng.standard_normal((1, 3, 37, 16))
    v = rng.standard_normal((1, 3, 37, 8))
    dout = rng.standard_normal((2, 3, 21, 8))
    causal, kw = _variant(combo, (2, 3), seed, slopes_shape=(3,), sink_shape=(2, 1))
    kw32 = {a: (b.astype(np.float32) if isinstance(b, np.ndarray) else b) for a, b in kw.items()}
    out, lse = nv.attention(q, k, v, causal, **kw32)
    out_r, lse_r = ref.attention_naive(q, k, v, causal, **kw32)
    _close(out, out_r)
    _close(lse, lse_r)
    grads = nv.attention_backward(dout, q, k, v, causal, **kw32)
    grads_r = ref.attention_backward_naive(dout, q, k, v, out_r, lse_r, causal, **kw32)
    assert len(grads) == len(grads_r)
    for g, g_r in zip(grads, grads_r):
        _close(g, g_r)


def test_naive_helper_empty_axes_with_sink():
    q, k, v = np.zeros((2, 4, 8)), np.zeros((2, 0, 8)), np.zeros((2, 0, 8))
    sink = np.array([0.5, -2.0], np.float32)
    out, lse = nv.attention(q, k, v, sink=sink)
    assert (out == 0).all() and np.array_equal(lse, np.repeat(sink[:, None], 4, 1).astype(float))
    grads = nv.attention_backward(q[..., :8], q, k, v, sink=sink)
    assert len(grads) == 4 and grads[3].shape == (2,) and (grads[3] == 0).all()


@pytest.mark.parametrize("dtype", [nv.F16, nv.BF16, nv.F32], ids=lambda d: nv.DTYPE_IDS[d])
@pytest.mark.parametrize("combo", ["window", "softcap", "alibi", "sink", "causal+sink",
                                   "window+softcap", "alibi+sink",
                                   "causal+window+softcap+alibi+sink"])
def test_tolerance_rule_with_variants(dtype, combo, seed):
    """The rule of the GPU tests, per variant: an ideal kernel (the float64
    answer rounded once) passes, dsink included; a kernel that drops the
    variant fails."""
    sq, sk, d = 77, 130, 40
    q, k, v, dout = nv.randn_many(np, seed, [(2, 2, sq, d), (2, 1, sk, d), (2, 1, sk, d),
                                            (2, 2, sq, d)], dtype)
    causal, kw = _variant(combo, (2, 2), seed, slopes_shape=(2,), sink_shape=(2,),
                          sink_center=math.log(sk))
    kw = {a: (b.astype(np.float32) if isinstance(b, np.ndarray) else b) for a, b in kw.items()}
    out_r, lse_r = nv.attention(q, k, v, causal, dtype=np.float64, **kw)
    out_n, lse_n = nv.attention(q, k, v, causal, **kw)
    ideal_out, ideal_lse = nv.cast(out_r, dtype), lse_r.astype(np.float32)
    A.assert_close("out", ideal_out, out_r, out_n)
    A.assert_close("lse", ideal_lse, lse_r, lse_n)
    A.assert_empty_rows(sq, sk, causal, out=ideal_out, window=kw.get("window"))

    grads_r = nv.attention_backward(dout, q, k, v, causal, dtype=np.float64, **kw)
    grads_n = nv.attention_backward(dout, q, k, v, causal, **kw)
    assert len(grads_r) == len(grads_n) == (4 if "sink" in kw else 3)
    mag = max(float(np.abs(g).max()) for g in grads_r[:3])
    for name, g_r, g_n in zip(("dq", "dk", "dv"), grads_r, grads_n):
        A.assert_close(name, nv.cast(g_r, dtype), g_r, g_n, grad=True, magnitude=mag)
    if "sink" in kw:
        A.assert_close("dsink", grads_r[3].astype(np.float32), grads_r[3], grads_n[3], grad=True)

    # the variant dropped (each one in turn) is caught in out
    for drop in kw:
        rest = {a: b for a, b in kw.items() if a != drop}
        wrong, _ = nv.attention(q, k, v, causal, dtype=np.float64, **rest)
        with pytest.raises(AssertionError, match="max error"):
            A.assert_close("out", nv.cast(wrong, dtype), out_r, out_n)
    if "sink" in kw:   # a dsink of the wrong sign, or half of it, is caught
        for bad in (-grads_r[3], 0.5 * grads_r[3]):
            with pytest.raises(AssertionError, match="max error"):
                A.assert_close("dsink", bad.astype(np.float32), grads_r[3], grads_n[3],
                               grad=True)


@pytest.mark.parametrize("dtype", nv.DTYPES, ids=lambda d: nv.DTYPE_IDS[d])
def test_check_dsink_passes_ideal_and_fails_broken(dtype, seed):
    """_grid.check_dsink (the GPU tests' dsink check): the float64 formula on the
    backward's own (out, lse), rounded to float32, passes; a dsink off by 0.1 %,
    of the wrong sign, not summed over the broadcast axes, or of the wrong dtype
    fails."""
    import _grid as G

    q, k, v, dout = nv.randn_many(np, seed, [(2, 2, 60, 32), (2, 1, 90, 32), (2, 1, 90, 32),
                                            (2, 2, 60, 32)], dtype)
    sink = (math.log(90) + _rng(seed).standard_normal(2)).astype(np.float32)
    out_r, lse_r = nv.attention(q, k, v, True, dtype=np.float64, window=(20, None), sink=sink)
    out, lse = nv.cast(out_r, dtype), lse_r.astype(G.lse_dtype(dtype))
    want, mag = G.dsink_formula(dout, out, lse, sink, nv.F64)
    assert want.shape == sink.shape and (mag >= np.abs(want)).all()
    # the formula is the reference's dsink when out and lse are exact
    *_, dsink_exact = ref.attention_backward_naive(dout, q, k, v, out_r, lse_r, True,
                                                   window=(20, None), sink=sink)
    exact, _ = G.dsink_formula(dout, out_r, lse_r, sink, nv.F64)
    _close(exact, dsink_exact)
    G.check_dsink(want.astype(np.float32), dout, out, lse, sink, dtype)
    for bad in (want * 1.001, -want):
        with pytest.raises(AssertionError, match="max error"):
            G.check_dsink(bad.astype(np.float32), dout, out, lse, sink, dtype)
    with pytest.raises(AssertionError, match="shape"):
        G.check_dsink(np.zeros((2, 2), np.float32), dout, out, lse, sink, dtype)
    with pytest.raises(AssertionError, match="dtype"):
        G.check_dsink(want, dout, out, lse, sink, dtype)



@pytest.mark.parametrize("window", [(None, -2), (None, 3 - 7), (-2, None), (4, -1), (-1, 3),
                                    (None, -100), (-100, None)])
def test_negative_window_sides_are_a_shifted_band(window, seed):
    """A negative side is allowed: the band i + Sk - Sq - left <= j <= i + Sk - Sq + right
    off the diagonal, the same as the explicit boolean mask in every reference
    (forward and backward); (None, Sq - Sk) is the top-left causal mask."""
    rng = np.random.default_rng(seed)
    q, k, v = rng.standard_normal((2, 3, 8)), rng.standard_normal((2, 7, 8)), \
        rng.standard_normal((2, 7, 5))
    i, j = np.arange(3)[:, None], np.arange(7)[None, :]
    left, right = window
    m = np.ones((3, 7), bool)
    if left is not None:
        m &= j >= i + 4 - left
    if right is not None:
        m &= j <= i + 4 + right
    if window == (None, 3 - 7):
        assert np.array_equal(m, np.tril(np.ones((3, 7), bool)))  # top-left causal
    dout = rng.standard_normal((2, 3, 5))
    for fwd, bwd in ((ref.attention_naive, ref.attention_backward_naive),
                     (ref.attention_tiled, ref.attention_backward_tiled)):
        o_w, l_w = fwd(q, k, v, window=window)
        o_m, l_m = fwd(q, k, v, mask=m)
        np.testing.assert_allclose(o_w, o_m, rtol=1e-12, atol=1e-12)
        np.testing.assert_array_equal(np.isneginf(l_w), np.isneginf(l_m))
        np.testing.assert_allclose(l_w[np.isfinite(l_w)], l_m[np.isfinite(l_m)], rtol=1e-12)
        for gw, gm in zip(bwd(dout, q, k, v, o_w, l_w, window=window),
                          bwd(dout, q, k, v, o_m, l_m, mask=m)):
            np.testing.assert_allclose(gw, gm, rtol=1e-10, atol=1e-12)
