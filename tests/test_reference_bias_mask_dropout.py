"""CPU tests of the additive bias (and dbias), boolean masks and dropout in
flashcupy.reference, and of the Philox4x32-10 keep decision in flashcupy._philox.

No GPU needed.  The statements that meet here:

* ``_philox_scalar``: Philox4x32-10 in Python integers, one counter at a time,
  held to Random123's published known-answer vectors; ``flashcupy._philox``
  (vectorized NumPy) must give the same words, and its keep mask must follow
  the counter layout of its docstring bit for bit;
* ``_brute``: attention with bias, mask and a given keep matrix written out per
  (query, key) pair with Python scalars, the definition;
* the naive (whole score matrix) and the tiled (FlashAttention-2, per tile)
  references, which must agree with each other and, for the gradients, with
  central finite differences in float64 (dropout with a fixed seed is a fixed
  function).
"""
from __future__ import annotations

import math

import numpy as np
import pytest

from flashcupy import _philox as ph
from flashcupy import reference as ref

pytestmark = pytest.mark.filterwarnings("error")  # no overflow/invalid warnings anywhere

U32 = 0xFFFFFFFF


def _rng(seed):
    return np.random.default_rng(seed)


def _close(a, b, tol=1e-12):
    a, b = np.asarray(a), np.asarray(b)
    assert a.shape == b.shape, (a.shape, b.shape)
    assert np.array_equal(np.isneginf(a), np.isneginf(b))
    assert not np.isnan(a).any() and not np.isnan(b).any()
    fin = np.isfinite(b)
    np.testing.assert_allclose(a[fin], b[fin], rtol=tol, atol=tol)


def _same_bits(a, b):
    a, b = np.asarray(a), np.asarray(b)
    assert a.shape == b.shape and a.dtype == b.dtype
    assert np.array_equal(a.view(np.uint64), b.view(np.uint64))


# ----------------------------------------------------------------------------
# Philox4x32-10
# ----------------------------------------------------------------------------

def _philox_scalar(ctr, key):
    """Philox4x32-10 of one counter, in Python ints (Salmon et al., SC 2011)."""
    c0, c1, c2, c3 = ctr
    k0, k1 = key
    for _ in range(10):
        p0, p1 = 0xD2511F53 * c0, 0xCD9E8D57 * c2
        c0, c1, c2, c3 = (p1 >> 32) ^ c1 ^ k0, p1 & U32, (p0 >> 32) ^ c3 ^ k1, p0 & U32
        k0, k1 = (k0 + 0x9E3779B9) & U32, (k1 + 0xBB67AE85) & U32
    return c0, c1, c2, c3


# Random123's kat_vectors for philox4x32_10: (counter, key, result)
PHILOX_KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((U32,) * 4, (U32, U32), (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


@pytest.mark.parametrize("ctr, key, want", PHILOX_KAT, ids=["zero", "ones", "pi"])
def test_philox_known_answers(ctr, key, want):
    assert _philox_scalar(ctr, key) == want
    got = ph.philox4x32_10(ctr, key)
    assert all(w.dtype == np.uint32 and w.shape == () for w in got)
    assert tuple(int(w) for w in got) == want


def test_philox_known_answers_vectorized():
    """The three vectors as lanes of one call (arrays broadcast with a scalar word)."""
    ctr = [np.array([kat[0][w] for kat in PHILOX_KAT], np.uint32) for w in range(4)]
    key = [np.array([kat[1][w] for kat in PHILOX_KAT], np.uint32) for w in range(2)]
    got = np.stack(ph.philox4x32_10(ctr, key), axis=-1)
    assert got.tolist() == [list(kat[2]) for kat in PHILOX_KAT]
    # a counter word of the wrong lane count fails to broadcast; a word past 32 bits is refused
    with pytest.raises(ValueError):
        ph.philox4x32_10(ctr[:3] + [np.zeros(2, np.uint32)], key)
    with pytest.raises(ValueError, match="counter"):
        ph.philox4x32_10((2**32, 0, 0, 0), (0, 0))
    with pytest.raises(ValueError, match="key"):
        ph.philox4x32_10((0, 0, 0, 0), (0, -1))
    with pytest.raises(ValueError, match="4 counter words"):
        ph.philox4x32_10((0, 0, 0), (0, 0))


def test_philox_vectorized_matches_scalar(seed):
    rng = _rng(seed)
    ctr = rng.integers(0, 2**32, (4, 300), dtype=np.uint64).astype(np.uint32)
    key = rng.integers(0, 2**32, (2, 300), dtype=np.uint64).astype(np.uint32)
    got = np.stack(ph.philox4x32_10(list(ctr), list(key)), axis=-1)
    for n in range(300):
        want = _philox_scalar(tuple(int(c) for c in ctr[:, n]), (int(key[0, n]), int(key[1, n])))
        assert tuple(got[n].tolist()) == want, n


def test_dropout_threshold():
    rng = _rng(11)
    for p in [0.0, 0.5, 2.0**-17, 3 * 2.0**-18, 0.1, 1 - 2.0**-40, np.float32(0.3)] + list(
            rng.random(20)):
        t = ph.dropout_threshold(p)
        assert isinstance(t, int) and t == min(2**16 - 1, round(float(p) * 2**16)), p
    assert ph.dropout_threshold(0.0) == 0
    assert ph.dropout_threshold(1 - 2.0**-40) == 2**16 - 1


def _half(key, offset, bh, i, j):
    """The 16 bits of element (bh, i, j), written out from the documented layout."""
    word = _philox_scalar((4 * (j // 32) + (j // 2) % 4, i, bh, offset), key)[(j // 8) % 4]
    return (word >> (16 * (j % 2))) & 0xFFFF


def test_keep_mask_is_the_documented_counter_layout(seed):
    """Element (bh, i, j): counter (4 (j // 32) + (j // 2) % 4, i, bh, offset), key
    (seed lo, seed hi), word (j // 8) % 4, half j % 2, kept iff half >= threshold."""
    rng = _rng(seed)
    batch, sq, sk, p = (2, 3), 5, 70, 0.37
    key_seed = int(rng.integers(0, 2**63)) * 2 + 1
    offset = int(rng.integers(0, 2**32))
    keep = ph.keep_mask(key_seed, offset, batch, sq, sk, p)
    assert keep.shape == batch + (sq, sk) and keep.dtype == bool
    t = ph.dropout_threshold(p)
    key = (key_seed & U32, key_seed >> 32)
    for bh, b in enumerate(np.ndindex(*batch)):
        for i in range(sq):
            for j in range(sk):
                assert keep[b + (i, j)] == (_half(key, offset, bh, i, j) >= t), (b, i, j)
    # the 8 elements of one call are the ones a tensor-core lane holds in a row
    assert sorted(ph.counter_c0(np.arange(32)).tolist()) == sorted(list(range(4)) * 8)
    assert set(ph.counter_c0([8 * w + 2 * 3 + e for w in range(4) for e in (0, 1)])) == {3}
    # the edge: a half equal to the threshold is kept, one below it is dropped
    for b, i, j in [((0, 0), 0, 0), ((1, 2), 4, 69), ((1, 0), 3, 37)]:
        bh = int(np.ravel_multi_index(b, batch))
        h = _half(key, offset, bh, i, j)
        if 0 < h < 2**16 - 1:
            at = ph.keep_mask(key_seed, offset, batch, sq, sk, h / 2**16)
            above = ph.keep_mask(key_seed, offset, batch, sq, sk, (h + 1) / 2**16)
            assert ph.dropout_threshold(h / 2**16) == h
            assert at[b + (i, j)] and not above[b + (i, j)]


def test_keep_mask_tiles_are_slices_of_the_whole(seed):
    rng = _rng(seed)
    batch, sq, sk, p = (2, 3), 37, 53, 0.25
    s, off = int(rng.integers(0, 2**63)), int(rng.integers(0, 2**32))
    full = ph.keep_mask(s, off, batch, sq, sk, p)
    for m0, m1, n0, n1 in [(0, 16, 0, 16), (16, 32, 48, 53), (5, 6, 3, 10), (32, 37, 1, 2),
                           (0, 37, 0, 53), (9, 9, 0, 5)]:
        tile = ph.keep_mask(s, off, batch, sq, sk, p, rows=range(m0, m1), cols=range(n0, n1))
        assert tile.shape == batch + (m1 - m0, n1 - n0)
        assert np.array_equal(tile, full[..., m0:m1, n0:n1])
        sliced = ph.keep_mask(s, off, batch, sq, sk, p, slice(m0, m1), slice(n0, n1))
        assert np.array_equal(sliced, tile)
        for b in [(0, 0), (1, 2), (0, 1)]:
            one = ph.keep_mask(s, off, batch, sq, sk, p, range(m0, m1), range(n0, n1),
                               batch_index=b)
            assert np.array_equal(one, full[b][m0:m1, n0:n1])
            flat = int(np.ravel_multi_index(b, batch))
            one_flat = ph.keep_mask(s, off, batch, sq, sk, p, range(m0, m1), range(n0, n1),
                                    batch_index=flat)
            assert np.array_equal(one_flat, one)
    # arbitrary (unsorted, repeated) indices; the lengths bound the indices only
    rows, cols = rng.integers(0, sq, 9), rng.integers(0, sk, 11)
    picked = ph.keep_mask(s, off, batch, sq, sk, p, rows, cols)
    assert np.array_equal(picked, full[..., rows[:, None], cols[None, :]])
    longer = ph.keep_mask(s, off, batch, sq + 40, sk + 100, p, range(sq), range(sk))
    assert np.array_equal(longer, full)
    with pytest.raises(ValueError, match="rows"):
        ph.keep_mask(s, off, batch, sq, sk, p, rows=range(sq - 1, sq + 1))
    with pytest.raises(ValueError, match="cols"):
        ph.keep_mask(s, off, batch, sq, sk, p, cols=[-1])


@pytest.mark.parametrize("p", [0.0, 0.1, 0.5, 0.9])
def test_keep_rate(p, seed):
    """The kept fraction of 2**18 pairs is 1 - threshold / 2**16 within 5 standard
    deviations, overall and for each of the 8 (word, half) slots of a call
    (columns j % 8) and each counter c0 of a 32-column block (j % 32 // 2 % 4)."""
    keep = ph.keep_mask(seed, 3, (4,), 256, 256, p)
    rate = 1 - ph.dropout_threshold(p) / 2**16
    if p == 0:
        assert keep.all()
        return
    by_c0 = [keep[..., [j for j in range(256) if (j // 2) % 4 == t]] for t in range(4)]
    for sub in [keep] + [keep[..., r::8] for r in range(8)] + by_c0:
        sd = math.sqrt(rate * (1 - rate) / sub.size)
        assert abs(sub.mean() - rate) < 5 * sd, (p, sub.mean(), rate)
    # the largest accepted p keeps 1 % of the pairs
    top = ph.keep_mask(seed, 0, (4,), 256, 256, ph.MAX_DROPOUT_P)
    rate = 1 - ph.dropout_threshold(ph.MAX_DROPOUT_P) / 2**16
    assert abs(top.mean() - rate) < 5 * math.sqrt(rate * (1 - rate) / top.size)


def test_dropout_p_above_the_16_bit_resolution_is_refused():
    """Above MAX_DROPOUT_P the 16-bit keep rate is off 1 - p by more than 0.08 %
    of it (and 1 / (1 - p) grows past float16's range near 1): refused, named."""
    assert ph.check_dropout(ph.MAX_DROPOUT_P, 1, 0)[0] == ph.MAX_DROPOUT_P
    for p in (np.nextafter(ph.MAX_DROPOUT_P, 1.0), 0.999, 1 - 2.0**-20):
        with pytest.raises(ValueError, match="dropout_p must be <= 0.99"):
            ph.check_dropout(p, 1, 0)
    for p in (0.0, 0.1, 0.5, 0.99):   # the quantization error is within the stated bound
        t = ph.dropout_threshold(p)
        assert abs((1 - t / 2**16) - (1 - p)) <= 2.0**-17
        assert p == 0 or abs((1 - t / 2**16) / (1 - p) - 1) < 8e-4


def test_keep_mask_depends_on_seed_and_offset(seed):
    args = ((2, 2), 40, 40, 0.5)
    base = ph.keep_mask(seed, 7, *args)
    assert np.array_equal(base, ph.keep_mask(seed, 7, *args))
    for other in [ph.keep_mask(seed + 1, 7, *args),            # low key word
                  ph.keep_mask(seed + 2**32, 7, *args),        # high key word
                  ph.keep_mask(seed, 8, *args),                # offset
                  ph.keep_mask(seed ^ (1 << 63), 7, *args)]:
        # independent patterns differ in about half the pairs (2 p (1 - p))
        assert 0.4 < np.mean(base != other) < 0.6
    # batch elements, rows and column groups get different bits
    assert 0.4 < np.mean(base[0, 0] != base[1, 1]) < 0.6
    assert 0.4 < np.mean(base[..., :20, :] != base[..., 20:, :]) < 0.6
    assert 0.4 < np.mean(base[..., :20] != base[..., 20:]) < 0.6


# ----------------------------------------------------------------------------
# the definition, per pair, in Python scalars
# ----------------------------------------------------------------------------

def _brute(q, k, v, scale, *, causal=False, window=None, softcap=None, slope=None, sink=None,
           bias=None, mask=None, keep=None, dropout_p=0.0):
    """2-D q (Sq, D), k (Sk, D), v (Sk, Dv); (Sq, Sk) bias / mask / keep; scalar
    slope and sink.  Returns out, lse."""
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
            if mask is not None and not mask[i, j]:
                continue
            s = scale * float(np.dot(q[i], k[j]))
            if softcap is not None:
                s = softcap * math.tanh(s / softcap)
            if slope is not None:
                s -= slope * abs(i + diag - j)
            if bias is not None:
                s += float(bias[i, j])
            if s == -math.inf:
                continue
            logits.append(s)
            kept = 1.0 if keep is None else float(keep[i, j]) / (1 - dropout_p)
            values.append(v[j] * kept)
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
# problems: batch (B, H) = (2, 3), k / v broadcast over H
# ----------------------------------------------------------------------------

B, H, D, DV = 2, 3, 8, 5
SINGLES = {
    "causal": {"causal": True},
    "window": {"window": (20, 7)},
    "softcap": {"softcap": 0.8},
    "alibi": {"alibi_slopes": True},
    "sink": {"sink": True},
}
COMBOS = ["none"] + list(SINGLES) + ["causal+softcap+alibi+sink", "window+softcap+alibi+sink"]


def _variant_kw(name, seed, batch=(B, H)):
    """(causal, keywords) of a combination name, random slopes (H,) and sinks (B, H)."""
    kw = {}
    if name != "none":
        for part in name.split("+"):
            kw.update(SINGLES[part])
    causal = kw.pop("causal", False)
    rng = _rng(seed + 7)
    if kw.get("alibi_slopes"):
        kw["alibi_slopes"] = rng.uniform(0.01, 0.1, batch[-1:])
    if kw.get("sink"):
        kw["sink"] = rng.normal(0.5, 1.5, batch)
    return causal, kw


def _problem(seed, sq, sk):
    rng = _rng(seed)
    q = rng.standard_normal((B, H, sq, D))
    k = rng.standard_normal((B, 1, sk, D))
    v = rng.standard_normal((B, 1, sk, DV))
    dout = rng.standard_normal((B, H, sq, DV))
    return q, k, v, dout


def _random_bias(rng, shape, neginf=0.05):
    bias = rng.normal(0.0, 1.5, shape)
    if neginf:
        bias[rng.random(shape) < neginf] = -np.inf
    return bias


def _run_both(q, k, v, dout, causal, kw, blocks, bias_grad=False):
    """Naive and tiled, forward and backward: ((out, lse, grads), (out, lse, grads))."""
    out, lse = ref.attention_naive(q, k, v, causal, **kw)
    out_t, lse_t = ref.attention_tiled(q, k, v, causal, block_m=blocks[0], block_n=blocks[1],
                                       **kw)
    g = ref.attention_backward_naive(dout, q, k, v, out, lse, causal, bias_grad=bias_grad, **kw)
    g_t = ref.attention_backward_tiled(dout, q, k, v, out, lse, causal, None, *blocks,
                                       bias_grad=bias_grad, **kw)
    return (out, lse, g), (out_t, lse_t, g_t)


def _check_both(q, k, v, dout, causal, kw, blocks=(16, 16), bias_grad=False):
    (out, lse, g), (out_t, lse_t, g_t) = _run_both(q, k, v, dout, causal, kw, blocks, bias_grad)
    _close(out_t, out)
    _close(lse_t, lse)
    inputs = [q, k, v] + (["sink"] if "sink" in kw else []) + (["bias"] if bias_grad else [])
    assert len(g) == len(g_t) == len(inputs)
    for x, a, b in zip(inputs, g_t, g):
        want_shape = np.shape(kw[x]) if isinstance(x, str) else x.shape
        assert a.shape == b.shape == want_shape and a.dtype == b.dtype == np.float64
        _close(a, b)
    return out, lse, g


BIAS_SHAPES = {
    "BHqk": lambda sq, sk: (B, H, sq, sk),
    "1Hqk": lambda sq, sk: (1, H, sq, sk),
    "B1qk": lambda sq, sk: (B, 1, sq, sk),
    "B11k": lambda sq, sk: (B, 1, 1, sk),
    "qk": lambda sq, sk: (sq, sk),
    "H1k": lambda sq, sk: (H, 1, sk),
    "Hq1": lambda sq, sk: (H, sq, 1),
}


def _lengths(*names):
    """(37, 53) or (53, 37) (Sq > Sk: causal rows without keys), alternating over
    the parameter grid so that each shape and each variant meets both."""
    return (37, 53) if sum(map(len, names)) % 2 else (53, 37)


@pytest.mark.parametrize("combo", COMBOS)
@pytest.mark.parametrize("bias_shape", list(BIAS_SHAPES))
def test_bias_tiled_matches_naive(bias_shape, combo, seed):
    sq, sk = _lengths(bias_shape, combo)
    q, k, v, dout = _problem(seed, sq, sk)
    causal, kw = _variant_kw(combo, seed)
    kw["bias"] = _random_bias(_rng(seed + 1), BIAS_SHAPES[bias_shape](sq, sk))
    out, lse, g = _check_both(q, k, v, dout, causal, kw, bias_grad=True)
    # the bias matters: without it the output differs (a bias constant along
    # each row only through its -inf entries and the sink: softmax is shift-invariant)
    no_bias = ref.attention_naive(q, k, v, causal, **{a: b for a, b in kw.items() if a != "bias"})
    assert np.abs(no_bias[0] - out).max() > 1e-3
    if bias_shape != "Hq1" or "sink" in kw:
        assert np.abs(g[-1]).max() > 1e-3


MASK_SHAPES = {
    "BHqk": lambda sq, sk: (B, H, sq, sk),
    "qk": lambda sq, sk: (sq, sk),
    "B11k": lambda sq, sk: (B, 1, 1, sk),
    "1Hq1": lambda sq, sk: (1, H, sq, 1),     # whole rows on or off per head
    "Hqk": lambda sq, sk: (H, sq, sk),
}


def _random_mask(rng, shape, p_true=0.7):
    mask = rng.random(shape) < p_true
    if shape[-1] > 1 and shape[-2] > 3:
        mask[..., 3, :] = False                   # a row with no pair at all
    return mask


@pytest.mark.parametrize("combo", COMBOS)
@pytest.mark.parametrize("mask_shape", list(MASK_SHAPES))
def test_mask_tiled_matches_naive(mask_shape, combo, seed):
    """Masks of several broadcast shapes, with dead rows; dropout on in every
    other case (the grid of dropout with each variant is the next test's)."""
    sq, sk = _lengths(mask_shape, combo)
    dropout = (COMBOS.index(combo) + list(MASK_SHAPES).index(mask_shape)) % 2 == 1
    q, k, v, dout = _problem(seed, sq, sk)
    causal, kw = _variant_kw(combo, seed)
    kw["mask"] = mask = _random_mask(_rng(seed + 2), MASK_SHAPES[mask_shape](sq, sk))
    if mask.shape[-2] == 1:
        mask[(0,) * (mask.ndim - 1)] = False      # every row of one batch element dead
    if dropout:
        kw.update(dropout_p=0.3, seed=seed * 7919 + 2**40, offset=seed % 1000)
    out, lse, g = _check_both(q, k, v, dout, causal, kw, blocks=(16, 16))
    full = np.broadcast_to(kw["mask"], (B, H, sq, sk))
    dead = ~full.any(axis=-1)
    assert dead.any()
    assert (out[dead] == 0).all() and (g[0][dead] == 0).all()
    if "sink" in kw:
        _close(lse[dead], np.broadcast_to(kw["sink"][..., None], dead.shape)[dead])
    else:
        assert np.isneginf(lse[dead]).all()


@pytest.mark.parametrize("seqlens", [(37, 53), (53, 37), (1, 9)],
                         ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("combo", COMBOS)
def test_dropout_bias_mask_tiled_matches_naive(combo, seqlens, seed):
    sq, sk = seqlens
    q, k, v, dout = _problem(seed, sq, sk)
    causal, kw = _variant_kw(combo, seed)
    rng = _rng(seed + 3)
    kw.update(bias=_random_bias(rng, (H, 1, sk)), mask=_random_mask(rng, (B, 1, sq, sk), 0.85),
              dropout_p=0.2, seed=int(rng.integers(0, 2**63)) * 2, offset=int(rng.integers(2**32)))
    out, _, g = _check_both(q, k, v, dout, causal, kw, blocks=(16, 16), bias_grad=True)
    # dropout matters: the dropout-free output differs
    no_drop = ref.attention_naive(q, k, v, causal,
                                  **{a: b for a, b in kw.items() if a not in ("dropout_p", "seed")})
    assert np.abs(no_drop[0] - out).max() > 1e-3


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_gqa_bias_mask_dropout(causal, seed):
    """q (B, Hkv, G, S, D) against k/v (B, Hkv, 1, S, D), bias (Hkv, G, Sq, Sk),
    mask (B, 1, 1, Sq, Sk), per-head slopes and sinks, dropout over the
    broadcast batch (B, Hkv, G): tiled == naive, each head against the per-pair
    definition with its slice of the keep mask, and dbias summed over B."""
    rng = _rng(seed)
    b_, hkv, g_, sq, sk = 2, 2, 3, 19, 33
    q = rng.standard_normal((b_, hkv, g_, sq, 8))
    k = rng.standard_normal((b_, hkv, 1, sk, 8))
    v = rng.standard_normal((b_, hkv, 1, sk, 6))
    dout = rng.standard_normal((b_, hkv, g_, sq, 6))
    kw = dict(window=(9, 4), softcap=1.5, alibi_slopes=rng.uniform(0.05, 0.5, (hkv, g_)),
              sink=rng.normal(0, 1, (hkv, g_)), bias=_random_bias(rng, (hkv, g_, sq, sk)),
              mask=rng.random((b_, 1, 1, sq, sk)) < 0.8, dropout_p=0.25, seed=seed, offset=5)
    out, lse = ref.attention_naive(q, k, v, causal, **kw)
    out_t, lse_t = ref.attention_tiled(q, k, v, causal, block_m=8, block_n=16, **kw)
    _close(out_t, out)
    _close(lse_t, lse)
    g = ref.attention_backward_naive(dout, q, k, v, out, lse, causal, bias_grad=True, **kw)
    g_t = ref.attention_backward_tiled(dout, q, k, v, out, lse, causal, None, 8, 16,
                                       bias_grad=True, **kw)
    assert [x.shape for x in g] == [q.shape, k.shape, v.shape, (hkv, g_), (hkv, g_, sq, sk)]
    for a, b in zip(g_t, g):
        _close(a, b)
    keep = ph.keep_mask(seed, 5, (b_, hkv, g_), sq, sk, 0.25)
    for b, h, gg in np.ndindex(b_, hkv, g_):
        o_b, l_b = _brute(q[b, h, gg], k[b, h, 0], v[b, h, 0], 1 / math.sqrt(8), causal=causal,
                          window=(9, 4), softcap=1.5, slope=kw["alibi_slopes"][h, gg],
                          sink=kw["sink"][h, gg], bias=kw["bias"][h, gg], mask=kw["mask"][b, 0, 0],
                          keep=keep[b, h, gg], dropout_p=0.25)
        _close(out[b, h, gg], o_b)
        _close(lse[b, h, gg], l_b)
    # without dropout each head is its own problem; dk / dv / dbias sum over the group / batch
    nodrop = {a: b for a, b in kw.items() if a not in ("dropout_p", "seed", "offset")}
    out, lse = ref.attention_naive(q, k, v, causal, **nodrop)
    dq, dk, dv, _, dbias = ref.attention_backward_naive(dout, q, k, v, out, lse, causal,
                                                        bias_grad=True, **nodrop)
    dk_w, dv_w, dbias_w = np.zeros_like(k), np.zeros_like(v), np.zeros_like(kw["bias"])
    for b, h, gg in np.ndindex(b_, hkv, g_):
        one = dict(window=(9, 4), softcap=1.5, alibi_slopes=kw["alibi_slopes"][h, gg],
                   sink=kw["sink"][h, gg], bias=kw["bias"][h, gg], mask=kw["mask"][b, 0, 0])
        o1, l1 = ref.attention_naive(q[b, h, gg], k[b, h, 0], v[b, h, 0], causal, **one)
        _close(out[b, h, gg], o1)
        g1 = ref.attention_backward_naive(dout[b, h, gg], q[b, h, gg], k[b, h, 0], v[b, h, 0],
                                          o1, l1, causal, bias_grad=True, **one)
        _close(dq[b, h, gg], g1[0])
        dk_w[b, h, 0] += g1[1]
        dv_w[b, h, 0] += g1[2]
        dbias_w[h, gg] += g1[4]
    _close(dk, dk_w)
    _close(dv, dv_w)
    _close(dbias, dbias_w)


@pytest.mark.parametrize("combo", COMBOS)
def test_naive_matches_definition(combo, seed):
    """attention_naive with bias (-inf entries), mask and dropout against the
    per-pair definition, element by element."""
    rng = _rng(seed)
    q, k, v = rng.standard_normal((2, 13, 8)), rng.standard_normal((2, 29, 8)), \
        rng.standard_normal((2, 29, 5))
    causal, kw = _variant_kw(combo, seed, batch=(2,))
    bias = _random_bias(rng, (2, 13, 29), 0.1)
    mask = _random_mask(rng, (13, 29), 0.8)
    for drop in (0.0, 0.4):
        extra = dict(bias=bias, mask=mask, dropout_p=drop, seed=seed if drop else None)
        out, lse = ref.attention_naive(q, k, v, causal, 0.45, **kw, **extra)
        keep = ph.keep_mask(seed, 0, (2,), 13, 29, drop) if drop else None
        for b in range(2):
            o_b, l_b = _brute(q[b], k[b], v[b], 0.45, causal=causal, window=kw.get("window"),
                              softcap=kw.get("softcap"),
                              slope=None if "alibi_slopes" not in kw else kw["alibi_slopes"][b],
                              sink=None if "sink" not in kw else kw["sink"][b], bias=bias[b],
                              mask=mask, keep=None if keep is None else keep[b], dropout_p=drop)
            _close(out[b], o_b)
            _close(lse[b], l_b)


# ----------------------------------------------------------------------------
# backward == central finite differences (float64)
# ----------------------------------------------------------------------------

FD_VARIANTS = {
    "plain": (False, {}),
    "all": (True, {"window": (3, 1), "softcap": 0.9, "alibi_slopes": np.array([0.2, 0.5]),
                   "sink": np.array([[0.1, 0.8], [-0.4, 0.3]])}),
}


def _fd_setup(seed, bias_shape, variant="all", dropout=True):
    rng = _rng(seed)
    q = rng.standard_normal((2, 2, 5, 3)) * 1.5     # Sq > Sk: the causal window empties row 0
    k = rng.standard_normal((2, 1, 4, 3))
    v = rng.standard_normal((2, 1, 4, 2))
    dout = rng.standard_normal((2, 2, 5, 2))
    causal, kw = FD_VARIANTS[variant]
    kw = dict(kw, bias=_random_bias(rng, bias_shape, 0.08) if bias_shape else np.float64(0.7),
              mask=rng.random((2, 1, 5, 4)) < 0.85)
    if dropout:
        kw.update(dropout_p=0.3, seed=seed, offset=1)
    return q, k, v, dout, causal, kw, 0.8


def _fd(loss, x, h=1e-6):
    """Central differences of ``loss`` with respect to each entry of ``x`` (in place)."""
    grad = np.zeros_like(x)
    for idx in np.ndindex(*x.shape):
        keep = x[idx]
        x[idx] = keep + h
        plus = loss()
        x[idx] = keep - h
        minus = loss()
        x[idx] = keep
        grad[idx] = 0.0 if not np.isfinite(keep) else (plus - minus) / (2 * h)
    return grad


def _loss(q, k, v, dout, causal, kw, scale):
    return lambda: float(np.sum(dout * ref.attention_naive(q, k, v, causal, scale, **kw)[0]))


@pytest.mark.parametrize("variant", list(FD_VARIANTS))
@pytest.mark.parametrize("bias_shape", [(2, 2, 5, 4), (2, 1, 1, 4), (5, 4), (2, 5, 1), ()],
                         ids=["full", "B11k", "qk", "Hq1", "scalar"])
def test_dbias_finite_differences(bias_shape, variant, seed):
    q, k, v, dout, causal, kw, scale = _fd_setup(seed, bias_shape, variant)
    out, lse = ref.attention_naive(q, k, v, causal, scale, **kw)
    *_, dbias = ref.attention_backward_naive(dout, q, k, v, out, lse, causal, scale,
                                             bias_grad=True, **kw)
    *_, dbias_t = ref.attention_backward_tiled(dout, q, k, v, out, lse, causal, scale, 2, 3,
                                               bias_grad=True, **kw)
    bias = np.array(kw["bias"], dtype=np.float64)
    kw = dict(kw, bias=bias)
    numeric = _fd(_loss(q, k, v, dout, causal, kw, scale), bias)
    assert dbias.shape == np.shape(bias) and dbias.dtype == np.float64
    np.testing.assert_allclose(dbias, numeric, rtol=1e-6, atol=1e-7)
    _close(dbias_t, dbias)
    if bias_shape[-1:] == (4,) or "sink" in kw:   # else shift invariance: dbias = 0
        assert np.abs(numeric).max() > 1e-2
    if np.isneginf(bias).any():
        assert (dbias[np.isneginf(bias)] == 0).all()


@pytest.mark.parametrize("dropout", [False, True], ids=["nodrop", "drop"])
@pytest.mark.parametrize("variant", list(FD_VARIANTS))
def test_qkv_finite_differences(variant, dropout, seed):
    """dq, dk, dv (and dsink) with bias (-inf entries) + mask + dropout."""
    q, k, v, dout, causal, kw, scale = _fd_setup(seed, (2, 2, 5, 4), variant, dropout)
    out, lse = ref.attention_naive(q, k, v, causal, scale, **kw)
    analytic = ref.attention_backward_naive(dout, q, k, v, out, lse, causal, scale, **kw)
    tiled = ref.attention_backward_tiled(dout, q, k, v, out, lse, causal, scale, 2, 3, **kw)
    q, k, v = q.copy(), k.copy(), v.copy()
    params = [q, k, v]
    if "sink" in kw:
        kw = dict(kw, sink=kw["sink"].copy())
        params.append(kw["sink"])
    loss = _loss(q, k, v, dout, causal, kw, scale)
    assert len(analytic) == len(params)
    for name, a, t, x in zip(("dq", "dk", "dv", "dsink"), analytic, tiled, params):
        numeric = _fd(loss, x)
        np.testing.assert_allclose(a, numeric, rtol=1e-6, atol=1e-7, err_msg=name)
        _close(t, a)


def test_finite_differences_catch_broken_gradients(seed):
    """The checks above can fail: dbias with the softcap's 1 - tanh^2 applied,
    and a backward that ignores the dropout (no keep bits, no 1 / (1 - p)),
    both miss the finite differences."""
    q, k, v, dout, causal, kw, scale = _fd_setup(seed, (2, 2, 5, 4))
    out, lse = ref.attention_naive(q, k, v, causal, scale, **kw)
    dq, dk, dv, _, dbias = ref.attention_backward_naive(dout, q, k, v, out, lse, causal, scale,
                                                        bias_grad=True, **kw)
    bias = kw["bias"].copy()
    numeric = _fd(_loss(q, k, v, dout, causal, dict(kw, bias=bias), scale), bias)
    np.testing.assert_allclose(dbias, numeric, rtol=1e-6, atol=1e-7)
    t = np.tanh(scale * (q @ np.swapaxes(k, -1, -2)) / kw["softcap"])
    assert np.abs(dbias * (1 - t * t) - numeric).max() > 1e-3
    nodrop = {a: b for a, b in kw.items() if a not in ("dropout_p", "seed", "offset")}
    wrong = ref.attention_backward_naive(dout, q, k, v, out, lse, causal, scale, **nodrop)
    v2 = v.copy()
    numeric_dv = _fd(_loss(q, k, v2, dout, causal, kw, scale), v2)
    np.testing.assert_allclose(dv, numeric_dv, rtol=1e-6, atol=1e-7)
    assert np.abs(wrong[2] - numeric_dv).max() > 1e-2


# ----------------------------------------------------------------------------
# rows without pairs, mask == -inf bias, dbias and the broadcast
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("with_sink", [False, True], ids=["nosink", "sink"])
@pytest.mark.parametrize("how", ["mask", "neginf_bias", "both"])
def test_rows_without_pairs(how, with_sink, seed):
    """Rows masked (or -inf biased) entirely: out 0, lse -inf (the sink with one),
    zero dq rows, no contribution to dk / dv / dbias, never NaN."""
    rng = _rng(seed)
    q, k, v, dout = _problem(seed, 21, 30)
    dead_rows = [0, 5, 20]
    mask = rng.random((B, H, 21, 30)) < 0.7
    bias = rng.normal(0, 1, (B, H, 21, 30))
    if how in ("mask", "both"):
        mask[:, :, dead_rows] = False
    if how in ("neginf_bias", "both"):
        bias[:, :, dead_rows] = -np.inf
    kw = dict(bias=bias, mask=mask, softcap=2.0, alibi_slopes=np.array([0.1, 0.2, 0.3]),
              dropout_p=0.15, seed=seed)
    if with_sink:
        kw["sink"] = rng.normal(0, 1, (B, H))
    tiled = dict(block_m=8, block_n=8)
    for fwd, bwd in [(ref.attention_naive, ref.attention_backward_naive),
                     (lambda *a, **kw_: ref.attention_tiled(*a, **tiled, **kw_),
                      lambda *a, **kw_: ref.attention_backward_tiled(*a, **tiled, **kw_))]:
        out, lse = fwd(q, k, v, **kw)
        assert not np.isnan(out).any() and not np.isnan(lse).any()
        assert (out[:, :, dead_rows] == 0).all()
        if with_sink:
            _close(lse[:, :, dead_rows], np.repeat(kw["sink"][..., None], 3, axis=-1), 1e-15)
        else:
            assert np.isneginf(lse[:, :, dead_rows]).all()
        live = np.setdiff1d(np.arange(21), dead_rows)
        assert np.isfinite(lse[:, :, live]).all()
        grads = bwd(dout, q, k, v, out, lse, bias_grad=True, **kw)
        assert not any(np.isnan(g).any() for g in grads)
        assert (grads[0][:, :, dead_rows] == 0).all() and (grads[-1][:, :, dead_rows] == 0).all()
        # dk, dv as if the dead rows were not there at all (their dout changed)
        dout2 = dout.copy()
        dout2[:, :, dead_rows] = rng.standard_normal(dout2[:, :, dead_rows].shape)
        grads2 = bwd(dout2, q, k, v, out, lse, bias_grad=True, **kw)
        for g, g2 in zip(grads[1:3], grads2[1:3]):
            _close(g, g2, 1e-13)


def test_mask_is_a_neginf_bias_bit_for_bit(seed):
    """mask M and bias where(M, 0, -inf) give the same bits, forward and backward,
    naive and tiled (with softcap, ALiBi, a sink and dropout on top)."""
    rng = _rng(seed)
    q, k, v, dout = _problem(seed, 37, 53)
    mask = _random_mask(rng, (B, 1, 37, 53))
    bias = np.where(mask, 0.0, -np.inf)
    base = dict(softcap=0.8, alibi_slopes=rng.uniform(0.01, 0.1, (H,)),
                sink=rng.normal(0, 1, (B, H)), dropout_p=0.2, seed=seed, offset=3)
    for fwd, bwd, blocks in [(ref.attention_naive, ref.attention_backward_naive, {}),
                             (ref.attention_tiled, ref.attention_backward_tiled,
                              {"block_m": 16, "block_n": 16})]:
        a = fwd(q, k, v, True, mask=mask, **base, **blocks)
        b = fwd(q, k, v, True, bias=bias, **base, **blocks)
        for x, y in zip(a, b):
            _same_bits(x, y)
        ga = bwd(dout, q, k, v, *a, True, mask=mask, **base, **blocks)
        gb = bwd(dout, q, k, v, *b, True, bias=bias, **base, **blocks)
        assert len(ga) == len(gb) == 4
        for x, y in zip(ga, gb):
            _same_bits(x, y)
    # and the mask does change the result
    free = ref.attention_naive(q, k, v, True, **base)
    assert np.abs(free[0] - ref.attention_naive(q, k, v, True, mask=mask, **base)[0]).max() > 1e-3


def test_dbias_of_a_broadcast_bias_is_the_full_dbias_summed(seed):
    q, k, v, dout = _problem(seed, 23, 31)
    rng = _rng(seed + 5)
    kw = dict(window=(10, 3), mask=_random_mask(rng, (23, 31), 0.9), dropout_p=0.1, seed=seed)
    small = rng.normal(0, 1, (H, 1, 31))
    full = np.broadcast_to(small, (B, H, 23, 31)).copy()
    out, lse = ref.attention_naive(q, k, v, bias=small, **kw)
    out_f, lse_f = ref.attention_naive(q, k, v, bias=full, **kw)
    _close(out, out_f, 1e-14)
    g = ref.attention_backward_naive(dout, q, k, v, out, lse, bias=small, bias_grad=True, **kw)
    g_f = ref.attention_backward_naive(dout, q, k, v, out, lse, bias=full, bias_grad=True, **kw)
    assert g[-1].shape == (H, 1, 31) and g_f[-1].shape == (B, H, 23, 31)
    _close(g[-1], g_f[-1].sum(axis=(0, 2))[:, None, :])
    for a, b in zip(g[:3], g_f[:3]):
        _close(a, b)
    # without bias_grad no dbias; the other gradients are the same bits
    g0 = ref.attention_backward_naive(dout, q, k, v, out, lse, bias=small, **kw)
    assert len(g0) == 3
    for a, b in zip(g0, g[:3]):
        _same_bits(a, b)


def test_low_precision_bias_is_converted_to_float64(seed):
    import ml_dtypes

    q, k, v, dout = _problem(seed, 9, 12)
    rng = _rng(seed + 9)
    for dtype in (np.float16, np.float32, ml_dtypes.bfloat16):
        bias = rng.normal(0, 1, (9, 12)).astype(dtype)
        for fwd in (ref.attention_naive, ref.attention_tiled):
            for x, y in zip(fwd(q, k, v, bias=bias), fwd(q, k, v, bias=bias.astype(np.float64))):
                _same_bits(x, y)
        out, lse = ref.attention_naive(q, k, v, bias=bias)
        *_, dbias = ref.attention_backward_tiled(dout, q, k, v, out, lse, bias=bias,
                                                 bias_grad=True)
        assert dbias.dtype == np.float64 and dbias.shape == (9, 12)
    # a list of floats and a nested list of bools are accepted
    lst = rng.normal(0, 1, (9, 12)).tolist()
    _same_bits(ref.attention_naive(q, k, v, bias=lst)[0],
               ref.attention_naive(q, k, v, bias=np.array(lst))[0])
    m = (rng.random((9, 12)) < 0.5).tolist()
    _same_bits(ref.attention_naive(q, k, v, mask=m)[0],
               ref.attention_naive(q, k, v, mask=np.array(m))[0])


# ----------------------------------------------------------------------------
# dropout: statistics and determinism
# ----------------------------------------------------------------------------

def test_dropout_mean_over_seeds(seed):
    """Over N seeds the mean output is the dropout-free output: each element
    within 5 standard errors sqrt(Var / N), with Var the exact variance of one
    draw (independent keeps: sum_j (p_ij v_jd)^2 q (1 - q) / (1 - p)^2, q = keep
    probability).  The same mean without the 1 / (1 - p) rescale fails."""
    rng = _rng(seed)
    q, k, v = rng.standard_normal((2, 8, 8)), rng.standard_normal((2, 16, 8)), \
        rng.standard_normal((2, 16, 4))
    p, n = 0.3, 1000
    kw = dict(window=(6, 2), bias=rng.normal(0, 0.5, (8, 16)))
    want, _ = ref.attention_naive(q, k, v, **kw)
    draws = np.stack([ref.attention_naive(q, k, v, **kw, dropout_p=p, seed=s, offset=s % 3)[0]
                      for s in range(seed, seed + n)])
    keep_q = 1 - ph.dropout_threshold(p) / 2**16
    probs, _ = ref.attention_naive(q, k, np.eye(16), **kw)     # out with V = I is P
    var = (probs**2) @ (v**2) * keep_q * (1 - keep_q) / (1 - p) ** 2
    stderr = np.sqrt(var / n)
    assert (stderr > 0).all()
    mean = draws.mean(axis=0)
    assert (np.abs(mean - want) <= 5 * stderr + 1e-12).all(), np.abs(mean - want).max()
    assert (np.abs(mean * (1 - p) - want) > 5 * stderr).any()
    # the draws do vary, by about the predicted spread
    spread = draws.std(axis=0) / np.sqrt(var)
    assert 0.8 < spread.mean() < 1.2, spread.mean()


def test_dropout_determinism_and_lse(seed):
    q, k, v, dout = _problem(seed, 20, 28)
    kw = dict(causal=True, softcap=1.0, sink=np.ones((B, H)))
    plain_out, plain_lse = ref.attention_naive(q, k, v, **kw)
    out, lse = ref.attention_naive(q, k, v, **kw, dropout_p=0.5, seed=seed, offset=2)
    _same_bits(lse, plain_lse)                     # dropout does not touch the LSE
    for again in (ref.attention_naive(q, k, v, **kw, dropout_p=0.5, seed=seed, offset=2),):
        _same_bits(again[0], out)
    for other in (dict(seed=seed + 1, offset=2), dict(seed=seed, offset=3),
                  dict(seed=seed + 2**40, offset=2)):
        assert np.abs(ref.attention_naive(q, k, v, **kw, dropout_p=0.5, **other)[0]
                      - out).max() > 1e-3
    assert np.abs(out - plain_out).max() > 1e-3
    # dropout_p = 0 is off, with or without a seed, bit for bit
    for extra in (dict(dropout_p=0.0, seed=seed), dict(dropout_p=0, seed=None), {}):
        for x, y in zip(ref.attention_tiled(q, k, v, **kw, **extra),
                        ref.attention_tiled(q, k, v, **kw)):
            _same_bits(x, y)
    g0 = ref.attention_backward_naive(dout, q, k, v, plain_out, plain_lse, **kw)
    g1 = ref.attention_backward_naive(dout, q, k, v, plain_out, plain_lse, **kw, dropout_p=0.0,
                                      seed=seed)
    for x, y in zip(g0, g1):
        _same_bits(x, y)


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


BAD = [
    ({"bias": np.zeros((3, 5), np.int64)}, TypeError, "bias"),
    ({"bias": np.zeros((3, 5), bool)}, TypeError, "bias"),
    ({"bias": np.zeros((3, 5), complex)}, TypeError, "bias"),
    ({"bias": np.array([["a"] * 5] * 3)}, TypeError, "bias"),
    ({"bias": np.zeros((3, 4))}, ValueError, r"bias of shape \(3, 4\).*\(2, 3, 5\)"),
    ({"bias": np.zeros((3, 3, 5))}, ValueError, r"bias of shape \(3, 3, 5\)"),
    ({"bias": np.zeros((1, 2, 3, 5))}, ValueError, r"bias of shape \(1, 2, 3, 5\)"),
    ({"mask": np.ones((3, 5), np.float64)}, TypeError, "mask"),
    ({"mask": np.ones((3, 5), np.int8)}, TypeError, "mask"),
    ({"mask": np.ones((2, 3, 4), bool)}, ValueError, r"mask of shape \(2, 3, 4\).*\(2, 3, 5\)"),
    ({"mask": np.ones((5, 3), bool)}, ValueError, "mask"),
    ({"dropout_p": 1.0, "seed": 1}, ValueError, "dropout_p"),
    ({"dropout_p": -0.1, "seed": 1}, ValueError, "dropout_p"),
    ({"dropout_p": float("nan"), "seed": 1}, ValueError, "dropout_p"),
    ({"dropout_p": "0.1", "seed": 1}, TypeError, "dropout_p"),
    ({"dropout_p": None}, TypeError, "dropout_p"),
    ({"dropout_p": True, "seed": 1}, TypeError, "dropout_p"),
    ({"dropout_p": 0.1}, ValueError, "seed"),
    ({"dropout_p": 0.1, "seed": None}, ValueError, "seed"),
    ({"dropout_p": 0.1, "seed": 1.0}, TypeError, "seed"),
    ({"dropout_p": 0.1, "seed": True}, TypeError, "seed"),
    ({"dropout_p": 0.1, "seed": "3"}, TypeError, "seed"),
    ({"dropout_p": 0.1, "seed": -1}, ValueError, "seed"),
    ({"dropout_p": 0.1, "seed": 2**64}, ValueError, "seed"),
    ({"seed": 2**64}, ValueError, "seed"),
    ({"dropout_p": 0.1, "seed": 1, "offset": -1}, ValueError, "offset"),
    ({"dropout_p": 0.1, "seed": 1, "offset": 2**32}, ValueError, "offset"),
    ({"dropout_p": 0.1, "seed": 1, "offset": 1.5}, TypeError, "offset"),
    ({"offset": None}, TypeError, "offset"),
    ({"offset": False}, TypeError, "offset"),
]


@pytest.mark.parametrize("kw, exc, match", BAD,
                         ids=lambda x: str(x) if not isinstance(x, dict) else ",".join(
                             f"{a}={b!r}"[:30].replace(" ", "") for a, b in x.items()))
def test_validation_errors(kw, exc, match):
    q, k, v = np.zeros((2, 3, 4)), np.zeros((2, 5, 4)), np.zeros((2, 5, 4))
    for call in _call_all(q, k, v, **kw):
        with pytest.raises(exc, match=match):
            call()


def test_bias_grad_validation():
    q, k, v = np.zeros((2, 3, 4)), np.zeros((2, 5, 4)), np.zeros((2, 5, 4))
    out, lse = np.zeros((2, 3, 4)), np.zeros((2, 3))
    for bwd in (ref.attention_backward_naive, ref.attention_backward_tiled):
        with pytest.raises(ValueError, match="bias_grad"):
            bwd(out, q, k, v, out, lse, bias_grad=True)
        with pytest.raises(ValueError, match="bias_grad"):
            bwd(out, q, k, v, out, lse, mask=np.ones((3, 5), bool), bias_grad=True)
        with pytest.raises(TypeError, match="bias_grad"):
            bwd(out, q, k, v, out, lse, bias=np.zeros((3, 5)), bias_grad="yes")
        assert len(bwd(out, q, k, v, out, lse, bias=np.zeros((3, 5)), bias_grad=True)) == 4
        assert len(bwd(out, q, k, v, out, lse, bias=np.zeros((3, 5)),
                       bias_grad=np.bool_(False))) == 3
    with pytest.raises(TypeError, match="bias_grad"):
        ref.attention_naive(q, k, v, bias_grad=True)        # a backward-only keyword


def test_validation_accepts():
    q, k, v = np.zeros((2, 3, 4)), np.zeros((2, 5, 4)), np.zeros((2, 5, 4))
    for kw in [{"bias": np.zeros((3, 5), np.float32)}, {"bias": 0.5}, {"bias": np.zeros((1, 1))},
               {"bias": np.zeros((2, 1, 5))}, {"mask": True}, {"mask": np.ones((2, 3, 1), bool)},
               {"dropout_p": np.float32(0.5), "seed": np.uint64(2**64 - 1)},
               {"dropout_p": 0.99, "seed": 0, "offset": 2**32 - 1},
               {"dropout_p": 0, "seed": np.int32(3), "offset": np.int64(7)},
               {"seed": 5}]:
        for call in _call_all(q, k, v, **kw):
            call()


@pytest.mark.parametrize("value", [np.inf, np.nan], ids=["posinf", "nan"])
def test_nan_or_posinf_bias_gives_nan_rows(value, seed):
    """Bias values are not scanned: a NaN or +inf entry makes its row's out and
    lse NaN (not a silently empty row); the other rows are untouched; behind a
    False mask entry it is removed like any pair."""
    q, k, v, _ = _problem(seed, 9, 12)
    bias = _rng(seed).normal(0, 1, (9, 12))
    bias[4, 7] = value
    clean = ref.attention_naive(q, k, v, bias=np.where(np.isfinite(bias), bias, 0.0))
    others = np.arange(9) != 4
    for fwd in (ref.attention_naive, ref.attention_tiled):
        with np.errstate(invalid="ignore"):      # inf - inf: the NaN is the point
            out, lse = fwd(q, k, v, bias=bias)
        assert np.isnan(out[:, :, 4]).all() and np.isnan(lse[:, :, 4]).all()
        _close(out[:, :, others], clean[0][:, :, others])
        _close(lse[:, :, others], clean[1][:, :, others])
        mask = np.ones((9, 12), bool)
        mask[4, 7] = False
        out, lse = fwd(q, k, v, bias=bias, mask=mask)
        assert not np.isnan(out).any() and not np.isnan(lse).any()
