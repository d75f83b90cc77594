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
FAMILIES = ["generic", "sm80"]
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
    unknown = set(variant) - {"window", "softcap", "alibi_slopes", "sink"}
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


def check_backward(dout, q, k, v, grads, causal, scale=None, **variant):
    """Checks (dq, dk, dv) of fc.attention_backward against the reference and
    the rule, and dsink (a fourth gradient) when ``variant`` has a sink."""
    window, sink = _variant_ids(variant)
    assert len(grads) == (3 if sink is None else 4), (
        f"{len(grads)} gradients, expected {3 if sink is None else 4}")
    refs = nv.attention_backward(dout, q, k, v, causal, scale, dtype=np.float64, **variant)
    naive = nv.attention_backward(dout, q, k, v, causal, scale, **variant)
    magnitude = max(float(abs(nv.to_f64(r)).max()) if r.size else 0.0 for r in refs[:3])
    for name, g, x, r, n in zip(("dq", "dk", "dv"), grads, (q, k, v), refs, naive):
        assert type(g) is type(x), f"{name}: {type(g)}, expected {type(x)}"
        assert g.dtype == x.dtype, f"{name} dtype {g.dtype}, expected {x.dtype}"
        assert g.shape == x.shape, f"{name} shape {g.shape}, expected the input's {x.shape}"
        A.assert_close(name, g, r, n, grad=True, magnitude=magnitude)
    if sink is not None:
        g = grads[3]
        assert type(g) is type(sink), f"dsink: {type(g)}, expected {type(sink)}"
        assert g.dtype == np.float32, f"dsink dtype {g.dtype}, expected float32"
        assert g.shape == sink.shape, f"dsink shape {g.shape}, expected the sink's {sink.shape}"
        A.assert_close("dsink", g, refs[3], naive[3], grad=True)
    A.assert_empty_rows(q.shape[-2], k.shape[-2], causal, dq=grads[0], window=window)
