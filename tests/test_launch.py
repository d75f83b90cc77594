"""Kernel launches: the packed argument buffer and the plans it is replayed from.

A repeated call writes tensor pointers into a prepacked argument buffer and
calls cuLaunchKernel (flashcupy/_launch.py).  The buffer layout must be the one
the driver reads; on a GPU it is compared with what the driver reports for
each compiled kernel (cuFuncGetParamInfo).
"""
from __future__ import annotations

import ctypes

import ml_dtypes
import numpy as np
import pytest

from flashcupy import _launch


def test_pack_args_alignment():
    args = [None, np.int64(-3), np.int32(1), np.int32(2), np.int32(5), np.float32(1.5), None,
            np.float64(2.0), np.int32(7)]
    buf, ptrs, layout = _launch.pack_args(args)
    assert layout == [(0, 8), (8, 8), (16, 4), (20, 4), (24, 4), (28, 4), (32, 8), (40, 8),
                      (48, 4)]
    assert ptrs == [0, 32]
    assert buf.nbytes == 52  # exactly the parameters' extent: the driver checks the size
    assert buf.base.nbytes == 56  # pointers are written through a uint64 view
    assert buf[8:16].view(np.int64)[0] == -3
    assert buf[28:32].view(np.float32)[0] == 1.5
    assert buf[40:48].view(np.float64)[0] == 2.0
    assert buf[48:52].view(np.int32)[0] == 7
    assert not buf[0:8].any() and not buf[32:40].any()  # pointers: written at launch


# ---------------------------------------------------------------------------
# GPU
# ---------------------------------------------------------------------------
def _driver_param_layout(fptr):
    """[(offset, size)] of a kernel's parameters, from the driver (CUDA >= 12.4)."""
    lib = ctypes.CDLL("libcuda.so.1")
    fn = getattr(lib, "cuFuncGetParamInfo", None)
    if fn is None:
        pytest.skip("the driver has no cuFuncGetParamInfo")
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_size_t),
                   ctypes.POINTER(ctypes.c_size_t)]
    out, i = [], 0
    while True:
        off, size = ctypes.c_size_t(), ctypes.c_size_t()
        if fn(ctypes.c_void_p(fptr), i, ctypes.byref(off), ctypes.byref(size)) != 0:
            return out
        out.append((off.value, size.value))
        i += 1


def _plans_of_calls(fc, api, cp, dtype, fam):
    """Runs a forward and both backward paths; returns their plans."""
    rng = cp.random.default_rng(7)
    q, k, v, do = (rng.standard_normal((1, 2, 100, 64), dtype=cp.float32).astype(dtype)
                   for _ in range(4))
    plans = {}
    with fc.kernel_family(fam):
        out, lse = fc.attention(q, k, v, causal=True, return_lse=True)
        plans["fwd"] = api.cached_plan("fwd", (q, k, v), True, None)
        for det in (False, True):
            fc.attention_backward(do, q, k, v, out, lse, causal=True, deterministic=det)
            kind = "bwd-det" if det else "bwd"
            plans[kind] = api.cached_plan(kind, (do, q, k, v, out, lse), True, None)
    return plans


@pytest.mark.gpu
@pytest.mark.parametrize("dtype_name", ["bfloat16", "float16", "float32", "float64"])
def test_packed_layout_matches_driver(dtype_name):
    cp = pytest.importorskip("cupy")
    import flashcupy as fc
    from flashcupy import api

    dtype = np.dtype(ml_dtypes.bfloat16) if dtype_name == "bfloat16" else np.dtype(dtype_name)
    checked = 0
    for fam in fc.families_for(dtype):
        for kind, plan in _plans_of_calls(fc, api, cp, dtype, fam).items():
            assert plan is not None, f"{fam} {kind}: no plan was cached"
            for st in plan.steps:
                if st[0] != "launch":
                    continue
                lau = st[1]
                assert lau.param_layout == _driver_param_layout(lau.fptr), lau.name
                checked += 1
    assert checked >= 4


@pytest.mark.gpu
def test_deterministic_is_part_of_the_plan():
    """A deterministic=True call after a default one with the same arguments must
    not replay the default's plan (atomic dQ)."""
    cp = pytest.importorskip("cupy")
    import flashcupy as fc
    from flashcupy import api

    bf16 = np.dtype(ml_dtypes.bfloat16)
    if "sm80" not in fc.families_for(bf16):
        pytest.skip("no tensor-core family on this GPU")
    plans = _plans_of_calls(fc, api, cp, bf16, "sm80")
    names = {k: [st[1].name for st in p.steps if st[0] == "launch"] for k, p in plans.items()}
    assert any("dkdvq" in n for n in names["bwd"]), names["bwd"]
    assert not any("dkdvq" in n for n in names["bwd-det"]), names["bwd-det"]
