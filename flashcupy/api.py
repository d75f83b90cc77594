"""NumPy-style entry points on ``cupy.ndarray``.

Data flows one way: validate -> pick a kernel configuration -> compile (memoized)
-> launch.  Everything that can be wrong with the arguments is checked here,
before any allocation or launch; the messages name the argument, what it got,
and what was expected.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np

from . import _batch, _config, _dtypes, _launch

try:
    import cupy
except ImportError as e:  # pragma: no cover - exercised only without CuPy
    raise ImportError(
        "flashcupy needs CuPy. Install it with the extra for your CUDA major version, "
        "e.g. `pip install \"flashcupy[cuda13]\"` (or `flashcupy[cuda12]`); if you already "
        "have a CuPy build, install flashcupy without extras.") from e


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


@functools.lru_cache(maxsize=None)
def _compute_capability(device_id: int) -> int:
    return int(cupy.cuda.Device(device_id).compute_capability)


@dataclass(frozen=True)
class Problem:
    """A validated attention problem: everything the launchers need."""

    bshape: tuple
    seqlen_q: int
    seqlen_k: int
    head_dim: int
    head_dim_v: int
    scale: float
    causal: bool
    dtype: np.dtype
    acc_dtype: np.dtype
    device_id: int
    cc: int
    family: str

    @property
    def dtype_name(self) -> str:
        return _dtypes.info(self.dtype).name

    @property
    def nbatch(self) -> int:
        return math.prod(self.bshape)

    @property
    def empty(self) -> bool:
        return self.nbatch == 0 or self.seqlen_q == 0 or self.seqlen_k == 0


def _last_axis_contiguous(x):
    """The kernels read rows as contiguous runs: copy only when the last axis is
    strided (any other layout, including broadcast axes, is used in place)."""
    if x.ndim and x.shape[-1] != 1 and x.strides[-1] != x.itemsize:
        return cupy.ascontiguousarray(x)
    if any(s % x.itemsize for s in x.strides):
        return cupy.ascontiguousarray(x)
    return x


def _prepare(fn, q, k, v, causal, scale):
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
    cc = _compute_capability(dev)
    info = _dtypes.info(q.dtype)
    try:
        family = _config.choose_family(info.name, cc)
    except ValueError as e:
        raise ValueError(f"{fn}: {e}") from None
    bshape = np.broadcast_shapes(q.shape[:-2], k.shape[:-2], v.shape[:-2])
    prob = Problem(bshape=tuple(bshape), seqlen_q=q.shape[-2], seqlen_k=k.shape[-2],
                   head_dim=d, head_dim_v=v.shape[-1], scale=scale, causal=bool(causal),
                   dtype=q.dtype, acc_dtype=info.acc_dtype, device_id=dev, cc=cc, family=family)
    return prob


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


# ---------------------------------------------------------------------------
# Forward
# ---------------------------------------------------------------------------
def attention(q, k, v, *, causal=False, scale=None, return_lse=False):
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

    Returns
    -------
    out : cupy.ndarray, shape (..., Sq, Dv), the input dtype
    lse : cupy.ndarray, shape (..., Sq), float32 (float64 for float64 inputs)
        Only with ``return_lse=True``.
    """
    out, lse = _forward(q, k, v, causal=causal, scale=scale)
    return (out, lse) if return_lse else out


# ---------------------------------------------------------------------------
# Plans: everything derived from a call's signature (validation, batch layout,
# kernel choice, argument packing) is built once and replayed; a repeated call
# only checks types, looks the plan up, allocates outputs and packs pointers.
# ---------------------------------------------------------------------------
class _Plan:
    """Steps over a {name: array} environment: ("alloc", name, shape, dtype),
    ("alias", name, other), ("zero", name), ("launch", Launch),
    ("finish", grad, buffer, axes)."""

    __slots__ = ("prob", "steps")

    def __init__(self, prob):
        self.prob, self.steps = prob, []

    def alloc(self, env, name, shape, dtype):
        self.steps.append(("alloc", name, tuple(shape), dtype))
        env[name] = cupy.empty(shape, dtype)
        return env[name]

    def alias(self, env, name, other):
        self.steps.append(("alias", name, other))
        env[name] = env[other]
        return env[name]

    def launches(self, ls):
        self.steps.extend(("launch", x) for x in ls)

    def finish(self, grad, buf, axes):
        self.steps.append(("finish", grad, buf, axes))

    def zero(self, name):
        self.steps.append(("zero", name))

    @property
    def pointers_only(self) -> bool:
        """Whether the steps need nothing of the arrays but their pointers (no
        CuPy reduction): what flashcupy.torch replays without CuPy views."""
        return all(st[0] != "finish" for st in self.steps)

    def run(self, env, stream_ptr=None, alloc=None):
        """Replays the steps on CuPy's current stream, or on ``stream_ptr``;
        ``alloc(shape, dtype)`` replaces ``cupy.empty`` for the workspaces."""
        if stream_ptr is None:
            stream_ptr = cupy.cuda.get_current_stream().ptr
        for st in self.steps:
            kind = st[0]
            if kind == "launch":
                st[1].run(env, stream_ptr)
            elif kind == "alloc":
                if st[1] not in env:  # the first run reuses what building allocated
                    env[st[1]] = cupy.empty(st[2], st[3]) if alloc is None else alloc(*st[2:])
            elif kind == "alias":
                env[st[1]] = env[st[2]]
            elif kind == "zero":
                x = env[st[1]]  # contiguous (allocated by the plan)
                cupy.cuda.runtime.memsetAsync(x.data.ptr, 0, x.nbytes, stream_ptr)
            elif cupy.cuda.get_current_stream().ptr == stream_ptr:
                _finish_grad(env[st[1]], env[st[2]], st[3])
            else:
                with cupy.cuda.ExternalStream(stream_ptr):
                    _finish_grad(env[st[1]], env[st[2]], st[3])


_PLANS: dict = {}
_MAX_PLANS = 4096  # signatures remembered; a full cache is simply cleared


def _signature(kind, arrays, causal, scale):
    """The plan key: everything validation and planning depend on; None (no
    plan) for arguments of unusual types, which the full validation then
    judges (an unhashable ``scale=[0.5]`` must fail with a message naming it)."""
    if type(causal) is not bool or not (scale is None or type(scale) in (float, int)):
        return None
    sig = [kind, causal, scale, _config.current_family()]
    for x in arrays:
        sig.extend((x.shape, x.strides, x.dtype, x.data.device_id))
    return tuple(sig)


def cached_plan(kind, arrays, causal, scale):
    """The plan a call with these arguments replays, or None (for
    flashcupy.torch, which keys plans on tensor metadata)."""
    key = _signature(kind, arrays, causal, scale)
    return _PLANS.get(key) if key is not None else None


def _remember(key, plan):
    if key is None:
        return
    if len(_PLANS) >= _MAX_PLANS:
        _PLANS.clear()
    _PLANS[key] = plan


def _forward(q, k, v, *, causal, scale, out=None, lse=None):
    """``attention`` with optional preallocated, C-contiguous ``out``/``lse``."""
    fn = "flashcupy.attention"
    for name, x in (("q", q), ("k", k), ("v", v)):
        _check_array(fn, name, x)
    key = _signature("fwd", (q, k, v), causal, scale)
    plan = _PLANS.get(key) if key is not None else None
    prob = plan.prob if plan is not None else _prepare(fn, q, k, v, causal, scale)
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
        if plan is not None:
            plan.run(env)
            return out, lse
        if prob.empty:
            # Sk = 0: every row sees no key, so out = 0 and lse = -inf.
            out.fill(0)
            lse.fill(-np.inf)
            return out, lse
        qc, kc, vc = (_last_axis_contiguous(x) for x in (q, k, v))
        cacheable = qc is q and kc is k and vc is v  # a copy is made per call: no plan
        env.update(q=qc, k=kc, v=vc)
        plan = _Plan(prob)
        _plan_forward(plan, env)
        plan.run(env)
        if cacheable:
            _remember(key, plan)
    return out, lse


def _strides(x, bshape):
    return _batch.batch_strides(x.shape[:-2], [s // x.itemsize for s in x.strides[:-2]], bshape)


def _vec_strides(x, bshape):
    return _batch.batch_strides(x.shape[:-1], [s // x.itemsize for s in x.strides[:-1]], bshape)


def _fwd_spec(prob):
    if prob.family == "generic":
        return _config.generic_spec("fwd", prob.dtype_name, prob.head_dim, prob.head_dim_v)
    from . import _config_sm80
    return _config_sm80.fwd_spec(prob)


def _plan_forward(plan, env):
    prob, bs = plan.prob, plan.prob.bshape
    q, k, v, out, lse = (env[n] for n in ("q", "k", "v", "o", "lse"))
    layout = _batch.Layout.build(bs, range(len(bs)), {
        "q": _strides(q, bs), "k": _strides(k, bs), "v": _strides(v, bs),
        "o": _strides(out, bs), "lse": _vec_strides(lse, bs)})
    plan.launches(_launch.fwd(_fwd_spec(prob), prob.device_id, prob.cc, layout, q, k, v, out,
                              lse, prob))


# ---------------------------------------------------------------------------
# Backward
# ---------------------------------------------------------------------------
def attention_backward(dout, q, k, v, out, lse, *, causal=False, scale=None, deterministic=False):
    """Gradients of ``attention`` with respect to q, k and v.

    Parameters
    ----------
    dout : cupy.ndarray, shape (..., Sq, Dv)
        Gradient of the loss with respect to ``out`` (any strides).
    q, k, v : cupy.ndarray
        The forward inputs.
    out, lse : cupy.ndarray
        The forward outputs (``attention(..., return_lse=True)``).
    causal, scale : as in the forward call.
    deterministic : bool
        Bit-identical results run to run.  The generic kernels are always
        deterministic; the tensor-core kernels then compute dQ in a separate
        pass instead of with float32 atomics (see README for the cost).

    Returns
    -------
    dq, dk, dv : cupy.ndarray with the shapes and dtype of q, k, v.
        Gradients of broadcast inputs are summed over the broadcast axes.
    """
    return _backward(dout, q, k, v, out, lse, causal=causal, scale=scale,
                     deterministic=deterministic)


def _backward(dout, q, k, v, out, lse, *, causal, scale, deterministic=False,
              dq=None, dk=None, dv=None):
    fn = "flashcupy.attention_backward"
    for name, x in (("dout", dout), ("q", q), ("k", k), ("v", v), ("out", out), ("lse", lse)):
        _check_array(fn, name, x)
    if not isinstance(deterministic, (bool, np.bool_)):
        raise TypeError(f"{fn}: deterministic must be a bool, got {deterministic!r}")
    # deterministic=False lets the tensor-core family add dQ with float32
    # atomics (run-dependent summation order); every other path has one writer
    # per gradient element and sums in a fixed order.
    # deterministic picks the kernels: it is part of the plan's key
    key = _signature("bwd-det" if deterministic else "bwd", (dout, q, k, v, out, lse), causal,
                     scale)
    plan = _PLANS.get(key) if key is not None else None
    if plan is None:
        prob = _prepare(fn, q, k, v, causal, scale)
        out_shape, lse_shape = broadcast_shapes(q.shape, k.shape, v.shape)
        dev = prob.device_id
        _check_given(fn, "dout", dout, out_shape, prob.dtype, dev)
        _check_given(fn, "out", out, out_shape, prob.dtype, dev)
        _check_given(fn, "lse", lse, lse_shape, prob.acc_dtype, dev)
    else:
        prob = plan.prob
    for name, x, ref in (("dq", dq, q), ("dk", dk, k), ("dv", dv, v)):
        if x is not None:
            _check_output(fn, name, x, ref.shape, prob.dtype, prob.device_id)

    with cupy.cuda.Device(prob.device_id):
        dq = cupy.empty(q.shape, prob.dtype) if dq is None else dq
        dk = cupy.empty(k.shape, prob.dtype) if dk is None else dk
        dv = cupy.empty(v.shape, prob.dtype) if dv is None else dv
        env = {"dout": dout, "q": q, "k": k, "v": v, "o": out, "lse": lse,
               "dq_out": dq, "dk_out": dk, "dv_out": dv}
        if plan is not None:
            plan.run(env)
            return dq, dk, dv
        if prob.empty:
            # No (query, key) pair interacts: every gradient is 0.
            for g in (dq, dk, dv):
                g.fill(0)
            return dq, dk, dv
        copies = {n: _last_axis_contiguous(env[n]) for n in ("q", "k", "v", "o", "dout")}
        cacheable = all(copies[n] is env[n] for n in copies)
        env.update(copies)
        plan = _Plan(prob)
        _plan_backward(plan, env, deterministic)
        plan.run(env)
        if cacheable:
            _remember(key, plan)
    return dq, dk, dv


def _group_axes(bshape, k, v, strides):
    """Chooses the batch axes that k and v both broadcast over and that the
    dK/dV kernel can sum in registers: the largest run of adjacent such axes
    that merges into one strided axis for q, dout, lse and delta.  Returns
    (axes, n_group, {name: group stride})."""
    kb = _batch.is_broadcast(k.shape[:-2], bshape)
    vb = _batch.is_broadcast(v.shape[:-2], bshape)
    names = ("q", "dout", "lse", "delta")
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


def _bwd_spec(prob, kernel, grad_dtype=""):
    if prob.family == "generic":
        if kernel == "bwd_preprocess":
            return _config.generic_spec(kernel, prob.dtype_name)
        return _config.generic_spec(kernel, prob.dtype_name, prob.head_dim, prob.head_dim_v,
                                    grad_dtype)
    from . import _config_sm80
    return _config_sm80.bwd_spec(prob, kernel, grad_dtype)


def _grad_target(plan, env, x, name, bshape):
    """Makes ``env[name]`` the array the dQ kernel writes: the gradient itself, or,
    when ``x`` broadcasts over batch axes, a buffer of the broadcast shape in the
    accumulator dtype, to be summed into the gradient by a finish step.
    Returns (target, axes to sum)."""
    reduce_axes = tuple(i for i, f in enumerate(_batch.is_broadcast(x.shape[:-2], bshape)) if f)
    if not reduce_axes:
        return plan.alias(env, name, name + "_out"), ()
    buf = plan.alloc(env, name, tuple(bshape) + tuple(x.shape[-2:]), plan.prob.acc_dtype)
    return buf, reduce_axes


def _finish_grad(grad, buf, reduce_axes):
    s = buf.sum(axis=reduce_axes, keepdims=True) if reduce_axes else buf
    grad[...] = s.reshape(grad.shape).astype(grad.dtype)


def _plan_backward(plan, env, deterministic):
    prob = plan.prob
    bs = prob.bshape
    dev, cc = prob.device_id, prob.cc
    all_axes = range(len(bs))
    acc_name = "fp64" if prob.acc_dtype == np.float64 else "fp32"
    q, k, v, out, dout, lse = (env[n] for n in ("q", "k", "v", "o", "dout", "lse"))

    # 1. delta = rowsum(dO * O), in the accumulator dtype
    delta = plan.alloc(env, "delta", bs + (prob.seqlen_q,), prob.acc_dtype)
    layout = _batch.Layout.build(bs, all_axes, {
        "o": _strides(out, bs), "dout": _strides(dout, bs), "delta": _vec_strides(delta, bs)})
    plan.launches(_launch.bwd_preprocess(_bwd_spec(prob, "bwd_preprocess"), dev, cc, layout,
                                         out, dout, delta, prob))

    st = {"q": _strides(q, bs), "k": _strides(k, bs), "v": _strides(v, bs),
          "dout": _strides(dout, bs), "lse": _vec_strides(lse, bs),
          "delta": _vec_strides(delta, bs)}

    dq_buf, dq_red = _grad_target(plan, env, q, "dq", bs)

    # 2. Fast path (tensor-core family, deterministic=False): one dK/dV kernel
    #    also adds dS K into a zeroed float32 workspace with atomics (5 products
    #    per step instead of the 4 + 3 of the dK/dV and dQ pair), then a
    #    bandwidth kernel scales and casts it into dQ.  Atomic adds land in run-
    #    dependent order, so dQ's last bits may differ between runs.
    if not deterministic and not dq_red and prob.family != "generic":
        dq_spec = _bwd_spec(prob, "bwd_dkdvq")
        if dq_spec is not None and _plan_dkdv(plan, env, st, dq_spec):
            spec = _bwd_spec(prob, "bwd_dq_convert")
            layout = _batch.Layout.build(bs, all_axes, {
                "dq_accum": _strides(env["dq_accum"], bs), "dq": _strides(dq_buf, bs)})
            plan.launches(_launch.bwd_dq_convert(spec, dev, cc, layout, env["dq_accum"],
                                                 dq_buf, prob))
            return

    # 2'. dQ: one writer per element; q broadcast over a batch axis needs a sum.
    layout = _batch.Layout.build(bs, all_axes, dict(st, dq=_strides(dq_buf, bs)))
    spec = _bwd_spec(prob, "bwd_dq", acc_name if dq_red else "")
    plan.launches(_launch.bwd_dq(spec, dev, cc, layout, q, k, v, dout, lse, delta, dq_buf, prob))
    if dq_red:
        plan.finish("dq_out", "dq", dq_red)

    # 3. dK, dV: the kernel sums up to group_max(family) of the heads that share
    #    a KV head (GQA/MQA) in registers; larger groups are split over CTAs along
    #    an extra "chunk" axis, and every other broadcast of k or v is summed
    #    afterwards by a (pairwise, so accurate) CuPy reduction.
    _plan_dkdv(plan, env, st)


def _largest_divisor_at_most(n: int, cap: int) -> int:
    if n <= cap:
        return n
    return max(d for d in range(1, cap + 1) if n % d == 0)


def _plan_dkdv(plan, env, st, dq_spec=None):
    """Plans dK, dV.  With ``dq_spec`` (the atomic-dQ kernel), plans that kernel
    and its zeroed workspace env["dq_accum"] instead, and returns False without
    planning anything when dK/dV would need float32 buffers (a broadcast the
    kernel does not sum), which only the pair of kernels handles."""
    prob = plan.prob
    bs = prob.bshape
    q, k, v, dout, lse, delta = (env[n] for n in ("q", "k", "v", "dout", "lse", "delta"))
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
    if dq_spec is not None:
        if k_red or v_red:
            return False
        # Workspace contract of fc_sm80_bwd_dkdvq (cuda_src/sm80/bwd.cuh): rows of
        # the head-dim bucket's width, the query axis padded to whole BLOCK_M tiles.
        sq_pad = -(-prob.seqlen_q // dq_spec.block_m) * dq_spec.block_m
        dqa = plan.alloc(env, "dq_accum", bs + (sq_pad, dq_spec.head_dim), np.float32)
        plan.zero("dq_accum")
        dqa_st = _strides(dqa, bs)
        # contiguous, so the group axes always merge into one strided axis
        g_strides = dict(g_strides, dq_accum=dqa_st[g_axes[-1]] if g_axes else 0)
        vst["dq_accum"] = ([dqa_st[i] for i in rest]
                           + ([g_strides["dq_accum"] * in_kernel] if n_chunks > 1 else []))
    if k_red or v_red:
        # Both gradients share the kernel's store type: buffers for both.
        dk_buf = plan.alloc(env, "dk", tuple(vshape) + tuple(k.shape[-2:]), prob.acc_dtype)
        dv_buf = plan.alloc(env, "dv", tuple(vshape) + tuple(v.shape[-2:]), prob.acc_dtype)
        vst["dk"] = [s_ // dk_buf.itemsize for s_ in dk_buf.strides[:-2]]
        vst["dv"] = [s_ // dv_buf.itemsize for s_ in dv_buf.strides[:-2]]
        acc_name = "fp64" if prob.acc_dtype == np.float64 else "fp32"
    else:
        dk_buf = plan.alias(env, "dk", "dk_out")
        dv_buf = plan.alias(env, "dv", "dv_out")
        vst["dk"] = [_strides(dk_buf, bs)[i] for i in rest]
        vst["dv"] = [_strides(dv_buf, bs)[i] for i in rest]
        acc_name = ""
    layout = _batch.Layout.build(vshape, range(len(vshape)), vst)
    spec = dq_spec if dq_spec is not None else _bwd_spec(prob, "bwd_dkdv", acc_name)
    plan.launches(_launch.bwd_dkdv(spec, prob.device_id, prob.cc, layout, q, k, v, dout, lse,
                                   delta, dk_buf, dv_buf, (in_kernel, g_strides), prob,
                                   dq_accum=env.get("dq_accum") if dq_spec is not None else None))
    if k_red or v_red:
        plan.finish("dk_out", "dk", k_red)
        plan.finish("dv_out", "dv", v_red)
    return True
