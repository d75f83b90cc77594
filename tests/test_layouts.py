"""GPU tests of shapes and memory layouts: Dv != D, broadcasting (MQA, GQA,
broadcast queries), strided views, non-contiguous last axes, batch x heads
above the 65,535 grid limit, and arrays past 2**31 elements.

Forward and backward are checked with the same rule as the grids
(_grid.check_forward / check_backward); gradients of broadcast inputs must
come back summed, with the input's shape.
"""
from __future__ import annotations

import numpy as np
import pytest

import _assert as A
import _naive as nv
from _grid import DTYPES, check_backward, check_forward, dtype_id

cp = pytest.importorskip("cupy")
import flashcupy as fc  # noqa: E402

pytestmark = pytest.mark.gpu
CAUSAL = pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
DTYPE = pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)


def fwd_bwd_all_families(q, k, v, dout, causal, poison_pool):
    """Runs forward and backward in every family for q's dtype; checks both."""
    results = {}
    for fam in fc.families_for(q.dtype):
        with fc.kernel_family(fam):
            with poison_pool():
                out, lse = fc.attention(q, k, v, causal=causal, return_lse=True)
            check_forward(q, k, v, out, lse, causal)
            with poison_pool():
                grads = fc.attention_backward(dout, q, k, v, out, lse, causal=causal)
            check_backward(dout, q, k, v, grads, causal)
        results[fam] = (out, lse, grads)
    return results


# ----------------------------------------------------------------------------
# Dv != D
# ----------------------------------------------------------------------------

@CAUSAL
@pytest.mark.parametrize("seqlens", [(100, 130), (130, 100)], ids=["100x130", "130x100"])
@pytest.mark.parametrize("dims", [(64, 128), (128, 40), (8, 256), (256, 8)],
                         ids=lambda d: f"d{d[0]}_dv{d[1]}")
@DTYPE
def test_value_head_dim_differs(dtype, dims, seqlens, causal, seed, poison_pool):
    (d, dv), (sq, sk) = dims, seqlens
    q, k, v, dout = nv.randn_many(
        cp, seed, [(2, 2, sq, d), (2, 2, sk, d), (2, 2, sk, dv), (2, 2, sq, dv)], dtype)
    fwd_bwd_all_families(q, k, v, dout, causal, poison_pool)


# ----------------------------------------------------------------------------
# broadcasting of leading dims, numpy.matmul style
# ----------------------------------------------------------------------------

S_Q, S_K, D = 77, 93, 64
BROADCAST_CASES = {
    # name: (q batch, k batch, v batch)
    "mqa": ((2, 4), (2, 1), (2, 1)),                 # one k/v head for 4 query heads
    "gqa": ((2, 2, 3), (2, 2, 1), (2, 2, 1)),        # 2 k/v heads, groups of 3 query heads
    "q_batch1": ((1, 3), (2, 3), (2, 3)),            # one query batch against two k/v batches
    "kv_2d": ((2, 3), (), ()),                       # a single k/v matrix for every head
    "q_2d": ((), (2, 3), (2, 3)),                    # a single query matrix
    "mixed": ((2, 1), (1, 3), (2, 3)),               # every input broadcast somewhere
}


@CAUSAL
@pytest.mark.parametrize("case", list(BROADCAST_CASES))
@DTYPE
def test_broadcasting(dtype, case, causal, seed, poison_pool):
    bq, bk, bv = BROADCAST_CASES[case]
    batch = tuple(np.broadcast_shapes(bq, bk, bv))
    q, k, v, dout = nv.randn_many(
        cp, seed, [bq + (S_Q, D), bk + (S_K, D), bv + (S_K, D), batch + (S_Q, D)], dtype)
    results = fwd_bwd_all_families(q, k, v, dout, causal, poison_pool)
    # check_backward has checked dk has k's shape etc.; the sums are over
    # the broadcast axes because the reference sums there
    for out, lse, grads in results.values():
        assert out.shape == batch + (S_Q, D) and lse.shape == batch + (S_Q,)
        assert [g.shape for g in grads] == [q.shape, k.shape, v.shape]


# ----------------------------------------------------------------------------
# strided views used in place, other layouts copied
# ----------------------------------------------------------------------------

def _bits(x):
    return nv.to_f64(x)


@CAUSAL
@pytest.mark.parametrize("layout", ["bshd", "packed_qkv"])
@DTYPE
def test_strided_views(dtype, layout, causal, seed, poison_pool):
    """(B, S, H, D) storage seen as (B, H, S, D) views: same results as contiguous copies."""
    b, s, h, d = 2, 150, 3, 64
    if layout == "bshd":
        q_s, k_s, v_s = nv.randn_many(cp, seed, [(b, s, h, d)] * 3, dtype)
        q, k, v = (x.swapaxes(-2, -3) for x in (q_s, k_s, v_s))
    else:  # one (B, S, 3, H, D) buffer, as a fused QKV projection writes it
        (qkv,) = nv.randn_many(cp, seed, [(b, s, 3, h, d)], dtype)
        q, k, v = (qkv[:, :, i].swapaxes(1, 2) for i in range(3))
    (dout_s,) = nv.randn_many(cp, seed + 7, [(b, s, h, d)], dtype)
    dout = dout_s.swapaxes(-2, -3)
    assert not q.flags.c_contiguous and q.strides[-1] == q.itemsize
    inputs_before = [_bits(x).copy() for x in (q, k, v, dout)]

    res = fwd_bwd_all_families(q, k, v, dout, causal, poison_pool)
    contiguous = [cp.ascontiguousarray(x) for x in (q, k, v, dout)]
    res_c = fwd_bwd_all_families(*contiguous, causal, poison_pool)
    for fam in res:
        out, lse, _ = res[fam]
        out_c, lse_c, _ = res_c[fam]
        # same data, same kernel: the forward must be bit-identical
        assert bool((_bits(out) == _bits(out_c)).all()), f"out differs from contiguous ({fam})"
        assert bool(((lse == lse_c) | (cp.isneginf(lse) & cp.isneginf(lse_c))).all())
    for before, x in zip(inputs_before, (q, k, v, dout)):
        assert bool((before == _bits(x)).all()), "an input was modified"


@CAUSAL
@DTYPE
def test_noncontiguous_last_axis(dtype, causal, seed, poison_pool):
    """Last axis not contiguous (every other column, transposed, reversed): copied, correct."""
    b, h, sq, sk, d = 2, 2, 90, 110, 32
    q_wide, k_t, v_rev, dout_wide = nv.randn_many(
        cp, seed, [(b, h, sq, 2 * d), (b, h, d, sk), (b, h, sk, d), (b, h, sq, 2 * d)], dtype)
    q = q_wide[..., ::2]               # stride 2 elements
    k = k_t.swapaxes(-1, -2)           # stride Sk elements
    v = v_rev[..., ::-1]               # stride -1
    dout = dout_wide[..., 1::2]
    for x in (q, k, v, dout):
        assert x.strides[-1] != x.itemsize
    inputs_before = [_bits(x).copy() for x in (q, k, v, dout)]
    fwd_bwd_all_families(q, k, v, dout, causal, poison_pool)
    for before, x in zip(inputs_before, (q, k, v, dout)):
        assert bool((before == _bits(x)).all()), "an input was modified"


# ----------------------------------------------------------------------------
# sizes past the grid's y limit and past 2**31 elements
# ----------------------------------------------------------------------------

@CAUSAL
@pytest.mark.parametrize("case", ["batch", "mqa_heads"])
@pytest.mark.parametrize("dtype", [nv.BF16, nv.F32], ids=dtype_id)
def test_huge_batch(dtype, case, causal, seed, poison_pool):
    """Batch x heads = 70,000 > 65,535 (gridDim.y's limit), short sequences."""
    if case == "batch":
        shapes = [(70000, 1, 4, 32), (70000, 1, 6, 32), (70000, 1, 6, 32), (70000, 1, 4, 32)]
    else:  # 70,000 query heads sharing one k/v head: dk, dv sum over all of them
        shapes = [(1, 70000, 5, 32), (1, 1, 7, 32), (1, 1, 7, 32), (1, 70000, 5, 32)]
    q, k, v, dout = nv.randn_many(cp, seed, shapes, dtype)
    fwd_bwd_all_families(q, k, v, dout, causal, poison_pool)


# q, k, v of shape (131073, 128, 128): 2,147,500,032 elements each, just past
# 2**31 = 2,147,483,648, so the last batch element starts beyond any 32-bit
# offset; bfloat16 keeps each at 4.3 GB.  Also 131,073 > 65,535 batch CTAs.
BIG_BATCH, BIG_S, BIG_D = 2**31 // (128 * 128) + 1, 128, 128
BIG_ROWS = [0, 1, 65535, 65536, BIG_BATCH // 2, BIG_BATCH - 2, BIG_BATCH - 1]


def _require_free(gbytes):
    free, _ = cp.cuda.Device().mem_info
    if free < gbytes * 1e9:
        pytest.skip(f"needs > {gbytes} GB free GPU memory, {free / 1e9:.1f} GB free")


def _big_randn(seed, dtype):
    """(BIG_BATCH, BIG_S, BIG_D) standard normal, filled 8192 batch elements at a time."""
    x = cp.empty((BIG_BATCH, BIG_S, BIG_D), dtype)
    bits = x.view(cp.uint16)
    for i, start in enumerate(range(0, BIG_BATCH, 8192)):
        stop = min(start + 8192, BIG_BATCH)
        chunk = nv.randn(cp, seed + i, (stop - start, BIG_S, BIG_D), dtype)
        bits[start:stop] = chunk.view(cp.uint16)
    assert x.size > 2**31
    return x


def _no_nan_chunked(name, x):
    for start in range(0, x.shape[0], 8192):
        A.assert_no_nan(f"{name}[{start}:]", x[start:start + 8192])


@pytest.mark.bigmem
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_past_2_31_elements_forward(causal, seed, poison_pool):
    _require_free(20)
    dtype = nv.BF16
    q, k, v = (_big_randn(seed + 100_000 * i, dtype) for i in range(3))
    with poison_pool():
        out, lse = fc.attention(q, k, v, causal=causal, return_lse=True)
    assert out.shape == q.shape and lse.shape == q.shape[:-1]
    _no_nan_chunked("out", out)
    for b in BIG_ROWS:
        sl = slice(b, b + 1)
        check_forward(q[sl], k[sl], v[sl], out[sl], lse[sl], causal)


@pytest.mark.bigmem
def test_past_2_31_elements_backward(seed, poison_pool):
    _require_free(50)
    dtype, causal = nv.BF16, True
    q, k, v, dout = (_big_randn(seed + 100_000 * i, dtype) for i in range(4))
    out, lse = fc.attention(q, k, v, causal=causal, return_lse=True)
    with poison_pool():
        grads = fc.attention_backward(dout, q, k, v, out, lse, causal=causal)
    for name, g in zip(("dq", "dk", "dv"), grads):
        assert g.shape == q.shape
        _no_nan_chunked(name, g)
    for b in BIG_ROWS:
        sl = slice(b, b + 1)
        check_backward(dout[sl], q[sl], k[sl], v[sl], [g[sl] for g in grads], causal)
