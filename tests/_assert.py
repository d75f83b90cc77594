"""The tolerance rule, written once.

flash-attn's rule: the kernel's error against a high-precision reference may
be at most twice the error of a naive implementation in the same dtype,
plus a small floor::

    max|kernel - ref|  <=  2 * max|naive - ref|  +  floor

The factor 2 lets a kernel round in a different order than the naive code;
the rule scales with whatever the dtype and the problem make hard (long
rows, large head dims) with no hand-tuned per-case numbers.

The floor covers cases where the naive error is (nearly) zero, e.g. Sk = 1
(softmax is exactly 1, out == v) or Sq = 0.  It is measured in units of the
dtype's epsilon at the output magnitude, like flash-attn's
``2 * (ref + 0.3 - 0.3 - ref).abs().max()`` (two roundings at |ref| + 0.3):

    floor = ULPS[dtype] * eps(dtype) * (max|ref| + 0.3)

* float16, bfloat16: 2 ulps, flash-attn's floor: one rounding of the output
  on either side.
* float32: forward 8 ulps, gradients 16 ulps.  The kernels accumulate in
  float32 in a different order from cuBLAS (sequential FMA chains over D,
  online-softmax rescaling once per key tile, gradient sums over up to 2048
  rows), so a few more roundings than the naive code are expected; 8-16 ulps
  is still ~1e-6 relative, far below any real bug.
* float64: the naive float64 implementation *is* the reference, so the
  2x term vanishes and the floor is the whole tolerance.  2**16 ulps
  (forward) and 2**18 ulps (gradients) are ~1.5e-11 and ~6e-11 relative:
  room for float64 accumulations of a few thousand terms, yet 4 orders of
  magnitude below float32's epsilon (1.2e-7), so a float64 kernel that
  silently computes anything in float32 fails.

The floor uses the dtype of the compared array, so float32 LSEs of 16-bit
inputs get float32 floors.
"""
from __future__ import annotations

import ml_dtypes
import numpy as np

import _naive as nv

FWD_FLOOR_ULPS = {nv.F16: 2, nv.BF16: 2, nv.F32: 8, nv.F64: 2**16}
GRAD_FLOOR_ULPS = {nv.F16: 2, nv.BF16: 2, nv.F32: 16, nv.F64: 2**18}


def eps(dtype) -> float:
    return float(ml_dtypes.finfo(np.dtype(dtype)).eps)


def floor(dtype, ref_absmax: float, ulps_table) -> float:
    dtype = np.dtype(dtype)
    return ulps_table[dtype] * eps(dtype) * (ref_absmax + 0.3)


def _max(x) -> float:
    return float(x.max()) if x.size else 0.0


def assert_no_nan(name, x):
    xp = nv.xp_of(x)
    bad = xp.isnan(nv.to_f64(x))
    if bool(bad.any()):
        idx = tuple(int(i) for i in xp.argwhere(bad)[0])
        raise AssertionError(
            f"{name}: {int(bad.sum())} NaN of {x.size} (first at {idx}); an unwritten "
            f"output element reads as NaN under poison_pool")


def assert_close(name, actual, ref, naive, *, grad=False, ulps=None, magnitude=0.0):
    """Asserts ``actual`` meets the rule against ``ref`` (float64) given ``naive``.

    ``-inf`` entries (the LSE of rows that see no key) must sit exactly where
    the reference has them; the rule applies to the finite rest.  Shapes must
    match exactly; NaN anywhere fails.

    ``magnitude``: the size of the quantities this output is computed from, when
    it exceeds the output's own (the floor scales with the larger).  Gradients
    pass the largest of |dq|, |dk|, |dv|: all three come from the same dO and P,
    and dq, dk are sums of P (dP - delta) terms that can cancel to ~0 (one key:
    dP = delta exactly in real arithmetic) while each term keeps the size of dO V.
    """
    xp = nv.xp_of(actual)
    assert tuple(actual.shape) == tuple(ref.shape), (
        f"{name}: shape {tuple(actual.shape)} != expected {tuple(ref.shape)}")
    assert_no_nan(name, actual)
    a = nv.to_f64(actual)
    r = nv.to_f64(ref)
    n = xp.broadcast_to(nv.to_f64(naive), r.shape)
    ref_ninf = xp.isneginf(r)
    if not bool((xp.isneginf(a) == ref_ninf).all()):
        raise AssertionError(
            f"{name}: -inf pattern differs from the reference: {int(xp.isneginf(a).sum())} "
            f"-inf entries, expected {int(ref_ninf.sum())}")
    fin = ~ref_ninf
    if not bool(xp.isfinite(a[fin]).all()):
        raise AssertionError(f"{name}: non-finite values where the reference is finite")
    # compare the finite entries only (zero the -inf ones on all three sides)
    a, r, n = (xp.where(fin, x, 0.0) for x in (a, r, n))
    err_map = xp.abs(a - r)
    err = _max(err_map)
    naive_err = _max(xp.abs(n - r))
    ref_max = max(_max(xp.abs(r)), magnitude)
    table = ulps or (GRAD_FLOOR_ULPS if grad else FWD_FLOOR_ULPS)
    fl = floor(actual.dtype, ref_max, table)
    tol = 2.0 * naive_err + fl
    if not err <= tol:
        idx = tuple(int(i) for i in np.unravel_index(int(err_map.argmax()), err_map.shape))
        raise AssertionError(
            f"{name} ({nv.DTYPE_IDS.get(np.dtype(actual.dtype), actual.dtype)}): max error "
            f"{err:.3e} at {idx} (got {float(a[idx]):.6g}, ref {float(r[idx]):.6g}) > tolerance "
            f"{tol:.3e} = 2 x naive error {naive_err:.3e} + floor {fl:.3e} (max|ref| {ref_max:.3g})")
    return err, tol


def assert_empty_rows(seqlen_q, seqlen_k, causal, out=None, lse=None, dq=None, window=None):
    """Rows that see no key: out == 0, lse == -inf, dq == 0, exactly (pass no
    lse with a sink: there it is the sink, checked by the rule)."""
    n = nv.empty_rows(seqlen_q, seqlen_k, causal, window)
    if n == 0:
        return
    if out is not None:
        rows = nv.to_f64(out[..., :n, :])
        assert bool((rows == 0).all()), f"out: rows that see no key must be exactly 0 (first {n})"
    if lse is not None:
        rows = lse[..., :n]
        assert bool(nv.xp_of(rows).isneginf(rows).all()), (
            f"lse: rows that see no key must be exactly -inf (first {n})")
    if dq is not None:
        rows = nv.to_f64(dq[..., :n, :])
        assert bool((rows == 0).all()), f"dq: rows that see no key must be exactly 0 (first {n})"
