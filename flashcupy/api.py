"""NumPy-style entry points on ``cupy.ndarray``.

Data flows one way: validate -> pick a kernel configuration -> compile (memoized)
-> launch.  Everything that can be wrong with the arguments is checked here,
before any allocation or launch; the messages name the argument, what it got,
and what was expected.
"""
from __future__ import annotations

import dataclasses
import functools
import itertools
import math
import numpy as np

from . import _batch, _config, _dtypes, _launch, _pack, _philox, _plan, _split
from ._problem import Features, Problem
from ._spec import VF_SPLIT

try:
    import cupy
except ImportError as e:  # exercised by tests/test_cpu_only.py
    # The commands must work as typed: flashcupy is installed from a checkout,
    # so name CuPy's own packages (and the checkout's extras), not flashcupy's.
    raise ImportError(
        "flashcupy.attention needs CuPy, which is not installed. Install the CuPy for the "
        "CUDA major version your NVIDIA driver supports (`nvidia-smi` shows it): "
        "`pip install \"cupy-cuda13x[ctk]\"` (CUDA 13, driver >= 580) or "
        "`pip install \"cupy-cuda12x[ctk]\"` (CUDA 12, driver >= 525); from a flashcupy "
        "checkout, `pip install -e \".[cuda13]\"` (or `.[cuda12]`) does the same. "
        "flashcupy.reference runs without CuPy.") from e


# ---------------------------------------------------------------------------
# Shapes
# ---------------------------------------------------------------------------
def _fmt(x) -> str:
    return f"shape {tuple(x.shape)} and dtype {x.dtype}"


def broadcast_shapes(q_shape, k_shape, v_shape):
    """Output shapes of ``attention`` for inputs of the given shapes.

    Returns ``(out_shape, lse_shape)``: ``(*batch, Sq, Dv)`` and ``(*batch, Sq)``,
    where ``batch`` is the numpy.matmul broadcast of the three leading shapes.
    Pure Python: raises ``ValueError`` naming the offending arguments.
    """
    q_shape, k_shape, v_shape = tuple(q_shape), tuple(k_shape), tuple(v_shape)
    for name, s in (("q", q_shape), ("k", k_shape), ("v", v_shape)):
        if len(s) < 2:
            raise ValueError(f"{name} must have at least 2 dimensions (..., S, D), got shape {s}")
    if q_shape[-1] != k_shape[-1]:
        raise ValueError(f"q and k must have the same head dim (last axis): q has shape "
                         f"{q_shape}, k has shape {k_shape}")
    if k_shape[-2] != v_shape[-2]:
        raise ValueError(f"k and v must have the same sequence length (axis -2): k has shape "
                         f"{k_shape}, v has shape {v_shape}")
    for name, d in (("q/k head dim", q_shape[-1]), ("v head dim", v_shape[-1])):
        if d > _config.MAX_HEAD_DIM:
            raise ValueError(f"{name} is {d}; flashcupy supports head dims up to "
                             f"{_config.MAX_HEAD_DIM}")
        if d < 1:
            raise ValueError(f"{name} is {d}; head dims must be at least 1")
    try:
        bshape = np.broadcast_shapes(q_shape[:-2], k_shape[:-2], v_shape[:-2])
    except ValueError:
        raise ValueError(
            f"the batch dimensions of q, k and v do not broadcast (numpy.matmul rules): "
            f"q {q_shape[:-2]}, k {k_shape[:-2]}, v {v_shape[:-2]} "
            f"(full shapes q {q_shape}, k {k_shape}, v {v_shape})") from None
    return bshape + (q_shape[-2], v_shape[-1]), bshape + (q_shape[-2],)


# ---------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------
def _check_array(fn: str, name: str, x):
    if isinstance(x, cupy.ndarray):
        return
    mod = type(x).__module__.split(".")[0]
    if mod == "torch":
        raise TypeError(
            f"{fn}: {name} is a torch.Tensor; this function takes cupy.ndarray. Use "
            f"flashcupy.torch.attention for tensors (autograd, torch streams), or convert "
            f"without a copy with cupy.from_dlpack({name})")
    if isinstance(x, np.ndarray):
        raise TypeError(
            f"{fn}: {name} is a numpy.ndarray with {_fmt(x)}; flashcupy runs on the GPU and "
            f"takes cupy.ndarray: pass cupy.asarray({name})")
    raise TypeError(f"{fn}: {name} must be a cupy.ndarray, got {type(x).__module__}."
                    f"{type(x).__qualname__}")


def _check_dtype(fn: str, name: str, x):
    if not _dtypes.is_supported(x.dtype):
        raise TypeError(f"{fn}: {name} has {_fmt(x)}; supported dtypes are "
                        f"{_dtypes.describe_supported()}")


def _no_gpu_error(e: Exception) -> RuntimeError:
    return RuntimeError(
        f"no CUDA GPU or driver found ({e}). flashcupy's kernels need an NVIDIA GPU whose "
        f"driver supports this CuPy's CUDA version (CUDA "
        f"{cupy.cuda.runtime.runtimeGetVersion() // 1000}); `nvidia-smi` lists the GPUs and "
        f"the highest CUDA version the driver supports. flashcupy.reference runs on the CPU.")


def _device_id(device=None) -> int:
    """The CUDA device id of ``device`` (int or cupy Device; None: the current one)."""
    try:
        if device is None:
            return cupy.cuda.runtime.getDevice()
        return cupy.cuda.Device(device).id
    except cupy.cuda.runtime.CUDARuntimeError as e:
        # Without a driver (or a GPU) CUDA answers cudaErrorInsufficientDriver or
        # cudaErrorNoDevice, which reads like a version problem; say what it is.
        if not cupy.cuda.is_available():
            raise _no_gpu_error(e) from None
        raise


@functools.lru_cache(maxsize=None)
def _compute_capability(device_id: int) -> int:
    try:
        return int(cupy.cuda.Device(device_id).compute_capability)
    except cupy.cuda.runtime.CUDARuntimeError as e:
        if not cupy.cuda.is_available():
            raise _no_gpu_error(e) from None
        raise


def _last_axis_contiguous(x):
    """The kernels read rows as contiguous runs: copy only when the last axis is
    strided (any other layout, including broadcast axes, is used in place)."""
    if x.ndim and x.shape[-1] != 1 and x.strides[-1] != x.itemsize:
        return cupy.ascontiguousarray(x)
    if any(s % x.itemsize for s in x.strides):
        return cupy.ascontiguousarray(x)
    return x


def _check_window(fn, window):
    if window is None:
        return None, None
    if not isinstance(window, (tuple, list)) or len(window) != 2:
        raise TypeError(f"{fn}: window must be None or a pair (left, right) of ints or "
                        f"None, got {window!r}")
    sides = []
    for side, w in zip(("left", "right"), window):
        if w is None:
            sides.append(None)
            continue
        if isinstance(w, (bool, np.bool_)) or not isinstance(w, (int, np.integer)):
            raise TypeError(f"{fn}: window {side} side must be an int or None, got {w!r}")
        # (a negative side is a band that excludes the diagonal: PyTorch's top-left
        # causal mask for Sq != Sk is window (None, Sq - Sk))
        sides.append(int(w))
    return tuple(sides)


def _check_softcap(fn, softcap):
    if softcap is None:
        return None
    if isinstance(softcap, (bool, np.bool_)) or not isinstance(
            softcap, (int, float, np.floating, np.integer)):
        raise TypeError(f"{fn}: softcap must be a positive real number or None, got {softcap!r}")
    c = float(softcap)
    if not (math.isfinite(c) and c > 0):
        raise ValueError(f"{fn}: softcap must be a finite number > 0 (None turns it off), "
                         f"got {c}")
    return c


def _check_broadcast_and_device(fn, name, x, target, dev, what):
    """``x`` broadcasts to ``target`` (numpy rules; ``what`` names the target in
    the message) and lives on device ``dev``."""
    try:
        ok = np.broadcast_shapes(x.shape, target) == target
    except ValueError:
        ok = False
    if not ok:
        raise ValueError(f"{fn}: {name} has {_fmt(x)}, which does not broadcast to {what}")
    if x.device.id != dev:
        raise ValueError(f"{fn}: {name} is on device {x.device.id}, the inputs on device {dev}")


def _check_head_vector(fn, name, x, bshape, dev):
    """alibi_slopes / sink: float32 cupy arrays broadcastable to the batch dims."""
    if x is None:
        return
    _check_array(fn, name, x)
    if x.dtype != np.float32:
        raise TypeError(f"{fn}: {name} has {_fmt(x)}; expected float32 (one value per batch "
                        f"element, broadcastable to the batch dims {tuple(bshape)})")
    _check_broadcast_and_device(fn, name, x, tuple(bshape), dev,
                                f"the batch dims {tuple(bshape)} of q, k, v (e.g. shape (H,) "
                                f"or (B, H))")


def _prepare(fn, q, k, v, causal, scale, window=None, softcap=None, alibi_slopes=None,
             sink=None, bias=None, mask=None, bias_grad=False, dropout_p=0.0):
    for name, x in (("q", q), ("k", k), ("v", v)):
        _check_array(fn, name, x)
    for name, x in (("q", q), ("k", k), ("v", v)):
        _check_dtype(fn, name, x)
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"{fn}: q, k and v must have the same dtype, got q {q.dtype}, "
                        f"k {k.dtype}, v {v.dtype}")
    try:
        broadcast_shapes(q.shape, k.shape, v.shape)
    except ValueError as e:
        raise ValueError(f"{fn}: {e}") from None
    dev = q.device.id
    for name, x in (("k", k), ("v", v)):
        if x.device.id != dev:
            raise ValueError(f"{fn}: all arrays must be on one GPU; q is on device {dev}, "
                             f"{name} on device {x.device.id}")
    if not isinstance(causal, (bool, np.bool_)):
        raise TypeError(f"{fn}: causal must be a bool, got {causal!r}")
    d = q.shape[-1]
    if scale is None:
        scale = 1.0 / math.sqrt(d)
    else:
        if isinstance(scale, (bool, np.bool_)) or not isinstance(scale, (int, float, np.floating, np.integer)):
            raise TypeError(f"{fn}: scale must be a real number or None, got {scale!r}")
        scale = float(scale)
        if not math.isfinite(scale):
            raise ValueError(f"{fn}: scale must be finite, got {scale}")
    left, right = _check_window(fn, window)
    if causal:
        # causal is the window's right side 0; it composes with any left side
        right = 0 if right is None else min(right, 0)
    softcap = _check_softcap(fn, softcap)
    bshape = tuple(np.broadcast_shapes(q.shape[:-2], k.shape[:-2], v.shape[:-2]))
    _check_head_vector(fn, "alibi_slopes", alibi_slopes, bshape, dev)
    if alibi_slopes is not None and scale == 0.0 and softcap is None:
        # the kernels keep ALiBi in units of the scaled score (cuda_src/variant.cuh)
        raise ValueError(f"{fn}: alibi_slopes needs scale != 0 (got scale=0.0)")
    _check_head_vector(fn, "sink", sink, bshape, dev)
    sq, sk = q.shape[-2], k.shape[-2]
    bias_kind = None if bias is None else _check_pair_array(fn, "bias", bias, q, bshape, sq, sk,
                                                             dev)
    if bias_kind == "convert":
        bias_kind = "t"  # float32 beside float64 inputs: converted per call (_forward)
    if mask is not None:
        _check_pair_array(fn, "mask", mask, q, bshape, sq, sk, dev)
    if not isinstance(bias_grad, (bool, np.bool_)):
        raise TypeError(f"{fn}: bias_grad must be a bool, got {bias_grad!r}")
    if bias_grad and bias is None:
        raise ValueError(f"{fn}: bias_grad=True needs a bias (got bias=None)")
    if bias is not None and scale == 0.0 and softcap is None:
        # the kernels keep the bias in units of the scaled score (cuda_src/variant.cuh)
        raise ValueError(f"{fn}: bias needs scale != 0 (got scale=0.0)")
    p_drop = _check_dropout_p(fn, dropout_p)
    cc = _compute_capability(dev)
    info = _dtypes.info(q.dtype)
    try:
        family = _config.choose_family(info.name, cc)
    except ValueError as e:
        raise ValueError(f"{fn}: {e}") from None
    feats = Features(window_left=left, window_right=right, softcap=softcap,
                     alibi=alibi_slopes is not None, sink=sink is not None, bias=bias_kind,
                     mask=mask is not None, bias_grad=bool(bias_grad), dropout=p_drop)
    return Problem(bshape=bshape, seqlen_q=q.shape[-2], seqlen_k=k.shape[-2], head_dim=d,
                   head_dim_v=v.shape[-1], scale=scale, features=feats, dtype=q.dtype,
                   acc_dtype=info.acc_dtype, device_id=dev, cc=cc, family=family)


def _check_dropout_p(fn, dropout_p) -> float:
    try:
        return _philox.check_dropout(dropout_p, 0, 0)[0]  # (the seed is checked per call)
    except (TypeError, ValueError) as e:
        raise type(e)(f"{fn}: {e}") from None


def _check_seed(fn, dropout_p, seed, offset):
    """(seed, offset) validated (errors name them); (0, 0) without dropout."""
    try:
        p, seed, offset = _philox.check_dropout(dropout_p, seed, offset)
    except (TypeError, ValueError) as e:
        raise type(e)(f"{fn}: {e}") from None
    return (seed, offset) if p > 0 else (0, 0)


class _Word:
    """A per-call 64-bit kernel parameter in a plan's environment (the dropout
    seed and counter offset): the launches write ``data.ptr`` like a tensor's
    address (flashcupy/_params.py, WORD), so a replayed plan takes this call's
    value.  ``dropout_index`` is one with value 0 and an item size of 1: the
    launches add the batch chunk's offset to it, which makes it the flat
    batch index the kernels key the dropout bits with (cuda_src/params.cuh)."""

    __slots__ = ("ptr",)
    itemsize = 1
    nbytes = 0

    def __init__(self, value: int):
        self.ptr = int(value)

    @property
    def data(self):
        return self



def dropout_env(env, dropout_p, seed, offset) -> None:
    """Puts the per-call dropout words a plan reads into ``env`` (nothing
    without dropout).  ``seed`` and ``offset`` must be validated."""
    if dropout_p:
        env["dropout_seed"] = _Word(seed)
        env["dropout_offset"] = _Word(offset)
        env["dropout_index"] = _Word(0)


def _check_given(fn, name, x, shape, dtype, dev):
    _check_array(fn, name, x)
    if tuple(x.shape) != tuple(shape) or x.dtype != dtype:
        raise ValueError(f"{fn}: {name} has {_fmt(x)}; expected shape {tuple(shape)} and "
                         f"dtype {np.dtype(dtype)}")
    if x.device.id != dev:
        raise ValueError(f"{fn}: {name} is on device {x.device.id}, the inputs on device {dev}")


def _check_output(fn, name, x, shape, dtype, dev):
    """A preallocated output: exact shape and dtype, C-contiguous."""
    _check_given(fn, name, x, shape, dtype, dev)
    if not x.flags.c_contiguous:
        raise ValueError(f"{fn}: the preallocated {name} must be C-contiguous")


def _check_pair_array(fn, name, x, q, bshape, sq, sk, dev):
    """bias / mask: cupy arrays broadcastable to ``bshape + (Sq, Sk)``.
    Returns the bias kind for Features ("t" / "acc") or True for a mask."""
    _check_array(fn, name, x)
    target = tuple(bshape) + (sq, sk)
    if name == "mask":
        if x.dtype != np.bool_:
            raise TypeError(f"{fn}: mask has {_fmt(x)}; expected a bool array (True = may "
                            f"attend), broadcastable to {target}")
    else:
        # (bfloat16 is an ml_dtypes type, numpy kind "V": compare dtypes, not kinds)
        if x.dtype != q.dtype and x.dtype != np.float32:
            raise TypeError(f"{fn}: bias has {_fmt(x)}; expected a floating array of q's dtype "
                            f"({q.dtype}) or float32, broadcastable to {target}")
    _check_broadcast_and_device(fn, name, x, target, dev,
                                f"{target} (the batch dims of q, k, v, then (Sq, Sk))")
    if name == "mask":
        return True
    acc = _dtypes.info(q.dtype).acc_dtype
    return "t" if x.dtype == q.dtype else "acc" if x.dtype == acc else "convert"


def _pair_view(x):
    """A bias / mask as the kernels read it: (batch shape, batch strides, row
    stride, column stride) in elements, broadcast axes at stride 0.  The column
    stride must be 0 or 1 (variant.cuh): anything else is copied first."""
    shape = (1,) * max(0, 2 - x.ndim) + tuple(x.shape)
    strides = (0,) * max(0, 2 - x.ndim) + tuple(st // x.itemsize for st in x.strides)
    rs = 0 if shape[-2] == 1 else strides[-2]
    cs = 0 if shape[-1] == 1 else strides[-1]
    return shape[:-2], list(strides[:-2]), rs, cs


def _pair_contiguous(x):
    """The array itself when its last axis is contiguous or broadcast, else a copy."""
    if x.ndim and x.shape[-1] != 1 and x.strides[-1] != x.itemsize:
        return cupy.ascontiguousarray(x)
    if any(st % x.itemsize for st in x.strides):
        return cupy.ascontiguousarray(x)
    return x


# ---------------------------------------------------------------------------
# Forward
# ---------------------------------------------------------------------------
_VARIANT_DOC = """
    window : (left, right), optional
        Sliding-window (local) attention, bottom-right aligned like ``causal``:
        query i sees key j iff ``i + Sk - Sq - left <= j <= i + Sk - Sq + right``.
        Each side is an int or None (unbounded); a negative side moves the
        band off the diagonal (``(None, Sq - Sk)``: PyTorch's top-left causal
        mask).  ``causal=True`` sets ``right = 0``; ``window=(None, 0)`` is
        ``causal=True``.  Work is proportional to the window.
    softcap : float, optional
        ``c > 0``: the scaled score s becomes ``c * tanh(s / c)`` before any
        mask, ALiBi or softmax (Gemma 2, Grok).
    alibi_slopes : cupy.ndarray, float32, optional
        Broadcastable to the batch dims (e.g. ``(H,)``, ``(B, H)``, ``(Hkv, G)``
        for GQA): adds ``-slope * |i + Sk - Sq - j|`` to the scaled score.
    sink : cupy.ndarray, float32, optional
        Broadcastable to the batch dims: one logit per (batch,) head that joins
        the softmax denominator and carries no value (gpt-oss):
        ``p_ij = exp(s_ij) / (exp(sink) + sum_j exp(s_ij))``; ``lse`` includes it.
    bias : cupy.ndarray, optional
        Broadcastable to ``batch + (Sq, Sk)`` (numpy rules; e.g. ``(B, H, Sq, Sk)``,
        ``(1, H, Sq, Sk)``, ``(B, 1, 1, Sk)``, ``(Sq, Sk)``), q's dtype or float32:
        added to the (softcapped, ALiBi) scaled score before the softmax.
        Broadcast axes are read at stride 0, never materialized.  ``-inf``
        removes a pair.
    mask : cupy.ndarray of bool, optional
        Same broadcasting; False removes the pair (PyTorch SDPA's convention),
        exactly as a ``-inf`` bias does.  A row with every key removed gets
        out = 0 and lse = -inf.
    dropout_p : float in [0, 0.99]
        Dropout on the attention probabilities; survivors are scaled by
        ``1 / (1 - dropout_p)`` (as PyTorch's SDPA).  ``lse`` stays the
        dropout-free logsumexp.
    seed : int in [0, 2**64), required with ``dropout_p > 0``
    offset : int in [0, 2**32)
        The dropout's Philox key and the counter's stream word: the keep bit of
        pair (i, j) of batch element b is a function of (seed, offset, b, i, j)
        only (flashcupy/_philox.py states it bit for bit), so the backward,
        given the same three values, regenerates the forward's pattern, and
        every family and tile size draws the same one.
"""


def attention(q, k, v, *, causal=False, scale=None, return_lse=False, window=None,
              softcap=None, alibi_slopes=None, sink=None, bias=None, mask=None, dropout_p=0.0,
              seed=None, offset=0):
    """Exact attention ``softmax(q @ k^T * scale) @ v``, FlashAttention-style.

    Parameters
    ----------
    q : cupy.ndarray, shape (..., Sq, D)
    k : cupy.ndarray, shape (..., Sk, D)
    v : cupy.ndarray, shape (..., Sk, Dv)
        float16, bfloat16 (``ml_dtypes.bfloat16``), float32 or float64, all the
        same.  Leading dims broadcast as in ``numpy.matmul`` without being
        materialized: a k/v head axis of size 1 is MQA, a grouped one GQA.
        1 <= D, Dv <= 256.  Arrays whose last axis is contiguous are used in
        place (e.g. a (B, S, H, D) array passed as ``x.swapaxes(-2, -3)``).
    causal : bool
        Query i attends to key j only when j <= i + (Sk - Sq) (bottom-right
        aligned).  A query row with no key gets out = 0 and lse = -inf.
    scale : float, optional
        Defaults to 1 / sqrt(D).
    return_lse : bool
        Also return the row logsumexp (natural log) of the scaled scores.
    {variants}
    Returns
    -------
    out : cupy.ndarray, shape (..., Sq, Dv), the input dtype
    lse : cupy.ndarray, shape (..., Sq), float32 (float64 for float64 inputs)
        Only with ``return_lse=True``.  A row that sees no key has out = 0 and
        lse = -inf (lse = sink with a sink).
    """
    out, lse = _forward(q, k, v, causal=causal, scale=scale, window=window, softcap=softcap,
                        alibi_slopes=alibi_slopes, sink=sink, bias=bias, mask=mask,
                        dropout_p=dropout_p, seed=seed, offset=offset)
    return (out, lse) if return_lse else out


attention.__doc__ = attention.__doc__.replace("    {variants}", _VARIANT_DOC.strip("\n"))

_PLANS = _plan.CACHE


def _signature(kind, arrays, causal, scale, window, softcap, extras, dropout_p=0.0):
    """The plan key: everything validation and planning depend on; None (no
    plan) for arguments of unusual types, which the full validation then
    judges (an unhashable ``scale=[0.5]`` must fail with a message naming it).
    ``extras``: the optional arrays (alibi slopes, sink), None where absent."""
    if type(causal) is not bool or not (scale is None or type(scale) in (float, int)):
        return None
    if not (window is None or (type(window) is tuple and len(window) == 2 and all(
            w is None or type(w) is int for w in window))):
        return None
    if not (softcap is None or type(softcap) in (float, int)):
        return None
    if type(dropout_p) not in (float, int):
        return None
    sig = [kind, causal, scale, window, softcap, dropout_p, _config.current_family(),
           _config.gqa_mode(), _config.split_mode()]
    for x in arrays:
        sig.extend((x.shape, x.strides, x.dtype, x.data.device_id))
    for x in extras:
        if x is None:
            sig.append(None)
        elif not isinstance(x, cupy.ndarray):
            return None
        else:
            sig.append((x.shape, x.strides, x.dtype, x.data.device_id))
    return tuple(sig)


def cached_plan(kind, arrays, causal, scale, window=None, softcap=None,
                extras=(None, None, None, None), dropout_p=0.0):
    """The plan a call with these arguments replays, or None (for
    flashcupy.torch, which keys plans on tensor metadata).  ``extras``: alibi
    slopes, sink, bias, mask (missing trailing ones are None)."""
    extras = tuple(extras) + (None,) * (4 - len(extras))
    return _PLANS.get(_signature(kind, arrays, causal, scale, window, softcap, extras,
                                 dropout_p))


def _convert_bias(q, bias):
    """A float32 bias beside float64 inputs is read as float64 (a copy of its
    own, unbroadcast shape): the float64 kernels read the bias in their dtype."""
    if (bias is not None and isinstance(bias, cupy.ndarray) and isinstance(q, cupy.ndarray)
            and q.dtype == np.float64 and bias.dtype == np.float32):
        return bias.astype(np.float64)
    return bias


def _forward(q, k, v, *, causal, scale, window=None, softcap=None, alibi_slopes=None,
             sink=None, bias=None, mask=None, dropout_p=0.0, seed=None, offset=0, out=None,
             lse=None):
    """``attention`` with optional preallocated, C-contiguous ``out``/``lse``."""
    fn = "flashcupy.attention"
    for name, x in (("q", q), ("k", k), ("v", v)):
        _check_array(fn, name, x)
    bias_in = bias
    bias = _convert_bias(q, bias)
    # (keyed on the bias as given: a converted one must not meet the plan of a
    # float64 bias of the same shape, whose backward writes dbias in place)
    extras = (alibi_slopes, sink, bias_in, mask)
    key = _signature("fwd", (q, k, v), causal, scale, window, softcap, extras, dropout_p)
    plan = _PLANS.get(key)
    prob = plan.call if plan is not None else _prepare(fn, q, k, v, causal, scale, window,
                                                       softcap, alibi_slopes, sink, bias, mask,
                                                       dropout_p=dropout_p)
    seed, offset = _check_seed(fn, prob.features.dropout, seed, offset)
    out_shape = prob.bshape + (prob.seqlen_q, prob.head_dim_v)
    lse_shape = prob.bshape + (prob.seqlen_q,)
    if out is not None:
        _check_output(fn, "out", out, out_shape, prob.dtype, prob.device_id)
    if lse is not None:
        _check_output(fn, "lse", lse, lse_shape, prob.acc_dtype, prob.device_id)
    with cupy.cuda.Device(prob.device_id):
        if out is None:
            out = cupy.empty(out_shape, prob.dtype)
        if lse is None:
            lse = cupy.empty(lse_shape, prob.acc_dtype)
        env = {"q": q, "k": k, "v": v, "o": out, "lse": lse}
        if alibi_slopes is not None:
            env["alibi"] = alibi_slopes
        if sink is not None:
            env["sink"] = sink
        pair_copied = _add_pairs(env, bias, mask)
        dropout_env(env, prob.features.dropout, seed, offset)
        if plan is not None:
            plan.run(env)
            return out, lse
        if prob.empty:
            # Sk = 0: every row sees no key, so out = 0 and lse = -inf (or the sink,
            # the only logit left in the softmax).
            out.fill(0)
            if sink is not None and lse.size:
                lse[...] = cupy.broadcast_to(sink[..., None], lse_shape).astype(lse.dtype)
            else:
                lse.fill(-np.inf)
            return out, lse
        qc, kc, vc = (_last_axis_contiguous(x) for x in (q, k, v))
        # a copy is made per call: no plan
        cacheable = qc is q and kc is k and vc is v and not pair_copied and bias is bias_in
        env.update(q=qc, k=kc, v=vc)
        plan = plan_forward(prob, env)
        plan.run(env)
        if cacheable:
            _PLANS.put(key, plan)
    return out, lse


def _strides(x, bshape):
    return _batch.batch_strides(x.shape[:-2], [s // x.itemsize for s in x.strides[:-2]], bshape)


def _vec_strides(x, bshape):
    return _batch.batch_strides(x.shape[:-1], [s // x.itemsize for s in x.strides[:-1]], bshape)


def _head_strides(x, bshape):
    """A per-batch-element array (alibi slopes, sink): all its axes are batch axes."""
    return _batch.batch_strides(x.shape, [s // x.itemsize for s in x.strides], bshape)


def _smem_limit(device_id: int) -> int:
    return _SMEM_OPTIN(device_id)


@functools.lru_cache(maxsize=None)
def _SMEM_OPTIN(device_id: int) -> int:
    return int(cupy.cuda.Device(device_id).attributes["MaxSharedMemoryPerBlockOptin"])


def _spec(prob, kernel, grad_dtype="", extra_vf=0):
    """The kernel of ``prob``'s family for ``kernel``: the family's table, or a
    fallback where it has no tile (the sm90 family falls back to sm80's table
    inside its pick; tensor-core gaps fall back to the generic family)."""
    fam = _config.module(prob.family)
    forward = kernel == "fwd"
    vf = prob.features.flags(forward) | extra_vf
    generic = _config.module("generic")
    if prob.family == "f64mma":
        s = fam.pick(kernel, prob.dtype_name, prob.head_dim, prob.head_dim_v, vf,
                     _smem_limit(prob.device_id))
        if s is not None:
            return s
    if prob.family in _config.GENERIC_BACKWARD:
        if kernel == "bwd_preprocess":
            return generic.spec(kernel, prob.dtype_name)
        return generic.spec(kernel, prob.dtype_name, prob.head_dim, prob.head_dim_v, grad_dtype,
                            vf)
    sm80 = _config.module("sm80")
    if kernel == "bwd_preprocess":
        return sm80.preprocess_spec(prob.dtype_name, _config.head_dim_bucket(prob.head_dim_v))
    if kernel == "bwd_dq_convert":
        return sm80.convert_spec(prob.dtype_name)
    if kernel == "bwd_dkdvq" and grad_dtype:
        return None  # the atomic path needs dK, dV in the input dtype: use the pair
    # The tensor-core kernels store gradients in the input dtype only; a gradient
    # that needs an accumulator-dtype buffer (an input broadcast over an axis the
    # kernel does not sum) runs on the generic family.
    s = None if grad_dtype else fam.pick(kernel, prob.dtype_name, prob.head_dim,
                                         prob.head_dim_v, vf, _smem_limit(prob.device_id),
                                         prob.cc)
    if s is None:
        if kernel == "bwd_dkdvq":
            return None  # no atomic tile for this bucket / GPU: the caller runs the pair
        return generic.spec(kernel, prob.dtype_name, prob.head_dim, prob.head_dim_v, grad_dtype,
                            vf)
    return s


def _add_pairs(env, bias, mask) -> bool:
    """Puts bias / mask into the environment (copied when their last axis is
    strided); returns whether a copy was made (then the call has no plan)."""
    copied = False
    for name, x in (("bias", bias), ("mask", mask)):
        if x is not None:
            xc = _pair_contiguous(x)
            copied |= xc is not x
            env[name] = xc
    return copied


def _variant_tensors(env, bs, st, pairs=("bias", "mask")):
    """The variant's arrays as launch operands (their batch strides into
    ``st``): per-batch-element vectors (ALiBi slopes, sink) and the (Sq, Sk)
    pair arrays (bias, mask, dbias).  Returns (operands, scalars)."""
    ops, scalars = [], {}
    for name in ("alibi", "sink"):
        if name in env:
            st[name] = _head_strides(env[name], bs)
            ops.append((f"var.{name}", name, env[name], 0))
    for name in pairs:
        if name in env:
            x = env[name]
            bshape_x, bstr, rs, cs = _pair_view(x)
            st[name] = _batch.batch_strides(bshape_x, bstr, bs)
            ops.append((f"var.{name}", name, x, rs))
            scalars[f"var.{name}_sc"] = cs
    if "dropout_index" in env:
        # the flat C-order batch index: "strides" of a contiguous array over bs
        c_strides = [math.prod(bs[i + 1:]) for i in range(len(bs))]
        st["dropout_index"] = _batch.batch_strides(bs, c_strides, bs)
        ops += [("var.dropout_index", "dropout_index", env["dropout_index"], 0),
                ("var.dropout_seed", "dropout_seed", None, None),
                ("var.dropout_offset", "dropout_offset", None, None)]
    return ops, scalars


def plan_forward(prob, env):
    """The forward's plan for a validated problem and its arrays: a GQA group
    folded into the rows where that applies (flashcupy/_pack.py), else as
    given.  It replays on ``env``'s arrays."""
    folded = _pack.fold(prob, env)
    if folded is None:
        plan = _plan.Plan(prob)
        _plan_forward(plan, env)
    else:
        plan = _plan.Plan(folded[0], call=prob)
        _plan_forward(plan, folded[1])
    return plan


def _plan_forward(plan, env):
    prob, bs = plan.prob, plan.prob.bshape
    q, k, v, out, lse = (env[n] for n in ("q", "k", "v", "o", "lse"))
    st = {"q": _strides(q, bs), "k": _strides(k, bs), "v": _strides(v, bs),
          "o": _strides(out, bs), "lse": _vec_strides(lse, bs)}
    extra, scalars = _variant_tensors(env, bs, st)
    spec = _spec(prob, "fwd")
    rs = _launch.row_stride
    ops = [("q", "q", q, rs(q)), ("k", "k", k, rs(k)), ("v", "v", v, rs(v)),
           ("o", "o", out, rs(out)), ("lse", "lse", lse, _launch.vec_stride(lse))] + extra
    n_splits = 1
    if _split.supports(spec):
        split_spec = _spec(prob, "fwd", extra_vf=VF_SPLIT)  # (its tile may differ)
        n_splits = _split.choose(prob, split_spec)
    if n_splits > 1:
        # Split-KV (cuda_src/split.cuh): float32 partial O / LSE per split, then
        # the combine writes out and lse.  Partial rows are padded to 4 floats
        # (the combine's 16-byte loads).
        dv4 = -(-prob.head_dim_v // 4) * 4
        o_part = plan.alloc(env, "o_part", (n_splits,) + bs + (prob.seqlen_q, dv4), np.float32)
        lse_part = plan.alloc(env, "lse_part", (n_splits,) + bs + (prob.seqlen_q,), np.float32)
        st["o_part"], st["lse_part"] = _strides(o_part[0], bs), _vec_strides(lse_part[0], bs)
        ops += [("o_part", "o_part", o_part, rs(o_part)),
                ("lse_part", "lse_part", lse_part, _launch.vec_stride(lse_part))]
        scalars.update(n_splits=n_splits, o_part_ss=o_part.strides[0] // 4,
                       lse_part_ss=lse_part.strides[0] // 4)
        spec = split_spec
    layout = _batch.Layout.build(bs, range(len(bs)), st, prob.features.seq)
    plan.launches(_launch.launch(spec, prob, "fwd", layout, ops, n_rows=prob.seqlen_q,
                                 scalars=scalars, grid_x_mult=n_splits))
    if n_splits > 1:
        plan.launches(_launch.launch(
            _config.module("sm80").combine_spec(prob.dtype_name), prob, "fwd", layout, ops,
            n_rows=prob.seqlen_q, scalars=scalars))


# ---------------------------------------------------------------------------
# Backward
# ---------------------------------------------------------------------------
def attention_backward(dout, q, k, v, out, lse, *, causal=False, scale=None, deterministic=False,
                       window=None, softcap=None, alibi_slopes=None, sink=None, bias=None,
                       mask=None, bias_grad=False, dropout_p=0.0, seed=None, offset=0):
    """Gradients of ``attention`` with respect to q, k, v (and the sink, the bias).

    Parameters
    ----------
    dout : cupy.ndarray, shape (..., Sq, Dv)
        Gradient of the loss with respect to ``out`` (any strides).
    q, k, v : cupy.ndarray
        The forward inputs.
    out, lse : cupy.ndarray
        The forward outputs (``attention(..., return_lse=True)``).
    causal, scale, window, softcap, alibi_slopes, sink, bias, mask : as in the forward call.
    dropout_p, seed, offset : as in the forward call (the same three values
        regenerate its dropout pattern).
    bias_grad : bool
        Also return ``dbias``.
    deterministic : bool
        Bit-identical results run to run.  The generic kernels are always
        deterministic; the tensor-core kernels then compute dQ in a separate
        pass instead of with float32 atomics (see README for the cost).

    Returns
    -------
    dq, dk, dv : cupy.ndarray with the shapes and dtype of q, k, v.
        Gradients of broadcast inputs are summed over the broadcast axes.
    dsink : cupy.ndarray, float32, the shape of ``sink`` (only with a sink)
        ``-sum_i exp(sink - lse_i) * delta_i`` with ``delta_i = dout_i . out_i``,
        summed over the axes the sink was broadcast along.
    dbias : cupy.ndarray, the shape and dtype of ``bias`` (only with ``bias_grad``)
        The gradient of the logit the bias joins, dS = P o (dP - delta),
        summed over the bias's broadcast axes in the kernel (float32 atomics).
        With ``deterministic=True`` a bias broadcast over batch axes runs one
        backward per position of those axes and sums in a fixed order
        (bit-identical run to run; not implemented together with dropout).
    """
    return _backward(dout, q, k, v, out, lse, causal=causal, scale=scale,
                     deterministic=deterministic, window=window, softcap=softcap,
                     alibi_slopes=alibi_slopes, sink=sink, bias=bias, mask=mask,
                     bias_grad=bias_grad, dropout_p=dropout_p, seed=seed, offset=offset)


def _backward(dout, q, k, v, out, lse, *, causal, scale, deterministic=False, window=None,
              softcap=None, alibi_slopes=None, sink=None, bias=None, mask=None, bias_grad=False,
              dropout_p=0.0, seed=None, offset=0, dq=None, dk=None, dv=None, dsink=None,
              dbias=None):
    fn = "flashcupy.attention_backward"
    for name, x in (("dout", dout), ("q", q), ("k", k), ("v", v), ("out", out), ("lse", lse)):
        _check_array(fn, name, x)
    bias_in = bias
    bias = _convert_bias(q, bias)
    if not isinstance(deterministic, (bool, np.bool_)):
        raise TypeError(f"{fn}: deterministic must be a bool, got {deterministic!r}")
    # deterministic=False lets the tensor-core family add dQ with float32
    # atomics (run-dependent summation order); every other path has one writer
    # per gradient element and sums in a fixed order.
    # deterministic picks the kernels: it is part of the plan's key
    extras = (alibi_slopes, sink, bias_in, mask)  # (as in _forward)
    kind = ("bwd-det" if deterministic else "bwd") + ("-dbias" if bias_grad is True else "")
    key = _signature(kind, (dout, q, k, v, out, lse), causal, scale, window, softcap, extras,
                     dropout_p)
    plan = _PLANS.get(key)
    if plan is None:
        prob = _prepare(fn, q, k, v, causal, scale, window, softcap, alibi_slopes, sink, bias,
                        mask, bias_grad, dropout_p)
        if bias_grad and deterministic and tuple(bias.shape) != prob.bshape + (
                prob.seqlen_q, prob.seqlen_k):
            if prob.features.dropout:
                raise NotImplementedError(
                    f"{fn}: deterministic=True with bias_grad=True, dropout_p > 0 and a "
                    f"broadcast bias (shape {tuple(bias.shape)}) is not implemented; pass the "
                    f"bias broadcast to {prob.bshape + (prob.seqlen_q, prob.seqlen_k)} (a "
                    f"stride-0 view) and sum its gradient, or deterministic=False")
            return _backward_broadcast_dbias(
                prob, (dout, q, k, v, out, lse), bias_in,
                dict(causal=causal, scale=scale, window=window, softcap=softcap,
                     alibi_slopes=alibi_slopes, sink=sink, mask=mask),
                dict(dq=dq, dk=dk, dv=dv, dsink=dsink, dbias=dbias))
        if bias_grad and bias is bias_in and tuple(bias.shape) == prob.bshape + (
                prob.seqlen_q, prob.seqlen_k):
            # a full-shape bias (in the kernels' bias type): each dbias element has
            # one writer, which stores dS into it (no float32 buffer, no atomics)
            prob = dataclasses.replace(
                prob, features=dataclasses.replace(prob.features, dbias_store=True))
        out_shape, lse_shape = broadcast_shapes(q.shape, k.shape, v.shape)
        dev = prob.device_id
        _check_given(fn, "dout", dout, out_shape, prob.dtype, dev)
        _check_given(fn, "out", out, out_shape, prob.dtype, dev)
        _check_given(fn, "lse", lse, lse_shape, prob.acc_dtype, dev)
    else:
        prob = plan.prob
    seed, offset = _check_seed(fn, prob.features.dropout, seed, offset)
    for name, x, ref in (("dq", dq, q), ("dk", dk, k), ("dv", dv, v)):
        if x is not None:
            _check_output(fn, name, x, ref.shape, prob.dtype, prob.device_id)
    if dsink is not None:
        _check_output(fn, "dsink", dsink, sink.shape, np.float32, prob.device_id)

    with cupy.cuda.Device(prob.device_id):
        dq = cupy.empty(q.shape, prob.dtype) if dq is None else dq
        dk = cupy.empty(k.shape, prob.dtype) if dk is None else dk
        dv = cupy.empty(v.shape, prob.dtype) if dv is None else dv
        if sink is not None and dsink is None:
            dsink = cupy.empty(sink.shape, np.float32)
        env = {"dout": dout, "q": q, "k": k, "v": v, "o": out, "lse": lse,
               "dq_out": dq, "dk_out": dk, "dv_out": dv}
        if alibi_slopes is not None:
            env["alibi"] = alibi_slopes
        if sink is not None:
            env.update(sink=sink, dsink_out=dsink)
        pair_copied = _add_pairs(env, bias, mask)
        dropout_env(env, prob.features.dropout, seed, offset)
        grads = (dq, dk, dv) if sink is None else (dq, dk, dv, dsink)
        if bias_grad:
            if dbias is None:
                dbias = cupy.empty(bias_in.shape, bias_in.dtype)
            env["dbias_out"] = dbias
            grads = grads + (dbias,)
        if plan is not None:
            plan.run(env)
            return grads
        if prob.empty:
            # No (query, key) pair interacts and out = 0: every gradient is 0.
            for g in grads:
                g.fill(0)
            return grads
        copies = {n: _last_axis_contiguous(env[n]) for n in ("q", "k", "v", "o", "dout")}
        # (a converted bias is a per-call copy, as a copied pair array is: no plan)
        cacheable = (all(copies[n] is env[n] for n in copies) and not pair_copied
                     and bias is bias_in)
        env.update(copies)
        plan = _plan.Plan(prob)
        _plan_backward(plan, env, deterministic)
        plan.run(env)
        if cacheable:
            _PLANS.put(key, plan)
    return grads


def _batch_slicer(x, n_batch_dims, bshape, axes, pos):
    """The index of ``x`` (whose leading ``n_batch_dims`` axes broadcast
    right-aligned against ``bshape``) at positions ``pos`` of batch ``axes``:
    a size-1 slice where x has the axis, nothing where x broadcasts along it."""
    lead = len(bshape) - n_batch_dims
    idx = [slice(None)] * x.ndim
    for a, i in zip(axes, pos):
        ax = a - lead
        if ax >= 0 and x.shape[ax] != 1:
            idx[ax] = slice(i, i + 1)
    return tuple(idx)


def _backward_broadcast_dbias(prob, arrays, bias, kw, outs):
    """deterministic=True with the gradient of a bias that broadcasts over batch
    axes: the kernels have one writer per dbias element only for a bias of the
    full shape (the atomics of the other case sum in run-dependent order).  So
    one backward runs per position of the batch axes the bias broadcasts along,
    on every operand's slice there, with the bias as a float32 stride-0 view of
    the call's full shape (its dS is then stored, not added).  The calls' dbias
    (the bias's batch shape x (Sq, Sk), float32) are summed over Sq / Sk where
    the bias broadcasts there and added position after position; the
    gradients of inputs that broadcast along those axes too.  Every sum has a
    fixed order: bit-identical run to run.  Extra memory: that float32 dbias
    and float32 copies of the gradients, never the full broadcast size; time:
    one launch sequence per position (an (Sq, Sk) bias beside (B, H) runs B * H
    calls of one head each)."""
    dout, q, k, v, out, lse = arrays
    bs, sq, sk = prob.bshape, prob.seqlen_q, prob.seqlen_k
    nd = len(bs)
    bias_al = bias.reshape((1,) * (nd + 2 - bias.ndim) + tuple(bias.shape))
    axes = [a for a in range(nd) if bias_al.shape[a] == 1 and bs[a] > 1]
    inner_bs = tuple(1 if a in axes else bs[a] for a in range(nd))
    acc = np.float64 if prob.acc_dtype == np.float64 else np.float32
    bias32 = cupy.broadcast_to(bias_al.astype(acc), inner_bs + (sq, sk))
    grads = {"dq": (q, 2), "dk": (k, 2), "dv": (v, 2)}
    sink = kw["sink"]
    if sink is not None:
        grads["dsink"] = (sink, 0)
    with cupy.cuda.Device(prob.device_id):
        sums = {n: cupy.zeros(x.shape, acc) for n, (x, _) in grads.items()}
        dbias32 = cupy.zeros(bias_al.shape, acc)
        red = tuple(i for i in (nd, nd + 1) if bias_al.shape[i] == 1)
        for pos in itertools.product(*(range(bs[a]) for a in axes)):
            def cut(x, nb):
                return None if x is None else x[_batch_slicer(x, nb, bs, axes, pos)]
            mask = kw["mask"]
            ikw = dict(kw, alibi_slopes=cut(kw["alibi_slopes"], getattr(kw["alibi_slopes"],
                                                                        "ndim", 0)),
                       sink=cut(sink, getattr(sink, "ndim", 0)),
                       mask=cut(mask, max(0, getattr(mask, "ndim", 0) - 2)))
            res = _backward(cut(dout, dout.ndim - 2), cut(q, q.ndim - 2), cut(k, k.ndim - 2),
                            cut(v, v.ndim - 2), cut(out, out.ndim - 2), cut(lse, lse.ndim - 1),
                            deterministic=True, bias=bias32, bias_grad=True, **ikw)
            names = ["dq", "dk", "dv"] + (["dsink"] if sink is not None else [])
            for n, g in zip(names, res):
                x, nb = grads[n]
                sums[n][_batch_slicer(x, x.ndim - nb, bs, axes, pos)] += g
            dbias32 += res[-1].sum(axis=red, keepdims=True) if red else res[-1]
        result = []
        for n in ("dq", "dk", "dv", "dsink"):
            if n not in grads:
                continue
            x = grads[n][0]
            o = outs[n]
            if o is None:
                o = cupy.empty(x.shape, np.float32 if n == "dsink" else x.dtype)
            o[...] = sums[n].astype(o.dtype)
            result.append(o)
        db = outs["dbias"]
        if db is None:
            db = cupy.empty(bias.shape, bias.dtype)
        db[...] = dbias32.reshape(bias.shape).astype(db.dtype)
        result.append(db)
    return tuple(result)


# Rows of the dQ workspace reserved per sequence beyond its own (a tile's
# overhang): the largest BLOCK_M of the atomic-dQ kernels.
_SEQ_QA_PAD = 128


def _group_axes(bshape, k, v, strides):
    """Chooses the batch axes that k and v both broadcast over and that the
    dK/dV kernel can sum in registers: the largest run of adjacent such axes
    that merges into one strided axis for q, dout, lse, delta (and the ALiBi
    slopes, which the kernel reads per group).  Returns (axes, n_group,
    {name: group stride})."""
    kb = _batch.is_broadcast(k.shape[:-2], bshape)
    vb = _batch.is_broadcast(v.shape[:-2], bshape)
    names = ("q", "dout", "lse", "delta") + tuple(
        n for n in ("alibi", "bias", "mask", "dbias", "dropout_index") if n in strides)
    best, run = [], []
    for i in range(len(bshape)):
        if kb[i] and vb[i]:
            if run and all(strides[n][run[-1]] == strides[n][i] * bshape[i] for n in names):
                run.append(i)
            else:
                run = [i]
            if math.prod(bshape[j] for j in run) > math.prod(bshape[j] for j in best):
                best = list(run)
        else:
            run = []
    if not best:
        return [], 1, {n: 0 for n in names}
    return best, math.prod(bshape[j] for j in best), {n: strides[n][best[-1]] for n in names}


def _grad_target(plan, env, x, name, bshape):
    """Makes ``env[name]`` the array the dQ kernel writes: the gradient itself, or,
    when ``x`` broadcasts over batch axes, a buffer of the broadcast shape in the
    accumulator dtype, to be summed into the gradient by a host step.
    Returns (target, axes to sum)."""
    reduce_axes = tuple(i for i, f in enumerate(_batch.is_broadcast(x.shape[:-2], bshape)) if f)
    if not reduce_axes:
        return plan.alias(env, name, name + "_out"), ()
    buf = _rows_buffer(plan, env, name, tuple(bshape), tuple(x.shape[-2:]), plan.prob.acc_dtype)
    return buf, reduce_axes


def _rows_buffer(plan, env, name, vshape, tail, dtype):
    """A plan buffer of shape ``vshape + tail``.  With packed sequences (the
    first of ``vshape`` is the sequence axis, the rows of ``tail`` are packed)
    it is allocated without that axis and seen along it at stride 0: each
    sequence owns its own rows (flashcupy/_varlen.py)."""
    if not plan.prob.packed:
        return plan.alloc(env, name, tuple(vshape) + tuple(tail), dtype)
    plan.alloc(env, name + "_packed", tuple(vshape[1:]) + tuple(tail), dtype)
    return plan.seq_view(env, name, name + "_packed", vshape[0])


def _finish(plan, grad, buf, reduce_axes):
    """A host step: the gradient ``grad`` = ``buf`` summed over ``reduce_axes``
    (a pairwise CuPy reduction, so accurate), cast."""
    def step(env):
        b, g = env[buf], env[grad]
        # (axes both see at stride 0, the sequence axis of packed buffers: one
        # position holds them all)
        same = tuple(slice(0, 1) if i < g.ndim and b.strides[i] == 0 == g.strides[i]
                     and b.shape[i] > 1 and i not in reduce_axes else slice(None)
                     for i in range(b.ndim))
        b, g = b[same], g[same[:g.ndim]]
        s = b.sum(axis=reduce_axes, keepdims=True) if reduce_axes else b
        g[...] = s.reshape(g.shape).astype(g.dtype)
    plan.host(step)


def _plan_dsink(plan):
    """dsink = -sum_i exp(sink - lse_i) delta_i, summed onto the sink's shape: a
    reduction over (batch, Sq) of two vectors the backward has anyway."""
    packed = bool(plan.prob.packed)

    def step(env):
        sink, lse, delta, dsink = env["sink"], env["lse"], env["delta"], env["dsink_out"]
        if packed:
            # packed sequences: the rows of the heads' packed vectors that belong
            # to a sequence (flashcupy/_varlen.py)
            n = env["seq_rows_q"]
            lse, delta = env["lse_packed"][..., :n], env["delta_packed"][..., :n]
        acc = delta.dtype
        p_sink = cupy.exp(sink.astype(acc)[..., None] - lse)  # lse >= sink: no overflow
        terms = p_sink * delta
        if packed:  # rows past the last sequence hold no delta (n is all rows under capture)
            valid = cupy.arange(lse.shape[-1], dtype=np.int32) < env["cu_q"][-1]
            terms = cupy.where(valid, terms, acc.type(0))
        per_elem = -terms.sum(axis=-1)                       # (batch...)
        extra = per_elem.ndim - sink.ndim
        axes = tuple(range(extra)) + tuple(
            extra + i for i, n in enumerate(sink.shape) if n == 1 and per_elem.shape[extra + i] != 1)
        red = per_elem.sum(axis=axes) if axes else per_elem
        dsink[...] = red.reshape(sink.shape).astype(np.float32)
    plan.host(step)


def _plan_backward(plan, env, deterministic):
    prob = plan.prob
    bs = prob.bshape
    all_axes = range(len(bs))
    acc_name = "fp64" if prob.acc_dtype == np.float64 else "fp32"
    q, k, v, out, dout, lse = (env[n] for n in ("q", "k", "v", "o", "dout", "lse"))
    rs, vs = _launch.row_stride, _launch.vec_stride

    # 1. delta = rowsum(dO * O), in the accumulator dtype
    seq = prob.features.seq
    delta = _rows_buffer(plan, env, "delta", bs, (prob.packed[0] if prob.packed else prob.seqlen_q,),
                         prob.acc_dtype)
    layout = _batch.Layout.build(bs, all_axes, {
        "o": _strides(out, bs), "dout": _strides(dout, bs), "delta": _vec_strides(delta, bs)}, seq)
    plan.launches(_launch.launch(
        _spec(prob, "bwd_preprocess"), prob, "bwd", layout,
        [("o", "o", out, rs(out)), ("dout", "dout", dout, rs(dout)),
         ("delta", "delta", delta, vs(delta))], n_rows=prob.seqlen_q))
    if "sink" in env:
        _plan_dsink(plan)

    st = {"q": _strides(q, bs), "k": _strides(k, bs), "v": _strides(v, bs),
          "dout": _strides(dout, bs), "lse": _vec_strides(lse, bs),
          "delta": _vec_strides(delta, bs)}
    if "alibi" in env:
        st["alibi"] = _head_strides(env["alibi"], bs)
    if "dbias_out" in env:
        # dS is added into an accumulator of the bias's own shape (zeroed here),
        # then cast into dbias when the two dtypes differ.
        out_b = env["dbias_out"]
        if prob.features.dbias_store:
            # stored into dbias itself (a C-contiguous one; else a buffer of its dtype,
            # copied into it afterwards); only pairs no tile visits (outside a window
            # or the causal band) need the zero fill
            if out_b.flags.c_contiguous:
                plan.alias(env, "dbias", "dbias_out")
            else:
                plan.alloc(env, "dbias", out_b.shape, out_b.dtype)
            if prob.features.local:
                plan.zero("dbias")
        else:
            if out_b.dtype == prob.acc_dtype and out_b.flags.c_contiguous:
                plan.alias(env, "dbias", "dbias_out")
            else:
                plan.alloc(env, "dbias", out_b.shape, prob.acc_dtype)
            plan.zero("dbias")
    pair_ops, pair_scalars = _variant_tensors(
        {n: env[n] for n in ("bias", "mask", "dbias", "dropout_index") if n in env}, bs, st,
        pairs=("bias", "mask", "dbias"))

    dq_buf, dq_red = _grad_target(plan, env, q, "dq", bs)

    # 2. Fast path (tensor-core families, deterministic=False): one dK/dV kernel
    #    also adds dS K into a zeroed float32 workspace with atomics (5 products
    #    per step instead of the 4 + 3 of the dK/dV and dQ pair), then a
    #    bandwidth kernel scales and casts it into dQ.  Atomic adds land in run-
    #    dependent order, so dQ's last bits may differ between runs.
    if not deterministic and not dq_red and prob.family not in _config.GENERIC_BACKWARD:
        dq_spec = _spec(prob, "bwd_dkdvq")
        if dq_spec is not None and _plan_dkdv(plan, env, st, dq_spec, pair_ops, pair_scalars):
            dqa = env["dq_accum"]
            layout = _batch.Layout.build(bs, all_axes, {
                "dq_accum": _strides(dqa, bs), "dq": _strides(dq_buf, bs)}, seq)
            plan.launches(_launch.launch(
                _spec(prob, "bwd_dq_convert"), prob, "bwd", layout,
                [("dq_accum", "dq_accum", dqa, rs(dqa)), ("dq", "dq", dq_buf, rs(dq_buf))],
                n_rows=prob.seqlen_q))
            _finish_dbias(plan, env)
            return

    # 2'. dQ: one writer per element; q broadcast over a batch axis needs a sum.
    st_dq = dict(st, dq=_strides(dq_buf, bs))
    ops = _qkv_ops(env) + [("dq", "dq", dq_buf, rs(dq_buf))]
    if "alibi" in env:
        ops.append(("var.alibi", "alibi", env["alibi"], 0))
    ops += [op for op in pair_ops if op[1] != "dbias"]  # dQ reads bias / mask; dK/dV owns dbias
    layout = _batch.Layout.build(bs, all_axes, st_dq, seq)
    plan.launches(_launch.launch(_spec(prob, "bwd_dq", acc_name if dq_red else ""), prob, "bwd",
                                 layout, ops, n_rows=prob.seqlen_q,
                                 scalars={k_: v_ for k_, v_ in pair_scalars.items()
                                          if "dbias" not in k_}))
    if dq_red:
        _finish(plan, "dq_out", "dq", dq_red)

    # 3. dK, dV: the kernel sums up to group_max(family) of the heads that share
    #    a KV head (GQA/MQA) in registers; larger groups are split over CTAs along
    #    an extra "chunk" axis, and every other broadcast of k or v is summed
    #    afterwards by a (pairwise, so accurate) CuPy reduction.
    _plan_dkdv(plan, env, st, None, pair_ops, pair_scalars)
    _finish_dbias(plan, env)


def _finish_dbias(plan, env):
    """dbias = its accumulator, cast (nothing when the kernels added into dbias)."""
    if "dbias_out" not in env or env.get("dbias") is env["dbias_out"]:
        return

    def step(env_):
        env_["dbias_out"][...] = env_["dbias"].astype(env_["dbias_out"].dtype)
    plan.host(step)


def _qkv_ops(env):
    """The operands every dQ / dK/dV kernel reads."""
    rs, vs = _launch.row_stride, _launch.vec_stride
    return [(n, n, env[n], rs(env[n])) for n in ("q", "k", "v", "dout")] + [
        ("lse", "lse", env["lse"], vs(env["lse"])), ("delta", "delta", env["delta"],
                                                     vs(env["delta"]))]


def _largest_divisor_at_most(n: int, cap: int) -> int:
    if n <= cap:
        return n
    return max(d for d in range(1, cap + 1) if n % d == 0)


def _plan_dkdv(plan, env, st, dq_spec=None, pair_ops=(), pair_scalars=None):
    """Plans dK, dV.  With ``dq_spec`` (the atomic-dQ kernel), plans that kernel
    and its zeroed workspace env["dq_accum"] instead, and returns False without
    planning anything when dK/dV would need float32 buffers (a broadcast the
    kernel does not sum), which only the pair of kernels handles."""
    prob = plan.prob
    bs = prob.bshape
    k, v = env["k"], env["v"]
    g_axes, n_group, g_strides = _group_axes(bs, k, v, st)
    in_kernel = _largest_divisor_at_most(n_group, _config.group_max(prob.family))
    n_chunks = n_group // in_kernel
    rest = [i for i in range(len(bs)) if i not in g_axes]

    # Virtual batch axes of the launch: the non-group axes, then the chunk axis
    # (k and v have no group stride: the chunk axis broadcasts them, stride 0).
    vshape = [bs[i] for i in rest] + ([n_chunks] if n_chunks > 1 else [])
    vst = {n: [st[n][i] for i in rest] + ([g_strides.get(n, 0) * in_kernel] if n_chunks > 1 else [])
           for n in st}
    kb = _batch.is_broadcast(k.shape[:-2], bs)
    vb = _batch.is_broadcast(v.shape[:-2], bs)
    chunk = [True] if n_chunks > 1 else []
    k_red = tuple(a for a, f in enumerate([kb[i] for i in rest] + chunk) if f)
    v_red = tuple(a for a, f in enumerate([vb[i] for i in rest] + chunk) if f)
    ops = _qkv_ops(env)
    if "alibi" in env:
        ops.append(("var.alibi", "alibi", env["alibi"], 0))
    ops += list(pair_ops)
    scalars = {"n_group": in_kernel, "q_sg": g_strides["q"], "dout_sg": g_strides["dout"],
               "lse_sg": g_strides["lse"], "delta_sg": g_strides["delta"],
               "var.alibi_sg": g_strides.get("alibi", 0), **(pair_scalars or {})}
    for n in ("bias", "mask", "dbias", "dropout_index"):
        if n in st:
            scalars[f"var.{n}_sg"] = g_strides.get(n, 0)
    if dq_spec is not None:
        if k_red or v_red:
            return False
        # Workspace contract of the atomic-dQ kernels (cuda_src/sm80/bwd.cuh): rows
        # of the head-dim bucket's width, the query axis padded to whole BLOCK_M tiles.
        sq_pad = -(-prob.seqlen_q // dq_spec.block_m) * dq_spec.block_m
        if prob.packed:
            # each sequence's rows padded to whole tiles: cu_qa (flashcupy/_varlen.py)
            if dq_spec.block_m > _SEQ_QA_PAD:
                return False
            sq_pad = prob.packed[0] + (bs[0] * _SEQ_QA_PAD)
        dqa = _rows_buffer(plan, env, "dq_accum", bs, (sq_pad, dq_spec.head_dim), np.float32)
        plan.zero("dq_accum_packed" if prob.packed else "dq_accum")
        dqa_st = _strides(dqa, bs)
        # contiguous, so the group axes always merge into one strided axis
        scalars["dq_accum_sg"] = dqa_st[g_axes[-1]] if g_axes else 0
        vst["dq_accum"] = ([dqa_st[i] for i in rest]
                           + ([scalars["dq_accum_sg"] * in_kernel] if n_chunks > 1 else []))
        ops.append(("dq_accum", "dq_accum", dqa, _launch.row_stride(dqa)))
    if k_red or v_red:
        # Both gradients share the kernel's store type: buffers for both.
        dk_buf = _rows_buffer(plan, env, "dk", vshape, k.shape[-2:], prob.acc_dtype)
        dv_buf = _rows_buffer(plan, env, "dv", vshape, v.shape[-2:], prob.acc_dtype)
        vst["dk"] = [s_ // dk_buf.itemsize for s_ in dk_buf.strides[:-2]]
        vst["dv"] = [s_ // dv_buf.itemsize for s_ in dv_buf.strides[:-2]]
        acc_name = "fp64" if prob.acc_dtype == np.float64 else "fp32"
    else:
        dk_buf = plan.alias(env, "dk", "dk_out")
        dv_buf = plan.alias(env, "dv", "dv_out")
        vst["dk"] = [_strides(dk_buf, bs)[i] for i in rest]
        vst["dv"] = [_strides(dv_buf, bs)[i] for i in rest]
        acc_name = ""
    ops += [("dk", "dk", dk_buf, _launch.row_stride(dk_buf)),
            ("dv", "dv", dv_buf, _launch.row_stride(dv_buf))]
    layout = _batch.Layout.build(vshape, range(len(vshape)), vst, prob.features.seq)
    spec = dq_spec if dq_spec is not None else _spec(prob, "bwd_dkdv", acc_name)
    plan.launches(_launch.launch(spec, prob, "bwd", layout, ops, n_rows=prob.seqlen_k,
                                 scalars=scalars))
    if k_red or v_red:
        _finish(plan, "dk_out", "dk", k_red)
        _finish(plan, "dv_out", "dv", v_red)
    return True
