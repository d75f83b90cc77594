"""GPU tests of dropout (``dropout_p``, ``seed``, ``offset``) and of windows with
a negative side (PyTorch's top-left causal mask).

Dropout's keep bits are a function of (seed, offset, batch element, i, j)
(flashcupy/_philox.py), so forward and backward are checked exactly against
the float64 reference that applies the same bits (tests/_naive.py), by the
tolerance rule of _assert.py, for every family and dtype, composed with the
other variants, at lengths that are no multiple of any tile.  Beside it:
bit-identical repeats, different patterns for a different seed or offset, the
mean over many seeds against the dropout-free output, and the bad-input
errors.
"""
from __future__ import annotations

import math

import numpy as np
import pytest

import _naive as nv
from _grid import check_backward, check_forward, family
from test_variants import FAMILY_DTYPES, case_grid, fd_id

cp = pytest.importorskip("cupy")
import flashcupy as fc  # noqa: E402

pytestmark = pytest.mark.gpu

SEQLENS = [(97, 200), (200, 97), (130, 257), (64, 64)]
# (name, q batch dims, kv batch dims, dropout_p, keywords)
CASES = [
    ("plain", (2, 3), (2, 3), 0.1, {}),
    ("causal-p05", (2, 3), (2, 3), 0.5, {"causal": True}),
    ("gqa-window", (2, 2, 2), (2, 2, 1), 0.2, {"window": (40, 8)}),
    ("bias-mask", (2, 2), (2, 2), 0.1, {"bias": "full", "mask": "keypad"}),
    ("softcap-alibi-sink", (2, 2), (2, 2), 0.3, {"softcap": 3.0, "alibi": True, "sink": True}),
]


def make_case(qb, kb, extra, dtype, sq, sk, d, dv, seed):
    batch = tuple(np.broadcast_shapes(qb, kb))
    q, k, v, dout = nv.randn_many(cp, seed, [qb + (sq, d), kb + (sk, d), kb + (sk, dv),
                                             batch + (sq, dv)], dtype)
    rng = np.random.default_rng(seed ^ 0xD509)
    kw = {k_: v_ for k_, v_ in extra.items() if k_ in ("window", "softcap")}
    causal = bool(extra.get("causal", False))
    if extra.get("alibi"):
        kw["alibi_slopes"] = cp.asarray(rng.uniform(0.01, 0.2, batch), np.float32)
    if extra.get("sink"):
        kw["sink"] = cp.asarray(np.log(sk) + rng.standard_normal(batch), np.float32)
    if extra.get("bias") == "full":
        kw["bias"] = cp.asarray(rng.standard_normal(batch + (sq, sk)) * 2.0).astype(dtype)
    if extra.get("mask") == "keypad":
        m = rng.random(batch[:1] + (1,) * (len(batch) - 1) + (1, sk)) > 0.3
        kw["mask"] = cp.asarray(m)
    return q, k, v, dout, causal, kw


@pytest.mark.parametrize("fd, case, seqlens, heads, det", case_grid(CASES, SEQLENS))
def test_dropout_grid(fd, case, seqlens, heads, det, seed, poison_pool):
    """Forward and backward with dropout against the float64 reference with the
    same keep bits: a wrong bit changes an output element by about p / (1 - p)
    times its size, far outside the rule."""
    fam, dtype = fd
    name, qb, kb, p, extra = case
    (sq, sk), (d, dv) = seqlens, heads
    q, k, v, dout, causal, kw = make_case(qb, kb, extra, dtype, sq, sk, d, dv, seed)
    drop = dict(dropout_p=p, seed=(seed * 0x9E3779B97F4A7C15) % 2**64, offset=seed % 2**32)
    bkw = dict(kw, bias_grad=True) if "bias" in kw else kw
    with family(fam, dtype):
        with poison_pool():
            out, lse = fc.attention(q, k, v, causal=causal, return_lse=True, **kw, **drop)
        check_forward(q, k, v, out, lse, causal, **kw, **drop)
        with poison_pool():
            grads = fc.attention_backward(dout, q, k, v, out, lse, causal=causal,
                                          deterministic=det and "bias" not in kw, **bkw, **drop)
        _, lse0 = fc.attention(q, k, v, causal=causal, return_lse=True, **kw)
    check_backward(dout, q, k, v, grads, causal, fwd=(out, lse), **bkw, **drop)
    assert bool((lse == lse0).all())  # the LSE is dropout-free, bit for bit


@pytest.mark.parametrize("fd", FAMILY_DTYPES, ids=fd_id)
def test_dropout_reproducible(fd, seed):
    """The same (seed, offset): bit-identical outputs and gradients; another seed
    or offset: a different pattern (about half the outputs move at p = 0.5)."""
    fam, dtype = fd
    q, k, v, do = nv.randn_many(cp, seed, [(2, 3, 77, 64), (2, 3, 131, 64), (2, 3, 131, 64),
                                           (2, 3, 77, 64)], dtype)
    s0 = seed * 7919 + 1

    def run(s, off):
        out, lse = fc.attention(q, k, v, return_lse=True, dropout_p=0.5, seed=s, offset=off)
        g = fc.attention_backward(do, q, k, v, out, lse, dropout_p=0.5, seed=s, offset=off,
                                  deterministic=True)
        return (out,) + tuple(g)

    with family(fam, dtype):
        a, b = run(s0, 3), run(s0, 3)
        others = [run(s0 + 1, 3), run(s0 + 2**40, 3), run(s0, 4)]
    for x, y in zip(a, b):
        assert bool((x.view(np.uint8) == y.view(np.uint8)).all())
    for o in others:
        moved = float((o[0] != a[0]).mean())
        assert moved > 0.5, moved  # every output element sums ~65 kept pairs


@pytest.mark.parametrize("fd", FAMILY_DTYPES, ids=fd_id)
def test_dropout_mean_over_seeds(fd, seed):
    """Over N seeds the mean output approaches the dropout-free output: every
    element within 5 standard errors (the draws' own spread over sqrt(N)) plus
    the dtype's rounding of one output."""
    fam, dtype = fd
    q, k, v = nv.randn_many(cp, seed, [(1, 2, 33, 32), (1, 2, 47, 32), (1, 2, 47, 32)], dtype)
    n, p = 400, 0.3
    with family(fam, dtype):
        want = nv.to_f64(fc.attention(q, k, v))
        draws = cp.stack([nv.to_f64(fc.attention(q, k, v, dropout_p=p, seed=seed + s, offset=s))
                          for s in range(n)])
    mean, sd = draws.mean(axis=0), draws.std(axis=0)
    assert bool((sd > 0).all())
    eps = {np.dtype(np.float64): 2.0**-52, np.dtype(np.float32): 2.0**-23}.get(
        np.dtype(dtype), 2.0**-7)
    tol = 5 * sd / math.sqrt(n) + 4 * eps * float(cp.abs(want).max())
    assert bool((cp.abs(mean - want) <= tol).all()), float(cp.abs(mean - want).max())
    # without the 1 / (1 - p) rescale the mean would be (1 - p) times too small
    assert bool((cp.abs(mean * (1 - p) - want) > tol).any())


@pytest.mark.parametrize("fd", FAMILY_DTYPES, ids=fd_id)
def test_dropout_zero_is_off(fd, seed):
    """dropout_p = 0 ignores seed and offset: bit-identical to no dropout."""
    fam, dtype = fd
    q, k, v = nv.randn_many(cp, seed, [(2, 2, 50, 64), (2, 2, 70, 64), (2, 2, 70, 64)], dtype)
    with family(fam, dtype):
        a = fc.attention(q, k, v)
        b = fc.attention(q, k, v, dropout_p=0.0, seed=5, offset=9)
    assert bool((a.view(np.uint8) == b.view(np.uint8)).all())


# ----------------------------------------------------------------------------
# windows with a negative side: the top-left causal mask for Sq != Sk
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("fd", FAMILY_DTYPES, ids=fd_id)
@pytest.mark.parametrize("sq, sk", [(97, 200), (200, 97)])
def test_top_left_causal(fd, sq, sk, seed, poison_pool):
    """window (None, Sq - Sk): query i sees keys j <= i (PyTorch's is_causal),
    forward and backward against the reference, and equal to an explicit mask."""
    fam, dtype = fd
    d = 64 if fam != "sm90" else 128
    q, k, v, do = nv.randn_many(cp, seed, [(2, 2, sq, d), (2, 2, sk, d), (2, 2, sk, d),
                                           (2, 2, sq, d)], dtype)
    win = (None, sq - sk)
    with family(fam, dtype):
        with poison_pool():
            out, lse = fc.attention(q, k, v, window=win, return_lse=True)
        check_forward(q, k, v, out, lse, False, window=win)
        with poison_pool():
            grads = fc.attention_backward(do, q, k, v, out, lse, window=win)
        check_backward(do, q, k, v, grads, False, window=win)
        m = cp.asarray(np.tril(np.ones((sq, sk), bool)))
        out_m = fc.attention(q, k, v, mask=m)
    ref = nv.to_f64(out_m)
    assert float(cp.abs(nv.to_f64(out) - ref).max()) <= 4 * float(cp.abs(ref).max()) * (
        2.0**-7 if np.dtype(dtype).itemsize == 2 else 1e-5)


# ----------------------------------------------------------------------------
# bad input: errors before any launch, naming the argument
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("kw, exc, match", [
    ({"dropout_p": 1.0, "seed": 1}, ValueError, "dropout_p"),
    ({"dropout_p": -0.1, "seed": 1}, ValueError, "dropout_p"),
    ({"dropout_p": float("nan"), "seed": 1}, ValueError, "dropout_p"),
    ({"dropout_p": "0.1", "seed": 1}, TypeError, "dropout_p"),
    ({"dropout_p": 0.1}, ValueError, "seed"),
    ({"dropout_p": 0.1, "seed": 1.5}, TypeError, "seed"),
    ({"dropout_p": 0.1, "seed": -1}, ValueError, "seed"),
    ({"dropout_p": 0.1, "seed": 2**64}, ValueError, "seed"),
    ({"dropout_p": 0.1, "seed": 1, "offset": 2**32}, ValueError, "offset"),
    ({"dropout_p": 0.1, "seed": 1, "offset": None}, TypeError, "offset"),
])
def test_dropout_bad_input(kw, exc, match):
    q = cp.ones((1, 2, 8, 16), np.float16)
    out = cp.full((1, 2, 8, 16), np.nan, np.float16)
    lse = cp.full((1, 2, 8), np.nan, np.float32)
    with pytest.raises(exc, match=match):
        fc.attention(q, q, q, **kw)
    with pytest.raises(exc, match=match):
        fc.attention_backward(q, q, q, q, out, lse, **kw)
    # a plan cached by a good call does not skip the per-call checks
    fc.attention(q, q, q, dropout_p=0.1, seed=1)
    with pytest.raises(exc, match=match):
        fc.attention(q, q, q, **kw)


@pytest.mark.parametrize("fd", FAMILY_DTYPES, ids=fd_id)
def test_windows_beyond_the_sequence(fd, seed):
    """Sides far outside the sequence keep their meaning (clamped on the host,
    no int overflow in the kernels): a band beyond either end is empty (out = 0,
    lse = -inf), an unbounded-as-large window is full attention."""
    fam, dtype = fd
    q, k, v = nv.randn_many(cp, seed, [(1, 2, 40, 64), (1, 2, 90, 64), (1, 2, 90, 64)], dtype)
    with family(fam, dtype):
        full = fc.attention(q, k, v)
        for win in [(None, -10**12), (-(2**31 - 1), None), (-2**40, 5), (3, -2**40)]:
            out, lse = fc.attention(q, k, v, window=win, return_lse=True)
            assert bool((out.astype(np.float32) == 0).all()), win
            assert bool(cp.isneginf(lse).all()), win
        wide = fc.attention(q, k, v, window=(10**12, 2**40))
    assert bool((wide.view(np.uint8) == full.view(np.uint8)).all())
