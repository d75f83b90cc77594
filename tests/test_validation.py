"""Bad input raises before anything is allocated or launched, naming the argument.

The first part needs no GPU: host arrays (NumPy, PyTorch) are refused before
CuPy touches a device (on a machine without a GPU any device call would raise
a CUDA error instead of the TypeError asserted here), shape errors come from
the pure-Python ``flashcupy.api.broadcast_shapes``, and ``kernel_family``
checks its argument.  The second part runs the full error paths on the GPU,
under an allocator that counts allocations: a rejected call must make none.
"""
from __future__ import annotations

import contextlib
import re

import numpy as np
import pytest

import _naive as nv
from _grid import DTYPES, dtype_id

import flashcupy as fc
from flashcupy.api import broadcast_shapes


def _names(arg, message):
    """True when ``arg`` (e.g. 'q', 'dout') appears as a word in ``message``."""
    return re.search(rf"(?<![\w.]){re.escape(arg)}(?!\w)", message) is not None


# ----------------------------------------------------------------------------
# no GPU needed
# ----------------------------------------------------------------------------

def test_numpy_inputs_raise_typeerror():
    q = np.zeros((2, 8, 16), np.float32)
    with pytest.raises(TypeError, match=r"cupy\.asarray") as e:
        fc.attention(q, q, q)
    assert _names("q", str(e.value)), str(e.value)
    assert "(2, 8, 16)" in str(e.value) and "float32" in str(e.value), str(e.value)
    with pytest.raises(TypeError, match=r"cupy\.asarray") as e:
        fc.attention_backward(q, q, q, q, q, q[..., 0])
    assert any(_names(n, str(e.value)) for n in ("dout", "q")), str(e.value)


def test_torch_inputs_raise_typeerror():
    torch = pytest.importorskip("torch")
    q = torch.zeros((2, 8, 16))
    with pytest.raises(TypeError) as e:
        fc.attention(q, q, q, causal=True)
    msg = str(e.value)
    assert "flashcupy.torch" in msg, msg
    assert _names("q", msg), msg


@pytest.mark.parametrize("bad", [[[1.0, 2.0]], 3.0, None, "q"], ids=["list", "float", "none", "str"])
def test_non_array_inputs_raise_typeerror(bad):
    with pytest.raises(TypeError, match=r"cupy\.ndarray") as e:
        fc.attention(bad, bad, bad)
    assert _names("q", str(e.value)), str(e.value)


@pytest.mark.parametrize("shapes, expected", [
    (((2, 3, 5, 8), (2, 1, 7, 8), (2, 1, 7, 16)), ((2, 3, 5, 16), (2, 3, 5))),   # MQA, Dv != D
    (((2, 2, 3, 5, 8), (2, 2, 1, 7, 8), (2, 2, 1, 7, 8)), ((2, 2, 3, 5, 8), (2, 2, 3, 5))),  # GQA
    (((1, 3, 5, 8), (2, 3, 7, 8), (2, 3, 7, 8)), ((2, 3, 5, 8), (2, 3, 5))),     # q broadcast
    (((5, 8), (4, 7, 8), (7, 8)), ((4, 5, 8), (4, 5))),                          # ranks differ
    (((5, 1), (7, 1), (7, 256)), ((5, 256), (5,))),                              # D = 1, Dv = 256
    (((0, 5, 256), (1, 7, 256), (1, 7, 3)), ((0, 5, 3), (0, 5))),                # empty batch
    (((3, 0, 8), (3, 0, 8), (3, 0, 8)), ((3, 0, 8), (3, 0))),                    # Sq = Sk = 0
])
def test_broadcast_shapes(shapes, expected):
    assert broadcast_shapes(*shapes) == expected
    # agrees with numpy.matmul's own broadcasting
    q, k, v = (np.zeros(s) for s in shapes)
    assert (q @ np.swapaxes(k, -1, -2) @ v).shape == expected[0]


@pytest.mark.parametrize("shapes, names", [
    (((2, 5, 8), (2, 7, 16), (2, 7, 16)), ["q", "k"]),            # head dims differ
    (((2, 5, 8), (2, 7, 8), (2, 6, 8)), ["k", "v"]),              # key lengths differ
    (((2, 5, 8), (3, 7, 8), (3, 7, 8)), ["q", "k"]),              # batch dims don't broadcast
    (((2, 3, 5, 8), (2, 2, 7, 8), (2, 3, 7, 8)), ["k"]),          # ... in one input only
    (((8,), (7, 8), (7, 8)), ["q"]),                              # ndim < 2
    (((5, 8), (7, 8), (8,)), ["v"]),
    (((5, 257), (7, 257), (7, 8)), ["256"]),                      # D > 256
    (((5, 8), (7, 8), (7, 300)), ["v", "256"]),                   # Dv > 256
    (((5, 0), (7, 0), (7, 8)), []),                               # D = 0
    (((5, 8), (7, 8), (7, 0)), ["v"]),                            # Dv = 0
])
def test_broadcast_shapes_errors(shapes, names):
    with pytest.raises(ValueError) as e:
        broadcast_shapes(*shapes)
    msg = str(e.value)
    for n in names:
        assert _names(n, msg), f"{n!r} not named in: {msg}"


def test_kernel_family_rejects_unknown_names():
    with pytest.raises(ValueError, match="nope"):
        with fc.kernel_family("nope"):
            pass
    for name in ("auto", "generic", "sm80"):
        with fc.kernel_family(name):
            pass


# ----------------------------------------------------------------------------
# on the GPU: the full error paths
# ----------------------------------------------------------------------------

@pytest.fixture
def no_alloc():
    """``with no_alloc(): ...`` fails if the block allocates device memory."""
    import cupy as cp

    pool = cp.get_default_memory_pool()
    count = [0]

    def malloc(size):
        count[0] += 1
        return pool.malloc(size)

    @contextlib.contextmanager
    def guard():
        with cp.cuda.using_allocator(malloc):
            yield
        assert count[0] == 0, f"a rejected call allocated device memory {count[0]} time(s)"

    return guard


def _raises(no_alloc, exc, fn, *args, names=(), **kw):
    """Asserts fn(*args, **kw) raises exc, allocating nothing, and names ``names``."""
    with no_alloc():
        with pytest.raises(exc) as e:
            fn(*args, **kw)
    msg = str(e.value)
    for n in names:
        assert _names(n, msg) or n in msg, f"{n!r} not in: {msg}"
    return msg


def _arrays(cp, dtype, *shapes):
    return nv.randn_many(cp, 1234, shapes, dtype)


@pytest.mark.gpu
def test_gpu_mixed_and_unsupported_dtypes(no_alloc):
    import cupy as cp

    q, k, v = _arrays(cp, np.float16, (2, 5, 8), (2, 7, 8), (2, 7, 8))
    k32 = k.astype(np.float32)
    _raises(no_alloc, TypeError, fc.attention, q, k32, v, names=["k", "float16", "float32"])
    _raises(no_alloc, TypeError, fc.attention, q, k, v.astype(np.float64), names=["v", "float64"])
    for bad in (np.int32, np.int8, np.complex64, np.bool_):
        qb = cp.zeros((2, 5, 8), bad)
        _raises(no_alloc, TypeError, fc.attention, qb, qb, qb,
                names=["q", np.dtype(bad).name, "float16"])
    # a numpy array among cupy arrays is named
    _raises(no_alloc, TypeError, fc.attention, q, cp.asnumpy(k), v, names=["k", "cupy.asarray"])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_gpu_shape_errors(dtype, no_alloc):
    import cupy as cp

    def arr(*shape):
        return cp.zeros(shape, dtype)

    q, k, v = arr(2, 5, 8), arr(2, 7, 8), arr(2, 7, 8)
    _raises(no_alloc, ValueError, fc.attention, q, arr(2, 7, 16), v,
            names=["q", "k", "(2, 5, 8)", "(2, 7, 16)"])
    _raises(no_alloc, ValueError, fc.attention, q, k, arr(2, 6, 8), names=["k", "v", "(2, 6, 8)"])
    _raises(no_alloc, ValueError, fc.attention, q, arr(3, 7, 8), arr(3, 7, 8), names=["q", "k"])
    _raises(no_alloc, ValueError, fc.attention, arr(5, 257), arr(7, 257), arr(7, 8), names=["256"])
    _raises(no_alloc, ValueError, fc.attention, q, k, arr(2, 7, 257), names=["v", "256"])
    _raises(no_alloc, ValueError, fc.attention, arr(8), arr(7, 8), arr(7, 8), names=["q"])
    _raises(no_alloc, ValueError, fc.attention, cp.zeros((), dtype), k, v, names=["q"])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_gpu_backward_shape_errors(dtype, no_alloc):
    import cupy as cp

    q, k, v, dout = _arrays(cp, dtype, (2, 3, 5, 8), (2, 1, 7, 8), (2, 1, 7, 16), (2, 3, 5, 16))
    out, lse = fc.attention(q, k, v, return_lse=True)
    bwd = fc.attention_backward
    _raises(no_alloc, ValueError, bwd, dout[..., :8], q, k, v, out, lse,
            names=["dout", "(2, 3, 5, 8)", "(2, 3, 5, 16)"])
    _raises(no_alloc, ValueError, bwd, dout[:, :, :4], q, k, v, out, lse, names=["dout"])
    _raises(no_alloc, ValueError, bwd, dout, q, k, v, out[:1], lse, names=["out", "(1, 3, 5, 16)"])
    _raises(no_alloc, ValueError, bwd, dout, q, k, v, out, lse[..., :4], names=["lse", "(2, 3, 5)"])
    _raises(no_alloc, ValueError, bwd, dout, q, k, v, out, lse[..., None], names=["lse"])
    _raises(no_alloc, TypeError, bwd, cp.asnumpy(dout), q, k, v, out, lse, names=["dout"])
    _raises(no_alloc, TypeError, bwd, dout, q, k, v, out, cp.asnumpy(lse), names=["lse"])
    # the inputs themselves are validated as in the forward
    _raises(no_alloc, ValueError, bwd, dout, q, k[..., :4], v, out, lse, names=["q", "k"])


@pytest.mark.gpu
@pytest.mark.parametrize("scale", [float("nan"), float("inf"), float("-inf"), np.float32("nan")],
                         ids=["nan", "inf", "-inf", "np_nan"])
def test_gpu_scale_must_be_finite(scale, no_alloc):
    import cupy as cp

    q, k, v, dout = _arrays(cp, np.float32, (2, 5, 8), (2, 7, 8), (2, 7, 8), (2, 5, 8))
    _raises(no_alloc, ValueError, fc.attention, q, k, v, scale=scale, names=["scale"])
    out, lse = fc.attention(q, k, v, return_lse=True)
    _raises(no_alloc, ValueError, fc.attention_backward, dout, q, k, v, out, lse, scale=scale,
            names=["scale"])


@pytest.mark.gpu
@pytest.mark.parametrize("scale", ["0.5", 1 + 1j, [0.5], True], ids=["str", "complex", "list",
                                                                     "bool"])
def test_gpu_scale_must_be_real(scale, no_alloc):
    import cupy as cp

    q, k, v = _arrays(cp, np.float32, (2, 5, 8), (2, 7, 8), (2, 7, 8))
    _raises(no_alloc, (TypeError, ValueError), fc.attention, q, k, v, scale=scale,
            names=["scale"])


@pytest.mark.gpu
def test_gpu_forced_family_must_fit_dtype(no_alloc):
    import cupy as cp

    for dtype in (np.float32, np.float64):
        if "sm80" in fc.families_for(dtype):
            continue
        q, k, v = _arrays(cp, dtype, (2, 5, 8), (2, 7, 8), (2, 7, 8))
        with fc.kernel_family("sm80"):
            _raises(no_alloc, ValueError, fc.attention, q, k, v, names=["sm80"])


@pytest.mark.gpu
def test_gpu_families_for_rejects_bad_dtypes():
    with pytest.raises(TypeError):
        fc.families_for(np.int32)


@pytest.mark.gpu
def test_gpu_arrays_on_different_devices(no_alloc):
    import cupy as cp

    if cp.cuda.runtime.getDeviceCount() < 2:
        pytest.skip("needs 2 GPUs")
    with cp.cuda.Device(0):
        q, k, v, dout = _arrays(cp, np.float32, (2, 5, 8), (2, 7, 8), (2, 7, 8), (2, 5, 8))
        out, lse = fc.attention(q, k, v, return_lse=True)
    with cp.cuda.Device(1):
        k1, dout1 = cp.asarray(k), cp.asarray(dout)
    with cp.cuda.Device(0):
        _raises(no_alloc, ValueError, fc.attention, q, k1, v, names=["k", "device"])
        _raises(no_alloc, ValueError, fc.attention_backward, dout1, q, k, v, out, lse,
                names=["dout", "device"])
