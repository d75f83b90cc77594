"""CPU tests of flashcupy.reference and of the test helpers (_naive, _assert).

No GPU needed: everything here is NumPy.  The tiled (FlashAttention-2)
reference must agree with the naive one to float64 rounding; the naive
backward must agree with central finite differences; and the tolerance rule
used by the GPU tests must pass an ideal kernel and fail a broken one.
"""
from __future__ import annotations

import math

import numpy as np
import pytest

import _assert as A
import _naive as nv
from flashcupy import reference as ref

pytestmark = pytest.mark.filterwarnings("error")  # no overflow/invalid warnings anywhere

# (Sq, Sk): awkward sizes, tile edges, Sq > Sk (empty causal rows), empty axes
SEQLENS = [(1, 1), (1, 70), (17, 97), (64, 64), (65, 63), (97, 17), (130, 5), (0, 5), (5, 0),
           (0, 0)]


def _qkv(seed, q_shape, k_shape, v_shape):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(s) for s in (q_shape, k_shape, v_shape)]


def _close(a, b, tol=1e-12):
    assert a.shape == b.shape
    assert np.array_equal(np.isneginf(a), np.isneginf(b))
    fin = np.isfinite(b)
    assert np.isfinite(a[fin]).all()
    np.testing.assert_allclose(a[fin], b[fin], rtol=tol, atol=tol)


# ----------------------------------------------------------------------------
# tiled == naive
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("seqlens", SEQLENS, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("blocks", [(64, 64), (16, 32), (128, 16)], ids=lambda b: f"{b[0]}_{b[1]}")
def test_tiled_matches_naive(seqlens, causal, blocks, seed):
    sq, sk = seqlens
    d, dv = 24, 40
    q, k, v = _qkv(seed, (2, 3, sq, d), (2, 1, sk, d), (1, 3, sk, dv))  # MQA-ish broadcasting
    out, lse = ref.attention_naive(q, k, v, causal)
    out_t, lse_t = ref.attention_tiled(q, k, v, causal, block_m=blocks[0], block_n=blocks[1])
    _close(out_t, out)
    _close(lse_t, lse)
    assert out.shape == (2, 3, sq, dv) and lse.shape == (2, 3, sq)

    dout = np.random.default_rng(seed + 1).standard_normal(out.shape)
    grads = ref.attention_backward_naive(dout, q, k, v, out, lse, causal)
    grads_t = ref.attention_backward_tiled(dout, q, k, v, out, lse, causal,
                                           block_m=blocks[0], block_n=blocks[1])
    for name, g, g_t, x in zip("qkv", grads, grads_t, (q, k, v)):
        assert g.shape == x.shape, f"d{name} must have {name}'s shape"
        _close(g_t, g)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_empty_rows(causal):
    """Rows that see no key: out 0, lse -inf, zero gradients, never NaN."""
    sq, sk = 9, 4 if causal else 0
    q, k, v = _qkv(3, (2, sq, 8), (2, sk, 8), (2, sk, 8))
    n_empty = nv.empty_rows(sq, sk, causal)
    assert n_empty == 5 if causal else n_empty == 9
    for fwd, bwd in [(ref.attention_naive, ref.attention_backward_naive),
                     (ref.attention_tiled, ref.attention_backward_tiled)]:
        out, lse = fwd(q, k, v, causal)
        assert not np.isnan(out).any() and not np.isnan(lse).any()
        assert (out[:, :n_empty] == 0).all()
        assert np.isneginf(lse[:, :n_empty]).all()
        assert np.isfinite(lse[:, n_empty:]).all()
        dq, dk, dv = bwd(np.ones_like(out), q, k, v, out, lse, causal)
        assert not any(np.isnan(g).any() for g in (dq, dk, dv))
        assert (dq[:, :n_empty] == 0).all()


def test_causal_is_bottom_right():
    """With Sq < Sk the last query sees every key; query i sees keys <= i + Sk - Sq."""
    mask = ref.causal_mask(3, 5)
    assert mask.tolist() == [[True, True, True, False, False],
                             [True, True, True, True, False],
                             [True, True, True, True, True]]
    q, k, v = _qkv(5, (3, 4), (5, 4), (5, 2))
    out, _ = ref.attention_naive(q, k, v, causal=True)
    full, _ = ref.attention_naive(q[2:], k, v, causal=False)
    _close(out[2:], full)
    first, _ = ref.attention_naive(q[:1], k[:3], v[:3], causal=False)
    _close(out[:1], first)


def test_known_values():
    rng = np.random.default_rng(7)
    k, v = rng.standard_normal((6, 4)), rng.standard_normal((6, 3))
    # zero query: uniform softmax, out = mean(v), lse = log(Sk)
    out, lse = ref.attention_tiled(np.zeros((2, 4)), k, v, block_m=1, block_n=4)
    _close(out, np.broadcast_to(v.mean(axis=0), (2, 3)))
    _close(lse, np.full(2, math.log(6)))
    # one key: out = v, lse = the scaled score
    q = rng.standard_normal((3, 4))
    out, lse = ref.attention_naive(q, k[:1], v[:1], scale=0.3)
    _close(out, np.broadcast_to(v[0], (3, 3)))
    _close(lse, 0.3 * q @ k[0])


def test_scale_and_dtypes():
    rng = np.random.default_rng(11)
    q, k, v = (rng.standard_normal((2, 5, 16)) for _ in range(3))
    out, lse = ref.attention_naive(q, k, v)           # default 1/sqrt(16) = 0.25
    out2, lse2 = ref.attention_naive(q * 0.5, k, v, scale=0.5)
    _close(out2, out)
    _close(lse2, lse)
    for dt in (np.float16, nv.BF16, np.float32):
        qd, kd, vd = (x.astype(dt) for x in (q, k, v))
        o_d, l_d = ref.attention_tiled(qd, kd, vd, block_m=2, block_n=3)
        assert o_d.dtype == np.float64 and l_d.dtype == np.float64
        o_64, l_64 = ref.attention_naive(*(x.astype(np.float64) for x in (qd, kd, vd)))
        _close(o_d, o_64)
        _close(l_d, l_64)


def test_gqa_grad_sums_over_group():
    """(B, Hkv, 1, S, D) keys against (B, Hkv, G, S, D) queries == repeating the keys."""
    rng = np.random.default_rng(13)
    q = rng.standard_normal((2, 2, 3, 7, 8))
    k = rng.standard_normal((2, 2, 1, 9, 8))
    v = rng.standard_normal((2, 2, 1, 9, 5))
    dout = rng.standard_normal((2, 2, 3, 7, 5))
    out, lse = ref.attention_naive(q, k, v, causal=True)
    kr, vr = np.repeat(k, 3, axis=2), np.repeat(v, 3, axis=2)
    out_r, lse_r = ref.attention_naive(q, kr, vr, causal=True)
    _close(out, out_r)
    dq, dk, dv = ref.attention_backward_tiled(dout, q, k, v, out, lse, causal=True,
                                              block_m=4, block_n=4)
    dq_r, dk_r, dv_r = ref.attention_backward_naive(dout, q, kr, vr, out_r, lse_r, causal=True)
    _close(dq, dq_r)
    _close(dk, dk_r.sum(axis=2, keepdims=True))
    _close(dv, dv_r.sum(axis=2, keepdims=True))


def test_shape_errors():
    z = np.zeros
    with pytest.raises(ValueError):
        ref.attention_naive(z((3, 4)), z((3, 5)), z((3, 5)))      # D differs
    with pytest.raises(ValueError):
        ref.attention_naive(z((3, 4)), z((3, 4)), z((2, 4)))      # Sk differs
    with pytest.raises(ValueError):
        ref.attention_naive(z((2, 3, 4)), z((3, 3, 4)), z((3, 3, 4)))  # batch
    with pytest.raises(ValueError):
        ref.attention_naive(z(4), z((3, 4)), z((3, 4)))           # ndim


# ----------------------------------------------------------------------------
# backward == finite differences
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("shapes", [
    ((5, 3), (4, 3), (4, 2)),                   # Sq > Sk: one empty causal row
    ((2, 3, 3), (2, 6, 3), (2, 6, 4)),          # Sq < Sk
    ((2, 2, 4, 3), (1, 5, 3), (2, 1, 5, 2)),    # broadcasting (grads summed)
], ids=["sq_gt_sk", "sq_lt_sk", "broadcast"])
def test_backward_finite_differences(shapes, causal, seed):
    q, k, v = _qkv(seed, *shapes)
    scale = 0.7
    out, lse = ref.attention_naive(q, k, v, causal, scale)
    dout = np.random.default_rng(seed + 1).standard_normal(out.shape)

    def loss(q_, k_, v_):
        return float(np.sum(dout * ref.attention_naive(q_, k_, v_, causal, scale)[0]))

    analytic = ref.attention_backward_naive(dout, q, k, v, out, lse, causal, scale)
    tiled = ref.attention_backward_tiled(dout, q, k, v, out, lse, causal, scale, 2, 3)
    h = 1e-6
    args = [q, k, v]
    for which, (g, g_t) in enumerate(zip(analytic, tiled)):
        numeric = np.zeros_like(args[which])
        for idx in np.ndindex(*args[which].shape):
            plus = [a.copy() for a in args]
            minus = [a.copy() for a in args]
            plus[which][idx] += h
            minus[which][idx] -= h
            numeric[idx] = (loss(*plus) - loss(*minus)) / (2 * h)
        np.testing.assert_allclose(g, numeric, rtol=1e-6, atol=1e-7)
        _close(g_t, g)


# ----------------------------------------------------------------------------
# the helpers the GPU tests rely on (run here on NumPy)
# ----------------------------------------------------------------------------

def test_bf16_rounding_matches_ml_dtypes():
    rng = np.random.default_rng(17)
    x = np.concatenate([
        rng.standard_normal(100_000).astype(np.float32) * 10.0,
        # exact ties between two bfloat16 values: round to even
        (np.arange(1, 2000, dtype=np.uint32) << 16 | 0x8000).view(np.float32),
        np.array([0.0, -0.0, -np.inf, np.inf, 3.0e38, 1e-40], dtype=np.float32),
    ])
    got = nv.cast(x, nv.BF16)
    assert got.dtype == nv.BF16
    want = x.astype(nv.BF16)
    assert np.array_equal(got.view(np.uint16), want.view(np.uint16))
    assert np.array_equal(nv.to_f32(got), want.astype(np.float32))
    assert np.array_equal(nv.rounder(nv.BF16)(x), want.astype(np.float32))


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("seqlens", [(17, 97), (97, 17), (0, 5), (5, 0)],
                         ids=lambda s: f"{s[0]}x{s[1]}")
def test_naive_helper_float64_is_the_reference(seqlens, causal, seed):
    sq, sk = seqlens
    q, k, v = _qkv(seed, (2, 1, sq, 16), (1, 3, sk, 16), (1, 3, sk, 8))
    dout = np.random.default_rng(seed + 1).standard_normal((2, 3, sq, 8))
    out, lse = nv.attention(q, k, v, causal)
    out_r, lse_r = ref.attention_naive(q, k, v, causal)
    _close(out, out_r)
    _close(lse, lse_r)
    grads = nv.attention_backward(dout, q, k, v, causal)
    grads_r = ref.attention_backward_naive(dout, q, k, v, out_r, lse_r, causal)
    for g, g_r in zip(grads, grads_r):
        _close(g, g_r)


@pytest.mark.parametrize("dtype", [nv.F16, nv.BF16, nv.F32], ids=lambda d: nv.DTYPE_IDS[d])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("seqlens", [(1, 1), (1, 300), (33, 97), (128, 128), (200, 17), (5, 0)],
                         ids=lambda s: f"{s[0]}x{s[1]}")
def test_tolerance_rule_passes_ideal_and_fails_broken(dtype, causal, seqlens, seed):
    """An ideal kernel (exact, output rounded once) passes; a wrong one fails."""
    sq, sk = seqlens
    d = 40
    q, k, v, dout = nv.randn_many(np, seed, [(1, 2, sq, d), (1, 2, sk, d), (1, 2, sk, d),
                                            (1, 2, sq, d)], dtype)
    out_r, lse_r = nv.attention(q, k, v, causal, dtype=np.float64)
    out_n, lse_n = nv.attention(q, k, v, causal)
    ideal_out = nv.cast(out_r, dtype)
    ideal_lse = lse_r.astype(np.float32)
    A.assert_close("out", ideal_out, out_r, out_n)
    A.assert_close("lse", ideal_lse, lse_r, lse_n)
    A.assert_empty_rows(sq, sk, causal, out=ideal_out, lse=ideal_lse)

    grads_r = nv.attention_backward(dout, q, k, v, causal, dtype=np.float64)
    grads_n = nv.attention_backward(dout, q, k, v, causal)
    for name, g_r, g_n in zip(("dq", "dk", "dv"), grads_r, grads_n):
        A.assert_close(name, nv.cast(g_r, dtype), g_r, g_n, grad=True)

    if sq and sk:
        # a kernel that uses the wrong softmax scale is caught
        if sk > 1:
            wrong, _ = nv.attention(q, k, v, causal, scale=1.1 / math.sqrt(d), dtype=np.float64)
            with pytest.raises(AssertionError, match="max error"):
                A.assert_close("out", nv.cast(wrong, dtype), out_r, out_n)
        # an unwritten (NaN) element is caught
        poisoned = ideal_out.copy()
        poisoned[0, 1, -1, 3] = np.nan
        with pytest.raises(AssertionError, match="NaN"):
            A.assert_close("out", poisoned, out_r, out_n)
        # a non-empty row wrongly reported empty is caught
        bad_lse = ideal_lse.copy()
        bad_lse[0, 0, -1] = -np.inf
        with pytest.raises(AssertionError, match="-inf pattern"):
            A.assert_close("lse", bad_lse, lse_r, lse_n)


def test_float64_floor_catches_float32_math(seed):
    """The float64 tolerance is the floor alone; float32 accuracy must not pass it."""
    q, k, v = nv.randn_many(np, seed, [(2, 64, 32), (2, 80, 32), (2, 80, 32)], np.float64)
    out_r, _ = nv.attention(q, k, v)
    out_32, _ = nv.attention(*(x.astype(np.float32) for x in (q, k, v)))
    A.assert_close("out", out_r.copy(), out_r, out_r)
    with pytest.raises(AssertionError, match="max error"):
        A.assert_close("out", out_32.astype(np.float64), out_r, out_r)
