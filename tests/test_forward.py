"""GPU forward tests: the full grid, dtype x head dim x causal x awkward lengths x family.

Every case: fresh random inputs (seeded by test id), outputs allocated from a
NaN-poisoned pool (so an unwritten element fails), out and lse checked with
the tolerance rule of _assert.py against a float64 reference computed on the
GPU, and rows that see no key checked to be exactly out = 0, lse = -inf.
"""
from __future__ import annotations

import math

import pytest

import _naive as nv
from _grid import (BATCH, DTYPES, FAMILIES, HEAD_DIMS, SEQLENS, check_forward, dtype_id, family,
                   seq_id)

cp = pytest.importorskip("cupy")
import flashcupy as fc  # noqa: E402

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("seqlens", SEQLENS, ids=seq_id)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("d", HEAD_DIMS, ids=lambda d: f"d{d}")
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("fam", FAMILIES)
def test_forward(fam, dtype, d, causal, seqlens, seed, poison_pool):
    sq, sk = seqlens
    q, k, v = nv.randn_many(cp, seed, [BATCH + (sq, d), BATCH + (sk, d), BATCH + (sk, d)], dtype)
    with family(fam, dtype), poison_pool():
        out, lse = fc.attention(q, k, v, causal=causal, return_lse=True)
    check_forward(q, k, v, out, lse, causal)


@pytest.mark.parametrize("scale", [0.05, 1.0, 2.5])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_forward_scale(dtype, causal, scale, seed, poison_pool):
    q, k, v = nv.randn_many(cp, seed, [(2, 3, 70, 64), (2, 3, 90, 64), (2, 3, 90, 64)], dtype)
    for fam in fc.families_for(dtype):
        with fc.kernel_family(fam), poison_pool():
            out, lse = fc.attention(q, k, v, causal=causal, scale=scale, return_lse=True)
        check_forward(q, k, v, out, lse, causal, scale)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_return_lse_false_and_auto_family(dtype, seed, poison_pool):
    q, k, v = nv.randn_many(cp, seed, [(2, 100, 96), (2, 130, 96), (2, 130, 96)], dtype)
    with poison_pool():
        out = fc.attention(q, k, v, causal=True)
    assert isinstance(out, cp.ndarray)
    out_auto, lse_auto = fc.attention(q, k, v, causal=True, return_lse=True)
    with fc.kernel_family("auto"):
        out_auto2 = fc.attention(q, k, v, causal=True)
    assert bool((nv.to_f64(out) == nv.to_f64(out_auto)).all())
    assert bool((nv.to_f64(out) == nv.to_f64(out_auto2)).all())
    check_forward(q, k, v, out_auto, lse_auto, causal=True)


def test_families_for():
    cc = int(cp.cuda.Device().compute_capability)  # e.g. "90" -> 90
    for dtype in DTYPES:
        fams = fc.families_for(dtype)
        assert isinstance(fams, tuple) and "generic" in fams, (dtype_id(dtype), fams)
        if dtype in (nv.F32, nv.F64):
            assert "sm80" not in fams, (dtype_id(dtype), fams)
        elif cc >= 80:
            assert "sm80" in fams, (dtype_id(dtype), fams)
        assert ("sm90" in fams) == (cc == 90 and dtype not in (nv.F32, nv.F64)), fams
        assert ("f64mma" in fams) == (cc >= 80 and dtype == nv.F64), fams


def test_output_is_deterministic(seed):
    """Two forward calls give bit-identical results (no atomics in the forward)."""
    for dtype in DTYPES:
        q, k, v = nv.randn_many(cp, seed, [(1, 2, 300, 64), (1, 2, 333, 64), (1, 2, 333, 64)],
                                dtype)
        for fam in fc.families_for(dtype):
            with fc.kernel_family(fam):
                a, la = fc.attention(q, k, v, causal=True, return_lse=True)
                b, lb = fc.attention(q, k, v, causal=True, return_lse=True)
            assert bool((nv.to_f64(a) == nv.to_f64(b)).all()), (dtype_id(dtype), fam)
            assert bool(((la == lb) | (cp.isneginf(la) & cp.isneginf(lb))).all())


def test_large_scores_are_stable(seed, poison_pool):
    """Scores of magnitude ~100: exp would overflow without the running max."""
    for dtype in DTYPES:
        q, k, v = nv.randn_many(cp, seed, [(1, 1, 64, 32), (1, 1, 200, 32), (1, 1, 200, 32)],
                                dtype)
        q = nv.cast(nv.upcast(q, dtype) * 20, dtype)
        scale = 1.0 / math.sqrt(32)
        for fam in fc.families_for(dtype):
            with fc.kernel_family(fam), poison_pool():
                out, lse = fc.attention(q, k, v, return_lse=True)
            check_forward(q, k, v, out, lse, causal=False, scale=scale)
