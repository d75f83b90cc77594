"""The GPU test grid and small shared helpers (ids, family selection)."""
from __future__ import annotations

import numpy as np
import pytest

import _assert as A
import _naive as nv

DTYPES = list(nv.DTYPES)
HEAD_DIMS = [1, 8, 16, 32, 40, 59, 64, 80, 96, 128, 160, 192, 256]
# awkward lengths: single rows/keys, non-multiples of every tile size, Sq > Sk
# (causal rows that see no key), one large square case, and empty axes
SEQLENS = [(1, 1), (1, 1000), (17, 97), (128, 128), (255, 257), (1000, 17), (2048, 2048),
           (0, 5), (5, 0)]
FAMILIES = ["generic", "sm80", "f64mma"]
BATCH = (1, 2)  # (B, H): small, so the ~1900-case grids stay fast


def dtype_id(d):
    return nv.DTYPE_IDS[np.dtype(d)]


def seq_id(s):
    return f"{s[0]}x{s[1]}"


def lse_dtype(dtype):
    return np.dtype(np.float64) if np.dtype(dtype) == nv.F64 else np.dtype(np.float32)


def family(name, dtype):
    """``fc.kernel_family(name)``, or skip when this GPU has no such family for dtype."""
    import flashcupy as fc

    available = fc.families_for(dtype)
    if name not in available:
        pytest.skip(f"family {name!r} not available for {dtype_id(dtype)} here ({available})")
    return fc.kernel_family(name)


def _variant_ids(variant):
    unknown = set(variant) - {"window", "softcap", "alibi_slopes", "sink", "bias", "mask",
                              "bias_grad", "dropout_p", "seed", "offset", "dropout_batch"}
    if unknown:
        raise TypeError(f"unknown variant keywords {sorted(unknown)}")
    return variant.get("window"), variant.get("sink")


def check_forward(q, k, v, out, lse, causal, scale=None, **variant):
    """Checks (out, lse) of fc.attention against the reference and the rule.

    ``variant``: the keywords of the call (window, softcap, alibi_slopes, sink),
    passed on to the references."""
    window, sink = _variant_ids(variant)
    dtype = q.dtype
    sq, sk = q.shape[-2], k.shape[-2]
    batch = nv.batch_shape(q, k, v)
    assert out.dtype == dtype, f"out dtype {out.dtype}, expected {dtype}"
    assert lse.dtype == lse_dtype(dtype), f"lse dtype {lse.dtype}, expected {lse_dtype(dtype)}"
    assert out.shape == batch + (sq, v.shape[-1])
    assert lse.shape == batch + (sq,)
    out_r, lse_r = nv.attention(q, k, v, causal, scale, dtype=np.float64, **variant)
    out_n, lse_n = nv.attention(q, k, v, causal, scale, **variant)
    A.assert_close("out", out, out_r, out_n)
    A.assert_close("lse", lse, lse_r, lse_n)
    A.assert_empty_rows(sq, sk, causal, out=out, lse=lse if sink is None else None,
                        window=window)


def dsink_formula(dout, out, lse, sink, cdt):
    """``dsink = -sum_i exp(sink - lse_i) * (dO_i . O_i)`` from the (out, lse) the
    backward was given, in ``cdt`` (float32 or float64), summed onto the sink's
    shape; also the same sum of the terms' absolute values (their magnitude)."""
    xp = nv.xp_of(lse)
    batch = tuple(lse.shape[:-1])
    o = xp.broadcast_to(nv.to_f64(out).astype(cdt), batch + out.shape[-2:])
    do = xp.broadcast_to(nv.to_f64(dout).astype(cdt), o.shape)
    l = lse.astype(cdt)
    z = xp.broadcast_to(sink.astype(cdt), batch)[..., None]
    off = xp.isneginf(l) | xp.isneginf(z)
    p_sink = xp.where(off, 0, xp.exp(xp.where(off, 0, z - xp.where(off, 0, l))))
    terms = p_sink * (do * o).sum(axis=-1)
    return (nv.sum_to_shape(-terms.sum(axis=-1), sink.shape),
            nv.sum_to_shape(xp.abs(terms).sum(axis=-1), sink.shape))


def check_dsink(dsink, dout, out, lse, sink, dtype):
    """Checks dsink of fc.attention_backward: its shape, and its value as the
    function of the backward's inputs that the API defines.

    dsink depends on q, k, v only through the out and lse the backward is
    handed (delta_i = dO_i . O_i with O in the dtype), and those are held to the
    rule by the forward check.  So it is compared with the float64 formula on
    those very inputs; the allowance is the same formula in the compute dtype
    (float32 for 16-bit inputs: what a kernel can do at best), and the floor is
    taken at the sum of the terms' absolute values (the sum over rows and
    broadcast axes cancels).  Comparing with the exact dsink instead would
    charge the kernel for the output rounding of O, by which a framework's
    naive dsink (from P and dP) is not affected.
    """
    assert type(dsink) is type(sink), f"dsink: {type(dsink)}, expected {type(sink)}"
    assert dsink.dtype == np.float32, f"dsink dtype {dsink.dtype}, expected float32"
    assert dsink.shape == sink.shape, f"dsink shape {dsink.shape}, expected the sink's {sink.shape}"
    ref, mag = dsink_formula(dout, out, lse, sink, nv.F64)
    naive, _ = dsink_formula(dout, out, lse, sink, nv.compute_dtype(dtype))
    A.assert_close("dsink", dsink, ref, naive, grad=True,
                   magnitude=float(mag.max()) if mag.size else 0.0)


def check_backward(dout, q, k, v, grads, causal, scale=None, *, fwd=None, **variant):
    """Checks (dq, dk, dv) of fc.attention_backward against the reference and
    the rule, and dsink (a fourth gradient) when ``variant`` has a sink; that
    needs ``fwd``, the (out, lse) the backward was given (see check_dsink)."""
    window, sink = _variant_ids(variant)
    n_expected = 3 + (sink is not None) + bool(variant.get("bias_grad"))
    assert len(grads) == n_expected, f"{len(grads)} gradients, expected {n_expected}"
    refs = nv.attention_backward(dout, q, k, v, causal, scale, dtype=np.float64, **variant)
    naive = nv.attention_backward(dout, q, k, v, causal, scale, **variant)
    magnitude = max(float(abs(nv.to_f64(r)).max()) if r.size else 0.0 for r in refs[:3])
    for name, g, x, r, n in zip(("dq", "dk", "dv"), grads, (q, k, v), refs, naive):
        assert type(g) is type(x), f"{name}: {type(g)}, expected {type(x)}"
        assert g.dtype == x.dtype, f"{name} dtype {g.dtype}, expected {x.dtype}"
        assert g.shape == x.shape, f"{name} shape {g.shape}, expected the input's {x.shape}"
        A.assert_close(name, g, r, n, grad=True, magnitude=magnitude)
    if sink is not None:
        if fwd is None:
            raise TypeError("check_backward: a sink needs fwd=(out, lse), the backward's inputs")
        check_dsink(grads[3], dout, fwd[0], fwd[1], sink, q.dtype)
    if variant.get("bias_grad"):
        bias = variant["bias"]
        db = grads[-1]
        assert db.dtype == bias.dtype and db.shape == bias.shape, (
            f"dbias {db.dtype} {db.shape}, expected the bias's {bias.dtype} {bias.shape}")
        A.assert_close("dbias", db, refs[-1], naive[-1], grad=True,
                       magnitude=max(magnitude, float(abs(nv.to_f64(refs[-1])).max())))
    A.assert_empty_rows(q.shape[-2], k.shape[-2], causal, dq=grads[0], window=window)
