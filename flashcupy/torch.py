"""PyTorch interop: flashcupy attention on CUDA tensors, differentiable and compilable.

``import flashcupy`` never imports PyTorch; this module is loaded only by
``import flashcupy.torch``.  (Inside it, ``import torch`` is an absolute import
and binds the real PyTorch, not this module.)

Public functions
----------------
attention(q, k, v, *, causal=False, scale=None, return_lse=False, window=None,
          softcap=None, alibi_slopes=None, sink=None)
    flashcupy's own convention: leading dims broadcast like ``torch.matmul``
    (MQA/GQA), causal masking and windows are bottom-right aligned; the
    variants (sliding window, softcap, ALiBi, attention sinks) as in
    ``flashcupy.attention``.  ``sink`` is differentiable, ``alibi_slopes`` not.
scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0,
                             is_causal=False, *, scale=None, enable_gqa=False)
    a drop-in for ``torch.nn.functional.scaled_dot_product_attention`` on the
    subset it supports (no mask tensor, no dropout).

How a call reaches the kernels
------------------------------
1. Validation in Python (types, devices, dtypes, unsupported arguments), so a
   bad call raises before anything is allocated or launched.  Under
   ``torch.compile`` these checks run once, at trace time.
2. ``torch.ops.flashcupy.attention_fwd`` / ``attention_bwd``: custom operators
   (``torch.library.custom_op``) with fake (meta) implementations, so autograd,
   ``torch.compile(fullgraph=True)`` and ``opcheck`` treat them like any ATen op.
   Their schemas::

       attention_fwd(Tensor q, Tensor k, Tensor v, bool causal, float? scale,
                     int? window_left=None, int? window_right=None,
                     float? softcap=None, Tensor? alibi=None, Tensor? sink=None)
           -> (Tensor out, Tensor lse)
       attention_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out,
                     Tensor lse, bool causal, float? scale, bool deterministic,
                     <the same five variant arguments>)
           -> (Tensor dq, Tensor dk, Tensor dv, Tensor dsink)

   ``dsink`` is float32 with the sink's shape, or an empty float32 tensor of
   shape (0,) when there is no sink.  A window side of None is unbounded
   (both None: no window); ``causal`` stays its own flag (it sets the right
   side to 0, as in ``flashcupy.attention``).
   Eager calls (not under ``torch.compile``) run the same implementation and
   autograd rule through a plain ``torch.autograd.Function``, whose dispatch
   costs a fraction of a custom operator's.
3. Inside: outputs are ``torch.empty`` (PyTorch's caching allocator).  The
   first call of a signature wraps every tensor with ``cupy.from_dlpack``
   (zero-copy, strides kept, stride-0 broadcast views included) and
   ``flashcupy.api`` launches the kernels on PyTorch's *current stream* of the
   tensors' device; workspaces the core allocates through CuPy come from
   PyTorch's allocator too (see ``_cupy_on_torch``), which keeps the call safe
   to capture in a CUDA graph.  Later calls with the same metadata replay the
   plan that call built on raw pointers (``_replay``), workspaces again from
   PyTorch's allocator.  Plans live in flashcupy's one plan cache
   (``flashcupy._plan.CACHE``, shared with ``flashcupy.api``) under keys that
   start with "torch" and hold every argument the plan depends on (the
   variant's window, softcap and the ALiBi/sink tensors' metadata included).
   A plan with a CuPy host step (the sink's gradient, gradient reductions
   over broadcast axes) is not replayed on raw pointers: such calls go
   through CuPy views every time.

The LSE output is not differentiable: ``attention(..., return_lse=True)``
returns it with ``requires_grad=False``.
"""
from __future__ import annotations

import contextlib

import cupy
import numpy as np
import torch  # the real PyTorch (absolute import), not this module

from flashcupy import _config, _plan, api

__all__ = ["attention", "scaled_dot_product_attention"]

_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_DEVICE_TYPE = "cuda"


# ----------------------------------------------------------------------------
# validation (pure Python on tensor metadata: traceable by torch.compile)
# ----------------------------------------------------------------------------

def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _check_tensors(fn: str, **tensors: torch.Tensor) -> None:
    """Raises TypeError/ValueError naming the argument on anything the kernels can't take."""
    names = list(tensors)
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{fn}(): {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.layout != torch.strided:
            raise TypeError(f"{fn}(): {name} must be a dense (strided) tensor, got layout {t.layout}")
    for name, t in tensors.items():
        if t.device.type != _DEVICE_TYPE:
            raise ValueError(
                f"{fn}(): {name} must be a CUDA tensor, got a tensor on {t.device}; "
                f"move it with .cuda() or .to('cuda')")
        if t.dim() < 2:
            raise ValueError(
                f"{fn}(): {name} must have at least 2 dims (..., seq, head_dim), "
                f"got shape {tuple(t.shape)}")
    first = names[0]
    t0 = tensors[first]
    for name in names[1:]:
        t = tensors[name]
        if t.device != t0.device:
            raise ValueError(
                f"{fn}(): all tensors must be on one device: {first} is on {t0.device} "
                f"but {name} is on {t.device}")


def _check_dtypes(fn: str, **tensors: torch.Tensor) -> None:
    names = list(tensors)
    first = names[0]
    t0 = tensors[first]
    if t0.dtype not in _SUPPORTED_DTYPES:
        raise TypeError(
            f"{fn}(): {first} has dtype {_dtype_name(t0.dtype)}; supported: float16, bfloat16, "
            f"float32, float64")
    for name in names[1:]:
        t = tensors[name]
        if t.dtype != t0.dtype:
            raise TypeError(
                f"{fn}(): all tensors must have one dtype: {first} is {_dtype_name(t0.dtype)} "
                f"but {name} is {_dtype_name(t.dtype)}")


def _autocast(*tensors: torch.Tensor) -> tuple:
    """Under ``torch.autocast("cuda")``, casts to the autocast dtype as PyTorch does
    for SDPA (a "lower precision" op): float16/bfloat16/float32 inputs are cast,
    float64 ones are not.  Outside autocast (or with matching dtypes) nothing is copied."""
    device_type = tensors[0].device.type
    if not torch.is_autocast_enabled(device_type):
        return tensors
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(t.to(dtype) if t.is_floating_point() and t.dtype != torch.float64 else t
                 for t in tensors)


def _check_scale(fn: str, scale) -> float | None:
    if scale is None:
        return None
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"{fn}(): scale must be a Python float or None, got {type(scale).__name__}")
    return float(scale)


def _check_window(fn: str, window) -> tuple:
    """(left, right), each a Python int >= 0 or None; ``window=None`` is (None, None).
    flashcupy.api's check (pure Python), its messages naming ``window``."""
    return api._check_window(f"{fn}()", window)


def _check_softcap(fn: str, softcap) -> float | None:
    """A finite float > 0, or None (flashcupy.api's check, pure Python)."""
    return api._check_softcap(f"{fn}()", softcap)


def _broadcasts_to(shape, target) -> bool:
    """Whether ``shape`` broadcasts to ``target`` itself (numpy rules), without
    numpy (SymInt-safe: under torch.compile the comparisons become guards)."""
    if len(shape) > len(target):
        return False
    return all(a == 1 or a == b for a, b in zip(reversed(tuple(shape)), reversed(tuple(target))))


def _check_head_tensor(fn: str, name: str, x, batch_shape, device: torch.device) -> None:
    """alibi_slopes / sink: None, or a float32 tensor on the inputs' device whose
    shape broadcasts to the batch dims of the call (one value per batch element:
    ``(H,)``, ``(B, H)``, ``(Hkv, G)`` for GQA, ...)."""
    if x is None:
        return
    batch = tuple(batch_shape)
    if not isinstance(x, torch.Tensor):
        raise TypeError(
            f"{fn}(): {name} must be a torch.Tensor (float32, on the device of q, k, v) or "
            f"None, got {type(x).__name__}")
    if x.layout != torch.strided:
        raise TypeError(f"{fn}(): {name} must be a dense (strided) tensor, got layout {x.layout}")
    if x.dtype != torch.float32:
        raise TypeError(
            f"{fn}(): {name} has dtype {_dtype_name(x.dtype)}; expected float32 (one value per "
            f"batch element, broadcastable to the batch dims {batch} of q, k, v)")
    if x.device != device:
        raise ValueError(
            f"{fn}(): {name} is on {x.device} but q, k and v are on {device}; pass {name} "
            f"on {device}")
    if not _broadcasts_to(x.shape, batch):
        raise ValueError(
            f"{fn}(): {name} has shape {tuple(x.shape)}, which does not broadcast to the batch "
            f"dims {batch} of q, k, v (numpy rules; e.g. shape (H,) or (B, H), or (Hkv, G) "
            f"for grouped heads)")


def _check_variants(fn: str, q, k, v, alibi_slopes, sink) -> None:
    """The variant tensors against the (already checked) q, k, v: pure Python
    on metadata, so it runs at trace time under torch.compile."""
    if alibi_slopes is None and sink is None:
        return
    # (not _output_shapes: its memo dict would be written while torch.compile
    # traces, which fails dynamo's guards)
    batch = tuple(torch.broadcast_shapes(q.shape[:-2], k.shape[:-2], v.shape[:-2]))
    _check_head_tensor(fn, "alibi_slopes", alibi_slopes, batch, q.device)
    _check_head_tensor(fn, "sink", sink, batch, q.device)


def _lse_dtype(dtype: torch.dtype) -> torch.dtype:
    # the kernels accumulate float64 inputs in float64, everything else in float32
    return torch.float64 if dtype == torch.float64 else torch.float32


_SHAPES: dict = {}  # concrete (q, k, v) shapes -> (out_shape, lse_shape)


def _output_shapes(q_shape, k_shape, v_shape):
    """(out_shape, lse_shape).  Concrete shapes go through ``api.broadcast_shapes``
    (one source of truth, and its error messages); symbolic shapes (torch.compile
    with dynamic=True, opcheck's dynamic test) take the SymInt-safe route."""
    q_shape, k_shape, v_shape = tuple(q_shape), tuple(k_shape), tuple(v_shape)
    if all(type(d) is int for d in (*q_shape, *k_shape, *v_shape)):
        key = (q_shape, k_shape, v_shape)
        hit = _SHAPES.get(key)  # numpy's broadcast_shapes costs ~5 us a call
        if hit is None:
            out_shape, lse_shape = api.broadcast_shapes(q_shape, k_shape, v_shape)
            if len(_SHAPES) >= 4096:
                _SHAPES.clear()
            hit = _SHAPES[key] = (tuple(out_shape), tuple(lse_shape))
        return hit
    batch = tuple(torch.broadcast_shapes(q_shape[:-2], k_shape[:-2], v_shape[:-2]))
    return (*batch, q_shape[-2], v_shape[-1]), (*batch, q_shape[-2])


# ----------------------------------------------------------------------------
# torch -> cupy: devices, streams, allocations, zero-copy views
# ----------------------------------------------------------------------------

class _SameStreamExport:
    """A tensor seen through DLPack *without* a producer-side stream sync.

    ``cupy.from_dlpack`` passes CuPy's current stream to ``__dlpack__``, and
    PyTorch then records an event on its current stream and makes the
    consumer's stream wait on it.  We always consume on PyTorch's current
    stream itself, so that sync is a no-op that still costs an event per
    tensor; ``stream=-1`` ("no synchronization", the DLPack convention) skips it.
    """

    __slots__ = ("tensor",)

    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor

    def __dlpack_device__(self):
        return self.tensor.__dlpack_device__()

    def __dlpack__(self, *, stream=None, **kwargs):
        return self.tensor.__dlpack__(stream=-1, **kwargs)


def _as_cupy(t: torch.Tensor) -> cupy.ndarray:
    """Zero-copy CuPy view of ``t`` (same pointer, same strides, stride-0 dims kept).

    ``detach()`` is a metadata-only view: DLPack refuses tensors that require grad.
    """
    return cupy.from_dlpack(_SameStreamExport(t.detach()))


def _cupy_stream(ts: torch.cuda.Stream) -> cupy.cuda.Stream:
    try:
        return cupy.cuda.Stream.from_external(ts)  # CUDA stream protocol (__cuda_stream__)
    except (AttributeError, TypeError):  # older CuPy or PyTorch: wrap the raw handle
        return cupy.cuda.ExternalStream(ts.cuda_stream, ts.device_index)


def _torch_malloc(device_index: int):
    """A CuPy allocator that takes memory from PyTorch's caching allocator.

    Each buffer is a ``torch.uint8`` tensor allocated on PyTorch's current
    stream (the one the kernels run on), kept alive by the ``UnownedMemory``
    that wraps it; CuPy drops it when the workspace array dies and the block
    returns to PyTorch's cache, stream-ordered.  During CUDA graph capture
    the buffers come from the graph's private pool, as PyTorch's own do.
    """
    device = torch.device("cuda", device_index)

    def malloc(nbytes: int) -> cupy.cuda.MemoryPointer:
        buf = torch.empty((nbytes,), dtype=torch.uint8, device=device)
        mem = cupy.cuda.UnownedMemory(buf.data_ptr(), nbytes, buf, device_index)
        return cupy.cuda.MemoryPointer(mem, 0)

    return malloc


@contextlib.contextmanager
def _cupy_on_torch(device: torch.device):
    """Makes CuPy work where PyTorch does, for the duration of one operator call.

    * current device: ``device`` for both PyTorch and CuPy (DLPack export
      requires PyTorch's current device to be the tensor's);
    * current stream: PyTorch's current stream on that device (a side stream,
      a graph-capture stream, or the default stream);
    * allocations CuPy makes (the core's workspaces): PyTorch's caching
      allocator, through a thread-local CuPy allocator.
    """
    index = device.index if device.index is not None else torch.cuda.current_device()
    with torch.cuda.device(index), cupy.cuda.Device(index):
        stream = _cupy_stream(torch.cuda.current_stream(index))
        with stream, cupy.cuda.using_allocator(_torch_malloc(index)):
            yield


# ----------------------------------------------------------------------------
# replaying plans on tensors (no CuPy views)
# ----------------------------------------------------------------------------
# The first call of a signature goes through CuPy views and flashcupy.api,
# which validates, picks kernels and builds a plan (flashcupy._plan.Plan).
# That plan is remembered in the one plan cache (_plan.CACHE, which api keys on
# CuPy array metadata) under a key of the tensors' metadata that starts with
# "torch", and later calls replay it on raw pointers: no DLPack export, no CuPy
# stream, device or allocator context.  Those cost ~150 us per forward call at
# small sizes, far more than the kernels.

class _Ptr:
    """What a plan replay needs of a tensor: its address and size.  Holds the
    tensor, so a workspace lives until the launches that use it are queued
    (PyTorch's allocator then reuses the block only in stream order)."""

    __slots__ = ("ptr", "nbytes", "ref")

    def __init__(self, t: torch.Tensor):
        self.ptr, self.nbytes, self.ref = t.data_ptr(), t.nbytes, t

    @property
    def data(self):  # the plan reads ``env[name].data.ptr``, as of a cupy.ndarray
        return self


_PLANS = _plan.CACHE  # flashcupy's one plan cache (bounded: a full cache is cleared)
# the plan's workspace dtypes (numpy types or dtypes) -> torch dtypes
_WORKSPACE_DTYPES = {np.float32: torch.float32, np.dtype(np.float32): torch.float32,
                     np.float64: torch.float64, np.dtype(np.float64): torch.float64}

try:
    _raw_stream = torch._C._cuda_getCurrentRawStream  # device index -> cudaStream_t
except AttributeError:  # pragma: no cover - older PyTorch
    def _raw_stream(index):
        return torch.cuda.current_stream(index).cuda_stream


def _meta(t: torch.Tensor) -> tuple:
    return (t.shape, t.stride(), t.dtype, t.get_device())


def _plan_key(kind: str, tensors, causal: bool, scale, window_left=None, window_right=None,
              softcap=None, extras=(None, None)):
    """Everything the plan depends on, from tensor metadata: the kind, causal,
    scale, the variant (window sides, softcap, the metadata of the ALiBi
    slopes and the sink, ``extras``, None where absent) and the kernel family.
    Starts with "torch" (flashcupy.api's keys in the shared cache never do).
    None if a scalar is of a type the API would judge (then there is no replay)."""
    if not (scale is None or type(scale) is float):
        return None
    if not (softcap is None or type(softcap) is float):
        return None
    if not all(w is None or type(w) is int for w in (window_left, window_right)):
        return None
    sig = ["torch", kind, causal, scale, window_left, window_right, softcap,
           _config.current_family()]
    for t in tensors:
        sig.extend(_meta(t))
    for t in extras:
        sig.append(None if t is None else _meta(t))
    return tuple(sig)


def _remember(key, plan) -> None:
    """Remembers a plan for raw-pointer replays; plans with a CuPy host step
    (``pointers_only`` False: dsink, gradient reductions) are not."""
    if key is None or plan is None or not plan.pointers_only:
        return
    _PLANS.put(key, plan)


def _replay(key, device_index: int, env: dict) -> bool:
    """Runs the remembered plan of ``key`` on the tensors of ``env`` on PyTorch's
    current stream; False (nothing launched) when there is none to replay."""
    plan = _PLANS.get(key)
    if plan is None or torch.cuda.current_device() != device_index:
        return False
    device = torch.device("cuda", device_index)

    def alloc(shape, dtype):
        return _Ptr(torch.empty(shape, dtype=_WORKSPACE_DTYPES[dtype], device=device))

    plan.run({n: _Ptr(t) for n, t in env.items()}, _raw_stream(device_index), alloc)
    return True


# ----------------------------------------------------------------------------
# custom operators
# ----------------------------------------------------------------------------
# The variant travels as five trailing arguments with defaults (so a call
# without them, like the SDPA drop-in's, is unchanged): window_left,
# window_right (None: unbounded), softcap (None: off), alibi and sink (float32
# tensors broadcastable to the batch dims, or None).

_VARIANT_SCHEMA = ("int? window_left=None, int? window_right=None, float? softcap=None, "
                   "Tensor? alibi=None, Tensor? sink=None")
_N_FWD_INPUTS = 10  # q, k, v, causal, scale, and the five variant arguments


def _window_arg(window_left, window_right):
    """The ``window`` argument of flashcupy.api: None when both sides are unbounded."""
    if window_left is None and window_right is None:
        return None
    return (window_left, window_right)


def _as_cupy_opt(t):
    return None if t is None else _as_cupy(t)


def _fwd_impl(q, k, v, causal, scale, window_left=None, window_right=None, softcap=None,
              alibi=None, sink=None):
    # shapes validated (ValueError) before anything is allocated
    out_shape, lse_shape = _output_shapes(q.shape, k.shape, v.shape)
    # outputs from PyTorch's caching allocator: the kernels write into them in place
    out = torch.empty(out_shape, dtype=q.dtype, device=q.device)
    lse = torch.empty(lse_shape, dtype=_lse_dtype(q.dtype), device=q.device)
    key = _plan_key("fwd", (q, k, v), causal, scale, window_left, window_right, softcap,
                    (alibi, sink))
    env = {"q": q, "k": k, "v": v, "o": out, "lse": lse}
    if alibi is not None:
        env["alibi"] = alibi
    if sink is not None:
        env["sink"] = sink
    if _replay(key, q.get_device(), env):
        return out, lse
    window = _window_arg(window_left, window_right)
    with _cupy_on_torch(q.device):
        cq, ck, cv = _as_cupy(q), _as_cupy(k), _as_cupy(v)
        ca, cs = _as_cupy_opt(alibi), _as_cupy_opt(sink)
        api._forward(cq, ck, cv, causal=causal, scale=scale, window=window, softcap=softcap,
                     alibi_slopes=ca, sink=cs, out=_as_cupy(out), lse=_as_cupy(lse))
        _remember(key, api.cached_plan("fwd", (cq, ck, cv), causal, scale, window, softcap,
                                       (ca, cs)))
    return out, lse


@torch.library.custom_op(
    "flashcupy::attention_fwd", mutates_args=(), device_types="cuda",
    schema=f"(Tensor q, Tensor k, Tensor v, bool causal, float? scale, {_VARIANT_SCHEMA}) "
           f"-> (Tensor, Tensor)")
def _attention_fwd(q, k, v, causal, scale, window_left=None, window_right=None, softcap=None,
                   alibi=None, sink=None):
    return _fwd_impl(q, k, v, causal, scale, window_left, window_right, softcap, alibi, sink)


@_attention_fwd.register_fake
def _attention_fwd_fake(q, k, v, causal, scale, window_left=None, window_right=None,
                        softcap=None, alibi=None, sink=None):
    out_shape, lse_shape = _output_shapes(q.shape, k.shape, v.shape)
    return (q.new_empty(out_shape),
            q.new_empty(lse_shape, dtype=_lse_dtype(q.dtype)))


def _dsink_buffer(q, sink, fake=False):
    """dsink: float32 of the sink's shape (C-contiguous), or an empty (0,) tensor
    when there is no sink (an operator returns tensors, never None)."""
    shape = (0,) if sink is None else sink.shape
    if fake:
        return q.new_empty(shape, dtype=torch.float32)
    return torch.empty(shape, dtype=torch.float32, device=q.device)


def _bwd_impl(dout, q, k, v, out, lse, causal, scale, deterministic, window_left=None,
              window_right=None, softcap=None, alibi=None, sink=None):
    # gradients have their inputs' shapes (summed over broadcast axes), C-contiguous
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    dsink = _dsink_buffer(q, sink)
    kind = "bwd-det" if deterministic else "bwd"
    inputs = (dout, q, k, v, out, lse)
    key = _plan_key(kind, inputs, causal, scale, window_left, window_right, softcap,
                    (alibi, sink))
    env = {"dout": dout, "q": q, "k": k, "v": v, "o": out, "lse": lse,
           "dq_out": dq, "dk_out": dk, "dv_out": dv}
    if alibi is not None:
        env["alibi"] = alibi
    if sink is not None:
        env.update(sink=sink, dsink_out=dsink)
    # (with a sink the plan has a host step, dsink, and is never remembered:
    # such calls always take the CuPy route below)
    if _replay(key, q.get_device(), env):
        return dq, dk, dv, dsink
    window = _window_arg(window_left, window_right)
    with _cupy_on_torch(q.device):
        cin = tuple(_as_cupy(t) for t in inputs)
        ca, cs = _as_cupy_opt(alibi), _as_cupy_opt(sink)
        api._backward(*cin, causal=causal, scale=scale, deterministic=deterministic,
                      window=window, softcap=softcap, alibi_slopes=ca, sink=cs,
                      dq=_as_cupy(dq), dk=_as_cupy(dk), dv=_as_cupy(dv),
                      dsink=None if sink is None else _as_cupy(dsink))
        _remember(key, api.cached_plan(kind, cin, causal, scale, window, softcap, (ca, cs)))
    return dq, dk, dv, dsink


@torch.library.custom_op(
    "flashcupy::attention_bwd", mutates_args=(), device_types="cuda",
    schema=f"(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, bool causal, "
           f"float? scale, bool deterministic, {_VARIANT_SCHEMA}) "
           f"-> (Tensor, Tensor, Tensor, Tensor)")
def _attention_bwd(dout, q, k, v, out, lse, causal, scale, deterministic, window_left=None,
                   window_right=None, softcap=None, alibi=None, sink=None):
    return _bwd_impl(dout, q, k, v, out, lse, causal, scale, deterministic, window_left,
                     window_right, softcap, alibi, sink)


@_attention_bwd.register_fake
def _attention_bwd_fake(dout, q, k, v, out, lse, causal, scale, deterministic, window_left=None,
                        window_right=None, softcap=None, alibi=None, sink=None):
    return (q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape),
            _dsink_buffer(q, sink, fake=True))


def _setup_context(ctx, inputs, output):
    # the dispatcher drops trailing arguments equal to their defaults: pad them back
    inputs = tuple(inputs) + (None,) * (_N_FWD_INPUTS - len(inputs))
    q, k, v, causal, scale, window_left, window_right, softcap, alibi, sink = inputs
    out, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(q, k, v, out, lse, alibi, sink)
    ctx.causal = causal
    ctx.scale = scale
    ctx.variant = (window_left, window_right, softcap)


def _grads(ctx, dq, dk, dv, dsink, sink):
    """One gradient per forward input: q, k, v, then None for the flags and
    scalars and for the ALiBi slopes (not differentiable), dsink for the sink."""
    need = tuple(ctx.needs_input_grad) + (False,) * _N_FWD_INPUTS
    return (dq if need[0] else None, dk if need[1] else None, dv if need[2] else None,
            None, None, None, None, None, None,
            dsink if sink is not None and need[9] else None)


def _run_backward(ctx, dout, bwd):
    q, k, v, out, lse, alibi, sink = ctx.saved_tensors
    if dout.stride(-1) != 1:
        # e.g. the fully expanded (all strides 0) gradient of out.sum(); the core
        # wants a unit-stride last axis, so make that one copy here, in PyTorch
        dout = dout.contiguous()
    dq, dk, dv, dsink = bwd(dout, q, k, v, out, lse, ctx.causal, ctx.scale,
                            torch.are_deterministic_algorithms_enabled(), *ctx.variant,
                            alibi, sink)
    return _grads(ctx, dq, dk, dv, dsink, sink)


def _backward(ctx, dout, dlse):
    # dlse is ignored: lse is marked non-differentiable in _setup_context
    return _run_backward(ctx, dout, torch.ops.flashcupy.attention_bwd)


_attention_fwd.register_autograd(_backward, setup_context=_setup_context)


class _EagerAttention(torch.autograd.Function):
    """The eager path: the same implementation and autograd rule as the custom
    operators, through a plain autograd.Function.  A custom operator's
    dispatch (schema checks, the aliasing check on every output) cost more
    host time than the kernels of a small call; under ``torch.compile`` the
    operators are used (``_attention``), so tracing sees an opaque op."""

    @staticmethod
    def forward(ctx, q, k, v, causal, scale, window_left, window_right, softcap, alibi, sink):
        out, lse = _fwd_impl(q, k, v, causal, scale, window_left, window_right, softcap, alibi,
                             sink)
        _setup_context(ctx, (q, k, v, causal, scale, window_left, window_right, softcap, alibi,
                             sink), (out, lse))
        return out, lse

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout, dlse):
        return _run_backward(ctx, dout, _bwd_impl)


_is_compiling = getattr(torch.compiler, "is_compiling", lambda: False)


def _attention(q, k, v, causal: bool, scale, window_left=None, window_right=None, softcap=None,
               alibi=None, sink=None):
    if _is_compiling():
        return torch.ops.flashcupy.attention_fwd(q, k, v, causal, scale, window_left,
                                                 window_right, softcap, alibi, sink)
    return _EagerAttention.apply(q, k, v, causal, scale, window_left, window_right, softcap,
                                 alibi, sink)


# ----------------------------------------------------------------------------
# public API
# ----------------------------------------------------------------------------

def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
              scale: float | None = None, return_lse: bool = False,
              window: tuple | None = None, softcap: float | None = None,
              alibi_slopes: torch.Tensor | None = None, sink: torch.Tensor | None = None):
    """FlashAttention on CUDA tensors, differentiable w.r.t. ``q``, ``k``, ``v`` (and ``sink``).

    Parameters
    ----------
    q : torch.Tensor, shape (..., Sq, D)
    k : torch.Tensor, shape (..., Sk, D)
    v : torch.Tensor, shape (..., Sk, Dv)
        CUDA tensors of one dtype (float16, bfloat16, float32 or float64) on
        one device.  Leading dims broadcast like ``torch.matmul``: ``k``/``v``
        of shape ``(B, 1, Sk, D)`` against ``q`` of shape ``(B, H, Sq, D)`` is
        multi-query attention.  Strided views (e.g. ``x.transpose(1, 2)`` of a
        ``(B, S, H, D)`` tensor, or ``expand``-ed dims) are used in place.
    causal : bool
        Bottom-right aligned mask: query ``i`` sees key ``j`` iff
        ``j <= i + Sk - Sq``.  Rows that see no key give ``out = 0``,
        ``lse = -inf``.
    scale : float, optional
        Multiplies ``q @ k^T``; defaults to ``1 / sqrt(D)``.
    return_lse : bool
        Also return the row log-sum-exp of the scaled scores (natural log).
    window : (left, right), optional
        Sliding-window (local) attention, bottom-right aligned like ``causal``:
        query ``i`` sees key ``j`` iff ``i + Sk - Sq - left <= j <= i + Sk - Sq + right``.
        Each side is an int >= 0 or None (unbounded); ``causal=True`` sets
        ``right = 0``.
    softcap : float, optional
        ``c > 0``: the scaled score ``s`` becomes ``c * tanh(s / c)`` before any
        mask, ALiBi or softmax.
    alibi_slopes : torch.Tensor, float32, optional
        On the inputs' device, broadcastable to the batch dims (``(H,)``,
        ``(B, H)``, ``(Hkv, G)`` for grouped heads): adds
        ``-slope * |i + Sk - Sq - j|`` to the scaled score.  Not differentiable
        (its gradient is None).
    sink : torch.Tensor, float32, optional
        On the inputs' device, broadcastable to the batch dims: one logit per
        (batch,) head that joins the softmax denominator and carries no value;
        ``lse`` includes it.  Differentiable: its gradient has the sink's shape
        (summed over the axes it was broadcast along).

    Returns
    -------
    out : torch.Tensor, shape (*batch, Sq, Dv), the input dtype, C-contiguous
    lse : torch.Tensor, shape (*batch, Sq), float32 (float64 for float64 input)
        Only with ``return_lse=True``; not differentiable.

    Any subset of ``q``, ``k``, ``v`` (and ``sink``) may require grad.  The kernels run on
    ``torch.cuda.current_stream()`` of the tensors' device.  Under
    ``torch.autocast("cuda")`` inputs are cast to the autocast dtype, as for
    PyTorch's SDPA.
    """
    fn = "attention"
    window_left, window_right = _check_window(fn, window)
    softcap = _check_softcap(fn, softcap)
    _check_tensors(fn, q=q, k=k, v=v)
    q, k, v = _autocast(q, k, v)  # the variant tensors stay float32
    _check_dtypes(fn, q=q, k=k, v=v)
    scale = _check_scale(fn, scale)
    _check_variants(fn, q, k, v, alibi_slopes, sink)
    out, lse = _attention(q, k, v, bool(causal), scale, window_left, window_right, softcap,
                          alibi_slopes, sink)
    return (out, lse) if return_lse else out


def scaled_dot_product_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                                 attn_mask: torch.Tensor | None = None, dropout_p: float = 0.0,
                                 is_causal: bool = False, *, scale: float | None = None,
                                 enable_gqa: bool = False) -> torch.Tensor:
    """Drop-in for ``torch.nn.functional.scaled_dot_product_attention`` (a subset).

    Same signature and results as PyTorch's for what it supports:

    * ``attn_mask`` must be ``None`` and ``dropout_p`` 0 (else NotImplementedError);
    * ``is_causal=True`` needs ``L == S`` (query and key lengths): PyTorch's
      causal mask is top-left aligned and flashcupy's bottom-right, which agree
      only for square masks (else NotImplementedError; for the bottom-right
      mask call ``flashcupy.torch.attention(..., causal=True)``);
    * ``enable_gqa=True``: query ``(..., Hq, L, E)``, key/value ``(..., Hkv, S, E)``
      with ``Hq = G * Hkv``, query head ``h`` uses key/value head ``h // G``;
      mapped onto broadcasting with views, no copies.

    Leading dims broadcast as in ``torch.matmul`` (as PyTorch's math backend does).
    """
    fn = "scaled_dot_product_attention"
    if attn_mask is not None:
        raise NotImplementedError(
            f"{fn}(): attn_mask is not supported by flashcupy (got a mask tensor); for a causal "
            f"mask pass is_causal=True, for other masks use torch's own SDPA")
    if dropout_p != 0.0:
        raise NotImplementedError(
            f"{fn}(): dropout_p={dropout_p} is not supported: flashcupy does not implement "
            f"attention dropout yet; pass dropout_p=0.0 (in training too), or use "
            f"torch.nn.functional.scaled_dot_product_attention where dropout is needed")
    _check_tensors(fn, query=query, key=key, value=value)
    query, key, value = _autocast(query, key, value)
    _check_dtypes(fn, query=query, key=key, value=value)
    scale = _check_scale(fn, scale)
    L, S = query.size(-2), key.size(-2)
    if is_causal and L != S:
        raise NotImplementedError(
            f"{fn}(): is_causal=True with query length L={L} != key length S={S} is not "
            f"supported: torch's causal mask is top-left aligned (query i sees keys j <= i) "
            f"while flashcupy's is bottom-right aligned (j <= i + S - L); they agree only when "
            f"L == S. For the bottom-right mask use flashcupy.torch.attention(q, k, v, causal=True)")
    q, k, v = query, key, value
    grouped = False
    if enable_gqa and query.dim() >= 3 and key.dim() >= 3 and value.dim() >= 3:
        hq, hk, hv = query.size(-3), key.size(-3), value.size(-3)
        if hk != hv:
            raise ValueError(
                f"{fn}(): with enable_gqa=True key and value must have the same number of "
                f"heads (dim -3), got key {hk} and value {hv}")
        if hq != hk:
            if hk == 0 or hq % hk != 0:
                raise ValueError(
                    f"{fn}(): with enable_gqa=True the query heads (dim -3, {hq}) must be a "
                    f"multiple of the key/value heads ({hk})")
            # query head h = j * G + g uses kv head j = h // G: split the query head axis
            # into (Hkv, G) (a view: splitting a dim never copies) and broadcast k/v over G
            q = query.unflatten(-3, (hk, hq // hk))
            k = key.unsqueeze(-3)
            v = value.unsqueeze(-3)
            grouped = True
    out, _ = _attention(q, k, v, bool(is_causal), scale)
    if grouped:
        out = out.flatten(-4, -3)  # (..., Hkv, G, L, Ev) -> (..., Hq, L, Ev): a view
    return out
