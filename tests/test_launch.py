"""Kernel launches: the parameter block and the plans it is replayed from.

Every kernel takes one parameter struct (cuda_src/params.cuh), mirrored by
flashcupy/_params.py; a repeated call writes tensor pointers into the
prepacked block and calls cuLaunchKernel (flashcupy/_launch.py).  The layout
must be the one the compiler gives the struct: GPU-free, NVRTC compiles a
static_assert of every offset; on a GPU the driver reports each compiled
kernel's parameter size (cuFuncGetParamInfo).
"""
from __future__ import annotations

import ctypes

import ml_dtypes
import numpy as np
import pytest

from flashcupy import _params


def test_layout_natural_alignment():
    offs, size = _params.layout("fwd", 4)
    assert offs["q.ptr"] == (0, None) and offs["q.sr"][0] == 32 and offs["k.ptr"][0] == 40
    # five tensors of 40 bytes, then seven int32, two float32, then the variant struct
    # starting on its 8-byte alignment
    assert offs["nb0"][0] == 200 and offs["scale"][0] == 228 and offs["scale_log2"][0] == 232
    assert offs["var.window_left"][0] == 240
    # the pair arrays (bias, mask, dbias) follow the sink: a view and two strides each
    assert offs["var.bias.ptr"][0] == offs["var.sink_sg"][0] + 8
    assert offs["var.dbias_sg"][0] - offs["var.bias.ptr"][0] == 3 * (40 + 16) - 8
    # then dropout: two per-call words (pointer-like slots), the index view and its
    # group stride, the int32 threshold and two accumulator-typed scalars
    assert offs["var.dropout_seed"] == (offs["var.dbias_sg"][0] + 8, None)
    assert offs["var.dropout_offset"] == (offs["var.dropout_seed"][0] + 8, None)
    assert offs["var.dropout_index.ptr"][0] == offs["var.dropout_offset"][0] + 8
    assert offs["var.dropout_threshold"][0] == offs["var.dropout_index_sg"][0] + 8
    assert offs["var.dropout_keep"][0] == offs["var.dropout_threshold"][0] + 8
    # then the sequences (SeqArgs): five per-call words, three int64, a uint64 and
    # an int32, the struct padded to 8 bytes
    assert offs["seq.cu_q"] == (offs["var.dropout_keep"][0] + 8, None)
    assert offs["seq.table"] == (offs["seq.cu_q"][0] + 32, None)
    assert offs["seq.table_stride"][0] == offs["seq.table"][0] + 8
    assert offs["seq.page_magic"][0] == offs["seq.v_page_stride"][0] + 8
    assert offs["seq.page_size"][0] == offs["seq.page_magic"][0] + 8
    # then split-KV: two views, two int64 split strides and the int32 count,
    # padded to 8 bytes
    assert offs["o_part.ptr"][0] == offs["seq.page_size"][0] + 8
    assert offs["lse_part.ptr"][0] == offs["o_part.ptr"][0] + 40
    assert offs["o_part_ss"][0] == offs["lse_part.ptr"][0] + 40
    assert offs["n_splits"][0] == offs["lse_part_ss"][0] + 8
    assert size % 8 == 0 and size == offs["n_splits"][0] + 8
    offs64_, size64_ = _params.layout("fwd", 8)  # float64: rp on its 8-byte alignment
    assert offs64_["var.dropout_rp"][0] == offs64_["var.dropout_threshold"][0] + 8
    offs64, size64 = _params.layout("fwd", 8)
    assert offs64["scale"][0] == 232 and offs64["var.softcap_inv2"][0] == 256


def test_pack_writes_fields():
    buf, ptrs = _params.pack("bwd", 4, {"nb0": 3, "scale": 0.5, "var.window_right": 7,
                                        "q_sg": -5})
    offs, size = _params.layout("bwd", 4)
    assert buf.nbytes == size
    assert buf[offs["nb0"][0]:][:4].view(np.int32)[0] == 3
    assert buf[offs["scale"][0]:][:4].view(np.float32)[0] == 0.5
    assert buf[offs["var.window_right"][0]:][:4].view(np.int32)[0] == 7
    assert buf[offs["q_sg"][0]:][:8].view(np.int64)[0] == -5
    assert set(ptrs) >= {"q", "dq_accum", "var.alibi", "var.sink", "var.dropout_seed",
                         "var.dropout_offset", "var.dropout_index"}
    with pytest.raises(KeyError, match="not fields"):
        _params.pack("fwd", 4, {"n_group": 1})  # a backward-only field


@pytest.mark.parametrize("acc", [4, 8])
def test_layout_matches_the_compiler(acc):
    """NVRTC (no GPU) compiles static_asserts of every offset and the size: a
    field added on one side only fails here."""
    pytest.importorskip("cupy")
    from flashcupy import _compile
    try:
        from cupy.cuda import nvrtc  # noqa: F401
    except Exception:  # pragma: no cover
        pytest.skip("no NVRTC")
    if not _compile.has_builtin_offsetof():
        pytest.skip("this NVRTC has no __builtin_offsetof (the PyPI one, which CI uses, has)")
    t, a = ("fc_bf16", "float") if acc == 4 else ("double", "double")
    src = "\n".join([_compile.module_source("params.cuh"),
                     _params.offset_asserts("fwd", f"FwdParams<{t}, {a}>", acc),
                     _params.offset_asserts("bwd", f"BwdParams<{t}, {a}, {t}>", acc)])
    ok, log, _ = _compile.nvrtc_compile(src, "sm_80", [])
    assert ok, log
    bad = src.replace("static_assert(sizeof(", "static_assert(1 + sizeof(", 1)
    ok, _, _ = _compile.nvrtc_compile(bad, "sm_80", [])
    assert not ok  # the check can fail


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
                # one parameter: the struct, of exactly the packed size
                assert _driver_param_layout(lau.fptr) == [(0, lau.buf.nbytes)], lau.name
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
    fams = [f for f in fc.families_for(bf16) if f != "generic"]
    if not fams:
        pytest.skip("no tensor-core family on this GPU")
    plans = _plans_of_calls(fc, api, cp, bf16, fams[-1])
    names = {k: [st[1].name for st in p.steps if st[0] == "launch"] for k, p in plans.items()}
    assert any("dkdvq" in n for n in names["bwd"]), names["bwd"]
    assert not any("dkdvq" in n for n in names["bwd-det"]), names["bwd-det"]
