"""PyTorch interop: flashcupy attention on CUDA tensors, differentiable and compilable.

``import flashcupy`` never imports PyTorch; this module is loaded only by
``import flashcupy.torch``.  (Inside it, ``import torch`` is an absolute import
and binds the real PyTorch, not this module.)

Public functions
----------------
attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, ...)
attention_with_kvcache(q, k_cache, v_cache, cache_seqlens, ...)
    packed variable-length batches (differentiable) and KV caches (an operator
    that mutates the caches), in flashcupy/_torch_varlen.py.
merge_attention(outs, lses, *, return_lse=False)
    attention over the union of disjoint key sets from attention over each
    (flashcupy/_merge.py), in PyTorch operations: any device, differentiable
    in outs and lses.
attention(q, k, v, *, causal=False, scale=None, return_lse=False, window=None,
          softcap=None, alibi_slopes=None, sink=None, bias=None, mask=None,
          dropout_p=0.0)
    flashcupy's own convention: leading dims broadcast like ``torch.matmul``
    (MQA/GQA), causal masking and windows are bottom-right aligned; the
    variants (sliding window, softcap, ALiBi, attention sinks, an additive
    bias, a boolean mask, dropout) as in ``flashcupy.attention``.
scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0,
                             is_causal=False, *, scale=None, enable_gqa=False)
    a drop-in for ``torch.nn.functional.scaled_dot_product_attention``: boolean
    and additive ``attn_mask``, ``dropout_p``, top-left ``is_causal`` for any
    query and key lengths, ``enable_gqa``.

What is differentiable
----------------------
``q``, ``k``, ``v``; ``sink`` (its gradient float32, in the sink's shape);
``bias`` (and SDPA's floating ``attn_mask``): its gradient has the bias's own
shape and dtype, summed over the axes it broadcasts along, and is computed
only when the bias requires grad.  ``alibi_slopes`` and the boolean ``mask``
are not (their gradient is None).  The LSE output is not differentiable:
``attention(..., return_lse=True)`` returns it with ``requires_grad=False``.

Dropout
-------
``dropout_p > 0`` drops attention probabilities (the survivors scaled by
``1 / (1 - dropout_p)``), with the bits of ``flashcupy._philox`` keyed by a
``seed`` and an ``offset`` drawn from PyTorch's CUDA generator of the tensors'
device (``_draw_dropout_seed``): ``seed`` is the generator's seed, so
``torch.manual_seed`` / ``torch.cuda.manual_seed`` make runs reproducible;
``offset`` is its Philox offset (in PyTorch's steps of 4, modulo 2**32),
advanced by one step per call, so consecutive calls draw new patterns.  The
backward regenerates the forward's pattern from the seed and offset saved with
the graph (the operators' ``rng`` tensor).  Dropout applies whenever
``dropout_p > 0``, under ``no_grad`` and in eval mode too (as SDPA's, it is
the caller's choice).  The draw is a host
operation: it cannot be captured in a CUDA graph (an error says so), and
under ``torch.compile`` it is a graph break (with ``fullgraph=True``, an
error naming it), but not a recompilation: the draws reach the graph as a
tensor; eager calls need nothing special.

How a call reaches the kernels
------------------------------
1. Validation in Python (types, devices, dtypes, shapes, unsupported
   arguments), so a bad call raises before anything is allocated or launched.
   Under ``torch.compile`` these checks run once, at trace time.
2. ``torch.ops.flashcupy.attention_fwd`` / ``attention_bwd``: custom operators
   (``torch.library.custom_op``) with fake (meta) implementations, so autograd,
   ``torch.compile(fullgraph=True)`` and ``opcheck`` treat them like any ATen op.
   Their schemas::

       attention_fwd(Tensor q, Tensor k, Tensor v, bool causal, float? scale,
                     int? window_left=None, int? window_right=None,
                     float? softcap=None, Tensor? alibi=None, Tensor? sink=None,
                     Tensor? bias=None, Tensor? mask=None, float dropout_p=0.0,
                     Tensor? rng=None)
           -> (Tensor out, Tensor lse)
       attention_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out,
                     Tensor lse, bool causal, float? scale, bool deterministic,
                     <the same nine variant arguments>, bool bias_grad=False)
           -> (Tensor dq, Tensor dk, Tensor dv, Tensor dsink, Tensor dbias)

   ``dsink`` is float32 with the sink's shape, or an empty float32 tensor of
   shape (0,) when there is no sink; ``dbias`` has the bias's shape and dtype
   with ``bias_grad=True``, else it is an empty float32 tensor of shape (0,)
   (an operator returns tensors, never None).  A window side of None is
   unbounded (both None: no window); ``causal`` stays its own flag (it sets
   the right side to 0, as in ``flashcupy.attention``).  ``rng`` carries the
   dropout's seed and offset: a CPU int64 tensor of two elements, the 64-bit
   seed as a signed int64 (two's complement) and the counter word ``offset``
   in [0, 2**32); required when ``dropout_p > 0``, ignored when it is 0.  A
   tensor, as PyTorch passes its own Philox seed and offset, and not two ints:
   under ``torch.compile`` an int argument is a constant of the graph that
   dynamo guards on, so every new draw would recompile; a tensor's values are
   not guarded (the implementations read them with ``.tolist()``).
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
   variant's window, softcap, dropout probability and the ALiBi / sink / bias
   / mask tensors' metadata included; the dropout seed and offset are read
   from the environment at each replay).  A plan with a CuPy host step (the
   sink's gradient, gradient reductions over broadcast axes, a bias gradient
   cast to a 16-bit dtype) is not replayed on raw pointers, nor is a call
   whose bias or mask the core copies (a strided last axis): such calls go
   through CuPy views every time.
"""
from __future__ import annotations

import contextlib
import numbers
import warnings

import cupy
import numpy as np
import torch  # the real PyTorch (absolute import), not this module
import torch.autograd.forward_ad as _fwAD

from flashcupy import _config, _philox, _plan, api
# Hugging Face transformers: registers flashcupy as an attn_implementation
# (flashcupy/hf.py; it imports transformers only when called)
from flashcupy.hf import register_transformers

__all__ = ["attention", "scaled_dot_product_attention", "register_transformers",
           "attention_varlen", "attention_with_kvcache", "merge_attention"]

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


def _batch_shape(fn: str, q, k, v) -> tuple:
    """The broadcast batch dims of q, k, v (SymInt-safe); a mismatch raises
    flashcupy.api's ValueError (it names the three shapes)."""
    try:
        return tuple(torch.broadcast_shapes(q.shape[:-2], k.shape[:-2], v.shape[:-2]))
    except RuntimeError:
        try:
            api.broadcast_shapes(q.shape, k.shape, v.shape)
        except ValueError as e:
            raise ValueError(f"{fn}(): {e}") from None
        raise


def _check_pair_tensor(fn: str, name: str, x, q, target: tuple, kind: str) -> str:
    """bias / mask (SDPA: attn_mask): a tensor on q's device whose shape
    broadcasts to ``target`` (the batch dims, then (Sq, Sk)).  ``kind``: "bias"
    (a floating tensor of q's dtype or float32), "mask" (bool) or "attn_mask"
    (either).  Returns "bias" or "mask".  Pure Python on metadata."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(
            f"{fn}(): {name} must be a torch.Tensor (on the device of the inputs, broadcastable "
            f"to {target}) or None, got {type(x).__name__}")
    if x.layout != torch.strided:
        raise TypeError(f"{fn}(): {name} must be a dense (strided) tensor, got layout {x.layout}")
    qd = _dtype_name(q.dtype)
    if kind == "mask":
        if x.dtype != torch.bool:
            raise TypeError(
                f"{fn}(): mask has dtype {_dtype_name(x.dtype)} and shape {tuple(x.shape)}; "
                f"expected a bool tensor (True = the pair takes part, False = removed), "
                f"broadcastable to {target}; an additive mask goes in bias")
        got = "mask"
    elif x.dtype == torch.bool and kind == "attn_mask":
        got = "mask"
    else:
        if x.dtype not in (q.dtype, torch.float32):
            hint = ("; a boolean mask goes in mask" if x.dtype == torch.bool
                    and kind == "bias" else "")
            expected = ("bool (True = take part in attention) or a floating tensor of the "
                        "query's dtype" if kind == "attn_mask"
                        else "a floating tensor of q's dtype")
            raise TypeError(
                f"{fn}(): {name} has dtype {_dtype_name(x.dtype)} and shape {tuple(x.shape)}; "
                f"expected {expected} ({qd}) or float32, broadcastable to {target}{hint}")
        got = "bias"
    if x.device != q.device:
        raise ValueError(
            f"{fn}(): {name} is on {x.device} but the inputs are on {q.device}; pass {name} "
            f"on {q.device}")
    if not _broadcasts_to(x.shape, target):
        raise ValueError(
            f"{fn}(): {name} has shape {tuple(x.shape)} (dtype {_dtype_name(x.dtype)}), which "
            f"does not broadcast to {target} (the batch dims of the inputs, then (Sq, Sk) = "
            f"({target[-2]}, {target[-1]}); numpy rules: e.g. (Sq, Sk), (B, 1, 1, Sk) or the "
            f"full shape)")
    return got


def _check_variants(fn: str, q, k, v, alibi_slopes, sink, bias=None, mask=None) -> None:
    """The variant tensors against the (already checked) q, k, v: pure Python
    on metadata, so it runs at trace time under torch.compile."""
    if alibi_slopes is None and sink is None and bias is None and mask is None:
        return
    # (not _output_shapes: its memo dict would be written while torch.compile
    # traces, which fails dynamo's guards)
    batch = _batch_shape(fn, q, k, v)
    _check_head_tensor(fn, "alibi_slopes", alibi_slopes, batch, q.device)
    _check_head_tensor(fn, "sink", sink, batch, q.device)
    target = batch + (q.shape[-2], k.shape[-2])
    if bias is not None:
        _check_pair_tensor(fn, "bias", bias, q, target, "bias")
    if mask is not None:
        _check_pair_tensor(fn, "mask", mask, q, target, "mask")


def _autocast_bias(bias, q):
    """Under ``torch.autocast("cuda")`` a floating bias is cast with the inputs,
    as PyTorch does for SDPA's attn_mask, unless it is already q's dtype, float32
    (the kernels add the bias in float32: no cast needed) or float64 (which
    autocast leaves alone)."""
    if (bias is None or bias.dtype in (q.dtype, torch.float32, torch.float64)
            or not bias.is_floating_point()
            or not torch.is_autocast_enabled(bias.device.type)):
        return bias
    return bias.to(q.dtype)


def _check_dropout_p(fn: str, dropout_p) -> float:
    """A real number the core accepts (``flashcupy._philox.check_dropout``:
    [0, 1), at most its ``MAX_DROPOUT_P``), as a Python float (0.0 is off)."""
    if type(dropout_p) is float and dropout_p == 0.0:
        return 0.0  # the common call, without the checks below
    if isinstance(dropout_p, (bool, np.bool_)) or not isinstance(dropout_p, numbers.Real):
        raise TypeError(
            f"{fn}(): dropout_p must be a real number in [0, 1), got {type(dropout_p).__name__} "
            f"{dropout_p!r}")
    p = float(dropout_p)
    # the core's own rule (its range, e.g. the largest probability its 16-bit
    # keep decision represents), so that the two cannot drift apart
    try:
        _philox.check_dropout(p, 0, 0)
    except (TypeError, ValueError) as e:
        raise type(e)(f"{fn}(): {e}") from None
    return p


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

_PLANS = _plan.CACHE  # flashcupy's one plan cache (bounded: a full cache is cleared)

try:
    _raw_stream = torch._C._cuda_getCurrentRawStream  # device index -> cudaStream_t
except AttributeError:  # pragma: no cover - older PyTorch
    def _raw_stream(index):
        return torch.cuda.current_stream(index).cuda_stream


def _meta(t: torch.Tensor) -> tuple:
    return (t.shape, t.stride(), t.dtype, t.get_device())


def _plan_key(kind: str, tensors, causal: bool, scale, window_left=None, window_right=None,
              softcap=None, extras=(), dropout_p=0.0):
    """Everything the plan depends on, from tensor metadata: the kind, causal,
    scale, the variant (window sides, softcap, the dropout probability, the
    metadata of the ALiBi slopes, sink, bias and mask, ``extras``, None where
    absent) and the kernel family.  Not the dropout seed and offset: the plan
    reads them from the environment at each run.  Starts with "torch"
    (flashcupy.api's keys in the shared cache never do).  None if a scalar is
    of a type the API would judge (then there is no replay)."""
    if not (scale is None or type(scale) is float):
        return None
    if not (softcap is None or type(softcap) is float):
        return None
    if not all(w is None or type(w) is int for w in (window_left, window_right)):
        return None
    if type(dropout_p) is not float:
        return None
    sig = ["torch", kind, causal, scale, window_left, window_right, softcap, dropout_p,
           _config.current_family(), _config.gqa_mode(), _config.split_mode()]
    for t in tensors:
        sig.extend(_meta(t))
    extras = tuple(extras) + (None,) * (4 - len(extras))
    for t in extras:
        sig.append(None if t is None else _meta(t))
    return tuple(sig)


def _remember(key, plan) -> None:
    """Remembers a plan for raw-pointer replays; plans with a CuPy host step
    (``pointers_only`` False: dsink, gradient reductions) are not."""
    if key is None or plan is None or not plan.pointers_only:
        return
    _PLANS.put(key, plan)


try:
    _current_device = torch._C._cuda_getDevice  # (torch.cuda.current_device without its
except AttributeError:  # pragma: no cover      # lazy-init check: CUDA is up by a replay)
    _current_device = torch.cuda.current_device
_DEVICES: dict = {}  # index -> torch.device (one object per device, not one per call)


def _device(index: int) -> torch.device:
    d = _DEVICES.get(index)
    if d is None:
        d = _DEVICES[index] = torch.device("cuda", index)
    return d


# Allocations in the replayed paths derive from a tensor (``new_empty``,
# ``empty_like``) rather than calling ``torch.empty(shape, dtype=, device=)``:
# PyTorch's argument parsing of the keywords made it 3.9-4.7 us per tensor
# against 1.5-2.7, a few tensors per call (NOTES.md 14.8).
_U8: dict = {}  # device index -> a (1,) uint8 tensor: the workspace blocks' template
_CONTIGUOUS = torch.contiguous_format


def _u8(index: int) -> torch.Tensor:
    t = _U8.get(index)
    if t is None:
        t = _U8[index] = torch.empty((1,), dtype=torch.uint8, device=_device(index))
    return t


def _replay(key, device_index: int, env: dict, dropout=None) -> bool:
    """Runs the remembered plan of ``key`` on the tensors of ``env`` on PyTorch's
    current stream; False (nothing launched) when there is none to replay.
    ``dropout``: this call's dropout keywords of flashcupy.api (``_dropout_kwargs``).
    The plan sees addresses only (Plan.run_pointers): the tensors' and one
    workspace block's from PyTorch's allocator, held until the launches are
    queued (the allocator then reuses the block in stream order)."""
    plan = _PLANS.get(key)
    if plan is None or _current_device() != device_index:
        return False
    ptrs = {n: t.data_ptr() for n, t in env.items()}
    if dropout is not None and dropout["dropout_p"]:
        # the seed and offset are not part of the plan: it reads them per call
        # (flashcupy.api.dropout_env's words, as values)
        ptrs["dropout_seed"], ptrs["dropout_offset"] = dropout["seed"], dropout["offset"]
        ptrs["dropout_index"] = 0
    held = []

    def alloc_bytes(n):
        t = _u8(device_index).new_empty((n,))
        held.append(t)
        return t.data_ptr()

    plan.run_pointers(ptrs, _raw_stream(device_index), alloc_bytes, lambda n: env[n].nbytes)
    return True


# ----------------------------------------------------------------------------
# custom operators
# ----------------------------------------------------------------------------
# The variant travels as ten trailing arguments with defaults (so a call
# without them, like the plain SDPA drop-in's, is unchanged): window_left,
# window_right (None: unbounded), softcap (None: off), alibi and sink (float32
# tensors broadcastable to the batch dims, or None), bias and mask (tensors
# broadcastable to batch + (Sq, Sk), or None), dropout_p (0: off) and rng,
# the dropout's seed (signed int64) and offset in one CPU int64 tensor.

_VARIANT_SCHEMA = ("int? window_left=None, int? window_right=None, float? softcap=None, "
                   "Tensor? alibi=None, Tensor? sink=None, Tensor? bias=None, Tensor? mask=None, "
                   "float dropout_p=0.0, Tensor? rng=None")
_N_FWD_INPUTS = 14  # q, k, v, causal, scale, and the nine variant arguments
# the defaults of the forward's arguments 5.. (the variant)
_FWD_DEFAULTS = (None, None, None, None, None, None, None, 0.0, None)
_BIAS_INPUT = 10  # the position of ``bias`` among the forward's inputs

_U64 = 2**64 - 1


def _seed_u64(seed: int) -> int:
    """The operators' signed int64 seed as the unsigned 64-bit seed of flashcupy.api."""
    return int(seed) & _U64


def _seed_i64(seed: int) -> int:
    """An unsigned 64-bit seed as the operators' signed int64 (two's complement)."""
    return seed - 2**64 if seed >= 2**63 else seed


def _window_arg(window_left, window_right):
    """The ``window`` argument of flashcupy.api: None when both sides are unbounded."""
    if window_left is None and window_right is None:
        return None
    return (window_left, window_right)


def _as_cupy_opt(t):
    return None if t is None else _as_cupy(t)


def _rng_tensor(seed: int, offset: int) -> torch.Tensor:
    """The operators' ``rng`` argument: [seed as a signed int64, offset], a CPU
    int64 tensor (``seed`` in [0, 2**64), ``offset`` in [0, 2**32))."""
    return torch.tensor((_seed_i64(seed), offset), dtype=torch.int64)


def _dropout_kwargs(dropout_p, rng) -> dict:
    """flashcupy.api's dropout keywords from the operators' ``dropout_p`` and
    ``rng`` (the seed unsigned; none needed at p = 0)."""
    if dropout_p == 0.0:
        return dict(dropout_p=0.0, seed=None, offset=0)
    if rng is None or rng.dtype != torch.int64 or tuple(rng.shape) != (2,):
        got = None if rng is None else f"a {rng.dtype} tensor of shape {tuple(rng.shape)}"
        raise ValueError(f"flashcupy attention operator: dropout_p > 0 needs rng, an int64 "
                         f"tensor of 2 elements (seed as a signed int64, offset), got {got}")
    seed, offset = rng.tolist()
    return dict(dropout_p=dropout_p, seed=_seed_u64(seed), offset=offset)


def _pairs_env(env: dict, bias, mask) -> None:
    if bias is not None:
        env["bias"] = bias
    if mask is not None:
        env["mask"] = mask


def _fwd_impl(q, k, v, causal, scale, window_left=None, window_right=None, softcap=None,
              alibi=None, sink=None, bias=None, mask=None, dropout_p=0.0, rng=None, *,
              key=False, ctx=None):
    """The forward on PyTorch tensors.  ``key``: the plan key when the caller
    has it (flashcupy.torch.attention's fast entry), else computed here;
    ``ctx``: the eager autograd context, which keeps it as ``fwd_key`` (the
    backward's key builds on it, _bwd_impl)."""
    # shapes validated (ValueError) before anything is allocated
    out_shape, lse_shape = _output_shapes(q.shape, k.shape, v.shape)
    # outputs from PyTorch's caching allocator: the kernels write into them in place
    out = (torch.empty_like(q, memory_format=_CONTIGUOUS) if q.shape == out_shape
           else q.new_empty(out_shape))
    lse = q.new_empty(lse_shape, dtype=_lse_dtype(q.dtype))
    if key is False:
        key = _plan_key("fwd", (q, k, v), causal, scale, window_left, window_right, softcap,
                        (alibi, sink, bias, mask), dropout_p)
    if ctx is not None:
        ctx.fwd_key = key
    env = {"q": q, "k": k, "v": v, "o": out, "lse": lse}
    if alibi is not None:
        env["alibi"] = alibi
    if sink is not None:
        env["sink"] = sink
    _pairs_env(env, bias, mask)
    drop = _dropout_kwargs(dropout_p, rng)
    if _replay(key, q.get_device(), env, drop):
        return out, lse
    window = _window_arg(window_left, window_right)
    with _cupy_on_torch(q.device):
        cq, ck, cv = _as_cupy(q), _as_cupy(k), _as_cupy(v)
        ca, cs, cb, cm = (_as_cupy_opt(t) for t in (alibi, sink, bias, mask))
        api._forward(cq, ck, cv, causal=causal, scale=scale, window=window, softcap=softcap,
                     alibi_slopes=ca, sink=cs, bias=cb, mask=cm, **drop, out=_as_cupy(out),
                     lse=_as_cupy(lse))
        _remember(key, api.cached_plan("fwd", (cq, ck, cv), causal, scale, window, softcap,
                                       (ca, cs, cb, cm), dropout_p=drop["dropout_p"]))
    return out, lse


@torch.library.custom_op(
    "flashcupy::attention_fwd", mutates_args=(), device_types="cuda",
    schema=f"(Tensor q, Tensor k, Tensor v, bool causal, float? scale, {_VARIANT_SCHEMA}) "
           f"-> (Tensor, Tensor)")
def _attention_fwd(q, k, v, causal, scale, window_left=None, window_right=None, softcap=None,
                   alibi=None, sink=None, bias=None, mask=None, dropout_p=0.0, rng=None):
    return _fwd_impl(q, k, v, causal, scale, window_left, window_right, softcap, alibi, sink,
                     bias, mask, dropout_p, rng)


@_attention_fwd.register_fake
def _attention_fwd_fake(q, k, v, causal, scale, window_left=None, window_right=None,
                        softcap=None, alibi=None, sink=None, bias=None, mask=None,
                        dropout_p=0.0, rng=None):
    out_shape, lse_shape = _output_shapes(q.shape, k.shape, v.shape)
    return (q.new_empty(out_shape),
            q.new_empty(lse_shape, dtype=_lse_dtype(q.dtype)))


_EMPTY: dict = {}  # device -> a (0,) float32 tensor (_bwd_impl's shared placeholder)


def _dsink_buffer(q, sink, fake=False):
    """dsink: float32 of the sink's shape (C-contiguous), or an empty (0,) tensor
    when there is no sink (an operator returns tensors, never None)."""
    shape = (0,) if sink is None else sink.shape
    if fake:
        return q.new_empty(shape, dtype=torch.float32)
    return torch.empty(shape, dtype=torch.float32, device=q.device)


def _dbias_buffer(q, bias, bias_grad, fake=False):
    """dbias: the bias's shape and dtype (C-contiguous) with ``bias_grad``, else an
    empty float32 (0,) tensor, as dsink."""
    shape, dtype = (bias.shape, bias.dtype) if bias_grad else ((0,), torch.float32)
    if fake:
        return q.new_empty(shape, dtype=dtype)
    return torch.empty(shape, dtype=dtype, device=q.device)


def _bwd_impl(dout, q, k, v, out, lse, causal, scale, deterministic, window_left=None,
              window_right=None, softcap=None, alibi=None, sink=None, bias=None, mask=None,
              dropout_p=0.0, rng=None, bias_grad=False, shared_empty=True, fwd_key=None):
    """The backward on PyTorch tensors.  ``fwd_key``: the eager forward's plan
    key (its ``out`` and ``lse`` are the ones this forward allocated, so they
    follow from it): the backward's key is then that key, the gradient kind,
    dout's metadata and the forcing switches, not six tensors' metadata
    again."""
    bias_grad = bool(bias_grad) and bias is not None
    # gradients have their inputs' shapes (summed over broadcast axes), C-contiguous
    dev = q.device  # (one device object: k and v are on it)
    dq = torch.empty_like(q, memory_format=_CONTIGUOUS)
    dk = torch.empty_like(k, memory_format=_CONTIGUOUS)
    dv = torch.empty_like(v, memory_format=_CONTIGUOUS)
    # (shared_empty: the eager path discards the (0,) placeholders of an absent
    # dsink / dbias, so one cached tensor serves them; the custom operator's
    # outputs must be distinct tensors, it passes False)
    empty = _EMPTY.get(dev) if shared_empty else None
    if shared_empty and empty is None:
        empty = _EMPTY[dev] = torch.empty((0,), dtype=torch.float32, device=dev)
    dsink = empty if empty is not None and sink is None else _dsink_buffer(q, sink)
    dbias = empty if empty is not None and not bias_grad else _dbias_buffer(q, bias, bias_grad)
    kind = ("bwd-det" if deterministic else "bwd") + ("-dbias" if bias_grad else "")
    inputs = (dout, q, k, v, out, lse)
    if fwd_key is not None:
        # The saved tensors are the forward's in shape but not always in layout or
        # place: a saved-tensor hook (torch.autograd.graph.save_on_cpu, activation
        # offloading) may hand back a contiguous copy of a strided view.  The
        # plan's strides are baked into its launches, so they join the key.
        key = ("torch", kind, fwd_key, dout.shape, dout.stride(), dout.dtype, dout.get_device(),
               _config.current_family(), _config.gqa_mode(), _config.split_mode(),
               q.stride(), k.stride(), v.stride(), out.stride(), lse.stride(),
               q.dtype, k.dtype, v.dtype, out.dtype, q.get_device(), k.get_device(),
               v.get_device(), out.get_device(), lse.get_device())
    else:
        key = _plan_key(kind, inputs, causal, scale, window_left, window_right, softcap,
                        (alibi, sink, bias, mask), dropout_p)
    env = {"dout": dout, "q": q, "k": k, "v": v, "o": out, "lse": lse,
           "dq_out": dq, "dk_out": dk, "dv_out": dv}
    if alibi is not None:
        env["alibi"] = alibi
    if sink is not None:
        env.update(sink=sink, dsink_out=dsink)
    _pairs_env(env, bias, mask)
    if bias_grad:
        env["dbias_out"] = dbias
    drop = _dropout_kwargs(dropout_p, rng)
    # (with a sink the plan has a host step, dsink, and is never remembered:
    # such calls always take the CuPy route below)
    if _replay(key, q.get_device(), env, drop):
        return dq, dk, dv, dsink, dbias
    window = _window_arg(window_left, window_right)
    with _cupy_on_torch(q.device):
        cin = tuple(_as_cupy(t) for t in inputs)
        ca, cs, cb, cm = (_as_cupy_opt(t) for t in (alibi, sink, bias, mask))
        api._backward(*cin, causal=causal, scale=scale, deterministic=deterministic,
                      window=window, softcap=softcap, alibi_slopes=ca, sink=cs, bias=cb,
                      mask=cm, bias_grad=bias_grad, **drop,
                      dq=_as_cupy(dq), dk=_as_cupy(dk), dv=_as_cupy(dv),
                      dsink=None if sink is None else _as_cupy(dsink),
                      dbias=_as_cupy(dbias) if bias_grad else None)
        _remember(key, api.cached_plan(kind, cin, causal, scale, window, softcap,
                                       (ca, cs, cb, cm), dropout_p=drop["dropout_p"]))
    return dq, dk, dv, dsink, dbias


@torch.library.custom_op(
    "flashcupy::attention_bwd", mutates_args=(), device_types="cuda",
    schema=f"(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, bool causal, "
           f"float? scale, bool deterministic, {_VARIANT_SCHEMA}, bool bias_grad=False) "
           f"-> (Tensor, Tensor, Tensor, Tensor, Tensor)")
def _attention_bwd(dout, q, k, v, out, lse, causal, scale, deterministic, window_left=None,
                   window_right=None, softcap=None, alibi=None, sink=None, bias=None, mask=None,
                   dropout_p=0.0, rng=None, bias_grad=False):
    return _bwd_impl(dout, q, k, v, out, lse, causal, scale, deterministic, window_left,
                     window_right, softcap, alibi, sink, bias, mask, dropout_p, rng, bias_grad,
                     shared_empty=False)


@_attention_bwd.register_fake
def _attention_bwd_fake(dout, q, k, v, out, lse, causal, scale, deterministic, window_left=None,
                        window_right=None, softcap=None, alibi=None, sink=None, bias=None,
                        mask=None, dropout_p=0.0, rng=None, bias_grad=False):
    return (q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape),
            _dsink_buffer(q, sink, fake=True),
            _dbias_buffer(q, bias, bool(bias_grad) and bias is not None, fake=True))


def _setup_context(ctx, inputs, output):
    # the dispatcher drops trailing arguments equal to their defaults: pad them back
    inputs = tuple(inputs)
    inputs = inputs + _FWD_DEFAULTS[len(inputs) - 5:]
    (q, k, v, causal, scale, window_left, window_right, softcap, alibi, sink, bias, mask,
     dropout_p, rng) = inputs
    out, lse = output
    ctx.mark_non_differentiable(lse)
    # rng (None without dropout) is saved with the tensors: the backward
    # regenerates the forward's dropout pattern from its seed and offset
    ctx.save_for_backward(q, k, v, out, lse, alibi, sink, bias, mask, rng)
    ctx.causal = causal
    ctx.scale = scale
    ctx.variant = (window_left, window_right, softcap)
    ctx.dropout_p = dropout_p


def _grads(ctx, dq, dk, dv, dsink, dbias, sink, bias):
    """One gradient per forward input: q, k, v, then None for the flags and
    scalars and for the ALiBi slopes (not differentiable), dsink for the sink,
    dbias for the bias, None for the mask and the dropout's p and rng."""
    need = tuple(ctx.needs_input_grad) + (False,) * _N_FWD_INPUTS
    return (dq if need[0] else None, dk if need[1] else None, dv if need[2] else None,
            None, None, None, None, None, None,
            dsink if sink is not None and need[9] else None,
            dbias if bias is not None and need[_BIAS_INPUT] else None,
            None, None, None)


def _deterministic_dbias(q, k, v, bias, dropout_p) -> bool:
    """Whether the backward with a bias gradient may run deterministic kernels.

    The core has a deterministic gradient for every bias shape (a broadcast
    bias's by one call per broadcast position, flashcupy/api.py
    _backward_broadcast_dbias) except a broadcast bias together with dropout.
    That case follows PyTorch's rule for an operator without one under
    ``torch.use_deterministic_algorithms(True)``: an error, or with
    ``warn_only=True`` a warning and the nondeterministic kernels (False).
    A bias of the full shape (a stride-0 ``expand`` view too) always works."""
    batch = tuple(torch.broadcast_shapes(q.shape[:-2], k.shape[:-2], v.shape[:-2]))
    full = batch + (q.shape[-2], k.shape[-2])
    if tuple(bias.shape) == full or not dropout_p:
        return True
    msg = (f"flashcupy.torch attention backward with dropout and the gradient of a broadcast "
           f"bias (bias shape {tuple(bias.shape)}, broadcast to {full}) does not have a "
           f"deterministic implementation, but you set 'torch.use_deterministic_algorithms(True)'. "
           f"You can turn off determinism just for this operation, or you can use the "
           f"'warn_only=True' option, if that's acceptable for your application. A bias of the "
           f"full shape has a deterministic gradient: pass bias.expand({', '.join(map(str, full))}) "
           f"(a view, no copy; PyTorch then sums its gradient over the broadcast axes)")
    if torch.is_deterministic_algorithms_warn_only_enabled():
        warnings.warn(msg, UserWarning, stacklevel=2)
        return False
    raise RuntimeError(msg)


def _run_backward(ctx, dout, bwd, **extra):
    q, k, v, out, lse, alibi, sink, bias, mask, rng = ctx.saved_tensors
    if dout.stride(-1) != 1:
        # e.g. the fully expanded (all strides 0) gradient of out.sum(); the core
        # wants a unit-stride last axis, so make that one copy here, in PyTorch
        dout = dout.contiguous()
    need = tuple(ctx.needs_input_grad) + (False,) * _N_FWD_INPUTS
    # dbias only when the bias requires grad: it costs atomics (or stores) per score
    bias_grad = bias is not None and bool(need[_BIAS_INPUT])
    deterministic = torch.are_deterministic_algorithms_enabled()
    if deterministic and bias_grad:
        deterministic = _deterministic_dbias(q, k, v, bias, ctx.dropout_p)
    dq, dk, dv, dsink, dbias = bwd(dout, q, k, v, out, lse, ctx.causal, ctx.scale,
                                   deterministic, *ctx.variant, alibi, sink, bias, mask,
                                   ctx.dropout_p, rng, bias_grad, **extra)
    return _grads(ctx, dq, dk, dv, dsink, dbias, sink, bias)


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
    def forward(ctx, q, k, v, causal, scale, window_left, window_right, softcap, alibi, sink,
                bias, mask, dropout_p, rng):
        args = (q, k, v, causal, scale, window_left, window_right, softcap, alibi, sink, bias,
                mask, dropout_p, rng)
        out, lse = _fwd_impl(*args, ctx=ctx)
        _setup_context(ctx, args, (out, lse))
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        if torch.is_grad_enabled():
            # create_graph: the gradients are not differentiable, and
            # once_differentiable makes a second backward through them raise
            return _EagerAttention._backward_once(ctx, dout, dlse)
        # (otherwise the same call without its wrapper: a few us per call)
        # (no fwd_key when a test routes the forward elsewhere)
        return _run_backward(ctx, dout, _bwd_impl, fwd_key=getattr(ctx, "fwd_key", None))

    @staticmethod
    @torch.autograd.function.once_differentiable
    def _backward_once(ctx, dout, dlse):
        return _run_backward(ctx, dout, _bwd_impl, fwd_key=getattr(ctx, "fwd_key", None))


class _PlainAttention(torch.autograd.Function):
    """The fast entry's node (a remembered plain signature, ``_fast_attention``):
    _EagerAttention's rule without the variant, so its apply takes six
    arguments rather than fifteen, it saves five tensors rather than ten, and
    forward and backward go straight to the replays.  Nothing materializes a
    zero gradient for the LSE (it is not differentiable): each such fill was a
    kernel launch and an allocation per step (NOTES.md 14.8)."""

    @staticmethod
    def forward(ctx, q, k, v, causal, scale, entry):
        ctx.set_materialize_grads(False)
        res = _plain_forward(q, k, v, entry)
        key = entry[2]
        out, lse = res if res is not None else _fwd_impl(q, k, v, causal, scale, key=key)
        ctx.mark_non_differentiable(lse)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.causal, ctx.scale, ctx.fwd_key = causal, scale, key
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        if dout is None:  # (out took no part in the loss)
            return None, None, None, None, None, None
        if torch.is_grad_enabled():  # create_graph: as _EagerAttention.backward
            return _PlainAttention._backward_once(ctx, dout, dlse)
        return _plain_backward(ctx, dout)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def _backward_once(ctx, dout, dlse):
        return _plain_backward(ctx, dout)


# torch.autograd.Function.apply without its Python wrapper (which binds default
# arguments for setup_context-style Functions, unwraps dead functorch wrappers
# and dispatches to functorch: ~7 us a call, NOTES.md 14.8).  _plain_apply does
# the part that applies here and keeps the wrapper under functorch transforms.
_C_PLAIN_APPLY = super(torch.autograd.Function, _PlainAttention).apply
try:
    _transforms_active = torch._C._are_functorch_transforms_active
    _unwrap_if_dead = torch._C._functorch.unwrap_if_dead
except AttributeError:  # pragma: no cover - older PyTorch
    _transforms_active, _unwrap_if_dead = (lambda: True), None


def _plain_apply(q, k, v, causal, scale, entry):
    if _transforms_active():
        return _PlainAttention.apply(q, k, v, causal, scale, entry)
    return _C_PLAIN_APPLY(_unwrap_if_dead(q), _unwrap_if_dead(k), _unwrap_if_dead(v),
                          causal, scale, entry)


def _plain_forward(q, k, v, entry, need_lse=True):
    """A remembered plain forward's replay (``entry``: _FAST's (out shape, LSE
    shape, plan key)); None (nothing launched) when its plan is gone.  Without
    ``need_lse`` the LSE is the shared scratch (_lse_scratch)."""
    out_shape, lse_shape, key = entry
    out = (torch.empty_like(q, memory_format=_CONTIGUOUS) if q.shape == out_shape
           else q.new_empty(out_shape))
    lse = (q.new_empty(lse_shape, dtype=_lse_dtype(q.dtype)) if need_lse
           else _lse_scratch(lse_shape, q.dtype, q.device))
    if _replay(key, q.get_device(), {"q": q, "k": k, "v": v, "o": out, "lse": lse}):
        return out, lse
    return None


def _plain_backward(ctx, dout):
    q, k, v, out, lse = ctx.saved_tensors
    if dout.stride(-1) != 1:
        dout = dout.contiguous()  # (as _run_backward)
    dq, dk, dv, _, _ = _bwd_impl(dout, q, k, v, out, lse, ctx.causal, ctx.scale,
                                 torch.are_deterministic_algorithms_enabled(),
                                 fwd_key=ctx.fwd_key)
    need = ctx.needs_input_grad
    return (dq if need[0] else None, dk if need[1] else None, dv if need[2] else None,
            None, None, None)


_is_compiling = getattr(torch.compiler, "is_compiling", lambda: False)


def _forward_ad() -> bool:
    """Whether a forward-mode AD level is open: dual tensors do not show in
    requires_grad, and the autograd Function must see them (it refuses them:
    it has no jvp) rather than a bypass dropping their tangents."""
    return getattr(_fwAD, "_current_level", -1) >= 0


def _attention(q, k, v, causal: bool, scale, window_left=None, window_right=None, softcap=None,
               alibi=None, sink=None, bias=None, mask=None, dropout_p=0.0, rng=None):
    args = (q, k, v, causal, scale, window_left, window_right, softcap, alibi, sink, bias, mask,
            dropout_p, rng)
    if _is_compiling():
        return torch.ops.flashcupy.attention_fwd(*args)
    if not _forward_ad() and (not torch.is_grad_enabled() or not (
            q.requires_grad or k.requires_grad or v.requires_grad
            or (sink is not None and sink.requires_grad)
            or (bias is not None and bias.requires_grad))):
        # nothing to differentiate: no autograd node (its apply cost ~20 us of
        # host time a call, more than a small call's kernels; profile_host.py)
        return _fwd_impl(*args)
    return _EagerAttention.apply(*args)


# ----------------------------------------------------------------------------
# dropout's seed and offset, from PyTorch's CUDA generator
# ----------------------------------------------------------------------------

def _draw_dropout_seed(device: torch.device) -> tuple:
    """(seed, offset) for one dropout call on ``device``, from PyTorch's default
    CUDA generator of that device, which it advances: ``seed`` in [0, 2**64) is
    the generator's seed (``torch.manual_seed`` sets it and resets the offset),
    ``offset`` in [0, 2**32) its Philox offset in PyTorch's steps of 4 (mod
    2**32).  One call takes one step, as PyTorch's own ops take whole steps,
    so consecutive calls, and the random ops between them, draw apart."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    if not torch.cuda.default_generators:
        torch.cuda.init()  # the generators exist once CUDA is initialized
    gen = torch.cuda.default_generators[index]
    if torch.cuda.is_current_stream_capturing():
        # (PyTorch's generator refuses get_offset / set_offset while capturing)
        raise RuntimeError(
            "dropout_p > 0 cannot be captured in a CUDA graph: flashcupy draws the dropout "
            "seed and offset from PyTorch's CUDA generator on the host, and a replay of the "
            "graph would repeat one pattern; capture with dropout_p=0.0 or run dropout eagerly")
    seed = int(gen.initial_seed())
    step = int(gen.get_offset()) // 4
    gen.set_offset((step + 1) * 4)  # set_offset takes multiples of 4 only
    return seed, step % 2**32


def _dropout_args_eager(device: torch.device) -> torch.Tensor:
    """One draw as the operators' ``rng`` tensor."""
    return _rng_tensor(*_draw_dropout_seed(device))


try:
    # under torch.compile the draw (a host call on the generator) is a graph
    # break, and under fullgraph=True an error that says why; it returns a
    # tensor, a graph input whose values dynamo does not guard on (ints would
    # be constants of the graph: one recompilation per draw)
    _dropout_args = torch.compiler.disable(
        _dropout_args_eager,
        reason="flashcupy draws the dropout seed and offset from PyTorch's CUDA generator on "
               "the host (dropout_p > 0); pass dropout_p=0.0 for one graph")
except TypeError:  # pragma: no cover - a PyTorch without disable(reason=...)
    _dropout_args = torch.compiler.disable(_dropout_args_eager)


# ----------------------------------------------------------------------------
# public API
# ----------------------------------------------------------------------------

def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
              scale: float | None = None, return_lse: bool = False,
              window: tuple | None = None, softcap: float | None = None,
              alibi_slopes: torch.Tensor | None = None, sink: torch.Tensor | None = None,
              bias: torch.Tensor | None = None, mask: torch.Tensor | None = None,
              dropout_p: float = 0.0):
    """FlashAttention on CUDA tensors, differentiable w.r.t. q, k, v (and ``sink``, ``bias``).

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
        Each side is an int or None (unbounded); a negative side moves the
        bound past the diagonal (``(None, Sq - Sk)`` is PyTorch's top-left
        causal mask).  ``causal=True`` sets ``right = 0``.
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
    bias : torch.Tensor, optional
        q's dtype or float32, on the inputs' device, broadcastable to
        ``batch + (Sq, Sk)`` (numpy rules: ``(Sq, Sk)``, ``(B, 1, 1, Sk)``,
        ``(1, H, Sq, Sk)``, ...; stride-0 ``expand`` views are read in place):
        added to the scaled score after softcap and ALiBi.  ``-inf`` removes a
        pair.  Differentiable: its gradient has the bias's own shape and dtype
        (summed over its broadcast axes), computed only when the bias requires
        grad.  The gradient of a broadcast bias is summed with atomics; under
        ``torch.use_deterministic_algorithms(True)`` it is summed in a fixed
        order instead (one backward per broadcast batch position, slower), and
        only a broadcast bias together with dropout raises.
    mask : torch.Tensor of bool, optional
        Same broadcasting; False removes the pair (like a ``-inf`` bias).  A
        row with every pair removed gets ``out = 0``, ``lse = -inf`` and zero
        gradients.  Not differentiable.
    dropout_p : float in [0, 1), at most ``flashcupy._philox.MAX_DROPOUT_P``
        Dropout on the attention probabilities (survivors scaled by
        ``1 / (1 - dropout_p)``; ``lse`` is the dropout-free one), with the
        seed and offset of PyTorch's CUDA generator of the device (see the
        module docstring): reproducible under ``torch.manual_seed``.  Applied
        whenever ``dropout_p > 0``, in ``no_grad`` and eval mode too.

    Returns
    -------
    out : torch.Tensor, shape (*batch, Sq, Dv), the input dtype, C-contiguous
    lse : torch.Tensor, shape (*batch, Sq), float32 (float64 for float64 input)
        Only with ``return_lse=True``; not differentiable.

    Any subset of ``q``, ``k``, ``v`` (and ``sink``, ``bias``) may require grad.
    The kernels run on ``torch.cuda.current_stream()`` of the tensors' device.
    Under ``torch.autocast("cuda")`` inputs are cast to the autocast dtype, as
    for PyTorch's SDPA (a float32 bias is kept: the kernels add it in float32).
    """
    plain = (window is None and softcap is None and alibi_slopes is None and sink is None
             and bias is None and mask is None and type(dropout_p) is float
             and dropout_p == 0.0)
    if plain:
        hit = _fast_attention(q, k, v, causal, scale, return_lse)
        if hit is not None:
            return hit if return_lse else hit[0]
    fn = "attention"
    window_left, window_right = _check_window(fn, window)
    softcap = _check_softcap(fn, softcap)
    dropout_p = _check_dropout_p(fn, dropout_p)
    _check_tensors(fn, q=q, k=k, v=v)
    q, k, v = _autocast(q, k, v)  # the variant tensors stay float32
    _check_dtypes(fn, q=q, k=k, v=v)
    scale = _check_scale(fn, scale)
    if bias is not None and isinstance(bias, torch.Tensor):
        bias = _autocast_bias(bias, q)
    _check_variants(fn, q, k, v, alibi_slopes, sink, bias, mask)
    rng = _dropout_args(q.device) if dropout_p > 0.0 else None
    out, lse = _attention(q, k, v, bool(causal), scale, window_left, window_right, softcap,
                          alibi_slopes, sink, bias, mask, dropout_p, rng)
    if plain:
        _fast_remember(q, k, v, causal, scale, out, lse)
    return (out, lse) if return_lse else out


# A repeated plain call (no variant, no dropout) of a signature that passed every
# check before skips them: its tensors' metadata, the flags and the forcing
# switches key the entry, which holds the output shapes and the plan's key.
# (bench_overhead.py's tiny forward spent 54 us of host time a call, against
# SDPA's 25-31; profile_host.py: the checks, the plan key and the autograd node
# were 25 us of it.)
_FAST: dict = {}


def _fast_key(q, k, v, causal, scale):
    if not (type(q) is torch.Tensor and type(k) is torch.Tensor and type(v) is torch.Tensor):
        return None  # (subclasses and fakes take the checked route)
    if not (q.layout is torch.strided and k.layout is torch.strided and v.layout is torch.strided
            and not (q.is_nested or k.is_nested or v.is_nested)):
        return None  # (the checks name what is wrong with these)
    return (causal, scale, _config.current_family(), _config.gqa_mode(), _config.split_mode(),
            q.shape, q.stride(), q.dtype, q.device, k.shape, k.stride(), k.dtype, k.device,
            v.shape, v.stride(), v.dtype, v.device)


def _autocast_is_noop(q, k, v) -> bool:
    """Whether ``_autocast`` leaves these tensors as they are (no autocast, or
    they have its dtype or are float64): then a remembered signature holds
    under autocast too (a training step under bf16 autocast feeds bf16
    projections)."""
    if not torch.is_autocast_enabled("cuda"):
        return True
    dt = torch.get_autocast_dtype("cuda")
    return all(t.dtype is dt or t.dtype is torch.float64 or not t.is_floating_point()
               for t in (q, k, v))


def _fast_attention(q, k, v, causal, scale, need_lse=True, sdpa=False):
    """(out, lse) of a call whose signature is remembered, or None (nothing
    launched).  Without ``need_lse`` (and no autograd node) the lse is a
    shared scratch buffer, not the caller's to keep (_lse_scratch).
    ``sdpa``: the SDPA drop-in's call, whose ``is_causal`` is attention's
    ``causal`` only when Sq == Sk (else it takes the checked route)."""
    if (_is_compiling() or _forward_ad()
            or not (type(causal) is bool and (scale is None or type(scale) is float))):
        return None
    key = _fast_key(q, k, v, causal, scale)
    entry = _FAST.get(key) if key is not None else None
    if entry is None or not _autocast_is_noop(q, k, v):
        return None
    if sdpa and causal and q.shape[-2] != k.shape[-2]:
        return None
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return _plain_apply(q, k, v, causal, scale, entry)
    return _plain_forward(q, k, v, entry, need_lse)


# The LSE of a call that returns none and records no autograd node is written
# and never read: such calls share one buffer per (shape, dtype, device) instead
# of allocating one each (an allocator call is ~3 us of a tiny call's host time;
# NOTES.md 14.8).  Kernels of several streams, or of a captured CUDA graph, may
# write it at once: nothing reads it.  Its memory is never freed, so the cache
# holds at most _LSE_SCRATCH_MAX_BYTES in all (calls beyond that allocate as
# before), and a buffer first needed inside a CUDA-graph capture is not kept
# (it would live in that graph's private pool).
_LSE_SCRATCH: dict = {}
_LSE_SCRATCH_MAX_BYTES = 64 << 20
_lse_scratch_bytes = 0


def _lse_scratch(shape, dtype, device):
    global _lse_scratch_bytes
    key = (shape, dtype, device)
    t = _LSE_SCRATCH.get(key)
    if t is None:
        t = torch.empty(shape, dtype=_lse_dtype(dtype), device=device)
        if (_lse_scratch_bytes + t.nbytes <= _LSE_SCRATCH_MAX_BYTES
                and not torch.cuda.is_current_stream_capturing()):
            _LSE_SCRATCH[key] = t
            _lse_scratch_bytes += t.nbytes
    return t


def _fast_remember(q, k, v, causal, scale, out, lse) -> None:
    if _is_compiling() or not (type(causal) is bool and (scale is None or type(scale) is float)):
        return
    key = _fast_key(q, k, v, causal, scale)
    if key is None:
        return
    plan_key = _plan_key("fwd", (q, k, v), causal, scale, None, None, None, (None,) * 4, 0.0)
    if _PLANS.get(plan_key) is None:
        return  # (no replayable plan: e.g. an input copied for its layout)
    if len(_FAST) >= 4096:
        _FAST.clear()
    _FAST[key] = (tuple(out.shape), tuple(lse.shape), plan_key)


def _split_heads(x, n_kv: int, group: int):
    """A pair tensor (mask / bias) in SDPA's head layout ``(..., Hq, L, S)`` as
    the grouped query ``(..., Hkv, G, L, S)``: a head axis of size Hq is split
    (a view), one of size 1 gets an extra size-1 axis; fewer than 3 dims have
    no head axis and broadcast as they are."""
    if x.dim() < 3:
        return x
    if x.size(-3) == 1:
        return x.unsqueeze(-3)
    return x.unflatten(-3, (n_kv, group))


def scaled_dot_product_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                                 attn_mask: torch.Tensor | None = None, dropout_p: float = 0.0,
                                 is_causal: bool = False, *, scale: float | None = None,
                                 enable_gqa: bool = False) -> torch.Tensor:
    """Drop-in for ``torch.nn.functional.scaled_dot_product_attention``.

    Same signature and results as PyTorch's:

    * ``attn_mask``: bool (True = takes part in attention) or floating
      (added to the scaled scores; query's dtype or float32, differentiable
      when it requires grad), broadcastable to ``(..., Hq, L, S)`` as in
      PyTorch (``(L, S)``, ``(B, 1, 1, S)`` key padding, ``(B, H, L, S)``, ...);
      read in place, broadcast axes at stride 0.  Together with
      ``is_causal=True`` it is an error (ValueError), as in PyTorch's math
      backend (a RuntimeError there; its CPU flash kernel combines the two).
    * ``is_causal=True``: PyTorch's top-left aligned mask (query ``i`` sees
      keys ``j <= i``) for any L and S (query and key lengths); for
      flashcupy's bottom-right mask call ``flashcupy.torch.attention(...,
      causal=True)``.
    * ``dropout_p``: in [0, 1), at most ``flashcupy._philox.MAX_DROPOUT_P``
      (PyTorch also takes up to 1.0, which flashcupy rejects), applied
      whenever > 0, with the seed and offset of PyTorch's CUDA generator
      (reproducible under ``torch.manual_seed``; the bits are flashcupy's,
      not PyTorch's, so the pattern differs from PyTorch's own SDPA at the
      same seed).
    * ``enable_gqa=True``: query ``(..., Hq, L, E)``, key/value ``(..., Hkv, S, E)``
      with ``Hq = G * Hkv``, query head ``h`` uses key/value head ``h // G``;
      mapped onto broadcasting with views (the mask's head axis too), no copies.

    Leading dims broadcast as in ``torch.matmul`` (as PyTorch's math backend does).

    Rows that see no key (every key False in a boolean mask, or -inf in a
    floating one): flashcupy returns ``out = 0`` there with zero gradients.
    PyTorch's backends have not always agreed on this.  With PyTorch 2.13 on
    CPU its math backend and its flash kernel give 0 as well (float16 to
    float64), with zero gradients (float64, both mask kinds); the math
    backend of older releases gave NaN (a softmax over an all -inf row), and
    the fused CUDA kernels have varied between releases.  A finite large
    negative value (``torch.finfo(dtype).min``, as Hugging Face masks use) is
    an ordinary score: such a row averages over all keys, in every
    implementation.
    """
    # a plain call (no mask, no dropout, no GQA flag) of a signature checked
    # before: attention()'s fast entry (is_causal with L == S is its causal)
    plain = (attn_mask is None and type(dropout_p) is float and dropout_p == 0.0
             and not enable_gqa)
    if plain:
        hit = _fast_attention(query, key, value, is_causal, scale, need_lse=False, sdpa=True)
        if hit is not None:
            return hit[0]
    fn = "scaled_dot_product_attention"
    if attn_mask is not None and is_causal:
        raise ValueError(
            f"{fn}(): attn_mask and is_causal=True cannot be combined (torch's SDPA raises too: "
            f"'Explicit attn_mask should not be set when is_causal=True'); fold the causal mask "
            f"into attn_mask (e.g. attn_mask & torch.ones(L, S, dtype=torch.bool).tril()) or "
            f"pass only one of them")
    dropout_p = _check_dropout_p(fn, dropout_p)
    _check_tensors(fn, query=query, key=key, value=value)
    query, key, value = _autocast(query, key, value)
    _check_dtypes(fn, query=query, key=key, value=value)
    scale = _check_scale(fn, scale)
    L, S = query.size(-2), key.size(-2)
    q, k, v = query, key, value
    n_kv = group = 0
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
            n_kv, group = hk, hq // hk
            q = query.unflatten(-3, (n_kv, group))
            k = key.unsqueeze(-3)
            v = value.unsqueeze(-3)
    bias = mask = None
    if attn_mask is not None:
        batch = _batch_shape(fn, q, k, v)
        if group:  # PyTorch's target has the query heads: (..., Hkv, G) -> (..., Hq)
            batch = batch[:-2] + (batch[-2] * batch[-1],)
        m = _autocast_bias(attn_mask, query) if isinstance(attn_mask, torch.Tensor) else attn_mask
        kind = _check_pair_tensor(fn, "attn_mask", m, query, batch + (L, S), "attn_mask")
        if group:
            m = _split_heads(m, n_kv, group)
        if kind == "mask":
            mask = m
        else:
            bias = m
    # top-left causal (query i sees keys j <= i) is the bottom-right window
    # j <= i + (S - L) + right with right = L - S; for L == S that is causal
    causal = bool(is_causal) and L == S
    window_right = L - S if is_causal and L != S else None
    rng = _dropout_args(query.device) if dropout_p > 0.0 else None
    out, lse = _attention(q, k, v, causal, scale, None, window_right, None, None, None, bias,
                          mask, dropout_p, rng)
    if group:
        out = out.flatten(-4, -3)  # (..., Hkv, G, L, Ev) -> (..., Hq, L, Ev): a view
    elif plain and window_right is None:
        _fast_remember(q, k, v, causal, scale, out, lse)  # (the call is attention's own)
    return out


# packed batches and KV caches (flashcupy/_torch_varlen.py)
from flashcupy._torch_varlen import attention_varlen, attention_with_kvcache  # noqa: E402


def merge_attention(outs, lses, *, return_lse=False):
    """Attention over the union of disjoint key sets, from ``(out_i, lse_i)``
    over each: ``flashcupy.merge_attention`` for tensors (same shapes, dtypes
    and rules; flashcupy/_merge.py).  Plain PyTorch operations, so it runs on
    any device, under ``torch.compile``, and autograd differentiates it with
    respect to ``outs`` and ``lses`` (``attention(..., return_lse=True)``'s LSE
    itself carries no gradient)."""
    from flashcupy import _merge

    fn = "flashcupy.torch.merge_attention"
    _merge.check(fn, outs, lses, lambda x: isinstance(x, torch.Tensor), "torch.Tensor",
                 lambda x: f"shape {tuple(x.shape)} and dtype {x.dtype}",
                 (torch.float32, torch.float64))
    dev = outs[0].device
    for name, xs in (("outs", outs), ("lses", lses)):
        for i, x in enumerate(xs):
            if x.device != dev:
                raise ValueError(f"{fn}: {name}[{i}] is on {x.device}, outs[0] on {dev}")
    wide = torch.float64 if (outs[0].dtype == torch.float64
                             or any(x.dtype == torch.float64 for x in lses)) else torch.float32
    out, lse = _merge.merge(torch, outs, lses, lambda x: x.to(wide),
                            lambda x: x.to(outs[0].dtype))
    return (out, lse) if return_lse else out
