"""GPU tests of the additive bias (with its gradient) and the boolean mask.

The grid: bias and mask shapes (full, broadcast over batch or head axes, key
padding, a plain (Sq, Sk) matrix), the bias in q's dtype or float32, each
combined with the earlier variants (causal, window, softcap, ALiBi, sink) and
with GQA, x the four dtypes x every kernel family that runs the dtype; forward
(out, lse) and backward (dq, dk, dv, dbias) against the float64 reference of
_naive.py by the tolerance rule of _assert.py.  Beside it: rows that every key
is masked from (out = 0, lse = -inf, zero gradients), a mask equal to a -inf
bias bit for bit, a deterministic dbias, and the bad-input errors.
"""
from __future__ import annotations

import numpy as np
import pytest

import _naive as nv
from _grid import DTYPES, check_backward, check_forward, dtype_id, family
from test_variants import FAMILY_DTYPES, case_grid, fd_id

cp = pytest.importorskip("cupy")
import flashcupy as fc  # noqa: E402

pytestmark = pytest.mark.gpu

B, HKV, G = 2, 2, 2
SEQLENS = [(97, 200), (200, 97), (130, 257), (64, 64)]
# (name, q batch dims, kv batch dims, bias shape or None, bias dtype ("q" | "f32"),
#  mask shape or None, extra keywords)
CASES = [
    ("bias-full", (B, HKV), (B, HKV), "full", "q", None, {}),
    ("bias-heads-f32", (B, HKV), (B, HKV), (1, HKV, "Sq", "Sk"), "f32", None, {}),
    ("bias-keypad", (B, HKV), (B, HKV), (B, 1, 1, "Sk"), "q", None, {}),
    ("bias-2d-f32-causal", (B, HKV), (B, HKV), ("Sq", "Sk"), "f32", None, {"causal": True}),
    ("bias-softcap", (B, HKV), (B, HKV), "full", "q", None, {"softcap": 2.0}),
    # a full bias's gradient is stored, not added: pairs outside the band are zero-filled
    ("bias-full-causal-window", (B, HKV), (B, HKV), "full", "f32", None,
     {"causal": True, "window": (30, None)}),
    ("mask-full", (B, HKV), (B, HKV), None, None, (B, 1, "Sq", "Sk"), {}),
    ("mask-keypad-window", (B, HKV), (B, HKV), None, None, (B, 1, 1, "Sk"),
     {"window": (40, 8)}),
    ("bias-mask-gqa", (B, HKV, G), (B, HKV, 1), (1, HKV, G, "Sq", "Sk"), "q",
     (B, 1, 1, "Sq", "Sk"), {}),
    ("bias-mask-all", (B, HKV), (B, HKV), (HKV, 1, "Sk"), "f32", (B, HKV, "Sq", "Sk"),
     {"causal": True, "softcap": 3.0, "alibi": True, "sink": True}),
]


def _shape(spec, batch, sq, sk):
    if spec == "full":
        return tuple(batch) + (sq, sk)
    return tuple(sq if x == "Sq" else sk if x == "Sk" else x for x in spec)


def make_case(name, qb, kb, bias_spec, bias_dt, mask_spec, extra, dtype, sq, sk, d, dv, seed):
    batch = tuple(np.broadcast_shapes(qb, kb))
    q, k, v, dout = nv.randn_many(cp, seed, [qb + (sq, d), kb + (sk, d), kb + (sk, dv),
                                             batch + (sq, dv)], dtype)
    rng = np.random.default_rng(seed ^ 0xB1A5)
    kw = {k_: v_ for k_, v_ in extra.items() if k_ in ("window", "softcap")}
    causal = bool(extra.get("causal", False))
    if extra.get("alibi"):
        kw["alibi_slopes"] = cp.asarray(rng.uniform(0.01, 0.2, batch), np.float32)
    if extra.get("sink"):
        kw["sink"] = cp.asarray(np.log(sk) + rng.standard_normal(batch), np.float32)
    if bias_spec is not None:
        bdt = dtype if bias_dt == "q" else np.float32
        shape = _shape(bias_spec, batch, sq, sk)
        kw["bias"] = cp.asarray(rng.standard_normal(shape) * 2.0).astype(bdt)
    if mask_spec is not None:
        shape = _shape(mask_spec, batch, sq, sk)
        m = rng.random(shape) > 0.3
        if shape[-2] > 1 and shape[-2] == sq:
            m[..., 3, :] = False  # a row that sees no key
        kw["mask"] = cp.asarray(m)
    return q, k, v, dout, causal, kw


@pytest.mark.parametrize("fd, case, seqlens, heads, det", case_grid(CASES, SEQLENS))
def test_bias_mask_grid(fd, case, seqlens, heads, det, seed, poison_pool):
    fam, dtype = fd
    name, qb, kb, bias_spec, bias_dt, mask_spec, extra = case
    (sq, sk), (d, dv) = seqlens, heads
    q, k, v, dout, causal, kw = make_case(name, qb, kb, bias_spec, bias_dt, mask_spec, extra,
                                          dtype, sq, sk, d, dv, seed)
    full = "bias" in kw and tuple(kw["bias"].shape) == tuple(
        np.broadcast_shapes(qb, kb)) + (sq, sk)
    with family(fam, dtype):
        with poison_pool():
            out, lse = fc.attention(q, k, v, causal=causal, return_lse=True, **kw)
        check_forward(q, k, v, out, lse, causal, **kw)
        bkw = dict(kw, bias_grad=True) if "bias" in kw else kw
        with poison_pool():
            grads = fc.attention_backward(dout, q, k, v, out, lse, causal=causal,
                                          deterministic=det, **bkw)
    check_backward(dout, q, k, v, grads, causal, fwd=(out, lse), **bkw)
    if mask_spec is not None and "sink" not in kw and _shape(mask_spec, (1,), sq, sk)[-2] == sq:
        # row 3 sees no key: exactly 0 out, -inf lse, 0 dq
        assert bool((out[..., 3, :].astype(np.float32) == 0).all())
        assert bool(cp.isneginf(lse[..., 3]).all())
        assert bool((grads[0][..., 3, :].astype(np.float32) == 0).all())


def _unaligned(x):
    """The same values at an odd element offset and row pitch (Sk + 1): a view
    that no 16-byte copy can read."""
    buf = cp.empty(x.shape[:-1] + (x.shape[-1] + 1,), x.dtype)
    buf[..., 1:] = x
    return buf[..., 1:]


# (bias shape, bias dtype, mask shape, causal): the shapes the forward stages
STAGE_CASES = [
    ("full", "q", None, False),
    ((B, 1, 1, "Sk"), "q", None, False),          # one row, broadcast over queries
    ((1, HKV, "Sq", "Sk"), "f32", None, True),
    (None, None, (B, 1, "Sq", "Sk"), False),
    (None, None, (B, 1, 1, "Sk"), True),
    ("full", "q", (B, 1, 1, "Sk"), True),
    # masks that keep whole key tiles (key padding; one removed block): the
    # forward skips the per-score mask there
    (None, None, "keypad-prefix", False),
    ("full", "q", "keypad-prefix", False),
    (None, None, "block-hole", True),
]


@pytest.mark.parametrize("case", STAGE_CASES, ids=lambda c: "-".join(
    "x".join(map(str, p)) if isinstance(p, tuple) else str(p) for p in c))
@pytest.mark.parametrize("fd", FAMILY_DTYPES, ids=fd_id)
def test_offset_stage_equals_direct_read(fd, case, seed):
    """The sm90 forward copies a bias / mask tile into shared memory when its
    rows are 16-byte aligned (cuda_src/sm80/scores.cuh, OffsetStage) and reads
    it at each score otherwise: both give the same bits, and the reference's
    answer (several query tiles, a partial last key tile)."""
    fam, dtype = fd
    bias_spec, bias_dt, mask_spec, causal = case
    sq, sk, d = 100, 336, 64
    special = mask_spec if isinstance(mask_spec, str) else None
    q, k, v, _, _, kw = make_case("stage", (B, HKV), (B, HKV), bias_spec, bias_dt,
                                  None if special else mask_spec, {}, dtype, sq, sk, d, d, seed)
    if special == "keypad-prefix":  # batch element b keeps its first sk - 100 b keys
        kw["mask"] = cp.arange(sk)[None, None, None, :] < cp.asarray([sk, sk - 100])[:, None, None, None]
    elif special == "block-hole":   # all kept but a block of 20 x 70 pairs
        m = cp.ones((B, 1, sq, sk), bool)
        m[1, :, 30:50, 100:170] = False
        kw["mask"] = m
    odd = {name: _unaligned(x) for name, x in kw.items()}
    with family(fam, dtype):
        out, lse = fc.attention(q, k, v, causal=causal, return_lse=True, **kw)
        out2, lse2 = fc.attention(q, k, v, causal=causal, return_lse=True, **odd)
    assert bool((out.view(np.uint8) == out2.view(np.uint8)).all())
    assert bool((lse.view(np.uint8) == lse2.view(np.uint8)).all())
    check_forward(q, k, v, out, lse, causal, **kw)


@pytest.mark.parametrize("fd", FAMILY_DTYPES, ids=fd_id)
def test_mask_is_a_neg_inf_bias(fd, seed):
    fam, dtype = fd
    q, k, v = nv.randn_many(cp, seed, [(2, 2, 77, 64), (2, 2, 131, 64), (2, 2, 131, 64)], dtype)
    m = cp.asarray(np.random.default_rng(seed).random((2, 1, 77, 131)) > 0.5)
    bias = cp.where(m, 0.0, -np.inf).astype(dtype)
    with family(fam, dtype):
        o1, l1 = fc.attention(q, k, v, mask=m, return_lse=True)
        o2, l2 = fc.attention(q, k, v, bias=bias, return_lse=True)
    assert bool((o1.view(np.uint8) == o2.view(np.uint8)).all())
    assert bool((l1 == l2).all())


@pytest.mark.parametrize("fd", FAMILY_DTYPES, ids=fd_id)
def test_dbias_deterministic(fd, seed):
    fam, dtype = fd
    q, k, v, do = nv.randn_many(cp, seed, [(1, 2, 150, 64), (1, 2, 150, 64), (1, 2, 150, 64),
                                           (1, 2, 150, 64)], dtype)
    bias = nv.randn(cp, seed + 1, (1, 2, 150, 150), dtype)
    with family(fam, dtype):
        out, lse = fc.attention(q, k, v, bias=bias, return_lse=True)
        g1 = fc.attention_backward(do, q, k, v, out, lse, bias=bias, bias_grad=True,
                                   deterministic=True)
        g2 = fc.attention_backward(do, q, k, v, out, lse, bias=bias, bias_grad=True,
                                   deterministic=True)
    for a, b in zip(g1, g2):
        assert bool((a.view(np.uint8) == b.view(np.uint8)).all())


# (bias shape, q / kv batch dims, extra keywords): biases that broadcast over
# batch or head axes, rows or columns, with GQA, a sink and a mask
DET_BCAST = [
    ((1, HKV, "Sq", "Sk"), (B, HKV), (B, HKV), {}),
    ((B, 1, 1, "Sk"), (B, HKV), (B, HKV), {"causal": True}),
    (("Sq", "Sk"), (B, HKV), (B, HKV), {"window": (40, 10)}),
    ((1, HKV, G, "Sq", 1), (B, HKV, G), (B, HKV, 1), {"sink": True, "mask": True}),
]


@pytest.mark.parametrize("case", DET_BCAST, ids=lambda c: "x".join(map(str, c[0])))
@pytest.mark.parametrize("fd", FAMILY_DTYPES, ids=fd_id)
def test_dbias_deterministic_broadcast(fd, case, seed):
    """deterministic=True with a broadcast bias: bit-identical gradients run to
    run (one call per broadcast position, api._backward_broadcast_dbias), and
    the reference's values."""
    fam, dtype = fd
    bias_spec, qb, kb, extra = case
    sq, sk, d = 70, 90, 64
    mask_spec = (B, 1, 1, "Sq", "Sk") if extra.get("mask") else None
    q, k, v, dout, causal, kw = make_case("det", qb, kb, bias_spec, "q", mask_spec,
                                          {n: x for n, x in extra.items() if n != "mask"},
                                          dtype, sq, sk, d, d, seed)
    with family(fam, dtype):
        out, lse = fc.attention(q, k, v, causal=causal, return_lse=True, **kw)
        g1 = fc.attention_backward(dout, q, k, v, out, lse, causal=causal, bias_grad=True,
                                   deterministic=True, **kw)
        g2 = fc.attention_backward(dout, q, k, v, out, lse, causal=causal, bias_grad=True,
                                   deterministic=True, **kw)
    assert g1[-1].shape == kw["bias"].shape and g1[-1].dtype == kw["bias"].dtype
    for a, b in zip(g1, g2):
        assert bool((a.view(np.uint8) == b.view(np.uint8)).all())
    check_backward(dout, q, k, v, g1, causal, fwd=(out, lse), bias_grad=True, **kw)


def test_bias_mask_bad_input():
    q = cp.zeros((2, 3, 16, 32), np.float16) + 1
    k = v = q
    fn = fc.attention
    with pytest.raises(ValueError, match="bias"):
        fn(q, k, v, bias=cp.zeros((3, 3, 16, 16), np.float16))
    with pytest.raises(TypeError, match="bias"):
        fn(q, k, v, bias=cp.zeros((16, 16), np.int32))
    with pytest.raises(TypeError, match="bias"):
        fn(q, k, v, bias=cp.zeros((16, 16), np.float64))  # neither q's dtype nor float32
    with pytest.raises(TypeError, match="mask"):
        fn(q, k, v, mask=cp.zeros((16, 16), np.float16))
    with pytest.raises(ValueError, match="mask"):
        fn(q, k, v, mask=cp.zeros((16, 15), bool))
    out, lse = fn(q, k, v, return_lse=True)
    with pytest.raises(ValueError, match="bias_grad"):
        fc.attention_backward(q, q, k, v, out, lse, bias_grad=True)
    with pytest.raises(TypeError, match="bias_grad"):
        fc.attention_backward(q, q, k, v, out, lse, bias=cp.zeros((16, 16), np.float16),
                              bias_grad=1)
    with pytest.raises(NotImplementedError, match="dropout_p > 0 and a broadcast bias"):
        fc.attention_backward(q, q, k, v, out, lse, bias=cp.zeros((16, 16), np.float16),
                              bias_grad=True, deterministic=True, dropout_p=0.1, seed=1)


def test_float32_bias_beside_float64_after_a_float64_bias(seed):
    """A float32 bias beside float64 inputs is converted per call; its plan key
    is the bias as given, so it never replays the plan of a float64 bias of
    the same shape (whose backward writes a float64 dbias in place: replayed
    into a float32 dbias it wrote out of bounds)."""
    q, k, v, do = nv.randn_many(cp, seed, [(2, 3, 70, 64), (2, 3, 90, 64), (2, 3, 90, 64),
                                           (2, 3, 70, 64)], np.float64)
    b32 = nv.randn(cp, seed + 1, (2, 3, 70, 90), np.float32)
    got = {}
    for b in (b32.astype(np.float64), b32, b32):  # the float64 call caches its plans first
        out, lse = fc.attention(q, k, v, bias=b, return_lse=True)
        grads = fc.attention_backward(do, q, k, v, out, lse, bias=b, bias_grad=True)
        assert grads[-1].dtype == b.dtype and grads[-1].shape == b.shape
        got.setdefault(b.dtype, []).append((out,) + tuple(grads))
    ref = got[np.dtype(np.float64)][0]
    for run in got[np.dtype(np.float32)]:
        for x, r in zip(run[:4], ref[:4]):  # out, dq, dk, dv: the same float64 arithmetic
            assert bool((x == r).all())
        # dbias: the float64 result rounded once to float32
        assert bool((run[4] == ref[4].astype(np.float32)).all())
