"""GPU backward tests: the forward grid again, for dq, dk, dv.

The kernels' forward gives (out, lse); the backward runs under the NaN
poison; each gradient is held to the tolerance rule (gradient floors) against
float64 gradients computed on the GPU from float64 math, with the naive
same-dtype gradients setting the allowance.  Rows that see no key get dq = 0.
"""
from __future__ import annotations

import pytest

import _assert as A
import _naive as nv
from _grid import (BATCH, DTYPES, FAMILIES, HEAD_DIMS, SEQLENS, check_backward, dtype_id, family,
                   seq_id)

cp = pytest.importorskip("cupy")
import flashcupy as fc  # noqa: E402

pytestmark = pytest.mark.gpu


def run_backward(q, k, v, dout, causal, poison_pool, scale=None, **kw):
    out, lse = fc.attention(q, k, v, causal=causal, scale=scale, return_lse=True)
    with poison_pool():
        return fc.attention_backward(dout, q, k, v, out, lse, causal=causal, scale=scale, **kw)


@pytest.mark.parametrize("seqlens", SEQLENS, ids=seq_id)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("d", HEAD_DIMS, ids=lambda d: f"d{d}")
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("fam", FAMILIES)
def test_backward(fam, dtype, d, causal, seqlens, seed, poison_pool):
    sq, sk = seqlens
    q, k, v, dout = nv.randn_many(
        cp, seed, [BATCH + (sq, d), BATCH + (sk, d), BATCH + (sk, d), BATCH + (sq, d)], dtype)
    with family(fam, dtype):
        grads = run_backward(q, k, v, dout, causal, poison_pool)
    check_backward(dout, q, k, v, grads, causal)


@pytest.mark.parametrize("scale", [0.05, 2.5])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_backward_scale(dtype, scale, seed, poison_pool):
    q, k, v, dout = nv.randn_many(
        cp, seed, [(2, 2, 70, 64), (2, 2, 90, 64), (2, 2, 90, 64), (2, 2, 70, 64)], dtype)
    for fam in fc.families_for(dtype):
        for causal in (False, True):
            with fc.kernel_family(fam):
                grads = run_backward(q, k, v, dout, causal, poison_pool, scale=scale)
            check_backward(dout, q, k, v, grads, causal, scale)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_deterministic(dtype, causal, seed, poison_pool):
    """deterministic=True: bit-identical over two calls, and as accurate as the default.

    Several query tiles per key tile, several key tiles per query tile, and
    MQA (dk, dv summed over 4 query heads): every place an implementation
    might accumulate with atomics.
    """
    q, k, v, dout = nv.randn_many(
        cp, seed, [(2, 4, 600, 64), (2, 1, 700, 64), (2, 1, 700, 64), (2, 4, 600, 64)], dtype)
    for fam in fc.families_for(dtype):
        with fc.kernel_family(fam):
            first = run_backward(q, k, v, dout, causal, poison_pool, deterministic=True)
            second = run_backward(q, k, v, dout, causal, poison_pool, deterministic=True)
            default = run_backward(q, k, v, dout, causal, poison_pool)
        for name, a, b in zip(("dq", "dk", "dv"), first, second):
            A.assert_no_nan(name, a)
            same = bool((nv.to_f64(a) == nv.to_f64(b)).all())
            assert same, f"{name} ({fam}): deterministic=True gave different bits on a second call"
        check_backward(dout, q, k, v, first, causal)
        check_backward(dout, q, k, v, default, causal)
