"""Merging attention over disjoint key sets (flashcupy/_merge.py).

CPU: the float64 reference merge of attention over a partition of the keys
equals one float64 call over all of them (with a mask, so that rows see no key
in some parts and none at all in others); NaN in an LSE reaches its row;
chained merges equal one merge; bad input raises naming the argument; the
PyTorch version passes gradcheck in float64.

GPU: ``flashcupy.merge_attention`` of ``flashcupy.attention`` over the parts
against one call over the union, in every dtype, with the tolerance rule of
_assert.py (float64 reference, naive same-dtype baseline over the union).
"""
from __future__ import annotations

import numpy as np
import pytest

import _assert as A
import _naive as nv
from flashcupy import reference as ref

RNG = np.random.default_rng


def _parts(sk, n, seed):
    """A random partition of range(sk) into n index arrays (one may be empty)."""
    order = RNG(seed).permutation(sk)
    cuts = np.sort(RNG(seed + 1).integers(0, sk + 1, n - 1))
    return np.split(order, cuts)


def _problem(seed, batch=(2, 3), sq=37, sk=91, d=16, dv=24):
    g = RNG(seed)
    q = g.standard_normal(batch + (sq, d))
    k = g.standard_normal(batch + (sk, d))
    v = g.standard_normal(batch + (sk, dv))
    mask = g.random((1, 1, sq, sk)) < 0.6
    mask[..., 3, :] = False            # a row that sees no key at all
    mask[..., 5, : sk // 2] = False    # a row that sees keys in some parts only
    return q, k, v, mask


@pytest.mark.parametrize("n", [1, 2, 3, 5])
def test_reference_merge_equals_union(n):
    q, k, v, mask = _problem(n)
    want, want_lse = ref.attention_naive(q, k, v, mask=mask)
    outs, lses = [], []
    for idx in _parts(k.shape[-2], n, 10 + n):
        o, l = ref.attention_naive(q, k[..., idx, :], v[..., idx, :], mask=mask[..., idx])
        outs.append(o)
        lses.append(l)
    out, lse = ref.merge_attention_naive(outs, lses)
    assert np.array_equal(np.isneginf(lse), np.isneginf(want_lse))
    assert np.isneginf(lse[..., 3]).all() and (out[..., 3, :] == 0).all()
    fin = ~np.isneginf(want_lse)
    np.testing.assert_allclose(lse[fin], want_lse[fin], rtol=0, atol=1e-12)
    np.testing.assert_allclose(out, want, rtol=0, atol=1e-12)


def test_reference_merge_chains():
    q, k, v, mask = _problem(7)
    pairs = [ref.attention_naive(q, k[..., idx, :], v[..., idx, :], mask=mask[..., idx])
             for idx in _parts(k.shape[-2], 4, 3)]
    outs, lses = zip(*pairs)
    one = ref.merge_attention_naive(list(outs), list(lses))
    left = ref.merge_attention_naive(list(outs[:2]), list(lses[:2]))
    right = ref.merge_attention_naive(list(outs[2:]), list(lses[2:]))
    two = ref.merge_attention_naive([left[0], right[0]], [left[1], right[1]])
    np.testing.assert_allclose(two[0], one[0], rtol=0, atol=1e-13)
    assert np.array_equal(np.isneginf(two[1]), np.isneginf(one[1]))
    fin = ~np.isneginf(one[1])
    np.testing.assert_allclose(two[1][fin], one[1][fin], rtol=0, atol=1e-13)


def test_reference_merge_nan_reaches_its_row():
    outs = [np.ones((2, 4, 3)), np.ones((2, 4, 3))]
    lses = [np.zeros((2, 4)), np.zeros((2, 4))]
    lses[1][1, 2] = np.nan
    out, lse = ref.merge_attention_naive(outs, lses)
    assert np.isnan(out[1, 2]).all() and np.isnan(lse[1, 2])
    rest = np.ones((2, 4), bool)
    rest[1, 2] = False
    assert np.isfinite(out[rest]).all() and np.allclose(lse[rest], np.log(2.0))


def test_reference_merge_ignores_out_of_empty_sets():
    """A set whose lse is -inf for a row adds nothing there, even NaN (split-KV
    buffers of empty splits need not be written)."""
    outs = [np.ones((3, 2)), np.full((3, 2), np.nan)]
    lses = [np.zeros(3), np.full(3, -np.inf)]
    out, lse = ref.merge_attention_naive(outs, lses)
    assert (out == 1).all() and (lse == 0).all()


@pytest.mark.parametrize("outs, lses, exc, words", [
    ([], [], ValueError, "at least one"),
    ([np.ones((2, 3, 4))], [np.ones((2, 3)), np.ones((2, 3))], ValueError, "one lse per out"),
    ([np.ones((2, 3, 4)), np.ones((2, 3, 5))], [np.ones((2, 3))] * 2, ValueError, "outs[1]"),
    ([np.ones((2, 3, 4))], [np.ones((2, 4))], ValueError, "lses[0]"),
    ([np.ones((2, 3, 4))], [np.ones((2, 3), np.int32)], TypeError, "lses[0]"),
    ([np.ones(4)], [np.ones(())], ValueError, "outs[0]"),
    (np.ones((2, 3, 4)), [np.ones((2, 3))], TypeError, "lists"),
])
def test_reference_merge_bad_input(outs, lses, exc, words):
    with pytest.raises(exc, match=None) as e:
        ref.merge_attention_naive(outs, lses)
    assert words in str(e.value)


def test_torch_merge_gradcheck():
    torch = pytest.importorskip("torch")
    pytest.importorskip("cupy")  # (flashcupy.torch imports it; no GPU is needed here)
    import flashcupy.torch as fct

    g = torch.Generator().manual_seed(0)
    outs = [torch.randn(2, 5, 3, generator=g, dtype=torch.float64, requires_grad=True)
            for _ in range(3)]
    lses = [torch.randn(2, 5, generator=g, dtype=torch.float64) for _ in range(3)]
    lses[2][0, 1] = -float("inf")      # a part with no key for one row
    for x in lses:                     # a row with no key in any part
        x[1, 3] = -float("inf")
    lses = [x.requires_grad_() for x in lses]

    def f(*xs):
        out, lse = fct.merge_attention(list(xs[:3]), list(xs[3:]), return_lse=True)
        return out, torch.where(torch.isneginf(lse), 0.0, lse)
    assert torch.autograd.gradcheck(f, tuple(outs) + tuple(lses))
    # and the values are the reference's (the empty row: 0, -inf, zero gradients)
    out, lse = fct.merge_attention(outs, lses, return_lse=True)
    assert (out[1, 3] == 0).all() and torch.isneginf(lse[1, 3])
    out.sum().backward()
    assert all(torch.isfinite(x.grad).all() for x in outs + lses)
    assert (outs[0].grad[1, 3] == 0).all() and lses[0].grad[1, 3] == 0
    r_out, r_lse = ref.merge_attention_naive([o.detach().numpy() for o in outs],
                                             [x.detach().numpy() for x in lses])
    np.testing.assert_allclose(out.detach().numpy(), r_out, rtol=0, atol=1e-14)
    np.testing.assert_allclose(lse.detach().numpy(), r_lse, rtol=0, atol=1e-14)


# ---------------------------------------------------------------------------- GPU
DTYPES = [nv.BF16, nv.F16, nv.F32, nv.F64]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: nv.DTYPE_IDS[np.dtype(d)])
@pytest.mark.parametrize("n", [2, 3])
def test_merge_attention_equals_one_call(dtype, n):
    cp = pytest.importorskip("cupy")
    import flashcupy as fc

    seed = 100 + n
    q, k, v = nv.randn_many(cp, seed, [(2, 4, 77, 64), (2, 4, 300, 64), (2, 4, 300, 64)], dtype)
    pieces = [cp.asarray(idx) for idx in _parts(300, n, seed)]
    outs, lses = [], []
    for idx in pieces:
        o, l = fc.attention(q, cp.ascontiguousarray(k[..., idx, :]),
                            cp.ascontiguousarray(v[..., idx, :]), return_lse=True)
        outs.append(o)
        lses.append(l)
    out, lse = fc.merge_attention(outs, lses, return_lse=True)
    assert out.dtype == q.dtype and lse.dtype == lses[0].dtype
    want, want_lse = ref.attention_naive(nv.to_f64(q).get(), nv.to_f64(k).get(),
                                         nv.to_f64(v).get())
    naive, naive_lse = nv.attention(q, k, v)
    A.assert_close("merged out", out, cp.asarray(want), naive)
    A.assert_close("merged lse", lse, cp.asarray(want_lse), naive_lse)
    # a single part is the call itself, exactly
    one = fc.merge_attention(outs[:1], lses[:1])
    assert bool((one == outs[0]).all())


@pytest.mark.gpu
def test_merge_attention_masked_rows_on_gpu():
    """Rows that see no key in some parts, or in any: the merge of masked calls
    against one masked call over the union (0 and -inf where nothing is seen)."""
    cp = pytest.importorskip("cupy")
    import flashcupy as fc

    q, k, v = nv.randn_many(cp, 5, [(2, 33, 64), (2, 120, 64), (2, 120, 64)], nv.BF16)
    mask = RNG(5).random((1, 33, 120)) < 0.5
    mask[:, 4, :] = False
    mask[:, 7, :60] = False
    mask = cp.asarray(mask)
    outs, lses = [], []
    for idx in (cp.arange(0, 60), cp.arange(60, 120)):
        o, l = fc.attention(q, cp.ascontiguousarray(k[..., idx, :]),
                            cp.ascontiguousarray(v[..., idx, :]),
                            mask=cp.ascontiguousarray(mask[..., idx]), return_lse=True)
        outs.append(o)
        lses.append(l)
    out, lse = fc.merge_attention(outs, lses, return_lse=True)
    want, want_lse = ref.attention_naive(nv.to_f64(q).get(), nv.to_f64(k).get(),
                                         nv.to_f64(v).get(), mask=mask.get())
    naive, naive_lse = nv.attention(q, k, v, mask=mask)
    A.assert_close("merged out", out, cp.asarray(want), naive)
    A.assert_close("merged lse", lse, cp.asarray(want_lse), naive_lse)
    assert bool((out[:, 4] == 0).all()) and bool(cp.isneginf(lse[:, 4]).all())


@pytest.mark.gpu
def test_merge_attention_bad_input_on_gpu():
    cp = pytest.importorskip("cupy")
    import flashcupy as fc

    o = cp.ones((2, 3, 4), cp.float32)
    with pytest.raises(TypeError, match=r"outs\[1\] is a numpy.ndarray; expected a cupy"):
        fc.merge_attention([o, np.ones((2, 3, 4))], [cp.zeros((2, 3), cp.float32)] * 2)
    with pytest.raises(TypeError, match=r"lses\[0\]"):
        fc.merge_attention([o], [cp.zeros((2, 3), cp.float16)])
